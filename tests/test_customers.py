"""A provider Customer belongs to one agent: another agent's payment naming it is refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

import schema
from tasks import agents, customers, payments
from tasks.db import Pool
from tasks.settings import Settings
from tests.conftest import PgServer, auth, in_process_api, invoke_cli, migrate_before, run_jobs

BODY = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa"}


async def new_agent(pool: Pool, name: str) -> tuple[str, str]:
    async with pool.connection() as conn, conn.transaction():
        agent, key = await agents.create(conn, name)
    return agent.id, key


async def pay(
    api: httpx.AsyncClient, key: str, customer: str, idempotency_key: str | None = None
) -> httpx.Response:
    headers = auth(key)
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return await api.post("/v1/payments", json={**BODY, "customer": customer}, headers=headers)


async def owner(pool: Pool, customer: str) -> str | None:
    async with pool.connection() as conn:
        return await customers.owner(conn, customer)


async def payment_count(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM payment_jobs) + (SELECT count(*) FROM idempotency_keys)"
            " AS n"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def cli(monkeypatch: pytest.MonkeyPatch, database_url: str, *args: str) -> Any:
    """`agentpay <args>` (its own event loop, so in a thread of its own)."""
    return await asyncio.to_thread(invoke_cli, monkeypatch, list(args), database_url=database_url)


@pytest.fixture
async def first_use_api(settings: Settings, pool: Pool) -> AsyncIterator[httpx.AsyncClient]:
    """The API with AGENTPAY_CUSTOMER_BINDING=first_use."""
    first_use = settings.model_copy(update={"customer_binding": "first_use"})
    async with in_process_api(first_use, pool) as (_, api):
        yield api


def refused_for_customer(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error",
        "customer_not_allowed",
        "customer",
    )


async def test_the_first_agent_to_name_a_customer_gets_it_and_another_is_refused(
    first_use_api: httpx.AsyncClient,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = first_use_api
    alice, alice_key = await new_agent(pool, "alice")
    bob, bob_key = await new_agent(pool, "bob")

    first = await pay(api, alice_key, "cus_Alice1")
    assert first.status_code == 202, first.text
    assert await owner(pool, "cus_Alice1") == alice
    again = await pay(api, alice_key, "cus_Alice1")
    assert again.status_code == 202, again.text

    before = await payment_count(pool)
    refused = await pay(api, bob_key, "cus_Alice1", idempotency_key="bob-1")
    refused_for_customer(refused)
    assert "another agent" in refused.json()["error"]["message"]
    # Nothing recorded: no payment, no job, and the key is not spent on the refusal.
    assert await payment_count(pool) == before
    assert await owner(pool, "cus_Alice1") == alice

    # An operator moves the Customer to bob: bob's same request, same key, goes through.
    result = await cli(
        monkeypatch, database_url, "customers", "bind", "cus_Alice1", "bob", "--operator", "olga"
    )
    assert result.exit_code == 0, result.output
    assert "moved from" in result.output and alice in result.output
    retried = await pay(api, bob_key, "cus_Alice1", idempotency_key="bob-1")
    assert retried.status_code == 202, retried.text
    assert retried.json()["customer"] == "cus_Alice1"
    refused_for_customer(await pay(api, alice_key, "cus_Alice1"))

    listed = await cli(monkeypatch, database_url, "customers", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["customer"], r["agent_id"], r["bound_by"]) for r in rows] == [
        ("cus_Alice1", bob, "operator:olga")
    ]
    # alice's payments named it before it moved: --shared says so.
    shared = await cli(monkeypatch, database_url, "customers", "list", "--shared", "--json")
    assert [(r["customer"], r["agent_id"], r["others"]) for r in json.loads(shared.output)] == [
        ("cus_Alice1", bob, [alice])
    ]

    # Unbound, the next agent to name it gets it.
    result = await cli(
        monkeypatch, database_url, "customers", "unbind", "cus_Alice1", "--operator", "olga"
    )
    assert result.exit_code == 0, result.output
    assert (await pay(api, alice_key, "cus_Alice1")).status_code == 202
    assert await owner(pool, "cus_Alice1") == alice
    missing = await cli(monkeypatch, database_url, "customers", "unbind", "cus_Nobody")
    assert missing.exit_code == 2, missing.output

    # Every change of owner is kept: first use, the move, the unbind, first use again.
    shown = await cli(monkeypatch, database_url, "customers", "show", "cus_Alice1", "--json")
    assert shown.exit_code == 0, shown.output
    history = json.loads(shown.output)
    assert history["agent_id"] == alice
    assert [(c["agent_id"], c["previous_agent_id"], c["actor"]) for c in history["changes"]] == [
        (alice, None, f"agent:{alice}"),
        (bob, alice, "operator:olga"),
        (None, bob, "operator:olga"),
        (alice, None, f"agent:{alice}"),
    ]


async def test_two_agents_naming_a_new_customer_at_once_one_gets_it(
    first_use_api: httpx.AsyncClient, pool: Pool
) -> None:
    api = first_use_api
    keys = {}
    for name in ("alice", "bob", "carol", "dave"):
        agent_id, key = await new_agent(pool, name)
        keys[agent_id] = key
    for round_ in range(5):
        customer = f"cus_Race{round_}"
        answers = await asyncio.gather(*(pay(api, key, customer) for key in keys.values()))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [202, 403, 403, 403], [a.text for a in answers]
        winner = next(a.json()["agent_id"] for a in answers if a.status_code == 202)
        assert await owner(pool, customer) == winner


async def test_a_payment_refused_later_leaves_the_customer_unbound(
    first_use_api: httpx.AsyncClient, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The binding is part of the payment's transaction: if that rolls back, so does it."""
    api = first_use_api
    _, alice_key = await new_agent(pool, "alice")
    bob, bob_key = await new_agent(pool, "bob")

    async def failing_insert(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.errors.LockNotAvailable("lock timeout")

    with monkeypatch.context() as patched:
        patched.setattr(payments, "insert", failing_insert)
        response = await pay(api, alice_key, "cus_Rolled")
    assert response.status_code == 503, response.text
    assert await owner(pool, "cus_Rolled") is None
    assert (await pay(api, bob_key, "cus_Rolled")).status_code == 202
    assert await owner(pool, "cus_Rolled") == bob


async def test_by_default_only_a_customer_an_operator_bound_may_be_named(
    api: httpx.AsyncClient,
    pool: Pool,
    operator_key: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Customers are made outside agentpay: naming one first proves nothing, so by default
    an operator says whose it is."""
    alice, alice_key = await new_agent(pool, "alice")
    _, bob_key = await new_agent(pool, "bob")
    refused = await pay(api, alice_key, "cus_Team7")
    refused_for_customer(refused)
    assert "not bound to this agent" in refused.json()["error"]["message"]
    assert await owner(pool, "cus_Team7") is None

    result = await cli(monkeypatch, database_url, "customers", "bind", "cus_Team7", alice)
    assert result.exit_code == 0, result.output
    assert (await pay(api, alice_key, "cus_Team7")).status_code == 202
    refused_for_customer(await pay(api, bob_key, "cus_Team7"))

    # An operator's own payment may name any Customer, and binds none.
    assert (await pay(api, operator_key, "cus_Team7")).status_code == 202
    assert (await pay(api, operator_key, "cus_Free9")).status_code == 202
    assert await owner(pool, "cus_Free9") is None
    assert await owner(pool, "cus_Team7") == alice

    # The payments named by a bound Customer run as any other.
    await run_jobs(pool)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT DISTINCT status FROM payment_jobs")
        assert [r["status"] for r in await cur.fetchall()] == ["reconciled"]


def test_bind_refuses_what_is_no_customer_or_no_live_agent(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO agents (id, name) VALUES ('agt_alice', 'alice');"
            "INSERT INTO agents (id, name, revoked_at) VALUES ('agt_gone', 'gone', now())"
        )
    result = invoke_cli(
        monkeypatch, ["customers", "bind", "pm_card_visa", "alice"], database_url=database_url
    )
    assert result.exit_code == 2, result.output
    result = invoke_cli(
        monkeypatch, ["customers", "bind", "cus_X1", "nobody"], database_url=database_url
    )
    assert result.exit_code == 2, result.output
    assert "no live agent" in result.output
    result = invoke_cli(
        monkeypatch, ["customers", "bind", "cus_X1", "gone"], database_url=database_url
    )
    assert result.exit_code == 2, result.output
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM customer_owners").fetchone() == (0,)


def test_the_migration_binds_each_customer_to_the_live_agent_that_named_it_first(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = pg_server.fresh_name()
    url = pg_server.create(name)
    try:
        migrate_before(url, "0017_customer_owners.sql", tmp_path, monkeypatch)
        with psycopg.connect(url) as conn:
            conn.execute(
                """INSERT INTO agents (id, name) VALUES ('agt_a', 'a'), ('agt_b', 'b');
                   INSERT INTO agents (id, name, is_operator) VALUES ('agt_op', 'op', true);
                   INSERT INTO agents (id, name, revoked_at) VALUES ('agt_old', 'old', now());
                   INSERT INTO payment_jobs (id, agent_id, currency, payment_method, customer,
                                             created_at, amount_requested)
                   VALUES ('pay_1', 'agt_b', 'usd', 'pm_card_visa', 'cus_Shared',
                           now() - interval '1 day', 100),
                          ('pay_2', 'agt_a', 'usd', 'pm_card_visa', 'cus_Shared', now(), 100),
                          ('pay_3', 'agt_a', 'usd', 'pm_card_visa', 'cus_OnlyA', now(), 100),
                          ('pay_4', 'agt_a', 'usd', 'pm_card_visa', NULL, now(), 100),
                          -- an operator's and a revoked agent's payments came first: no owner
                          ('pay_5', 'agt_op', 'usd', 'pm_card_visa', 'cus_Team',
                           now() - interval '2 days', 100),
                          ('pay_6', 'agt_old', 'usd', 'pm_card_visa', 'cus_Team',
                           now() - interval '2 days', 100),
                          ('pay_7', 'agt_a', 'usd', 'pm_card_visa', 'cus_Team', now(), 100),
                          ('pay_8', 'agt_old', 'usd', 'pm_card_visa', 'cus_Old', now(), 100)"""
            )
        assert schema.migrate(url)[0] == "0017_customer_owners"
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT customer, agent_id, bound_by FROM customer_owners ORDER BY customer"
            ).fetchall()
        assert rows == [
            ("cus_OnlyA", "agt_a", "migration"),
            ("cus_Shared", "agt_b", "migration"),
            ("cus_Team", "agt_a", "migration"),
        ]
        shared = invoke_cli(
            monkeypatch, ["customers", "list", "--shared", "--json"], database_url=url
        )
        assert shared.exit_code == 0, shared.output
        assert [(r["customer"], r["agent_id"], r["others"]) for r in json.loads(shared.output)] == [
            ("cus_Old", None, ["agt_old"]),
            ("cus_Shared", "agt_b", ["agt_a"]),
            ("cus_Team", "agt_a", ["agt_old", "agt_op"]),
        ]
        shown = invoke_cli(
            monkeypatch, ["customers", "show", "cus_OnlyA", "--json"], database_url=url
        )
        assert shown.exit_code == 0, shown.output
        assert {k: json.loads(shown.output)[k] for k in ("agent_id", "bound_by")} == {
            "agent_id": "agt_a",
            "bound_by": "migration",
        }
    finally:
        pg_server.drop(name)


async def test_two_binds_at_once_record_the_move_between_them(pool: Pool) -> None:
    """The second bind waits for the first and says it moved the Customer from the first's
    agent (it recorded no previous agent, and the CLI said nothing moved)."""
    alice, _ = await new_agent(pool, "alice")
    bob, _ = await new_agent(pool, "bob")
    async with pool.connection() as first, pool.connection() as second:
        async with first.transaction():
            assert await customers.bind(first, "cus_Both", alice, actor="operator:a") is None
            later = asyncio.create_task(_bind_in(second, "cus_Both", bob))
            done, _ = await asyncio.wait({later}, timeout=0.3)
            assert not done  # it waits for the first transaction
        assert await later == alice
        history = await customers.changes(first, "cus_Both")
    assert [(c["agent_id"], c["previous_agent_id"]) for c in history] == [
        (alice, None),
        (bob, alice),
    ]


async def _bind_in(conn: Any, customer: str, agent_id: str) -> str | None:
    async with conn.transaction():
        return await customers.bind(conn, customer, agent_id, actor="operator:b")
