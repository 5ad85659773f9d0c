"""One bench run: one Postgres, every stage in order, the figures side by side.

Sizes are chosen so the full run ends in well under five minutes on two cores; `quick`
shrinks every stage to a few seconds (the test suite runs it) — its figures prove the
harness works, not how fast agentpay is.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench import report, stages
from bench.pgserver import BenchServer
from workers.devstack import free_port


@dataclass(frozen=True)
class Sizes:
    clients: int  # concurrent clients of the enqueue stage, and pgbench's -c
    pgbench_seconds: int
    baseline_jobs: int
    enqueue_seconds: float
    paced_seconds: float
    pipeline_payments: int
    latency_rate: float
    latency_seconds: float
    backlog_sizes: tuple[int, ...]
    backlog_samples: int
    drain_timeout: float


FULL = Sizes(
    clients=16,
    pgbench_seconds=10,
    baseline_jobs=4000,
    enqueue_seconds=10,
    paced_seconds=10,
    pipeline_payments=1000,
    latency_rate=20,
    latency_seconds=15,
    backlog_sizes=(1_000, 10_000, 100_000),
    backlog_samples=200,
    drain_timeout=90,
)

QUICK = Sizes(
    clients=4,
    pgbench_seconds=1,
    baseline_jobs=100,
    enqueue_seconds=1,
    paced_seconds=1,
    pipeline_payments=12,
    latency_rate=20,
    latency_seconds=1,
    backlog_sizes=(100, 1_000),
    backlog_samples=10,
    drain_timeout=60,
)


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.partition(":")[2].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],
    }


def run(
    data_dir: Path,
    *,
    quick: bool = False,
    database_url: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Run every stage and return the result (also written to <data_dir>/bench.json).

    `progress`, if given, is called with a short line as each stage starts."""
    sizes = QUICK if quick else FULL
    say = progress or (lambda _: None)
    started = time.monotonic()
    root = data_dir.resolve() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    server = BenchServer(root, database_url)
    result: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "sizes": asdict(sizes),
    }
    api_port = free_port()
    secret = "whsec_" + secrets.token_hex(24)
    sandbox = None
    try:
        say("starting Postgres")
        server.start()
        with psycopg.connect(server.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            result["machine"]["postgres"] = row[0] if row else ""
        server.create_template()

        say(f"pgbench -N, {sizes.clients} clients, {sizes.pgbench_seconds} s")
        result["pgbench"] = stages.pgbench_stage(
            server, clients=sizes.clients, seconds=sizes.pgbench_seconds
        )
        say(f"plain procrastinate, {sizes.baseline_jobs} no-op jobs")
        result["baseline"] = stages.baseline_stage(server, jobs=sizes.baseline_jobs)
        say(f"enqueue, {sizes.clients} clients, {sizes.enqueue_seconds:g} s + paced")
        result["enqueue"] = stages.enqueue_stage(
            server,
            api_port=api_port,
            clients=sizes.clients,
            seconds=sizes.enqueue_seconds,
            paced_seconds=sizes.paced_seconds,
            log_dir=root / "logs",
        )
        sandbox_port = free_port()
        sandbox = stages.start_sandbox(
            sandbox_port, api_port, secret, root / "logs" / "sandbox.log"
        )
        result["pipeline"] = {}
        for k in (1, 2):
            what = f" and latency at {sizes.latency_rate:g}/s" if k == 1 else ""
            say(f"pipeline, {k} worker(s) per role, {sizes.pipeline_payments} payments{what}")
            result["pipeline"][f"k{k}"] = stages.pipeline_stage(
                server,
                k=k,
                api_port=api_port,
                provider_base=f"http://127.0.0.1:{sandbox_port}",
                webhook_secret=secret,
                payments=sizes.pipeline_payments,
                clients=sizes.clients,
                latency_rate=sizes.latency_rate if k == 1 else None,
                latency_seconds=sizes.latency_seconds,
                drain_timeout=sizes.drain_timeout,
                data_dir=root,
                provider_pid=sandbox.pid,
            )
        sandbox.stop()
        sandbox = None
        say(f"backlog, {', '.join(f'{n:,}' for n in sizes.backlog_sizes)} jobs waiting")
        result["backlog"] = stages.backlog_stage(
            server, sizes=list(sizes.backlog_sizes), samples=sizes.backlog_samples
        )
    finally:
        if sandbox is not None:
            sandbox.stop()
        server.stop()
    result["seconds"] = time.monotonic() - started
    report.derive(result)
    (data_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    return result
