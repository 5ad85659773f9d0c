"""Operators' review of payments risk sent to in_review: list, approve, reject."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ConfigDict, Field

from api.deps import OperatorDep, PoolDep
from api.errors import ApiError, responses
from api.idempotency import Idempotency, IdempotencyDep
from api.models import ApiModel, Payment, SafeText
from tasks import payments, risk

router = APIRouter(prefix="/v1/review", tags=["review"])

ERRORS = responses(400, 401, 403, 429, 500)
DECISION_ERRORS = responses(
    400, 401, 403, 404, 409, 413, 429, 500, described={409: "The payment is not in_review"}
)


class Decision(ApiModel):
    model_config = ConfigDict(extra="forbid")

    note: SafeText | None = Field(default=None, max_length=500, description="Why (kept in events)")


class ReviewList(ApiModel):
    object: Literal["list"] = "list"
    data: list[Payment]


@router.get("", response_model=ReviewList, responses=ERRORS)
async def waiting(
    _: OperatorDep, pool: PoolDep, limit: int = Query(default=100, ge=1, le=1000)
) -> dict[str, Any]:
    """Payments waiting for an operator's decision, oldest first; each has the reasons in
    its `risk` field."""
    async with pool.connection() as conn:
        found = await risk.in_review(conn, limit=limit)
    return {"object": "list", "data": [payments.public(p) for p in found]}


@router.post("/{payment_id}/approve", response_model=Payment, responses=DECISION_ERRORS)
async def approve(
    payment_id: str, operator: OperatorDep, idem: IdempotencyDep, body: Decision | None = None
) -> Response:
    """Approve an in_review payment: it goes on to be charged."""
    return await _decide(payment_id, operator.actor, idem, approve=True, body=body)


@router.post("/{payment_id}/reject", response_model=Payment, responses=DECISION_ERRORS)
async def reject(
    payment_id: str, operator: OperatorDep, idem: IdempotencyDep, body: Decision | None = None
) -> Response:
    """Reject an in_review payment: it ends `rejected` and its budget hold is released."""
    return await _decide(payment_id, operator.actor, idem, approve=False, body=body)


async def _decide(
    payment_id: str, actor: str, idem: Idempotency, *, approve: bool, body: Decision | None
) -> Response:
    """The decision, in the request's idempotent transaction (a retried decision with the
    same Idempotency-Key gets the first answer back)."""
    async with idem.transaction() as conn:
        try:
            payment = await risk.decide(
                conn,
                payment_id,
                approve=approve,
                actor=actor,
                note=body.note if body else None,
            )
        except risk.ReviewError as error:
            if error.code == "not_found":
                raise ApiError(404, "resource_missing", "No such payment", param="id") from None
            raise ApiError(
                409, "payment_not_in_review", error.message, type_="invalid_request_error"
            ) from None
        return await idem.respond(Payment.model_validate(payments.public(payment)))
