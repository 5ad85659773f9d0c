"""Refunds, full and partial: reconciled → partially_refunded → … → refunded.

`request_refund` records a refund of ours (`payment_refunds`, status `pending`) and defers the
"refund" job (charge queue) in the caller's transaction. Requests never add up to more than
what was collected (`payments.collected`: `amount_captured`, the total until reconcile has
run): what remains is that minus what was refunded minus what is pending. A refund may be
asked for as soon as the payment `succeeded`; its job waits for reconcile (which books the
capture the refund reverses) before it goes to the provider. The job first looks for a
provider refund carrying our refund id in its metadata (an earlier try may have made it and
lost the answer), else calls the provider keyed by our refund id (a retry never refunds
twice, even once the provider has forgotten the key), then in one
transaction marks the refund, adds it to the payment's `amount_refunded`, moves the payment
(`partially_refunded` → `partially_refunded` is no status change: only the amount and an event)
and posts it to the ledger. Only a refund the provider reports `succeeded` counts as money
back: a `pending` one stays pending with its provider id, and the job retrieves it again with
backoff (then the sweep does) until it succeeds or fails.
"""

from __future__ import annotations

from typing import Any

from tasks import disputes, ledger, money, payments, provider
from tasks.app import Backoff, TransientError, app, defer, pool
from tasks.db import Conn
from tasks.settings import get_settings

ROLE = "charge"
ACTOR = f"worker:{ROLE}"
TASK = "refund"

REFUNDABLE = frozenset({"reconciled", "partially_refunded"})
# Where a refund may be asked for: also once the money is taken and reconcile has not run
# yet (an agent that waited for `succeeded` refunds at once; the job waits for reconcile).
REQUESTABLE = REFUNDABLE | {"succeeded"}

Refund = dict[str, Any]


class RefundAmountError(ValueError):
    """The amount asked for is not refundable (not positive, or more than remains)."""


class RefundLimitError(ValueError):
    """The payment has had as many refunds asked of agentpay as one payment may
    (`MAX_REFUNDS_PER_PAYMENT`), and this one is not for all that remains."""


class RefundDisputedError(ValueError):
    """The payment's charge is disputed (open, or lost): the provider refuses its refunds."""


# Refunds asked of agentpay one payment may have (any outcome; refunds made at the provider,
# which the sync takes in, do not count), but for a last one of all that remains, which is
# always taken. Each costs provider calls, events and a sync that lists all of the payment's
# refunds: a cap keeps one agent's thousand one-cent refunds from spending the fleet's
# provider rate limit. (Stripe sets no such cap; no real use needs more than a few.)
MAX_REFUNDS_PER_PAYMENT = 50


async def pending_amount(conn: Conn, payment_id: str) -> int:
    cur = await conn.execute(
        """SELECT coalesce(sum(amount), 0)::bigint AS n FROM payment_refunds
           WHERE payment_id = %s AND status = 'pending'""",
        (payment_id,),
    )
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def request_refund(
    conn: Conn,
    payment: payments.Payment,
    *,
    amount: int | None,
    actor: str,
    reason: str | None = None,
) -> Refund:
    """Ask for a refund of `amount` (None: all that remains) of a payment the caller locked;
    returns the refund record. Raises ValueError when the payment's state does not allow a
    refund (or, with no amount given, nothing remains), RefundAmountError (a ValueError) when
    the amount does not fit, RefundLimitError (a ValueError) when the payment has had
    `MAX_REFUNDS_PER_PAYMENT` refunds already, RefundDisputedError (a ValueError) when a
    dispute open or lost keeps the provider from refunding it."""
    if payment["status"] not in REQUESTABLE:
        raise ValueError(
            "Only a succeeded, reconciled or partially refunded payment can be refunded; "
            f"this one is {payment['status']}."
        )
    remaining = (
        payments.collected(payment)
        - payment["amount_refunded"]
        - await pending_amount(conn, payment["id"])
    )
    if remaining <= 0:
        # Whatever amount was asked for, the payment's state is what is wrong.
        raise ValueError("Nothing remains to refund on this payment.")
    dispute = await disputes.refusing_refunds(conn, payment["id"])
    if dispute is not None:
        raise RefundDisputedError(
            f"The payment's charge is disputed (dispute {dispute['id']} is "
            f"{dispute['status']}): the provider refuses to refund it"
            + (", and the customer has the money back." if dispute["status"] == "lost" else ".")
        )
    if amount is None:
        amount = remaining
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise RefundAmountError("The refund amount must be a positive integer (minor units).")
    if amount > remaining:
        raise RefundAmountError(
            f"Refund amount ({amount}) is greater than what remains refundable ({remaining})."
        )
    problem = money.amount_problem(amount, payment["currency"])
    if problem:
        raise RefundAmountError(f"Refund amount: {problem}.")
    cur = await conn.execute(
        "SELECT count(*) AS n FROM payment_refunds WHERE payment_id = %s AND actor <> %s",
        (payment["id"], OUTSIDE_ACTOR),
    )
    asked = await cur.fetchone()
    if asked is not None and asked["n"] >= MAX_REFUNDS_PER_PAYMENT and amount != remaining:
        raise RefundLimitError(
            f"This payment has had {asked['n']} refunds, as many as one payment may "
            f"({MAX_REFUNDS_PER_PAYMENT}); refund all that remains ({remaining}) in one."
        )
    cur = await conn.execute(
        """INSERT INTO payment_refunds (id, payment_id, amount, currency, reason, actor)
           VALUES (%s, %s, %s, %s, %s, %s) RETURNING *""",
        (payments.new_id("rfd"), payment["id"], amount, payment["currency"], reason, actor),
    )
    refund = await cur.fetchone()
    assert refund is not None
    await payments.record_event(
        conn,
        payment,
        "refund_requested",
        actor=actor,
        reason=reason or "refund requested",
        data={"refund_id": refund["id"], "amount": amount},
    )
    await defer(conn, TASK, payment_id=payment["id"], refund_id=refund["id"])
    return refund


async def get(conn: Conn, refund_id: str) -> Refund | None:
    cur = await conn.execute("SELECT * FROM payment_refunds WHERE id = %s", (refund_id,))
    return await cur.fetchone()


async def lock(conn: Conn, refund_id: str) -> Refund | None:
    cur = await conn.execute("SELECT * FROM payment_refunds WHERE id = %s FOR UPDATE", (refund_id,))
    return await cur.fetchone()


async def for_payment(conn: Conn, payment_id: str) -> list[Refund]:
    cur = await conn.execute(
        "SELECT * FROM payment_refunds WHERE payment_id = %s ORDER BY created_at, id",
        (payment_id,),
    )
    return await cur.fetchall()


async def _mark(conn: Conn, refund_id: str, **columns: Any) -> Refund:
    """Set a refund's status and what the provider said. `updated_at` is when its status
    last changed: a look that finds it still pending leaves it (the sweep and
    ops_stuck_payments measure a pending refund from when it was asked for)."""
    cur = await conn.execute(
        """UPDATE payment_refunds
              SET status = %(status)s,
                  provider_refund_id = coalesce(%(provider_refund_id)s, provider_refund_id),
                  provider_status = %(provider_status)s,
                  failure_code = %(failure_code)s,
                  failure_message = %(failure_message)s,
                  updated_at = CASE WHEN status = %(status)s THEN updated_at ELSE now() END
            WHERE id = %(id)s RETURNING *""",
        {
            "provider_refund_id": None,
            "provider_status": None,
            "failure_code": None,
            "failure_message": None,
            **columns,
            "id": refund_id,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def _fail(conn: Conn, payment: payments.Payment, refund: Refund, code: str, msg: str) -> None:
    await _mark(conn, refund["id"], status="failed", failure_code=code, failure_message=msg)
    await payments.record_event(
        conn,
        payment,
        "refund_failed",
        actor=ACTOR,
        reason=msg,
        data={"refund_id": refund["id"], "amount": refund["amount"], "code": code},
    )


async def _succeed(
    conn: Conn,
    payment: payments.Payment,
    refund: Refund,
    result: provider.Refund,
    *,
    reason: str = "refund confirmed by the provider",
) -> str:
    # Who and why, for the transition's event and the ledger's posting alike.
    await payments.set_event_context(conn, actor=ACTOR, reason=reason)
    await _mark(
        conn,
        refund["id"],
        status="succeeded",
        provider_refund_id=result.id,
        provider_status=result.status,
    )
    refunded = payment["amount_refunded"] + refund["amount"]
    to = "refunded" if refunded >= payments.collected(payment) else "partially_refunded"
    data = {"refund_id": refund["id"], "provider_refund_id": result.id, "amount": refund["amount"]}
    if to != payment["status"]:
        await payments.transition(
            conn,
            payment,
            to,
            actor=ACTOR,
            reason=reason,
            data=data,
            amount_refunded=refunded,
        )
    else:
        payment.update(await payments.update(conn, payment["id"], amount_refunded=refunded))
        await payments.record_event(conn, payment, "refund", actor=ACTOR, reason=reason, data=data)
    booked = await ledger.post_refund(
        conn, payment, refund_id=refund["id"], amount=refund["amount"]
    )
    # Made before a dispute whose loss was booked first: that part of the loss came back.
    await payments.add_lost_to_disputes(conn, payment, -booked.returned)
    return to


@app.task(name=TASK, queue=ROLE, retry=Backoff(max_attempts=12))
async def refund_payment(payment_id: str, refund_id: str) -> Any:
    """Carry out one pending refund at the provider and record it (see the module doc)."""
    async with pool().connection() as conn:
        refund = await get(conn, refund_id)
        payment = await payments.get(conn, payment_id)
    if refund is None or payment is None or refund["status"] != "pending":
        return None
    if payment["status"] == "succeeded":
        # Asked for before reconcile ran (it normally does within moments of `succeeded`):
        # the refund reverses the capture reconcile books, so it waits (the job's backoff,
        # then the sweep of pending refunds).
        raise TransientError(f"payment {payment_id} is not reconciled yet")
    refused: provider.Declined | None = None
    result: provider.Refund | None = None
    try:
        if refund["provider_refund_id"]:
            # Made already and still pending at the provider: ask how it stands now (a
            # replay of the create would only repeat its first answer).
            result = await provider.retrieve_refund(refund["provider_refund_id"])
        else:
            # Made already by an earlier try whose answer never came? Then that is the one
            # (never a second refund, even after the provider forgot the call's key).
            result = await provider.find_refund(payment["provider_payment_id"], refund_id)
            if result is None:
                result = await provider.refund(
                    payment_id,
                    payment["provider_payment_id"],
                    refund_id,
                    refund["amount"],
                    refund["reason"],
                )
    except provider.Declined as error:
        refused = error
    async with pool().connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment_id)
        refund = await lock(conn, refund_id)
        if locked is None or refund is None or refund["status"] != "pending":
            return None
        if refused is not None:
            await _fail(conn, locked, refund, refused.code, refused.message)
            if refused.code in provider.REMAINDER_REFUSALS and not await sync_waiting(
                conn, payment_id
            ):
                # The provider holds less than we count: take in what was refunded
                # elsewhere, so that what remains here is what remains there.
                await defer(conn, SYNC_TASK, payment_id=payment_id)
            return "failed"
        assert result is not None
        if result.status in ("failed", "canceled"):
            await _fail(conn, locked, refund, f"refund_{result.status}", "the provider refused")
            return "failed"
        if result.status == "succeeded":
            return await _succeed(conn, locked, refund, result)
        # pending / requires_action: not money back yet. Keep it pending, remember the
        # provider's id, and look again later (the job's backoff, then the sweep).
        await _mark(
            conn,
            refund_id,
            status="pending",
            provider_refund_id=result.id,
            provider_status=result.status,
        )
    raise TransientError(f"refund {refund_id} is {result.status} at the provider")


# --- refunds made outside agentpay ----------------------------------------------------------

SYNC_TASK = "sync_refunds"
# Webhook events that say a payment's refunds changed at the provider.
REFUND_EVENTS = frozenset(
    {
        "charge.refunded",
        "charge.refund.updated",
        "refund.created",
        "refund.updated",
        "refund.failed",
    }
)
# Where the provider may hold a captured PaymentIntent that agentpay has not reconciled yet
# (a capture in the Dashboard, a charge whose answer was lost): a refund made there already
# is taken in once reconcile has booked the capture it reverses.
BEFORE_RECONCILE = frozenset({"charging", "requires_action", "authorized", "succeeded"})
# Where a refund made elsewhere can be taken in (or will be, once reconciled), and where one
# counted already can turn out to have failed (`refunded` too).
SYNCABLE = REFUNDABLE | BEFORE_RECONCILE | {"refunded"}
# Provider refund states that mean no money went back.
NOT_REFUNDED = frozenset({"failed", "canceled"})
OUTSIDE_ACTOR = "provider"


async def sync_waiting(conn: Conn, payment_id: str) -> bool:
    """Whether a sync of the payment's refunds waits to run (not yet started)."""
    cur = await conn.execute(
        """SELECT 1 FROM procrastinate_jobs
            WHERE status = 'todo' AND task_name = %s AND args->>'payment_id' = %s
            LIMIT 1""",
        (SYNC_TASK, payment_id),
    )
    return await cur.fetchone() is not None


@app.task(name=SYNC_TASK, queue=ROLE, retry=Backoff(max_attempts=12))
async def sync_refunds(payment_id: str) -> Any:
    """Take in refunds made at the provider outside agentpay (the Dashboard, Stripe's API
    with another key): each provider refund of the payment's intent that carries none of our
    refund ids and has succeeded is recorded as a refund (actor `provider`) and counted as
    ours are — `amount_refunded`, the payment's status, the ledger — if it fits in what
    remains (else it is a reconcile mismatch, field `refund_excess`). Deferred by the refund
    webhooks, also before reconcile (then it waits for it); safe to run any number of times
    (a provider refund is taken in once, by its id). Ours are left to their own jobs; a
    pending one of theirs is taken in when a later event says it succeeded.

    A refund counted as succeeded that the provider now reports failed (Stripe's can fail
    afterwards, e.g. on a closed card) is not undone here: the money may be spent already.
    It is recorded for an operator, once, as a reconcile mismatch (`reconcile_mismatches`,
    field `refund_status`, and a `reconcile_mismatch` event). Returns how many refunds were
    taken in."""
    async with pool().connection() as conn:
        payment = await payments.get(conn, payment_id)
    if payment is None or payment["status"] not in SYNCABLE or not payment["provider_payment_id"]:
        return None
    if payment["status"] in BEFORE_RECONCILE:
        # Not reconciled yet (the capture a refund reverses is not booked): look again until
        # it is, or until the payment ends without money taken (then nothing is syncable) —
        # unless another sync waits already (an event came while this one ran): one look.
        async with pool().connection() as conn:
            if not await sync_waiting(conn, payment_id):
                await defer(
                    conn,
                    SYNC_TASK,
                    payment_id=payment_id,
                    schedule_in=get_settings().provider_recheck_seconds,
                )
        return None
    listed = await provider.list_refunds(payment["provider_payment_id"])
    taken = 0
    async with pool().connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment_id)
        if locked is None or locked["status"] not in SYNCABLE:
            return None
        # Ours carry one of this payment's refund ids; a refund_id in the metadata of a
        # refund someone else made (another tool's own ticket number) does not make it ours.
        cur = await conn.execute(
            """SELECT id, provider_refund_id, amount, status FROM payment_refunds
                WHERE payment_id = %s""",
            (payment_id,),
        )
        recorded = await cur.fetchall()
        ours = {row["id"] for row in recorded}
        await _record_failed_after_success(
            conn, locked, [r for r in listed if r.status in NOT_REFUNDED]
        )
        await _take_in_replacements(conn, locked, recorded, listed)
        taken_in = {row["provider_refund_id"] for row in recorded}
        await _record_made_twice(conn, locked, [r for r in listed if r.refund_id in ours])
        if locked["status"] not in REFUNDABLE:
            return taken
        outside = [
            r
            for r in listed
            if r.refund_id not in ours and r.status == "succeeded" and r.id not in taken_in
        ]
        for result in outside:
            if result.amount > payments.collected(locked) - locked["amount_refunded"]:
                # More than the payment has left to give back by our count: the provider
                # let a refund counted here fail and the money go back again (an operator
                # re-issuing it without our refund id). Counting it would break the totals;
                # an operator settles it.
                await _record_excess(conn, locked, result)
                continue
            cur = await conn.execute(
                """INSERT INTO payment_refunds (id, payment_id, amount, currency, reason, actor,
                                                status, provider_refund_id, provider_status)
                   VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s)
                   ON CONFLICT (provider_refund_id) DO NOTHING
                   RETURNING *""",
                (
                    payments.new_id("rfd"),
                    payment_id,
                    result.amount,
                    locked["currency"],
                    "made at the provider",
                    OUTSIDE_ACTOR,
                    result.id,
                    result.status,
                ),
            )
            refund = await cur.fetchone()
            if refund is None:
                continue  # taken in already
            await _succeed(
                conn, locked, refund, result, reason="refunded at the provider, outside agentpay"
            )
            taken += 1
    return taken


async def _take_in_replacements(
    conn: Conn,
    payment: payments.Payment,
    recorded: list[dict[str, Any]],
    listed: list[provider.Refund],
) -> None:
    """A refund of ours counted as made whose provider refund failed or was canceled after it
    succeeded, and that an operator made again at the provider with our refund id in its
    metadata and the same amount (as docs/operations.md says): the refund now names the one
    that succeeded, with a `refund_replaced` event — it kept naming the failed one, and the
    new one showed nowhere. Anything else (another amount, two of them, one taken in already
    as made outside agentpay) is left to the operator, before whom the failure was put.
    Updates `recorded` in place."""
    status = {r.id: r.status for r in listed}
    known = {row["provider_refund_id"] for row in recorded}
    for row in recorded:
        if (
            row["status"] != "succeeded"
            or status.get(row["provider_refund_id"]) not in NOT_REFUNDED
        ):
            continue
        again = [
            r
            for r in listed
            if r.refund_id == row["id"] and r.status == "succeeded" and r.id not in known
        ]
        if len(again) != 1 or again[0].amount != row["amount"]:
            continue  # none yet, or not a plain re-issue: the mismatch stands for a person
        failed, replacement = row["provider_refund_id"], again[0].id
        await conn.execute(
            """UPDATE payment_refunds SET provider_refund_id = %s, provider_status = 'succeeded'
                WHERE id = %s""",
            (replacement, row["id"]),
        )
        row["provider_refund_id"] = replacement
        await payments.record_event(
            conn,
            payment,
            "refund_replaced",
            actor=OUTSIDE_ACTOR,
            reason="a refund that failed at the provider was made again there",
            data={
                "refund_id": row["id"],
                "failed_provider_refund_id": failed,
                "provider_refund_id": replacement,
            },
        )


async def _record_excess(conn: Conn, payment: payments.Payment, result: provider.Refund) -> None:
    """A refund made at the provider that does not fit in what remains: one reconcile
    mismatch (field `refund_excess`), once per provider refund."""
    if await payments.mismatch_recorded(
        conn, payment["id"], "refund_excess", "provider_refund_id", result.id
    ):
        return
    found = {
        "field": "refund_excess",
        "expected": {
            "refundable": payments.collected(payment) - payment["amount_refunded"],
        },
        "actual": {"provider_refund_id": result.id, "amount": result.amount},
    }
    await _put_before_an_operator(
        conn, payment, [found], "a refund made at the provider is more than remains to refund"
    )


async def _record_failed_after_success(
    conn: Conn, payment: payments.Payment, failed: list[provider.Refund]
) -> None:
    """Refunds counted as succeeded that the provider now reports failed or canceled: one
    reconcile mismatch each (once), for an operator to settle."""
    if not failed:
        return
    cur = await conn.execute(
        """SELECT r.id, r.provider_refund_id, r.amount FROM payment_refunds r
            WHERE r.payment_id = %s AND r.status = 'succeeded'
              AND r.provider_refund_id = ANY(%s)
              AND NOT EXISTS (SELECT 1 FROM reconcile_mismatches m
                               WHERE m.payment_id = r.payment_id AND m.field = 'refund_status'
                                 AND m.expected->>'refund_id' = r.id
                                 AND m.actual->>'provider_refund_id' = r.provider_refund_id)""",
        (payment["id"], [r.id for r in failed]),
    )
    now_failed = {r.id: r.status for r in failed}
    found = [
        {
            "field": "refund_status",
            "expected": {"refund_id": row["id"], "status": "succeeded", "amount": row["amount"]},
            "actual": {
                "provider_refund_id": row["provider_refund_id"],
                "status": now_failed[row["provider_refund_id"]],
            },
        }
        for row in await cur.fetchall()
    ]
    await _put_before_an_operator(
        conn, payment, found, "a refund counted as made failed at the provider afterwards"
    )


async def _record_made_twice(
    conn: Conn, payment: payments.Payment, listed: list[provider.Refund]
) -> None:
    """More than one succeeded provider refund carrying the same refund id of ours: money
    went back twice (a call whose server error the provider saved may still be carried out
    later, after the retry under a derived key refunded). Nothing counts the second, so it
    is recorded once as a reconcile mismatch (field `refund_count`) for an operator. (A
    refund re-issued by an operator after ours failed carries our id too; only succeeded
    ones count.)"""
    made: dict[str, list[provider.Refund]] = {}
    for r in listed:
        if r.refund_id is not None and r.status == "succeeded":
            made.setdefault(r.refund_id, []).append(r)
    twice = {refund_id: found for refund_id, found in made.items() if len(found) > 1}
    if not twice:
        return
    cur = await conn.execute(
        """SELECT expected->>'refund_id' AS refund_id FROM reconcile_mismatches
            WHERE payment_id = %s AND field = 'refund_count'""",
        (payment["id"],),
    )
    recorded = {row["refund_id"] for row in await cur.fetchall()}
    found = [
        {
            "field": "refund_count",
            "expected": {"refund_id": refund_id, "provider_refunds": 1},
            "actual": {
                "provider_refund_ids": sorted(r.id for r in made_twice),
                "amount": sum(r.amount for r in made_twice),
            },
        }
        for refund_id, made_twice in sorted(twice.items())
        if refund_id not in recorded
    ]
    await _put_before_an_operator(
        conn, payment, found, "a refund was made more than once at the provider"
    )


async def _put_before_an_operator(
    conn: Conn, payment: payments.Payment, found: list[dict[str, Any]], reason: str
) -> None:
    """What the provider's refunds say that the payment does not, as reconcile mismatches."""
    if found:
        await payments.record_mismatches(
            conn, payment, payment["provider_payment_id"], found, actor=ACTOR, reason=reason
        )


def public(refund: Refund) -> dict[str, Any]:
    """The refund object of the HTTP contract."""
    failure = None
    if refund["failure_code"]:
        failure = {"code": refund["failure_code"], "message": refund["failure_message"]}
    return {
        "id": refund["id"],
        "object": "refund",
        "payment_id": refund["payment_id"],
        "amount": refund["amount"],
        "currency": refund["currency"],
        "status": refund["status"],
        "reason": refund["reason"],
        "provider_refund_id": refund["provider_refund_id"],
        "failure": failure,
        "created_at": refund["created_at"],
        "updated_at": refund["updated_at"],
    }
