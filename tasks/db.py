"""Database connections: one async pool per process, shared by our queries and procrastinate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

Conn = psycopg.AsyncConnection[dict[str, Any]]
Pool = AsyncConnectionPool[Conn]


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Our own statements run in explicit `conn.transaction()` blocks; a reconnecting pool
    # must never hand out a connection left inside a half-finished transaction.
    await conn.set_autocommit(True)


def make_pool(database_url: str, *, min_size: int = 2, max_size: int = 10, name: str = "") -> Pool:
    """A pool that checks connections before handing them out, so it survives a database
    restart: dead connections are replaced, new ones are retried with backoff."""
    return AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name or None,
        kwargs={"row_factory": dict_row},
        configure=_configure,
        check=AsyncConnectionPool.check_connection,
        reconnect_timeout=24 * 3600,
        timeout=30,
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
