"""Actions on a payment after it reached the provider: capture, cancel, refunds.

Each route locks the payment, lets tasks/charge.py or tasks/refunds.py check the state and
record the request, and defers the job for the charge role — all in one transaction. The API
never calls the provider: the answer is 202 with the payment (or the refund) as it is now.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.responses import Response
from pydantic import ConfigDict, Field

from api.deps import AgentDep, PoolDep
from api.errors import ApiError, not_found, responses
from api.idempotency import IdempotencyDep
from api.models import ApiModel, Payment, Refund, RefundCreate, RefundList, SafeText
from api.routes.payments import visible
from tasks import agents, charge, payments, refunds
from tasks.db import Conn

router = APIRouter(prefix="/v1/payments", tags=["payments"])

ERRORS = responses(400, 401, 404, 409, 413, 429, 500)
READ_ERRORS = responses(400, 401, 404, 429, 500)


class CaptureRequest(ApiModel):
    """A capture takes no parameters: the whole authorized amount is captured. (A body with
    any field, say `amount_to_capture`, is refused rather than ignored.)"""

    model_config = ConfigDict(extra="forbid")


class CancelRequest(ApiModel):
    model_config = ConfigDict(extra="forbid")

    reason: SafeText | None = Field(default=None, max_length=500)


async def _locked(conn: Conn, payment_id: str, agent: agents.Agent) -> payments.Payment:
    """The payment, locked, if the agent may act on it (its own; operators: any)."""
    payment = await visible(conn, payment_id, agent, for_update=True)
    if payment is None:
        raise not_found()
    return payment


def _conflict(error: ValueError) -> ApiError:
    return ApiError(409, "payment_unexpected_state", str(error))


@router.post("/{payment_id}/capture", status_code=202, response_model=Payment, responses=ERRORS)
async def capture_payment(
    payment_id: str,
    agent: AgentDep,
    idem: IdempotencyDep,
    body: Annotated[CaptureRequest | None, Body()] = None,
) -> Response:
    """Capture an `authorized` payment (manual capture), all of its amount: the charge role
    captures the PaymentIntent, then the payment goes on to `succeeded` and `reconciled`."""
    async with idem.transaction() as conn:
        payment = await _locked(conn, payment_id, agent)
        try:
            payment = await charge.request_capture(conn, payment, actor=agent.actor)
        except ValueError as error:
            raise _conflict(error) from error
        return await idem.respond(Payment.model_validate(payments.public(payment)), 202)


@router.post("/{payment_id}/cancel", status_code=202, response_model=Payment, responses=ERRORS)
async def cancel_payment(
    payment_id: str,
    agent: AgentDep,
    idem: IdempotencyDep,
    body: Annotated[CancelRequest | None, Body()] = None,
) -> Response:
    """Cancel a payment. Not yet at the provider: `canceled` at once. `charging`, `authorized`
    or `requires_action`: the charge role cancels the PaymentIntent, then the payment (while
    `charging`, a charge that took the money first wins: the payment follows it). Any
    other state: 409."""
    async with idem.transaction() as conn:
        payment = await _locked(conn, payment_id, agent)
        try:
            payment = await charge.request_cancel(
                conn, payment, actor=agent.actor, reason=body.reason if body else None
            )
        except ValueError as error:
            raise _conflict(error) from error
        return await idem.respond(Payment.model_validate(payments.public(payment)), 202)


@router.post("/{payment_id}/refunds", status_code=202, response_model=Refund, responses=ERRORS)
async def create_refund(
    payment_id: str,
    agent: AgentDep,
    idem: IdempotencyDep,
    body: Annotated[RefundCreate | None, Body()] = None,
) -> Response:
    """Refund all or part of a `succeeded`, `reconciled` or `partially_refunded` payment.
    Never more than remains of what was collected; the charge role refunds at the provider,
    keyed by the refund's id, once the payment is reconciled."""
    body = body or RefundCreate()
    async with idem.transaction() as conn:
        payment = await _locked(conn, payment_id, agent)
        try:
            refund = await refunds.request_refund(
                conn, payment, amount=body.amount, actor=agent.actor, reason=body.reason
            )
        except refunds.RefundAmountError as error:
            raise ApiError(400, "amount_invalid", str(error), param="amount") from error
        except refunds.RefundLimitError as error:
            raise ApiError(409, "refund_limit_reached", str(error)) from error
        except refunds.RefundDisputedError as error:
            raise ApiError(409, "charge_disputed", str(error)) from error
        except ValueError as error:
            raise _conflict(error) from error
        return await idem.respond(Refund.model_validate(refunds.public(refund)), 202)


@router.get("/{payment_id}/refunds", response_model=RefundList, responses=READ_ERRORS)
async def list_refunds(payment_id: str, agent: AgentDep, pool: PoolDep) -> dict[str, Any]:
    """The payment's refunds, oldest first."""
    async with pool.connection() as conn:
        payment = await visible(conn, payment_id, agent)
        if payment is None:
            raise not_found()
        rows = await refunds.for_payment(conn, payment_id)
    return {"object": "list", "data": [refunds.public(r) for r in rows]}
