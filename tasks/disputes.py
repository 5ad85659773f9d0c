"""Disputes (chargebacks): each event of one recorded in its payment's events, and a lost
one booked in the ledger (`tasks.ledger.post_dispute_loss`) — when its event comes, or, if
the payment had no capture yet, when reconcile captures it. What cannot be booked goes
before an operator as a `dispute_lost` reconcile mismatch (docs/operations.md)."""

from __future__ import annotations

import logging
from typing import Any

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
    data = {
        key: dispute.get(key)
        for key in ("id", "status", "amount", "currency", "reason")
        if isinstance(dispute.get(key), str | int) and not isinstance(dispute.get(key), bool)
    }
    details: dict[str, Any] = {
        "event_id": event["id"],
        "event_type": event["type"],
        "dispute": data,
    }
    amount, dispute_id, currency = data.get("amount"), data.get("id"), data.get("currency")
    if (
        data.get("status") == "lost"
        and isinstance(amount, int)
        and amount > 0
        and isinstance(dispute_id, str)
        and isinstance(currency, str)
    ):
        loss = await _book(
            conn, payment, dispute_id, amount, currency, "by a later event of the dispute"
        )
        if loss.booked:
            details["booked_loss"] = loss.booked
        if loss.returned:
            details["returned_by_refunds"] = loss.returned
        if loss.problem is not None:
            await _mismatch(conn, payment, data, loss.problem)
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
