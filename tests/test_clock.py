"""A worker whose clock is off: every time Postgres compares with its own `now()` (a job's
`scheduled_at`, a retry's time) or keeps beside its own (a decision's `decided_at`, when a
capture or cancel was asked for) is taken from the database's clock, never the worker's."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from tasks import provider
from tasks.app import Backoff, TransientError, defer
from tasks.db import Pool
from tests.conftest import Killed, auth, run_jobs
from tests.test_capture_refund import authorized
from tests.test_pipeline import create, fetch

ClockOff = Callable[[float], Awaitable[None]]


async def database_now(pool: Pool) -> datetime:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT clock_timestamp() AS now")
        row = await cur.fetchone()
    assert row is not None
    now: datetime = row["now"]
    return now


async def jobs_of(pool: Pool, task_name: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT args->>'payment_id' AS payment_id, status::text AS status, attempts,
                      scheduled_at
                 FROM procrastinate_jobs WHERE task_name = %s ORDER BY id""",
            (task_name,),
        )
        return await cur.fetchall()


@pytest.mark.parametrize("skew", [-60.0, 600.0], ids=["a-minute-slow", "ten-minutes-fast"])
async def test_a_job_deferred_for_later_is_due_by_the_databases_clock(
    pool: Pool, clock_off: ClockOff, skew: float
) -> None:
    """`defer(schedule_in=…)` (a recheck of a payment waiting on the provider, the refund
    sync, the looks for an orphan intent and for late money) took its time from the worker's
    clock: a minute slow, the job was due a minute early — at once —, ten minutes fast, ten
    minutes late. An unscheduled job stays due at once."""
    await clock_off(skew)
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, "reconcile", schedule_in=30, payment_id="pay_later")
        await defer(conn, "reconcile", payment_id="pay_now")
    now = await database_now(pool)
    jobs = {j["payment_id"]: j["scheduled_at"] for j in await jobs_of(pool, "reconcile")}
    assert jobs["pay_now"] is None
    assert 25 <= (jobs["pay_later"] - now).total_seconds() <= 30


async def test_a_payment_waiting_on_the_provider_is_not_looked_at_in_a_busy_loop(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    monkeypatch: pytest.MonkeyPatch,
    clock_off: ClockOff,
) -> None:
    """The provider says `processing`: the payment is looked at again
    `provider_recheck_seconds` (5) later. A worker a minute slow scheduled each look 55 s in
    the past, and the payment was retrieved from the provider over and over."""
    await clock_off(-60)
    real_confirm, real_retrieve = provider.confirm_intent, provider.retrieve_intent
    retrieves: list[str] = []

    async def confirm(payment_id: str, intent_id: str) -> provider.Intent:
        return dataclasses.replace(await real_confirm(payment_id, intent_id), status="processing")

    async def retrieve(intent_id: str) -> provider.Intent:
        retrieves.append(intent_id)
        if len(retrieves) > 5:
            raise Killed("looked at in a busy loop")  # (the worker would go on for ever)
        return dataclasses.replace(await real_retrieve(intent_id), status="processing")

    monkeypatch.setattr(provider, "confirm_intent", confirm)
    monkeypatch.setattr(provider, "retrieve_intent", retrieve)
    created = await create(api, agent_key)
    await run_jobs(pool)  # until nothing is due: the look is 5 s away
    assert (await fetch(api, agent_key, created["id"]))["status"] == "charging"
    assert len(retrieves) <= 1
    [look] = [j for j in await jobs_of(pool, "reconcile") if j["status"] == "todo"]
    assert (look["scheduled_at"] - await database_now(pool)).total_seconds() > 1


async def test_a_retry_waits_its_backoff_by_the_databases_clock(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    monkeypatch: pytest.MonkeyPatch,
    clock_off: ClockOff,
) -> None:
    """Backoff's `retry_at` was the worker's clock plus the delay: a minute slow, every retry
    was due at once, and the job's ten attempts were burnt in under a second, failing it for
    good through an outage of a few seconds."""
    from tasks import risk

    await clock_off(-60)
    monkeypatch.setattr(Backoff, "delay", lambda self, attempts: 30.0)

    async def down(*args: Any, **kwargs: Any) -> None:
        raise TransientError("the database of the budgets is away")

    monkeypatch.setattr(risk, "advance", down)
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing",))
    await run_jobs(pool, ("risk",))  # until nothing is due: the retry is 30 s away
    [job] = await jobs_of(pool, "risk")
    assert (job["payment_id"], job["status"], job["attempts"]) == (created["id"], "todo", 1)
    assert 25 <= (job["scheduled_at"] - await database_now(pool)).total_seconds() <= 30


async def test_a_rescued_job_is_due_at_once_by_the_databases_clock(
    pool: Pool, clock_off: ClockOff
) -> None:
    """The stalled-job rescue put a job back with the maintenance worker's time: ten minutes
    fast, the rescued job waited ten minutes."""
    from tasks.app import app
    from workers.maintenance import rescue_stalled_jobs

    await clock_off(600)
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, "pricing", payment_id="pay_stalled")
    async with pool.connection() as conn:  # its worker died while it ran
        await conn.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL")
    assert len(await rescue_stalled_jobs(app, stalled_after=60)) == 1
    [job] = await jobs_of(pool, "pricing")
    assert job["status"] == "todo"
    assert job["scheduled_at"] <= await database_now(pool)


async def _decisions(pool: Pool, payment_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT risk_decision, updated_at FROM payment_jobs WHERE id = %s", (payment_id,)
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def test_risk_decisions_are_dated_by_the_databases_clock(
    api: httpx.AsyncClient,
    agent_key: str,
    operator_key: str,
    pool: Pool,
    clock_off: ClockOff,
) -> None:
    """A risk decision's `decided_at`, and an operator's review's, were the worker's (the
    API's) clock, an hour off the payment's own times beside them."""
    await clock_off(3600)
    created = await create(api, agent_key, amount=150_000)  # over the review threshold
    await run_jobs(pool, ("pricing", "risk"))
    row = await _decisions(pool, created["id"])
    assert row["risk_decision"]["decision"] == "in_review"
    decided = datetime.fromisoformat(row["risk_decision"]["decided_at"])
    assert abs((decided - row["updated_at"]).total_seconds()) < 5

    approved = await api.post(f"/v1/review/{created['id']}/approve", headers=auth(operator_key))
    assert approved.status_code == 200, approved.text
    row = await _decisions(pool, created["id"])
    decided = datetime.fromisoformat(row["risk_decision"]["review"]["decided_at"])
    assert abs((decided - row["updated_at"]).total_seconds()) < 5


async def test_capture_and_cancel_requests_are_dated_by_the_databases_clock(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, clock_off: ClockOff
) -> None:
    """When a capture or a cancel was asked for was stored from the API's clock, an hour off
    the payment's own times beside it."""
    payment = await authorized(api, agent_key, pool)
    fresh = await create(api, agent_key)  # not yet at the provider: canceled at once
    await clock_off(3600)
    captured = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
    assert captured.status_code == 202, captured.text
    canceled = await api.post(f"/v1/payments/{fresh['id']}/cancel", headers=auth(agent_key))
    assert canceled.status_code in (200, 202), canceled.text
    now = await database_now(pool)
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT id, coalesce(capture_requested_at, cancel_requested_at) AS asked_at
                 FROM payment_jobs WHERE id = ANY(%s)""",
            ([payment["id"], fresh["id"]],),
        )
        asked = {r["id"]: r["asked_at"] for r in await cur.fetchall()}
    for payment_id in (payment["id"], fresh["id"]):
        assert abs((asked[payment_id] - now).total_seconds()) < 5, payment_id
