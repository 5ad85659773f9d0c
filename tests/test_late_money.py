"""A payment that ended without money stays without money: its open PaymentIntent is canceled
at the provider, and money an intent of it took anyway goes before an operator."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tasks import charge, provider, reconcile
from tasks.app import defer
from tasks.db import Pool
from tests.conftest import Killed, auth, run_jobs
from tests.test_capture_refund import SK, authorized, intent, mismatches_of
from tests.test_pipeline import create, fetch
from tests.test_webhooks import post_event


def latest_event(provider_base: str, event_type: str, intent_id: str) -> dict[str, Any]:
    """The provider's newest event of `event_type` about the intent, as it would deliver it."""
    events = httpx.get(
        f"{provider_base}/v1/events", params={"type": event_type, "limit": 100}, headers=SK
    ).json()["data"]
    return next(e for e in events if e["data"]["object"].get("id") == intent_id)


async def declined(api: httpx.AsyncClient, key: str, pool: Pool, **body: Any) -> dict[str, Any]:
    created = await create(api, key, payment_method="pm_card_chargeDeclined", **body)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    payment = await fetch(api, key, created["id"])
    assert payment["status"] == "failed"
    return payment


async def void_jobs(pool: Pool, payment_id: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT count(*) AS n FROM procrastinate_jobs
                WHERE task_name = 'void_intent' AND args->>'payment_id' = %s""",
            (payment_id,),
        )
        return int((await cur.fetchone())["n"])


async def authorized_late(
    api: httpx.AsyncClient, key: str, pool: Pool, provider_base: str
) -> dict[str, Any]:
    """A manual-capture payment that failed, whose open intent someone else then confirmed
    with a good card: it holds the customer's funds (`requires_capture`)."""
    payment = await declined(api, key, pool, capture_method="manual")
    confirmed = confirm_at_provider(provider_base, payment["provider_payment_id"])
    assert confirmed.json()["status"] == "requires_capture", confirmed.text
    return payment


def confirm_at_provider(provider_base: str, intent_id: str) -> httpx.Response:
    """Someone else confirms the intent with a good card (the customer with its client
    secret, another integration)."""
    return httpx.post(
        f"{provider_base}/v1/payment_intents/{intent_id}/confirm",
        data={"payment_method": "pm_card_visa"},
        headers=SK,
    )


async def test_a_declined_payments_intent_is_canceled_so_nothing_confirms_it_later(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Stripe keeps a declined intent open (`requires_payment_method`): a later confirm with
    another card took the customer's money for a payment agentpay had ended `failed` (its
    hold released, nothing booked). The intent is now canceled at the provider."""
    payment = await declined(api, agent_key, pool)
    assert await void_jobs(pool, payment["id"]) == 1
    await run_jobs(pool)
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "canceled"
    refused = confirm_at_provider(provider_base, payment["provider_payment_id"])
    assert refused.status_code == 400, refused.text
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["failure"]["code"]) == ("failed", "card_declined")


@pytest.fixture
def not_voided(monkeypatch: pytest.MonkeyPatch) -> None:
    """The intent of a failed payment left open: confirmed by someone else before its
    cancel (or the cancel refused)."""
    monkeypatch.setattr(charge, "VOIDABLE", frozenset(), raising=False)


async def test_money_an_ended_payments_intent_took_anyway_is_a_mismatch_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, not_voided: None
) -> None:
    """Confirmed by someone else before agentpay canceled it: the provider's
    `payment_intent.succeeded` was stored and nothing followed — the customer paid, the books
    said nothing was taken. The payment cannot leave `failed`; the money goes before an
    operator as a `late_success` mismatch, read from the provider, once."""
    payment = await declined(api, agent_key, pool)
    assert await void_jobs(pool, payment["id"]) == 0
    pi = payment["provider_payment_id"]
    assert confirm_at_provider(provider_base, pi).json()["status"] == "succeeded"
    event = latest_event(provider_base, "payment_intent.succeeded", pi)
    for copy in (event, {**event, "id": event["id"] + "_again"}):
        assert (await post_event(api, copy)).status_code == 200
        await run_jobs(pool)
    assert await mismatches_of(pool, payment["id"]) == [
        {
            "field": "late_success",
            "expected": {"status": "failed"},
            "actual": {
                "intent": pi,
                "status": "succeeded",
                "amount_received": payment["amount_total"],
                "currency": "usd",
            },
        }
    ]
    after = await fetch(api, agent_key, payment["id"])
    assert after["status"] == "failed"
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert [e["type"] for e in events].count("reconcile_mismatch") == 1


async def test_an_authorization_an_ended_payments_intent_got_anyway_is_canceled(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, not_voided: None
) -> None:
    """A manual-capture payment: the late confirm only authorizes, holding the customer's
    funds for a payment that ended. The authorization is canceled at the provider."""
    payment = await authorized_late(api, agent_key, pool, provider_base)
    pi = payment["provider_payment_id"]
    event = latest_event(provider_base, "payment_intent.amount_capturable_updated", pi)
    assert (await post_event(api, event)).status_code == 200
    await run_jobs(pool)
    assert intent(provider_base, pi)["status"] == "canceled"
    assert await mismatches_of(pool, payment["id"]) == []
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert "late_authorization_canceled" in [e["type"] for e in events]


async def test_a_void_refused_because_someone_confirmed_first_looks_at_the_intent(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The intent was confirmed by someone else before `void_intent` ran: its cancel was
    refused and only logged, and with the intent's webhook lost nothing told anyone. The
    refusal now brings the look at the intent, which finds the money."""
    monkeypatch.setattr(charge, "VOIDABLE", frozenset())
    payment = await declined(api, agent_key, pool)
    monkeypatch.undo()
    pi = payment["provider_payment_id"]
    assert confirm_at_provider(provider_base, pi).json()["status"] == "succeeded"
    async with pool.connection() as conn, conn.transaction():  # as settle defers it
        await defer(conn, charge.VOID_TASK, payment_id=payment["id"], intent_id=pi)
    await run_jobs(pool)
    assert [m["field"] for m in await mismatches_of(pool, payment["id"])] == ["late_success"]


async def test_a_late_webhook_of_an_ordinary_cancel_is_no_late_authorization(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """An authorized payment canceled as usual, its `amount_capturable_updated` webhook
    delivered after the cancel: the look at the intent found it canceled and recorded a
    `late_authorization_canceled` that never happened. Only a cancel it made is recorded."""
    payment = await authorized(api, agent_key, pool)
    pi = payment["provider_payment_id"]
    event = latest_event(provider_base, "payment_intent.amount_capturable_updated", pi)
    canceled = await api.post(f"/v1/payments/{payment['id']}/cancel", headers=auth(agent_key))
    assert canceled.status_code == 202, canceled.text
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "canceled"
    assert (await post_event(api, event)).status_code == 200
    await run_jobs(pool)
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert "late_authorization_canceled" not in [e["type"] for e in events]
    assert await mismatches_of(pool, payment["id"]) == []


async def test_a_confirm_refused_before_the_payment_knew_its_intent_still_voids_it(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A confirm refused about the payment with no intent in the answer, on the charge's
    first try: the failed outcome named the intent id of the row read before the intent
    was made (none), so no `void_intent` was deferred and the intent stayed open with the
    card on it."""

    async def refuse(payment_id: str, intent_id: str) -> provider.Intent:
        raise provider.Declined("payment_method_unexpected_state", "refused")

    monkeypatch.setattr(provider, "confirm_intent", refuse)
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "failed"
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "canceled"


async def test_failures_of_the_tasks_for_ended_payments_alert(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`void_intent` and `check_late_money` only ever run for payments that ended, and the
    failed-job alert took every failure of such a payment as dealt with: theirs never
    counted. They count now (until the same work succeeds)."""

    async def broken(payment_id: str, intent_id: str, request: str) -> provider.Intent:
        raise provider.ProviderError("the key lacks the permission")

    monkeypatch.setattr(provider, "cancel_intent", broken)
    payment = await declined(api, agent_key, pool)
    await run_jobs(pool)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT failed_last_hour FROM ops_queue_depth WHERE role = 'charge'"
        )
        assert (await cur.fetchone())["failed_last_hour"] == 1
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "failed"


async def test_a_late_authorization_captured_before_its_cancel_is_a_mismatch(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    not_voided: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The late authorization was captured (by whoever confirmed it) before the look could
    cancel it: the refused cancel failed the job for good. The intent as it is then — money
    taken — goes before an operator."""
    payment = await authorized_late(api, agent_key, pool, provider_base)
    pi = payment["provider_payment_id"]
    event = latest_event(provider_base, "payment_intent.amount_capturable_updated", pi)
    real_cancel = provider.cancel_intent

    async def captured_first(payment_id: str, intent_id: str, request: str) -> provider.Intent:
        httpx.post(
            f"{provider_base}/v1/payment_intents/{intent_id}/capture", headers=SK
        ).raise_for_status()
        return await real_cancel(payment_id, intent_id, request)

    monkeypatch.setattr(provider, "cancel_intent", captured_first)
    assert (await post_event(api, event)).status_code == 200
    await run_jobs(pool)
    assert [m["field"] for m in await mismatches_of(pool, payment["id"])] == ["late_success"]


async def test_two_late_authorizations_of_one_payment_are_both_canceled(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, not_voided: None
) -> None:
    """The late cancel was keyed per payment: a second intent of the payment (a lost
    create's twin) reused the first one's key on another intent, the provider refused it
    (IdempotencyError) and the authorization stayed. It is keyed per intent."""
    payment = await authorized_late(api, agent_key, pool, provider_base)
    pi = payment["provider_payment_id"]
    other = httpx.post(
        f"{provider_base}/v1/payment_intents",
        data={
            "amount": str(payment["amount_total"]),
            "currency": payment["currency"],
            "payment_method": "pm_card_visa",
            "capture_method": "manual",
            "confirm": "true",
            "payment_method_types[]": "card",
            "metadata[payment_id]": payment["id"],
        },
        headers=SK,
    ).json()
    assert other["status"] == "requires_capture", other
    assert await reconcile.check_late_money.func(payment["id"], pi) == "canceled"
    assert await reconcile.check_late_money.func(payment["id"], other["id"]) == "canceled"
    assert intent(provider_base, other["id"])["status"] == "canceled"


async def test_two_looks_at_one_late_authorization_record_one_cancel(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    not_voided: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two looks at one intent (a rescued job whose worker still runs): the second read it
    before the first canceled it, got the replayed cancel, and recorded the cancel again."""
    payment = await authorized_late(api, agent_key, pool, provider_base)
    pi = payment["provider_payment_id"]
    stale = await provider.retrieve_intent(pi)
    assert await reconcile.check_late_money.func(payment["id"], pi) == "canceled"
    real_retrieve = provider.retrieve_intent
    reads: list[str] = []

    async def read_before_the_cancel(intent_id: str) -> provider.Intent:
        reads.append(intent_id)
        return stale if len(reads) == 1 else await real_retrieve(intent_id)

    monkeypatch.setattr(provider, "retrieve_intent", read_before_the_cancel)
    await reconcile.check_late_money.func(payment["id"], pi)
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert [e["type"] for e in events].count("late_authorization_canceled") == 1


async def test_a_late_cancel_whose_record_was_lost_is_recorded_by_the_next_look(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    not_voided: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The look canceled the late authorization at the provider and died before its
    commit: the rerun read the intent `canceled`, took it for someone else's cancel, and
    no `late_authorization_canceled` event ever said a late authorization had happened. The
    rerun repeats the keyed cancel, which the provider answers from its record of ours."""
    payment = await authorized_late(api, agent_key, pool, provider_base)
    pi = payment["provider_payment_id"]
    real_cancel = provider.cancel_intent

    async def cancel_then_die(payment_id: str, intent_id: str, request: str) -> provider.Intent:
        await real_cancel(payment_id, intent_id, request)
        raise Killed

    monkeypatch.setattr(provider, "cancel_intent", cancel_then_die)
    with pytest.raises(Killed):
        await reconcile.check_late_money.func(payment["id"], pi)
    monkeypatch.undo()
    assert intent(provider_base, pi)["status"] == "canceled"
    assert await reconcile.check_late_money.func(payment["id"], pi) == "canceled"
    assert await reconcile.check_late_money.func(payment["id"], pi) is None  # once
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert [e["type"] for e in events].count("late_authorization_canceled") == 1


async def test_a_look_that_failed_for_good_is_run_again_by_the_sweep(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    not_voided: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A look whose read the provider refused (a key without the permission for a while)
    failed for good, and nothing ran it again: the money a late confirm took was never put
    before an operator once the key was fixed."""
    from workers.maintenance import sweep_stuck_requests

    payment = await declined(api, agent_key, pool)
    pi = payment["provider_payment_id"]
    assert confirm_at_provider(provider_base, pi).json()["status"] == "succeeded"

    async def refused(intent_id: str) -> provider.Intent:
        raise provider.ProviderError("the key may not read payment intents")

    monkeypatch.setattr(provider, "retrieve_intent", refused)
    event = latest_event(provider_base, "payment_intent.succeeded", pi)
    assert (await post_event(api, event)).status_code == 200
    await run_jobs(pool)
    assert await mismatches_of(pool, payment["id"]) == []
    monkeypatch.undo()
    assert await sweep_stuck_requests(pool, older_than=0) == [payment["id"]]
    await run_jobs(pool)
    assert [m["field"] for m in await mismatches_of(pool, payment["id"])] == ["late_success"]
    assert await sweep_stuck_requests(pool, older_than=0) == []  # its work is done


async def test_a_void_dealt_with_is_not_re_driven_once_its_success_is_pruned(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep takes a failed void (or late-money look, or refund sync) as dealt with
    when a later job of the same work exists. Pruning deleted that later job after an hour
    but kept the failure for 7 days, so the failure was re-driven again every hour for a
    week. The later job is kept as long as the failure is."""
    from workers.maintenance import prune_finished_jobs, sweep_stuck_requests

    async def refused(payment_id: str, intent_id: str, request: str) -> provider.Intent:
        raise provider.ProviderError("the key lacks the permission")

    async def age(status: str, by: str) -> None:
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE procrastinate_events SET at = at - %s::interval WHERE job_id IN"
                " (SELECT id FROM procrastinate_jobs WHERE status = %s)",
                (by, status),
            )

    monkeypatch.setattr(provider, "cancel_intent", refused)
    payment = await declined(api, agent_key, pool)
    await run_jobs(pool)  # the void fails for good
    monkeypatch.undo()
    assert await sweep_stuck_requests(pool, older_than=0) == [payment["id"]]
    await run_jobs(pool)  # the re-drive voids it: dealt with
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "canceled"
    assert await sweep_stuck_requests(pool, older_than=0) == []
    await age("succeeded", "2 hours")
    await prune_finished_jobs(pool, succeeded_after=3600, failed_after=7 * 86400)
    assert await void_jobs(pool, payment["id"]) == 2  # the failure and the void that did it
    assert await sweep_stuck_requests(pool, older_than=0) == []
    # Once the failure is pruned too, so is the job that dealt with it.
    await age("failed", "8 days")
    await prune_finished_jobs(pool, succeeded_after=3600, failed_after=7 * 86400)
    await prune_finished_jobs(pool, succeeded_after=3600, failed_after=7 * 86400)
    assert await void_jobs(pool, payment["id"]) == 0
    assert await sweep_stuck_requests(pool, older_than=0) == []


async def late_intent_processing(
    api: httpx.AsyncClient, key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A failed payment whose intent someone else confirmed with a payment that takes time
    (`processing`, nothing received yet); returns the payment and the intent's state, which
    the test moves on."""
    import dataclasses

    payment = await declined(api, key, pool)
    real = await provider.retrieve_intent(payment["provider_payment_id"])
    state: dict[str, Any] = {"status": "processing", "received": 0}

    async def retrieve(intent_id: str) -> provider.Intent:
        return dataclasses.replace(real, status=state["status"], amount_received=state["received"])

    monkeypatch.setattr(provider, "retrieve_intent", retrieve)
    return payment, state


async def looks_scheduled(pool: Pool, payment_id: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT count(*) AS n FROM procrastinate_jobs
                WHERE task_name = 'check_late_money' AND status = 'todo'
                  AND args->>'payment_id' = %s AND scheduled_at > now()""",
            (payment_id,),
        )
        return int((await cur.fetchone())["n"])


async def test_late_money_seen_processing_then_taken_is_put_before_an_operator_again(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    not_voided: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A look that found the late intent `processing` (nothing received) recorded one
    late_success mismatch per intent: an operator resolved it ("nothing received yet"), the
    money came later, and no look recorded it again. Taken money is recorded even after a
    processing mismatch of the intent; the open processing one is resolved by the provider;
    and a look is scheduled while it processes, since no webhook may ever say how it ended."""
    from api.routes.ops import resolve_mismatch

    payment, state = await late_intent_processing(api, agent_key, pool, monkeypatch)
    pi = payment["provider_payment_id"]
    assert await reconcile.check_late_money.func(payment["id"], pi) == "mismatch"
    assert await looks_scheduled(pool, payment["id"]) == 1
    assert await reconcile.check_late_money.func(payment["id"], pi) is None  # once
    assert await looks_scheduled(pool, payment["id"]) == 1
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, actual FROM reconcile_mismatches WHERE payment_id = %s", (payment["id"],)
        )
        [seen] = await cur.fetchall()
    assert (seen["actual"]["status"], seen["actual"]["amount_received"]) == ("processing", 0)
    async with pool.connection() as conn, conn.transaction():
        await resolve_mismatch(conn, seen["id"], actor="operator:x", reason="nothing received")

    state.update(status="succeeded", received=payment["amount_total"])
    assert await reconcile.check_late_money.func(payment["id"], pi) == "mismatch"
    assert await reconcile.check_late_money.func(payment["id"], pi) is None  # once
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT actual->>'status' AS status, (actual->>'amount_received')::int AS received
                 FROM reconcile_mismatches WHERE payment_id = %s AND resolved_at IS NULL""",
            (payment["id"],),
        )
        assert await cur.fetchall() == [
            {"status": "succeeded", "received": payment["amount_total"]}
        ]


async def test_late_money_seen_processing_that_fails_is_settled_by_the_provider(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    not_voided: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The processing payment fails: nothing was taken. The open processing mismatch is
    resolved by the provider (no operator refunds what never came), and looks stop."""
    payment, state = await late_intent_processing(api, agent_key, pool, monkeypatch)
    pi = payment["provider_payment_id"]
    assert await reconcile.check_late_money.func(payment["id"], pi) == "mismatch"
    state.update(status="requires_payment_method")
    async with pool.connection() as conn:  # the scheduled look is due
        await conn.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE task_name = %s",
            (reconcile.LATE_TASK,),
        )
    await run_jobs(pool, ("reconcile",))
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT resolved_by, resolution FROM reconcile_mismatches
                WHERE payment_id = %s""",
            (payment["id"],),
        )
        [row] = await cur.fetchall()
    assert row["resolved_by"] == "provider" and "no money was taken" in row["resolution"]
    assert await looks_scheduled(pool, payment["id"]) == 0
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert [e["type"] for e in events].count("mismatch_resolved") == 1
