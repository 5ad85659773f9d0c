"""API keys: bearer auth on every /v1 route, agents confined to their own payments,
operator routes for operator keys, revocation, and the `agentpay agents` commands."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from api.app import create_app
from tasks import agents
from tasks.db import Pool
from tasks.settings import Settings, get_settings
from tests.conftest import auth

BODY = {"amount": 1500, "currency": "usd", "payment_method": "pm_card_visa"}


async def world(pool: Pool) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT (SELECT json_agg(p ORDER BY id) FROM payment_jobs p) AS payments,
                      (SELECT count(*) FROM payment_events) AS events,
                      (SELECT count(*) FROM procrastinate_jobs) AS jobs,
                      (SELECT count(*) FROM payment_refunds) AS refunds"""
        )
        row = await cur.fetchone()
    assert row is not None
    return dict(row)


def v1_routes(settings: Settings) -> list[tuple[str, str]]:
    """Every documented /v1 operation, with made-up ids in its path."""
    found = []
    for path, operations in create_app(settings).openapi()["paths"].items():
        if not path.startswith("/v1/") or path.startswith("/v1/webhooks/"):
            continue  # the provider signs its webhooks; it has no API key
        for method in operations:
            found.append((method.upper(), re.sub(r"\{[a-z_]+\}", "x_1", path)))
    return found


async def test_every_v1_route_needs_a_valid_key(
    api: httpx.AsyncClient, settings: Settings, agent_key: str
) -> None:
    routes = v1_routes(settings)
    assert ("POST", "/v1/payments") in routes and ("GET", "/v1/payments/x_1/wait") in routes
    for method, path in routes:
        for headers in (
            {},
            {"Authorization": "Bearer apk_wrong"},
            {"Authorization": f"Basic {agent_key}"},
            {"Authorization": agent_key},
        ):
            response = await api.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            # Bearer first; Basic is offered too, for browsers on the operators' page.
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.json()["error"]["type"] == "authentication_error"


async def test_basic_auth_reads_but_never_acts(
    api: httpx.AsyncClient, pool: Pool, operator_key: str
) -> None:
    """A browser sends cached Basic credentials with any cross-site form POST: Basic may read
    (the /ops page), never act, and only a GET is offered it."""
    basic = {"Authorization": "Basic " + base64.b64encode(f"ops:{operator_key}".encode()).decode()}
    assert (await api.get("/v1/payments", headers=basic)).status_code == 200
    before = await world(pool)
    created = await api.post("/v1/payments", json=BODY, headers=basic)
    assert created.status_code == 401, created.text
    assert "Basic" not in created.headers["WWW-Authenticate"]
    assert "reading (GET) only" in created.json()["error"]["message"]
    assert await world(pool) == before
    assert "Basic" in (await api.get("/v1/payments")).headers["WWW-Authenticate"]


async def test_a_revoked_key_is_refused(api: httpx.AsyncClient, pool: Pool) -> None:
    async with pool.connection() as conn, conn.transaction():
        agent, key = await agents.create(conn, "short-lived")
    assert (await api.get("/v1/payments", headers=auth(key))).status_code == 200
    async with pool.connection() as conn, conn.transaction():
        assert await agents.revoke(conn, agent.name)
    response = await api.get("/v1/payments", headers=auth(key))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_only_a_hash_of_the_key_is_stored(agent_key: str, pool: Pool) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM api_keys")
        rows = await cur.fetchall()
    assert len(rows) == 1
    stored = json.dumps([{k: str(v) for k, v in r.items()} for r in rows])
    assert agent_key not in stored and agent_key[10:] not in stored
    assert bytes(rows[0]["key_hash"]) == agents.hash_key(agent_key)


async def test_an_agent_cannot_see_or_touch_another_agents_payment(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    async with pool.connection() as conn, conn.transaction():
        _, key_b = await agents.create(conn, "agent-b")
    theirs = (await api.post("/v1/payments", json=BODY, headers=auth(key_b))).json()
    mine = (await api.post("/v1/payments", json=BODY, headers=auth(agent_key))).json()
    before = await world(pool)

    pid = theirs["id"]
    attempts = [
        ("GET", f"/v1/payments/{pid}", None),
        ("GET", f"/v1/payments/{pid}/events", None),
        ("GET", f"/v1/payments/{pid}/wait?timeout=0", None),
        ("GET", f"/v1/payments/{pid}/refunds", None),
        ("POST", f"/v1/payments/{pid}/capture", None),
        ("POST", f"/v1/payments/{pid}/cancel", {"reason": "mine now"}),
        ("POST", f"/v1/payments/{pid}/refunds", {"amount": 100}),
    ]
    for method, path, body in attempts:
        response = await api.request(method, path, json=body, headers=auth(agent_key))
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "resource_missing"
    # Its own payment answers; the same for an id that does not exist at all.
    assert (await api.get(f"/v1/payments/{mine['id']}", headers=auth(agent_key))).status_code == 200
    missing = await api.get("/v1/payments/pay_000000000000000000000000", headers=auth(agent_key))
    assert (
        missing.status_code == 404
        and missing.json() == (await api.get(f"/v1/payments/{pid}", headers=auth(agent_key))).json()
    )

    listed = (await api.get("/v1/payments", headers=auth(agent_key))).json()
    assert [p["id"] for p in listed["data"]] == [mine["id"]]
    cursor = await api.get(f"/v1/payments?starting_after={pid}", headers=auth(agent_key))
    assert cursor.status_code == 404 and cursor.json()["error"]["param"] == "starting_after"
    assert await world(pool) == before


async def test_operator_routes_need_an_operator_key(
    api: httpx.AsyncClient, agent_key: str, operator_key: str
) -> None:
    refused = await api.get("/v1/agents", headers=auth(agent_key))
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    listed = await api.get("/v1/agents", headers=auth(operator_key))
    assert listed.status_code == 200
    names = {a["name"]: a for a in listed.json()["data"]}
    assert set(names) == {"agent-a", "operator"}
    assert names["operator"]["is_operator"] and not names["agent-a"]["is_operator"]
    assert names["agent-a"]["key_prefixes"] == [agent_key[:10]]


async def test_operators_see_every_agents_payments(
    api: httpx.AsyncClient, agent_key: str, operator_key: str
) -> None:
    created = (await api.post("/v1/payments", json=BODY, headers=auth(agent_key))).json()
    seen = await api.get(f"/v1/payments/{created['id']}", headers=auth(operator_key))
    assert seen.status_code == 200
    listed = (await api.get("/v1/payments", headers=auth(operator_key))).json()
    assert [p["id"] for p in listed["data"]] == [created["id"]]


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_agents_commands_create_list_and_revoke(database_url: str, cli_env: Any) -> None:
    from workers.cli import app

    runner = CliRunner()
    created = runner.invoke(app, ["agents", "create", "cli-agent", "--json"])
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    assert info["name"] == "cli-agent" and info["key"].startswith("apk_")
    # is_operator as agents list and the API say it; operator, its first name, stays.
    assert info["is_operator"] is False and info["operator"] is False
    operator = runner.invoke(app, ["agents", "create", "cli-op", "--operator"])
    assert operator.exit_code == 0 and "key: apk_" in operator.stdout

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM api_keys WHERE key_hash = %s", (agents.hash_key(info["key"]),)
        ).fetchone()
    assert row is not None and row[0] == 1

    listed = runner.invoke(app, ["agents", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {a["name"]: a for a in json.loads(listed.stdout)}
    assert rows["cli-agent"]["revoked_at"] is None and rows["cli-op"]["is_operator"]
    assert info["key"] not in listed.stdout

    # A leaked key replaced: the new one works, the old one not, the agent is the same.
    rotated = runner.invoke(app, ["agents", "rotate-key", "cli-agent", "--json"])
    assert rotated.exit_code == 0, rotated.output
    new = json.loads(rotated.stdout)
    assert (new["id"], new["name"]) == (info["id"], "cli-agent") and new["key"] != info["key"]
    with psycopg.connect(database_url) as conn:
        live = dict(
            conn.execute(
                "SELECT key_hash, revoked_at IS NULL FROM api_keys WHERE agent_id = %s",
                (info["id"],),
            ).fetchall()
        )
    assert live == {agents.hash_key(info["key"]): False, agents.hash_key(new["key"]): True}

    revoked = runner.invoke(app, ["agents", "revoke", "cli-agent"])
    assert revoked.exit_code == 0
    gone = runner.invoke(app, ["agents", "rotate-key", "cli-agent"])
    assert gone.exit_code == 2, gone.output  # a revoked agent gets no new key
    # Again (a runbook step repeated): harmless, says so, audits nothing more.
    again = runner.invoke(app, ["agents", "revoke", "cli-agent"])
    assert again.exit_code == 0, again.output
    assert "was revoked already" in again.stdout
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM operator_audit WHERE action = 'agent.revoke' AND subject = %s",
            (info["id"],),
        ).fetchone()
    assert row is not None and row[0] == 1
    nobody = runner.invoke(app, ["agents", "revoke", "nobody-of-that-name"])
    assert nobody.exit_code == 2, nobody.output
    taken = runner.invoke(app, ["agents", "create", "cli-agent"])
    assert taken.exit_code == 1, taken.output  # refused: the name is taken, even revoked
    assert "exists already" in taken.output and "Traceback" not in taken.output
    for unknown in (["agents", "deposit", "nobody", "100"], ["review", "approve", "pay_none"]):
        missing = runner.invoke(app, unknown)
        assert missing.exit_code == 2, missing.output
    listed = json.loads(runner.invoke(app, ["agents", "list", "--json"]).stdout)
    assert next(a for a in listed if a["name"] == "cli-agent")["revoked_at"] is not None
    live = runner.invoke(app, ["agents", "list"])
    assert "cli-op" in live.stdout


async def test_an_address_sending_keys_that_are_none_is_held_off_before_any_lookup(
    settings: Settings, pool: Pool, agent_key: str
) -> None:
    """Each wrong key cost a database lookup, with no agent's bucket to limit it: a guesser
    could hold the pool. Past a burst of wrong keys an address waits, whatever it sends;
    other addresses go on."""
    strict = settings.model_copy(
        update={"api_invalid_keys_per_second": 0.01, "api_invalid_keys_burst": 3}
    )
    app = create_app(strict)
    app.state.pool = pool

    def client(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 1234))
        return httpx.AsyncClient(transport=transport, base_url="http://agentpay.test")

    async with client("203.0.113.7") as guesser, client("198.51.100.2") as other:
        for n in range(3):
            wrong = await guesser.get("/v1/payments", headers=auth(f"apk_guess{n}"))
            assert wrong.status_code == 401, wrong.text
        held = await guesser.get("/v1/payments", headers=auth("apk_guess9"))
        assert held.status_code == 429, held.text
        assert held.json()["error"]["code"] == "too_many_invalid_keys"
        assert int(held.headers["Retry-After"]) >= 1
        # Held off whatever it sends, a live key included; another address is not.
        assert (await guesser.get("/v1/payments", headers=auth(agent_key))).status_code == 429
        assert (await other.get("/v1/payments", headers=auth(agent_key))).status_code == 200
        assert (await other.get("/v1/payments", headers=auth("apk_typo"))).status_code == 401


def test_the_invalid_key_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guesser spread over many addresses cannot grow the process without bound: the least
    recently used bucket is dropped (and that address is whole again)."""
    from api.ratelimit import InvalidKeys

    monkeypatch.setattr(InvalidKeys, "MAX_ADDRESSES", 2)
    buckets = InvalidKeys(rate=0.01, burst=1)
    for address in ("a", "b", "c"):
        buckets.spent(address)
    assert buckets.wait("a") == 0  # forgotten
    assert buckets.wait("b") > 0 and buckets.wait("c") > 0
    assert InvalidKeys(rate=0, burst=1).wait("a") == 0  # 0 turns it off
