"""Database connections: one async pool per process, shared by our queries and procrastinate."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

Conn = psycopg.AsyncConnection[dict[str, Any]]
Pool = AsyncConnectionPool[Conn]


# A connection back in the pool for less than this long is handed out without a ping.
CHECK_AFTER_IDLE_SECONDS = 1.0

# When each connection was last connected or given back to its pool (monotonic seconds).
_idle_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
# When each connection was connected (monotonic seconds).
_connected_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

# What Postgres says (SQLSTATE 0A000, FeatureNotSupported) when a statement psycopg prepared on
# a connection (after `prepare_threshold`, 5, executions) reads `*` of a table a migration has
# changed since (`ALTER TABLE payment_jobs ADD COLUMN`): that prepared statement fails on that
# connection every time after. Only a new connection, or DEALLOCATE, makes it work again.
_STALE_PLAN = "cached plan must not change result type"


def stale_plan(error: BaseException) -> bool:
    """Whether `error` is a statement prepared before a migration changed its result's columns.
    It is transient: the pool the statement ran on replaces its connections (`_Pool`), and the
    same work done again succeeds (a job's retry, the agent's request sent again)."""
    return isinstance(error, psycopg.errors.FeatureNotSupported) and _STALE_PLAN in str(error)


# Every session's time zone: timestamps are read (and the API writes them) in UTC, whatever
# the database's or the server's `TimeZone` (`ALTER DATABASE … SET TimeZone` made the API's
# timestamps come out as -05:00), and a date of a timestamptz in SQL is a UTC date.
SESSION_TIMEZONE = "UTC"


# How far the database's clock is ahead of this process's (seconds; negative: behind), as
# last measured: when the pool makes a connection, and by every ping of one that sat idle
# (`_check_if_idle`, which asks the database's time instead of sending an empty query: the
# same round trip). A connection lives an hour at most (psycopg_pool's `max_lifetime`), so
# a busy process measures again at least that often, an idle one at its next checkout.
_clock_offset = 0.0


def _wall_clock() -> float:
    """This process's clock (Unix seconds): what the offset corrects."""
    return time.time()


async def _measure_clock(conn: psycopg.AsyncConnection[Any]) -> None:
    """Measure `_clock_offset` on `conn` (within half a round trip)."""
    global _clock_offset
    cur = conn.cursor(row_factory=tuple_row)
    before = _wall_clock()
    await cur.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
    after = _wall_clock()
    row = await cur.fetchone()
    assert row is not None
    _clock_offset = float(row[0]) - (before + after) / 2


def database_now() -> datetime:
    """Now by the database's clock, as this process last measured it: for an absolute time
    that Postgres compares with its own `now()` and that must be computed without a
    connection (a retry's `retry_at`, decided by procrastinate's retry strategy). Where a
    statement can compute it (`now() + …` in SQL), that is better still. A worker whose
    clock is off would otherwise retry at once (slow clock) or late (fast clock)."""
    return datetime.fromtimestamp(_wall_clock() + _clock_offset, UTC)


def _configurer(
    session: dict[str, str],
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # Our own statements run in explicit `conn.transaction()` blocks; a reconnecting
        # pool must never hand out a connection left inside a half-finished transaction.
        await conn.set_autocommit(True)
        if session:  # one round trip for all of them
            await conn.execute(
                "SELECT " + ", ".join("set_config(%s, %s, false)" for _ in session),
                [part for setting in session.items() for part in setting],
            )
        await _measure_clock(conn)
        _idle_since[conn] = _connected_at[conn] = time.monotonic()

    return configure


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    """Ping a connection only if it sat in the pool for a while (or was never used).

    A connection that was in use a moment ago was alive a moment ago; pinging it on every
    checkout cost a round trip per checkout. A database restart kills connections while
    they sit idle, so after an outage every idle connection is pinged (and replaced) again;
    the rare one that died within the last second fails its first statement instead, and
    psycopg marks it broken so the pool discards it: the request (a 5xx the client retries)
    or the job (Backoff retries `OperationalError`) is simply tried again. The ping asks the
    database's time, and measures this process's clock against it (`database_now`)."""
    returned = _idle_since.get(conn)
    if returned is None or time.monotonic() - returned >= CHECK_AFTER_IDLE_SECONDS:
        if conn.autocommit:
            await _measure_clock(conn)
        else:
            await AsyncConnectionPool.check_connection(conn)


# A lost connection is made again at most this long after the last try. psycopg_pool
# doubles the wait after each failed try with no bound, so after an outage of a minute or
# two the next try could come as long again after the database was back, and the process
# stood still until then.
MAX_RECONNECT_DELAY_SECONDS = 2.0


class _CappedBackoff(AttemptWithBackoff):
    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, MAX_RECONNECT_DELAY_SECONDS)


class _Pool(AsyncConnectionPool[Conn]):
    # Connections made before this moment (monotonic seconds) may hold prepared statements a
    # migration made stale: each is closed, and replaced, instead of being handed out.
    _stale_before = 0.0

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Conn]:  # noqa: ASYNC109 (psycopg_pool's)
        async with super().connection(timeout) as conn:
            try:
                yield conn
            except psycopg.errors.FeatureNotSupported as error:
                if stale_plan(error):
                    # Every connection made until now may have prepared the same statement.
                    self._stale_before = time.monotonic()
                raise

    async def getconn(self, timeout: float | None = None) -> Conn:  # noqa: ASYNC109
        while True:
            conn = await super().getconn(timeout)
            if _connected_at.get(conn, math.inf) > self._stale_before:
                return conn
            await conn.close()  # the pool discards a closed connection and makes another
            await super().putconn(conn)

    async def putconn(self, conn: Conn) -> None:
        _idle_since[conn] = time.monotonic()
        await super().putconn(conn)

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        # psycopg_pool's own attempt, bounded (it creates one when given None).
        if attempt is None:
            attempt = _CappedBackoff(timeout=self.reconnect_timeout)
        await super()._add_connection(attempt, growing=growing)


def make_pool(
    database_url: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    name: str = "",
    timeout: float = 30.0,
    session: dict[str, str] | None = None,
) -> Pool:
    """A pool that survives a database restart: a connection that sat idle for a second
    or more is checked before it is handed out (dead ones are replaced; new ones are
    retried with backoff); one given back less than a second ago is handed out as it is
    (see `_check_if_idle`). A named pool's connections show as `agentpay-<name>` in
    `pg_stat_activity.application_name`, so operators see which process holds what.
    `timeout`: how long a checkout waits for a connection before `PoolTimeout`. `session`:
    settings each connection gets when it connects (e.g. {"lock_timeout": "3s"}), besides
    `TimeZone` UTC (`SESSION_TIMEZONE`), which every connection gets."""
    kwargs: dict[str, Any] = {"row_factory": dict_row}
    if name:
        kwargs["application_name"] = f"agentpay-{name}"
    return _Pool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name or None,
        kwargs=kwargs,
        configure=_configurer({"TimeZone": SESSION_TIMEZONE, **(session or {})}),
        check=_check_if_idle,
        reconnect_timeout=24 * 3600,
        timeout=timeout,
    )


@asynccontextmanager
async def open_pool(database_url: str, **kwargs: Any) -> AsyncIterator[Pool]:
    pool = make_pool(database_url, **kwargs)
    await pool.open(wait=False)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def transaction(pool: Pool) -> AsyncIterator[Conn]:
    """One connection, one transaction: committed on success, rolled back on error."""
    async with pool.connection() as conn, conn.transaction():
        yield conn
