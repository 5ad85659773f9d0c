"""Risk role: priced → approved | in_review | rejected."""

from __future__ import annotations

from typing import Any

from tasks import payments
from tasks.app import Backoff, app, defer, pool
from tasks.db import Conn

ROLE = "risk"


async def advance(conn: Conn, payment_id: str) -> str | None:
    """One risk step in the caller's transaction; None when the payment is already past."""
    payment = await payments.lock(conn, payment_id)
    if payment is None or payment["status"] != "priced":
        return None
    await payments.transition(conn, payment, "approved", actor=f"worker:{ROLE}", reason="approved")
    await defer(conn, "charge", payment_id=payment_id)
    return "approved"


@app.task(name=ROLE, queue=ROLE, retry=Backoff())
async def check(payment_id: str) -> Any:
    async with pool().connection() as conn, conn.transaction():
        return await advance(conn, payment_id)
