"""Provider events no webhook delivered, taken in from the provider's event list.

Stripe retries a webhook for three days; an endpoint down for longer, disabled, or not
subscribed to a type never gets the event. Payments waiting on the provider do not need it
(the maintenance sweeps drive them on from the provider's truth), but a settled payment
changes only through an event: a refund made in the Dashboard, a dispute. So
`catch_up_events` (reconcile role) lists the provider's events of those types created since
the last listing (`provider_event_cursor`, less an overlap) up to a minute before it
started by the database's clock (younger ones may have a webhook on its way), and stores
each one not stored yet exactly as a delivered one is (`tasks.webhooks.store`: once by its
id, with what it brings — the refund sync, the dispute's event and ledger posting). An
event that was delivered is only looked up. Maintenance defers it every
`event_catch_up_interval_seconds` (workers/maintenance.py); safe to run any number of times.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from prometheus_client import Counter

from tasks import provider, refunds, webhooks
from tasks.app import Backoff, app, defer, pool
from tasks.db import Conn
from tasks.settings import get_settings

TASK = "catch_up_events"
# A listing takes only events created at least this long before it started: a younger one's
# webhook may still be on its way (the provider sends it within seconds, retries it within
# the minute), and the catch-up would store it first and count it as never delivered. The
# cursor moves to the same bound, so the next listing takes them.
IN_FLIGHT_SECONDS = 60
ROLE = "reconcile"
log = logging.getLogger("agentpay.catchup")

# Event types that change a settled payment (at most 20: Stripe's limit for `types`).
TYPES = sorted(
    refunds.REFUND_EVENTS
    | {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)


# Served by the worker that runs the catch-up (reconcile role) on AGENTPAY_METRICS_PORT, with
# its other per-process metrics (workers/worker.py); every type's series exists from the start,
# at 0, so that `increase()` sees the first one.
MISSED = Counter(
    "agentpay_provider_events_missed",
    "Provider events no webhook delivered, taken in by the event catch-up, by type",
    ["type"],
)
for _type in TYPES:
    MISSED.labels(_type)

# Stripe lists events created in the last 30 days only. A listing that has to start further
# back than this (the catch-up turned off, or failing, for about a month) may have lost
# events it can never list: it says so, loudly, and counts it.
LISTABLE_SECONDS = 29 * 86400
GAPS = Counter(
    "agentpay_provider_event_gaps",
    "Event catch-ups that had to list further back than the provider keeps events "
    "(30 days): refund and dispute events no webhook delivered may be lost",
)


@app.task(name=TASK, queue=ROLE, retry=Backoff(max_attempts=12))
async def catch_up_events() -> int:
    """Store the provider's events of `TYPES` made since the last listing that are not
    stored yet; returns how many were (each was never delivered)."""
    async with pool().connection() as conn:
        now = await _now(conn)
        cur = await conn.execute("SELECT created_through FROM provider_event_cursor")
        row = await cur.fetchone()
    through = now - IN_FLIGHT_SECONDS
    # From the cursor, or from the bound if the cursor is later (stored by a worker of an
    # earlier release whose clock ran fast): a listing from a future cursor saw nothing.
    since = min(int(row["created_through"]) if row else through, through) - int(
        get_settings().event_catch_up_overlap_seconds
    )
    if since < now - LISTABLE_SECONDS:
        GAPS.inc()
        log.error(
            "the event catch-up must list from further back than the provider keeps events "
            "(30 days): refund and dispute events created in the gap that no webhook "
            "delivered are lost; compare the provider's refunds and disputes with agentpay's",
            extra={
                "listed_from": _iso(since),
                "provider_keeps_from": _iso(now - 30 * 86400),
            },
        )
    events = await provider.list_events(TYPES, since, through)
    missed: list[str] = []
    for event in reversed(events):  # oldest first, as they happened
        async with pool().connection() as conn, conn.transaction():
            stored = await webhooks.store(conn, event)
        if not stored["duplicate"]:
            missed.append(str(event["id"]))
            MISSED.labels(str(event["type"])).inc()
    # Never later than the database's now less the in-flight minute: the next listing
    # starts there (a cursor in the future hid every event until that time came).
    async with pool().connection() as conn:
        await conn.execute(
            """UPDATE provider_event_cursor
                  SET created_through = least(greatest(created_through, %s),
                                              floor(extract(epoch FROM now()))::bigint - %s),
                      listed_at = now()""",
            (through, IN_FLIGHT_SECONDS),
        )
    if missed:
        log.warning(
            "provider events no webhook delivered, taken in from the provider's list",
            extra={"count": len(missed), "events": missed[:20]},
        )
    return len(missed)


def _iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


async def _now(conn: Conn) -> int:
    """Unix seconds by the database's clock, which the cursor and its gauge
    (`agentpay_event_catch_up_behind_seconds`) are read against: a worker whose clock ran an
    hour fast stored a cursor an hour ahead, and the listings after it saw nothing for that
    hour; one a minute fast took events whose webhook was on its way for missed ones. The
    provider's clock, which dates the events, is a third one: the listing's overlap covers
    it."""
    cur = await conn.execute("SELECT floor(extract(epoch FROM now()))::bigint AS now")
    row = await cur.fetchone()
    assert row is not None
    return int(row["now"])


async def defer_if_due(conn: Conn, interval: float) -> bool:
    """Defer `catch_up_events` when the last one was asked for `interval` seconds ago and
    none waits or runs (in the caller's transaction; the time it is asked for is set at
    once, so a listing that keeps failing is tried once an interval, not every round).
    False when turned off (`interval` 0) or not due."""
    if interval <= 0:
        return False
    cur = await conn.execute(
        """UPDATE provider_event_cursor SET asked_at = now()
            WHERE asked_at < now() - make_interval(secs => %s)
              AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs
                               WHERE task_name = %s AND status IN ('todo', 'doing'))
        RETURNING asked_at""",
        (interval, TASK),
    )
    if await cur.fetchone() is None:
        return False
    await defer(conn, TASK)
    return True
