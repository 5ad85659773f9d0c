"""One role's worker process: procrastinate's Worker on the role's queue, kept alive.

procrastinate's worker stops when the database goes away (a failed heartbeat, fetch or
listener stops it, and so does a job's outcome that cannot be written even when tried
again); this loop starts it again with backoff, so a Postgres restart never needs a process
restart, and the stalled-job rescue (workers/maintenance.py) puts back any job whose end
could not be written. SIGTERM/SIGINT stop claiming, let running jobs finish (up to
`shutdown_grace_seconds`; a job still running then goes back to its queue), and exit. It
takes no job before the database has every migration of this release (`schema.missing`).

Around every job (`observe_job`): its log lines carry job_id, payment_id and role; its
duration and outcome go to the process's Prometheus metrics; a job that fails for good is
recorded in its payment's events (`job_failed`, with the error), or for a job without a
payment (`catch_up_events`) in `job_failures`, for ops_recent_failures.
With AGENTPAY_METRICS_PORT set the process serves those metrics, and the latency and errors
of its provider calls, over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import itertools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from procrastinate import App, exceptions, job_context
from procrastinate.worker import Worker
from prometheus_client import Counter, Histogram, start_http_server

import schema
from tasks import payments, provider
from tasks.app import TransientError, bind
from tasks.db import Pool, open_pool
from tasks.settings import ROLES, Settings, get_settings
from workers import logs
from workers.maintenance import run_maintenance

log = logging.getLogger("agentpay.worker")

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_SECONDS = Histogram(
    "agentpay_job_duration_seconds",
    "How long each job ran in this worker process, by role, task and outcome",
    ["role", "task", "outcome"],
    buckets=_BUCKETS,
)
PROVIDER_SECONDS = Histogram(
    "agentpay_provider_call_duration_seconds",
    "Latency of each provider call made by this process (SDK retries included)",
    ["operation", "outcome"],
    buckets=_BUCKETS,
)
PROVIDER_ERRORS = Counter(
    "agentpay_provider_errors",
    "Provider calls that raised, by operation and error class",
    ["operation", "error"],
)


def instrument_provider() -> None:
    """Time every public call of tasks.provider (each module-level coroutine function) in
    this process. The roles call them as `provider.<name>(…)`, so wrapping the module's
    attributes is enough; done once per process."""
    from tasks import provider

    if getattr(provider, "_agentpay_instrumented", False):
        return
    for name, func in list(vars(provider).items()):
        if (
            name.startswith("_")
            or not inspect.iscoroutinefunction(func)
            or func.__module__ != provider.__name__
        ):
            continue
        setattr(provider, name, _timed(name, func))
        # Every series an alert watches exists from the start, at 0: a counter that first
        # appears at 1 shows no increase to `rate()`, and the first error would go unseen.
        for error in ("Declined", "ProviderError", "Unknown", "RateLimited"):
            PROVIDER_ERRORS.labels(name, error)
    provider._agentpay_instrumented = True  # type: ignore[attr-defined]


def _timed(operation: str, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(func)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await func(*args, **kwargs)
        except BaseException as error:
            outcome = type(error).__name__
            PROVIDER_ERRORS.labels(operation, outcome).inc()
            raise
        finally:
            PROVIDER_SECONDS.labels(operation, outcome).observe(time.perf_counter() - started)

    return timed


class _Worker(Worker):
    """procrastinate's Worker, with its side-task watch fixed.

    procrastinate stops its worker when a side task (heartbeat, LISTEN listener, abort
    poll) fails — but it watches them with one FIRST_COMPLETED wait, and its periodic
    deferrer returns at once when no periodic task is registered (ours: none). The watch
    then ends at start-up, and a listener that lost the database later is never noticed:
    the worker runs on without LISTEN (polling only) and never reconnects. This watch keeps
    waiting until a task fails, so the loop in `RoleWorker.run` starts a fresh worker."""

    stalled_after: float = 45.0  # AGENTPAY_STALLED_AFTER_SECONDS (set by `for_role`)
    role: str = ""  # the role whose queue it works (set by `for_role`)

    @classmethod
    def for_role(cls, app: App, pool: Pool, role: str, concurrency: int, s: Settings) -> _Worker:
        worker = cls(
            app,
            queues=[role],
            name=role,
            concurrency=concurrency,
            install_signal_handlers=False,
            shutdown_graceful_timeout=s.shutdown_grace_seconds,
            fetch_job_polling_interval=s.poll_interval_seconds,
            update_heartbeat_interval=s.heartbeat_seconds,
            # procrastinate deletes the rows of workers older than this whenever a worker
            # starts (a deploy, a restart after a crash, every worker after a database
            # loss): only those past the retention, so the stalled gauge keeps showing a
            # crash for that long. (Jobs are rescued by maintenance after `stalled_after`.)
            stalled_worker_timeout=max(s.stalled_worker_retention_seconds, s.stalled_after_seconds),
            listen_notify=True,
            worker_middleware=[observe_job(role, pool)],
        )
        worker.stalled_after = s.stalled_after_seconds
        worker.role = role
        return worker

    async def _run_loop(self) -> None:
        recording = asyncio.create_task(self._record_role(), name="record-role")
        try:
            await super()._run_loop()
        finally:
            recording.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recording

    async def _record_role(self) -> None:
        """procrastinate has just registered this worker: say which role it runs, and where,
        for `ops_workers` (the row goes with procrastinate's when it unregisters). Tried
        again every heartbeat until written (a worker started in a database blip is not
        shown roleless for its life); only for the operators' eyes, so a failure never
        stops the worker (failing in `_run_loop`, outside procrastinate's clean-up, would
        leave its row behind as stalled)."""
        while True:
            try:
                await self.app.connector.execute_query_async(
                    "INSERT INTO worker_roles (worker_id, role, pid, host)"
                    " VALUES (%(worker)s, %(role)s, %(pid)s, %(host)s)"
                    " ON CONFLICT (worker_id) DO NOTHING",
                    worker=self.worker_id,
                    role=self.role or ",".join(self.queues or []),
                    pid=os.getpid(),
                    host=socket.gethostname(),
                )
                return
            except Exception as error:
                log.warning("could not record the worker's role", extra={"error": repr(error)})
                if not _lost_connection(error):
                    return  # an answer (the worker's row pruned, no permission): it stays so
            await asyncio.sleep(self.update_heartbeat_interval)

    async def _monitor_side_tasks(self, side_tasks: list[asyncio.Task[Any]]) -> None:
        pending = set(side_tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    log.warning(
                        "a side task of the worker failed; stopping it to start afresh",
                        extra={"task_name": task.get_name(), "error": repr(error)},
                    )
                    self.stop()
                    return

    async def _persist_job_status(
        self,
        job: Any,
        status: Any,
        retry_decision: Any,
        context: job_context.JobContext,
        job_result: Any,
    ) -> None:
        """procrastinate writes a job's outcome once. If that write meets a connection cut at
        that moment, the job stays `doing` under this worker, which is alive and heartbeating,
        so no rescue looks at it, and neither does any sweep: its payment would be stuck. So
        the write is tried again, each try bounded in time, while the job is still this
        worker's (an earlier try may have been written, its answer lost, and the job claimed
        by another worker since). If the database stays away for half the stalled-worker
        timeout, this worker stops (the loop in `RoleWorker.run` starts a fresh one):
        unregistered, or with its heartbeat left to go stale, its job is put back in its queue
        by the stalled-job rescue — before which this worker has given up writing over it."""
        deadline = time.monotonic() + self.stalled_after / 2
        for attempt in itertools.count():
            try:
                if attempt and not await self._still_mine(job.id):
                    return  # an earlier try was written; what happens now is not ours
                await asyncio.wait_for(
                    super()._persist_job_status(
                        job=job,
                        status=status,
                        retry_decision=retry_decision,
                        context=context,
                        job_result=job_result,
                    ),
                    PERSIST_TRY_SECONDS,
                )
                return
            except Exception as error:
                if not (_lost_connection(error) or isinstance(error, TimeoutError)):
                    raise
                pause = min(2.0, 0.1 * 2**attempt)
                if time.monotonic() + pause >= deadline:
                    break
                log.warning(
                    "could not write the job's outcome; trying again",
                    extra={"job_id": job.id, "attempt": attempt + 1, "error": repr(error)},
                )
                await asyncio.sleep(pause)
        log.error(
            "could not write the job's outcome; stopping the worker so that the job is rescued",
            extra={"job_id": job.id},
        )
        self.stop()

    async def _still_mine(self, job_id: int) -> bool:
        row = await asyncio.wait_for(
            self.app.connector.execute_query_one_async(
                "SELECT status = 'doing' AND worker_id = %(worker)s AS mine"
                " FROM procrastinate_jobs WHERE id = %(id)s",
                id=job_id,
                worker=self.worker_id,
            ),
            PERSIST_TRY_SECONDS,
        )
        return bool(row and row["mine"])


# Every worker connection's session: a statement waits at most this long for a lock. A row
# held elsewhere (an operator's `SELECT … FOR UPDATE` left open in psql, a long report) made
# the job wait for as long as it was held — alive and heartbeating, so never rescued — and a
# few such rows at the head of a queue held every slot of the role. Now the statement fails
# (`LockNotAvailable`, an OperationalError), the step rolls back and Backoff retries it; the
# role goes on with other payments meanwhile.
WORKER_SESSION = {"lock_timeout": "10s"}

# How long one try at writing a job's outcome may take (the pool would wait 30 s).
PERSIST_TRY_SECONDS = 2.0


def _lost_connection(error: BaseException) -> bool:
    """A psycopg connection-level error, as raised or as wrapped by procrastinate."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, psycopg.OperationalError):
            return True
        cause = cause.__cause__
    return False


def observe_job(role: str, pool: Pool) -> Callable[..., Awaitable[Any]]:
    """procrastinate worker middleware: log context, duration metrics and the record of a
    job that failed for good."""

    async def middleware(
        call_next: Callable[[], Awaitable[Any]],
        context: job_context.JobContext,
        worker: Worker,
    ) -> Any:
        job = context.job
        payment_id = job.task_kwargs.get("payment_id")
        started = time.perf_counter()
        outcome = "succeeded"

        async def failed(error: Exception) -> str:
            """Whether procrastinate will retry the job; a job that fails for good is
            recorded in its payment's events, or in job_failures without a payment."""
            task = worker.app.tasks.get(job.task_name)
            if task is not None and task.get_retry_exception(exception=error, job=job):
                # Said at once: a provider that hangs made jobs time out and retry for many
                # minutes with nothing in the log until one failed for good.
                log.warning(
                    "job failed; it will be tried again",
                    extra={
                        "task": job.task_name,
                        "attempt": job.attempts + 1,
                        "error_type": type(error).__name__,
                        "error": logs.scrub(str(error))[:300],
                    },
                )
                return "retry"
            await _record_failure(
                pool, role, job, payment_id if isinstance(payment_id, str) else None, error
            )
            return "failed"

        with logs.job_context(job.id, payment_id if isinstance(payment_id, str) else None, role):
            try:
                return await call_next()
            except (exceptions.JobAborted, asyncio.CancelledError) as aborted:
                if context.abort_reason() != job_context.AbortReason.SHUTDOWN:
                    outcome = "aborted"
                    raise
                # Cut off at the end of the shutdown grace: the job goes back to its queue
                # (its steps are safe to run again) instead of ending `aborted`, which only
                # an operator's cancel should do.
                cut_off = TransientError("the worker stopped before the job finished")
                outcome = await failed(cut_off)
                raise cut_off from aborted
            except Exception as error:
                outcome = await failed(error)
                raise
            finally:
                JOB_SECONDS.labels(role, job.task_name, outcome).observe(
                    time.perf_counter() - started
                )

    return middleware


async def _record_failure(
    pool: Pool, role: str, job: Any, payment_id: str | None, error: Exception
) -> None:
    """A job that failed for good: a `job_failed` event of its payment, or a row of
    job_failures for a job without one (or whose payment is not there)."""
    data = {
        "job_id": job.id,
        "role": role,
        "task": job.task_name,
        "attempts": job.attempts + 1,
        "error_type": type(error).__name__,
        "error": logs.scrub(str(error))[:500],
    }
    try:
        async with pool.connection() as conn, conn.transaction():
            payment = await payments.get(conn, payment_id) if payment_id else None
            if payment is None:
                await conn.execute(
                    """INSERT INTO job_failures (job_id, role, task, attempts, error_type, error)
                       VALUES (%(job_id)s, %(role)s, %(task)s, %(attempts)s, %(error_type)s,
                               %(error)s)""",
                    data,
                )
                return
            await payments.record_event(
                conn,
                payment,
                "job_failed",
                actor=f"worker:{role}",
                reason=f"{job.task_name} job failed for good",
                data=data,
            )
    except Exception:
        log.exception("could not record the job's failure", extra={"job_id": job.id})


# Seconds a stop may take beyond the shutdown grace before the process reports its tasks.
STOP_SLACK_SECONDS = 10.0


def _report_slow_stop() -> None:
    """Log every task the process still waits on, with its stack (a stop that hangs)."""
    stacks = []
    for task in asyncio.all_tasks():
        where = []
        awaited: Any = task.get_coro()
        while awaited is not None:  # down the chain of awaits, to where it waits
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                name = frame.f_code.co_filename.rsplit("/", 1)[-1]
                where.append(f"{frame.f_code.co_name} ({name}:{frame.f_lineno})")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        stacks.append(f"{task.get_name()}: {' -> '.join(where) or 'done'}")
    log.error("still stopping after the grace period", extra={"tasks": stacks})


class MetricsUnavailable(RuntimeError):
    """The worker cannot serve its metrics where its settings say (a bad setting)."""


def _serve_metrics(s: Settings) -> None:
    try:
        server, _ = start_http_server(s.metrics_port or 0, addr=s.metrics_host)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise MetricsUnavailable(
                f"AGENTPAY_METRICS_PORT {s.metrics_port} is in use: give each worker on one "
                "machine its own port"
            ) from None
        raise MetricsUnavailable(
            f"AGENTPAY_METRICS_PORT {s.metrics_port} on AGENTPAY_METRICS_HOST "
            f"{s.metrics_host} cannot be served: {error.strerror or error}"
        ) from None
    log.info("serving metrics", extra={"port": server.server_port})


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
        if not self._stopping.is_set():
            log.info("stopping: no new jobs; running ones may finish", extra={"role": self.role})
            # A stop should take the grace period and a few seconds more; if it takes
            # longer, say what the process is still waiting for.
            asyncio.get_running_loop().call_later(
                self.settings.shutdown_grace_seconds + STOP_SLACK_SECONDS, _report_slow_stop
            )
        self._stopping.set()
        if self._worker is not None:
            self._worker.stop()

    async def run(self) -> None:
        s = self.settings
        logs.set_role(self.role)
        instrument_provider()
        if s.metrics_port:
            _serve_metrics(s)
        async with (
            open_pool(
                s.resolved_database_url(),
                min_size=1,
                max_size=self.concurrency + 4,
                name=f"worker-{self.role}",
                session=WORKER_SESSION,
            ) as pool,
            bind(pool) as app,
        ):
            app.perform_import_paths()  # register every role's task
            await self._wait_for_schema(pool)
            maintenance = asyncio.create_task(run_maintenance(app, pool, s), name="maintenance")
            try:
                failures = 0
                while not self._stopping.is_set():
                    self._worker = _Worker.for_role(app, pool, self.role, self.concurrency, s)
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
                    delay = random.uniform(0, min(10.0, 0.5 * 2**failures))
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
                await provider.connections.close()
        log.info("stopped", extra={"role": self.role})

    async def _wait_for_schema(self, pool: Pool) -> None:
        """Return once the database has every migration this release's code needs (or the
        process is asked to stop). A worker of a new release that starts before the deploy's
        `agentpay migrate` ran would otherwise fail jobs for good on a column not there yet;
        it waits instead, as it waits for a database that is away."""
        pause = 1.0
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(10), pool.connection() as conn:
                    needed = await schema.missing(conn)
            except Exception as error:
                needed, problem = None, repr(error)
            else:
                problem = "migrations not applied yet: run `agentpay migrate`"
            if needed == []:
                return
            log.warning(
                "waiting for the database's schema before taking jobs"
                if needed is not None
                else "waiting for a database connection before taking jobs",
                extra={"role": self.role, "missing": needed, "error": problem},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
            pause = min(10.0, pause * 2)


async def run_role(role: str, *, concurrency: int | None = None) -> None:
    worker = RoleWorker(role, concurrency=concurrency)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
