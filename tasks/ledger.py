"""The double-entry ledger of agent budgets.

Every payment transition passes through `on_transition` inside the transition's own
transaction, so ledger effects commit or roll back with the state change that causes them.
"""

from __future__ import annotations

from tasks.db import Conn

Payment = dict


async def on_transition(conn: Conn, payment: Payment, from_status: str, to_status: str) -> None:
    """Ledger effects of a payment moving from `from_status` to `to_status` (the row is locked
    and already updated; `payment` holds the new values)."""


async def post_refund(conn: Conn, payment: Payment, *, refund_id: str, amount: int) -> None:
    """Ledger effects of a refund of `amount` that the provider has confirmed."""
