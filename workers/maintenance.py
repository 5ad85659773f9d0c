"""Maintenance services that keep the fleet healthy without anyone acting.

Each is a plain async function (testable on its own); `run_maintenance` runs them on an
interval in every worker process, one process at a time (an advisory lock elects the one).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import procrastinate

from tasks.app import defer
from tasks.db import Pool
from tasks.settings import Settings

log = logging.getLogger("agentpay.maintenance")

_LOCK_KEY = 0x61676E746D  # "agntm"

# Which role moves a payment on from each non-final state it can wait in unattended.
NEXT_ROLE = {
    "received": "pricing",
    "priced": "risk",
    "approved": "charge",
    "charging": "reconcile",
    "succeeded": "reconcile",
}


async def rescue_stalled_jobs(app: procrastinate.App, stalled_after: float) -> list[int]:
    """Put back in the queue the jobs whose worker stopped heartbeating (killed, frozen,
    cut off). The steps they run are safe to run twice."""
    stalled = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after)
    rescued = []
    for job in stalled:
        assert job.id is not None
        await app.job_manager.retry_job_by_id_async(job.id, retry_at=datetime.now(UTC))
        log.warning(
            "rescued stalled job",
            extra={
                "job_id": job.id,
                "role": job.queue,
                "payment_id": job.task_kwargs.get("payment_id"),
            },
        )
        rescued.append(job.id)
    return rescued


async def sweep_stuck_payments(pool: Pool, older_than: float) -> list[str]:
    """Re-drive payments that sit in a non-final state longer than `older_than` seconds with
    no job waiting or running for them (a job that failed for good, a lost deferral)."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            """SELECT p.id, p.status FROM payment_jobs p
               WHERE p.status = ANY(%s)
                 AND p.updated_at < now() - make_interval(secs => %s)
                 AND NOT EXISTS (
                     SELECT 1 FROM procrastinate_jobs j
                     WHERE j.args->>'payment_id' = p.id AND j.status IN ('todo', 'doing'))
               ORDER BY p.updated_at
               LIMIT 500
               FOR UPDATE OF p SKIP LOCKED""",
            (list(NEXT_ROLE), older_than),
        )
        stuck = await cur.fetchall()
        for row in stuck:
            await defer(conn, NEXT_ROLE[row["status"]], payment_id=row["id"])
    if stuck:
        log.warning("re-drove stuck payments", extra={"count": len(stuck)})
    return [row["id"] for row in stuck]


async def run_once(app: procrastinate.App, pool: Pool, settings: Settings) -> bool:
    """One round of every service, if no other process is running one; True if it ran."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS mine", (_LOCK_KEY,))
        row = await cur.fetchone()
        if not (row and row["mine"]):
            return False
        await rescue_stalled_jobs(app, settings.stalled_after_seconds)
        await sweep_stuck_payments(pool, settings.sweep_after_seconds)
    return True


async def run_maintenance(app: procrastinate.App, pool: Pool, settings: Settings) -> None:
    """Forever, every `maintenance_interval_seconds`; errors are logged, never fatal."""
    while True:
        try:
            await run_once(app, pool, settings)
        except Exception:
            log.exception("maintenance round failed; trying again next round")
        await asyncio.sleep(settings.maintenance_interval_seconds)
