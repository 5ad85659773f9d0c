"""The whole stack on one machine: embedded Postgres (unless DATABASE_URL is set), the sandbox
provider (unless STRIPE_API_BASE is set), migrations, the API and the role workers, each in
its own process. The stack supervises its processes: one that dies is started again, as a
process manager would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

import schema
from tasks import agents
from tasks.db import open_pool
from tasks.settings import ROLES, Settings
from workers.pg import EmbeddedPostgres

log = logging.getLogger("agentpay.dev")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env={**env, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class StackError(RuntimeError):
    """The stack cannot start here (its port or its data directory is another's)."""


class DevStack:
    def __init__(
        self,
        settings: Settings,
        *,
        port: int = 8000,
        workers_per_role: int = 1,
        env: dict[str, str] | None = None,
        name: str = "dev",
    ) -> None:
        self.settings = settings
        self.name = name  # of its operator and agent: `<name>-operator`, `<name>-agent`
        self.data_dir = settings.data_dir.resolve()
        self.port = port or free_port()
        self.workers_per_role = workers_per_role
        self.extra_env = env or {}
        self.pg: EmbeddedPostgres | None = None
        self.sandbox: Any = None
        self.children: dict[str, Child] = {}
        self.info: dict[str, str] = {}
        self._stopping = threading.Event()
        self._started = False
        # Payments of an earlier start that wait on the provider: a new sandbox starts empty,
        # so those cannot finish (set by `start` when it starts a sandbox).
        self.lost_at_provider = 0
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- starting ---------------------------------------------------------------------------

    def _refuse_if_taken(self) -> None:
        """A stack that runs already, on this port (its API would answer this one's
        readiness check) or in this data directory (this start would revoke its keys and
        replace its stack.json), is left alone: StackError."""
        running = self.settings.stack_file
        if running.exists():
            try:
                api_url = json.loads(running.read_text())["api_url"]
                httpx.get(f"{api_url}/healthz", timeout=1.0).raise_for_status()
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                pass  # left by a stack that is gone
            else:
                raise StackError(
                    f"a stack already runs in {self.data_dir} (API {api_url}): stop it, or "
                    "give this one another --data-dir"
                )
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError as error:
                raise StackError(
                    f"port {self.port} is in use ({error.strerror}): give another --port"
                ) from None

    def start(self) -> dict[str, str]:
        self._refuse_if_taken()
        self._started = True  # from here on, `stop` stops what this start began
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self.settings.stack_file.unlink(missing_ok=True)
        database_url = self.settings.database_url
        if not database_url:
            self.pg = EmbeddedPostgres(self.data_dir)
            database_url = self.pg.start()
        schema.migrate(database_url)
        api_url = f"http://127.0.0.1:{self.port}"
        webhook_secret = self.settings.stripe_webhook_secret or "whsec_" + secrets.token_hex(24)
        provider_base = self.settings.stripe_api_base
        if not provider_base:
            from sandbox.server import SandboxServer

            self.sandbox = SandboxServer(
                webhook_secret=webhook_secret,
                webhook_endpoints=[f"{api_url}/v1/webhooks/stripe"],
            )
            self.sandbox.start()
            provider_base = self.sandbox.base_url
        if self.sandbox is not None:
            self.lost_at_provider = asyncio.run(_waiting_on_the_provider(database_url))
        operator_key, agent_key = asyncio.run(_dev_keys(database_url, self.name))
        self.info = {
            "api_url": api_url,
            "database_url": database_url,
            "provider_base": provider_base,
            "webhook_secret": webhook_secret,
            "operator_key": operator_key,
            "agent_key": agent_key,
        }
        self.env = {
            **os.environ,
            **self.extra_env,
            "DATABASE_URL": database_url,
            "STRIPE_API_BASE": provider_base,
            "STRIPE_API_KEY": self.settings.stripe_api_key,
            "STRIPE_WEBHOOK_SECRET": webhook_secret,
            "AGENTPAY_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
        }
        cli = [sys.executable, "-m", "workers"]
        self._add(Child("api", [*cli, "api", "--port", str(self.port)], self._log_path("api")))
        # With AGENTPAY_METRICS_PORT set, each worker serves its metrics on a port of its
        # own, counting up from it (one port would be taken by the first worker only).
        metrics_ports: list[str] = []
        for role in ROLES:
            for n in range(1, self.workers_per_role + 1):
                name = f"{role}.{n}"
                env = {}
                if self.settings.metrics_port:
                    port = self.settings.metrics_port + len(metrics_ports)
                    env["AGENTPAY_METRICS_PORT"] = str(port)
                    metrics_ports.append(f"{name}={port}")
                self._add(Child(name, [*cli, "worker", role], self._log_path(name), env=env))
        if metrics_ports:
            self.info["worker_metrics_ports"] = " ".join(metrics_ports)
        for child in self.children.values():
            child.start(self.env)
        try:
            self._wait_ready(api_url)
        except BaseException:
            self.stop()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        _write_private(self.settings.stack_file, json.dumps(self.info, indent=2))
        return self.info

    def _add(self, child: Child) -> None:
        self.children[child.name] = child

    def _log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _wait_ready(self, api_url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self.children.values():
                if not child.alive():
                    tail = child.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{child.name} exited while starting:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api_url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the API at {api_url} was not ready within {timeout:.0f}s")

    # -- running ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Start again any process that died while the stack is running."""
        while not self._stopping.wait(0.2):
            with self._lock:
                for child in self.children.values():
                    if not child.alive() and not self._stopping.is_set():
                        code = child.process.returncode if child.process else None
                        log.warning("%s exited (%s); starting it again", child.name, code)
                        child.close_log()
                        child.restarts += 1
                        child.start(self.env)

    def workers(self, role: str | None = None) -> list[Child]:
        return [
            c
            for name, c in self.children.items()
            if name != "api" and (role is None or name.startswith(f"{role}."))
        ]

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop all it started, however far `start` got (safe to call again, and a no-op
        for a stack that never started or was refused: another stack's stack.json stays)."""
        if not self._started:
            return
        with _signals_held():  # a second Ctrl-C must not cut the clean-up short
            self._stop()
        self._started = False

    def _stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        if self.sandbox is not None:
            # First: its retries to the API, which stops next, would only fail and give up.
            self.sandbox.stop_webhooks()
        with self._lock:
            for child in self.children.values():
                child.signal(signal.SIGTERM)
            grace = self.settings.shutdown_grace_seconds + 5
            for child in self.children.values():
                if not child.wait(grace):
                    child.signal(signal.SIGKILL)
                    child.wait(5)
                child.close_log()
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        if self.pg is not None:
            self.pg.cleanup()
            self.pg = None
        self.settings.stack_file.unlink(missing_ok=True)

    def __enter__(self) -> DevStack:
        try:
            self.start()
        except BaseException:
            self.stop()  # what it began (a no-op when refused)
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored meanwhile (in the main thread, where they land)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _write_private(path: Path, text: str) -> None:
    """Write `path` readable by its owner only from its first byte (it holds keys): a file
    of that mode, then renamed over the old one."""
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(part, path)


async def _dev_keys(database_url: str, stack: str = "dev") -> tuple[str, str]:
    """Fresh keys for the stack's operator and agent (`<stack>-operator`, `<stack>-agent`,
    created on first use); the keys an earlier start of that kind of stack wrote to its
    stack.json stop working (a demo or chaos run on the same database leaves a dev stack's
    keys alone)."""
    keys = []
    actor = f"stack:{stack}"  # in `agentpay audit`: the keys the stack minted itself
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn, conn.transaction():
            for name, is_operator in ((f"{stack}-operator", True), (f"{stack}-agent", False)):
                found = await agents.find(conn, name)
                if found is None:
                    _, key = await agents.create(conn, name, is_operator=is_operator, actor=actor)
                    keys.append(key)
                    continue
                rotated = await agents.rotate_key(conn, found["id"], actor=actor)
                if rotated is not None:
                    key = rotated[1]
                else:  # revoked by an operator: a key as before, which authenticates nobody
                    key = await agents.add_key(conn, found["id"], revoke_others=True)
                keys.append(key)
    return keys[0], keys[1]


# Two indexed reads (the states; the pending refunds), not one `OR` that read every payment.
WAITING_ON_THE_PROVIDER = """SELECT count(*) AS n FROM (
    SELECT id FROM payment_jobs
     WHERE provider_payment_id IS NOT NULL
       AND status IN ('charging', 'requires_action', 'authorized', 'succeeded')
    UNION
    SELECT p.id FROM payment_refunds r JOIN payment_jobs p ON p.id = r.payment_id
     WHERE r.status = 'pending' AND p.provider_payment_id IS NOT NULL) AS waiting"""


async def _waiting_on_the_provider(database_url: str) -> int:
    """Payments whose next step needs their PaymentIntent at the provider: charging, held
    (authorized, requires_action), succeeded but not reconciled, or with a refund pending."""
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn:
            cur = await conn.execute(WAITING_ON_THE_PROVIDER)
            row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def new_agent_keys(database_url: str, prefix: str, n: int) -> list[str]:
    """Create `n` agents named `<prefix>-<i>-<time>` and return their keys (demo, chaos)."""
    keys = []
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn, conn.transaction():
            for i in range(n):
                _, key = await agents.create(
                    conn, f"{prefix}-{i + 1}-{time.time_ns()}", actor=f"stack:{prefix}"
                )
                keys.append(key)
    return keys


def run_forever() -> None:
    """Block until Ctrl-C (or SIGTERM, SIGHUP: `cli_common.stop_signals_interrupt` makes
    them the same); the caller stops the stack."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
