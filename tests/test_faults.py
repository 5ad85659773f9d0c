"""Exactly once under faults: 500s (with and without Stripe-Should-Retry), delays past the
timeout, lost responses, unknown outcomes resolved by retrieve, and a charge worker killed
with SIGKILL between the provider call and the commit. Every payment ends where it should,
and the sandbox holds exactly one PaymentIntent per payment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tasks import charge, payments, provider, reconcile
from tasks.app import Backoff
from tasks.db import Pool
from tasks.settings import SANDBOX_API_KEY, get_settings
from tests.conftest import FAST_ENV, async_wait_for, run_jobs, wait_for
from tests.conftest import stop_process as stop
from tests.test_pipeline import create, fetch
from tests.test_processes import ROOT

SK = {"Authorization": "Bearer sk_test_x"}

# What each card must end as.
EXPECTED = {
    "pm_card_visa": ("reconciled", None),
    "pm_card_chargeDeclined": ("failed", "card_declined"),
}
MIX = ["pm_card_visa", "pm_card_visa", "pm_card_chargeDeclined", "pm_card_visa"]


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch, provider_base: str) -> None:
    """Short provider timeout and re-check delay, so faulted runs settle quickly."""
    monkeypatch.setenv("AGENTPAY_PROVIDER_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("AGENTPAY_PROVIDER_RECHECK_SECONDS", "0.2")
    get_settings.cache_clear()


def faults(provider_base: str, **config: Any) -> None:
    httpx.post(f"{provider_base}/_sandbox/faults", json=config).raise_for_status()


def injected(provider_base: str) -> dict[str, int]:
    result: dict[str, int] = httpx.get(f"{provider_base}/_sandbox/faults").json()["injected"]
    return result


def intents_of(provider_base: str, payment_id: str) -> list[dict[str, Any]]:
    found = httpx.get(
        f"{provider_base}/v1/payment_intents/search",
        params={"query": f"metadata['payment_id']:'{payment_id}'"},
        headers=SK,
    ).json()
    data: list[dict[str, Any]] = found["data"]
    return data


async def jobs_left(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def drain(pool: Pool, timeout: float = 60) -> None:
    """Run every role's jobs, retries included (they come due later), until none is left."""

    async def done() -> bool:
        await run_jobs(pool)
        return await jobs_left(pool) == 0

    await async_wait_for(done, timeout=timeout, what="every job to be done")


async def assert_exactly_once(
    api: httpx.AsyncClient, key: str, pool: Pool, provider_base: str, created: list[dict[str, Any]]
) -> None:
    for item in created:
        payment = await fetch(api, key, item["id"])
        want = EXPECTED[payment["payment_method"]]
        got = (payment["status"], (payment["failure"] or {}).get("code"))
        assert got == want, (payment, await _events(pool, item["id"]))
        intents = intents_of(provider_base, payment["id"])
        assert len(intents) == 1, intents
        if want[0] == "reconciled":
            assert intents[0]["status"] == "succeeded"
            assert intents[0]["id"] == payment["provider_payment_id"]
            assert intents[0]["amount_received"] == payment["amount_total"]
    listed = httpx.get(f"{provider_base}/v1/payment_intents", params={"limit": 100}, headers=SK)
    succeeded = [pi for pi in listed.json()["data"] if pi["status"] == "succeeded"]
    assert len(succeeded) == sum(1 for c in created if c["payment_method"] == "pm_card_visa")
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'failed'"
        )
        assert await cur.fetchone() == {"n": 0}
        cur = await conn.execute("SELECT count(*) AS n FROM reconcile_mismatches")
        assert await cur.fetchone() == {"n": 0}


async def _events(pool: Pool, payment_id: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        return [
            (e["type"], e["to_status"], e["reason"])
            for e in await payments.events(conn, payment_id)
        ]


SCENARIOS: dict[str, dict[str, Any]] = {
    # The SDK retries these itself (same key), then the job retries with backoff.
    "500 with Stripe-Should-Retry: true": {
        "error_rate": 1,
        "error_should_retry": True,
        "count": 8,
        "methods": ["POST"],
    },
    # The SDK does not retry: an unknown outcome at once, the job retries with backoff.
    "500 with Stripe-Should-Retry: false": {
        "error_rate": 1,
        "error_should_retry": False,
        "count": 6,
    },
    "500 without Stripe-Should-Retry": {"error_rate": 1, "count": 6, "methods": ["POST"]},
    # Slower than the client's timeout: the call may have happened; the retry with the same
    # key meets it in flight (409) or replays it.
    "delay past the timeout": {"delay_ms": 1500, "count": 3, "methods": ["POST"]},
    # The request took effect, the answer never came.
    "lost responses": {"lose_response_rate": 1, "count": 8, "methods": ["POST"]},
    "lost responses as 500s": {
        "lose_response_rate": 1,
        "lose_response_as": "500",
        "count": 6,
        "methods": ["POST"],
    },
    "lost retrieves": {"lose_response_rate": 1, "count": 4, "methods": ["GET"]},
    # As Stripe does with a 500 met once the call began: saved under the key and replayed to
    # every retry with it for the key's 24 hours. The call moves on to a derived key.
    "500s saved under the key": {
        "error_rate": 1,
        "error_saved": True,
        "count": 6,
        "methods": ["POST"],
    },
    # The same, after the call took effect: the derived key's call must not act again.
    "500s saved after the call took effect": {
        "error_rate": 1,
        "error_saved": True,
        "error_after_effect": True,
        "count": 6,
        "methods": ["POST"],
    },
    "a seeded mix of everything": {
        "error_rate": 0.25,
        "lose_response_rate": 0.25,
        "count": 24,
        "seed": 7,
    },
}


@pytest.mark.parametrize("config", SCENARIOS.values(), ids=SCENARIOS.keys())
async def test_every_payment_ends_right_with_one_intent_under_faults(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    quick: None,
    config: dict[str, Any],
) -> None:
    created = [await create(api, agent_key, payment_method=card) for card in MIX]
    await run_jobs(pool, ("pricing", "risk"))
    faults(provider_base, **config)
    await drain(pool)
    assert sum(injected(provider_base).values()) > 0, "the fault never fired"
    httpx.delete(f"{provider_base}/_sandbox/faults").raise_for_status()
    await assert_exactly_once(api, agent_key, pool, provider_base, created)


async def _a_lost_create(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """A payment whose create call took effect but whose answer was lost (no SDK retries),
    and whose charge job is gone: only reconcile can resolve it now."""
    monkeypatch.setenv("AGENTPAY_PROVIDER_MAX_NETWORK_RETRIES", "0")
    get_settings.cache_clear()
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    faults(provider_base, lose_response_rate=1, count=1, paths=["/v1/payment_intents"])
    with pytest.raises(provider.Unknown):
        await charge.charge_payment(created["id"])
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM procrastinate_jobs WHERE task_name = 'charge'")
    return created


async def test_an_unknown_create_outcome_is_resolved_by_search_never_a_second_intent(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    quick: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No SDK retries: the create call's answer is lost, so the payment is `charging` without
    an intent id. Reconcile finds the intent by our metadata and the charge goes on with it."""
    created = await _a_lost_create(api, agent_key, pool, provider_base, monkeypatch)
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
    assert payment is not None
    assert (payment["status"], payment["provider_payment_id"]) == ("charging", None)
    [intent] = intents_of(provider_base, created["id"])
    assert intent["status"] == "requires_confirmation"

    assert await reconcile.reconcile_payment(created["id"]) is None  # found, handed to charge
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
    assert payment is not None and payment["provider_payment_id"] == intent["id"]
    await drain(pool)
    await assert_exactly_once(api, agent_key, pool, provider_base, [created])


async def test_a_refused_search_hands_the_payment_to_the_keyed_create(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    quick: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, on an account the provider offers no search to: the refused search is not
    found, not a failed reconcile (which the sweep would re-drive into the same refusal for
    ever); the keyed create gives back the intent the lost call made, and it is charged
    once."""
    created = await _a_lost_create(api, agent_key, pool, provider_base, monkeypatch)

    async def no_search(payment_id: str) -> provider.Intent | None:
        raise provider.ProviderError("InvalidRequestError: search is not available")

    monkeypatch.setattr(provider, "find_intent", no_search)
    assert await reconcile.reconcile_payment(created["id"]) is None  # handed to charge
    await drain(pool)
    await assert_exactly_once(api, agent_key, pool, provider_base, [created])


async def test_unknown_outcomes_leave_the_payment_charging_until_resolved(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    quick: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    faults(
        provider_base,
        error_rate=1,
        error_should_retry=False,
        count=1,
        paths=["/v1/payment_intents"],
    )
    # The retry comes due in an hour, not within milliseconds (run_jobs would run it too).
    backoff_delay = Backoff.delay
    monkeypatch.setattr(Backoff, "delay", lambda self, attempts: 3600.0)
    await run_jobs(pool, ("charge",))
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
        cur = await conn.execute(
            "SELECT status, attempts, scheduled_at > now() AS later FROM procrastinate_jobs"
            " WHERE task_name = 'charge'"
        )
        job = await cur.fetchone()
    assert payment is not None and payment["status"] == "charging"
    assert payment["failure_code"] is None
    assert job == {"status": "todo", "attempts": 1, "later": True}  # retried with backoff
    monkeypatch.setattr(Backoff, "delay", backoff_delay)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'"
        )
    await drain(pool)
    await assert_exactly_once(api, agent_key, pool, provider_base, [created])


async def test_an_intent_still_processing_is_looked_at_again_later_not_settled(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The confirm answers `processing` (a bank debit, a slow network), and so does the first
    look after it: the payment stays `charging`, a reconcile is scheduled
    `provider_recheck_seconds` later (each time), and once the intent has succeeded the
    payment ends reconciled — confirmed once, one intent."""
    import dataclasses
    from datetime import UTC, datetime, timedelta

    recheck = 2.0
    monkeypatch.setenv("AGENTPAY_PROVIDER_RECHECK_SECONDS", str(recheck))
    get_settings.cache_clear()
    real_confirm, real_retrieve = provider.confirm_intent, provider.retrieve_intent
    confirms: list[str] = []
    retrieves: list[str] = []

    async def confirm_processing(payment_id: str, intent_id: str) -> provider.Intent:
        confirms.append(intent_id)
        intent = await real_confirm(payment_id, intent_id)  # the money moves, once
        assert intent.status == "succeeded"
        return dataclasses.replace(intent, status="processing") if len(confirms) == 1 else intent

    async def retrieve_processing_once(intent_id: str) -> provider.Intent:
        retrieves.append(intent_id)
        intent = await real_retrieve(intent_id)
        return dataclasses.replace(intent, status="processing") if len(retrieves) == 1 else intent

    monkeypatch.setattr(provider, "confirm_intent", confirm_processing)
    monkeypatch.setattr(provider, "retrieve_intent", retrieve_processing_once)
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    before = datetime.now(UTC)
    await run_jobs(pool, ("charge",))
    after = datetime.now(UTC)

    payment = await fetch(api, agent_key, created["id"])
    assert (payment["status"], payment["failure"]) == ("charging", None)
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT status::text AS status, scheduled_at FROM procrastinate_jobs
                WHERE task_name = 'reconcile' AND args->>'payment_id' = %s""",
            (created["id"],),
        )
        jobs = await cur.fetchall()
    assert [j["status"] for j in jobs] == ["todo"]
    scheduled_at = jobs[0]["scheduled_at"]
    assert scheduled_at is not None
    assert before + timedelta(seconds=recheck) <= scheduled_at <= after + timedelta(seconds=recheck)

    await drain(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    assert len(confirms) == 1 and len(retrieves) >= 2  # looked again after `processing`
    intents = intents_of(provider_base, created["id"])
    assert [(i["id"], i["status"]) for i in intents] == [
        (payment["provider_payment_id"], "succeeded")
    ]
    assert intents[0]["amount_received"] == payment["amount_total"]
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT count(*) AS n FROM procrastinate_jobs
                WHERE task_name = 'reconcile' AND args->>'payment_id' = %s""",
            (created["id"],),
        )
        row = await cur.fetchone()
    assert row is not None and row["n"] >= 3  # after the confirm, after the look, succeeded


async def test_errors_not_worth_retrying_are_not_retried(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad API key: the job fails at once and is recorded; nothing is charged."""
    monkeypatch.setenv("STRIPE_API_KEY", "pk_live_not_a_secret_key")
    get_settings.cache_clear()
    created = await create(api, agent_key)
    await run_jobs(pool)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status, attempts FROM procrastinate_jobs WHERE task_name = 'charge'"
        )
        assert await cur.fetchone() == {"status": "failed", "attempts": 1}
        payment = await payments.get(conn, created["id"])
    assert payment is not None and payment["status"] == "charging"
    assert intents_of(provider_base, created["id"]) == []


def test_a_rate_limited_job_is_tried_again_for_longer_than_other_unknowns() -> None:
    """The provider's 429 is an unknown outcome like a 5xx, tried again with the same keys,
    but a rate limit lasting minutes should slow payments down, not fail their jobs: a
    throttled job gets three times the attempts."""
    import stripe

    from tasks.app import THROTTLED_ATTEMPTS_FACTOR, Backoff

    throttled = provider._translate(stripe.RateLimitError("Too many requests", http_status=429))
    assert isinstance(throttled, provider.Unknown) and isinstance(throttled, provider.RateLimited)
    unknown = provider._translate(stripe.APIError("Internal error", http_status=500))
    assert isinstance(unknown, provider.Unknown) and not isinstance(unknown, provider.RateLimited)
    backoff = Backoff(max_attempts=12)

    def retried(error: Exception, attempts: int) -> bool:
        job: Any = type("Job", (), {"attempts": attempts})()
        return backoff.get_retry_decision(exception=error, job=job) is not None

    assert retried(unknown, 10) and not retried(unknown, 11)
    last = 12 * THROTTLED_ATTEMPTS_FACTOR - 1
    assert retried(throttled, 11) and retried(throttled, last - 1) and not retried(throttled, last)


async def test_a_chain_of_saved_failures_is_followed_to_its_end(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The create's key and the next three derived keys each met a saved 500 (the SDK's
    retries of each get the replay): one try follows the chain to a key that goes through.
    The chaos run made such a chain of four, and with a bound of 3 every later try stopped
    at the fourth key, which replays its failure for good."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    faults(
        provider_base,
        error_rate=1,
        error_saved=True,
        count=10,  # the first call of each of four keys, and the SDK's two retries
        methods=["POST"],
        paths=["/v1/payment_intents"],
    )
    assert await charge.charge_payment(created["id"]) == "succeeded"
    assert [i["status"] for i in intents_of(provider_base, created["id"])] == ["succeeded"]


def test_derived_keys_stay_within_the_providers_length_limit(provider_base: str) -> None:
    """Each link of a chain of derived keys added its failed request's id to the key, so the
    eighth passed Stripe's 255 characters (the sandbox refuses such a key as Stripe does:
    a 400, which ended the payment `failed`). Now every link is the operation's own key and
    a digest of the chain: as long as the first, different each time, the same for every
    worker."""
    own = provider.idempotency_key("pay_" + "f" * 24, "refund:rfd_" + "e" * 24)
    chain = [own]
    for n in range(provider.REKEYS):
        chain.append(provider.derived_key(chain[-1], f"req_{n:014d}"))
    assert len(set(chain)) == len(chain)
    assert all(key.startswith(own) and len(key) <= 255 for key in chain)
    assert provider.derived_key(chain[3], "req_x") == provider.derived_key(chain[3], "req_x")
    too_long = httpx.post(
        f"{provider_base}/v1/refunds",
        data={"payment_intent": "pi_x"},
        headers={**SK, "Idempotency-Key": "k" * 256},
    )
    assert too_long.status_code == 400
    assert "255 characters" in too_long.json()["error"]["message"]


async def test_a_confirm_refused_because_the_intent_was_confirmed_meanwhile_is_no_failure(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between what the charge job last read of the intent and its confirm, the intent was
    confirmed elsewhere (another try under a derived key, the Dashboard): the provider
    refuses the confirm (`payment_intent_unexpected_state`). That refusal is no decline: the
    payment follows the intent, `succeeded`, and is not recorded `failed` with its hold
    released while the customer paid."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    real_create = provider.create_intent

    async def create_then_confirmed_elsewhere(payment: Any) -> provider.Intent:
        intent = await real_create(payment)
        confirmed = httpx.post(
            f"{provider_base}/v1/payment_intents/{intent.id}/confirm", headers=SK
        )
        assert confirmed.json()["status"] == "succeeded"
        return intent  # as the create answered: requires_confirmation

    monkeypatch.setattr(provider, "create_intent", create_then_confirmed_elsewhere)
    await run_jobs(pool, ("charge",))
    payment = await fetch(api, agent_key, created["id"])
    assert (payment["status"], payment["failure"]) == ("succeeded", None)
    assert [i["status"] for i in intents_of(provider_base, created["id"])] == ["succeeded"]


async def test_a_create_that_loses_the_race_to_store_confirms_the_stored_intent_only(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An earlier create's answer was lost and its key has expired, so this charge job's
    create makes a second intent; meanwhile reconcile found the first by search and stored
    it. The job goes on with the stored intent: only that one is confirmed, the other stays
    unconfirmed, and the customer is charged once."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    priced = await fetch(api, agent_key, created["id"])
    earlier = httpx.post(
        f"{provider_base}/v1/payment_intents",
        data={
            "amount": str(priced["amount_total"]),
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "payment_method_types[0]": "card",
            "metadata[payment_id]": created["id"],
        },
        headers={**SK, "Idempotency-Key": "a-key-the-provider-has-forgotten"},
    ).json()
    assert earlier["status"] == "requires_confirmation", earlier
    real_create = provider.create_intent

    async def create_while_reconcile_stores_the_earlier(payment: Any) -> provider.Intent:
        intent = await real_create(payment)
        async with pool.connection() as conn:
            await payments.store_provider_id(conn, created["id"], earlier["id"])
        return intent

    monkeypatch.setattr(provider, "create_intent", create_while_reconcile_stores_the_earlier)
    await run_jobs(pool, ("charge",))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "succeeded", payment["failure"]
    statuses = {i["id"]: i["status"] for i in intents_of(provider_base, created["id"])}
    assert statuses.pop(earlier["id"]) == "succeeded"
    assert list(statuses.values()) == ["requires_confirmation"]


async def test_an_intent_the_provider_does_not_know_is_no_decline(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A stored intent id the provider answers 404 for (a key of another account, a lost
    object) says nothing about what the customer paid: the charge job fails and is recorded,
    the payment stays `charging` with its hold — it is not failed and released — and a
    reconcile leaves it there too."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_jobs SET provider_payment_id = 'pi_unknown_here' WHERE id = %s",
            (created["id"],),
        )
    await run_jobs(pool, ("charge",))
    with pytest.raises(provider.ProviderError):
        await reconcile.reconcile_payment(created["id"])
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status, attempts FROM procrastinate_jobs WHERE task_name = 'charge'"
        )
        assert await cur.fetchone() == {"status": "failed", "attempts": 1}
        payment = await payments.get(conn, created["id"])
        cur = await conn.execute(
            "SELECT kind FROM ledger_transactions WHERE payment_id = %s ORDER BY kind",
            (created["id"],),
        )
        kinds = [r["kind"] for r in await cur.fetchall()]
    assert payment is not None
    assert (payment["status"], payment["failure_code"]) == ("charging", None)
    assert kinds == ["hold"]


def start_charge_worker(database_url: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", "charge", "--concurrency", "2"],
        cwd=ROOT,
        env={
            **os.environ,
            **FAST_ENV,
            "DATABASE_URL": database_url,
            "STRIPE_API_KEY": SANDBOX_API_KEY,  # not a developer's own (the crash switch)
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_charge_worker_killed_between_the_provider_call_and_the_commit(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, database_url: str
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))

    doomed = start_charge_worker(database_url, AGENTPAY_DEBUG_CRASH_AFTER_PROVIDER_CALL="1")
    try:
        assert doomed.wait(timeout=60) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            doomed.kill()
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
        cur = await conn.execute("SELECT status FROM procrastinate_jobs WHERE task_name = 'charge'")
        assert await cur.fetchone() == {"status": "doing"}  # its worker died holding it
    assert payment is not None and payment["status"] == "charging"
    [intent] = intents_of(provider_base, created["id"])
    assert intent["status"] == "succeeded"  # the provider acted; we never recorded it

    # Another worker rescues the stalled job (its heartbeat stopped) and finishes it.
    healthy = start_charge_worker(database_url)
    try:
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:

            def settled() -> bool:
                row = conn.execute(
                    "SELECT status FROM payment_jobs WHERE id = %s", (created["id"],)
                ).fetchone()
                return row is not None and row["status"] != "charging"

            wait_for(settled, timeout=45, what="the rescued charge to finish")
    finally:
        code = stop(healthy)
    assert code == 0
    await drain(pool)
    await assert_exactly_once(api, agent_key, pool, provider_base, [created])
    assert ("transition", "succeeded", "provider status succeeded") in await _events(
        pool, created["id"]
    )


async def test_reconcile_settles_nothing_from_an_intent_the_payment_did_not_take(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stray intent of the payment exists at the provider, canceled (left by a create
    whose key was re-derived, then canceled by someone). Reconcile searches while the
    charge job stores and confirms its own intent; search, lagging, shows only the stray.
    The stray must not settle the payment (it would end `canceled` with the money taken)."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    running = await charge.claim(created["id"])
    assert running is not None
    stray = httpx.post(
        f"{provider_base}/v1/payment_intents",
        data={
            "amount": 2000,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "payment_method_types[0]": "card",
            "metadata[payment_id]": created["id"],
            "metadata[agent_id]": running["agent_id"],
        },
        headers={**SK, "Idempotency-Key": "a-key-re-derived-since"},
    ).json()
    httpx.post(f"{provider_base}/v1/payment_intents/{stray['id']}/cancel", headers=SK)
    stray_intent = await provider.retrieve_intent(stray["id"])
    charged: list[provider.Intent] = []

    async def search_lagging(payment_id: str) -> provider.Intent:
        got = await charge.call_provider(running)  # meanwhile: stored and confirmed
        assert got is not None
        charged.append(got)
        return stray_intent

    monkeypatch.setattr(reconcile, "search_intent", search_lagging)
    assert await reconcile.reconcile_payment(created["id"]) is None
    monkeypatch.undo()
    await charge.finish(created["id"], charged[0])
    await drain(pool)

    payment = await fetch(api, agent_key, created["id"])
    assert (payment["status"], payment["provider_payment_id"]) == ("reconciled", charged[0].id)
    statuses = {i["id"]: i["status"] for i in intents_of(provider_base, created["id"])}
    assert statuses == {charged[0].id: "succeeded", stray["id"]: "canceled"}
