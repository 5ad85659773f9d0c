"""Reconcile role: succeeded → reconciled, once the provider's truth has been checked.

Reconcile also resolves unknown outcomes: a payment still `charging` is settled from the
provider's PaymentIntent (retrieved, never re-created), or handed back to the charge role
whose calls are idempotent.
"""

from __future__ import annotations

from typing import Any

from tasks import payments, provider
from tasks.app import Backoff, app, defer, pool
from tasks.charge import settle
from tasks.db import Conn

ROLE = "reconcile"
ACTOR = f"worker:{ROLE}"


def mismatches(payment: payments.Payment, intent: provider.Intent) -> list[dict[str, Any]]:
    """Where the provider's PaymentIntent disagrees with our payment."""
    found = []
    expected = {
        "amount": payment["amount_total"],
        "currency": payment["currency"],
        "metadata.payment_id": payment["id"],
        "metadata.agent_id": payment["agent_id"],
    }
    actual = {
        "amount": intent.amount,
        "currency": intent.currency,
        "metadata.payment_id": intent.metadata.get("payment_id"),
        "metadata.agent_id": intent.metadata.get("agent_id"),
    }
    for field, want in expected.items():
        if actual[field] != want:
            found.append({"field": field, "expected": want, "actual": actual[field]})
    return found


async def record_mismatches(
    conn: Conn, payment: payments.Payment, intent: provider.Intent, found: list[dict[str, Any]]
) -> None:
    await payments.record_event(
        conn,
        payment,
        "reconcile_mismatch",
        actor=ACTOR,
        reason="provider disagrees with the payment",
        data={"provider_payment_id": intent.id, "mismatches": found},
    )


async def finish_succeeded(conn: Conn, payment: payments.Payment, intent: provider.Intent) -> str:
    found = mismatches(payment, intent)
    if intent.status != "succeeded":
        found.append({"field": "status", "expected": "succeeded", "actual": intent.status})
    if found:
        await record_mismatches(conn, payment, intent, found)
    await payments.transition(
        conn,
        payment,
        "reconciled",
        actor=ACTOR,
        reason="provider checked" if not found else "provider checked, mismatches recorded",
        data={"provider_payment_id": intent.id, "mismatches": len(found)},
    )
    return "reconciled"


async def _resolve_charging(
    conn: Conn, payment: payments.Payment, intent: provider.Intent | None
) -> str | None:
    if intent is not None:
        settled = await settle(conn, payment, intent, actor=ACTOR)
        if settled is not None:
            return settled
    # Not created, not confirmed, or still processing: the charge role (idempotent) goes on.
    await defer(conn, "charge", payment_id=payment["id"], schedule_in=2)
    return None


@app.task(name=ROLE, queue=ROLE, retry=Backoff(max_attempts=12))
async def reconcile_payment(payment_id: str) -> Any:
    async with pool().connection() as conn:
        payment = await payments.get(conn, payment_id)
    if payment is None or payment["status"] not in ("succeeded", "charging"):
        return None
    intent = None
    if payment["provider_payment_id"]:
        intent = await provider.retrieve_intent(payment["provider_payment_id"])
    async with pool().connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment_id)
        if locked is None:
            return None
        if locked["status"] == "succeeded" and intent is not None:
            return await finish_succeeded(conn, locked, intent)
        if locked["status"] == "charging":
            return await _resolve_charging(conn, locked, intent)
    return None
