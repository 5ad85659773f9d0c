"""One role's worker process: procrastinate's Worker on the role's queue, kept alive.

procrastinate's worker stops when the database goes away; this loop starts it again with
backoff, so a Postgres restart never needs a process restart. SIGTERM/SIGINT stop claiming,
let running jobs finish (up to `shutdown_grace_seconds`), and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time

from procrastinate.worker import Worker

from tasks.app import bind
from tasks.db import open_pool
from tasks.settings import ROLES, Settings, get_settings
from workers.maintenance import run_maintenance

log = logging.getLogger("agentpay.worker")


class RoleWorker:
    def __init__(
        self, role: str, *, concurrency: int | None = None, settings: Settings | None = None
    ):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        self.role = role
        self.settings = settings or get_settings()
        self.concurrency = concurrency or self.settings.concurrency(role)
        self._stopping = asyncio.Event()
        self._worker: Worker | None = None

    def stop(self) -> None:
        """Stop claiming; running jobs finish; `run()` returns."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.stop()

    async def run(self) -> None:
        s = self.settings
        async with (
            open_pool(
                s.resolved_database_url(),
                min_size=1,
                max_size=self.concurrency + 4,
                name=f"worker-{self.role}",
            ) as pool,
            bind(pool) as app,
        ):
            app.perform_import_paths()  # register every role's task
            maintenance = asyncio.create_task(run_maintenance(app, pool, s), name="maintenance")
            try:
                failures = 0
                while not self._stopping.is_set():
                    self._worker = Worker(
                        app,
                        queues=[self.role],
                        name=self.role,
                        concurrency=self.concurrency,
                        install_signal_handlers=False,
                        shutdown_graceful_timeout=s.shutdown_grace_seconds,
                        fetch_job_polling_interval=s.poll_interval_seconds,
                        update_heartbeat_interval=s.heartbeat_seconds,
                        stalled_worker_timeout=s.stalled_after_seconds,
                        listen_notify=True,
                    )
                    error: Exception | None = None
                    started = time.monotonic()
                    try:
                        await self._worker.run()
                    except Exception as exc:
                        error = exc
                    if self._stopping.is_set():
                        break
                    # The worker stopped without being asked: it lost the database.
                    failures = 1 if time.monotonic() - started > 60 else failures + 1
                    delay = random.uniform(0, min(30.0, 0.5 * 2**failures))
                    log.warning(
                        "worker stopped on its own; starting it again",
                        extra={"role": self.role, "error": repr(error), "retry_in": delay},
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
            finally:
                maintenance.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance


async def run_role(role: str, *, concurrency: int | None = None) -> None:
    worker = RoleWorker(role, concurrency=concurrency)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
