"""Guards no other test pinned: limits at their exact edges, the database's own checks, the
sweeps' choices of what to re-drive or expire, reconcile's and the late-money look's checks
of whose intent they read, dispute outcomes that are not losses, idempotency keys reused on
another payment. Each test fails if its guard is removed or moved by one (a mutation review
found each of them unguarded)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest

from api.models import TRANSITIONS
from tasks import agents, charge, ledger, payments, pricing, provider, reconcile, refunds, risk
from tasks.app import defer
from tasks.db import Pool
from tasks.settings import Settings
from tests.conftest import auth, run_jobs
from tests.test_capture_refund import intent
from tests.test_pipeline import create, fetch
from tests.test_webhooks import EVENT, post_event
from workers.maintenance import (
    expire_abandoned_authentications,
    sweep_stuck_payments,
    sweep_stuck_requests,
)


async def test_a_total_equal_to_the_hard_limit_is_not_rejected(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    configure(risk_reject_above='{"default": 1000}', risk_review_above='{"default": 5000}')
    at = await create(api, agent_key, amount=1000)
    over = await create(api, agent_key, amount=1001)
    await run_jobs(pool, ("pricing", "risk"))
    assert (await fetch(api, agent_key, at["id"]))["status"] == "approved"
    rejected = await fetch(api, agent_key, over["id"])
    assert (rejected["status"], rejected["failure"]["code"]) == ("rejected", "amount_over_limit")


def test_a_total_equal_to_the_providers_minimum_is_accepted() -> None:
    settings = Settings(min_charge_amount={"usd": 50})
    assert pricing.breakdown([], "usd", settings, requested=50)["amount_total"] == 50
    with pytest.raises(pricing.PricingError):
        pricing.breakdown([], "usd", settings, requested=49)


async def test_velocity_amount_counts_only_the_payments_currency(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    configure(risk_velocity_max_count="100", risk_velocity_max_amount='{"default": 5000}')
    usd = await create(api, agent_key, amount=4000, currency="usd")
    await run_jobs(pool, ("pricing", "risk"))
    eur = await create(api, agent_key, amount=4000, currency="eur")
    await run_jobs(pool, ("pricing", "risk"))
    assert (await fetch(api, agent_key, usd["id"]))["status"] == "approved"
    assert (await fetch(api, agent_key, eur["id"]))["status"] == "approved"


async def test_concurrent_risk_steps_of_one_agent_cannot_both_pass_velocity(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    """The agent's row is locked by each risk step: a second step of the same agent waits
    for the first to commit, then counts it."""
    configure(risk_velocity_max_count="1")
    first = await create(api, agent_key, amount=1000)
    second = await create(api, agent_key, amount=1000)
    await run_jobs(pool, ("pricing",))

    async def other() -> str | None:
        async with pool.connection() as two, two.transaction():
            return await risk.advance(two, second["id"])

    async with pool.connection() as one:
        async with one.transaction():
            assert await risk.advance(one, first["id"]) == "approved"
            racing = asyncio.ensure_future(other())
            # The other step runs while this one is uncommitted: it must wait for it.
            done, _ = await asyncio.wait({racing}, timeout=1.0)
            assert not done
        decided = await asyncio.wait_for(racing, 30)
    assert decided == "rejected"


async def test_velocity_counts_a_later_payment_that_risk_decided_first(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    configure(risk_velocity_max_count="1", risk_velocity_window_seconds="60")
    earlier = await create(api, agent_key, amount=1000)
    later = await create(api, agent_key, amount=1000)
    await run_jobs(pool, ("pricing",))
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, later["id"]) == "approved"
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, earlier["id"]) == "rejected"


async def test_a_payment_of_an_agent_revoked_before_risk_is_rejected(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing",))
    async with pool.connection() as conn, conn.transaction():
        assert await agents.revoke(conn, "agent-a")
    await run_jobs(pool)
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
    assert payment is not None
    assert (payment["status"], payment["failure_code"]) == ("rejected", "agent_blocked")


async def test_a_won_dispute_books_no_loss_and_leaves_refunds_possible(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    dispute = {
        "id": "dp_test_won",
        "object": "dispute",
        "amount": payment["amount_total"],
        "currency": payment["currency"],
        "payment_intent": payment["provider_payment_id"],
        "reason": "fraudulent",
        "status": "won",
    }
    event = {
        **EVENT,
        "id": "evt_test_won",
        "type": "charge.dispute.closed",
        "data": {"object": dispute},
    }
    assert (await post_event(api, event)).status_code == 200
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM ledger_transactions WHERE kind = 'dispute_lost'"
        )
        row = await cur.fetchone()
    assert row is not None and row["n"] == 0
    refund = await api.post(
        f"/v1/payments/{created['id']}/refunds", json={}, headers=auth(agent_key)
    )
    assert refund.status_code == 202, refund.text


async def test_a_key_reused_on_another_payments_cancel_is_refused_not_replayed(
    api: httpx.AsyncClient, agent_key: str
) -> None:
    """The same key and the same (empty) body on another payment's cancel: the request's
    path is part of what the key stands for. Replaying the first answer would leave the
    second payment to be charged while its agent believes it canceled."""
    a = await create(api, agent_key)
    b = await create(api, agent_key)
    headers = {**auth(agent_key), "Idempotency-Key": "cancel-1"}
    assert (await api.post(f"/v1/payments/{a['id']}/cancel", headers=headers)).status_code == 202
    other = await api.post(f"/v1/payments/{b['id']}/cancel", headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert (await fetch(api, agent_key, b["id"]))["status"] == "received"


async def test_the_sweep_re_drives_an_approved_payment_whose_charge_job_was_lost(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM procrastinate_jobs WHERE status = 'todo' AND args->>'payment_id' = %s",
            (created["id"],),
        )
    assert await sweep_stuck_payments(pool, older_than=0) == [created["id"]]
    await run_jobs(pool)
    assert (await fetch(api, agent_key, created["id"]))["status"] == "reconciled"


async def test_the_expiry_of_abandoned_authentications_leaves_an_authorized_payment_alone(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key, capture_method="manual")
    await run_jobs(pool)
    assert await expire_abandoned_authentications(pool, older_than=0) == []
    await run_jobs(pool)
    after = await fetch(api, agent_key, created["id"])
    assert (after["status"], after["pending_action"]) == ("authorized", None)


async def test_a_lost_refund_job_is_re_driven_beside_another_refunds_job(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key, amount=2000)
    await run_jobs(pool)
    ids = []
    for amount in (500, 600):
        response = await api.post(
            f"/v1/payments/{created['id']}/refunds",
            json={"amount": amount},
            headers=auth(agent_key),
        )
        ids.append(response.json()["id"])
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM procrastinate_jobs WHERE status = 'todo' AND args->>'refund_id' = %s",
            (ids[1],),
        )
    assert ids[1] in await sweep_stuck_requests(pool, older_than=0)
    await run_jobs(pool)
    assert (await fetch(api, agent_key, created["id"]))["amount_refunded"] == 1100


def test_the_fee_share_of_an_all_fee_capture_is_everything() -> None:
    assert ledger._fee_share(7, [0, 7], "usd") == 7
    assert ledger._fee_share(70, [0, 30], "kwd") == 70


async def test_a_pending_refund_made_at_the_provider_is_not_counted_yet(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(api, agent_key, amount=2000)
    await run_jobs(pool)

    async def listed(intent_id: str) -> list[provider.Refund]:
        return [provider.Refund(id="re_outside_pending", status="pending", amount=300)]

    monkeypatch.setattr(provider, "list_refunds", listed)
    assert await refunds.sync_refunds(created["id"]) == 0
    payment = await fetch(api, agent_key, created["id"])
    assert (payment["status"], payment["amount_refunded"]) == ("reconciled", 0)


async def test_reconcile_records_an_intent_that_did_not_succeed(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    real = provider.retrieve_intent

    async def processing(intent_id: str) -> Any:
        return replace(await real(intent_id), status="processing")

    monkeypatch.setattr(provider, "retrieve_intent", processing)
    await reconcile.reconcile_payment(created["id"])
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT field, actual FROM reconcile_mismatches WHERE payment_id = %s",
            (created["id"],),
        )
        rows = await cur.fetchall()
    assert ("status", "processing") in [(r["field"], r["actual"]) for r in rows]


async def test_a_late_money_look_leaves_another_payments_authorization_alone(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    failed = await create(api, agent_key, payment_method="pm_card_chargeDeclined")
    held = await create(api, agent_key, capture_method="manual")
    await run_jobs(pool)
    other = await fetch(api, agent_key, held["id"])
    assert await reconcile.check_late_money(failed["id"], other["provider_payment_id"]) is None
    assert intent(provider_base, other["provider_payment_id"])["status"] == "requires_capture"


async def test_reconcile_leaves_a_payment_whose_intent_was_stored_while_it_looked(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    claimed = await charge.claim(created["id"])
    mine = await provider.create_intent(claimed)

    async def search(payment_id: str) -> Any:
        async with pool.connection() as conn:
            await payments.store_provider_id(conn, payment_id, mine.id)
        return replace(mine, id="pi_someone_elses", status="succeeded", amount_received=mine.amount)

    monkeypatch.setattr(reconcile, "search_intent", search)
    assert await reconcile.reconcile_payment(created["id"]) is None
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
    assert payment is not None
    assert (payment["status"], payment["provider_payment_id"]) == ("charging", mine.id)


async def test_the_database_allows_exactly_the_documented_transitions(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT status FROM payment_states")
        states = [r["status"] for r in await cur.fetchall()]
    created = await create(api, agent_key)
    allowed = set()
    for old in states:
        for new in states:
            if old == new:
                continue
            async with pool.connection() as conn:
                await conn.execute("BEGIN")
                # Put it in `old` as a restore would (no trigger), then move it for real.
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(
                    "UPDATE payment_jobs SET status = %s WHERE id = %s", (old, created["id"])
                )
                await conn.execute("SET LOCAL session_replication_role = origin")
                try:
                    await conn.execute(
                        "UPDATE payment_jobs SET status = %s WHERE id = %s", (new, created["id"])
                    )
                    allowed.add((old, new))
                except psycopg.errors.CheckViolation as error:
                    if "illegal payment transition" not in str(error):
                        allowed.add((old, new))  # refused for another reason: not the machine
                await conn.execute("ROLLBACK")
    assert allowed == TRANSITIONS  # the documented machine (OpenAPI's copy)


async def test_the_database_refuses_a_negative_holds_balance(pool: Pool) -> None:
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "holder")
        holds = await ledger.account(conn, ledger.AGENT_HOLDS, "usd", agent.id)
        funding = await ledger.account(conn, ledger.EXTERNAL_FUNDING, "usd")
    with pytest.raises(psycopg.errors.CheckViolation, match="agent_not_negative"):
        async with pool.connection() as conn, conn.transaction():
            await ledger.post(conn, "release", [(holds, "usd", -1), (funding, "usd", 1)], actor="t")


async def test_the_database_refuses_refunded_beyond_captured(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key, amount=2000)
    await run_jobs(pool)
    with pytest.raises(psycopg.errors.CheckViolation, match="refunded_within_captured"):
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE payment_jobs SET amount_captured = 1000, amount_refunded = 1500"
                " WHERE id = %s",
                (created["id"],),
            )


async def test_an_event_during_a_running_reconcile_still_defers_one(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """A reconcile job already running read the provider before this event's news: only a
    queued one would see it, so a running one does not stand in for it."""
    created = await create(api, agent_key, capture_method="manual")
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, "reconcile", payment_id=created["id"])
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE procrastinate_jobs SET status = 'doing'"
            " WHERE task_name = 'reconcile' AND status = 'todo'"
        )
    event = {
        **EVENT,
        "id": "evt_during_reconcile",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": payment["provider_payment_id"],
                "object": "payment_intent",
                "metadata": {"payment_id": created["id"]},
            }
        },
    }
    assert (await post_event(api, event)).json()["reconcile"] is True
