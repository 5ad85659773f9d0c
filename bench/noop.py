"""The baseline: plain procrastinate, its defaults, one process, a no-op task.

Run as `python -m bench.noop DATABASE_URL JOBS [CONCURRENCY [POSTMASTER_PID]]` (the bench
starts it in a process of its own) on an empty database: applies procrastinate's own schema,
defers JOBS no-op jobs in batches on a queue of their own, then runs one Worker with the
given concurrency (default 10, everything else procrastinate's defaults) until every job has
succeeded, and prints one JSON line with the jobs per second and the CPU they took (this
process's; with the pid of the server's postmaster, also Postgres').
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import procrastinate
import psycopg
from procrastinate.worker import Worker

from bench import procfs

QUEUE = "bench_noop"


async def noop() -> None:
    return None


async def _succeeded(conn: psycopg.AsyncConnection) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = %s AND status = 'succeeded'",
        (QUEUE,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def measure(
    database_url: str, jobs: int, concurrency: int, postmaster: int | None = None
) -> dict[str, float | None]:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))
    task = app.task(name=QUEUE, queue=QUEUE)(noop)
    async with (
        app.open_async(),
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watch,
    ):
        # procrastinate's schema as procrastinate ships it: none of agentpay's indexes,
        # triggers or changes to its functions (schema/migrations) are in this database.
        await app.schema_manager.apply_schema_async()
        for start in range(0, jobs, 1000):
            await task.batch_defer_async(*({} for _ in range(min(1000, jobs - start))))
        worker = Worker(app, queues=[QUEUE], concurrency=concurrency, install_signal_handlers=False)
        server = procfs.CpuMeter({}, postmaster=postmaster)
        server.start()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        running = asyncio.create_task(worker.run())
        while await _succeeded(watch) < jobs:
            if running.done():
                running.result()
                raise RuntimeError("the worker stopped before the jobs were done")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        postgres_cpu = server.stop().get("postgres")
        worker.stop()
        await running
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "seconds": elapsed,
        "jobs_per_second": jobs / elapsed,
        "worker_cpu_seconds": cpu,
        "postgres_cpu_seconds": postgres_cpu,
    }


def main(argv: list[str]) -> None:
    database_url, jobs = argv[0], int(argv[1])
    concurrency = int(argv[2]) if len(argv) > 2 else 10
    postmaster = int(argv[3]) if len(argv) > 3 else None
    print(json.dumps(asyncio.run(measure(database_url, jobs, concurrency, postmaster))))


if __name__ == "__main__":
    main(sys.argv[1:])
