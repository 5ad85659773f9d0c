"""Refund and dispute events no webhook delivered are taken in from the provider's list."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tasks import catchup, provider
from tasks.db import Pool
from tasks.settings import Settings
from tests.conftest import auth, run_jobs
from tests.test_capture_refund import reconciled, refund_at_provider
from tests.test_pipeline import fetch
from workers.maintenance import Maintenance


async def catch_up_jobs(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = %s", (catchup.TASK,)
        )
        return int((await cur.fetchone())["n"])


async def test_a_dashboard_refund_whose_event_never_came_is_taken_in(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A refund made in the Dashboard is known to agentpay only by its webhook: with the
    endpoint down past the provider's retries, it was never counted — the agent's budget
    never got the money back, and agentpay offered to refund what the customer had got
    back already. The catch-up lists the provider's refund events and takes in the ones
    never stored, as if delivered; a second run finds nothing new."""
    payment = await reconciled(api, agent_key, pool)
    refund_at_provider(provider_base, payment["provider_payment_id"], 700)
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["amount_refunded"] == 0  # no webhook

    assert await catchup.catch_up_events.func() >= 1
    await run_jobs(pool)
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 700)
    refunds = (
        await api.get(f"/v1/payments/{payment['id']}/refunds", headers=auth(agent_key))
    ).json()["data"]
    assert [(r["amount"], r["status"]) for r in refunds] == [(700, "succeeded")]
    assert await catchup.catch_up_events.func() == 0
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["amount_refunded"] == 700


async def test_maintenance_defers_the_catch_up_once_it_is_due_and_once(
    pool: Pool, settings: Settings
) -> None:
    from tasks.app import app

    s = settings.model_copy(update={"event_catch_up_interval_seconds": 300.0})
    maintenance = Maintenance(app, pool, s)
    # Listed a moment ago (the migration starts the cursor at its own time): not due.
    assert await maintenance.run_once()
    assert await catch_up_jobs(pool) == 0
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE provider_event_cursor SET asked_at = now() - interval '301 seconds'"
        )
    for _ in range(2):  # the second round finds it waiting
        assert await maintenance.run_once()
        assert await catch_up_jobs(pool) == 1
    off = Maintenance(app, pool, s.model_copy(update={"event_catch_up_interval_seconds": 0.0}))
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM procrastinate_jobs WHERE task_name = %s", (catchup.TASK,))
    assert await off.run_once()
    assert await catch_up_jobs(pool) == 0


async def test_a_failing_listing_is_tried_once_an_interval_and_clears_once_it_works(
    pool: Pool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that fails for good (a key without the permission to read events) was
    deferred again every maintenance round (5 s), and its failures never stopped counting in
    the failed-job alert, which matched a later success by a payment id it has not."""
    from tasks.app import app

    async def refused(types: list[str], created_gte: int) -> list[dict[str, Any]]:
        raise provider.ProviderError("the key may not read events")

    monkeypatch.setattr(provider, "list_events", refused)
    maintenance = Maintenance(app, pool, settings)

    async def failed_last_hour() -> int:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT failed_last_hour FROM ops_queue_depth WHERE role = 'reconcile'"
            )
            return int((await cur.fetchone())["failed_last_hour"])

    async def due() -> None:
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE provider_event_cursor SET asked_at = now() - interval '1 hour'"
            )

    await due()
    assert await maintenance.run_once()
    await run_jobs(pool)
    assert await failed_last_hour() == 1
    for _ in range(3):  # not again before the interval has passed
        assert await maintenance.run_once()
        assert await catch_up_jobs(pool) == 1
    monkeypatch.undo()
    await due()
    assert await maintenance.run_once()
    await run_jobs(pool)
    assert await catch_up_jobs(pool) == 2
    assert await failed_last_hour() == 0
