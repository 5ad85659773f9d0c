"""The payment_jobs conversation: every statement on payments and their events lives here.

Transitions go through `transition()`, which names the actor, the reason and the data the
database trigger records in `payment_events`; the trigger itself refuses illegal moves.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any, NamedTuple

from psycopg import sql
from psycopg.types.json import Jsonb

from tasks import ledger
from tasks.db import Conn

FINAL_STATES = frozenset({"rejected", "failed", "canceled", "reconciled", "refunded"})

Payment = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


async def set_event_context(
    conn: Conn, *, actor: str, reason: str | None = None, data: dict[str, Any] | None = None
) -> None:
    """Who and why of the next status change in this transaction (read by the trigger)."""
    await conn.execute(
        """SELECT set_config('agentpay.actor', %(_actor)s, true),
                  set_config('agentpay.reason', %(_reason)s, true),
                  set_config('agentpay.event_data', %(_data)s, true)""",
        _event_context(actor=actor, reason=reason, data=data),
    )


def _event_context(
    *, actor: str, reason: str | None, data: dict[str, Any] | None
) -> dict[str, str]:
    return {
        "_actor": actor,
        "_reason": reason or "",
        "_data": json.dumps(data or {}, default=str),
    }


async def insert(
    conn: Conn,
    *,
    agent_id: str,
    currency: str,
    payment_method: str,
    customer: str | None = None,
    capture_method: str = "automatic",
    amount: int | None = None,
    line_items: list[dict[str, Any]] | None = None,
    description: str | None = None,
    metadata: dict[str, str] | None = None,
    payment_id: str | None = None,
) -> Payment:
    # The event context is set by the INSERT itself (one round trip, not two), as in
    # `transition`: the FROM item is evaluated before the row is inserted.
    cur = await conn.execute(
        """INSERT INTO payment_jobs (id, agent_id, currency, payment_method, customer,
                                     capture_method, amount_requested, line_items,
                                     description, metadata)
            SELECT %(id)s, %(agent_id)s, %(currency)s, %(payment_method)s, %(customer)s,
                   %(capture_method)s, %(amount)s, %(line_items)s, %(description)s,
                   %(metadata)s
            FROM (SELECT set_config('agentpay.actor', %(_actor)s, true),
                         set_config('agentpay.reason', %(_reason)s, true),
                         set_config('agentpay.event_data', %(_data)s, true)) AS _event_context
            RETURNING *""",
        {
            "id": payment_id or new_id("pay"),
            "agent_id": agent_id,
            "currency": currency,
            "payment_method": payment_method,
            "customer": customer,
            "capture_method": capture_method,
            "amount": amount,
            "line_items": Jsonb(line_items) if line_items is not None else None,
            "description": description,
            "metadata": Jsonb(metadata or {}),
            **_event_context(actor=f"agent:{agent_id}", reason="payment requested", data=None),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def get(conn: Conn, payment_id: str, *, agent_id: str | None = None) -> Payment | None:
    """A payment by id; with `agent_id`, only if it belongs to that agent."""
    cur = await conn.execute(
        """SELECT * FROM payment_jobs
            WHERE id = %s AND (%s::text IS NULL OR agent_id = %s)""",
        (payment_id, agent_id, agent_id),
    )
    return await cur.fetchone()


async def lock(conn: Conn, payment_id: str, *, agent_id: str | None = None) -> Payment | None:
    """Read a payment FOR UPDATE (with `agent_id`, only if it belongs to that agent): the
    caller's transaction owns it until commit."""
    cur = await conn.execute(
        """SELECT * FROM payment_jobs WHERE id = %s AND (%s::text IS NULL OR agent_id = %s)
           FOR UPDATE""",
        (payment_id, agent_id, agent_id),
    )
    return await cur.fetchone()


# Columns a step may write besides status.
_WRITABLE = frozenset(
    {
        "amount_subtotal",
        "amount_fee",
        "amount_tax",
        "amount_total",
        "amount_refunded",
        "amount_captured",
        "amount_lost_to_disputes",
        "provider_idempotency_key",
        "provider_payment_id",
        "failure_code",
        "failure_message",
        "price_breakdown",
        "risk_decision",
        "capture_requested_at",
        "cancel_requested_at",
    }
)


# A column value written as the transaction's `now()`, by the database's clock: a time kept
# beside the payment's own (created_at, updated_at) is taken from the same clock, not from
# the clock of whichever process wrote it.
NOW = sql.SQL("now()")


async def update(conn: Conn, payment_id: str, **columns: Any) -> Payment:
    """Write columns of a locked payment (no status change, so no event)."""
    return await _update(conn, payment_id, columns)


class StoredId(NamedTuple):
    """What `store_provider_id` found: the payment's intent id now, and whether its charge
    may go on with it (it is `charging`, with no cancel asked for, and has an intent)."""

    id: str | None
    go_on: bool


async def store_provider_id(conn: Conn, payment_id: str, provider_payment_id: str) -> StoredId:
    """Record the provider's id of the payment being charged, once (the UPDATE takes the row
    lock itself), and only while its charge may go on: `charging`, with no cancel asked for
    (the cancel job settles the payment, perhaps without the provider, and no intent may be
    confirmed after it). A payment that already has an id keeps it. Returns the id the
    payment has now — this one, or the one stored before, read by a statement of its own
    (an UPDATE that waited for another transaction storing one still reads the row as it was
    before that commit) — and whether the charge may go on."""
    cur = await conn.execute(
        """UPDATE payment_jobs SET provider_payment_id = %s
           WHERE id = %s AND provider_payment_id IS NULL
             AND status = 'charging' AND cancel_requested_at IS NULL""",
        (provider_payment_id, payment_id),
    )
    if cur.rowcount == 1:
        return StoredId(provider_payment_id, True)
    cur = await conn.execute(
        """SELECT provider_payment_id,
                  status = 'charging' AND cancel_requested_at IS NULL AS go_on
             FROM payment_jobs WHERE id = %s""",
        (payment_id,),
    )
    row = await cur.fetchone()
    stored = row["provider_payment_id"] if row else None
    # Going on needs an intent that is the payment's: none stored (the UPDATE failed on the
    # state, read again here as it may have changed since) is no going on.
    return StoredId(stored, bool(row and row["go_on"] and stored))


async def transition(
    conn: Conn,
    payment: Payment,
    to_status: str,
    *,
    actor: str,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
    **columns: Any,
) -> Payment:
    """Move a locked payment to `to_status` (and write `columns` with it). The trigger
    checks the move against the state machine and records the event.

    The event context is set by the UPDATE itself (one round trip, not two): what
    `set_event_context` would set, for the rest of the transaction."""
    from_status = payment["status"]
    context = _event_context(actor=actor, reason=reason, data=data)
    updated = await _update(conn, payment["id"], {"status": to_status, **columns}, context)
    payment.update(updated)
    await ledger.on_transition(conn, updated, from_status, to_status)
    return updated


# The UPDATE of a transition sets the event context first: the FROM item is evaluated
# before any row is updated, so the triggers of the update read it.
_UPDATE_WITH_CONTEXT = """UPDATE payment_jobs SET {}
FROM (SELECT set_config('agentpay.actor', %(_actor)s, true),
             set_config('agentpay.reason', %(_reason)s, true),
             set_config('agentpay.event_data', %(_data)s, true)) AS _event_context
WHERE payment_jobs.id = %(_id)s
RETURNING payment_jobs.*"""


async def _update(
    conn: Conn,
    payment_id: str,
    columns: dict[str, Any],
    context: dict[str, str] | None = None,
) -> Payment:
    unknown = set(columns) - _WRITABLE - {"status"}
    if unknown:
        raise ValueError(f"not writable: {sorted(unknown)}")
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(
            sql.Identifier(name), NOW if value is NOW else sql.Placeholder(name)
        )
        for name, value in columns.items()
    )
    if context is None:
        query = sql.SQL("UPDATE payment_jobs SET {} WHERE id = %(_id)s RETURNING *")
    else:
        query = sql.SQL(_UPDATE_WITH_CONTEXT)
    values = {name: value for name, value in columns.items() if value is not NOW}
    cur = await conn.execute(
        query.format(assignments), {**values, **(context or {}), "_id": payment_id}
    )
    row = await cur.fetchone()
    if row is None:
        raise LookupError(payment_id)
    return row


async def record_event(
    conn: Conn,
    payment: Payment,
    type_: str,
    *,
    actor: str,
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """An event that is not a transition (a mismatch found, a webhook seen, a retry)."""
    await conn.execute(
        """INSERT INTO payment_events (payment_id, type, from_status, to_status, actor,
                                       reason, data)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (
            payment["id"],
            type_,
            payment["status"],
            payment["status"],
            actor,
            reason,
            Jsonb(data or {}),
        ),
    )


async def events(conn: Conn, payment_id: str) -> list[dict[str, Any]]:
    cur = await conn.execute(
        """SELECT id, type, from_status, to_status, actor, reason, data, created_at
           FROM payment_events WHERE payment_id = %s ORDER BY id""",
        (payment_id,),
    )
    return await cur.fetchall()


async def page(
    conn: Conn,
    *,
    agent_id: str | None,
    limit: int,
    status: Sequence[str] | None = None,
    created: dict[str, Any] | None = None,
    starting_after: Payment | None = None,
    ending_before: Payment | None = None,
) -> tuple[list[Payment], bool]:
    """One page of payments, newest first (by created_at, then id), and whether more follow.

    With `agent_id` only that agent's; `status`: only in one of those states; `created`
    bounds created_at (keys gte, gt, lte, lt);
    `starting_after` pages on to older payments than that one, `ending_before` back to newer
    ones (the page is still newest first); with both, the page walks down from
    `starting_after` and stops at `ending_before`."""
    conditions: list[sql.Composable] = [sql.SQL("TRUE")]
    params: dict[str, Any] = {"limit": limit + 1}
    if agent_id is not None:
        conditions.append(sql.SQL("agent_id = %(agent_id)s"))
        params["agent_id"] = agent_id
    operators = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
    for bound, value in (created or {}).items():
        if value is not None:
            conditions.append(
                sql.SQL("created_at {} {}").format(
                    sql.SQL(operators[bound]), sql.Placeholder(f"created_{bound}")
                )
            )
            params[f"created_{bound}"] = value
    if starting_after is not None:
        conditions.append(sql.SQL("(created_at, id) < (%(after_at)s, %(after_id)s)"))
        params.update(after_at=starting_after["created_at"], after_id=starting_after["id"])
    if ending_before is not None:
        conditions.append(sql.SQL("(created_at, id) > (%(before_at)s, %(before_id)s)"))
        params.update(before_at=ending_before["created_at"], before_id=ending_before["id"])
    # Paging back walks the index the other way round, then turns the page over.
    backwards = ending_before is not None and starting_after is None
    direction = sql.SQL("ASC" if backwards else "DESC")
    select = sql.SQL(
        "SELECT * FROM payment_jobs WHERE {} ORDER BY created_at {}, id {} LIMIT %(limit)s"
    )
    if not status:
        query = select.format(sql.SQL(" AND ").join(conditions), direction, direction)
    else:
        # One branch per status, merged: an agent's payments in one state are read in page
        # order from their index (agent_id, status, created_at), and a state few payments
        # are in from (status, updated_at). With `status = ANY(…)` the planner walked the
        # created_at index of all the payments and filtered (seconds on a big table).
        branches = []
        for n, wanted in enumerate(sorted(set(status))):
            params[f"status_{n}"] = wanted
            branch = [*conditions, sql.SQL("status = {}").format(sql.Placeholder(f"status_{n}"))]
            branches.append(
                sql.SQL("({})").format(
                    select.format(sql.SQL(" AND ").join(branch), direction, direction)
                )
            )
        query = sql.SQL(
            "SELECT * FROM ({}) AS p ORDER BY created_at {}, id {} LIMIT %(limit)s"
        ).format(sql.SQL(" UNION ALL ").join(branches), direction, direction)
    cur = await conn.execute(query, params)
    rows = await cur.fetchall()
    has_more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
    return rows, has_more


# What an action asked for on a payment waits in: a capture while `authorized`, a cancel
# while the provider still has to be asked (`charging`, `authorized`, `requires_action`).
CAPTURE_PENDING_IN = frozenset({"authorized"})
CANCEL_PENDING_IN = frozenset({"charging", "authorized", "requires_action"})


def pending_action(payment: Payment) -> str | None:
    """What the fleet is still doing on the payment because someone asked: "capture",
    "cancel" or "refund"; None when nothing is pending. A refused capture or cancel clears
    its request (the payment's events say why: `capture_failed`, `cancel_failed`)."""
    if payment["capture_requested_at"] and payment["status"] in CAPTURE_PENDING_IN:
        return "capture"
    if payment["cancel_requested_at"] and payment["status"] in CANCEL_PENDING_IN:
        return "cancel"
    if payment.get("refunds_pending"):
        return "refund"
    return None


async def record_mismatches(
    conn: Conn,
    payment: Payment,
    provider_payment_id: str | None,
    found: list[dict[str, Any]],
    *,
    actor: str,
    reason: str,
) -> None:
    """Where the provider disagrees with the payment, where operators see it: one
    `reconcile_mismatches` row per item (`field`, `expected`, `actual`), and one
    `reconcile_mismatch` payment event."""
    for item in found:
        await conn.execute(
            """INSERT INTO reconcile_mismatches
                   (payment_id, provider_payment_id, field, expected, actual)
               VALUES (%s, %s, %s, %s, %s)""",
            (
                payment["id"],
                provider_payment_id,
                item["field"],
                Jsonb(item["expected"]),
                Jsonb(item["actual"]),
            ),
        )
    await record_event(
        conn,
        payment,
        "reconcile_mismatch",
        actor=actor,
        reason=reason,
        data={"provider_payment_id": provider_payment_id, "mismatches": found},
    )


async def mismatch_recorded(
    conn: Conn,
    payment_id: str,
    field: str,
    key: str,
    value: str,
    *,
    open_only: bool = False,
    also: dict[str, Any] | None = None,
) -> bool:
    """Whether a reconcile mismatch of `field` whose `actual[key]` is `value` (and whose
    `actual` holds everything in `also`) was recorded for the payment already (with
    `open_only`, one not resolved yet): what keeps each such finding to one row however
    often it is found."""
    cur = await conn.execute(
        """SELECT 1 FROM reconcile_mismatches
            WHERE payment_id = %s AND field = %s AND actual->>%s = %s
              AND actual @> %s AND (NOT %s OR resolved_at IS NULL)""",
        (payment_id, field, key, value, Jsonb(also or {}), open_only),
    )
    return await cur.fetchone() is not None


async def add_lost_to_disputes(conn: Conn, payment: Payment, amount: int) -> None:
    """What the ledger just booked as lost to a dispute (negative: given back), on the
    locked payment's `amount_lost_to_disputes` (the agent's view of it)."""
    if amount:
        total = payment.get("amount_lost_to_disputes", 0) + amount
        payment.update(await update(conn, payment["id"], amount_lost_to_disputes=total))


def collected(payment: Payment) -> int:
    """What the provider collected for the payment: `amount_captured` once reconcile wrote
    it (less than the total after a partial capture at the provider), else the total. What
    refunds can give back."""
    captured = payment.get("amount_captured")
    return int(payment["amount_total"] if captured is None else captured)


def public(payment: Payment) -> dict[str, Any]:
    """The payment object of the HTTP contract."""
    failure = None
    if payment["failure_code"]:
        failure = {"code": payment["failure_code"], "message": payment["failure_message"]}
    return {
        "id": payment["id"],
        "object": "payment",
        "agent_id": payment["agent_id"],
        "status": payment["status"],
        "currency": payment["currency"],
        "amount_subtotal": payment["amount_subtotal"],
        "amount_fee": payment["amount_fee"],
        "amount_tax": payment["amount_tax"],
        "amount_total": payment["amount_total"],
        "amount_refunded": payment["amount_refunded"],
        "amount_captured": payment.get("amount_captured"),
        "amount_lost_to_disputes": payment.get("amount_lost_to_disputes", 0),
        "capture_method": payment["capture_method"],
        "payment_method": payment["payment_method"],
        "customer": payment.get("customer"),
        "provider_payment_id": payment["provider_payment_id"],
        "failure": failure,
        "pending_action": pending_action(payment),
        "description": payment["description"],
        "metadata": payment["metadata"],
        "breakdown": payment.get("price_breakdown"),
        "risk": payment.get("risk_decision"),
        "created_at": payment["created_at"],
        "updated_at": payment["updated_at"],
    }
