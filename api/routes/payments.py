"""Payments: create (record + enqueue in one transaction), read, list events."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import AgentDep, PoolDep
from api.errors import not_found
from api.models import ErrorResponse, EventList, Payment, PaymentCreate
from tasks import payments
from tasks.app import defer

router = APIRouter(prefix="/v1/payments", tags=["payments"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such payment (or not yours)"}
}


@router.post("", status_code=202, response_model=Payment, responses=ERRORS)
async def create_payment(body: PaymentCreate, agent: AgentDep, pool: PoolDep) -> dict[str, Any]:
    """Record a payment and enqueue its pricing, atomically. The pipeline runs from there."""
    async with pool.connection() as conn, conn.transaction():
        payment = await payments.insert(
            conn,
            agent_id=agent.id,
            currency=body.currency,
            payment_method=body.payment_method,
            capture_method=body.capture_method,
            amount=body.amount,
            line_items=[i.model_dump() for i in body.line_items] if body.line_items else None,
            description=body.description,
            metadata=body.metadata,
        )
        await defer(conn, "pricing", payment_id=payment["id"])
    return payments.public(payment)


@router.get("/{payment_id}", response_model=Payment, responses={**ERRORS, **NOT_FOUND})
async def get_payment(payment_id: str, agent: AgentDep, pool: PoolDep) -> dict[str, Any]:
    async with pool.connection() as conn:
        payment = await payments.get(conn, payment_id, agent_id=_scope(agent))
    if payment is None:
        raise not_found()
    return payments.public(payment)


@router.get("/{payment_id}/events", response_model=EventList, responses={**ERRORS, **NOT_FOUND})
async def payment_events(payment_id: str, agent: AgentDep, pool: PoolDep) -> dict[str, Any]:
    """Every transition of the payment, oldest first."""
    async with pool.connection() as conn:
        payment = await payments.get(conn, payment_id, agent_id=_scope(agent))
        if payment is None:
            raise not_found()
        return {"object": "list", "data": await payments.events(conn, payment_id)}


def _scope(agent: Any) -> str | None:
    """Agents see their own payments; operators see all."""
    return None if agent.is_operator else agent.id
