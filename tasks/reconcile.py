"""Reconcile role: the provider's truth, applied. succeeded → reconciled once the provider's
PaymentIntent has been checked against the payment (status, amount, currency, our metadata);
every disagreement is recorded in `reconcile_mismatches` and as a `reconcile_mismatch`
payment event.

Reconcile also resolves what only the provider knows, always from the PaymentIntent as it is
now (retrieved, never re-created), so an event that arrives late or out of order can never
move a payment backwards:
- `charging` (an unknown outcome): settled from the intent — found by its stored id, or by
  searching `metadata['payment_id']` when the create call's answer was lost — or handed back
  to the charge role (whose calls are idempotent) when no charge job is waiting already
  (to the cancel job instead, when a cancel was asked for);
- `authorized` / `requires_action`: moved on when the intent has (captured, canceled,
  authenticated, failed), e.g. after a webhook.
Webhooks and the maintenance sweep defer this task; it is safe to run any number of times.
"""

from __future__ import annotations

from typing import Any

from tasks import charge, disputes, payments, provider
from tasks.app import Backoff, app, defer, job_waiting, pool
from tasks.charge import search_intent, settle
from tasks.db import Conn
from tasks.settings import get_settings

ROLE = "reconcile"
ACTOR = f"worker:{ROLE}"

# The states reconcile acts on; anything else is left alone.
RECONCILABLE = frozenset({"succeeded", "charging", "authorized", "requires_action"})


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
    if intent.status == "succeeded":
        # What was collected: a capture made at the provider for less (a partial capture in
        # the Dashboard) leaves `amount` as it was.
        expected["amount_received"] = payment["amount_total"]
        actual["amount_received"] = intent.amount_received
    for field, want in expected.items():
        if actual[field] != want:
            found.append({"field": field, "expected": want, "actual": actual[field]})
    return found


def captured(payment: payments.Payment, intent: provider.Intent) -> int:
    """What the provider collected: the intent's `amount_received` when it succeeded (less
    than the total after a partial capture at the provider), never more than the total;
    the total when the intent disagrees in status (a mismatch an operator looks at)."""
    total = int(payment["amount_total"])
    if intent.status != "succeeded" or intent.amount_received is None:
        return total
    return max(0, min(int(intent.amount_received), total))


async def finish_succeeded(conn: Conn, payment: payments.Payment, intent: provider.Intent) -> str:
    found = mismatches(payment, intent)
    if intent.status != "succeeded":
        found.append({"field": "status", "expected": "succeeded", "actual": intent.status})
    if found:
        await payments.record_mismatches(
            conn,
            payment,
            intent.id,
            found,
            actor=ACTOR,
            reason="provider disagrees with the payment",
        )
    amount_captured = captured(payment, intent)
    await payments.transition(
        conn,
        payment,
        "reconciled",
        actor=ACTOR,
        reason="provider checked" if not found else "provider checked, mismatches recorded",
        data={
            "provider_payment_id": intent.id,
            "mismatches": len(found),
            "amount_captured": amount_captured,
        },
        amount_captured=amount_captured,
    )
    await disputes.book_waiting(conn, payment)
    return "reconciled"


async def _resolve_charging(
    conn: Conn, payment: payments.Payment, intent: provider.Intent | None
) -> str | None:
    recheck = get_settings().provider_recheck_seconds
    if intent is not None:
        if payment["provider_payment_id"] is None:
            # Found by search: the create call took effect but its answer was lost.
            payment.update(
                await payments.update(conn, payment["id"], provider_payment_id=intent.id)
            )
        settled = await settle(conn, payment, intent, actor=ACTOR)
        if settled is not None:
            return settled
        if intent.status == "processing":
            await defer(conn, ROLE, payment_id=payment["id"], schedule_in=recheck)
            return None
    # Not created, not confirmed: the charge role (idempotent) goes on, unless it already is
    # — or, when a cancel was asked for, the cancel job settles it instead (a charge job
    # does not start a payment whose cancel is pending).
    task = "cancel" if payment["cancel_requested_at"] is not None else "charge"
    if not await job_waiting(conn, task, payment["id"]):
        await defer(conn, task, payment_id=payment["id"], schedule_in=recheck)
    return None


@app.task(name=ROLE, queue=ROLE, retry=Backoff(max_attempts=12))
async def reconcile_payment(payment_id: str) -> Any:
    async with pool().connection() as conn:
        payment = await payments.get(conn, payment_id)
    if payment is None or payment["status"] not in RECONCILABLE:
        return None
    intent = None
    if payment["provider_payment_id"]:
        intent = await provider.retrieve_intent(payment["provider_payment_id"])
    elif payment["status"] == "charging":
        intent = await search_intent(payment_id)
    async with pool().connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment_id)
        if locked is None:
            return None
        status = locked["status"]
        if (
            status != payment["status"]
            or locked["provider_payment_id"] != payment["provider_payment_id"]
        ):
            # Moved on while we asked the provider — or another intent became the payment's
            # (the charge job stored its own while a search, lagging, gave us a stray):
            # that intent may be older than the new state, or not the payment's, so it
            # settles nothing. A move into `succeeded` deferred a reconcile (it
            # may be running already: none other is needed); a move into another state
            # reconcile acts on (`charging` → `requires_action` or `authorized`, as the
            # charge job finished) deferred nothing, while the provider may be past it
            # already (the webhook that brought us here said so): look again.
            if (
                status in RECONCILABLE
                and status != "succeeded"
                and not await job_waiting(conn, ROLE, payment_id, ("todo",))
            ):
                await defer(conn, ROLE, payment_id=payment_id)
            return None
        if status == "succeeded" and intent is not None:
            return await finish_succeeded(conn, locked, intent)
        if status == "charging":
            return await _resolve_charging(conn, locked, intent)
        if status in ("authorized", "requires_action") and intent is not None:
            return await settle(conn, locked, intent, actor=ACTOR)
    return None


# --- money taken after a payment ended ---------------------------------------------------

LATE_TASK = charge.LATE_TASK
# Payment states that say no money was taken; agentpay never moves a payment out of them.
ENDED_WITHOUT_MONEY = frozenset({"failed", "canceled", "rejected"})
# Webhook events saying an intent took or holds money (or is about to).
LATE_EVENTS = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.amount_capturable_updated",
        "payment_intent.processing",
    }
)


@app.task(name=LATE_TASK, queue=ROLE, retry=Backoff(max_attempts=12))
async def check_late_money(payment_id: str, intent_id: str) -> Any:
    """An intent of a payment that ended without money (failed, canceled, rejected), which a
    webhook says took or holds money: confirmed later by someone else (the customer with its
    client secret, another integration) before agentpay canceled it. Read from the provider
    (never from the event). Holding an authorization (`requires_capture`): canceled at the
    provider, with a `late_authorization_canceled` event. Money taken or on its way
    (`succeeded`, `processing`): the payment cannot leave its end, so it goes before an
    operator as a reconcile mismatch, field `late_success`, once per intent and status —
    refund it at the provider (docs/operations.md). Still `processing`: looked at again
    every `recheck_waiting_after_seconds` until it has ended; then its `processing`
    mismatch is resolved by the provider (taken: a `succeeded` one is recorded; not taken:
    nothing to refund). Anything else: nothing to do."""
    intent = await provider.retrieve_intent(intent_id)
    if intent.metadata.get("payment_id") not in (None, payment_id):
        return None  # not this payment's
    canceled_now = intent.status == "requires_capture"
    if intent.status == "canceled":
        # Canceled already: by an earlier look of ours whose record was lost (its worker
        # died, its answer was lost, after the cancel took effect), or by someone else. The
        # same keyed cancel again tells which: the provider answers ours from its record of
        # it, and refuses a cancel of a canceled intent otherwise.
        async with pool().connection() as conn:
            recorded = await _late_cancel_recorded(conn, payment_id, intent_id)
        if not recorded:
            try:
                intent = await provider.cancel_intent(payment_id, intent_id, f"late:{intent_id}")
                canceled_now = True
            except provider.Declined:
                pass
    elif canceled_now:
        try:
            # Keyed per intent: a payment can have more than one (a lost create's twin).
            intent = await provider.cancel_intent(payment_id, intent_id, f"late:{intent_id}")
        except provider.Declined:  # captured meanwhile (or canceled): as it is now
            canceled_now = False
            intent = await provider.retrieve_intent(intent_id)
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is None or payment["status"] not in ENDED_WITHOUT_MONEY:
            return None
        if canceled_now and intent.status == "canceled":
            if await _late_cancel_recorded(conn, payment_id, intent_id):
                return None  # another look canceled it (one call)
            await payments.record_event(
                conn,
                payment,
                "late_authorization_canceled",
                actor=ACTOR,
                reason="an authorization made after the payment ended, canceled at the provider",
                data={"provider_payment_id": intent_id},
            )
            return "canceled"
        if intent.status == "processing":
            # Money on its way: no webhook may ever say how it ended (the catch-up lists no
            # payment_intent events), so look again until it has.
            await _look_again(conn, payment_id, intent_id)
        elif await _settle_processing(conn, payment, intent):
            return "settled"
        if intent.status not in ("succeeded", "processing"):
            return None
        # Once per intent and what was found: money seen on its way (`processing`, nothing
        # received yet) and then taken (`succeeded`) is put before an operator again, even
        # when the first was resolved already ("nothing received").
        if await payments.mismatch_recorded(
            conn,
            payment_id,
            "late_success",
            "intent",
            intent_id,
            also={"status": "succeeded"} if intent.status == "succeeded" else None,
        ):
            return None
        await payments.record_mismatches(
            conn,
            payment,
            intent_id,
            [
                {
                    "field": "late_success",
                    "expected": {"status": payment["status"]},
                    "actual": {
                        "intent": intent_id,
                        "status": intent.status,
                        "amount_received": intent.amount_received,
                        "currency": intent.currency,
                    },
                }
            ],
            actor=ACTOR,
            reason=f"the provider took money for a payment that ended {payment['status']}",
        )
        return "mismatch"


async def _late_cancel_recorded(conn: Conn, payment_id: str, intent_id: str) -> bool:
    cur = await conn.execute(
        """SELECT 1 FROM payment_events
            WHERE payment_id = %s AND type = 'late_authorization_canceled'
              AND data->>'provider_payment_id' = %s""",
        (payment_id, intent_id),
    )
    return await cur.fetchone() is not None


async def _look_again(conn: Conn, payment_id: str, intent_id: str) -> None:
    """Another look at a late intent still `processing`, `recheck_waiting_after_seconds`
    from now, unless one waits already (a webhook saying it succeeded brings one sooner)."""
    cur = await conn.execute(
        """SELECT 1 FROM procrastinate_jobs
            WHERE status = 'todo' AND task_name = %s
              AND args->>'payment_id' = %s AND args->>'intent_id' = %s""",
        (LATE_TASK, payment_id, intent_id),
    )
    if await cur.fetchone() is None:
        await defer(
            conn,
            LATE_TASK,
            payment_id=payment_id,
            intent_id=intent_id,
            schedule_in=get_settings().recheck_waiting_after_seconds,
        )


async def _settle_processing(conn: Conn, payment: payments.Payment, intent: Any) -> bool:
    """A late intent seen `processing` has ended: the open `late_success` mismatch that
    said so is resolved by the provider, with what it became (taken: a `succeeded`
    mismatch is recorded beside it; not taken: nothing is left to refund). True when one
    was, and the intent took no money."""
    cur = await conn.execute(
        """UPDATE reconcile_mismatches
              SET resolved_at = now(), resolved_by = 'provider', resolution = %s
            WHERE payment_id = %s AND field = 'late_success' AND resolved_at IS NULL
              AND actual->>'intent' = %s AND actual->>'status' = 'processing'
        RETURNING id""",
        (
            f"the intent is {intent.status} now"
            + (": no money was taken" if intent.status != "succeeded" else ""),
            payment["id"],
            intent.id,
        ),
    )
    resolved = [row["id"] for row in await cur.fetchall()]
    for mismatch_id in resolved:
        await payments.record_event(
            conn,
            payment,
            "mismatch_resolved",
            actor="provider",
            reason=f"the late intent is {intent.status} now, no longer processing",
            data={"mismatch_id": mismatch_id, "field": "late_success"},
        )
    return bool(resolved) and intent.status != "succeeded"


async def late_money_check_needed(conn: Conn, payment_id: str, intent_id: str) -> bool:
    """Whether an event saying the payment's intent took or holds money needs a look: the
    payment ended without money, and no look at that intent is due or runs already (one
    scheduled for later, at an intent seen `processing`, does not count: the event is news)."""
    cur = await conn.execute(
        """SELECT p.status = ANY(%s) AND NOT EXISTS (
                      SELECT 1 FROM procrastinate_jobs j
                       WHERE j.status IN ('todo', 'doing') AND j.task_name = %s
                         AND j.args->>'payment_id' = p.id AND j.args->>'intent_id' = %s
                         AND (j.status = 'doing' OR j.scheduled_at IS NULL
                              OR j.scheduled_at <= now()))
                  AS needed
             FROM payment_jobs p WHERE p.id = %s""",
        (sorted(ENDED_WITHOUT_MONEY), LATE_TASK, intent_id, payment_id),
    )
    row = await cur.fetchone()
    return bool(row and row["needed"])
