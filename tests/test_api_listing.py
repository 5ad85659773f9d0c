"""Listing with filters and cursors; long-polling woken by LISTEN/NOTIFY; rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, get_args

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql

from api.app import create_app
from api.models import (
    PASSED_THROUGH,
    SETTLED_STATES,
    TRANSITIONS,
    PaymentStatus,
    wait_is_over,
)
from tasks import agents, payments
from tasks.db import Pool, open_pool
from tasks.settings import Settings
from tests.conftest import async_wait_for, auth, in_process_api, run_jobs

BODY = {"amount": 1200, "currency": "usd", "payment_method": "pm_card_visa"}


@pytest.fixture
async def app_and_client(
    settings: Settings, pool: Pool
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The API in-process with a long recheck, so only a notification wakes a waiter early."""
    long_recheck = settings.model_copy(update={"long_poll_recheck_seconds": 60.0})
    async with in_process_api(long_recheck, pool) as (app, client):
        yield app, client
    hub = getattr(app.state, "status_hub", None)
    if hub is not None:
        await hub.close()


async def create_many(api: httpx.AsyncClient, key: str, n: int) -> list[dict[str, Any]]:
    created = []
    for i in range(n):
        response = await api.post(
            "/v1/payments", json={**BODY, "amount": 1000 + i}, headers=auth(key)
        )
        assert response.status_code == 202
        created.append(response.json())
    return created


async def test_list_pages_newest_first_with_cursors(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    async with pool.connection() as conn, conn.transaction():
        _, other = await agents.create(conn, "agent-b")
    mine = [p["id"] for p in await create_many(api, agent_key, 5)][::-1]  # newest first
    await create_many(api, other, 2)

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["starting_after"] = after
        page = (await api.get("/v1/payments", params=params, headers=auth(agent_key))).json()
        assert page["object"] == "list" and page["url"] == "/v1/payments"
        seen += [p["id"] for p in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == mine and pages == 3

    back = await api.get(
        "/v1/payments",
        params={"limit": 2, "ending_before": mine[3]},
        headers=auth(agent_key),
    )
    assert [p["id"] for p in back.json()["data"]] == mine[1:3]
    assert back.json()["has_more"] is True


async def test_list_filters_by_status_and_creation_time(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create_many(api, agent_key, 4)
    async with pool.connection() as conn, conn.transaction():
        payment = await payments.lock(conn, created[1]["id"])
        assert payment is not None
        await payments.transition(conn, payment, "canceled", actor="test")
        # created_at never changes, except here: back-date one payment, triggers off.
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE payment_jobs SET created_at = created_at - interval '2 days' WHERE id = %s",
            (created[0]["id"],),
        )

    async def ids(**params: Any) -> list[str]:
        response = await api.get("/v1/payments", params=params, headers=auth(agent_key))
        assert response.status_code == 200, response.text
        return [p["id"] for p in response.json()["data"]]

    assert await ids(status="canceled") == [created[1]["id"]]
    assert created[1]["id"] not in await ids(status="received")
    cutoff = (await api.get(f"/v1/payments/{created[2]['id']}", headers=auth(agent_key))).json()
    assert await ids(**{"created[gte]": cutoff["created_at"]}) == [
        created[3]["id"],
        created[2]["id"],
    ]
    assert await ids(**{"created[lt]": cutoff["created_at"]}) == [
        created[1]["id"],
        created[0]["id"],
    ]
    # Unix seconds work too: a day ago excludes the payment moved two days back.
    day_ago = int(time.time() - timedelta(days=1).total_seconds())
    assert created[0]["id"] not in await ids(**{"created[gte]": day_ago})
    bad = await api.get("/v1/payments", params={"status": "lost"}, headers=auth(agent_key))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"
    too_many = await api.get("/v1/payments", params={"limit": 101}, headers=auth(agent_key))
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "limit"


async def test_created_bounds_take_a_date_as_its_midnight_utc_and_refuse_other_numbers(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """`created[gte]=2024-02-28` was refused as if it were a number."""
    before, at, after = await create_many(api, agent_key, 3)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # triggers off
        for payment, when in (
            (before, "2024-02-27T23:59:59.999999Z"),
            (at, "2024-02-28T00:00:00Z"),
            (after, "2024-02-28T00:00:00.000001Z"),
        ):
            await conn.execute(
                "UPDATE payment_jobs SET created_at = %s::timestamptz WHERE id = %s",
                (when, payment["id"]),
            )

    async def ids(**params: Any) -> list[str]:
        response = await api.get("/v1/payments", params=params, headers=auth(agent_key))
        assert response.status_code == 200, response.text
        return [p["id"] for p in response.json()["data"]]

    assert await ids(**{"created[gte]": "2024-02-28"}) == [after["id"], at["id"]]
    assert await ids(**{"created[gt]": "2024-02-28"}) == [after["id"]]
    assert await ids(**{"created[lt]": "2024-02-28"}) == [before["id"]]
    assert await ids(**{"created[lte]": "2024-02-28"}) == [at["id"], before["id"]]
    assert await ids(**{"created[gte]": "2024-02-27", "created[lt]": "2024-02-28"}) == [
        before["id"]
    ]
    for number in ("1e9", "1.5", "+5", "-1.5", ".5", "1709078400.0"):
        response = await api.get(
            "/v1/payments", params={"created[gte]": number}, headers=auth(agent_key)
        )
        assert response.status_code == 400, (number, response.text)
        assert response.json()["error"]["param"] == "created[gte]", number


async def listeners(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT count(*) AS n FROM pg_stat_activity
               WHERE datname = current_database() AND query LIKE 'LISTEN agentpay_payment%%'"""
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def test_waiters_are_woken_by_notify_through_one_listener(
    app_and_client: tuple[FastAPI, httpx.AsyncClient], agent_key: str, pool: Pool
) -> None:
    _, api = app_and_client
    created = await create_many(api, agent_key, 3)

    async def wait(payment_id: str, **params: Any) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await api.get(
            f"/v1/payments/{payment_id}/wait",
            params={"timeout": 30, **params},
            headers=auth(agent_key),
        )
        return response, time.monotonic() - started

    waiters = [asyncio.create_task(wait(p["id"], status=["canceled"])) for p in created]
    await async_wait_for(lambda: _listening(app_and_client[0], 3), timeout=10)
    assert await listeners(pool) == 1
    # Nothing returns before the change (a window for a wrong answer, not synchronisation).
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiters)

    async with pool.connection() as conn, conn.transaction():
        for p in created:
            payment = await payments.lock(conn, p["id"])
            assert payment is not None
            await payments.transition(conn, payment, "canceled", actor="test")

    for response, took in await asyncio.gather(*waiters):
        assert response.status_code == 200
        assert response.json()["status"] == "canceled"
        assert took < 10  # woken by the notification, not by the 30 s timeout or 60 s recheck


async def _listening(app: FastAPI, waiters: int) -> bool:
    hub = getattr(app.state, "status_hub", None)
    return bool(hub is not None and hub.listening.is_set() and hub.waiting == waiters)


async def _wait_task(api: httpx.AsyncClient, key: str, payment_id: str) -> Any:
    return asyncio.create_task(
        api.get(f"/v1/payments/{payment_id}/wait", params={"timeout": 30}, headers=auth(key))
    )


async def test_a_wait_after_a_capture_request_returns_when_the_capture_has_ended(
    app_and_client: tuple[FastAPI, httpx.AsyncClient],
    agent_key: str,
    pool: Pool,
    provider_base: str,
) -> None:
    """After asking for a capture the payment is still `authorized`: the default wait holds
    on while the capture is pending, and the provider refusing it (the request cleared, the
    status unchanged) wakes it — the way an agent learns the capture did not happen."""
    from tests.test_capture_refund import authorized

    app, api = app_and_client
    payment = await authorized(api, agent_key, pool)
    asked = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
    assert asked.status_code == 202 and asked.json()["pending_action"] == "capture"
    waiter = await _wait_task(api, agent_key, payment["id"])
    await async_wait_for(lambda: _listening(app, 1), timeout=10, what="the wait to hold on")
    async with pool.connection() as conn:  # what the charge role does when it is refused
        await conn.execute(
            "UPDATE payment_jobs SET capture_requested_at = NULL WHERE id = %s", (payment["id"],)
        )
    answer = (await asyncio.wait_for(waiter, 10)).json()  # woken, not the 60 s recheck
    assert (answer["status"], answer["pending_action"]) == ("authorized", None)


async def test_a_wait_after_a_refund_request_returns_when_the_refund_has_ended(
    app_and_client: tuple[FastAPI, httpx.AsyncClient],
    agent_key: str,
    pool: Pool,
    provider_base: str,
) -> None:
    """A refund pending: the default wait holds on; the refund failing (nothing else about
    the payment changes) wakes it."""
    from tests.test_capture_refund import reconciled

    app, api = app_and_client
    payment = await reconciled(api, agent_key, pool)
    asked = await api.post(
        f"/v1/payments/{payment['id']}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert asked.status_code == 202, asked.text
    seen = await api.get(f"/v1/payments/{payment['id']}", headers=auth(agent_key))
    assert seen.json()["pending_action"] == "refund"
    waiter = await _wait_task(api, agent_key, payment["id"])
    await async_wait_for(lambda: _listening(app, 1), timeout=10, what="the wait to hold on")
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_refunds SET status = 'failed' WHERE id = %s", (asked.json()["id"],)
        )
    answer = (await asyncio.wait_for(waiter, 10)).json()
    assert (answer["status"], answer["pending_action"]) == ("reconciled", None)


async def test_wait_returns_on_a_settled_state_by_default(
    app_and_client: tuple[FastAPI, httpx.AsyncClient], agent_key: str, pool: Pool
) -> None:
    _, api = app_and_client
    (created,) = await create_many(api, agent_key, 1)
    waiter = asyncio.create_task(
        api.get(
            f"/v1/payments/{created['id']}/wait", params={"timeout": 30}, headers=auth(agent_key)
        )
    )
    await run_jobs(pool)
    response = await asyncio.wait_for(waiter, 15)
    assert response.status_code == 200
    assert response.json()["status"] in SETTLED_STATES
    assert response.json()["status"] in ("succeeded", "reconciled")


async def test_an_agent_holds_a_bounded_number_of_waits_open(
    settings: Settings, pool: Pool, agent_key: str
) -> None:
    async with pool.connection() as conn, conn.transaction():
        _, other_key = await agents.create(conn, "agent-b")
    two_waits = settings.model_copy(update={"long_poll_max_per_agent": 2})
    async with in_process_api(two_waits, pool) as (app, api):
        created = await create_many(api, agent_key, 3)
        (theirs,) = await create_many(api, other_key, 1)
        open_waits = [await _wait_task(api, agent_key, p["id"]) for p in created[:2]]
        await async_wait_for(lambda: _listening(app, 2), timeout=10)

        refused = await api.get(f"/v1/payments/{created[2]['id']}/wait", headers=auth(agent_key))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_waits"
        assert refused.headers["Retry-After"] == "1"
        # Another agent is not held to this one's waits.
        other = await api.get(
            f"/v1/payments/{theirs['id']}/wait", params={"timeout": 0}, headers=auth(other_key)
        )
        assert other.status_code == 200

        # One ends (its payment canceled): room for another.
        async with pool.connection() as conn, conn.transaction():
            payment = await payments.lock(conn, created[0]["id"])
            assert payment is not None
            await payments.transition(conn, payment, "canceled", actor="test")
        assert (await open_waits[0]).status_code == 200
        again = await api.get(
            f"/v1/payments/{created[2]['id']}/wait", params={"timeout": 0}, headers=auth(agent_key)
        )
        assert again.status_code == 200
        open_waits[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await open_waits[1]
    await app.state.status_hub.close()


async def test_wait_times_out_with_the_payment_as_it_is(
    api: httpx.AsyncClient, agent_key: str
) -> None:
    (created,) = await create_many(api, agent_key, 1)
    started = time.monotonic()
    response = await api.get(
        f"/v1/payments/{created['id']}/wait", params={"timeout": 0.3}, headers=auth(agent_key)
    )
    assert 0.3 <= time.monotonic() - started < 5
    assert response.status_code == 200 and response.json()["status"] == "received"
    too_long = await api.get(
        f"/v1/payments/{created['id']}/wait", params={"timeout": 61}, headers=auth(agent_key)
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "timeout"


def test_every_final_state_is_settled() -> None:
    assert payments.FINAL_STATES <= SETTLED_STATES


async def test_the_python_transitions_are_the_databases(pool: Pool) -> None:
    """api/models.py's copy of the state machine is the one Postgres enforces."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT from_status, to_status FROM payment_transitions")
        transitions = {(r["from_status"], r["to_status"]) for r in await cur.fetchall()}
        cur = await conn.execute("SELECT status FROM payment_states")
        states = {r["status"] for r in await cur.fetchall()}
    assert TRANSITIONS == transitions
    assert set(PASSED_THROUGH) == states == set(get_args(PaymentStatus))


def test_a_wait_for_a_state_ends_on_the_states_only_reachable_through_it() -> None:
    """`succeeded` lasts moments (reconcile moves it on): a wait for it ended only if it
    caught those moments, else at its timeout."""
    for status in ("succeeded", "reconciled", "partially_refunded", "refunded"):
        assert wait_is_over(status, None, ["succeeded"]), status
    for status in ("charging", "authorized", "requires_action", "failed", "canceled"):
        assert not wait_is_over(status, None, ["succeeded"]), status
    # A payment can go from charging to succeeded without being authorized.
    assert [s for s in PASSED_THROUGH if wait_is_over(s, None, ["authorized"])] == ["authorized"]
    assert wait_is_over("failed", None, ["charging"])
    assert not wait_is_over("canceled", None, ["approved"])
    assert wait_is_over("refunded", None, ["authorized", "reconciled"])
    assert all(wait_is_over(s, None, ["received"]) for s in PASSED_THROUGH)


async def test_a_wait_for_succeeded_answers_at_once_on_a_reconciled_payment(
    app_and_client: tuple[FastAPI, httpx.AsyncClient], agent_key: str, pool: Pool
) -> None:
    _, api = app_and_client
    (created,) = await create_many(api, agent_key, 1)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # triggers off
        await conn.execute(
            "UPDATE payment_jobs SET status = 'reconciled' WHERE id = %s", (created["id"],)
        )
    started = time.monotonic()
    response = await api.get(
        f"/v1/payments/{created['id']}/wait",
        params={"timeout": 20, "status": "succeeded"},
        headers=auth(agent_key),
    )
    assert response.status_code == 200 and response.json()["status"] == "reconciled"
    assert time.monotonic() - started < 10  # it waited the whole 20 s


@pytest.fixture
def limited(settings: Settings) -> Settings:
    # One token every 10 s: the four requests below are inside one refill on any machine.
    return settings.model_copy(update={"api_rate_limit_per_second": 0.1, "api_rate_limit_burst": 3})


async def test_rate_limits_are_per_agent_and_shared_by_api_processes(
    limited: Settings, pool: Pool, agent_key: str
) -> None:
    async with pool.connection() as conn, conn.transaction():
        _, other = await agents.create(conn, "agent-b")
    clients = []
    for _ in range(2):  # two API "processes" on the same database
        app = create_app(limited)
        app.state.pool = pool
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        clients.append(httpx.AsyncClient(transport=transport, base_url="http://agentpay.test"))
    one, two = clients
    try:
        assert (await one.get("/v1/payments", headers=auth(agent_key))).status_code == 200
        assert (await two.get("/v1/payments", headers=auth(agent_key))).status_code == 200
        created = await one.post("/v1/payments", json=BODY, headers=auth(agent_key))
        assert created.status_code == 202
        refused = await two.post("/v1/payments", json=BODY, headers=auth(agent_key))
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 10
        # The other agent has its own bucket.
        assert (await two.get("/v1/payments", headers=auth(other))).status_code == 200
    finally:
        for client in clients:
            await client.aclose()
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM payment_jobs")
        row = await cur.fetchone()
    assert row is not None and row["n"] == 1


async def test_a_list_takes_several_states_and_refuses_what_it_would_ignore(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """An agent asking for `status=failed&status=canceled`, or misspelling `created[gte]`,
    must not get a page it did not ask for without being told."""
    created = await create_many(api, agent_key, 3)
    async with pool.connection() as conn, conn.transaction():
        for row, to in ((created[0], "canceled"), (created[1], "rejected")):
            payment = await payments.lock(conn, row["id"])
            assert payment is not None
            await payments.transition(conn, payment, to, actor="test")

    async def get(query: str) -> httpx.Response:
        return await api.get(f"/v1/payments?{query}", headers=auth(agent_key))

    both = await get("status=canceled&status=rejected")
    assert both.status_code == 200, both.text
    assert [p["id"] for p in both.json()["data"]] == [created[1]["id"], created[0]["id"]]

    for query, param, code in (
        ("created[ge]=2024-01-01", "created[ge]", "parameter_unknown"),
        ("foo=bar", "foo", "parameter_unknown"),
        ("limit=1&limit=2", "limit", "parameter_invalid"),
        ("starting_after=pay_1&starting_after=pay_2", "starting_after", "parameter_invalid"),
    ):
        response = await get(query)
        assert response.status_code == 400, (query, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param), query
    # Without a key, a key is what is wrong.
    anonymous = await api.get("/v1/payments?foo=bar")
    assert anonymous.status_code == 401, anonymous.text
    # The same on other routes: a wait, the balance.
    wait = await api.get(
        f"/v1/payments/{created[2]['id']}/wait?timeout=1&statuses=canceled", headers=auth(agent_key)
    )
    assert wait.status_code == 400 and wait.json()["error"]["param"] == "statuses", wait.text
    balance = await api.get("/v1/balance?currency=usd", headers=auth(agent_key))
    assert balance.status_code == 400 and balance.json()["error"]["param"] == "currency"


async def test_both_cursors_bound_one_page(api: httpx.AsyncClient, agent_key: str) -> None:
    ids = [p["id"] for p in await create_many(api, agent_key, 5)][::-1]  # newest first
    page = await api.get(
        "/v1/payments",
        params={"starting_after": ids[0], "ending_before": ids[4], "limit": 10},
        headers=auth(agent_key),
    )
    assert page.status_code == 200, page.text
    assert [p["id"] for p in page.json()["data"]] == ids[1:4]


async def test_timestamps_are_utc_whatever_the_database_time_zone(
    database_url: str, settings: Settings, agent_key: str
) -> None:
    """A database (or server) whose TimeZone is not UTC: every connection of ours sets its
    session's to UTC, so the API's timestamps are UTC (they came out as -05:00); the API's
    LISTEN connection shows who holds it, as the pools' connections do."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        name = conn.info.dbname
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET TimeZone = 'America/New_York'").format(
                sql.Identifier(name)
            )
        )
    with psycopg.connect(database_url) as plain:  # the database's own, for any other client
        assert plain.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
    async with open_pool(database_url, min_size=1, max_size=2) as fresh:
        async with in_process_api(settings, fresh) as (app, api):
            created = await api.post("/v1/payments", json=BODY, headers=auth(agent_key))
            assert created.status_code == 202, created.text
            for stamp in ("created_at", "updated_at"):
                assert created.json()[stamp].endswith(("Z", "+00:00")), created.json()[stamp]
            got = await api.get(f"/v1/payments/{created.json()['id']}", headers=auth(agent_key))
            assert got.json()["created_at"] == created.json()["created_at"]

            waiting = asyncio.create_task(
                api.get(
                    f"/v1/payments/{created.json()['id']}/wait",
                    params={"timeout": 3, "status": ["canceled"]},
                    headers=auth(agent_key),
                )
            )
            await async_wait_for(lambda: _listening(app, 1), timeout=10)
            async with fresh.connection() as conn:
                cur = await conn.execute(
                    """SELECT count(*) AS n FROM pg_stat_activity
                        WHERE datname = current_database()
                          AND application_name = 'agentpay-api-listen'"""
                )
                row = await cur.fetchone()
            assert row is not None and row["n"] == 1
            assert (await waiting).status_code == 200
