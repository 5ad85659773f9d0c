"""The procrastinate App every role's task is registered on, and how a process binds it to
its database pool.

Jobs are always deferred with `connection=` inside the caller's transaction (design rule 1),
so deferring never needs the app's own pool; only a worker (fetching and finishing jobs)
does, and it gets the process pool through `bind()`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import procrastinate
import psycopg
from procrastinate import jobs, retry
from procrastinate import sql as procrastinate_sql
from psycopg.types.json import Jsonb

from tasks.db import Pool, database_now, stale_plan

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(),
    import_paths=[
        "tasks.pricing",
        "tasks.risk",
        "tasks.charge",
        "tasks.reconcile",
        "tasks.catchup",
    ],
)


class TransientError(Exception):
    """Something that should work if tried again later (the provider is down, a lock is
    held, the payment is not ready yet)."""


class Throttled(TransientError):
    """The other side asks us to slow down (a 429: Stripe's rate limits are 25 requests a
    second in test mode, 100 live). Nothing is wrong but the pace, so a throttled job is
    tried again for longer than one meeting other transient errors."""


# A job that keeps being throttled may take this many times its task's attempts: a rate
# limit lasting minutes slows payments down instead of failing their jobs.
THROTTLED_ATTEMPTS_FACTOR = 3


class Backoff(retry.BaseRetryStrategy):
    """Retry only what is worth retrying — transient errors, lost database connections and
    statements prepared before a migration changed their columns (`tasks.db.stale_plan`: the
    pool replaced its connections) — with capped exponential backoff and full jitter.
    Anything else fails the job at once and is recorded (a bug or bad data does not get
    better by being run again). A throttled job gets `THROTTLED_ATTEMPTS_FACTOR` times the
    attempts."""

    def __init__(self, *, max_attempts: int = 10, base: float = 0.5, cap: float = 60.0) -> None:
        self.max_attempts = max_attempts
        self.base = base
        self.cap = cap

    retry_on: tuple[type[BaseException], ...] = (
        TransientError,
        psycopg.OperationalError,
        procrastinate.exceptions.ConnectorException,
    )

    def delay(self, attempts: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempts))

    def get_retry_decision(
        self, *, exception: BaseException, job: jobs.Job
    ) -> retry.RetryDecision | None:
        limit = self.max_attempts
        if isinstance(exception, Throttled):
            limit *= THROTTLED_ATTEMPTS_FACTOR
        transient = isinstance(exception, self.retry_on) or stale_plan(exception)
        if job.attempts + 1 >= limit or not transient:
            return None
        # procrastinate stores `retry_at` as the job's `scheduled_at` as it is
        # (procrastinate_retry_job_v2), and claims the job once it is past by the database's
        # `now()`; `retry_in` would not help: procrastinate turns it into an absolute time by
        # this process's clock, in Python. A worker whose clock is a minute slow burnt its
        # ten attempts in under a second; one that is fast waited that much longer each
        # time. So the time is the database's, as this process measures it (tasks.db).
        retry_at = database_now() + timedelta(seconds=self.delay(job.attempts))
        return retry.RetryDecision(retry_at=retry_at)


def pool() -> Pool:
    """The pool of this process, once `bind()` has run."""
    connector: Any = app.connector
    bound: Pool = connector.pool
    return bound


@asynccontextmanager
async def bind(process_pool: Pool) -> AsyncIterator[procrastinate.App]:
    """Make the App use `process_pool` for as long as the block runs."""
    connector = procrastinate.PsycopgConnector()
    with app.replace_connector(connector):
        await connector.open_async(pool=process_pool)  # type: ignore[arg-type]
        try:
            yield app
        finally:
            await connector.close_async()


# procrastinate's own query for deferring jobs, executed on the caller's connection: what
# `app.configure_task(...).defer_async(...)` runs, without building a Job and a deferrer per
# call and without reading back the job id nobody uses (a step defers its next job on every
# payment, so that overhead was paid four times per payment).
_DEFER_JOBS = procrastinate_sql.queries["defer_jobs"]

# The same for a job scheduled `schedule_in` seconds from now by the database's clock, in
# the same statement: procrastinate claims a job once its `scheduled_at` is past by the
# database's `now()`, and a time taken from this process's clock moved every recheck by
# however far that clock is off (a minute slow: a payment waiting on the provider was
# looked at again in a busy loop; ten minutes fast: every recheck came ten minutes late).
# `statement_timestamp()`, not `now()`: the time the job is deferred, however long the
# caller's transaction has run.
_DEFER_SCHEDULED_JOBS = """SELECT unnest(procrastinate_defer_jobs_v1(ARRAY(
    SELECT ROW((j).queue_name, (j).task_name, (j).priority, (j).lock, (j).queueing_lock,
               (j).args, statement_timestamp() + make_interval(secs => %(schedule_in)s)
           )::procrastinate_job_to_defer_v1
      FROM unnest(%(jobs)s::procrastinate_job_to_defer_v1[]) AS j))) AS id"""


async def defer(
    conn: Any, task_name: str, *, schedule_in: float | None = None, **task_kwargs: Any
) -> None:
    """Defer a job inside the caller's transaction: it exists if and only if the caller
    commits (design rule 1). Tasks are named after the role that runs them; the job goes to
    the task's queue with the task's priority and locks, as procrastinate would defer it.
    `schedule_in`: not before that many seconds from now, by the database's clock."""
    app.perform_import_paths()
    task = app.tasks[task_name]
    job = (
        task.queue,
        task.name,
        task.priority,
        task.lock,
        task.queueing_lock,
        Jsonb(task_kwargs),
        None,
    )
    if schedule_in:
        await conn.execute(_DEFER_SCHEDULED_JOBS, {"jobs": [job], "schedule_in": schedule_in})
    else:
        await conn.execute(_DEFER_JOBS, {"jobs": [job]})


async def job_waiting(
    conn: Any, task_name: str, payment_id: str, statuses: tuple[str, ...] = ("todo", "doing")
) -> bool:
    """Whether a `task_name` job for the payment is in one of `statuses` (by default queued
    or running: it will act on the payment)."""
    cur = await conn.execute(
        """SELECT EXISTS (
               SELECT 1 FROM procrastinate_jobs
                WHERE task_name = %s AND args->>'payment_id' = %s
                  AND status::text = ANY(%s)) AS waiting""",
        (task_name, payment_id, list(statuses)),
    )
    row = await cur.fetchone()
    return bool(row and row["waiting"])
