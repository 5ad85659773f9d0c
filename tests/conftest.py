"""Shared fixtures: a real Postgres (embedded unless DATABASE_URL is set), one fresh database
per test cloned from a migrated template, the sandbox provider, the API in-process, and
helpers to run a role's jobs in-process until its queue is empty."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import Result
from fastapi import FastAPI
from procrastinate.worker import Worker
from psycopg import sql
from typer.testing import CliRunner

import schema
from api.app import create_app
from sandbox.server import SandboxServer
from tasks import agents, provider
from tasks.app import bind
from tasks.db import Pool, open_pool
from tasks.settings import ROLES, Settings, get_settings
from workers.pg import EmbeddedPostgres

TEMPLATE = "agentpay_test_template"
WEBHOOK_SECRET = "whsec_test_secret"

# Fast timings for worker processes started by tests.
FAST_ENV = {
    "AGENTPAY_HEARTBEAT_SECONDS": "1",
    "AGENTPAY_SHUTDOWN_GRACE_SECONDS": "4",
    "AGENTPAY_STALLED_AFTER_SECONDS": "6",
    "AGENTPAY_MAINTENANCE_INTERVAL_SECONDS": "0.5",
    "AGENTPAY_POLL_INTERVAL_SECONDS": "0.5",
    "AGENTPAY_SWEEP_AFTER_SECONDS": "10",
}


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.05)


class PgServer:
    """The test server: embedded, or the one DATABASE_URL points at."""

    def __init__(self) -> None:
        self.external = os.environ.get("DATABASE_URL")
        self.embedded: EmbeddedPostgres | None = None
        self._counter = itertools.count()
        self._dir: Path | None = None
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-copy")
        self._next: Future[tuple[str, str]] | None = None

    def start(self) -> None:
        if not self.external:
            self._dir = Path(tempfile.mkdtemp(prefix="ap"))
            self.embedded = EmbeddedPostgres(self._dir)
            self.embedded.start()
            # A server for tests alone, thrown away with its directory: no test crashes it, so
            # nothing needs its commits on disk, and no test's database (copied from the
            # template) or commit waits for one.
            with psycopg.connect(self.embedded.admin_url, autocommit=True) as conn:
                for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                    conn.execute(f"ALTER SYSTEM SET {setting} = off")
                conn.execute("SELECT pg_reload_conf()")

    @property
    def admin_url(self) -> str:
        if self.embedded:
            return self.embedded.admin_url
        assert self.external
        return self.external

    def url(self, database: str) -> str:
        if self.embedded:
            return self.embedded.url(database)
        return psycopg.conninfo.make_conninfo(self.admin_url, dbname=database)

    def create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(query)
        return self.url(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def fresh_name(self) -> str:
        return f"agentpay_test_{os.getpid()}_{next(self._counter)}"

    def from_template(self) -> tuple[str, str]:
        """A fresh database copied from the migrated template: (name, url). Copying one
        costs the server a fraction of a second of CPU, a tenth of the suite's time: the next
        one is copied in the background while the test that takes this one runs (tests leave
        the template alone)."""
        if self._next is None:
            self._next = self._copier.submit(self._copy)
        name, url = self._next.result()
        self._next = self._copier.submit(self._copy)
        return name, url

    def _copy(self) -> tuple[str, str]:
        name = self.fresh_name()
        return name, self.create(name, template=TEMPLATE)

    def stop(self) -> None:
        self._copier.shutdown(wait=True)  # the copy made for no test goes with the server
        if self.embedded:
            self.embedded.cleanup()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)  # ~70 MB a session otherwise


def migrate_before(
    url: str, migration: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migrate the database at `url` as a release before `migration` (a file name in
    schema/migrations) left it: every migration before it, none from it on."""
    folder = tmp_path / "migrations-before"
    folder.mkdir()
    for file in sorted(schema.MIGRATIONS_DIR.glob("*.sql")):
        if file.name < migration:
            shutil.copy(file, folder / file.name)
    with monkeypatch.context() as patched:
        patched.setattr(schema, "MIGRATIONS_DIR", folder)
        schema.migrate(url)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    schema.migrate(server.create(TEMPLATE))
    yield server
    server.stop()


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, migrated database for this test alone: as if migrated now (the provider
    event catch-up's cursor starts now, not when the template was made)."""
    name, url = pg_server.from_template()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """UPDATE provider_event_cursor
                  SET created_through = extract(epoch FROM now())::bigint, asked_at = now()"""
        )
    yield url
    pg_server.drop(name)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(webhook_secret=WEBHOOK_SECRET)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
async def provider_connections() -> AsyncIterator[None]:
    """The provider SDK's connections this process opened, closed when the tests end."""
    yield
    await provider.connections.close()


@pytest.fixture
def provider_base(sandbox: SandboxServer) -> Iterator[str]:
    """The sandbox, clean, as the provider of this process (and of processes it starts)."""
    httpx.post(f"{sandbox.base_url}/_sandbox/reset").raise_for_status()
    saved = {k: os.environ.get(k) for k in ("STRIPE_API_BASE", "STRIPE_WEBHOOK_SECRET")}
    os.environ["STRIPE_API_BASE"] = sandbox.base_url
    os.environ["STRIPE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    get_settings.cache_clear()
    yield sandbox.base_url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """`configure(risk_velocity_max_count="1", …)`: set AGENTPAY_* settings for this test
    (the roles read get_settings(), read again after each call and after the test)."""

    def set_(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"AGENTPAY_{name.upper()}", value)
        get_settings.cache_clear()

    yield set_
    get_settings.cache_clear()


@pytest.fixture
def settings(database_url: str, provider_base: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        stripe_api_base=provider_base,
        stripe_webhook_secret=WEBHOOK_SECRET,
        data_dir=tmp_path / "data",
    )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    """This test's database pool, bound to the procrastinate App as a worker's would be."""
    async with open_pool(database_url, min_size=1, max_size=8) as p, bind(p):
        yield p


@pytest.fixture
async def agent_key(pool: Pool) -> str:
    async with pool.connection() as conn, conn.transaction():
        _, key = await agents.create(conn, "agent-a")
    return key


@pytest.fixture
async def operator_key(pool: Pool) -> str:
    async with pool.connection() as conn, conn.transaction():
        _, key = await agents.create(conn, "operator", is_operator=True)
    return key


@contextlib.asynccontextmanager
async def in_process_api(
    settings: Settings, pool: Pool
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An API app with `settings`, in-process on `pool` (no network), and a client of it."""
    app = create_app(settings)
    app.state.pool = pool
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://agentpay.test") as client:
        yield app, client


@pytest.fixture
async def api(settings: Settings, pool: Pool) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process, on this test's pool (no network)."""
    async with in_process_api(settings, pool) as (_, client):
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def failed_last_hour(pool: Pool, role: str) -> int:
    """The failed-job alert's count for a role (ops_queue_depth)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT failed_last_hour FROM ops_queue_depth WHERE role = %s", (role,)
        )
        row = await cur.fetchone()
        return int(row["failed_last_hour"]) if row else 0


class Killed(BaseException):
    """A worker dying (SIGKILL, a deploy, a lost database) between two steps, raised from a
    patched call: nothing after it runs, as in a process that is gone."""


@pytest.fixture
def clock_off(monkeypatch: pytest.MonkeyPatch, pool: Pool) -> Callable[[float], Awaitable[None]]:
    """`await clock_off(skew)`: this process's clock runs `skew` seconds off the database's
    (and the provider's), as it did when it connected — a worker whose clock is wrong. Every
    place the roles read their own wall clock sees it (`datetime.now` in the modules that
    call it, `time.time` where the event catch-up read it, the clock `tasks.db` measures
    against the database's, measured again now)."""
    import types
    from datetime import datetime, timedelta

    import tasks.app
    import tasks.catchup
    import tasks.charge
    import tasks.db
    import tasks.risk
    import workers.maintenance

    async def set_off(skew: float) -> None:
        class Skewed(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:
                return datetime.now(tz) + timedelta(seconds=skew)

        def wall() -> float:
            return time.time() + skew

        for module in (tasks.app, tasks.charge, tasks.risk, workers.maintenance):
            monkeypatch.setattr(module, "datetime", Skewed, raising=False)
        monkeypatch.setattr(tasks.catchup, "time", types.SimpleNamespace(time=wall), raising=False)
        if hasattr(tasks.db, "_wall_clock"):
            monkeypatch.setattr(tasks.db, "_wall_clock", wall)
            # (set to itself: put back as it was after the test)
            monkeypatch.setattr(tasks.db, "_clock_offset", tasks.db._clock_offset)
            async with pool.connection() as conn:
                await tasks.db._measure_clock(conn)

    return set_off


async def run_jobs(
    pool: Pool, roles: tuple[str, ...] = ROLES, rounds: int = 50, *, observed: bool = False
) -> None:
    """Run the given roles' jobs in-process until none is left to do now; `observed`: with
    the worker's own middleware (a job failing for good is recorded as in production), one
    role only."""
    from tasks.app import app
    from workers.worker import observe_job

    assert not observed or len(roles) == 1
    for _ in range(rounds):
        worker = Worker(
            app,
            queues=list(roles),
            wait=False,
            concurrency=1,
            install_signal_handlers=False,
            listen_notify=False,
            worker_middleware=[observe_job(roles[0], pool)] if observed else None,
        )
        await worker.run()
        async with pool.connection() as conn:
            cur = await conn.execute(
                """SELECT count(*) AS n FROM procrastinate_jobs
                   WHERE status = 'todo' AND queue_name = ANY(%s)
                     AND (scheduled_at IS NULL OR scheduled_at <= now())""",
                (list(roles),),
            )
            row = await cur.fetchone()
        if row is not None and row["n"] == 0:
            return
    raise AssertionError("jobs kept coming after many rounds")


@pytest.fixture
def fees(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tax and a platform fee, so that captures and refunds split money three ways."""
    monkeypatch.setenv("AGENTPAY_TAX_RATE", "0.0825")
    monkeypatch.setenv("AGENTPAY_FEE_PERCENT", "2.9")
    monkeypatch.setenv("AGENTPAY_FEE_FIXED", '{"usd": 30, "kwd": 100}')
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def quit_postgres_under(data_dir: Path) -> None:
    """An immediate shutdown (SIGQUIT to the postmaster) of every embedded Postgres whose data
    directory is under `data_dir` (pg_ctl starts one in a session of its own: killing the
    process group that started it does not reach it)."""
    for pidfile in data_dir.rglob("postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)


def invoke_cli(
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    *,
    database_url: str | None,
    env: dict[str, str] | None = None,
) -> Result:
    """`agentpay <args>` in-process, on `database_url` (None: no DATABASE_URL at all). The
    settings are cached per process: read again for the command, and dropped after it."""
    from workers.cli import app as cli

    if database_url is None:
        monkeypatch.delenv("DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(cli, args, env=env)
    finally:
        get_settings.cache_clear()


def server_port(n: int = 1) -> int:
    """A free port for a server a test starts (the first of `n` consecutive ones), below the
    kernel's ephemeral range: a port there is never taken, between this check and the
    server's bind, by the source port of an outgoing connection (a `bind(0)` port can be)."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(max(1024, low - 10_000), low - n)
        try:
            held = []
            for port in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports below {low}")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, then its exit status; killed (-9) if it has not exited within `timeout`, so
    a stop that hangs never leaves a process behind the test."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        return -9


def stop_and_read(
    process: subprocess.Popen[bytes], timeout: float = 60, data_dir: Path | None = None
) -> tuple[str, str]:
    """SIGTERM, then the process's stdout and stderr once it exits. Past `timeout` it is
    killed, with its process group when it leads one (a dev stack's children), and so is an
    embedded Postgres it runs under `data_dir` (pg_ctl starts it in a session of its own),
    and the test fails: a stop that hangs never leaves processes behind."""
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill_all(process, data_dir)
        raise AssertionError(
            f"did not stop within {timeout} s:\n{out[-2000:]}{err[-2000:]}"
        ) from None
    return (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")


def kill_all(process: subprocess.Popen[bytes], data_dir: Path | None = None) -> tuple[str, str]:
    """Kill `process` (with its process group when it leads one) and every embedded Postgres
    under `data_dir` (an immediate shutdown: SIGQUIT to its postmaster); what it printed."""
    if os.getpgid(process.pid) == process.pid:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
    if data_dir is not None:
        quit_postgres_under(data_dir)
    out, err = process.communicate()
    return (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")
