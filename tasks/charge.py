"""Charge role: approved → charging → succeeded | authorized | requires_action | failed.

Design rule 3, step by step, each database step its own short transaction:
1. claim: approved → charging, storing the provider idempotency key before any call;
2. provider, outside any transaction: create the PaymentIntent (stable key), store its id,
   confirm it (stable key); a re-run finds the id and retrieves instead of guessing;
3. finish: apply what the provider says, under the row lock, only if still `charging`.
An unknown outcome (timeout, 5xx after the SDK's retries, a lost response) leaves the payment
`charging` and the job retries with backoff; reconcile's sweep resolves what stays there.
"""

from __future__ import annotations

from typing import Any

from tasks import payments, provider
from tasks.app import Backoff, app, defer, pool
from tasks.db import Conn

ROLE = "charge"
ACTOR = f"worker:{ROLE}"

# What a PaymentIntent's status means for a payment that is `charging`.
_OUTCOMES = {
    "succeeded": "succeeded",
    "requires_capture": "authorized",
    "requires_action": "requires_action",
    "canceled": "canceled",
}


def outcome(intent: provider.Intent) -> str | None:
    """The payment status an intent's status settles on, or None while it is not settled
    (processing, or not confirmed yet)."""
    if intent.status == "requires_payment_method" and intent.failure_code:
        return "failed"
    return _OUTCOMES.get(intent.status)


async def settle(
    conn: Conn, payment: payments.Payment, intent: provider.Intent, *, actor: str
) -> str | None:
    """Apply a settled intent to a locked payment and defer what follows."""
    to = outcome(intent)
    if to is None or to == payment["status"]:
        return None
    columns: dict[str, Any] = {"provider_payment_id": intent.id} if intent.id else {}
    if to == "failed":
        columns |= {"failure_code": intent.failure_code, "failure_message": intent.failure_message}
    await payments.transition(
        conn,
        payment,
        to,
        actor=actor,
        reason=f"provider status {intent.status}",
        data={"provider_payment_id": intent.id, "provider_status": intent.status},
        **columns,
    )
    if to == "succeeded":
        await defer(conn, "reconcile", payment_id=payment["id"])
    return to


async def claim(payment_id: str) -> payments.Payment | None:
    """Step 1: the payment to charge, now `charging` with its key stored; None if it is
    already past charging."""
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is None:
            return None
        if payment["status"] == "approved":
            await payments.transition(
                conn,
                payment,
                "charging",
                actor=ACTOR,
                reason="charge started",
                provider_idempotency_key=provider.idempotency_key(payment_id, "create"),
            )
        return payment if payment["status"] == "charging" else None


async def call_provider(payment: payments.Payment) -> provider.Intent:
    """Step 2: create (or find) and confirm the PaymentIntent. Raises provider.Unknown when
    the outcome is not known; a decline comes back as a failed intent."""
    try:
        if payment["provider_payment_id"] is None:
            intent = await provider.create_intent(payment)
            await _store_intent_id(payment["id"], intent.id)
        else:
            intent = await provider.retrieve_intent(payment["provider_payment_id"])
        if (
            intent.status in ("requires_confirmation", "requires_payment_method")
            and outcome(intent) is None
        ):
            intent = await provider.confirm_intent(payment["id"], intent.id)
    except provider.Declined as declined:
        if declined.intent is not None:
            return declined.intent
        return provider.Intent(
            id=payment["provider_payment_id"] or "",
            status="requires_payment_method",
            amount=payment["amount_total"],
            amount_received=0,
            currency=payment["currency"],
            metadata={},
            failure_code=declined.code,
            failure_message=declined.message,
        )
    return intent


async def _store_intent_id(payment_id: str, intent_id: str) -> None:
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is not None and payment["provider_payment_id"] is None:
            await payments.update(conn, payment_id, provider_payment_id=intent_id)


async def finish(payment_id: str, intent: provider.Intent) -> str | None:
    """Step 3: settle the payment if it is still `charging`."""
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is None or payment["status"] != "charging":
            return None
        to = await settle(conn, payment, intent, actor=ACTOR)
        if to is None:
            # Not settled yet (processing): reconcile looks again shortly.
            await defer(conn, "reconcile", payment_id=payment_id, schedule_in=5)
        return to


@app.task(name=ROLE, queue=ROLE, retry=Backoff(max_attempts=12))
async def charge_payment(payment_id: str) -> Any:
    payment = await claim(payment_id)
    if payment is None:
        return None
    intent = await call_provider(payment)
    return await finish(payment_id, intent)
