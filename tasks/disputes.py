"""Disputes (chargebacks): each event of one recorded in its payment's events, and a lost
one booked in the ledger (`tasks.ledger.post_dispute_loss`) — when its event comes, or, if
the payment had no capture yet, when reconcile captures it. What cannot be booked goes
before an operator as a `dispute_lost` reconcile mismatch (docs/operations.md)."""

from __future__ import annotations

import logging
from typing import Any

from psycopg import sql

from tasks import ledger, payments
from tasks.db import Conn

log = logging.getLogger("agentpay.disputes")


async def record(conn: Conn, payment_id: str, event: dict[str, Any]) -> None:
    """The dispute, as the event tells it, in its payment's events (once per event: the
    caller stored the event for the first time); a lost one (status `lost`: the customer
    got the money back) booked in the ledger, once per dispute (`tasks.ledger.
    post_dispute_loss`), with the payment row locked as refunds lock it. What could not be
    booked goes before the operator as a `dispute_lost` mismatch (resolved by itself when a
    later event, or the payment's capture, books it). What refunds gave the customer
    already is not booked: the provider gives that part back (`data.returned_by_refunds`)."""
    payment = await payments.lock(conn, payment_id)
    dispute = (event.get("data") or {}).get("object") or {}
    if payment is None or not isinstance(dispute, dict):
        return
    data = _fields(dispute)
    details: dict[str, Any] = {
        "event_id": event["id"],
        "event_type": event["type"],
        "dispute": data,
    }
    if _bookable(data):
        loss = await _book_lost(conn, payment, data, "by a later event of the dispute")
        details |= _outcome(loss)
    await payments.record_event(
        conn,
        payment,
        "dispute",
        actor="provider",
        reason=f"{event['type']}: {data.get('status', 'unknown')} ({data.get('reason', '?')})",
        data=details,
    )
    log.warning(
        "payment disputed",
        extra={"payment_id": payment_id, "event_type": event["type"], "dispute": data},
    )


def _fields(dispute: dict[str, Any]) -> dict[str, Any]:
    """What a payment's `dispute` event keeps of the provider's dispute object."""
    return {
        key: dispute.get(key)
        for key in ("id", "status", "amount", "currency", "reason")
        if isinstance(dispute.get(key), str | int) and not isinstance(dispute.get(key), bool)
    }


def _bookable(data: dict[str, Any]) -> bool:
    """Whether the dispute (`_fields`) is lost, with what booking it needs."""
    amount = data.get("amount")
    return (
        data.get("status") == "lost"
        and isinstance(amount, int)
        and amount > 0
        and isinstance(data.get("id"), str)
        and isinstance(data.get("currency"), str)
    )


async def _book_lost(
    conn: Conn, payment: payments.Payment, data: dict[str, Any], how: str
) -> ledger.Reversal:
    """A lost dispute (`_bookable`) booked (`_book`), or, when it cannot be, put before the
    operator as a `dispute_lost` mismatch: the booking part of `record`, and of
    `book_missed` (a lost dispute whose event an API of an older release stored)."""
    loss = await _book(conn, payment, data["id"], data["amount"], data["currency"], how)
    if loss.problem is not None:
        await _mismatch(conn, payment, data, loss.problem)
    return loss


def _outcome(loss: ledger.Reversal) -> dict[str, int]:
    """What a booking did, for its `dispute` event (each only when not 0)."""
    details: dict[str, int] = {}
    if loss.booked:
        details["booked_loss"] = loss.booked
    if loss.returned:
        details["returned_by_refunds"] = loss.returned
    return details


# A dispute in one of these holds the charge's money (open) or gave it to the customer (lost):
# the provider refuses to refund it (`charge_disputed`). An inquiry (`warning_…`) does not,
# and a dispute the merchant won leaves the charge refundable again.
OPEN = frozenset({"needs_response", "under_review"})
SETTLED = frozenset({"won", "lost", "warning_closed", "prevented"})


async def refusing_refunds(conn: Conn, payment_id: str) -> dict[str, str] | None:
    """The dispute (`id`, `status`) that keeps the payment's charge from being refunded —
    one open or lost, as its recorded events tell it —, or None. Webhooks come in any order:
    a dispute is taken as settled once any of its events says so."""
    cur = await conn.execute(
        """SELECT data->'dispute'->>'id' AS id,
                  array_agg(DISTINCT data->'dispute'->>'status') AS statuses
           FROM payment_events
           WHERE payment_id = %s AND type = 'dispute' AND data->'dispute' ? 'id'
           GROUP BY 1 ORDER BY 1""",
        (payment_id,),
    )
    for row in await cur.fetchall():
        statuses: set[str] = set(row["statuses"])
        status: str | None
        if "lost" in statuses and "won" not in statuses:
            status = "lost"
        elif statuses & SETTLED:
            continue
        else:
            status = min(statuses & OPEN, default=None)
        if status is not None:
            return {"id": row["id"], "status": status}
    return None


async def _mismatch(
    conn: Conn, payment: payments.Payment, dispute: dict[str, Any], problem: str
) -> None:
    """A lost dispute the ledger could not book, as a reconcile mismatch (field
    `dispute_lost`), once per dispute while it stays open."""
    if await payments.mismatch_recorded(
        conn, payment["id"], "dispute_lost", "id", dispute["id"], open_only=True
    ):
        return
    log.warning(
        "lost dispute %s of payment %s not booked: %s",
        dispute["id"],
        payment["id"],
        problem,
        extra={"payment_id": payment["id"], "dispute": dispute},
    )
    await payments.record_mismatches(
        conn,
        payment,
        payment.get("provider_payment_id"),
        [{"field": "dispute_lost", "expected": {"booked": 0}, "actual": dispute}],
        actor="provider",
        reason=f"lost dispute {dispute['id']} not booked: {problem}",
    )


async def _book(
    conn: Conn, payment: payments.Payment, dispute_id: str, amount: int, currency: str, how: str
) -> ledger.Reversal:
    """A lost dispute into the ledger (`tasks.ledger.post_dispute_loss`), onto the payment
    (`amount_lost_to_disputes`, the agent's view of it), and the `dispute_lost` mismatch
    that waited for it settled (`how` it was booked)."""
    loss = await ledger.post_dispute_loss(
        conn, payment, dispute_id=dispute_id, amount=amount, currency=currency.lower()
    )
    await payments.add_lost_to_disputes(conn, payment, loss.booked)
    if loss.booked or loss.returned:
        await _settle(conn, payment, dispute_id, how)
    return loss


async def _settle(conn: Conn, payment: payments.Payment, dispute_id: str, how: str) -> None:
    """A lost dispute booked after all (`how`: a later event, once the payment was captured,
    or the capture itself): the `dispute_lost` mismatch an earlier event recorded is
    settled, so that no operator books it a second time by hand."""
    cur = await conn.execute(
        """UPDATE reconcile_mismatches
              SET resolved_at = now(), resolved_by = 'provider', resolution = %s
            WHERE payment_id = %s AND field = 'dispute_lost' AND actual->>'id' = %s
              AND resolved_at IS NULL
        RETURNING id""",
        (f"booked in the ledger {how}", payment["id"], dispute_id),
    )
    for row in await cur.fetchall():
        await payments.record_event(
            conn,
            payment,
            "mismatch_resolved",
            actor="provider",
            reason=f"lost dispute booked in the ledger {how}",
            data={"mismatch_id": row["id"], "field": "dispute_lost"},
        )


async def book_waiting(conn: Conn, payment: payments.Payment) -> int:
    """Lost disputes that waited for the payment's capture (open `dispute_lost` mismatches:
    the dispute's last event, `charge.dispute.closed`, came before reconcile, and no later
    event would book it), booked once the capture is: called in the transaction that
    reconciles the payment, with its row locked. Returns how many were booked."""
    cur = await conn.execute(
        """SELECT actual FROM reconcile_mismatches
            WHERE payment_id = %s AND field = 'dispute_lost' AND resolved_at IS NULL
            ORDER BY id""",
        (payment["id"],),
    )
    booked = 0
    for row in await cur.fetchall():
        dispute = row["actual"]
        loss = await _book(
            conn,
            payment,
            dispute["id"],
            dispute["amount"],
            dispute["currency"],
            "with the payment's capture",
        )
        booked += bool(loss.booked or loss.returned)
    return booked


# Payment states whose capture is in the ledger (past reconcile).
CAPTURED = frozenset({"reconciled", "partially_refunded", "refunded"})


async def book_left_waiting(conn: Conn) -> list[str]:
    """Lost disputes still waiting on payments captured already — reconciled by a release
    that did not book them with the capture —, booked now (by the sweep of stuck requests).
    Returns the payments whose were."""
    cur = await conn.execute(
        """SELECT DISTINCT m.payment_id FROM reconcile_mismatches m
             JOIN payment_jobs p ON p.id = m.payment_id
            WHERE m.field = 'dispute_lost' AND m.resolved_at IS NULL AND p.status = ANY(%s)
            LIMIT 500""",
        (sorted(CAPTURED),),
    )
    done = []
    for row in await cur.fetchall():
        payment = await payments.lock(conn, row["payment_id"])
        if payment is not None and await book_waiting(conn, payment):
            done.append(payment["id"])
    return done


# Lost disputes whose event was stored but never booked: an API of a release before 0020
# stored a `charge.dispute.closed` saying `lost` as handled and booked nothing, and the
# catch-up skips an event stored already — nothing else would ever book it. Found among the
# events of lost disputes (few: the partial index of 0028 holds only those) that are about a
# payment, with what booking needs, when nothing shows the dispute was dealt with: no
# `dispute_lost` transaction (once per dispute: its id is the reference, as in
# `ledger.post_dispute_loss`), no `dispute_lost` mismatch (open: waiting for the capture or an
# operator; resolved: booked since, or settled by hand), no `dispute` event saying refunds
# had given it all back (booked as nothing). A dispute the API of this release handled has
# one of the three: the first, one index look-up, for any it booked.
_NOT_DEALT_WITH = sql.SQL("""
       w.type LIKE 'charge.dispute.%%' AND w.payload->'data'->'object'->>'status' = 'lost'
   AND w.payment_id IS NOT NULL
   AND jsonb_typeof(w.payload->'data'->'object'->'id') = 'string'
   AND jsonb_typeof(w.payload->'data'->'object'->'currency') = 'string'
   AND w.payload->'data'->'object'->>'amount' ~ '^[1-9][0-9]{0,17}$'
   AND NOT EXISTS (SELECT 1 FROM ledger_transactions t
                    WHERE t.kind = 'dispute_lost'
                      AND t.reference = w.payload->'data'->'object'->>'id')
   AND NOT EXISTS (SELECT 1 FROM reconcile_mismatches m
                    WHERE m.payment_id = w.payment_id AND m.field = 'dispute_lost'
                      AND m.actual->>'id' = w.payload->'data'->'object'->>'id')
   AND NOT EXISTS (SELECT 1 FROM payment_events e
                    WHERE e.payment_id = w.payment_id AND e.type = 'dispute'
                      AND e.data->'dispute'->>'id' = w.payload->'data'->'object'->>'id'
                      AND e.data ? 'returned_by_refunds')""")


async def missed_payments(conn: Conn, limit: int = 500) -> list[str]:
    """Payments with a lost dispute whose event was stored and never booked (see
    `_NOT_DEALT_WITH`), oldest event first; `book_missed` books them."""
    cur = await conn.execute(
        sql.SQL("""SELECT w.payment_id FROM webhook_events w
             WHERE {missed}
             GROUP BY w.payment_id
             ORDER BY min(w.received_at)
             LIMIT %(limit)s""").format(missed=_NOT_DEALT_WITH),
        {"limit": limit},
    )
    return [row["payment_id"] for row in await cur.fetchall()]


async def book_missed(conn: Conn, payment_id: str) -> list[dict[str, Any]]:
    """The payment's lost disputes whose event was stored and never booked, booked as their
    event is now (`_book_lost`: in the ledger, on the payment, or a `dispute_lost` mismatch
    when it cannot be), with the payment row locked; each booking (or what refunds gave back)
    in a `dispute` event saying so, `booked_by` `maintenance`. Looked for again under the
    lock, so a dispute booked meanwhile is left alone. Returns what was done, one item per
    dispute (`dispute_id`, `event_id`, `booked`, `returned`, `problem`)."""
    payment = await payments.lock(conn, payment_id)
    if payment is None:
        return []
    cur = await conn.execute(
        sql.SQL("""SELECT DISTINCT ON (w.payload->'data'->'object'->>'id')
                   w.id, w.type, w.payload->'data'->'object' AS dispute
              FROM webhook_events w
             WHERE w.payment_id = %(payment)s AND {missed}
             ORDER BY w.payload->'data'->'object'->>'id', w.received_at, w.id""").format(
            missed=_NOT_DEALT_WITH
        ),
        {"payment": payment_id},
    )
    done = []
    for row in await cur.fetchall():
        data = _fields(row["dispute"])
        if not _bookable(data):
            continue
        loss = await _book_lost(
            conn, payment, data, "by maintenance (the API that received its event did not)"
        )
        outcome = _outcome(loss)
        if outcome:
            await payments.record_event(
                conn,
                payment,
                "dispute",
                actor="provider",
                reason=(
                    f"{row['type']}: lost ({data.get('reason', '?')}), booked by maintenance: "
                    "the API that received the event did not book it"
                ),
                data={
                    "event_id": row["id"],
                    "event_type": row["type"],
                    "dispute": data,
                    "booked_by": "maintenance",
                    **outcome,
                },
            )
        elif loss.problem is None:
            continue  # booked before after all (the look-up under the lock rules that out)
        done.append(
            {
                "dispute_id": data["id"],
                "event_id": row["id"],
                "booked": loss.booked,
                "returned": loss.returned,
                "problem": loss.problem,
            }
        )
    return done


# What the ledger's `dispute_lost` postings took into `disputes_lost`, per payment: the sum
# 0024 filled `payment_jobs.amount_lost_to_disputes` from, and that the column follows.
_LOST_PER_PAYMENT = sql.SQL("""
SELECT t.payment_id, sum(e.amount) AS amount, array_agg(t.reference ORDER BY t.id) AS postings
  FROM ledger_transactions t
  JOIN ledger_entries e ON e.transaction_id = t.id
  JOIN ledger_accounts a ON a.id = e.account_id
 WHERE t.kind = 'dispute_lost' AND a.kind = 'disputes_lost' AND t.payment_id IS NOT NULL
   AND (%(ids)s::text[] IS NULL OR t.payment_id = ANY(%(ids)s))
 GROUP BY t.payment_id""")


async def repair_lost_amounts(conn: Conn, limit: int = 500) -> list[dict[str, Any]]:
    """`amount_lost_to_disputes` set to what the ledger's `dispute_lost` postings say, on the
    payments with postings where it says otherwise: an API of a release with 0020 but not
    0024 booked a loss in the ledger without it (0024 filled it once, from the postings made
    by then). The payments are locked first (SKIP LOCKED: one being booked now is left to
    the next look), then summed again: a posting made meanwhile, with its own update of the
    column, is counted. Returns the payments repaired (`payment_id`, `was`, `now`,
    `postings`: the references of their dispute postings). In the caller's transaction."""
    cur = await conn.execute(
        sql.SQL("""SELECT p.id, p.amount_lost_to_disputes AS was
              FROM payment_jobs p JOIN ({lost}) lost ON lost.payment_id = p.id
             WHERE p.amount_lost_to_disputes <> lost.amount
             ORDER BY p.id
             LIMIT %(limit)s
             FOR UPDATE OF p SKIP LOCKED""").format(lost=_LOST_PER_PAYMENT),
        {"ids": None, "limit": limit},
    )
    was = {row["id"]: row["was"] for row in await cur.fetchall()}
    if not was:
        return []
    cur = await conn.execute(
        sql.SQL("""UPDATE payment_jobs p SET amount_lost_to_disputes = lost.amount
              FROM ({lost}) lost
             WHERE p.id = lost.payment_id AND p.amount_lost_to_disputes <> lost.amount
         RETURNING p.id, lost.amount, lost.postings""").format(lost=_LOST_PER_PAYMENT),
        {"ids": list(was)},
    )
    return [
        {
            "payment_id": row["id"],
            "was": was[row["id"]],
            "now": row["amount"],
            "postings": row["postings"],
        }
        for row in await cur.fetchall()
    ]
