"""Charge role: approved → charging → succeeded | authorized | requires_action | failed, and
the provider-side actions on a payment after that: capture and cancel (refunds live in
`tasks.refunds`). Every task here runs on the "charge" queue.

Design rule 3, step by step, each database step its own short transaction:
1. claim: approved → charging, storing the provider idempotency key before any call;
2. provider, outside any transaction: create the PaymentIntent (stable key), store its id,
   confirm it (stable key); a re-run finds the id and retrieves instead of guessing;
3. finish: apply what the provider says, under the row lock, only if still `charging`.
An unknown outcome (timeout, 5xx after the SDK's retries, a lost response) leaves the payment
`charging` and the job retries with backoff; reconcile resolves what stays there, by retrieve
(or by searching the intent's `metadata[payment_id]`), never by creating a second intent.

A payment that ends `failed` leaves its PaymentIntent open at the provider; `void_intent`
cancels it, so that no later confirm takes money for it.

Capture and cancel are asked for with `request_capture` / `request_cancel` inside the
caller's transaction (the API, the CLI); the "capture" and "cancel" jobs then call the
provider and settle the payment from what the provider answers — or, when the provider
refuses, from the PaymentIntent as it is. A cancel asked for while `charging` stops the
charge from going on (a charge job no longer starts it) and cancels the PaymentIntent if
there is one; whichever the provider did first — the confirm or the cancel — decides. An
intent becomes the payment's only while no cancel is asked for (`payments.store_provider_id`),
so one made after the cancel is never confirmed.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from tasks import payments, provider
from tasks import refunds as refunds  # registers the "refund" task on this queue
from tasks.app import Backoff, app, defer, job_waiting, pool
from tasks.db import Conn
from tasks.settings import get_settings

ROLE = "charge"
ACTOR = f"worker:{ROLE}"
log = logging.getLogger("agentpay.charge")

# States a cancel takes effect in at once: the provider has not been asked anything yet.
CANCEL_NOW = frozenset({"received", "priced", "in_review", "approved"})
# States a cancel needs the provider for: a PaymentIntent exists (or, while `charging`, may
# be being made) and may be cancelable.
CANCEL_AT_PROVIDER = payments.CANCEL_PENDING_IN

# Intent states a payment that ended `failed` leaves its PaymentIntent in, open to a later
# confirm (the customer retrying with its client secret, another integration) that would take
# money for a payment agentpay ended: the intent is canceled (`void_intent`).
VOIDABLE = frozenset({"requires_payment_method", "requires_confirmation", "requires_action"})
VOID_TASK = "void_intent"
# tasks.reconcile's look at an intent of an ended payment that may have taken money.
LATE_TASK = "check_late_money"
# The later search for intents a payment canceled before it had one never took, and when:
# past the provider's search lag (about a minute at Stripe) and a charge call's timeouts.
UNOWNED_TASK = "cancel_unowned_intents"
UNOWNED_LOOK_AFTER = 300

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
    conn: Conn,
    payment: payments.Payment,
    intent: provider.Intent,
    *,
    actor: str,
    reason: str | None = None,
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
        reason=reason or f"provider status {intent.status}",
        data={"provider_payment_id": intent.id, "provider_status": intent.status},
        **columns,
    )
    if to == "succeeded":
        await defer(conn, "reconcile", payment_id=payment["id"])
    elif to == "failed" and intent.id and intent.status in VOIDABLE:
        await defer(conn, VOID_TASK, payment_id=payment["id"], intent_id=intent.id)
    return to


@app.task(name=VOID_TASK, queue=ROLE, retry=Backoff(max_attempts=12))
async def void_intent(payment_id: str, intent_id: str) -> Any:
    """Cancel at the provider the PaymentIntent of a payment that ended `failed` (declined,
    authentication failed): Stripe keeps such an intent open (`requires_payment_method`),
    and nothing may take money for a payment agentpay ended. Keyed, so a retry repeats the
    call. Refused (canceled, or confirmed by someone else meanwhile): the intent is looked at
    (`check_late_money`), since its webhook may never come."""
    try:
        intent = await provider.cancel_intent(payment_id, intent_id, "failed")
    except provider.Declined as refused:
        log.info(
            "the intent of a failed payment was not canceled",
            extra={"payment_id": payment_id, "intent": intent_id, "code": refused.code},
        )
        async with pool().connection() as conn, conn.transaction():
            await defer(conn, LATE_TASK, payment_id=payment_id, intent_id=intent_id)
        return refused.code
    return intent.status


@app.task(name=UNOWNED_TASK, queue=ROLE, retry=Backoff(max_attempts=12))
async def cancel_unowned_intents(payment_id: str) -> Any:
    """Intents of a payment canceled before it had one (`_cancel_before_any_intent`), found
    by search a while later: a charge job in flight made one after the cancel and died (or
    lost its answer) before it canceled it — nothing else would, and it waited at the
    provider, open to a confirm. Each one still open is canceled (keyed per intent, as the
    charge job's own cancel); one that took or holds money anyway is looked at
    (`check_late_money`). A search the provider refuses (a rolled key; an account Stripe
    offers no search) fails the job: the failed-job alert fires, and the sweep of stuck
    requests runs it again."""
    async with pool().connection() as conn:
        payment = await payments.get(conn, payment_id)
    if payment is None or payment["status"] != "canceled":
        return None
    found = await provider.find_intents(payment_id)
    canceled, late = 0, []
    for intent in found:
        if intent.status in VOIDABLE:
            try:
                await provider.cancel_intent(payment_id, intent.id, f"unowned:{intent.id}")
                canceled += 1
                continue
            except provider.Declined:  # confirmed meanwhile
                pass
        if intent.status != "canceled":
            late.append(intent.id)
    if late:
        async with pool().connection() as conn, conn.transaction():
            for intent_id in late:
                await defer(conn, LATE_TASK, payment_id=payment_id, intent_id=intent_id)
    return {"canceled": canceled, "looked_at": len(late)}


# --- charge ------------------------------------------------------------------------------


async def claim(payment_id: str) -> payments.Payment | None:
    """Step 1: the payment to charge, now `charging` with its key stored; None if it is
    already past charging, or a cancel was asked for (the cancel job settles it)."""
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is None or payment["cancel_requested_at"] is not None:
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


async def call_provider(payment: payments.Payment) -> provider.Intent | None:
    """Step 2: create (or find) and confirm the PaymentIntent. Raises provider.Unknown when
    the outcome is not known; a decline comes back as a failed intent. None when the intent
    made could not become the payment's (a cancel came first): it is not confirmed."""
    # The payment's intent as far as this call knows it (a decline names it: its intent is
    # then canceled, see `settle`).
    intent_id: str | None = payment["provider_payment_id"]
    try:
        if payment["provider_payment_id"] is None:
            intent = await provider.create_intent(payment)
            stored = await _store_intent_id(payment["id"], intent.id)
            if not stored.go_on:
                # A cancel was asked for, or the payment moved on (this worker may have been
                # frozen past its rescue, whose re-run charged it): this job stops. An
                # intent the payment did not take is canceled; its own is left alone.
                if stored.id != intent.id:
                    await _cancel_unowned(payment["id"], intent)
                return None
            if stored.id is not None and stored.id != intent.id:
                # Another intent became the payment's meanwhile (reconcile found the one an
                # earlier, lost create made, after its key had expired): go on with that one;
                # this one is never confirmed.
                intent = await provider.retrieve_intent(stored.id)
        else:
            intent = await provider.retrieve_intent(payment["provider_payment_id"])
        intent_id = intent.id
        if _unconfirmed(intent):
            intent = await _confirm(payment["id"], intent.id)
    except provider.Declined as declined:
        if declined.intent is not None:
            return declined.intent
        return provider.Intent(
            id=intent_id or "",
            status="requires_payment_method",
            amount=payment["amount_total"],
            amount_received=0,
            currency=payment["currency"],
            metadata={},
            failure_code=declined.code,
            failure_message=declined.message,
        )
    return intent


async def _confirm(payment_id: str, intent_id: str) -> provider.Intent:
    """Confirm the intent. A refusal that is no decline (no intent in the answer: e.g.
    `payment_intent_unexpected_state`, because another try, under another key, or someone
    in the Dashboard confirmed it meanwhile) is no outcome: the intent as it now is says what
    happened, and only while it still waits to be confirmed does the refusal stand (recorded
    as a failure)."""
    try:
        return await provider.confirm_intent(payment_id, intent_id)
    except provider.Declined as refused:
        if refused.intent is not None:
            raise
        current = await provider.retrieve_intent(intent_id)
        if _unconfirmed(current):
            raise
        return current


def _unconfirmed(intent: provider.Intent) -> bool:
    """Still waiting to be confirmed: never confirmed, or declined by no one yet."""
    return intent.status in ("requires_confirmation", "requires_payment_method") and (
        outcome(intent) is None
    )


async def search_intent(payment_id: str) -> provider.Intent | None:
    """The intent of a payment whose intent id was never stored, by search. Search refused
    (not offered to every account, e.g. Stripe's accounts in India) is the same as not found:
    the keyed create gives back the intent the lost call made, never a second one while the
    key lives (24 hours at Stripe), and an intent we never stored was never confirmed."""
    try:
        return await provider.find_intent(payment_id)
    except provider.ProviderError as error:
        log.warning(
            "search for the payment's intent refused; taking it as not found",
            extra={"payment_id": payment_id, "error": str(error)},
        )
        return None


async def _store_intent_id(payment_id: str, intent_id: str) -> payments.StoredId:
    async with pool().connection() as conn:
        return await payments.store_provider_id(conn, payment_id, intent_id)


async def _cancel_unowned(payment_id: str, intent: provider.Intent) -> None:
    """Cancel at the provider an intent the payment did not take (made after its cancel was
    asked for, or beside the one it has), so that it does not wait there unconfirmed (it
    holds no money either way). Keyed per intent: a payment can leave more than one behind
    (a create retried after its key expired, a charge job frozen past its rescue), and one
    key on two intents is refused by the provider. A failure is only logged."""
    try:
        await provider.cancel_intent(payment_id, intent.id, f"unowned:{intent.id}")
    except (provider.Declined, provider.Unknown, provider.ProviderError) as error:
        log.warning(
            "could not cancel an intent the payment never took",
            extra={"payment_id": payment_id, "intent": intent.id, "error": str(error)},
        )


async def finish(payment_id: str, intent: provider.Intent) -> str | None:
    """Step 3: settle the payment if it is still `charging`."""
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is None or payment["status"] != "charging":
            return None
        to = await settle(conn, payment, intent, actor=ACTOR)
        if to is None:
            # Not settled yet (processing): reconcile looks again shortly.
            await defer(
                conn,
                "reconcile",
                payment_id=payment_id,
                schedule_in=get_settings().provider_recheck_seconds,
            )
        return to


def _crash_if_asked() -> None:
    """Tests only (AGENTPAY_DEBUG_CRASH_AFTER_PROVIDER_CALL): die like a killed worker, after
    the provider acted and before its outcome is committed."""
    if get_settings().debug_crash_after_provider_call:
        os.kill(os.getpid(), signal.SIGKILL)


@app.task(name=ROLE, queue=ROLE, retry=Backoff(max_attempts=12))
async def charge_payment(payment_id: str) -> Any:
    payment = await claim(payment_id)
    if payment is None:
        return None
    intent = await call_provider(payment)
    if intent is None:
        return None
    _crash_if_asked()
    return await finish(payment_id, intent)


# --- capture and cancel ------------------------------------------------------------------


async def request_capture(conn: Conn, payment: payments.Payment, *, actor: str) -> payments.Payment:
    """Ask for the capture of an `authorized` payment (locked by the caller): records the
    request and defers the "capture" job, in the caller's transaction. Asking again while
    the capture is pending is harmless. Raises ValueError when the payment cannot be
    captured (another state, or a cancel was asked for)."""
    if payment["status"] != "authorized":
        raise ValueError(
            f"Only an authorized payment can be captured; this one is {payment['status']}."
        )
    if payment["cancel_requested_at"] is not None:
        raise ValueError("A cancel was requested for this payment; it cannot be captured.")
    if payment["capture_requested_at"] is None:
        payment.update(
            await payments.update(conn, payment["id"], capture_requested_at=payments.NOW)
        )
        await payments.record_event(
            conn, payment, "capture_requested", actor=actor, reason="capture requested"
        )
    await _defer_once(conn, "capture", payment["id"])
    return payment


async def request_cancel(
    conn: Conn, payment: payments.Payment, *, actor: str, reason: str | None = None
) -> payments.Payment:
    """Cancel a payment (locked by the caller), in the caller's transaction.

    Not yet at the provider (received, priced, in_review, approved): canceled at once.
    Charging, authorized or requires_action: the request is recorded and the "cancel" job
    cancels the PaymentIntent, then the payment (a charging payment may be charged first:
    the provider decides). Any other state raises ValueError, as does a cancel of a payment
    whose capture was asked for."""
    status = payment["status"]
    if status in CANCEL_NOW:
        await payments.transition(
            conn,
            payment,
            "canceled",
            actor=actor,
            reason=reason or "canceled before reaching the provider",
            cancel_requested_at=payments.NOW,
        )
        return payment
    if status not in CANCEL_AT_PROVIDER:
        raise ValueError(
            f"A payment that is {status} cannot be canceled; only one not yet charged "
            "(up to charging), authorized or waiting for authentication can."
        )
    if payment["capture_requested_at"] is not None:
        raise ValueError("A capture was requested for this payment; it cannot be canceled.")
    if payment["cancel_requested_at"] is None:
        payment.update(await payments.update(conn, payment["id"], cancel_requested_at=payments.NOW))
        await payments.record_event(
            conn, payment, "cancel_requested", actor=actor, reason=reason or "cancel requested"
        )
    await _defer_once(conn, "cancel", payment["id"])
    return payment


async def _defer_once(conn: Conn, task_name: str, payment_id: str) -> None:
    """Defer the job that carries out a request, unless one is queued already (it will):
    asking again re-drives a request whose job is gone, but an agent asking a thousand
    times does not queue a thousand jobs."""
    if not await job_waiting(conn, task_name, payment_id, ("todo",)):
        await defer(conn, task_name, payment_id=payment_id)


async def _act(
    payment_id: str, states: frozenset[str], call: Any, *, action: str
) -> tuple[provider.Intent, provider.Declined | None] | None:
    """Run a provider action on a payment in one of `states` whose `action` was requested
    (keyed by the request's time); when the provider refuses it, the intent as it now is.
    None if the payment is not in those states or the request was withdrawn."""
    async with pool().connection() as conn:
        payment = await payments.get(conn, payment_id)
    if payment is None or payment["status"] not in states or not payment["provider_payment_id"]:
        return None
    requested_at = payment[f"{action}_requested_at"]
    if requested_at is None:
        return None
    intent_id = payment["provider_payment_id"]
    request = f"{requested_at.timestamp():.6f}"
    try:
        return await call(payment_id, intent_id, request), None
    except provider.Declined as refused:
        # Not possible any more (already captured, canceled, expired): the intent decides.
        return await provider.retrieve_intent(intent_id), refused


async def _settle_action(
    payment_id: str,
    states: frozenset[str],
    intent: provider.Intent,
    refused: provider.Declined | None,
    *,
    action: str,
) -> str | None:
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if payment is None or payment["status"] not in states:
            return None
        reason = f"{action}: provider status {intent.status}"
        to = await settle(conn, payment, intent, actor=ACTOR, reason=reason)
        if to is None:
            # The provider refused and nothing changed: say why, and let the request be
            # made again (or the other action be asked for).
            await payments.record_event(
                conn,
                payment,
                f"{action}_failed",
                actor=ACTOR,
                reason=refused.message if refused else f"provider status {intent.status}",
                data={"code": refused.code if refused else None, "provider_status": intent.status},
            )
            await payments.update(conn, payment_id, **{f"{action}_requested_at": None})
            if payment["status"] == "charging":
                # The charge goes on (still processing, or not confirmed yet): reconcile
                # looks again and hands it back to the charge role if need be.
                await defer(
                    conn,
                    "reconcile",
                    payment_id=payment_id,
                    schedule_in=get_settings().provider_recheck_seconds,
                )
        return to


@app.task(name="capture", queue=ROLE, retry=Backoff(max_attempts=12))
async def capture_payment(payment_id: str) -> Any:
    """authorized → succeeded (+ reconcile): capture the PaymentIntent, keyed per request."""
    states = payments.CAPTURE_PENDING_IN
    acted = await _act(payment_id, states, provider.capture_intent, action="capture")
    if acted is None:
        return None
    return await _settle_action(payment_id, states, *acted, action="capture")


async def _cancel_before_any_intent(payment_id: str) -> str | None:
    """A cancel of a `charging` payment with no PaymentIntent id stored. Every intent we
    confirm has its id stored first, and none is stored once a cancel is asked for
    (`payments.store_provider_id`), so none of ours took money or ever will. One may exist
    all the same (a create whose answer was lost, or a charge job making one now): found by
    search, it is stored and the cancel goes on at the provider (None). Not found: the
    payment is canceled here ("canceled"); an intent a charge job makes later is never
    confirmed, and that job cancels it — or, should it die first, the search
    `cancel_unowned_intents` makes `UNOWNED_LOOK_AFTER` seconds later."""
    async with pool().connection() as conn:
        payment = await payments.get(conn, payment_id)
    if payment is None or payment["status"] != "charging" or payment["provider_payment_id"]:
        return None
    found = await search_intent(payment_id)
    async with pool().connection() as conn, conn.transaction():
        payment = await payments.lock(conn, payment_id)
        if (
            payment is None
            or payment["status"] != "charging"
            or payment["provider_payment_id"]
            or payment["cancel_requested_at"] is None
        ):
            return None
        if found is not None:
            await payments.update(conn, payment_id, provider_payment_id=found.id)
            return None
        await payments.transition(
            conn,
            payment,
            "canceled",
            actor=ACTOR,
            reason="cancel: no PaymentIntent was made",
        )
        await defer(conn, UNOWNED_TASK, payment_id=payment_id, schedule_in=UNOWNED_LOOK_AFTER)
        return "canceled"


@app.task(name="cancel", queue=ROLE, retry=Backoff(max_attempts=12))
async def cancel_payment(payment_id: str) -> Any:
    """charging | authorized | requires_action → canceled: cancel the PaymentIntent, keyed per
    request (a charging payment's is looked for first; with none, it is canceled here)."""
    if await _cancel_before_any_intent(payment_id) is not None:
        return "canceled"
    acted = await _act(payment_id, CANCEL_AT_PROVIDER, provider.cancel_intent, action="cancel")
    if acted is None:
        return None
    return await _settle_action(payment_id, CANCEL_AT_PROVIDER, *acted, action="cancel")
