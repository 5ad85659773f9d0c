"""Refund and dispute events no webhook delivered are taken in from the provider's list."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tasks import catchup, provider
from tasks.db import Conn, Pool
from tasks.settings import Settings
from tests.conftest import auth, failed_last_hour, run_jobs
from tests.test_capture_refund import SK, reconciled, refund_at_provider
from tests.test_pipeline import create, fetch
from workers.maintenance import Maintenance


def now_is(monkeypatch: pytest.MonkeyPatch, at: Callable[[int], int]) -> None:
    """The catch-up runs when `at(the database's now)` says."""
    database_now = catchup._now

    async def now(conn: Conn) -> int:
        return at(await database_now(conn))

    monkeypatch.setattr(catchup, "_now", now)


@pytest.fixture
def a_minute_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catch-up runs more than a minute after the events it takes in were made (it
    leaves younger ones to their webhooks)."""
    now_is(monkeypatch, lambda now: now + catchup.IN_FLIGHT_SECONDS + 1)


async def catch_up_jobs(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = %s", (catchup.TASK,)
        )
        return int((await cur.fetchone())["n"])


async def test_a_dashboard_refund_whose_event_never_came_is_taken_in(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, a_minute_later: None
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

    async def refused(*args: Any) -> list[dict[str, Any]]:
        raise provider.ProviderError("the key may not read events")

    monkeypatch.setattr(provider, "list_events", refused)
    maintenance = Maintenance(app, pool, settings)

    async def due() -> None:
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE provider_event_cursor SET asked_at = now() - interval '1 hour'"
            )

    await due()
    assert await maintenance.run_once()
    await run_jobs(pool)
    assert await failed_last_hour(pool, "reconcile") == 1
    for _ in range(3):  # not again before the interval has passed
        assert await maintenance.run_once()
        assert await catch_up_jobs(pool) == 1
    monkeypatch.undo()
    await due()
    assert await maintenance.run_once()
    await run_jobs(pool)
    assert await catch_up_jobs(pool) == 2
    assert await failed_last_hour(pool, "reconcile") == 0


async def test_an_event_whose_webhook_is_on_its_way_is_left_to_it(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing went up to the moment it ran: an event made seconds before, whose webhook
    was on its way, was stored by the catch-up first and logged as never delivered. It now
    lists events a minute old and more, and its cursor stops at that bound, so the next
    listing looks at the younger ones again."""

    async def stored(event_id: str) -> bool:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT 1 FROM webhook_events WHERE id = %s", (event_id,))
            return await cur.fetchone() is not None

    payment = await reconciled(api, agent_key, pool)
    refund_at_provider(provider_base, payment["provider_payment_id"], 700)
    event = next(
        e
        for e in httpx.get(
            f"{provider_base}/v1/events", params={"type": "charge.refunded"}, headers=SK
        ).json()["data"]
        if e["data"]["object"]["payment_intent"] == payment["provider_payment_id"]
    )
    async with pool.connection() as conn:
        now = await catchup._now(conn)
    now_is(monkeypatch, lambda _: now)
    async with pool.connection() as conn:  # last listed a while ago
        await conn.execute("UPDATE provider_event_cursor SET created_through = %s", (now - 300,))
    await catchup.catch_up_events.func()
    assert not await stored(event["id"])  # left to its webhook
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT created_through FROM provider_event_cursor")
        assert (await cur.fetchone())["created_through"] == now - catchup.IN_FLIGHT_SECONDS
    # The webhook did not come after all: the next listing, a minute later, takes it in.
    now_is(monkeypatch, lambda _: now + catchup.IN_FLIGHT_SECONDS + 1)
    assert await catchup.catch_up_events.func() >= 1
    assert await stored(event["id"])
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["amount_refunded"] == 700


async def cursor_and_now(pool: Pool) -> tuple[int, int]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT created_through, floor(extract(epoch FROM now()))::bigint AS now
                 FROM provider_event_cursor"""
        )
        row = await cur.fetchone()
    return int(row["created_through"]), int(row["now"])


async def test_a_worker_whose_clock_runs_fast_does_not_hide_later_events(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
    clock_off: Callable[[float], Awaitable[None]],
) -> None:
    """The listing's bound was the worker's clock less a minute, and the cursor kept the
    latest bound: a worker an hour fast put it an hour ahead, and every listing after it, by
    workers whose clocks were right, started there and saw nothing — a refund made in the
    Dashboard meanwhile, its webhook lost, was never taken in. The bound is the database's
    now less a minute, and the cursor is never stored past it."""
    import sandbox.state

    payment = await reconciled(api, agent_key, pool)
    await clock_off(3600)
    assert await catchup.catch_up_events.func() == 0
    cursor, now = await cursor_and_now(pool)
    assert cursor <= now - catchup.IN_FLIGHT_SECONDS
    # Made at the provider two minutes ago (the next listing is past its minute in flight).
    monkeypatch.setattr(sandbox.state, "now", lambda: int(time.time()) - 120)
    refund_at_provider(provider_base, payment["provider_payment_id"], 700)
    monkeypatch.undo()  # a worker whose clock is right, on the database's time
    assert await catchup.catch_up_events.func() >= 1
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["amount_refunded"] == 700


async def test_a_worker_a_minute_fast_leaves_events_in_flight_to_their_webhooks(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    clock_off: Callable[[float], Awaitable[None]],
) -> None:
    """A worker a minute fast listed events made a moment ago, whose webhooks were on their
    way, and counted them as never delivered (the "losing events" alert fired)."""
    payment = await reconciled(api, agent_key, pool)
    refund_at_provider(provider_base, payment["provider_payment_id"], 700)
    await clock_off(catchup.IN_FLIGHT_SECONDS + 5)
    before = sum(missed_total(t) for t in catchup.TYPES)
    assert await catchup.catch_up_events.func() == 0
    assert sum(missed_total(t) for t in catchup.TYPES) == before


async def test_a_cursor_left_in_the_future_is_brought_back(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, a_minute_later: None
) -> None:
    """A cursor stored ahead of the database's clock (by a worker of an earlier release
    whose clock ran fast) is listed from as if it were now less a minute, and stored back
    there: the gauge of how far behind the listing is does not stay negative."""
    payment = await reconciled(api, agent_key, pool)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE provider_event_cursor"
            " SET created_through = extract(epoch FROM now())::bigint + 3600"
        )
    refund_at_provider(provider_base, payment["provider_payment_id"], 700)
    assert await catchup.catch_up_events.func() >= 1
    cursor, now = await cursor_and_now(pool)
    assert cursor <= now - catchup.IN_FLIGHT_SECONDS


def missed_total(event_type: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("agentpay_provider_events_missed_total", {"type": event_type})
    return float(value or 0.0)


async def test_events_no_webhook_delivered_are_counted_where_the_worker_serves_its_metrics(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, a_minute_later: None
) -> None:
    """An event no webhook delivered was told by one log line only: counted as a delivered
    one in agentpay_webhook_events_total, no alert could see the endpoint losing events.
    Each one the catch-up takes in counts in agentpay_provider_events_missed_total{type},
    served by the worker with its other per-process metrics; a delivered one does not."""
    from prometheus_client import start_http_server

    import workers.worker  # noqa: F401  (the worker's process: what it serves)

    payment = await reconciled(api, agent_key, pool)
    before = {t: missed_total(t) for t in catchup.TYPES}
    refund_at_provider(provider_base, payment["provider_payment_id"], 700)
    missed = await catchup.catch_up_events.func()
    grown = {t: missed_total(t) - n for t, n in before.items() if missed_total(t) != n}
    assert missed >= 1 and sum(grown.values()) == missed
    assert grown.get("charge.refunded", 0) >= 1
    assert await catchup.catch_up_events.func() == 0  # delivered (stored) now: not again
    assert sum(missed_total(t) - n for t, n in before.items()) == missed

    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        scraped = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    line = 'agentpay_provider_events_missed_total{type="charge.refunded"} '
    assert line + str(missed_total("charge.refunded")) in scraped
    assert 'agentpay_provider_events_missed_total{type="charge.dispute.created"}' in scraped


async def test_a_catch_up_a_month_behind_says_events_may_be_lost(
    pool: Pool,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The provider lists 30 days of events. A catch-up off, or failing, for a month listed
    from its old cursor, got what the provider still had, moved its cursor on, and said
    nothing: events of the gap no webhook delivered were lost unseen. The API's gauge shows
    how far behind the listing is (an alert sees it long before a month), and a listing
    that starts beyond the provider's 30 days logs an error and counts a gap."""
    import logging

    from prometheus_client import REGISTRY

    from api.metrics import read_snapshot, render

    def gaps() -> float:
        return float(REGISTRY.get_sample_value("agentpay_provider_event_gaps_total") or 0.0)

    async def behind() -> float:
        async with pool.connection() as conn:
            snapshot = await read_snapshot(conn, settings)
        scraped = render(snapshot, settings).decode()
        [line] = [
            x
            for x in scraped.splitlines()
            if x.startswith("agentpay_event_catch_up_behind_seconds ")
        ]
        return float(line.split()[1])

    async def listed(*args: Any) -> list[dict[str, Any]]:
        return []

    monkeypatch.setattr(provider, "list_events", listed)
    assert await behind() < 600  # the cursor starts with the database
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE provider_event_cursor"
            " SET created_through = extract(epoch FROM now())::bigint - 31 * 86400"
        )
    assert await behind() > 31 * 86400 - 600
    before = gaps()
    with caplog.at_level(logging.ERROR, logger="agentpay.catchup"):
        await catchup.catch_up_events.func()
    assert gaps() == before + 1
    assert any(r.levelno == logging.ERROR and "30 days" in r.getMessage() for r in caplog.records)
    assert await behind() < 600  # listed up to a minute ago
    caplog.clear()
    await catchup.catch_up_events.func()  # within the provider's 30 days: no gap
    assert gaps() == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_chargeback_whose_events_never_came_is_taken_in_and_booked_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, a_minute_later: None
) -> None:
    """A payment the provider disputed and the dispute accepted there (`/close`: lost),
    with no webhook endpoint at all: agentpay knew nothing of it, the loss stayed in
    provider clearing. The catch-up takes in the dispute's three events as if delivered —
    recorded in the payment's events, the loss booked once —, and a second run nothing."""
    from tests.test_webhooks import (
        _books,
        _dispute_lost_bookings,
        dispute_events,
        provider_disputes,
    )

    created = await create(api, agent_key, payment_method="pm_card_createDispute")
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    [dispute] = provider_disputes(provider_base, payment["provider_payment_id"])
    httpx.post(
        f"{provider_base}/v1/disputes/{dispute['id']}/close",
        headers={"Authorization": "Bearer sk_test_x"},
    ).raise_for_status()
    await run_jobs(pool)
    assert await dispute_events(api, agent_key, payment["id"]) == []  # no webhook came

    assert await catchup.catch_up_events.func() == 3
    await run_jobs(pool)
    events = await dispute_events(api, agent_key, payment["id"])
    assert [e["reason"] for e in events] == [
        "charge.dispute.created: needs_response (fraudulent)",
        "charge.dispute.funds_withdrawn: needs_response (fraudulent)",
        "charge.dispute.closed: lost (fraudulent)",
    ]
    total = payment["amount_total"]
    assert events[-1]["data"]["booked_loss"] == total
    assert await _dispute_lost_bookings(pool, payment["id"]) == [(dispute["id"], total)]
    books = await _books(pool, payment["id"])
    assert books.get("provider_clearing", 0) + books.get("platform_fees", 0) == 0

    assert await catchup.catch_up_events.func() == 0
    await run_jobs(pool)
    assert len(await dispute_events(api, agent_key, payment["id"])) == 3
    assert await _dispute_lost_bookings(pool, payment["id"]) == [(dispute["id"], total)]


def test_the_documented_webhook_subscription_covers_every_type_the_catch_up_counts() -> None:
    """docs/provider.md tells operators which events to send to the endpoint. The catch-up
    counts each listed event no webhook delivered as missed (an alert): a type it lists
    that the documented subscription leaves out (`charge.refund.updated` was) fired that
    alert on an endpoint set up exactly as the docs say."""
    import fnmatch
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "provider.md").read_text()
    sentence = re.search(r"Point a webhook endpoint at .*? events", text, re.S)
    assert sentence is not None
    subscribed = re.findall(r"`([a-z_.*]+)`", sentence.group(0))
    assert "payment_intent.*" in subscribed
    left_out = [t for t in catchup.TYPES if not any(fnmatch.fnmatch(t, p) for p in subscribed)]
    assert left_out == []
