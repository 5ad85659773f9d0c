"""A cancel asked for while a payment is `charging`: the provider's own state machine settles
the race with the charge, and a payment left in `charging` (a refusal agentpay does not
recognise) has a way out."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tasks import charge, payments, provider, reconcile
from tasks.db import Pool
from tasks.settings import get_settings
from tests.conftest import Killed, auth, failed_last_hour, run_jobs
from tests.test_capture_refund import SK, _lose_jobs, intent
from tests.test_faults import intents_of
from tests.test_pipeline import create, fetch
from workers.maintenance import sweep_stuck_payments, sweep_stuck_requests


def refuse(operation: str) -> Any:
    """A provider call refused for a reason no rule of `tasks.provider` recognises: the job
    fails and the payment waits in `charging`."""

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise provider.ProviderError(f"{operation} refused for an unknown reason")

    return refused


async def ledger_kinds(pool: Pool, payment_id: str) -> list[str]:
    """The kinds of the payment's ledger postings, by name."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT kind FROM ledger_transactions WHERE payment_id = %s ORDER BY kind",
            (payment_id,),
        )
        return [r["kind"] for r in await cur.fetchall()]


async def jobs_of(pool: Pool, payment_id: str, status: str) -> list[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT task_name FROM procrastinate_jobs
                WHERE args->>'payment_id' = %s AND status = %s ORDER BY id""",
            (payment_id, status),
        )
        return [r["task_name"] for r in await cur.fetchall()]


async def cancel(api: httpx.AsyncClient, key: str, payment_id: str) -> dict[str, Any]:
    response = await api.post(f"/v1/payments/{payment_id}/cancel", headers=auth(key))
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_a_cancel_ends_a_payment_stuck_in_charging_by_canceling_its_intent(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    monkeypatch.setattr(provider, "confirm_intent", refuse("confirm"))
    await run_jobs(pool, ("charge",))
    stuck = await fetch(api, agent_key, created["id"])
    assert stuck["status"] == "charging" and stuck["provider_payment_id"]
    assert await jobs_of(pool, created["id"], "failed") == ["charge"]

    answer = await cancel(api, agent_key, created["id"])
    assert (answer["status"], answer["pending_action"]) == ("charging", "cancel")
    await cancel(api, agent_key, created["id"])  # asked again: still one job
    assert await jobs_of(pool, created["id"], "todo") == ["cancel"]
    await run_jobs(pool, ("charge",))

    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["pending_action"]) == ("canceled", None)
    assert intent(provider_base, stuck["provider_payment_id"])["status"] == "canceled"
    assert await ledger_kinds(pool, created["id"]) == ["hold", "release"]
    # Final: the sweep has nothing to drive on.
    assert await sweep_stuck_payments(pool, older_than=0) == []


async def test_a_cancel_of_a_payment_whose_intent_was_never_made_needs_no_provider(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    real_create = provider.create_intent
    monkeypatch.setattr(provider, "create_intent", refuse("create"))
    await run_jobs(pool, ("charge",))
    stuck = await fetch(api, agent_key, created["id"])
    assert (stuck["status"], stuck["provider_payment_id"]) == ("charging", None)

    await cancel(api, agent_key, created["id"])
    await run_jobs(pool, ("charge",))
    assert (await fetch(api, agent_key, created["id"]))["status"] == "canceled"
    assert intents_of(provider_base, created["id"]) == []

    # The provider takes creates again; a charge job run now (a late retry, a re-drive)
    # finds the payment canceled and makes no intent.
    monkeypatch.setattr(provider, "create_intent", real_create)
    assert await charge.charge_payment(created["id"]) is None
    assert intents_of(provider_base, created["id"]) == []
    assert await ledger_kinds(pool, created["id"]) == ["hold", "release"]


async def test_a_cancel_that_finds_an_intent_being_made_wins_over_its_charge_job(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The charge job has claimed the payment and created its intent, not yet stored it;
    the cancel job finds the intent by search, takes it as the payment's and cancels it.
    The charge job, going on, must not confirm it."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    running = await charge.claim(created["id"])
    assert running is not None
    made = await provider.create_intent(running)
    await cancel(api, agent_key, created["id"])

    assert await charge.cancel_payment(created["id"]) == "canceled"
    assert intent(provider_base, made.id)["status"] == "canceled"
    # The charge job goes on: its keyed create gives back the same intent, which it may
    # not take, nor confirm.
    assert await charge.call_provider(running) is None
    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["provider_payment_id"]) == ("canceled", made.id)
    assert [pi["status"] for pi in intents_of(provider_base, created["id"])] == ["canceled"]
    # The charge job itself, run now, finds the cancel and asks the provider nothing.
    assert await charge.charge_payment(created["id"]) is None


async def test_a_charge_the_provider_confirmed_before_the_cancel_goes_on(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    # The charge was confirmed at the provider; its worker died before recording it.
    claimed = await charge.claim(created["id"])
    assert claimed is not None
    confirmed = await charge.call_provider(claimed)
    assert confirmed.status == "succeeded"

    await cancel(api, agent_key, created["id"])
    await run_jobs(pool)

    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["pending_action"]) == ("reconciled", None)
    [pi] = intents_of(provider_base, created["id"])
    assert (pi["status"], pi["amount_received"]) == ("succeeded", 2000)
    async with pool.connection() as conn:
        events = await payments.events(conn, created["id"])
    assert [(e["from_status"], e["to_status"]) for e in events if e["type"] == "transition"][
        -2:
    ] == [("charging", "succeeded"), ("succeeded", "reconciled")]
    assert await ledger_kinds(pool, created["id"]) == ["capture", "hold"]


async def test_a_lost_cancel_of_a_charging_payment_is_driven_on_and_never_handed_to_charge(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    monkeypatch.setattr(provider, "confirm_intent", refuse("confirm"))
    await run_jobs(pool, ("charge",))
    monkeypatch.undo()  # the provider would confirm now: nothing may ask it to
    await cancel(api, agent_key, created["id"])
    await _lose_jobs(pool, "cancel")

    # Reconcile (a webhook, the stuck-payment sweep) hands it to the cancel job, not to
    # charge, and the sweep of requests re-drives the lost cancel too.
    await reconcile.reconcile_payment(created["id"])
    assert await jobs_of(pool, created["id"], "todo") == ["cancel"]
    assert await sweep_stuck_requests(pool, older_than=0) == []  # a cancel job is waiting
    await _lose_jobs(pool, "cancel")
    assert await sweep_stuck_requests(pool, older_than=0) == [created["id"]]
    await run_jobs(pool)

    assert (await fetch(api, agent_key, created["id"]))["status"] == "canceled"
    [pi] = intents_of(provider_base, created["id"])
    assert pi["status"] == "canceled"


async def test_a_cancel_the_provider_refuses_while_charging_leaves_the_charge_going_on(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    with monkeypatch.context() as patched:
        patched.setattr(provider, "confirm_intent", refuse("confirm"))
        await run_jobs(pool, ("charge",))
    await cancel(api, agent_key, created["id"])

    async def refused(*args: Any) -> Any:
        raise provider.Declined("payment_intent_unexpected_state", "cannot cancel it now")

    monkeypatch.setattr(provider, "cancel_intent", refused)
    assert await charge.cancel_payment(created["id"]) is None

    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["pending_action"]) == ("charging", None)
    async with pool.connection() as conn:
        events = await payments.events(conn, created["id"])
    assert [e["type"] for e in events][-1] == "cancel_failed"
    # Not left behind: reconcile looks again, and hands it back to the charge role.
    assert await jobs_of(pool, created["id"], "todo") == ["cancel", "reconcile"]
    await _lose_jobs(pool, "cancel")  # the job this test ran by hand
    monkeypatch.setenv("AGENTPAY_PROVIDER_RECHECK_SECONDS", "0")  # its delays: none
    get_settings.cache_clear()
    await reconcile.reconcile_payment(created["id"])
    assert await jobs_of(pool, created["id"], "todo") == ["reconcile", "charge"]
    await _lose_jobs(pool, "reconcile")  # the job this test ran by hand
    await run_jobs(pool)
    assert (await fetch(api, agent_key, created["id"]))["status"] == "reconciled"


async def test_a_charge_worker_woken_after_the_cancel_ended_the_payment_never_confirms(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A worker frozen after its claim (past the stalled-job rescue, whose re-run found the
    cancel and did nothing) wakes up after the cancel job ended the payment without the
    provider, and goes on with its provider call: the intent it makes is never the
    payment's, never confirmed."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    frozen = await charge.claim(created["id"])
    assert frozen is not None
    await cancel(api, agent_key, created["id"])
    # The charge job's re-run (it finds the cancel and does nothing), then the cancel job.
    await run_jobs(pool, ("charge",))
    assert (await fetch(api, agent_key, created["id"]))["status"] == "canceled"

    assert await charge.call_provider(frozen) is None  # the frozen worker wakes up
    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["provider_payment_id"]) == ("canceled", None)
    assert [pi["status"] for pi in intents_of(provider_base, created["id"])] == ["canceled"]
    assert await ledger_kinds(pool, created["id"]) == ["hold", "release"]


async def test_a_late_charge_job_leaves_the_intent_its_payment_took_alone(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """No cancel at all: a charge job frozen in its create call is rescued, and the re-run
    authorizes the payment (same create key, same intent). The first job wakes up: its
    intent is the payment's now, so it stops without touching it."""
    created = await create(api, agent_key, capture_method="manual")
    await run_jobs(pool, ("pricing", "risk"))
    frozen = await charge.claim(created["id"])
    assert frozen is not None
    await run_jobs(pool, ("charge",))  # the rescued re-run
    held = await fetch(api, agent_key, created["id"])
    assert held["status"] == "authorized"

    assert await charge.call_provider(frozen) is None
    assert intent(provider_base, held["provider_payment_id"])["status"] == "requires_capture"
    captured = await api.post(f"/v1/payments/{created['id']}/capture", headers=auth(agent_key))
    assert captured.status_code == 202, captured.text
    await run_jobs(pool)
    assert (await fetch(api, agent_key, created["id"]))["status"] == "reconciled"


async def test_two_intents_a_payment_never_took_are_both_canceled(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The cancel of an intent the payment never took was keyed per payment: a second such
    intent (two frozen charge jobs, or a create retried after its key expired) reused the
    first one's key on another intent, the provider refused it, and the intent stayed open.
    It is keyed per intent."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    created = await fetch(api, agent_key, created["id"])
    strays = [
        httpx.post(
            f"{provider_base}/v1/payment_intents",
            data={
                "amount": str(created["amount_total"]),
                "currency": created["currency"],
                "payment_method_types[]": "card",
                "metadata[payment_id]": created["id"],
            },
            headers=SK,
        ).json()
        for _ in range(2)
    ]
    for stray in strays:
        await charge._cancel_unowned(created["id"], await provider.retrieve_intent(stray["id"]))
    assert [intent(provider_base, s["id"])["status"] for s in strays] == ["canceled"] * 2


async def test_an_intent_made_after_the_cancel_by_a_job_that_died_is_canceled_later(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancel found no intent and ended the payment; the charge job in flight then
    made one, was refused it, and died before canceling it: nothing else ever would, and
    the intent waited at the provider, open to a confirm, for a payment that ended. The
    cancel leaves a search for later that cancels it."""
    created = await canceled_with_a_stray_intent(api, agent_key, pool, provider_base, monkeypatch)
    assert "cancel_unowned_intents" in await jobs_of(pool, created["id"], "todo")
    [made] = intents_of(provider_base, created["id"])
    assert made["status"] == "requires_confirmation"

    assert await charge.cancel_unowned_intents.func(created["id"]) == {
        "canceled": 1,
        "looked_at": 0,
    }
    assert intent(provider_base, made["id"])["status"] == "canceled"
    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["provider_payment_id"]) == ("canceled", None)
    # Run again (a retry, the sweep): nothing more to do.
    assert await charge.cancel_unowned_intents.func(created["id"]) == {
        "canceled": 0,
        "looked_at": 0,
    }


async def test_an_intent_confirmed_before_the_later_search_goes_before_an_operator(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same intent, confirmed by someone else before the search came: it took money
    for a canceled payment, and the search hands it to the look at late money."""
    from tests.test_capture_refund import mismatches_of
    from tests.test_late_money import confirm_at_provider

    created = await canceled_with_a_stray_intent(api, agent_key, pool, provider_base, monkeypatch)
    [made] = intents_of(provider_base, created["id"])
    assert confirm_at_provider(provider_base, made["id"]).json()["status"] == "succeeded"
    assert await charge.cancel_unowned_intents.func(created["id"]) == {
        "canceled": 0,
        "looked_at": 1,
    }
    await run_jobs(pool, ("reconcile",))
    assert [m["field"] for m in await mismatches_of(pool, created["id"])] == ["late_success"]


async def canceled_with_a_stray_intent(
    api: httpx.AsyncClient, key: str, pool: Pool, provider_base: str, monkeypatch: Any
) -> dict[str, Any]:
    """A payment canceled before it had an intent, and the intent its charge job made after
    the cancel left open (the job died before canceling it); the later search made due."""
    created = await create(api, key)
    await run_jobs(pool, ("pricing", "risk"))
    running = await charge.claim(created["id"])
    assert running is not None
    await cancel(api, key, created["id"])
    assert await charge.cancel_payment(created["id"]) == "canceled"

    async def die(payment_id: str, intent: provider.Intent) -> None:
        raise Killed

    monkeypatch.setattr(charge, "_cancel_unowned", die)
    with pytest.raises(Killed):
        await charge.call_provider(running)
    monkeypatch.undo()
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE task_name = %s",
            (charge.UNOWNED_TASK,),
        )
    return created


@pytest.mark.parametrize("refused", ["search", "cancel"])
async def test_a_search_for_stray_intents_that_fails_alerts_and_is_run_again(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
    refused: str,
) -> None:
    """The provider refuses the search (a rolled key) or the cancel: the job ended
    `succeeded` (a refused search was taken for "nothing found"), or failed with the
    failed-job alert quiet (a failure of a canceled payment's job was taken as dealt with),
    and the stray intent stayed open. It fails, alerts, and the sweep runs it again."""
    created = await canceled_with_a_stray_intent(api, agent_key, pool, provider_base, monkeypatch)

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise provider.ProviderError("AuthenticationError (401): the key was rolled")

    name = "find_intents" if refused == "search" else "cancel_intent"
    monkeypatch.setattr(provider, name, refuse)
    await run_jobs(pool, ("charge",))
    monkeypatch.undo()
    assert await jobs_of(pool, created["id"], "failed") == [charge.UNOWNED_TASK]
    assert await failed_last_hour(pool, "charge") == 1
    assert await sweep_stuck_requests(pool, 0) == [created["id"]]
    await run_jobs(pool, ("charge",))
    [made] = intents_of(provider_base, created["id"])
    assert made["status"] == "canceled"
