"""Operators: the ops views, `agentpay status`, /metrics and /ops agree; steering commands and
routes record who acted; pruning keeps the queue table small; claims stay fast under backlog;
logs carry ids and never secrets."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from api.metrics import read_snapshot
from tasks import agents, payments
from tasks.app import bind, defer
from tasks.db import Pool, open_pool
from tasks.settings import ROLES, Settings, get_settings
from tests.conftest import async_wait_for, auth, failed_last_hour, invoke_cli, run_jobs
from tests.test_pipeline import create
from workers import logs
from workers.cli import app as cli
from workers.devstack import free_port
from workers.maintenance import Maintenance, fold_counts, prune_finished_jobs

ROOT = Path(__file__).resolve().parent.parent


async def _payment(conn: Any, agent_id: str, amount: int = 500) -> dict[str, Any]:
    p = await payments.insert(
        conn, agent_id=agent_id, currency="usd", payment_method="pm_card_visa", amount=amount
    )
    await defer(conn, "pricing", payment_id=p["id"])
    return p


async def _claim(conn: Any, queue: str) -> int:
    """Claim one job of `queue` as a (fake) worker; return its id."""
    cur = await conn.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
    worker = await cur.fetchone()
    cur = await conn.execute(
        "SELECT id FROM procrastinate_fetch_job_v2(%s::varchar[], %s)", ([queue], worker["id"])
    )
    row = await cur.fetchone()
    assert row and row["id"] is not None
    job_id: int = row["id"]
    return job_id


async def _build_state(pool: Pool) -> dict[str, Any]:
    """pricing: 1 waiting, 1 running; risk: 2 waiting, 1 failed; one payment in review; one
    payment stuck for 10 minutes; one job_failed event."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "ops-agent")
        first = [await _payment(conn, agent.id) for _ in range(3)]
    await run_jobs(pool, ("pricing",))
    async with pool.connection() as conn, conn.transaction():
        later = [await _payment(conn, agent.id) for _ in range(2)]
        running = await _claim(conn, "pricing")
        failed = await _claim(conn, "risk")
        await conn.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (failed,))
        review = await payments.lock(conn, first[1]["id"])
        assert review is not None
        await payments.transition(conn, review, "in_review", actor="test", reason="big amount")
        stuck = await payments.lock(conn, first[2]["id"])
        assert stuck is not None
        await payments.record_event(
            conn,
            stuck,
            "job_failed",
            actor="worker:risk",
            data={"job_id": failed, "role": "risk", "error": "boom", "error_type": "KeyError"},
        )
        # Make `stuck` 10 minutes old (the trigger would set updated_at to now).
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE payment_jobs SET updated_at = now() - interval '10 minutes' WHERE id = %s",
            (stuck["id"],),
        )
    return {
        "first": first,
        "later": later,
        "running_job": running,
        "failed_job": failed,
        "review": first[1]["id"],
        "stuck": first[2]["id"],
    }


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_status_json_metrics_and_views_agree_and_the_page_renders_them(
    api: httpx.AsyncClient, pool: Pool, database_url: str, operator_key: str, agent_key: str
) -> None:
    state = await _build_state(pool)

    async with pool.connection() as conn:
        views = await (await conn.execute("SELECT * FROM ops_queue_depth")).fetchall()
        stuck = await (await conn.execute("SELECT * FROM ops_stuck_payments")).fetchall()
        review = await (await conn.execute("SELECT * FROM ops_review_queue")).fetchall()
        transitions = await (await conn.execute("SELECT * FROM ops_transition_counts")).fetchall()
        failures = await (await conn.execute("SELECT * FROM ops_recent_failures")).fetchall()
    by_role = {v["role"]: v for v in views}
    assert [v["role"] for v in views] == list(ROLES)
    expected = {
        "pricing": (1, 1, 0),
        "risk": (2, 0, 1),
        "charge": (0, 0, 0),
        "reconcile": (0, 0, 0),
    }
    for role, (waiting, running, failed) in expected.items():
        row = by_role[role]
        assert (row["waiting"], row["running"], row["failed_last_hour"]) == (
            waiting,
            running,
            failed,
        ), role
    assert by_role["risk"]["oldest_waiting_seconds"] > 0
    assert [s["payment_id"] for s in stuck] == [state["stuck"]]
    assert stuck[0]["waiting_on"] == "fleet" and stuck[0]["last_event_type"] == "job_failed"
    assert stuck[0]["job_status"] == "todo"
    assert [r["payment_id"] for r in review] == [state["review"]]
    assert review[0]["reason"] == "big amount"
    assert [(f["kind"], f["reason"]) for f in failures] == [("job", "boom")]

    env = {**os.environ, "DATABASE_URL": database_url}
    out = subprocess.run(
        [sys.executable, "-m", "workers", "status", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    response = await api.get("/metrics")
    assert response.status_code == 200
    metrics = _metrics(response.text)

    for role in ROLES:
        q = next(q for q in status["queues"] if q["role"] == role)
        labels = (("role", role),)
        for column in ("waiting", "scheduled", "running"):
            assert (
                q[column] == by_role[role][column] == metrics[(f"agentpay_queue_{column}", labels)]
            ), (role, column)
        assert (
            q["failed_last_hour"]
            == by_role[role]["failed_last_hour"]
            == metrics[("agentpay_jobs_failed_last_hour", labels)]
        )
        # Ages are measured at each reader's own instant: equal within the test's seconds.
        assert (
            abs(
                q["oldest_waiting_seconds"]
                - metrics[("agentpay_queue_oldest_waiting_seconds", labels)]
            )
            < 30
        )
    assert status["stuck_by_waiting_on"]["fleet"] == 1
    assert metrics[("agentpay_stuck_payments", (("waiting_on", "fleet"),))] == 1
    assert status["counts"]["review"] == 1 == metrics[("agentpay_review_queue", ())]
    for t in transitions:
        labels = (("from", t["from_status"]), ("to", t["to_status"]))
        assert metrics[("agentpay_payment_transitions_total", labels)] == t["total"]
    assert {(t["from_status"], t["to_status"]): t["total"] for t in status["transitions"]} == {
        (t["from_status"], t["to_status"]): t["total"] for t in transitions
    }
    assert metrics[("agentpay_recent_failures", (("kind", "job"),))] == 1

    over_http = await api.get("/v1/ops/status", headers=auth(operator_key))
    assert over_http.status_code == 200
    # Timestamps written alike, so the two documents compare as they are.
    utc = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"
    assert re.fullmatch(utc, status["at"]) and re.fullmatch(utc, over_http.json()["at"])
    assert [(q["role"], q["waiting"], q["running"]) for q in over_http.json()["queues"]] == [
        (q["role"], q["waiting"], q["running"]) for q in status["queues"]
    ]

    page = await api.get("/ops", headers=auth(operator_key))
    assert page.status_code == 200, page.text
    html = page.text
    assert 'http-equiv="refresh"' in html
    assert '<td data-col="role">risk</td><td data-col="waiting">2</td>' in html
    assert '<td data-col="role">pricing</td><td data-col="waiting">1</td>' in html
    assert state["stuck"] in html and state["review"] in html and "boom" in html
    assert "1 payment(s) stuck in the fleet" in html
    # A browser: HTTP Basic with the key as password.
    basic = base64.b64encode(f"ops:{operator_key}".encode()).decode()
    assert (await api.get("/ops", headers={"Authorization": f"Basic {basic}"})).status_code == 200
    assert (await api.get("/ops", headers=auth(agent_key))).status_code == 403
    anonymous = await api.get("/ops")
    assert anonymous.status_code == 401
    assert "Basic realm=" in anonymous.headers["www-authenticate"]
    assert anonymous.json()["error"]["code"] == "missing_api_key"


async def test_status_keeps_ids_whole_and_shows_json_as_json(
    pool: Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a terminal of 100 columns the ids an operator copies into a command stay on one
    line, and a mismatch's `expected` reads as JSON (operations.md has the operator copy its
    `refund_id`), not as a Python dict."""
    state = await _build_state(pool)
    async with pool.connection() as conn:
        await conn.execute(
            """INSERT INTO reconcile_mismatches (payment_id, field, expected, actual)
               VALUES (%s, 'refund_status', %s, %s)""",
            (
                state["stuck"],
                Jsonb({"refund_id": "rfd_0123456789abcdef01234567", "status": "succeeded"}),
                Jsonb({"status": "failed"}),
            ),
        )
    narrow, wide = [
        await asyncio.to_thread(
            invoke_cli, monkeypatch, ["status"], database_url=database_url, env={"COLUMNS": n}
        )
        for n in ("100", "300")
    ]
    assert narrow.exit_code == wide.exit_code == 0, narrow.output
    assert narrow.output.count(state["stuck"]) == 3  # stuck, failures and mismatches tables
    assert '"refund_id": "rfd_0123456789abcdef01234567"' in wide.output


def test_a_status_table_keeps_ids_whole_where_there_is_room_and_hides_no_column() -> None:
    """Ids stay on one line when the terminal has room for them and a few characters of
    every other column; in a narrower one all columns fold alike (unwrapped ids had left
    the other columns zero wide, their values gone)."""
    from rich.console import Console

    from workers.status import _table

    row = {"payment_id": "pay_815e29a1711dbf697f8aec09", "status": "charging", "job_id": 4123}
    row |= {f"column_{n}": "value" for n in range(5)}
    for width, whole in ((140, True), (60, False)):
        console = Console(width=width, record=True)
        console.print(_table("Stuck", [row], list(row), 1))
        out = console.export_text()
        assert (row["payment_id"] in out) is whole, out
        assert "char" in out and "4123" in out, out  # every column shows something


async def test_an_operator_resolves_a_mismatch_and_it_leaves_the_open_ones(
    api: httpx.AsyncClient,
    pool: Pool,
    database_url: str,
    operator_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mismatches used to stay in `agentpay status` forever. Resolved (CLI or HTTP), one
    leaves the view and the open gauge, keeps who, when and why, and its payment records it;
    the found-counter an alert watches does not go down."""
    state = await _build_state(pool)
    async with pool.connection() as conn:
        cur = await conn.execute(
            """INSERT INTO reconcile_mismatches (payment_id, field, expected, actual)
               SELECT %s, f, '{}', '{}' FROM unnest(ARRAY['amount', 'status']) AS f
               RETURNING id""",
            (state["stuck"],),
        )
        first, second = [r["id"] for r in await cur.fetchall()]

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(
            invoke_cli, monkeypatch, ["mismatches", *args], database_url=database_url
        )

    # A difference about money is not closed without saying what was done about it.
    for blank in ((), ("--reason", " ")):
        unexplained = await cli("resolve", str(first), *blank)
        assert unexplained.exit_code == 2, unexplained.output
    done = await cli("resolve", str(first), "--operator", "alice", "--reason", "refunded by hand")
    assert done.exit_code == 0, done.output
    assert (await cli("resolve", str(first), "--reason", "x")).exit_code == 1  # resolved already
    assert (await cli("resolve", "999999", "--reason", "x")).exit_code == 2
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM ops_reconcile_mismatches")
        assert [r["id"] for r in await cur.fetchall()] == [second]
        cur = await conn.execute(
            "SELECT resolved_by, resolution FROM reconcile_mismatches WHERE id = %s", (first,)
        )
        assert await cur.fetchone() == {
            "resolved_by": "operator:alice",
            "resolution": "refunded by hand",
        }
        cur = await conn.execute(
            """SELECT actor, reason, data FROM payment_events
                WHERE payment_id = %s AND type = 'mismatch_resolved'""",
            (state["stuck"],),
        )
        assert await cur.fetchall() == [
            {
                "actor": "operator:alice",
                "reason": "refunded by hand",
                "data": {"mismatch_id": first, "field": "amount"},
            }
        ]

    url = f"/v1/ops/mismatches/{second}/resolve"
    for body in (None, {}, {"reason": ""}):
        unexplained = await api.post(url, json=body, headers=auth(operator_key))
        assert unexplained.status_code == 400, unexplained.text
        assert unexplained.json()["error"]["param"] in ("reason", None), unexplained.text
    over_http = await api.post(url, json={"reason": "provider right"}, headers=auth(operator_key))
    assert over_http.status_code == 200, over_http.text
    assert over_http.json()["resolved_by"].startswith("operator:")
    again = await api.post(url, json={"reason": "x"}, headers=auth(operator_key))
    assert again.status_code == 409, again.text
    missing = await api.post(
        "/v1/ops/mismatches/999999/resolve", json={"reason": "x"}, headers=auth(operator_key)
    )
    assert missing.status_code == 404, missing.text
    metrics = _metrics((await api.get("/metrics")).text)
    assert metrics[("agentpay_reconcile_mismatches_total", ())] == 2
    assert metrics[("agentpay_reconcile_mismatches_open", ())] == 0


async def test_metrics_are_read_once_per_cache_period_and_can_require_a_token(
    settings: Settings, pool: Pool, agent_key: str
) -> None:
    """However fast /metrics is asked for, the views are read once per cache period; with a
    token set, a scrape without it (an agent's key included) learns nothing."""
    from api.app import create_app

    app = create_app(
        settings.model_copy(update={"metrics_token": "tok_scrape", "metrics_cache_seconds": 600})
    )
    app.state.pool = pool
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://agentpay.test") as api:
        for headers in ({}, auth(agent_key), {"Authorization": "Bearer tok_other"}):
            refused = await api.get("/metrics", headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "metrics_token_invalid"
        scrape = {"Authorization": "Bearer tok_scrape"}
        first = await api.get("/metrics", headers=scrape)
        assert first.status_code == 200
        created = await api.post(
            "/v1/payments",
            json={"amount": 700, "currency": "usd", "payment_method": "pm_card_visa"},
            headers=auth(agent_key),
        )
        assert created.status_code == 202
        again = await asyncio.gather(*[api.get("/metrics", headers=scrape) for _ in range(5)])
        assert {r.text for r in again} == {first.text}  # within the period: the same read
        app.state.metrics_cache = type(app.state.metrics_cache)()  # the period is over
        later = _metrics((await api.get("/metrics", headers=scrape)).text)
    assert later[("agentpay_queue_waiting", (("role", "pricing"),))] == 1
    assert _metrics(first.text)[("agentpay_queue_waiting", (("role", "pricing"),))] == 0


async def test_a_failed_metrics_read_is_shared_too() -> None:
    """Scrapes queued behind a read that failed (the database is away) fail with it, instead
    of each asking the database again, one after the other."""
    from api.metrics import ScrapeCache

    reads = []

    async def read() -> bytes:
        reads.append(1)
        raise psycopg.OperationalError("the database is away")

    cache = ScrapeCache()
    outcomes = await asyncio.gather(
        *[cache.get(5.0, read) for _ in range(4)], return_exceptions=True
    )
    assert len(reads) == 1
    assert all(isinstance(o, psycopg.OperationalError) for o in outcomes)


async def test_status_watch_json_keeps_watching_through_a_database_blip(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status --watch --json` follows the fleet for scripts: a read that fails (the
    database restarting) is said on stderr, and the next tick prints a snapshot again."""
    from workers import status

    real = status.read_snapshot
    reads = 0

    async def blip_once(conn: Any, s: Settings) -> Any:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise psycopg.OperationalError("the database system is shutting down")
        return await real(conn, s)

    class Enough(Exception):
        pass

    async def tick(seconds: float) -> None:
        if reads >= 2:
            raise Enough

    class StatusOnlyAsyncio:
        """asyncio as the status module sees it, with `sleep` replaced. Replacing
        `asyncio.sleep` itself would replace it in every thread for the test's duration: the
        session's sandbox server, whose loop sleeps between ticks, died of it now and then,
        and every later test needing the sandbox then timed out."""

        sleep = staticmethod(tick)

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

    monkeypatch.setattr(status, "read_snapshot", blip_once)
    monkeypatch.setattr(status, "asyncio", StatusOnlyAsyncio())
    with pytest.raises(Enough):
        await status._watch(settings, status.Console(), as_json=True, every=0.01)
    out, err = capsys.readouterr()
    assert "cannot read the database: the database system is shutting down" in err
    assert "queues" in json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "command",
    [
        ["jobs", "retry", "1"],
        ["payments", "show", "pay_x"],
        ["status"],
        ["status", "--watch", "--json"],
        ["agents", "list"],
        ["agents", "create", "a1"],
        ["prices", "list"],
        ["review", "approve", "pay_x"],
        ["migrate"],
        ["worker", "pricing"],
        ["api"],
    ],
)
def test_without_a_database_a_command_says_so_and_exits_3(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DATABASE_URL and no dev stack: one line and exit code 3, not a traceback (and not
    1 or 2, which mean refused and not found)."""

    result = invoke_cli(monkeypatch, [*command, "--data-dir", str(tmp_path)], database_url=None)
    assert result.exit_code == 3, result.output
    assert "The database is not available: No database" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("AGENTPAY_SHUTDOWN_GRACE_SECONDS", "60", "AGENTPAY_STALLED_AFTER_SECONDS"),
        ("AGENTPAY_FEE_FIXED", "30.5", "AGENTPAY_FEE_FIXED"),
        # JSON that does not parse: pydantic-settings' own error, before validation.
        ("AGENTPAY_FEE_FIXED", '{"usd": 30', "AGENTPAY_FEE_FIXED: not valid JSON"),
    ],
)
def test_a_setting_that_does_not_parse_is_one_line_and_exit_2(
    setting: str, value: str, named: str, tmp_path: Path
) -> None:
    """A bad AGENTPAY_… value: the setting named on one line and the usage exit code, from
    any command (a traceback ending in exit 1, which means "refused", it was)."""
    env = {**os.environ, setting: value, "AGENTPAY_DATA_DIR": str(tmp_path)}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "workers", "status"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Invalid setting: " in result.stderr and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_whose_metrics_port_is_taken_says_so_in_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    """Two workers on one machine given one AGENTPAY_METRICS_PORT: the second one names the
    port and the setting in one line and exits with the usage code (a bad setting), where it
    died with a traceback ending in `OSError: [Errno 98] Address already in use`."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "AGENTPAY_METRICS_PORT": str(port),
            "AGENTPAY_DATA_DIR": str(tmp_path),
            # Never reached: the metrics server starts before the pool opens.
            "DATABASE_URL": "postgresql://agentpay@127.0.0.1:1/none",
        }
        result = subprocess.run(
            [sys.executable, "-m", "workers", "worker", "charge"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"AGENTPAY_METRICS_PORT {port} is in use: give each worker on one machine its own port"
    ], result.stderr


def test_the_debug_crash_switch_is_refused_against_a_real_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Left set in production, every charge worker would kill itself after each provider
    call: it is taken with the sandbox's key only."""
    from pydantic import ValidationError

    monkeypatch.delenv("STRIPE_API_KEY", raising=False)  # a developer's own, exported
    monkeypatch.delenv("AGENTPAY_STRIPE_API_KEY", raising=False)
    assert Settings(debug_crash_after_provider_call=True).debug_crash_after_provider_call
    with pytest.raises(ValidationError, match="sandbox provider only"):
        Settings(debug_crash_after_provider_call=True, stripe_api_key="sk_live_real")


def test_a_database_that_does_not_answer_is_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured database that refuses connections: the same one line and exit code 3."""

    result = invoke_cli(
        monkeypatch,
        ["migrate", "--data-dir", str(tmp_path)],
        database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
    )
    assert result.exit_code == 3, result.output
    assert "The database is not available" in result.output
    assert "Traceback" not in result.output


def test_a_command_with_no_database_says_why_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's warning for each failed attempt is not printed (an operator saw six of
    them, with the URL); the one line says the last attempt's reason, password scrubbed."""
    import workers.cli_common

    monkeypatch.setattr(workers.cli_common, "CONNECT_SECONDS", 1.5)
    result = invoke_cli(
        monkeypatch,
        ["jobs", "retry", "5", "--data-dir", str(tmp_path)],
        database_url=f"postgresql://nobody:hunter2@127.0.0.1:{free_port()}/none",
    )
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("The database is not available") and "refused" in lines[0]
    assert "hunter2" not in result.output


def test_a_command_held_up_by_a_lock_gives_up_with_exit_3(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's `psql` transaction holds the payment's row: `payments cancel` gives up
    after the CLI's lock timeout with exit code 3 (as docs/operations.md says), instead of
    waiting for as long as the other transaction stays open."""
    import threading

    async def make() -> str:
        async with open_pool(database_url, min_size=1, max_size=1) as pool:
            async with pool.connection() as conn, conn.transaction():
                agent, _ = await agents.create(conn, "locked-out-agent")
                return str((await _payment(conn, agent.id))["id"])

    payment_id = asyncio.run(make())
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM payment_jobs WHERE id = %s FOR UPDATE", (payment_id,))
        # Without a timeout the command would wait for this: it is let go after 60 s.
        release = threading.Timer(60, holder.rollback)
        release.start()
        try:
            result = CliRunner().invoke(
                cli, ["payments", "cancel", payment_id, "--data-dir", str(tmp_path)]
            )
        finally:
            release.cancel()
    get_settings.cache_clear()
    assert result.exit_code == 3, result.output
    assert "Another transaction holds a row" in result.output
    assert "Traceback" not in result.output


async def test_operator_routes_steer_and_record_who_acted(
    api: httpx.AsyncClient, pool: Pool, operator_key: str, agent_key: str
) -> None:
    state = await _build_state(pool)
    failed, later = state["failed_job"], state["later"][0]["id"]

    r = await api.post(f"/v1/ops/jobs/{failed}/retry", headers=auth(agent_key))
    assert r.status_code == 403
    r = await api.post(
        f"/v1/ops/jobs/{failed}/retry", json={"reason": "fixed"}, headers=auth(operator_key)
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "todo"
    r = await api.post(f"/v1/ops/jobs/{state['running_job']}/retry", headers=auth(operator_key))
    assert r.status_code == 409 and r.json()["error"]["type"] == "invalid_request_error"
    assert (
        await api.post("/v1/ops/jobs/999999/cancel", headers=auth(operator_key))
    ).status_code == 404

    r = await api.post(f"/v1/ops/payments/{later}/cancel", headers=auth(operator_key))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    r = await api.post(f"/v1/ops/payments/{later}/cancel", headers=auth(operator_key))
    assert r.status_code == 409

    r = await api.get(f"/v1/ops/payments/{later}", headers=auth(operator_key))
    assert r.status_code == 200
    timeline = r.json()
    assert [e["to_status"] for e in timeline["events"]] == ["received", "canceled"]
    assert timeline["jobs"][0]["task"] == "pricing"

    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT type, actor, reason, data->>'job_id' AS job FROM payment_events
                WHERE actor LIKE 'operator:%%' ORDER BY id"""
        )
        events = await cur.fetchall()
    assert [(e["type"], e["actor"]) for e in events] == [
        ("operator_job_retry", "operator:operator"),
        ("transition", "operator:operator"),
    ]
    assert events[0]["reason"] == "fixed" and events[0]["job"] == str(failed)


async def test_an_agents_text_is_printed_as_text_never_as_markup_or_escape_codes(
    api: httpx.AsyncClient, agent_key: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent's cancel reason reaches `agentpay payments show`: `[/]` in it made rich
    raise (the command died before the events), and an escape sequence in it went to the
    operator's terminal as is (one can write the clipboard or clear the screen)."""
    created = await api.post(
        "/v1/payments",
        json={"amount": 500, "currency": "usd", "payment_method": "pm_card_visa"},
        headers=auth(agent_key),
    )
    reason = "oops [/] [bold]x \x1b]52;c;cHduZWQ=\x07 \x1b[2J\x9b"
    canceled = await api.post(
        f"/v1/payments/{created.json()['id']}/cancel",
        json={"reason": reason},
        headers=auth(agent_key),
    )
    assert canceled.status_code == 202, canceled.text
    result = await asyncio.to_thread(  # the command runs its own event loop
        invoke_cli,
        monkeypatch,
        ["payments", "show", created.json()["id"]],
        database_url=database_url,
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert "oops [/] [bold]x \ufffd]52;c;cHduZWQ=\ufffd \ufffd[2J\ufffd" in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output


async def test_cli_lists_payments_newest_first_by_state_and_agent(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Operators had no list of payments in the CLI (only `GET /v1/payments` with an
    operator key, or psql): `payments list` shows them newest first, narrowed by state (any
    of several) and agent, `--limit` at a time."""
    first = (await create(api, agent_key))["id"]
    await run_jobs(pool)
    second = (await create(api, agent_key, amount=777))["id"]
    async with pool.connection() as conn, conn.transaction():
        other, _ = await agents.create(conn, "lister-other")
        third = await payments.insert(
            conn, agent_id=other.id, currency="eur", payment_method="pm_card_visa", amount=300
        )

    async def listed(*args: str) -> tuple[list[str], bool]:
        result = await asyncio.to_thread(
            invoke_cli,
            monkeypatch,
            ["payments", "list", "--json", *args],
            database_url=database_url,
        )
        assert result.exit_code == 0, result.output
        found = json.loads(result.stdout)
        return [p["id"] for p in found["data"]], found["has_more"]

    assert await listed() == ([third["id"], second, first], False)
    assert await listed("--limit", "2") == ([third["id"], second], True)
    assert await listed("--status", "reconciled") == ([first], False)
    assert await listed("--status", "reconciled", "--status", "received") == (
        [third["id"], second, first],
        False,
    )
    assert await listed("--agent", "lister-other") == ([third["id"]], False)
    table = await asyncio.to_thread(
        invoke_cli,
        monkeypatch,
        ["payments", "list", "--status", "reconciled"],
        database_url=database_url,
        env={"COLUMNS": "300"},
    )
    assert table.exit_code == 0, table.output
    assert first in table.stdout and "reconciled" in table.stdout and second not in table.stdout
    for wrong, code in ((["--status", "done"], 2), (["--agent", "nobody"], 2)):
        refused = await asyncio.to_thread(
            invoke_cli, monkeypatch, ["payments", "list", *wrong], database_url=database_url
        )
        assert refused.exit_code == code, refused.output


async def test_a_jobs_error_is_shown_to_operators_not_to_the_agent(
    api: httpx.AsyncClient,
    agent_key: str,
    operator_key: str,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed job's message may quote the database or the provider: the agent sees which
    step failed and the error's type, as with a 500; `payments show` prints the message in
    the event's row (it was only in --json)."""
    payment_id = (await create(api, agent_key))["id"]
    async with pool.connection() as conn, conn.transaction():
        payment = await payments.get(conn, payment_id)
        assert payment is not None
        await payments.record_event(
            conn,
            payment,
            "job_failed",
            actor="worker:charge",
            reason="charge job failed for good",
            data={
                "job_id": 7,
                "role": "charge",
                "error_type": "IdempotencyError",
                "error": "Keys for idempotent requests can only be used once",
            },
        )

    async def failed_event(key: str) -> dict[str, Any]:
        events = await api.get(f"/v1/payments/{payment_id}/events", headers=auth(key))
        assert events.status_code == 200, events.text
        return next(e for e in events.json()["data"] if e["type"] == "job_failed")

    seen_by_agent = await failed_event(agent_key)
    assert seen_by_agent["data"] == {
        "job_id": 7,
        "role": "charge",
        "error_type": "IdempotencyError",
    }
    assert "can only be used once" in (await failed_event(operator_key))["data"]["error"]
    result = await asyncio.to_thread(
        invoke_cli,
        monkeypatch,
        ["payments", "show", payment_id],
        database_url=database_url,
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 0, result.output
    assert "IdempotencyError: Keys for idempotent requests can only be used once" in result.output


async def test_cli_cancel_of_an_authorized_payment_says_it_is_asked_of_the_provider(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An authorized payment is canceled at the provider, by the charge role: the command
    printed `authorized` alone, which reads as "nothing happened"."""
    payment_id = (await create(api, agent_key, capture_method="manual"))["id"]
    await run_jobs(pool)
    result = await asyncio.to_thread(
        invoke_cli,
        monkeypatch,
        ["payments", "cancel", payment_id, "--operator", "alice"],
        database_url=database_url,
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert f"{payment_id}: authorized, cancel requested (by operator:alice)" in result.output
    await run_jobs(pool)
    async with pool.connection() as conn:
        assert (await payments.get(conn, payment_id))["status"] == "canceled"


def test_cli_steers_and_shows_a_payment(database_url: str, provider_base: str) -> None:
    async def setup() -> tuple[str, int]:
        async with open_pool(database_url, min_size=1, max_size=2) as pool, bind(pool):
            async with pool.connection() as conn, conn.transaction():
                agent, _ = await agents.create(conn, "cli-agent")
                p = await _payment(conn, agent.id)
                q = await _payment(conn, agent.id)
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT id FROM procrastinate_jobs WHERE args->>'payment_id' = %s", (q["id"],)
                )
                row = await cur.fetchone()
        return p["id"], row["id"]

    payment_id, job_id = asyncio.run(setup())
    runner = CliRunner()
    env = {"DATABASE_URL": database_url}
    result = runner.invoke(
        cli, ["jobs", "cancel", str(job_id), "--operator", "alice", "--reason", "bad"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "cancelled" in result.output and "operator:alice" in result.output
    result = runner.invoke(cli, ["payments", "cancel", payment_id, "--operator", "alice"], env=env)
    assert result.exit_code == 0, result.output
    assert "canceled" in result.output
    result = runner.invoke(cli, ["payments", "cancel", payment_id, "--operator", "alice"], env=env)
    assert result.exit_code == 1  # already canceled: refused
    result = runner.invoke(cli, ["payments", "cancel", "pay_nope"], env=env)
    assert result.exit_code == 2
    result = runner.invoke(cli, ["payments", "show", "pay_nope", "--json"], env=env)
    # The reason on stderr: stdout, where a script reads the JSON, stays empty.
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    assert "pay_nope" in result.stderr
    result = runner.invoke(cli, ["payments", "show", payment_id], env={**env, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "received" in result.output and "canceled" in result.output
    assert "operator:alice" in result.output
    result = runner.invoke(cli, ["status"], env={**env, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pricing" in result.output and "Queues" in result.output

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT type, actor, to_status FROM payment_events WHERE actor = 'operator:alice'"
            " ORDER BY id"
        ).fetchall()
        job = conn.execute(
            "SELECT status FROM procrastinate_jobs WHERE id = %s", (job_id,)
        ).fetchone()
    assert [(r["type"], r["to_status"]) for r in rows] == [
        ("operator_job_cancel", "received"),
        ("transition", "canceled"),
    ]
    assert job == {"status": "cancelled"}


async def test_retrying_a_failed_job_gives_it_whole_retries_unless_its_work_is_back(
    pool: Pool,
) -> None:
    """An operator's retry of a failed job: refused while another job already does the same
    work (the sweep may have put it back: two would race); else the job is back with its
    attempts at 0 (a job that had used them all would fail for good at its first glitch)."""
    from api.routes.ops import Refused, retry_job

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "retry-agent")
        payment = await _payment(conn, agent.id)
        job_id = await _claim(conn, "pricing")
        await conn.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (job_id,))
        await conn.execute("UPDATE procrastinate_jobs SET attempts = 12 WHERE id = %s", (job_id,))
        await defer(conn, "pricing", payment_id=payment["id"])  # the sweep's re-drive
    with pytest.raises(Refused) as refused:
        async with pool.connection() as conn, conn.transaction():
            await retry_job(conn, job_id, actor="operator:test")
    assert refused.value.code == "conflict"

    assert await failed_last_hour(pool, "pricing") == 1
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("DELETE FROM procrastinate_jobs WHERE id <> %s", (job_id,))
        job = await retry_job(conn, job_id, actor="operator:test")
    assert (job["status"], job["attempts"]) == ("todo", 0)
    assert await failed_last_hour(pool, "pricing") == 0  # retried after the fix: the alert clears


async def test_a_failure_dealt_with_no_longer_fires_the_alert(pool: Pool) -> None:
    """`agentpay_jobs_failed_last_hour` counts a failed job until its work is done another
    way: the same job succeeded later (the sweep's re-drive), a pipeline step's payment moved
    on, or the payment ended without money moving. Any other failure still counts."""

    async def fail_one(conn: Any, queue: str) -> int:
        job_id = await _claim(conn, queue)
        await conn.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (job_id,))
        return job_id

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "alert-agent")
        first = await _payment(conn, agent.id)
        second = await _payment(conn, agent.id)
        await fail_one(conn, "pricing")
        await fail_one(conn, "pricing")
    assert await failed_last_hour(pool, "pricing") == 2

    # The sweep's re-drive of the first payment's pricing succeeds: that failure is done.
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, "pricing", payment_id=first["id"])
        redo = await _claim(conn, "pricing")
        await conn.execute("SELECT procrastinate_finish_job_v1(%s, 'succeeded', false)", (redo,))
    assert await failed_last_hour(pool, "pricing") == 1

    # The second payment is canceled by an operator: nothing is left to do for it.
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, second["id"])
        assert locked is not None
        await payments.transition(conn, locked, "canceled", actor="operator:test")
    assert await failed_last_hour(pool, "pricing") == 0

    # A failed charge whose payment then moved on (the sweep re-drives it as a reconcile).
    async with pool.connection() as conn, conn.transaction():
        third = await payments.insert(
            conn, agent_id=agent.id, currency="usd", payment_method="pm_card_visa", amount=500
        )
        await defer(conn, "charge", payment_id=third["id"])
        await fail_one(conn, "charge")
    assert await failed_last_hour(pool, "charge") == 1
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, third["id"])
        assert locked is not None
        await payments.transition(conn, locked, "priced", actor="worker:pricing")
    assert await failed_last_hour(pool, "charge") == 0

    # A refund job's failure is not hidden by its payment moving: only its own work counts.
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, "refund", payment_id=third["id"], refund_id="rfd_x")
        await fail_one(conn, "charge")
        locked = await payments.lock(conn, third["id"])
        assert locked is not None
        await payments.transition(conn, locked, "approved", actor="worker:risk")
    assert await failed_last_hour(pool, "charge") == 1


async def test_a_job_canceled_while_its_worker_was_dead_ends_aborted_and_can_be_retried(
    pool: Pool,
) -> None:
    """`jobs cancel` of a running job whose worker is in fact dead: the rescue ends it
    `aborted`, as asked, not `failed` (which fired the failure alert, and which a retry
    could not undo: procrastinate refuses a waiting job that still asks to abort). One left
    failed that way by an earlier release is retried all the same."""
    from api.routes.ops import cancel_job, retry_job
    from tasks.app import app
    from workers.maintenance import rescue_stalled_jobs

    async def job(job_id: int) -> dict[str, Any]:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status::text, abort_requested FROM procrastinate_jobs WHERE id = %s",
                (job_id,),
            )
            row = await cur.fetchone()
            assert row is not None
            return dict(row)

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "cancel-dead-agent")
        await _payment(conn, agent.id)
        canceled = await _claim(conn, "pricing")
        await _payment(conn, agent.id)
        left_failed = await _claim(conn, "pricing")
        await cancel_job(conn, canceled, actor="operator:test")
        await conn.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
        )
    assert await job(canceled) == {"status": "doing", "abort_requested": True}
    assert sorted(await rescue_stalled_jobs(app, stalled_after=60)) == [canceled, left_failed]
    assert await job(canceled) == {"status": "aborted", "abort_requested": False}
    assert await job(left_failed) == {"status": "todo", "abort_requested": False}

    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            """UPDATE procrastinate_jobs SET status = 'failed', abort_requested = true
                WHERE id = %s""",
            (left_failed,),
        )
        retried = await retry_job(conn, left_failed, actor="operator:test")
    assert (retried["status"], retried["abort_requested"]) == ("todo", False)


async def test_a_job_that_fails_for_good_is_re_driven_once_per_sweep_period(
    pool: Pool,
) -> None:
    """A payment whose job failed for good does not change, so its age alone would have the
    sweep re-drive it every maintenance round: it waits a sweep period after each failure."""
    from workers.maintenance import sweep_stuck_payments

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "failing-agent")
        payment = await _payment(conn, agent.id)
        job_id = await _claim(conn, "pricing")
        await conn.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (job_id,))
        await conn.execute("SET LOCAL session_replication_role = replica")  # no triggers
        await conn.execute(
            "UPDATE payment_jobs SET updated_at = now() - interval '1 hour' WHERE id = %s",
            (payment["id"],),
        )
    assert await sweep_stuck_payments(pool, older_than=600) == []  # failed a moment ago
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE procrastinate_events SET at = now() - interval '1 hour' WHERE job_id = %s",
            (job_id,),
        )
        # A refund sync waiting (it re-defers itself while a payment is `succeeded`) drives
        # no step: it does not hide the payment from the sweep.
        await defer(conn, "sync_refunds", payment_id=payment["id"], schedule_in=5)
    assert await sweep_stuck_payments(pool, older_than=600) == [payment["id"]]
    assert await sweep_stuck_payments(pool, older_than=600) == []  # its new job waits


async def test_a_dead_workers_job_is_rescued_and_its_row_goes(
    pool: Pool, settings: Settings
) -> None:
    """A worker killed mid-job: maintenance puts its job back at once, and removes its row
    after the retention, so no dead worker is counted as stalled for ever — but one that
    died lately is, for long enough to alert on; a live worker's row stays."""
    from tasks.app import app

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "dead-worker-agent")
        await _payment(conn, agent.id)
        job_id = await _claim(conn, "pricing")  # claimed by a fake worker
        await conn.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
        )
        cur = await conn.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
        alive = (await cur.fetchone())["id"]
        cur = await conn.execute(
            """INSERT INTO procrastinate_workers (last_heartbeat)
               VALUES (now() - interval '5 minutes') RETURNING id"""
        )
        died_lately = (await cur.fetchone())["id"]
    # (Short: the rescue waits until the test's Postgres has been up that long.)
    s = settings.model_copy(
        update={"stalled_after_seconds": 1.0, "stalled_worker_retention_seconds": 900.0}
    )
    maintenance = Maintenance(app, pool, s)

    async def rescued() -> bool:
        assert await maintenance.run_once()
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status::text AS status FROM procrastinate_jobs WHERE id = %s", (job_id,)
            )
            return (await cur.fetchone()) == {"status": "todo"}

    await async_wait_for(rescued, timeout=30, what="the rescue")
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM procrastinate_workers ORDER BY id")
        assert [r["id"] for r in await cur.fetchall()] == [alive, died_lately]
        snapshot = await read_snapshot(conn, s)
    stalled = [w for w in snapshot.workers if w["heartbeat_age_seconds"] >= 60.0]
    assert len(stalled) == 1  # what agentpay_workers{state="stalled"} counts


async def test_only_one_maintenance_round_runs_at_a_time(pool: Pool, settings: Settings) -> None:
    """Every worker process runs maintenance; a round takes a transaction-scoped advisory
    lock first, and a process that cannot get it skips its round, doing nothing (two
    sweeps at once would each re-drive the same stuck payment)."""
    from tasks.app import app
    from workers.maintenance import _LOCK_KEY

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "one-round-agent")
        payment = await _payment(conn, agent.id)
        # Its pricing job was lost, an hour ago: a payment the sweep re-drives.
        await conn.execute("DELETE FROM procrastinate_jobs")
        await conn.execute("SET LOCAL session_replication_role = replica")  # no triggers
        await conn.execute(
            "UPDATE payment_jobs SET updated_at = now() - interval '1 hour' WHERE id = %s",
            (payment["id"],),
        )

    async def jobs() -> list[tuple[str, str]]:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT task_name, args->>'payment_id' AS pid FROM procrastinate_jobs ORDER BY id"
            )
            return [(r["task_name"], r["pid"]) for r in await cur.fetchall()]

    maintenance = Maintenance(app, pool, settings.model_copy(update={"sweep_after_seconds": 600}))
    async with pool.connection() as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        assert await maintenance.run_once() is False
        assert await jobs() == []  # not re-driven
    # The other round's transaction ended: this one runs, and re-drives the payment.
    assert await maintenance.run_once() is True
    assert await jobs() == [("pricing", payment["id"])]


async def test_the_rescue_waits_for_heartbeats_after_the_database_comes_back(
    pool: Pool, settings: Settings
) -> None:
    """After a database outage every worker's heartbeat is as old as the outage: the rescue
    took live workers' running jobs (which then ran twice). It waits until the database has
    been up, and reachable from this process, for `stalled_after_seconds`."""
    from tasks.app import app

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "outage-agent")
        await _payment(conn, agent.id)
        job_id = await _claim(conn, "pricing")
        await conn.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '30 days'"
        )
        cur = await conn.execute(
            "SELECT extract(epoch FROM now() - pg_postmaster_start_time()) AS up"
        )
        up = float((await cur.fetchone())["up"])

    async def status() -> str:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT status::text AS s FROM procrastinate_jobs WHERE id = %s", (job_id,)
            )
            return str((await cur.fetchone())["s"])

    # Postgres started less than `stalled_after` ago (as after a restart): no rescue.
    restarted = Maintenance(
        app, pool, settings.model_copy(update={"stalled_after_seconds": up + 3600})
    )
    assert await restarted.run_once()
    assert await status() == "doing"

    # This process got the database back just now: no rescue until `stalled_after` passed.
    maintenance = Maintenance(app, pool, settings.model_copy(update={"stalled_after_seconds": 1.0}))
    try:
        raise RuntimeError("round failed") from psycopg.OperationalError("connection lost")
    except RuntimeError as error:
        maintenance.failed(error)
    assert await maintenance.run_once()
    assert await status() == "doing"

    async def rescued() -> bool:
        await maintenance.run_once()
        return await status() == "todo"

    await async_wait_for(rescued, timeout=30, what="the rescue once the wait is over")


def test_only_a_lost_database_holds_the_rescue_back() -> None:
    """A round that fails every time for another reason (a bug, a statement or lock timeout
    on a slow sweep, a deadlock) must not postpone the rescue round after round: only the
    database going away counts."""
    from psycopg_pool import PoolTimeout

    from workers.maintenance import database_lost

    def chained(cause: BaseException) -> BaseException:
        try:
            raise RuntimeError("round failed") from cause
        except RuntimeError as error:
            return error

    gone = [
        psycopg.OperationalError("connection refused"),  # no SQLSTATE: client side
        PoolTimeout("couldn't get a connection after 30.00 sec"),
        psycopg.errors.AdminShutdown(),
        psycopg.errors.ConnectionFailure(),
        chained(psycopg.OperationalError("server closed the connection unexpectedly")),
    ]
    there = [
        RuntimeError("a bug"),
        psycopg.errors.QueryCanceled(),
        psycopg.errors.LockNotAvailable(),
        psycopg.errors.DeadlockDetected(),
        psycopg.errors.DiskFull(),
        chained(psycopg.errors.QueryCanceled()),
    ]
    assert [database_lost(e) for e in gone] == [True] * len(gone)
    assert [database_lost(e) for e in there] == [False] * len(there)


async def test_a_starting_worker_keeps_the_rows_of_workers_that_died_lately(
    pool: Pool, settings: Settings
) -> None:
    """procrastinate deletes old worker rows whenever a worker starts (a deploy, a restart
    after a crash): only those past the retention go, so the stalled gauge still shows a
    crash a minute ago."""
    from tasks.app import app
    from workers.worker import _Worker

    async def worker_ids() -> list[int]:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM procrastinate_workers ORDER BY id")
            return [r["id"] for r in await cur.fetchall()]

    async with pool.connection() as conn:
        cur = await conn.execute(
            """INSERT INTO procrastinate_workers (last_heartbeat)
               VALUES (now() - interval '5 minutes'), (now() - interval '1 hour')
               RETURNING id"""
        )
        died_lately, died_long_ago = [r["id"] for r in await cur.fetchall()]
    s = settings.model_copy(
        update={"stalled_after_seconds": 60.0, "stalled_worker_retention_seconds": 900.0}
    )
    worker = _Worker.for_role(app, pool, "pricing", 1, s)
    running = asyncio.create_task(worker.run())
    try:
        ids = await async_wait_for(
            lambda: _registered(worker_ids, died_lately), what="the worker to register"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(running, timeout=30)
    assert died_lately in ids and died_long_ago not in ids


async def _registered(worker_ids: Any, known: int) -> list[int] | None:
    ids: list[int] = await worker_ids()
    return ids if max(ids) > known + 1 else None


async def test_stuck_requests_wait_on_the_fleet(pool: Pool) -> None:
    """A capture asked for and a refund left pending are the fleet's to move (the alert on
    waiting_on = 'fleet' must see them); an authorized payment nobody asked to capture waits
    on its agent."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "requests-agent")
        asked, refunding, holding = [await _payment(conn, agent.id) for _ in range(3)]
        await conn.execute("SET LOCAL session_replication_role = replica")  # states by hand
        old = "now() - interval '1 hour'"
        await conn.execute(
            f"""UPDATE payment_jobs SET status = 'authorized', updated_at = {old},
                       capture_requested_at = CASE WHEN id = %s THEN now() END
                 WHERE id = ANY(%s)""",
            (asked["id"], [asked["id"], holding["id"]]),
        )
        await conn.execute(
            "UPDATE payment_jobs SET status = 'reconciled', amount_total = 500 WHERE id = %s",
            (refunding["id"],),
        )
        await conn.execute(
            f"""INSERT INTO payment_refunds
                       (id, payment_id, amount, currency, actor, created_at, updated_at)
                VALUES ('rfd_stuck', %s, 500, 'usd', 'test', {old}, {old})""",
            (refunding["id"],),
        )
        await conn.execute("DELETE FROM procrastinate_jobs")
        cur = await conn.execute(
            "SELECT payment_id, status, waiting_on FROM ops_stuck_payments ORDER BY status"
        )
        rows = await cur.fetchall()
    assert {r["payment_id"]: (r["status"], r["waiting_on"]) for r in rows} == {
        asked["id"]: ("authorized", "fleet"),
        holding["id"]: ("authorized", "agent"),
        refunding["id"]: ("reconciled", "fleet"),
    }


async def test_a_payment_both_not_moving_and_refunding_is_stuck_once(
    pool: Pool, settings: Settings
) -> None:
    """A payment stuck in `succeeded` (its reconcile not run) with a refund pending was two
    rows of ops_stuck_payments, and agentpay_stuck_payments counted it twice. One row, from
    the older of the two, saying both."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "twice-agent")
        paid, refunding = [await _payment(conn, agent.id) for _ in range(2)]
        await conn.execute("SET LOCAL session_replication_role = replica")  # states by hand
        await conn.execute(
            """UPDATE payment_jobs SET status = 'succeeded',
                      updated_at = now() - interval '10 minutes' WHERE id = %s""",
            (paid["id"],),
        )
        await conn.execute(
            "UPDATE payment_jobs SET status = 'reconciled' WHERE id = %s", (refunding["id"],)
        )
        await conn.execute(
            """INSERT INTO payment_refunds (id, payment_id, amount, currency, actor, created_at)
               VALUES ('rfd_both', %s, 100, 'usd', 'test', now() - interval '1 hour'),
                      ('rfd_only', %s, 100, 'usd', 'test', now() - interval '20 minutes')""",
            (paid["id"], refunding["id"]),
        )
        await conn.execute("DELETE FROM procrastinate_jobs")
    async with pool.connection() as conn:
        s = await read_snapshot(conn, settings)
    assert [(r["payment_id"], r["waiting_on"], r["stuck_on"]) for r in s.stuck] == [
        (paid["id"], "fleet", "not_moving,refund_pending"),
        (refunding["id"], "fleet", "refund_pending"),
    ]
    assert 3500 < s.stuck[0]["stuck_seconds"] < 3700  # since the refund was asked for
    assert s.stuck_by_waiting_on() == {"fleet": 2, "operator": 0, "agent": 0}


_DIRECT_TRANSITIONS = """
SELECT coalesce(from_status, '') AS from_status, coalesce(to_status, '') AS to_status,
       count(*) AS total
  FROM payment_events WHERE type IN ('created', 'transition') GROUP BY 1, 2 ORDER BY 1, 2
"""
_DIRECT_WEBHOOKS = """
SELECT type, CASE WHEN handled THEN 'handled' ELSE 'ignored' END AS outcome, count(*) AS total
  FROM webhook_events GROUP BY 1, 2 ORDER BY 1, 2
"""


async def test_the_ops_counts_are_the_events_counted_and_folding_keeps_them(
    pool: Pool, database_url: str
) -> None:
    """/metrics' transition and webhook counters come from running totals (every scrape
    counted the whole history before): they must equal the events themselves, leave out a
    rolled-back one, and stay the same when the totals of closed connections are folded."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "totals-agent")
    connections = [
        await psycopg.AsyncConnection.connect(database_url, autocommit=True, row_factory=dict_row)
        for _ in range(3)
    ]
    pids = []
    for n, c in enumerate(connections):
        pids.append((await (await c.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"])
        async with c.transaction():
            p = await _payment(c, agent.id)
            locked = await payments.lock(c, p["id"])
            assert locked is not None
            await payments.transition(c, locked, "canceled", actor="test", reason="totals")
            await c.execute(
                """INSERT INTO webhook_events (id, type, payload, handled)
                   VALUES (%s, 'payment_intent.succeeded', '{}', %s)""",
                (f"evt_totals_{n}", n % 2 == 0),
            )
    with pytest.raises(RuntimeError):
        async with connections[0].transaction():
            await _payment(connections[0], agent.id)
            raise RuntimeError("rolled back")

    async def counts() -> list[list[dict[str, Any]]]:
        queries = (
            "SELECT * FROM ops_transition_counts",
            _DIRECT_TRANSITIONS,
            "SELECT * FROM ops_webhook_counts",
            _DIRECT_WEBHOOKS,
        )
        async with pool.connection() as conn:
            return [[dict(r) for r in await (await conn.execute(q)).fetchall()] for q in queries]

    before = await counts()
    transitions, direct_transitions, webhooks, direct_webhooks = before
    assert transitions == direct_transitions
    assert {(t["from_status"], t["to_status"]): t["total"] for t in transitions} == {
        ("", "received"): 3,
        ("received", "canceled"): 3,
    }
    assert webhooks == direct_webhooks
    assert {(w["outcome"], w["total"]) for w in webhooks} == {("handled", 2), ("ignored", 1)}
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT DISTINCT backend FROM ops_transition_totals")
        assert set(pids) <= {r["backend"] for r in await cur.fetchall()}
        # A webhook event's outcome cannot change under its total.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("UPDATE webhook_events SET handled = NOT handled")

    for c in connections:
        await c.close()

    async def gone() -> bool:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            )
            row = await cur.fetchone()
            return bool(row and row["n"] == 0)

    await async_wait_for(gone, what="the closed connections' backends to end")
    assert await fold_counts(pool) >= 2 * len(pids)
    assert await counts() == before
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM ops_transition_totals WHERE backend = ANY(%s))
                    + (SELECT count(*) FROM ops_webhook_totals WHERE backend = ANY(%s)) AS n""",
            (pids, pids),
        )
        assert (await cur.fetchone())["n"] == 0


async def test_the_stuck_view_covers_every_non_final_state_and_reads_no_final_payment(
    pool: Pool,
) -> None:
    """ops_stuck_payments names the states it reads (so the planner reads them through their
    index instead of every payment a scrape): every non-final state of payment_states must be
    among them, and thousands of final payments must not be read."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "stuck-states-agent")
        cur = await conn.execute(
            """SELECT status FROM payment_states
                WHERE NOT is_final AND status <> 'partially_refunded'"""
        )
        waiting = [r["status"] for r in await cur.fetchall()]
        stuck = {s: (await _payment(conn, agent.id))["id"] for s in waiting}
        await conn.execute("SET LOCAL session_replication_role = replica")  # states by hand
        for status, payment_id in stuck.items():
            await conn.execute(
                """UPDATE payment_jobs SET status = %s, updated_at = now() - interval '1 hour'
                    WHERE id = %s""",
                (status, payment_id),
            )
        await conn.execute(
            """INSERT INTO payment_jobs (id, agent_id, currency, payment_method, status,
                                         amount_requested, updated_at)
               SELECT 'pay_final_' || g, %s, 'usd', 'pm_card_visa', 'reconciled', 500,
                      now() - interval '1 hour'
                 FROM generate_series(1, 5000) AS g""",
            (agent.id,),
        )
        await conn.execute("DELETE FROM procrastinate_jobs")
    async with pool.connection() as conn:
        await conn.execute("ANALYZE payment_jobs")
        cur = await conn.execute("SELECT payment_id, status FROM ops_stuck_payments")
        assert {r["status"]: r["payment_id"] for r in await cur.fetchall()} == stuck
        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM ops_stuck_payments")
        row = await cur.fetchone()
        assert row is not None
    read = 0
    plans = [row["QUERY PLAN"][0]["Plan"]]
    while plans:
        node = plans.pop()
        plans.extend(node.get("Plans", []))
        if node.get("Relation Name") == "payment_jobs":
            loops = node.get("Actual Loops", 1)
            read += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * loops
    assert read <= len(stuck), read


async def test_pruning_deletes_finished_jobs_after_their_retention(
    pool: Pool, settings: Settings, agent_key: str, api: httpx.AsyncClient
) -> None:
    for _ in range(3):
        r = await api.post(
            "/v1/payments",
            json={"amount": 700, "currency": "usd", "payment_method": "pm_card_visa"},
            headers=auth(agent_key),
        )
        assert r.status_code == 202
    await run_jobs(pool)
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("SELECT count(*) AS n FROM procrastinate_jobs")
        before = (await cur.fetchone())["n"]
        assert before == 12  # 3 payments x 4 roles
        # Every job but the reconcile ones finished 2 hours ago.
        await conn.execute(
            """UPDATE procrastinate_events SET at = now() - interval '2 hours'
                WHERE job_id IN (SELECT id FROM procrastinate_jobs
                                  WHERE queue_name <> 'reconcile')"""
        )
        # Two failed jobs: one failed 2 hours ago, one 8 days ago.
        cur = await conn.execute(
            "SELECT id FROM procrastinate_jobs WHERE queue_name = 'reconcile' ORDER BY id"
        )
        reconcile_ids = [r["id"] for r in await cur.fetchall()]
        await conn.execute(
            "UPDATE procrastinate_jobs SET status = 'failed' WHERE id = ANY(%s)",
            (reconcile_ids[:2],),
        )
        for job_id, age in ((reconcile_ids[0], "2 hours"), (reconcile_ids[1], "8 days")):
            await conn.execute(
                """UPDATE procrastinate_events SET at = now() - %s::interval - interval '1 s'
                    WHERE job_id = %s""",
                (age, job_id),
            )
            await conn.execute(
                """INSERT INTO procrastinate_events (job_id, type, at)
                   VALUES (%s, 'failed', now() - %s::interval)""",
                (job_id, age),
            )
    events_before = await _count(pool, "payment_events")

    s = settings.model_copy(
        update={"prune_succeeded_after_seconds": 3600.0, "prune_failed_after_seconds": 86400.0}
    )
    from tasks.app import app

    assert await Maintenance(app, pool, s).run_once()
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, queue_name, status::text AS status FROM procrastinate_jobs ORDER BY id"
        )
        left = await cur.fetchall()
    # Kept: the recent reconcile job, and the failed job inside its retention.
    assert [(r["id"], r["status"]) for r in left] == [
        (reconcile_ids[0], "failed"),
        (reconcile_ids[2], "succeeded"),
    ]
    assert await _count(pool, "payment_events") == events_before  # the history stays
    # Nothing left to prune; a second run deletes nothing.
    assert await prune_finished_jobs(pool, succeeded_after=3600, failed_after=86400) == 0


async def _finished_jobs(pool: Pool, n: int) -> None:
    """`n` reconcile jobs that succeeded two hours ago."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            """WITH jobs AS (
                   INSERT INTO procrastinate_jobs (queue_name, task_name, status, args)
                   SELECT 'reconcile', 'reconcile', 'succeeded', '{"payment_id": "pay_old"}'
                     FROM generate_series(1, %s)
                   RETURNING id)
               INSERT INTO procrastinate_events (job_id, type, at)
               SELECT id, 'succeeded', now() - interval '2 hours' FROM jobs""",
            (n,),
        )


async def test_pruning_goes_on_every_round_while_its_batches_come_back_full(
    pool: Pool, settings: Settings
) -> None:
    """A fleet that finishes more jobs than one batch an interval: pruning does not fall
    behind for ever; once a batch comes back short, it waits for its interval again."""
    from tasks.app import app

    await _finished_jobs(pool, 5)
    s = settings.model_copy(update={"prune_batch_size": 2, "prune_interval_seconds": 3600.0})
    maintenance = Maintenance(app, pool, s)
    left = []
    for _ in range(3):
        assert await maintenance.run_once()
        left.append(await _count(pool, "procrastinate_jobs"))
    assert left == [3, 1, 0]
    await _finished_jobs(pool, 2)
    assert await maintenance.run_once()
    assert await _count(pool, "procrastinate_jobs") == 2  # the interval again


async def test_webhook_events_go_after_their_retention_and_stay_counted(
    pool: Pool, settings: Settings
) -> None:
    """Webhook events were kept forever. Past their retention the maintenance round deletes
    them, a batch a round while batches come back full; /metrics still counts them."""
    from tasks.app import app

    async with pool.connection() as conn:
        await conn.execute(
            """INSERT INTO webhook_events (id, type, payload, handled, received_at)
               SELECT 'evt_old_' || g, 'payment_intent.succeeded', '{}', false,
                      now() - interval '31 days'
                 FROM generate_series(1, 3) AS g"""
        )
        await conn.execute(
            """INSERT INTO webhook_events (id, type, payload, handled)
               VALUES ('evt_new', 'payment_intent.succeeded', '{}', false)"""
        )
        counted = await (await conn.execute("SELECT * FROM ops_webhook_counts")).fetchall()
    s = settings.model_copy(update={"prune_batch_size": 2, "prune_interval_seconds": 3600.0})
    maintenance = Maintenance(app, pool, s)
    left = []
    for _ in range(2):
        assert await maintenance.run_once()
        left.append(await _count(pool, "webhook_events"))
    assert left == [2, 1]  # two, then (a full batch: the next round) the last old one
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM webhook_events")
        assert [r["id"] for r in await cur.fetchall()] == ["evt_new"]
        assert await (await conn.execute("SELECT * FROM ops_webhook_counts")).fetchall() == counted


async def test_a_prune_that_fails_waits_its_interval_like_one_that_succeeds(
    pool: Pool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing prune (a statement timeout on a big table) is not run again every round."""
    import workers.maintenance as maintenance_module
    from tasks.app import app

    calls = []

    async def failing(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        raise psycopg.errors.QueryCanceled("statement timeout")

    monkeypatch.setattr(maintenance_module, "prune_finished_jobs", failing)
    maintenance = Maintenance(
        app, pool, settings.model_copy(update={"prune_interval_seconds": 3600.0})
    )
    with pytest.raises(psycopg.errors.QueryCanceled):
        await maintenance.run_once()
    assert await maintenance.run_once()  # the next round: no prune
    assert len(calls) == 1


async def test_pruning_keeps_a_job_an_operator_retries_meanwhile(pool: Pool) -> None:
    """The prune reads a failed job as old enough; an operator's retry of it commits before
    the prune deletes it: the job stays, back in the queue."""
    from api.routes.ops import retry_job

    job_id = await _failed_job(pool, "8 days")
    async with pool.connection() as operator, operator.transaction():
        await retry_job(operator, job_id, actor="operator:test", reason="fixed")
        pid = operator.info.backend_pid
        prune = asyncio.create_task(
            prune_finished_jobs(pool, succeeded_after=3600, failed_after=86400)
        )
        async with pool.connection() as watcher:

            async def prune_waits() -> bool:
                cur = await watcher.execute(
                    """SELECT count(*) AS n FROM pg_stat_activity
                        WHERE %s = ANY(pg_blocking_pids(pid))""",
                    (pid,),
                )
                return bool((await cur.fetchone())["n"]) or prune.done()

            await async_wait_for(prune_waits, what="the prune to wait for the retried job")
    await prune
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status::text AS status FROM procrastinate_jobs WHERE id = %s", (job_id,)
        )
        assert await cur.fetchone() == {"status": "todo"}
        await conn.execute("DELETE FROM procrastinate_jobs WHERE id = %s", (job_id,))


async def _failed_job(pool: Pool, *failed_ago: str) -> int:
    """A failed reconcile job that failed that long ago (each a Postgres interval)."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, status, args)
               VALUES ('reconcile', 'reconcile', 'failed', '{"payment_id": "pay_gone"}')
               RETURNING id"""
        )
        job_id: int = (await cur.fetchone())["id"]
        for ago in failed_ago:
            await conn.execute(
                """INSERT INTO procrastinate_events (job_id, type, at)
                   VALUES (%s, 'failed', now() - %s::interval)""",
                (job_id, ago),
            )
    return job_id


async def test_pruning_keeps_a_job_that_failed_again_lately(pool: Pool) -> None:
    """Failed 8 days ago, retried, failed again a moment ago: its retention starts again."""
    job_id = await _failed_job(pool, "8 days", "0 s")
    assert await prune_finished_jobs(pool, succeeded_after=3600, failed_after=86400) == 0
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE id = %s", (job_id,)
        )
        assert await cur.fetchone() == {"n": 1}
        await conn.execute("DELETE FROM procrastinate_jobs WHERE id = %s", (job_id,))


async def _count(pool: Pool, table: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(f"SELECT count(*) AS n FROM {table}")
        row = await cur.fetchone()
    n: int = row["n"]
    return n


def test_a_claim_stays_fast_behind_another_queues_backlog(database_url: str) -> None:
    """20,000 jobs waiting in `pricing`: a claim on `risk` reads about as many pages as with
    nothing waiting (counted by Postgres, so a busy machine cannot change it; the bench
    times it), and the claim's generic plan (the one plpgsql keeps after a few calls) reads
    the per-queue index, not procrastinate's index over every queue."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        worker = conn.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
        worker_id = worker.fetchone()[0]  # type: ignore[index]

        def claim_pages(n: int = 10) -> int:
            pages = []
            for _ in range(n):
                conn.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name) VALUES ('risk', 'risk')"
                )
                (explained,) = conn.execute(
                    """EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
                       SELECT id FROM procrastinate_fetch_job_v2(%s::varchar[], %s)""",
                    (["risk"], worker_id),
                ).fetchone()  # type: ignore[misc]
                top = explained[0]["Plan"]
                pages.append(top["Shared Hit Blocks"] + top["Shared Read Blocks"])
            return min(pages)

        empty = claim_pages()
        conn.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name)
               SELECT 'pricing', 'pricing' FROM generate_series(1, 20000)"""
        )
        conn.execute("ANALYZE procrastinate_jobs")
        backlog = claim_pages()
        conn.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name) VALUES ('risk', 'risk')"
        )
        # The claim's statement as plpgsql caches it: a generic plan, queue unknown; in the
        # worst case for it, statistics that see one queue name only.
        conn.execute("DELETE FROM procrastinate_jobs WHERE queue_name = 'risk'")
        conn.execute("ANALYZE procrastinate_jobs")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(
            """PREPARE claim(varchar[]) AS SELECT j.id FROM procrastinate_jobs j
                WHERE j.status = 'todo' AND j.queue_name = $1[1]
                ORDER BY j.priority DESC, j.id LIMIT 1"""
        )
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) EXECUTE claim('{risk}')"))
    assert "procrastinate_jobs_todo_queue_idx" in plan, plan
    assert 0 < backlog <= 2 * empty, (empty, backlog)


def test_log_lines_carry_ids_and_never_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("agentpay.test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    logs.set_role("charge")
    try:
        with logs.job_context(42, "pay_abc", "charge"):
            logger.warning(
                "calling with sk_test_supersecret and Bearer apk_verysecret; no database at "
                "postgresql://app:urlsecret@db.internal/pay nor at "
                "host=db port=5432 password=kwsecret user=app, nor password = 'quoted secret'"
                " (PGPASSWORD=envsecret, {'password': 'dictsecret'}, "
                "postgresql://app:at@secret@db/pay); see http://host:8000/a?next=b@c",
                extra={
                    "api_key": "apk_x",
                    "payment_method": "pm_card_chargeDeclinedInsufficientFunds",
                    "params": {"stripe_api_key": "sk_live_zzz", "amount": 5},
                },
            )
    finally:
        logs.set_role(None)
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert (line["job_id"], line["payment_id"], line["role"]) == (42, "pay_abc", "charge")
    text = stream.getvalue()
    for secret in (
        "supersecret",
        "verysecret",
        "apk_x",
        "sk_live_zzz",
        "InsufficientFunds",
        "urlsecret",
        "kwsecret",
        "quoted secret",
        "envsecret",
        "dictsecret",
        "at@secret",
    ):
        assert secret not in text
    # What is not secret stays readable.
    assert "postgresql://app:[redacted]@db.internal/pay" in line["message"]
    assert "port=5432 password=[redacted] user=app" in line["message"]
    assert "http://host:8000/a?next=b@c" in line["message"]
    assert line["params"]["amount"] == 5
    assert line["payment_method"] == "pm_card_…"


async def test_a_failed_job_without_a_payment_is_listed_and_its_retry_audited(
    pool: Pool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed catch-up (no payment) fired the failed-job alert while ops_recent_failures,
    agentpay_recent_failures{kind="job"} and `agentpay status` showed nothing of it: the
    worker recorded failures only in a payment's events. And its retry was audited nowhere."""
    from api.routes.ops import retry_job
    from tasks import catchup, provider
    from workers.cli_audit import describe

    async def refused(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise provider.ProviderError("PermissionError (403): the key may not read events")

    monkeypatch.setattr(provider, "list_events", refused)
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, catchup.TASK)
    await run_jobs(pool, ("reconcile",), observed=True)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM procrastinate_jobs WHERE task_name = %s", (catchup.TASK,)
        )
        [job] = await cur.fetchall()
        s = await read_snapshot(conn, settings)
    assert {q["role"]: q["failed_last_hour"] for q in s.queues}["reconcile"] == 1
    assert [
        (f["kind"], f["payment_id"], f["role"], f["task"], f["job_id"], f["code"], f["reason"])
        for f in s.failures
    ] == [
        (
            "job",
            None,
            "reconcile",
            catchup.TASK,
            job["id"],
            "ProviderError",
            "PermissionError (403): the key may not read events",
        )
    ]
    assert s.counts["failures_by_kind"] == {"job": 1}

    async with pool.connection() as conn, conn.transaction():
        await retry_job(conn, job["id"], actor="operator:ann", reason="key fixed")
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT actor, action, subject, data FROM operator_audit")
        [row] = await cur.fetchall()
    assert (row["actor"], row["action"], row["subject"]) == (
        "operator:ann",
        "job.retry",
        str(job["id"]),
    )
    assert describe(row["action"], row["data"]) == (
        f"{catchup.TASK} job (reconcile), failed: key fixed"
    )

    async with pool.connection() as conn:  # kept as long as failed jobs are
        await conn.execute("UPDATE job_failures SET at = now() - interval '8 days'")
    await prune_finished_jobs(pool, succeeded_after=3600, failed_after=7 * 86400)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM job_failures")
        assert (await cur.fetchone())["n"] == 0


async def test_a_payment_locked_in_psql_makes_its_step_give_way_and_say_so(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    database_url: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator's `SELECT … FOR UPDATE` left open in psql held the pricing job waiting for
    as long as it was held (its worker alive, so no rescue), and a few such rows held every
    slot of the role. A worker's statement now gives up after its lock timeout (here
    shortened): the job is tried again later, and the log says so at once. Once the lock
    goes, the payment goes on."""
    from workers import worker as worker_module

    monkeypatch.setattr(worker_module, "WORKER_SESSION", {"lock_timeout": "300ms"})
    created = await create(api, agent_key)
    locker = await psycopg.AsyncConnection.connect(database_url)
    await locker.execute("BEGIN")
    await locker.execute("SELECT 1 FROM payment_jobs WHERE id = %s FOR UPDATE", (created["id"],))
    role = worker_module.RoleWorker("pricing", concurrency=2, settings=settings)
    running = asyncio.create_task(role.run())
    try:

        async def said() -> bool:
            return any(
                r.getMessage() == "job failed; it will be tried again"
                and getattr(r, "error_type", "") == "LockNotAvailable"
                and getattr(r, "task", "") == "pricing"
                for r in caplog.records
            )

        with caplog.at_level(logging.WARNING, logger="agentpay.worker"):
            await async_wait_for(said, timeout=30, what="the retry's warning")
        await locker.execute("ROLLBACK")

        async def priced() -> bool:
            async with pool.connection() as conn:
                payment = await payments.get(conn, created["id"])
            return payment is not None and payment["status"] == "priced"

        await async_wait_for(priced, timeout=30)
    finally:
        await locker.close()
        role.stop()
        await asyncio.wait_for(running, 60)


def test_status_behind_a_locked_table_says_so_instead_of_waiting(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LOCK TABLE payment_jobs` left open in psql (or a migration taking long): `agentpay
    status` waited for as long as it was held, silent. It gives up after the CLI's lock
    timeout, says why, and exits 3."""
    with psycopg.connect(database_url) as locker:
        locker.execute("LOCK TABLE payment_jobs")
        result = invoke_cli(monkeypatch, ["status"], database_url=database_url)
    assert result.exit_code == 3, result.output
    assert "Another transaction holds" in result.output
