"""Risk: amount limits, velocity, block lists, the budget, and the operators' review."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tasks import agents, ledger, payments, pricing, risk
from tasks.db import Pool
from tasks.settings import get_settings
from tests.conftest import auth, run_jobs
from workers.cli import app as cli


async def _create(api: httpx.AsyncClient, key: str, **body: Any) -> dict[str, Any]:
    body = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", **body}
    response = await api.post("/v1/payments", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def _get(api: httpx.AsyncClient, key: str, payment_id: str) -> dict[str, Any]:
    result: dict[str, Any] = (await api.get(f"/v1/payments/{payment_id}", headers=auth(key))).json()
    return result


async def _last_event(pool: Pool, payment_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        return (await payments.events(conn, payment_id))[-1]


async def test_a_payment_over_the_review_threshold_waits_until_an_operator_approves(
    api: httpx.AsyncClient, agent_key: str, operator_key: str, pool: Pool, provider_base: str
) -> None:
    created = await _create(api, agent_key, amount=150_000)  # default threshold: 100_000
    await run_jobs(pool)
    payment = await _get(api, agent_key, created["id"])
    assert payment["status"] == "in_review"
    assert payment["risk"]["decision"] == "in_review"
    assert [r["code"] for r in payment["risk"]["reasons"]] == ["amount_over_review_threshold"]
    event = await _last_event(pool, created["id"])
    assert (event["to_status"], event["reason"]) == ("in_review", "amount_over_review_threshold")
    assert event["data"]["reasons"][0]["data"] == {"amount": 150_000, "threshold": 100_000}

    # Nothing moves while it waits.
    await run_jobs(pool)
    assert (await _get(api, agent_key, created["id"]))["status"] == "in_review"

    waiting = (await api.get("/v1/review", headers=auth(operator_key))).json()["data"]
    assert [p["id"] for p in waiting] == [created["id"]]
    assert (await api.get("/v1/review", headers=auth(agent_key))).status_code == 403
    denied = await api.post(f"/v1/review/{created['id']}/approve", headers=auth(agent_key))
    assert denied.status_code == 403

    approved = await api.post(
        f"/v1/review/{created['id']}/approve",
        json={"note": "known customer"},
        headers=auth(operator_key),
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    # Approving again is harmless; rejecting now is a conflict.
    again = await api.post(f"/v1/review/{created['id']}/approve", headers=auth(operator_key))
    assert again.status_code == 200 and again.json()["status"] == "approved"
    late = await api.post(f"/v1/review/{created['id']}/reject", headers=auth(operator_key))
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "payment_not_in_review"

    await run_jobs(pool)
    payment = await _get(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    async with pool.connection() as conn:
        events = await payments.events(conn, created["id"])
    review = next(e for e in events if e["from_status"] == "in_review")
    assert review["to_status"] == "approved"
    assert review["actor"].startswith("operator:")
    assert "known customer" in review["reason"]


async def test_an_operator_rejects_in_review_from_the_cli_and_the_hold_is_released(
    api: httpx.AsyncClient,
    agent_key: str,
    operator_key: str,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent_id = (await _create(api, agent_key, amount=100))["agent_id"]
    async with pool.connection() as conn, conn.transaction():
        await ledger.deposit(conn, agent_id, 500_000, "usd", actor="test")
    created = await _create(api, agent_key, amount=200_000)
    await run_jobs(pool, ("pricing", "risk"))
    balance = (await api.get("/v1/balance", headers=auth(agent_key))).json()
    assert balance["available"] == [{"amount": 500_000 - 200_000 - 100, "currency": "usd"}]
    assert balance["held"] == [{"amount": 200_100, "currency": "usd"}]

    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    runner = CliRunner()
    result = await _in_thread(runner.invoke, cli, ["review", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert '"amount_over_review_threshold"' in result.output and created["id"] in result.output
    result = await _in_thread(
        runner.invoke, cli, ["review", "reject", created["id"], "--note", "not ours"]
    )
    assert result.exit_code == 0, result.output
    assert "rejected" in result.output
    result = await _in_thread(runner.invoke, cli, ["review", "approve", created["id"]])
    assert result.exit_code == 1
    assert "not in_review" in result.output

    payment = await _get(api, agent_key, created["id"])
    assert payment["status"] == "rejected"
    assert payment["failure"] == {"code": "rejected_in_review", "message": "not ours"}
    balance = (await api.get("/v1/balance", headers=auth(agent_key))).json()
    # The small payment still holds its 100; the rejected one's hold came back.
    assert balance["available"] == [{"amount": 500_000 - 100, "currency": "usd"}]
    assert balance["held"] == [{"amount": 100, "currency": "usd"}]


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """The CLI runs its own event loop (asyncio.run): give it a thread of its own."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


@pytest.mark.parametrize(
    ("env", "body", "code"),
    [
        ({}, {"amount": 1_000_001}, "amount_over_limit"),
        ({"risk_blocked_payment_methods": '["pm_card_visa"]'}, {}, "payment_method_blocked"),
        ({"risk_blocked_agents": '["agent-a"]'}, {}, "agent_blocked"),
        (
            {"risk_reject_above": '{"default": 10, "jpy": 1000}'},
            {"currency": "jpy", "amount": 1001},
            "amount_over_limit",
        ),
    ],
)
async def test_rules_reject_with_their_reason_before_any_hold(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    configure: Callable[..., None],
    env: dict[str, str],
    body: dict[str, Any],
    code: str,
) -> None:
    configure(**env)
    created = await _create(api, agent_key, **body)
    await run_jobs(pool)
    payment = await _get(api, agent_key, created["id"])
    assert payment["status"] == "rejected"
    assert payment["failure"]["code"] == code
    event = await _last_event(pool, created["id"])
    assert event["reason"] == code
    assert event["data"]["hold"] is None
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM ledger_transactions")
        row = await cur.fetchone()
    assert row is not None and row["n"] == 0


async def test_velocity_limits_count_and_amount_in_the_window(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    configure(risk_velocity_max_count="2", risk_velocity_max_amount='{"default": 5000}')
    first = await _create(api, agent_key, amount=1000)
    second = await _create(api, agent_key, amount=1000)
    await run_jobs(pool, ("pricing", "risk"))
    third = await _create(api, agent_key, amount=1000)
    await run_jobs(pool, ("pricing", "risk"))
    statuses = [(await _get(api, agent_key, p["id"]))["status"] for p in (first, second, third)]
    assert statuses == ["approved", "approved", "rejected"]
    assert (await _get(api, agent_key, third["id"]))["failure"]["code"] == "velocity_count_exceeded"

    configure(risk_velocity_max_count="100", risk_velocity_max_amount='{"default": 5000}')
    fits = await _create(api, agent_key, amount=3000)  # 2000 so far + 3000 = 5000: allowed
    over = await _create(api, agent_key, amount=50)
    await run_jobs(pool, ("pricing", "risk"))
    assert (await _get(api, agent_key, fits["id"]))["status"] == "approved"
    rejected = await _get(api, agent_key, over["id"])
    assert rejected["failure"]["code"] == "velocity_amount_exceeded"

    # Outside the window, nothing counts.
    configure(risk_velocity_window_seconds="0.001", risk_velocity_max_count="1")
    later = await _create(api, agent_key, amount=50)
    await run_jobs(pool, ("pricing", "risk"))
    assert (await _get(api, agent_key, later["id"]))["status"] == "approved"


async def test_velocity_counts_a_burst_however_late_risk_runs(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    """The window ended at `now()` when risk ran: a burst risk took a window late (a
    backlog — one agent's risk steps run one at a time —, an outage, a deploy) was counted as
    nothing, and every payment of it passed. The window is around each payment's creation."""
    configure(risk_velocity_max_count="2", risk_velocity_window_seconds="60")
    burst = [await _create(api, agent_key, amount=1000) for _ in range(5)]
    await run_jobs(pool, ("pricing",))
    async with pool.connection() as conn, conn.transaction():
        # Risk an hour behind: the burst was made an hour before risk looks at it (a
        # payment's created_at never changes: past its trigger for this test only).
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE payment_jobs SET created_at = created_at - interval '1 hour' "
            "WHERE id = ANY(%s)",
            ([p["id"] for p in burst],),
        )
    await run_jobs(pool, ("risk",))
    decided = [await _get(api, agent_key, p["id"]) for p in burst]
    assert [p["status"] for p in decided] == ["approved"] * 2 + ["rejected"] * 3
    assert {p["failure"]["code"] for p in decided[2:]} == {"velocity_count_exceeded"}


async def test_an_agent_over_budget_is_rejected_with_insufficient_budget(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    agent_id = (await api.get("/v1/balance", headers=auth(agent_key))).json()["agent_id"]
    async with pool.connection() as conn, conn.transaction():
        await ledger.deposit(conn, agent_id, 1500, "usd", actor="test")
    fits = await _create(api, agent_key, amount=1000)
    await run_jobs(pool, ("pricing", "risk"))
    over = await _create(api, agent_key, amount=1000)
    other_currency = await _create(api, agent_key, amount=100, currency="eur")
    await run_jobs(pool, ("pricing", "risk"))
    assert (await _get(api, agent_key, fits["id"]))["status"] == "approved"
    for p in (over, other_currency):
        payment = await _get(api, agent_key, p["id"])
        assert payment["status"] == "rejected"
        assert payment["failure"]["code"] == "insufficient_budget"
        assert (await _last_event(pool, p["id"]))["reason"] == "insufficient_budget"
    balance = (await api.get("/v1/balance", headers=auth(agent_key))).json()
    assert {(b["currency"], b["amount"]) for b in balance["available"]} == {
        ("usd", 500),
        ("eur", 0),
    }


async def test_without_a_budget_an_agent_spends_only_if_the_setting_allows(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, configure: Callable[..., None]
) -> None:
    allowed = await _create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    assert (await _get(api, agent_key, allowed["id"]))["status"] == "approved"
    async with pool.connection() as conn:
        unlimited = await ledger.unlimited_agents(conn)
    assert [a["name"] for a in unlimited] == ["agent-a"]

    configure(allow_unbudgeted_spending="false")
    async with pool.connection() as conn:
        assert await ledger.unlimited_agents(conn) == []
    refused = await _create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    payment = await _get(api, agent_key, refused["id"])
    assert (payment["status"], payment["failure"]["code"]) == ("rejected", "no_budget")


async def test_risk_steps_of_different_agents_never_wait_on_each_other(pool: Pool) -> None:
    """Holds of agents without a budget all come out of the one external funding account of
    their currency, and budgeted agents' holds touch only their own accounts: six risk steps
    of six agents, each left uncommitted while the next runs under a lock timeout, all
    decide; committed, the ledger adds up."""

    async def priced(name: str, budget: int | None) -> str:
        async with pool.connection() as conn, conn.transaction():
            agent, _ = await agents.create(conn, name)
            if budget is not None:
                await ledger.deposit(conn, agent.id, budget, "usd", actor="test")
            payment = await payments.insert(
                conn, agent_id=agent.id, currency="usd", payment_method="pm_card_visa", amount=700
            )
            assert await pricing.advance(conn, payment["id"]) == "priced"
            return str(payment["id"])

    first = await priced("first", None)  # the platform account exists before the race
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, first) == "approved"
    waiting = [await priced(f"agent-{i}", 1000 if i % 2 else None) for i in range(6)]

    async with AsyncExitStack() as stack:
        for payment_id in waiting:
            conn = await stack.enter_async_context(pool.connection())
            await stack.enter_async_context(conn.transaction())
            await conn.execute("SET LOCAL lock_timeout = '3s'")  # waiting would raise
            assert await risk.advance(conn, payment_id) == "approved"

    async with pool.connection() as conn:
        assert await ledger.problems(conn) == []
        cur = await conn.execute(
            """SELECT kind, balance FROM ledger_account_balances
               WHERE agent_id IS NULL AND currency = 'usd'"""
        )
        platform = {r["kind"]: r["balance"] for r in await cur.fetchall()}
        cur = await conn.execute("SELECT count(*) AS n FROM payment_jobs WHERE status = 'approved'")
        assert (await cur.fetchone())["n"] == 7
    # Four unbudgeted holds of 700 and three deposits of 1000 came out of external funding.
    assert platform == {"external_funding": -4 * 700 - 3 * 1000}
