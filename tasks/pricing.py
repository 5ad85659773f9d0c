"""Pricing role: received → priced. Turns what the agent asked for into amounts."""

from __future__ import annotations

from typing import Any

from tasks import payments
from tasks.app import Backoff, app, defer, pool
from tasks.db import Conn

ROLE = "pricing"


def price(payment: payments.Payment) -> dict[str, int]:
    """The amounts of a payment: subtotal, tax, fee and total, in minor units."""
    if payment["line_items"]:
        subtotal = sum(int(i["unit_amount"]) * int(i["quantity"]) for i in payment["line_items"])
    else:
        subtotal = int(payment["amount_requested"])
    return {
        "amount_subtotal": subtotal,
        "amount_tax": 0,
        "amount_fee": 0,
        "amount_total": subtotal,
    }


async def advance(conn: Conn, payment_id: str) -> str | None:
    """One pricing step in the caller's transaction; returns the new status, or None when
    the payment is already past pricing (a re-run does nothing)."""
    payment = await payments.lock(conn, payment_id)
    if payment is None or payment["status"] != "received":
        return None
    amounts = price(payment)
    await payments.transition(
        conn, payment, "priced", actor=f"worker:{ROLE}", reason="priced", data=amounts, **amounts
    )
    await defer(conn, "risk", payment_id=payment_id)
    return "priced"


@app.task(name=ROLE, queue=ROLE, retry=Backoff())
async def price_payment(payment_id: str) -> Any:
    async with pool().connection() as conn, conn.transaction():
        return await advance(conn, payment_id)
