"""The fleet heals itself, with real processes: a SIGKILLed worker's job is rescued, SIGTERM
lets a running job finish, and a Postgres restart under load needs no process restart."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

import schema
from sandbox.server import SandboxServer
from tasks import agents, payments
from tasks.app import defer
from tasks.db import Pool, open_pool
from tasks.settings import ROLES, SANDBOX_API_KEY
from tests.conftest import FAST_ENV, async_wait_for, auth, run_jobs, server_port, wait_for
from tests.conftest import stop_process as stop
from tests.test_faults import injected
from workers.pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


def start(
    argv: list[str], database_url: str, provider_base: str, **env: str
) -> subprocess.Popen[bytes]:
    full_env = {
        **os.environ,
        **FAST_ENV,
        "DATABASE_URL": database_url,
        "STRIPE_API_BASE": provider_base,
        "STRIPE_API_KEY": SANDBOX_API_KEY,
        **env,
    }
    # Logs go to a file: a pipe nobody reads would block a chatty process mid-outage.
    log = tempfile.NamedTemporaryFile(prefix=f"{argv[0]}-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", *argv],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    LOGS[process.pid] = Path(log.name)
    log.close()
    return process


LOGS: dict[int, Path] = {}


@pytest.fixture(autouse=True, scope="module")
def _remove_logs() -> Iterator[None]:
    """The processes' log files go once the module's tests are done (they are read on failure)."""
    yield
    for path in LOGS.values():
        path.unlink(missing_ok=True)


def tail(process: subprocess.Popen[bytes]) -> str:
    path = LOGS.get(process.pid)
    return path.read_text(errors="replace")[-3000:] if path else ""


def worker(role: str, database_url: str, provider_base: str, **env: str) -> subprocess.Popen[bytes]:
    return start(["worker", role, "--concurrency", "4"], database_url, provider_base, **env)


def sandbox_faults(provider_base: str, **config: Any) -> None:
    httpx.post(f"{provider_base}/_sandbox/faults", json=config).raise_for_status()


def intents_for(provider_base: str, payment_id: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{provider_base}/v1/payment_intents/search",
        params={"query": f"metadata['payment_id']:'{payment_id}'"},
        headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"},
    )
    r.raise_for_status()
    found: list[dict[str, Any]] = r.json()["data"]
    return found


def db(database_url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(database_url, autocommit=True, row_factory=dict_row)


def one(conn: psycopg.Connection[dict[str, Any]], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else next(iter(row.values()))


def status_of(conn: psycopg.Connection[dict[str, Any]], payment_id: str) -> Any:
    return one(conn, "SELECT status FROM payment_jobs WHERE id = %s", payment_id)


async def _received_payment(pool: Pool, amount: int = 700) -> tuple[str, int]:
    """A visa payment with its pricing job waiting: (payment id, job id)."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, f"agent-{time.monotonic_ns()}")
        p = await payments.insert(
            conn, agent_id=agent.id, currency="usd", payment_method="pm_card_visa", amount=amount
        )
        await defer(conn, "pricing", payment_id=p["id"])
        cur = await conn.execute(
            "SELECT id FROM procrastinate_jobs WHERE args->>'payment_id' = %s", (p["id"],)
        )
        row = await cur.fetchone()
    assert row is not None
    return p["id"], row["id"]


async def approved_payment(pool: Pool) -> str:
    """A visa payment taken through pricing and risk in-process, its charge job waiting."""
    payment_id, _ = await _received_payment(pool, amount=1500)
    await run_jobs(pool, ("pricing", "risk"))
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT status FROM payment_jobs WHERE id = %s", (payment_id,))
        assert (await cur.fetchone()) == {"status": "approved"}
    return payment_id


async def test_a_worker_of_a_new_release_waits_for_its_migrations(
    pool: Pool, database_url: str, provider_base: str, api: httpx.AsyncClient
) -> None:
    """A deploy whose workers start before `agentpay migrate` ran: a worker takes no job
    (its code could need a column not there yet, and the job would fail for good) and the
    API is not ready, until the database has every migration of the release."""
    payment_id, _ = await _received_payment(pool)
    last = schema.expected()[-1]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "DELETE FROM schema_migrations WHERE name = %s RETURNING name, checksum", (last,)
        )
        recorded = await cur.fetchone()
    assert recorded is not None
    answer = await api.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "not_ready",
        "reason": "migrations_pending",
        "missing": [last],
    }
    pricing = worker("pricing", database_url, provider_base)
    try:
        # Two checks a second apart, both found the migration missing; the job still waits.
        wait_for(
            lambda: tail(pricing).count("waiting for the database's schema") >= 2,
            timeout=30,
            what="the worker to wait for the migration",
        )
        assert last in tail(pricing)
        with db(database_url) as conn:
            assert status_of(conn, payment_id) == "received"
            conn.execute(
                "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
                (recorded["name"], recorded["checksum"]),
            )
            wait_for(
                lambda: status_of(conn, payment_id) == "priced",
                timeout=60,
                what="the worker to take the job once migrated",
            )
    finally:
        code = stop(pricing)
    assert code == 0, tail(pricing)
    assert (await api.get("/readyz")).json() == {"status": "ready"}


async def test_each_worker_says_its_role_so_a_role_without_one_shows(
    pool: Pool, database_url: str, provider_base: str, api: httpx.AsyncClient
) -> None:
    """procrastinate keeps no name for a worker; its role could only be told from the jobs
    it held, so idle workers had none and a role left with no worker looked healthy. Each
    worker writes its role, pid and host; /metrics and `agentpay status` count live workers
    per role, every role at 0 too; the row goes when the worker stops."""
    pricing = worker("pricing", database_url, provider_base)
    try:
        with db(database_url) as conn:
            row = wait_for(
                lambda: conn.execute(
                    "SELECT role, pid, host, queues FROM ops_workers WHERE role IS NOT NULL"
                ).fetchone(),
                timeout=30,
                what="the worker to register",
            )
        assert row == {
            "role": "pricing",
            "pid": pricing.pid,
            "host": socket.gethostname(),
            "queues": "pricing",
        }
        scraped = (await api.get("/metrics")).text
        status = subprocess.run(
            [sys.executable, "-m", "workers", "status"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": database_url, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        code = stop(pricing)
    assert code == 0, tail(pricing)
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
        if s.name == "agentpay_workers"
    }
    assert samples == {
        (("role", role), ("state", state)): float(role == "pricing" and state == "alive")
        for role in ROLES
        for state in ("alive", "stalled")
    }
    assert status.returncode == 0, status.stderr
    assert "workers: pricing 1, risk 0, charge 0, reconcile 0" in status.stdout
    with db(database_url) as conn:
        assert one(conn, "SELECT count(*) FROM worker_roles") == 0  # gone with its worker


async def test_a_worker_whose_role_cannot_be_written_yet_works_and_writes_it_later(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The role is for the operators' eyes: a worker that cannot write it (a connection that
    died a moment ago) works on, and writes it at a later heartbeat. It failed instead,
    outside procrastinate's clean-up, and its row stayed behind, counted as stalled."""
    from tasks.app import app
    from workers.worker import _Worker

    payment_id, _ = await _received_payment(pool)
    execute = app.connector.execute_query_async
    refused: list[str] = []

    async def cut_once_on_role(query: str, **arguments: Any) -> None:
        if query.startswith("INSERT INTO worker_roles") and not refused:
            refused.append(query)
            raise psycopg.OperationalError("the connection is lost")
        await execute(query, **arguments)

    async def one_row(sql: str) -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute(sql)
            return await cur.fetchone()

    monkeypatch.setattr(app.connector, "execute_query_async", cut_once_on_role)
    worker = _Worker(
        app,
        queues=["pricing"],
        install_signal_handlers=False,
        listen_notify=False,
        update_heartbeat_interval=0.2,
    )
    running = asyncio.create_task(worker.run())
    await async_wait_for(
        lambda: one_row(
            f"SELECT 1 FROM payment_jobs WHERE id = '{payment_id}' AND status = 'priced'"
        ),
        what="the worker to run the job",
    )
    await async_wait_for(
        lambda: one_row("SELECT role FROM worker_roles WHERE role = 'pricing'"),
        what="the role, written at a later heartbeat",
    )
    worker.stop()
    await asyncio.wait_for(running, 30)
    assert refused
    assert await one_row("SELECT count(*) AS n FROM procrastinate_workers") == {"n": 0}


async def test_a_stop_that_hangs_reports_what_it_waits_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the grace period a stopping worker logs each task it still waits on, down to
    the await it is stuck in."""
    from workers import worker as role_worker

    started = asyncio.Event()
    never = asyncio.Event()

    async def stuck_job() -> None:
        started.set()
        await never.wait()

    task = asyncio.create_task(stuck_job(), name="stuck-job")
    await started.wait()
    with caplog.at_level(logging.ERROR, logger="agentpay.worker"):
        role_worker._report_slow_stop()
    task.cancel()
    [record] = [r for r in caplog.records if r.message == "still stopping after the grace period"]
    [stuck] = [t for t in record.tasks if t.startswith("stuck-job:")]  # type: ignore[attr-defined]
    assert "stuck_job (test_resilience.py:" in stuck and "-> wait (locks.py:" in stuck


def _cut_connections(
    monkeypatch: pytest.MonkeyPatch, times: int, *, after_writing: bool = False
) -> list[int]:
    """Make writing a job's outcome meet a lost connection `times` times (`after_writing`:
    the write went through, its answer was lost); returns the list the tries are counted
    in."""
    from procrastinate import exceptions

    from tasks.app import app

    tries: list[int] = []
    finish = app.job_manager.finish_job

    async def cut(**kwargs: Any) -> None:
        tries.append(1)
        if len(tries) <= times:
            if after_writing:
                await finish(**kwargs)
            try:
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            except psycopg.OperationalError as error:
                raise exceptions.ConnectorException() from error
        await finish(**kwargs)

    monkeypatch.setattr(app.job_manager, "finish_job", cut)
    return tries


async def _status(pool: Pool, sql: str, *params: Any) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
    return None if row is None else next(iter(row.values()))


async def test_a_jobs_outcome_lost_on_a_cut_connection_is_written_again(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write of a job's outcome meets a cut connection twice: it is tried again, and the
    job ends `succeeded` instead of staying `doing` under a live worker."""
    from tasks.app import app
    from workers.worker import _Worker

    payment_id, job_id = await _received_payment(pool)
    tries = _cut_connections(monkeypatch, times=2)
    worker = _Worker(app, queues=["pricing"], wait=False, install_signal_handlers=False)
    await asyncio.wait_for(worker.run(), 30)
    assert len(tries) == 3
    sql = "SELECT status::text FROM procrastinate_jobs WHERE id = %s"
    assert await _status(pool, sql, job_id) == "succeeded"
    sql = "SELECT status FROM payment_jobs WHERE id = %s"
    assert await _status(pool, sql, payment_id) == "priced"


async def test_an_outcome_written_before_its_answer_was_lost_is_not_written_again(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write went through and only its answer was lost: the job is no longer this
    worker's `doing` job (another worker may run it by now), so it is not written over."""
    from tasks.app import app
    from workers.worker import _Worker

    _, job_id = await _received_payment(pool)
    tries = _cut_connections(monkeypatch, times=1, after_writing=True)
    worker = _Worker(app, queues=["pricing"], wait=False, install_signal_handlers=False)
    await asyncio.wait_for(worker.run(), 30)
    assert len(tries) == 1
    sql = "SELECT status::text FROM procrastinate_jobs WHERE id = %s"
    assert await _status(pool, sql, job_id) == "succeeded"


async def test_a_worker_that_cannot_write_a_jobs_outcome_stops_so_the_job_is_rescued(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database keeps refusing the outcome: the worker stops on its own (a waiting worker
    would otherwise hold the job `doing` for ever, heartbeating) and, unregistered, leaves
    the job to the stalled-job rescue, which puts it back in its queue."""
    from tasks.app import app
    from workers import worker as role_worker
    from workers.maintenance import rescue_stalled_jobs

    _, job_id = await _received_payment(pool)
    _cut_connections(monkeypatch, times=1000)
    worker = role_worker._Worker(
        app,
        queues=["pricing"],
        install_signal_handlers=False,
        listen_notify=False,
        stalled_worker_timeout=2,
    )
    worker.stalled_after = 2  # it tries for half of that (as `for_role` sets it)
    await asyncio.wait_for(worker.run(), 30)  # it waits for jobs until it stops itself
    job = "SELECT status::text, worker_id FROM procrastinate_jobs WHERE id = %s"
    async with pool.connection() as conn:
        cur = await conn.execute(job, (job_id,))
        assert await cur.fetchone() == {"status": "doing", "worker_id": None}
    assert await rescue_stalled_jobs(app, stalled_after=60) == [job_id]
    sql = "SELECT status::text FROM procrastinate_jobs WHERE id = %s"
    assert await _status(pool, sql, job_id) == "todo"


@pytest.mark.parametrize("last_attempt", [False, True], ids=["retried", "on-its-last-attempt"])
async def test_a_job_cut_off_by_the_shutdown_grace_goes_back_to_its_queue(
    pool: Pool, provider_base: str, last_attempt: bool
) -> None:
    """A stop whose grace ends while a job still runs (the provider is slow): the job is
    retried, not ended `aborted` (which only an operator's cancel should do); nothing but a
    sweep minutes later would have moved its payment on. On its last attempt it fails for
    good, and that is recorded in its payment's events like any failure."""
    from tasks.app import app
    from workers.worker import _Worker, observe_job

    payment_id = await approved_payment(pool)
    if last_attempt:
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE procrastinate_jobs SET attempts = 11 WHERE task_name = 'charge'"
                " AND args->>'payment_id' = %s",
                (payment_id,),
            )
    sandbox_faults(provider_base, delay_ms=3000, paths=["/v1/payment_intents"], count=1)
    worker = _Worker(
        app,
        queues=["charge"],
        install_signal_handlers=False,
        listen_notify=False,
        shutdown_graceful_timeout=0.2,
        worker_middleware=[observe_job("charge", pool)],
    )
    running = asyncio.create_task(worker.run())
    job = "SELECT status::text FROM procrastinate_jobs WHERE args->>'payment_id' = %s"
    job += " AND task_name = 'charge'"
    await async_wait_for(
        lambda: _status(pool, job + " AND status = 'doing'", payment_id),
        what="the charge job to run",
    )
    # Stopped once the job has claimed its payment and waits on the provider (a stop before
    # that could cut the claim off: the payment would stay `approved`).
    await async_wait_for(
        lambda: asyncio.to_thread(lambda: injected(provider_base)["delay"]),
        what="the charge to reach the provider",
    )
    worker.stop()
    await asyncio.wait_for(running, 30)
    assert await _status(pool, job, payment_id) == ("failed" if last_attempt else "todo")
    sql = "SELECT status FROM payment_jobs WHERE id = %s"
    assert await _status(pool, sql, payment_id) == "charging"
    sql = "SELECT count(*) FROM payment_events WHERE payment_id = %s AND type = 'job_failed'"
    assert await _status(pool, sql, payment_id) == (1 if last_attempt else 0)


async def test_a_sigkilled_workers_job_is_rescued_and_runs_once(
    pool: Pool, database_url: str, provider_base: str
) -> None:
    payment_id = await approved_payment(pool)
    # The provider answers slowly: the first worker holds the job when it is killed.
    sandbox_faults(provider_base, delay_ms=1500, paths=["/v1/payment_intents"], count=1)
    doomed = worker("charge", database_url, provider_base)
    survivor: subprocess.Popen[bytes] | None = None
    reconciler = worker("reconcile", database_url, provider_base)
    try:
        with db(database_url) as conn:
            wait_for(
                lambda: one(
                    conn,
                    "SELECT count(*) FROM procrastinate_jobs"
                    " WHERE queue_name = 'charge' AND status = 'doing'",
                ),
                timeout=30,
                what="the charge job to be held",
            )
            doomed.kill()
            doomed.wait(10)
            held_by = one(
                conn, "SELECT worker_id FROM procrastinate_jobs WHERE queue_name = 'charge'"
            )
            metrics_port = server_port()
            survivor = worker(
                "charge", database_url, provider_base, AGENTPAY_METRICS_PORT=str(metrics_port)
            )
            wait_for(
                lambda: status_of(conn, payment_id) == "reconciled",
                timeout=60,
                what="the payment to be reconciled",
            )
            # The charge job's outcome is written after its step committed, in the charge
            # worker's own time (the reconcile may be done first); its metrics before that.
            wait_for(
                lambda: (
                    one(conn, "SELECT status FROM procrastinate_jobs WHERE queue_name = 'charge'")
                    != "doing"
                ),
                timeout=30,
                what="the charge job's outcome",
            )
            job = conn.execute(
                "SELECT status::text AS status, attempts, worker_id FROM procrastinate_jobs"
                " WHERE queue_name = 'charge'"
            ).fetchone()
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            moves = conn.execute(
                """SELECT from_status, to_status, count(*) AS n FROM payment_events
                    WHERE payment_id = %s AND type = 'transition' GROUP BY 1, 2""",
                (payment_id,),
            ).fetchall()
    finally:
        for p in (doomed, survivor, reconciler):
            if p is not None:
                stop(p)
    assert job is not None and job["status"] == "succeeded"
    assert job["attempts"] >= 1 and job["worker_id"] != held_by  # rescued, run by the other
    assert {(m["from_status"], m["to_status"]): m["n"] for m in moves} == {
        ("received", "priced"): 1,
        ("priced", "approved"): 1,
        ("approved", "charging"): 1,
        ("charging", "succeeded"): 1,
        ("succeeded", "reconciled"): 1,
    }
    intents = intents_for(provider_base, payment_id)
    assert [i["status"] for i in intents] == ["succeeded"]
    # The surviving worker served its own metrics: the job it ran and its provider calls.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }
    key = (("outcome", "succeeded"), ("role", "charge"), ("task", "charge"))
    assert samples[("agentpay_job_duration_seconds_count", key)] == 1
    calls = {
        dict(labels)["operation"]: v
        for (name, labels), v in samples.items()
        if name == "agentpay_provider_call_duration_seconds_count"
    }
    assert calls.get("retrieve_intent", 0) + calls.get("create_intent", 0) >= 1, calls


async def test_sigterm_lets_the_running_job_finish(
    pool: Pool, database_url: str, provider_base: str
) -> None:
    payment_id = await approved_payment(pool)
    sandbox_faults(provider_base, delay_ms=1500, paths=["/v1/payment_intents"], count=1)
    # A grace far longer than the job (in a cold process on a loaded machine), which is what
    # this test is about: the running job finishes.
    charge = worker(
        "charge",
        database_url,
        provider_base,
        AGENTPAY_SHUTDOWN_GRACE_SECONDS="30",
        AGENTPAY_STALLED_AFTER_SECONDS="45",
    )
    try:
        with db(database_url) as conn:
            wait_for(
                lambda: one(
                    conn,
                    "SELECT count(*) FROM procrastinate_jobs"
                    " WHERE queue_name = 'charge' AND status = 'doing'",
                ),
                timeout=30,
                what="the charge job to be held",
            )
            charge.send_signal(signal.SIGTERM)
            code = charge.wait(timeout=30)
            statuses = conn.execute(
                "SELECT status::text AS s, count(*) AS n FROM procrastinate_jobs GROUP BY 1"
            ).fetchall()
            payment = conn.execute(
                "SELECT status FROM payment_jobs WHERE id = %s", (payment_id,)
            ).fetchone()
    finally:
        stop(charge)
    assert code == 0, tail(charge)
    counts = {r["s"]: r["n"] for r in statuses}
    assert "doing" not in counts
    assert payment == {"status": "succeeded"}  # finished, and reconcile deferred
    assert counts.get("todo") == 1  # that reconcile job


@pytest.fixture
def outage_pg() -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A Postgres of this test's own, to stop and start."""
    data_dir = Path(tempfile.mkdtemp(prefix="apout", dir="/tmp"))
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    schema.migrate(url)
    yield pg, url
    pg.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)


async def test_postgres_restart_under_load_needs_no_process_restart(
    outage_pg: tuple[EmbeddedPostgres, str], sandbox: SandboxServer, provider_base: str
) -> None:
    pg, url = outage_pg
    async with open_pool(url, min_size=1, max_size=1) as p:
        async with p.connection() as conn, conn.transaction():
            _, key = await agents.create(conn, "outage-agent")
    port = server_port()
    api_url = f"http://127.0.0.1:{port}"
    api = start(["api", "--port", str(port)], url, provider_base)
    fleet = [worker(role, url, provider_base) for role in ROLES]
    processes = [api, *fleet]
    pids = [p.pid for p in processes]
    accepted: list[str] = []
    refused: list[tuple[int, str | None]] = []  # (status, Retry-After) of the other answers
    readiness: list[int] = []
    stop_load = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=15) as client:
            n = 0
            while not stop_load.is_set():
                n += 1
                try:
                    r = client.post(
                        f"{api_url}/v1/payments",
                        json={"amount": 900, "currency": "usd", "payment_method": "pm_card_visa"},
                        headers={**auth(key), "Idempotency-Key": f"outage-{n}"},
                    )
                    if r.status_code == 202:
                        accepted.append(r.json()["id"])
                    else:
                        refused.append((r.status_code, r.headers.get("Retry-After")))
                except httpx.HTTPError:
                    pass
                try:
                    readiness.append(client.get(f"{api_url}/readyz").status_code)
                except httpx.HTTPError:
                    readiness.append(0)
                stop_load.wait(0.05)

    sender = threading.Thread(target=load, daemon=True)
    try:
        wait_for(lambda: _ready(api_url), timeout=60, what="the API to be ready")
        sender.start()
        wait_for(lambda: len(accepted) >= 10, timeout=60, what="payments before the outage")
        pg.stop_server()
        outage_started = len(readiness)
        time.sleep(10)  # the outage itself (not synchronisation)
        assert all(p.poll() is None for p in processes), "a process died during the outage"
        pg.start_server()
        wait_for(
            lambda: 503 in readiness[outage_started:] and readiness[-1] == 200,
            timeout=60,
            what="readiness to go down and come back",
        )
        during = len(accepted)
        wait_for(lambda: len(accepted) >= during + 10, timeout=60, what="payments after")
        stop_load.set()
        sender.join(20)
        # While the database was away, POSTs were told to come back (503 + Retry-After),
        # never answered with a 500.
        assert (503, "1") in refused, refused
        assert {status for status, _ in refused} <= {503, 429}, refused

        with db(url) as conn:

            def all_final() -> bool:
                left = one(
                    conn,
                    "SELECT count(*) FROM payment_jobs p JOIN payment_states s USING (status)"
                    " WHERE NOT s.is_final",
                )
                return bool(left == 0)

            wait_for(all_final, timeout=120, what="every payment to reach a final state")
            # Each worker listens for new jobs again (LISTEN on a fresh connection).
            wait_for(
                lambda: (
                    one(
                        conn,
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database()"
                        " AND query LIKE 'LISTEN %%procrastinate%%'",
                    )
                    == len(fleet)
                ),
                timeout=30,
                what="every worker to LISTEN again",
            )
            rows = conn.execute("SELECT id, status FROM payment_jobs").fetchall()
            # A job whose outcome could not be written during the outage stays `doing` under
            # the worker that gave up on it (its payment moved on: the step had committed);
            # the rescue puts it back once the database has been up for `stalled_after`,
            # and it runs again, to no effect.
            wait_for(
                lambda: (
                    one(conn, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'") == 0
                ),
                timeout=60,
                what="no job left doing",
            )
    finally:
        stop_load.set()
        codes = [stop(p) for p in processes]
    statuses = {r["id"]: r["status"] for r in rows}
    assert set(accepted) <= set(statuses), "an accepted payment was lost"
    assert set(statuses.values()) == {"reconciled"}
    assert [p.pid for p in processes] == pids
    # Workers exit 0; uvicorn ends by re-raising the SIGTERM it handled gracefully.
    assert codes[0] in (0, -signal.SIGTERM), tail(api)
    assert codes[1:] == [0] * len(fleet), [tail(p) for p in fleet]
    # Each worker lost the database and started procrastinate's worker again, in-process.
    for process in fleet:
        assert "starting it again" in LOGS[process.pid].read_text(), tail(process)


def _ready(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def test_a_lost_connection_is_tried_again_every_few_seconds_however_long_the_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """psycopg_pool doubles its wait after each failed connection with no bound: after a
    75 s outage a worker's next try came 51 s after the database was back, and the process
    stood still until then. The pool's tries are at most MAX_RECONNECT_DELAY_SECONDS apart."""
    from tasks import db

    pool = db.make_pool("postgresql://nobody@127.0.0.1:1/none", min_size=1, max_size=1)
    scheduled: list[tuple[Any, float]] = []

    async def refuse() -> Any:
        raise psycopg.OperationalError("connection refused")

    async def record(task: Any, delay: float) -> None:
        scheduled.append((task, delay))

    monkeypatch.setattr(pool, "_connect", refuse)
    monkeypatch.setattr(pool, "schedule_task", record)
    await pool._add_connection(None)  # the pool's first try after a loss
    for _ in range(10):  # and each next try of the same attempt, as the pool runs them
        task, _ = scheduled[-1]
        await pool._add_connection(task.attempt, growing=task.growing)
    delays = [delay for _, delay in scheduled]
    assert len(delays) == 11
    assert 0.5 < delays[0] <= db.MAX_RECONNECT_DELAY_SECONDS
    assert max(delays) == db.MAX_RECONNECT_DELAY_SECONDS  # psycopg_pool's own: 1024 s
