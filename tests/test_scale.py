"""Reads that must not grow with the database: on a table of many payments (most of them old
and settled), each read looks at about what it returns, not at every payment, job or entry
kept. Measured from the plan Postgres ran (`EXPLAIN ANALYZE`: the rows each scan of a table
produced and those it read and threw away), not from a clock."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from api.metrics import _DURATIONS as DURATIONS_QUERY
from api.metrics import DURATION_BUCKETS
from tasks import agents, customers, payments
from tasks.db import Pool
from workers.devstack import WAITING_ON_THE_PROVIDER

T = TypeVar("T")

OLD = 20_000  # payments of one agent, settled long ago
RECENT = 15  # of its payments, authorized in the last hour


def _rows_read(plan: dict[str, Any], table: str) -> int:
    """Rows the plan's scans of `table` produced or filtered out, over all their loops."""
    read = 0
    if plan.get("Relation Name") == table:
        loops = plan.get("Actual Loops", 1)
        read += loops * (
            plan.get("Actual Rows", 0)
            + plan.get("Rows Removed by Filter", 0)
            + plan.get("Rows Removed by Index Recheck", 0)
        )
    for child in plan.get("Plans", []):
        read += _rows_read(child, table)
    return read


async def rows_read(conn: Any, query: Any, params: Any, table: str) -> int:
    cur = await conn.execute(
        b"EXPLAIN (ANALYZE, FORMAT JSON) " + _text(conn, query), params, prepare=False
    )
    row = await cur.fetchone()
    plan = row["QUERY PLAN"] if isinstance(row, dict) else row[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return _rows_read(plan[0]["Plan"], table)


def _text(conn: Any, query: Any) -> bytes:
    return query.encode() if isinstance(query, str) else query.as_bytes(conn)


class Recorder:
    """A connection that keeps the statements run through it (and runs them)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.statements: list[tuple[Any, Any]] = []

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        self.statements.append((query, params))
        return await self.conn.execute(query, params, **kwargs)


@pytest.fixture
async def big(pool: Pool) -> dict[str, Any]:
    """One agent with OLD reconciled payments created over the last year and RECENT
    authorized ones of the last hour; another agent with a handful; statistics fresh."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "big-agent")
        small, _ = await agents.create(conn, "small-agent")
        # Loaded as a restore would (no triggers: they would record events and check moves).
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            """INSERT INTO payment_jobs (id, agent_id, status, currency, payment_method,
                                         amount_requested, amount_subtotal, amount_fee,
                                         amount_tax, amount_total, created_at, updated_at)
               SELECT 'pay_old' || lpad(g::text, 8, '0'), %(agent)s, 'reconciled', 'usd',
                      'pm_card_visa', 1000, 1000, 0, 0, 1000,
                      now() - interval '365 days' + g * interval '25 minutes',
                      now() - interval '365 days' + g * interval '25 minutes'
                 FROM generate_series(1, %(old)s) AS g
               UNION ALL
               SELECT 'pay_new' || lpad(g::text, 8, '0'), %(agent)s, 'authorized', 'usd',
                      'pm_card_visa', 1000, 1000, 0, 0, 1000,
                      now() - g * interval '1 minute', now() - g * interval '1 minute'
                 FROM generate_series(1, %(recent)s) AS g
               UNION ALL
               SELECT 'pay_sml' || g, %(small)s, 'authorized', 'usd', 'pm_card_visa', 1000,
                      1000, 0, 0, 1000, now() - g * interval '1 day', now()
                 FROM generate_series(1, 3) AS g""",
            {"agent": agent.id, "small": small.id, "old": OLD, "recent": RECENT},
        )
    async with pool.connection() as conn:
        await conn.execute("ANALYZE payment_jobs")
    return {"agent": agent.id, "small": small.id}


async def read_by(conn: Any, call: Callable[[Any], Awaitable[T]]) -> tuple[T, int]:
    """What `call(conn)` returns, and the rows of payment_jobs its one statement read."""
    recorder = Recorder(conn)
    result = await call(recorder)
    [(query, params)] = recorder.statements
    return result, await rows_read(conn, query, params, "payment_jobs")


async def _page(pool: Pool, **kwargs: Any) -> tuple[list[payments.Payment], int]:
    """A page of payments, and the rows of payment_jobs its statement read."""
    async with pool.connection() as conn:
        (rows, _), read = await read_by(conn, lambda c: payments.page(c, **kwargs))
        return rows, read


async def test_a_page_of_payments_by_status_reads_that_page_not_every_payment(
    pool: Pool, big: dict[str, Any]
) -> None:
    """A status filter with a cursor or a date bound: the planner walked the created_at index
    of all the agent's (or everyone's) payments and filtered (2 to 5 s at 1.5 million)."""
    agent = big["agent"]
    oldest = await _oldest(pool, agent)
    page, read = await _page(
        pool, agent_id=agent, limit=10, status=["authorized"], ending_before=oldest
    )
    assert [p["status"] for p in page] == ["authorized"] * 10
    assert read <= 50, read
    page, read = await _page(
        pool, agent_id=None, limit=10, status=["authorized"], created={"lt": oldest["created_at"]}
    )
    assert page == [] and read <= 50, read
    # Several statuses: one ordered read each, merged, newest first, paged both ways.
    page, read = await _page(
        pool, agent_id=agent, limit=20, status=["reconciled", "authorized"], ending_before=oldest
    )
    assert read <= 100, read
    assert [p["id"] for p in page] == [f"pay_old{n:08d}" for n in range(21, 1, -1)]
    newest, read = await _page(pool, agent_id=agent, limit=20, status=["reconciled", "authorized"])
    assert read <= 100, read
    assert [p["id"] for p in newest] == [f"pay_new{n:08d}" for n in range(1, RECENT + 1)] + [
        f"pay_old{n:08d}" for n in range(OLD, OLD - 5, -1)
    ]
    after, _ = await _page(
        pool,
        agent_id=agent,
        limit=3,
        status=["authorized", "reconciled"],
        starting_after=newest[-1],
    )
    assert [p["id"] for p in after] == [f"pay_old{n:08d}" for n in range(OLD - 5, OLD - 8, -1)]


async def _oldest(pool: Pool, agent: str) -> payments.Payment:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT * FROM payment_jobs WHERE agent_id = %s ORDER BY created_at, id LIMIT 1",
            (agent,),
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def test_counting_an_agents_payments_in_flight_reads_those_not_all_its_payments(
    pool: Pool, big: dict[str, Any]
) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT status FROM payment_states WHERE NOT is_final")
        every_open = {r["status"] for r in await cur.fetchall()}
        assert agents.IN_FLIGHT_STATES == every_open - {"partially_refunded"}
        counts, read = await read_by(conn, lambda c: agents.payments_in_flight(c, big["agent"]))
    assert counts == {"authorized": RECENT}
    assert read <= 100, read


async def test_customers_shared_reads_the_payments_that_name_one(
    pool: Pool, big: dict[str, Any]
) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_jobs SET customer = 'cus_shared'"
            " WHERE id IN ('pay_sml1', 'pay_new00000001')"
        )
        await conn.execute("ANALYZE payment_jobs")
        found, read = await read_by(conn, customers.shared)
    assert [(r["customer"], r["agent_id"], len(r["others"])) for r in found] == [
        ("cus_shared", None, 2)
    ]
    assert read <= 10, read


async def test_the_dev_stacks_count_of_payments_waiting_on_the_provider_reads_those(
    pool: Pool, big: dict[str, Any]
) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_jobs SET provider_payment_id = 'pi_' || id WHERE status = 'authorized'"
        )
        await conn.execute("ANALYZE payment_jobs")
        cur = await conn.execute(WAITING_ON_THE_PROVIDER)
        row = await cur.fetchone()
        read = await rows_read(conn, WAITING_ON_THE_PROVIDER, None, "payment_jobs")
    assert row is not None and row["n"] == RECENT + 3
    assert read <= 100, read


async def test_the_last_fifteen_minutes_of_jobs_are_read_without_every_job_kept(
    pool: Pool,
) -> None:
    """ops_throughput and the /metrics durations: the planner started from the jobs table
    (every job kept, with a look-up of its events each: 1.3 s at 300,000)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            """WITH jobs AS (
                   INSERT INTO procrastinate_jobs (queue_name, task_name, status, args)
                   SELECT r, r, 'succeeded', jsonb_build_object('n', g)
                     FROM generate_series(1, 10000) AS g,
                          unnest(ARRAY['pricing', 'risk', 'charge', 'reconcile']) AS r
                   RETURNING id)
               INSERT INTO procrastinate_events (job_id, type, at)
               SELECT id, t, now() - interval '2 days' - (id % 1000) * interval '1 minute'
                 FROM jobs CROSS JOIN unnest(ARRAY['started', 'succeeded']::
                      procrastinate_job_event_type[]) AS t"""
        )
        await conn.execute(
            """UPDATE procrastinate_events SET at = now() - interval '1 minute'
                WHERE job_id IN (SELECT id FROM procrastinate_jobs WHERE queue_name = 'pricing'
                                  ORDER BY id DESC LIMIT 5)"""
        )
    async with pool.connection() as conn:
        await conn.execute("ANALYZE procrastinate_jobs")
        await conn.execute("ANALYZE procrastinate_events")
        cur = await conn.execute("SELECT succeeded_15m FROM ops_throughput WHERE role = 'pricing'")
        row = await cur.fetchone()
        assert row is not None and row["succeeded_15m"] == 5
        view = await rows_read(conn, "SELECT * FROM ops_throughput", None, "procrastinate_jobs")
        durations = await rows_read(
            conn, DURATIONS_QUERY, (list(DURATION_BUCKETS),), "procrastinate_jobs"
        )
    assert view <= 50 and durations <= 50, (view, durations)
