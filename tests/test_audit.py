"""The operator audit: who created, rotated and revoked agents and keys, who set prices and
who bound Customers to agents, when, and from what to what (`operator_audit`, `agentpay
audit`); what a revoke says of the agent's payments still in flight; `review approve|reject
--reason`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from rich.console import Console

from tasks import agents, payments
from tasks.db import Pool
from tests.conftest import auth, invoke_cli, run_jobs
from workers import cli_audit


def _audit(database_url: str) -> list[dict[str, Any]]:
    """Every audit row, oldest first."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT actor, action, subject, data FROM operator_audit ORDER BY id"
        ).fetchall()


def test_agent_changes_from_the_cli_name_their_operator_and_never_keep_a_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cli(*args: str, env: dict[str, str] | None = None) -> Any:
        return invoke_cli(monkeypatch, list(args), database_url=database_url, env=env)

    # `agents create --operator` still makes an operator; who did it is AGENTPAY_OPERATOR.
    created = cli(
        "agents", "create", "ops-1", "--operator", "--json", env={"AGENTPAY_OPERATOR": "alice"}
    )
    assert created.exit_code == 0, created.output
    first = json.loads(created.stdout)
    assert first["is_operator"] is True
    rotated = cli("agents", "rotate-key", "ops-1", "--operator", "bob", "--json")
    assert rotated.exit_code == 0, rotated.output
    second = json.loads(rotated.stdout)
    revoked = cli("agents", "revoke", "ops-1", "--operator", "carol")
    assert revoked.exit_code == 0, revoked.output
    assert "still in flight" not in revoked.stdout  # it has no payments

    # What changes nothing records nothing: a name taken, an agent revoked already (a
    # harmless repeat), a key for a revoked agent.
    assert cli("agents", "create", "ops-1").exit_code == 1
    assert cli("agents", "revoke", "ops-1", "--operator", "carol").exit_code == 0
    assert cli("agents", "rotate-key", "ops-1", "--operator", "bob").exit_code == 2

    agent_id, key1, key2 = first["id"], first["key"], second["key"]
    assert _audit(database_url) == [
        {
            "actor": "operator:alice",
            "action": "agent.create",
            "subject": agent_id,
            "data": {"name": "ops-1", "is_operator": True, "key_prefix": key1[:10]},
        },
        {
            "actor": "operator:bob",
            "action": "agent.rotate_key",
            "subject": agent_id,
            "data": {
                "name": "ops-1",
                "is_operator": True,
                "key_prefix": key2[:10],
                "keys_revoked": [key1[:10]],
            },
        },
        {
            "actor": "operator:carol",
            "action": "agent.revoke",
            "subject": agent_id,
            "data": {
                "name": "ops-1",
                "is_operator": True,
                "keys_revoked": [key2[:10]],
                "in_flight": {},
            },
        },
    ]
    with psycopg.connect(database_url) as conn:
        for key in (key1, key2):
            kept = conn.execute(
                "SELECT count(*) FROM operator_audit WHERE strpos(data::text, %s) > 0",
                (key[10:],),
            ).fetchone()
            assert kept == (0,)
        # At the change's own time: the audit's `at` is the agent's revoked_at.
        same = conn.execute(
            """SELECT a.revoked_at = o.at FROM agents a JOIN operator_audit o
                ON o.subject = a.id AND o.action = 'agent.revoke'"""
        ).fetchone()
        assert same == (True,)


def test_the_audit_is_append_only(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke_cli(monkeypatch, ["prices", "set", "w", "100"], database_url=database_url)
    assert result.exit_code == 0, result.output
    with psycopg.connect(database_url) as conn:
        for statement in (
            "UPDATE operator_audit SET actor = 'operator:nobody'",
            "DELETE FROM operator_audit",
            "TRUNCATE operator_audit",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)
    assert [row["action"] for row in _audit(database_url)] == ["price.set"]


def test_prices_set_keeps_and_says_the_price_it_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cli(*args: str) -> Any:
        result = invoke_cli(monkeypatch, ["prices", "set", *args], database_url=database_url)
        assert result.exit_code == 0, result.output
        return result.stdout

    out = cli("gizmo", "1000", "--description", "A gizmo", "--operator", "alice")
    assert "new price" in out
    out = cli("gizmo", "1200", "--operator", "bob")
    assert "was 1000 usd (active, 'A gizmo')" in out
    assert "description kept: 'A gizmo'" in out  # no longer silent
    out = cli("gizmo", "1200", "--operator", "bob")
    assert "unchanged" in out  # and nothing recorded
    cli("gizmo", "1200", "--inactive", "--operator", "carol")

    def terms(amount: int, active: bool = True) -> dict[str, Any]:
        return {"unit_amount": amount, "description": "A gizmo", "active": active}

    assert [(r["actor"], r["action"], r["subject"], r["data"]) for r in _audit(database_url)] == [
        (
            "operator:alice",
            "price.set",
            "gizmo",
            {"currency": "usd", "previous": None, "new": terms(1000)},
        ),
        (
            "operator:bob",
            "price.set",
            "gizmo",
            {"currency": "usd", "previous": terms(1000), "new": terms(1200)},
        ),
        (
            "operator:carol",
            "price.set",
            "gizmo",
            {"currency": "usd", "previous": terms(1200), "new": terms(1200, False)},
        ),
    ]


async def test_a_price_set_over_http_names_the_operator_agent(
    api: httpx.AsyncClient, operator_key: str, pool: Pool
) -> None:
    for body in (
        {"sku": "w", "currency": "usd", "unit_amount": 100},
        {"sku": "w", "currency": "usd", "unit_amount": 150, "description": "a w"},
    ):
        response = await api.post("/v1/prices", json=body, headers=auth(operator_key))
        assert response.status_code == 200, response.text
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT actor, data FROM operator_audit WHERE action = 'price.set' ORDER BY id"
        )
        rows = await cur.fetchall()
    # The operator_key fixture's agent is named "operator".
    assert rows == [
        {
            "actor": "operator:operator",
            "data": {
                "currency": "usd",
                "previous": None,
                "new": {"unit_amount": 100, "description": None, "active": True},
            },
        },
        {
            "actor": "operator:operator",
            "data": {
                "currency": "usd",
                "previous": {"unit_amount": 100, "description": None, "active": True},
                "new": {"unit_amount": 150, "description": "a w", "active": True},
            },
        },
    ]


def test_agentpay_audit_lists_the_newest_first(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cli(*args: str) -> Any:
        result = invoke_cli(monkeypatch, list(args), database_url=database_url)
        assert result.exit_code == 0, result.output
        return result.stdout

    cli("agents", "create", "shop-bot")
    cli("prices", "set", "w", "100", "--operator", "bob")
    cli("agents", "revoke", "shop-bot", "--operator", "carol")

    listed = json.loads(cli("audit", "--json"))
    assert [(r["action"], r["actor"]) for r in listed][:2] == [
        ("agent.revoke", "operator:carol"),
        ("price.set", "operator:bob"),
    ]
    assert listed[2]["action"] == "agent.create" and len(listed) == 3
    assert listed[0]["at"] >= listed[1]["at"] >= listed[2]["at"]
    assert [r["action"] for r in json.loads(cli("audit", "--limit", "1", "--json"))] == [
        "agent.revoke"
    ]
    monkeypatch.setattr(cli_audit, "console", Console(width=200))  # one line a row
    table = cli("audit", "--limit", "2")
    assert "operator:carol" in table and "new: 100 usd (active)" in table
    assert "agent.create" not in table


def test_agentpay_audit_says_what_a_customer_binding_changed_in_words(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`customer.bind` and `customer.unbind` rows read as the others do: the agent it was
    bound to and the one before, not the raw JSON of the row's data."""

    def cli(*args: str) -> Any:
        result = invoke_cli(monkeypatch, list(args), database_url=database_url)
        assert result.exit_code == 0, result.output
        return result.stdout

    first = json.loads(cli("agents", "create", "bot-a", "--json"))["id"]
    second = json.loads(cli("agents", "create", "bot-b", "--json"))["id"]
    cli("customers", "bind", "cus_audited", "bot-a", "--operator", "dan")
    cli("customers", "bind", "cus_audited", "bot-b", "--operator", "dan")
    cli("customers", "unbind", "cus_audited", "--operator", "erin")

    monkeypatch.setattr(cli_audit, "console", Console(width=250))  # one line a row
    lines = cli("audit", "--limit", "3").splitlines()
    rows = [line for line in lines if "cus_audited" in line]
    assert len(rows) == 3, lines
    unbound, moved, bound = rows
    assert "operator:erin" in unbound and "customer.unbind" in unbound
    assert f"unbound (was {second})" in unbound
    assert "customer.bind" in moved and f"bound to {second} (was {first})" in moved
    assert "customer.bind" in bound and f"bound to {first}" in bound and "(was" not in bound
    assert not any("agent_id" in row or "{" in row for row in rows)
    # --json keeps the row's data as it is.
    listed = json.loads(cli("audit", "--limit", "1", "--json"))
    assert listed[0]["data"] == {"agent_id": None, "previous_agent_id": second}


async def test_revoking_an_agent_with_payments_in_flight_says_so_and_they_go_on(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def pay(**body: Any) -> str:
        body = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", **body}
        body = {k: v for k, v in body.items() if v is not None}
        response = await api.post("/v1/payments", json=body, headers=auth(agent_key))
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    await pay()
    await pay()
    rejected = await pay(amount=None, line_items=[{"sku": "nothing-of-that-name"}])
    await run_jobs(pool, ("pricing",))  # two priced; one rejected: final, not in flight
    waiting = await pay()  # received
    result = await asyncio.to_thread(
        invoke_cli,
        monkeypatch,
        ["agents", "revoke", "agent-a", "--operator", "dana"],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output  # not refused
    assert "3 of its payments are still in flight (2 priced, 1 received)" in result.stdout

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT actor, data FROM operator_audit WHERE action = 'agent.revoke'"
        )
        row = await cur.fetchone()
        assert row is not None and row["actor"] == "operator:dana"
        assert row["data"]["in_flight"] == {"priced": 2, "received": 1}
        rejected_now = await payments.get(conn, rejected)
        assert rejected_now is not None and rejected_now["status"] == "rejected"
        agent = await agents.find(conn, "agent-a")
        assert agent is not None and agent["revoked_at"] is not None
    await run_jobs(pool, ("pricing",))  # the revoked agent's work goes on
    async with pool.connection() as conn:
        waited = await payments.get(conn, waiting)
        assert waited is not None and waited["status"] == "priced"


async def test_review_takes_reason_as_well_as_note(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = []
    for _ in range(2):
        body = {"amount": 150_000, "currency": "usd", "payment_method": "pm_card_visa"}
        response = await api.post("/v1/payments", json=body, headers=auth(agent_key))
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    await run_jobs(pool, ("pricing", "risk"))  # over the review threshold: in_review

    for verb, payment_id, option in (("reject", ids[0], "--reason"), ("approve", ids[1], "--note")):
        result = await asyncio.to_thread(
            invoke_cli,
            monkeypatch,
            ["review", verb, payment_id, option, f"{verb} by {option}", "--operator", "erin"],
            database_url=database_url,
        )
        assert result.exit_code == 0, result.output
    async with pool.connection() as conn:
        for payment_id, to, why in (
            (ids[0], "rejected", "reject by --reason"),
            (ids[1], "approved", "approve by --note"),
        ):
            event = next(e for e in await payments.events(conn, payment_id) if e["to_status"] == to)
            assert event["actor"] == "operator:erin"
            assert why in event["reason"]
