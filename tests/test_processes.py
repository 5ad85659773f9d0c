"""Real processes: role workers competing for jobs, the dev stack, and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from rich.console import Console

from tasks import agents, payments
from tasks.app import defer
from tasks.db import Pool
from tasks.settings import ROLES, Settings
from tests.conftest import (
    FAST_ENV,
    auth,
    quit_postgres_under,
    run_jobs,
    server_port,
    stop_and_read,
    wait_for,
)
from tests.conftest import stop_process as stop
from tests.test_pipeline import create
from workers.demo import run_demo
from workers.devstack import _dev_keys, _waiting_on_the_provider, new_agent_keys

ROOT = Path(__file__).resolve().parent.parent


def start_worker(role: str, database_url: str, concurrency: int = 4) -> subprocess.Popen[bytes]:
    env = {**os.environ, **FAST_ENV, "DATABASE_URL": database_url}
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", role, "--concurrency", str(concurrency)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_two_workers_of_one_role_never_work_the_same_job(
    pool: Pool, database_url: str
) -> None:
    n = 150
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "busy-agent")
        for _ in range(n):
            p = await payments.insert(
                conn, agent_id=agent.id, currency="usd", payment_method="pm_card_visa", amount=500
            )
            await defer(conn, "pricing", payment_id=p["id"])

    workers = [start_worker("pricing", database_url), start_worker("pricing", database_url)]
    try:
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:

            def all_priced() -> bool:
                row = conn.execute(
                    "SELECT count(*) AS n FROM payment_jobs WHERE status = 'priced'"
                ).fetchone()
                return row is not None and row["n"] == n

            wait_for(all_priced, timeout=60, what="every payment priced")
            for w in workers:
                assert w.poll() is None, "a worker died"
    finally:
        codes = [stop(w) for w in workers]  # each one stopped (killed if it hangs)
    assert codes == [0, 0]

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        started = conn.execute(
            """SELECT j.id, count(*) AS starts, min(j.worker_id) AS w
               FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id
               WHERE j.queue_name = 'pricing' AND e.type = 'started' GROUP BY j.id"""
        ).fetchall()
        assert len(started) == n
        assert all(row["starts"] == 1 for row in started)
        transitions = conn.execute(
            """SELECT payment_id, count(*) AS n FROM payment_events
               WHERE from_status = 'received' AND to_status = 'priced' GROUP BY payment_id"""
        ).fetchall()
        assert len(transitions) == n
        assert all(row["n"] == 1 for row in transitions)
        risk_jobs = conn.execute(
            "SELECT count(DISTINCT args->>'payment_id') AS d, count(*) AS n FROM procrastinate_jobs"
            " WHERE queue_name = 'risk'"
        ).fetchone()
        assert risk_jobs == {"d": n, "n": n}
        left = conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'doing'"
        ).fetchone()
        assert left == {"n": 0}


def test_demo_ends_with_every_payment_where_it_should(settings: Settings) -> None:
    out = io.StringIO()
    ok = run_demo(
        settings,
        payments=40,
        agents=3,
        workers_per_role=1,
        port=0,
        console=Console(file=out, width=120),
    )
    assert ok, out.getvalue()
    text = out.getvalue()
    assert "Every payment reached the state it should" in text
    assert "p99 latency" in text
    # A stack of its own: a `dev` stack running in the data directory is left alone.
    assert (settings.data_dir / "demo" / "logs" / "api.log").exists()
    with psycopg.connect(settings.resolved_database_url(), row_factory=dict_row) as conn:
        rows = conn.execute(
            """SELECT payment_method, status, failure_code, count(*) AS n FROM payment_jobs
               GROUP BY 1, 2, 3"""
        ).fetchall()
    assert sum(r["n"] for r in rows) == 40
    for r in rows:
        if r["payment_method"] == "pm_card_visa":
            assert (r["status"], r["failure_code"]) == ("reconciled", None)
        elif r["payment_method"] == "pm_card_chargeDeclined":
            assert (r["status"], r["failure_code"]) == ("failed", "card_declined")
        else:
            assert (r["status"], r["failure_code"]) == ("failed", "insufficient_funds")


async def test_each_dev_start_revokes_the_keys_of_the_one_before(
    pool: Pool, database_url: str
) -> None:
    """stack.json's keys are the dev stack's only: an operator key left in an old copy of it
    (or in a shell history) does not keep working after the next start."""
    from api.ratelimit import authenticate

    first = await _dev_keys(database_url)
    second = await _dev_keys(database_url)
    demo = await _dev_keys(database_url, "demo")  # a demo on the same database
    async with pool.connection() as conn:
        for key in first:
            assert await authenticate(conn, key, rate=0, burst=0) is None
        for key in (*second, *demo):
            assert await authenticate(conn, key, rate=0, burst=0) is not None


def test_a_stack_does_not_start_over_one_that_runs(tmp_path: Path) -> None:
    """A second `dev` on the port of a running API (its readiness check would have found the
    other stack and reported it as its own), or in the data directory of a running stack
    (it revoked that stack's keys and deleted its stack.json), is refused before it starts
    anything."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from workers.devstack import DevStack, StackError

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    running = HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=running.serve_forever, daemon=True).start()
    try:
        port = running.server_address[1]
        settings = Settings(database_url=None, stripe_api_base=None, data_dir=tmp_path)
        with pytest.raises(StackError, match=f"port {port} is in use"):
            DevStack(settings, port=port).start()
        settings.stack_file.write_text(json.dumps({"api_url": f"http://127.0.0.1:{port}"}))
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            other_port = free.getsockname()[1]
        with pytest.raises(StackError, match="a stack already runs"):
            DevStack(settings, port=other_port).start()
        assert settings.stack_file.exists()  # the running stack's file is left alone
        assert not (tmp_path / "pg").exists()  # nothing was started
    finally:
        running.shutdown()
        running.server_close()


def test_a_stack_stops_its_sandbox_webhooks_before_its_processes(tmp_path: Path) -> None:
    """As the stack stops, its sandbox stops sending webhooks first: retried deliveries to
    the API that stops next would only fail, then give up, each with a warning printed
    after the demo's last line. Then the processes stop, then the sandbox."""
    from workers.devstack import Child, DevStack

    calls: list[str] = []

    class Sandbox:
        def stop_webhooks(self) -> int:
            calls.append("sandbox: stop webhooks")
            return 0

        def stop(self) -> None:
            calls.append("sandbox: stop")

    class Process(Child):
        def signal(self, sig: int) -> None:
            calls.append(f"{self.name}: {signal.Signals(sig).name}")

        def wait(self, timeout: float) -> bool:
            return True

    settings = Settings(database_url="postgresql://unused", data_dir=tmp_path)
    stack = DevStack(settings, port=server_port())
    stack._started = True  # as `start` had
    stack.sandbox = Sandbox()
    for name in ("api", "charge.1"):
        stack.children[name] = Process(name, [], tmp_path / f"{name}.log")
    stack.stop()
    assert calls == [
        "sandbox: stop webhooks",
        "api: SIGTERM",
        "charge.1: SIGTERM",
        "sandbox: stop",
    ]


async def test_dev_counts_the_payments_a_restarted_sandbox_cannot_finish(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, database_url: str
) -> None:
    """The sandbox keeps its PaymentIntents in memory: after `dev` starts again, a payment
    the earlier start left authorized can never be captured (nor a pending refund made).
    `dev` says how many there are; finished ones and ones not at the provider do not count."""

    for capture in ("manual", "automatic"):
        await create(api, agent_key, capture_method=capture)
    await run_jobs(pool)
    await create(api, agent_key)  # still received
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT status, count(*) AS n FROM payment_jobs GROUP BY 1")
        assert {r["status"]: r["n"] for r in await cur.fetchall()} == {
            "authorized": 1,
            "reconciled": 1,
            "received": 1,
        }
    assert await _waiting_on_the_provider(database_url) == 1


def test_only_the_first_stop_signal_interrupts() -> None:
    """SIGTERM interrupts a stack's command as Ctrl-C does, once: another SIGTERM (CI and
    process managers ask again) landing before the clean-up held signals off interrupted the
    clean-up too (the full suite caught a demo that left its stack.json so)."""
    script = """
import os, signal, time
from workers.cli_common import stop_signals_interrupt
stop_signals_interrupt()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # ends at the interrupt (not synchronisation: it is what is interrupted)
except KeyboardInterrupt:
    print("interrupted", flush=True)
try:  # the clean-up, asked to stop again
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.2)  # clean-up work the signals must not cut short (not synchronisation)
    print("clean-up done", flush=True)
except KeyboardInterrupt:
    print("clean-up interrupted", flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split("\n")[:2] == ["interrupted", "clean-up done"], done


def test_a_demo_stopped_by_sigterm_stops_all_it_started(tmp_path: Path) -> None:
    """`kill` (or CI's timeout) on `agentpay demo` ended it at once, leaving its API, its
    workers and its Postgres running; it now stops them, as Ctrl-C does."""
    data_dir = Path("/tmp") / f"apdemo{os.getpid()}"  # short: Postgres' socket lives in it
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STRIPE_API_BASE")}
    port = server_port()
    argv = ["demo", "--payments", "5000", "--port", str(port), "--data-dir", str(data_dir)]
    demo = subprocess.Popen(
        [sys.executable, "-m", "workers", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop_and_read can kill it all
    )

    try:
        # Stopped as soon as it is up: the moment (after its stack.json, before its run) a
        # stop used to skip its clean-up, leaving the API and workers behind.
        wait_for((data_dir / "demo" / "stack.json").exists, timeout=90, what="the demo's stack")
        demo.send_signal(signal.SIGTERM)  # and again, impatiently, while it stops
        output = stop_and_read(demo, data_dir=data_dir)[0]
        assert "Traceback" not in output, output
        assert not list(data_dir.rglob("postmaster.pid")), output  # its Postgres stopped
        assert not (data_dir / "demo" / "stack.json").exists(), output
        with pytest.raises(httpx.ConnectError):  # and its API
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what it left behind, if it did
            os.killpg(demo.pid, signal.SIGKILL)
        quit_postgres_under(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_dev_command_runs_the_stack_on_embedded_postgres_and_stops_it(tmp_path: Path) -> None:
    """`agentpay dev` with no DATABASE_URL and no STRIPE_API_BASE: everything it needs it starts,
    writes stack.json, serves payments end to end, and stops everything on SIGTERM."""
    data_dir = Path("/tmp") / f"apdev{os.getpid()}"  # short: Postgres' socket lives in it
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STRIPE_API_BASE")}
    env.update(FAST_ENV)
    port = server_port(1 + len(ROLES))  # the API's, then one per worker, counting up
    metrics_base = port + 1
    env["AGENTPAY_METRICS_PORT"] = str(metrics_base)
    dev = subprocess.Popen(
        [sys.executable, "-m", "workers", "dev", "--port", str(port), "--data-dir", str(data_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop_and_read can kill it all
        # As a script's background job (`agentpay dev &`) starts: with SIGINT ignored. Its
        # SIGTERM, turned into a SIGINT, used to do nothing then.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    stack_file = data_dir / "stack.json"
    try:
        wait_for(stack_file.exists, timeout=90, what="stack.json")
        stack = json.loads(stack_file.read_text())
        assert stack_file.stat().st_mode & 0o777 == 0o600  # it holds keys
        assert set(stack) >= {
            "api_url",
            "database_url",
            "provider_base",
            "webhook_secret",
            "operator_key",
            "agent_key",
        }
        assert stack["api_url"] == f"http://127.0.0.1:{port}"
        response = httpx.post(
            f"{stack['api_url']}/v1/payments",
            json={"amount": 1234, "currency": "usd", "payment_method": "pm_card_visa"},
            headers=auth(stack["agent_key"]),
        )
        assert response.status_code == 202, response.text
        pid = response.json()["id"]

        def reconciled() -> bool:
            r = httpx.get(f"{stack['api_url']}/v1/payments/{pid}", headers=auth(stack["agent_key"]))
            return bool(r.json()["status"] == "reconciled")

        wait_for(reconciled, timeout=60, what="the payment to be reconciled")
        # AGENTPAY_METRICS_PORT set for the whole stack: every worker serves its metrics on
        # a port of its own, instead of all but one failing to bind the same port.
        ports = dict(pair.split("=") for pair in stack["worker_metrics_ports"].split())
        assert sorted(ports) == sorted(f"{role}.1" for role in ROLES)
        for name, metrics_port in ports.items():
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            assert "agentpay_job_duration_seconds" in scraped, name
            # No provider call failed, yet the error series an alert's rate() watches exist.
            assert 'agentpay_provider_errors_total{error="Unknown"' in scraped, name
    finally:
        try:
            output = stop_and_read(dev, data_dir=data_dir)[0]
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    assert dev.returncode == 0, output
    assert not stack_file.exists()
    # Nothing it started is left running: the API port is free again.
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        raise AssertionError("the API still answers after the stack stopped")
    except httpx.ConnectError:
        pass


def test_the_api_stops_cleanly_on_sigterm(database_url: str, tmp_path: Path) -> None:
    """A process manager's stop (SIGTERM) ends `agentpay api` with status 0 after a graceful
    shutdown, not by dying of the signal."""
    port = server_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "workers", "api", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url, "AGENTPAY_DATA_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{port}"), timeout=60, what="the API")
    finally:
        stderr = stop_and_read(api)[1]
    assert api.returncode == 0, stderr[-2000:]


def test_a_stopping_api_answers_its_long_polls_at_once(database_url: str, tmp_path: Path) -> None:
    """SIGTERM while an agent long-polls (timeout 60): the wait answers at once with the
    payment as it is, and the process exits well inside a process manager's kill timeout
    (uvicorn waited for every open request: the stop took the whole minute)."""
    import threading

    port = server_port()
    env = {**os.environ, "DATABASE_URL": database_url, "AGENTPAY_DATA_DIR": str(tmp_path)}
    api = subprocess.Popen(
        [sys.executable, "-m", "workers", "api", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    answers: list[httpx.Response] = []
    try:
        wait_for(lambda: _ready(base), timeout=60, what="the API")
        (key,) = asyncio.run(new_agent_keys(database_url, "stopping-api-agent", 1))
        created = httpx.post(
            f"{base}/v1/payments",
            json={"amount": 1000, "currency": "usd", "payment_method": "pm_card_visa"},
            headers=auth(key),
        ).json()  # no workers: it stays `received`

        def long_poll() -> None:
            answers.append(
                httpx.get(
                    f"{base}/v1/payments/{created['id']}/wait",
                    params={"timeout": 60},
                    headers=auth(key),
                    timeout=90,
                )
            )

        waiter = threading.Thread(target=long_poll)
        waiter.start()

        def listening() -> bool:  # the API's listener starts with its first waiter
            with psycopg.connect(database_url, autocommit=True) as conn:
                row = conn.execute(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE datname = current_database()
                          AND query = 'LISTEN agentpay_payment_status'"""
                ).fetchone()
            return bool(row and row[0])

        wait_for(listening, timeout=30, what="the long-poll to wait")
    finally:
        stderr = stop_and_read(api, timeout=20)[1]
    waiter.join(timeout=5)
    assert api.returncode == 0, stderr[-2000:]
    assert [(a.status_code, a.json()["status"]) for a in answers] == [(200, "received")]


def test_the_api_serves_one_port_from_several_processes(database_url: str, tmp_path: Path) -> None:
    """`agentpay api --processes 2`: two processes answer on one port (each with its own
    pool, seen in pg_stat_activity), payments are taken, and SIGTERM stops them all."""
    port = server_port()
    env = {**os.environ, **FAST_ENV, "DATABASE_URL": database_url}
    api = subprocess.Popen(
        [sys.executable, "-m", "workers", "api", "--port", str(port), "--processes", "2"],
        cwd=ROOT,
        env={**env, "AGENTPAY_DATA_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: stop_and_read can kill it all
    )
    base = f"http://127.0.0.1:{port}"
    children: list[int] = []

    def serving_processes() -> set[int]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = conn.execute(
                """SELECT DISTINCT pid FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = 'agentpay-api'"""
            ).fetchall()
        return {row[0] for row in rows}

    try:
        wait_for(lambda: _ready(base), timeout=60, what="the API")
        (key,) = asyncio.run(new_agent_keys(database_url, "multi-process-agent", 1))
        for n in range(20):
            response = httpx.post(
                f"{base}/v1/payments",
                json={"amount": 1000 + n, "currency": "usd", "payment_method": "pm_card_visa"},
                headers=auth(key),
            )
            assert response.status_code == 202, response.text
        # Each process opens its own pool (min_size connections at least): two pools'
        # minimum of backends means both processes are up and connected.
        wait_for(
            lambda: len(serving_processes()) >= 2 * Settings().pool_min_size,
            timeout=30,
            what="both API processes' pools",
        )
        children = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and _parent(int(p.name)) == api.pid
            and b"spawn_main" in _cmdline(int(p.name))  # not the resource tracker
        ]
        assert len(children) == 2, children
    finally:
        stderr = stop_and_read(api)[1]
    assert api.returncode == 0, stderr[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM payment_jobs").fetchone()
    assert row is not None and row[0] == 20


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])
