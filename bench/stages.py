"""The stages of a bench run. Each takes the server (and what it needs) and returns a dict of
figures; the runner decides the sizes and the order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from bench import load, procfs
from bench.pgserver import BenchServer, pgbench_tps
from bench.stats import percentile
from tasks.settings import ROLES, Settings
from workers.devstack import DevStack, new_agent_keys

STAGE_JOBS_PER_PAYMENT = 4  # pricing, risk, charge, reconcile


def _ms(seconds: float) -> float:
    return seconds * 1000


# -- processes ----------------------------------------------------------------------------------


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class Process:
    """A child process of the bench (the API alone, the sandbox), logging to a file."""

    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, argv: list[str], log: Path, env: dict[str, str]) -> Process:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return cls(process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_sandbox(port: int, api_port: int, secret: str, log: Path) -> Process:
    """The Stripe-compatible sandbox in a process of its own (as a remote provider would be),
    delivering its webhooks to the API port every stage's API listens on."""
    proc = Process.start(
        [
            sys.executable,
            "-m",
            "workers",
            "sandbox",
            "--port",
            str(port),
            "--webhook-url",
            f"http://127.0.0.1:{api_port}/v1/webhooks/stripe",
        ],
        log,
        {"STRIPE_WEBHOOK_SECRET": secret},
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/_sandbox/health", proc.process, log)
    except BaseException:  # a stop while it starts: the caller has no handle on it yet
        proc.stop()
        raise
    return proc


# -- 1. pgbench -------------------------------------------------------------------------------


def pgbench_stage(server: BenchServer, *, clients: int, seconds: int) -> dict[str, Any]:
    """Postgres' own commit ceiling on this machine: pgbench's simple-update script (-N)."""
    url = server.create("bench_pgbench")
    server.pgbench(url, "-i", "-q", "-s", "1")
    out = server.pgbench(url, "-N", "-c", str(clients), "-j", "2", "-T", str(seconds))
    server.drop("bench_pgbench")
    return {"tps": pgbench_tps(out), "clients": clients, "seconds": seconds}


# -- 2. plain procrastinate ------------------------------------------------------------------


def baseline_stage(server: BenchServer, *, jobs: int, concurrency: int = 10) -> dict[str, Any]:
    """Plain procrastinate with a no-op task: one process, `concurrency` jobs at once, on a
    database holding procrastinate's own schema only."""
    url = server.create("bench_baseline")
    pid = server.postmaster_pid
    done = subprocess.run(
        [sys.executable, "-m", "bench.noop", url, str(jobs), str(concurrency)]
        + ([str(pid)] if pid else []),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    server.drop("bench_baseline")
    if done.returncode != 0:
        raise RuntimeError(f"the baseline worker failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- 3. enqueue ---------------------------------------------------------------------------------


# The per-agent rate limit stays on (every POST still takes its token: that is part of the
# cost measured) but so high that it never refuses: the stage measures capacity, not policy
# (with the default 100/s an agent, a fast machine answers four clients faster than that).
UNBINDING_RATE_LIMIT = {
    "AGENTPAY_API_RATE_LIMIT_PER_SECOND": "1000000",
    "AGENTPAY_API_RATE_LIMIT_BURST": "1000000",
}


def enqueue_stage(
    server: BenchServer,
    *,
    api_port: int,
    clients: int,
    seconds: float,
    paced_seconds: float,
    log_dir: Path,
) -> dict[str, Any]:
    """POST /v1/payments against the API alone (no workers): the most it answers with
    `clients` connections, then latency at half that rate, paced."""
    url = server.clone("bench_enqueue")
    keys = asyncio.run(new_agent_keys(url, "bench-agent", clients))
    api = Process.start(
        [sys.executable, "-m", "workers", "api", "--port", str(api_port)],
        log_dir / "enqueue-api.log",
        {"DATABASE_URL": url, "AGENTPAY_DATA_DIR": str(log_dir), **UNBINDING_RATE_LIMIT},
    )
    api_url = f"http://127.0.0.1:{api_port}"
    try:
        _wait_http(f"{api_url}/readyz", api.process, api.log)
        # A short warm-up: connections opened, code paths imported, caches filled.
        asyncio.run(load.closed_loop(api_url, keys, clients=clients, count=clients * 5))
        # With AGENTPAY_API_PROCESSES set, the API's own processes are children of this one.
        api_pids = [api.pid, *procfs.children(api.pid)]
        meter = procfs.CpuMeter(
            {"api": api_pids, "load": [os.getpid()]}, postmaster=server.postmaster_pid
        )
        meter.start()
        full = asyncio.run(load.closed_loop(api_url, keys, clients=clients, seconds=seconds))
        cpu = meter.stop()
        rate = len(full.ids) / full.elapsed
        half = asyncio.run(
            load.paced(api_url, keys, rate=rate / 2, seconds=paced_seconds, connections=clients)
        )
        api_peak = max((procfs.peak_rss_mb(pid) or 0.0) for pid in api_pids)
    finally:
        api.stop()
        server.drop("bench_enqueue")
    return {
        "requests_per_second": rate,
        "clients": clients,
        "cpu_ms_per_request": {
            group: 1000 * used / max(1, len(full.ids)) for group, used in cpu.items()
        },
        "requests": len(full.ids),
        "errors": full.errors + half.errors,
        "first_error": full.first_error or half.first_error,
        "p50_ms": _ms(percentile(full.latencies, 0.5)),
        "p99_ms": _ms(percentile(full.latencies, 0.99)),
        "paced": {
            "rate": rate / 2,
            "requests": len(half.ids),
            "p50_ms": _ms(percentile(half.latencies, 0.5)),
            "p99_ms": _ms(percentile(half.latencies, 0.99)),
        },
        "api_peak_rss_mb": api_peak,
    }


# -- 4, 5, 7. the pipeline, its latency, and memory -------------------------------------------

_FINAL = """
SELECT p.id, p.status,
       (SELECT min(e.created_at) FROM payment_events e
         WHERE e.payment_id = p.id AND e.to_status = p.status
           AND e.from_status IS DISTINCT FROM e.to_status) AS final_at
FROM payment_jobs p JOIN payment_states s USING (status)
WHERE p.id = ANY(%s) AND s.is_final
"""


async def _wait_final(
    database_url: str, ids: list[str], within: float
) -> dict[str, dict[str, Any]]:
    """The payments of `ids` in a final state once all are (or after `within` seconds)."""
    deadline = time.monotonic() + within
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, row_factory=dict_row
    ) as conn:
        while True:
            cur = await conn.execute(
                """SELECT count(*) AS n FROM payment_jobs p JOIN payment_states s USING (status)
                   WHERE p.id = ANY(%s) AND s.is_final""",
                (ids,),
            )
            row = await cur.fetchone()
            if (row and row["n"] == len(ids)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        cur = await conn.execute(_FINAL, (ids,))
        return {r["id"]: r for r in await cur.fetchall()}


async def _jobs_per_payment(database_url: str, ids: list[str]) -> float:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE args->>'payment_id' = ANY(%s)", (ids,)
        )
        row = await cur.fetchone()
    return (row[0] if row else 0) / max(1, len(ids))


def _peak_memory(stack: DevStack) -> dict[str, float | None]:
    return {name: procfs.peak_rss_mb(child.pid) for name, child in stack.children.items()}


def pipeline_stage(
    server: BenchServer,
    *,
    k: int,
    api_port: int,
    provider_base: str,
    webhook_secret: str,
    payments: int,
    clients: int,
    latency_rate: float | None,
    latency_seconds: float,
    drain_timeout: float,
    data_dir: Path,
    provider_pid: int | None = None,
) -> dict[str, Any]:
    """The dev stack with `k` worker processes per role: `payments` POSTed as fast as
    `clients` connections go, carried to a final state; then, if `latency_rate` is given,
    payments at that steady rate and the latency of each from its POST to its final state."""
    name = f"bench_pipeline_k{k}"
    url = server.clone(name)
    settings = Settings(
        database_url=url,
        stripe_api_base=provider_base,
        stripe_webhook_secret=webhook_secret,
        data_dir=data_dir / f"k{k}",
    )
    stack = DevStack(settings, port=api_port, workers_per_role=k)
    result: dict[str, Any] = {"workers_per_role": k}
    try:
        info = stack.start()
        api_url = info["api_url"]
        keys = asyncio.run(new_agent_keys(url, "bench-agent", clients))
        groups = {
            "api": [stack.children["api"].pid],
            **{role: [c.pid for c in stack.workers(role)] for role in ROLES},
            "bench": [os.getpid()],
            **({"sandbox": [provider_pid]} if provider_pid else {}),
        }
        meter = procfs.CpuMeter(groups, postmaster=server.postmaster_pid)
        meter.start()
        sent = asyncio.run(load.closed_loop(api_url, keys, clients=clients, count=payments))
        final = asyncio.run(_wait_final(url, sent.ids, drain_timeout))
        cpu = meter.stop()
        first_post = min(sent.started_at.values())
        last_final = max((r["final_at"].timestamp() for r in final.values()), default=first_post)
        seconds = last_final - first_post
        done = len(final)
        result |= {
            "payments": payments,
            "final": done,
            "reconciled": sum(1 for r in final.values() if r["status"] == "reconciled"),
            "statuses": dict(Counter(r["status"] for r in final.values())),
            "errors": sent.errors,
            "first_error": sent.first_error,
            "seconds": seconds,
            "enqueue_seconds": sent.elapsed,
            "payments_per_second": done / seconds if seconds > 0 else 0.0,
            "stage_jobs_per_second": STAGE_JOBS_PER_PAYMENT * done / seconds if seconds else 0.0,
            "jobs_per_payment": asyncio.run(_jobs_per_payment(url, sent.ids)),
            "cpu_ms_per_payment": {
                group: 1000 * used / max(1, done) for group, used in cpu.items()
            },
        }
        if latency_rate:
            paced = asyncio.run(
                load.paced(
                    api_url, keys, rate=latency_rate, seconds=latency_seconds, connections=clients
                )
            )
            settled = asyncio.run(_wait_final(url, paced.ids, drain_timeout))
            latencies = [
                row["final_at"].timestamp() - paced.started_at[pid] for pid, row in settled.items()
            ]
            result["latency"] = {
                "rate": latency_rate,
                "payments": len(paced.ids),
                "final": len(settled),
                "statuses": dict(Counter(r["status"] for r in settled.values())),
                "errors": paced.errors,
                "p50_ms": _ms(percentile(latencies, 0.5)),
                "p95_ms": _ms(percentile(latencies, 0.95)),
                "p99_ms": _ms(percentile(latencies, 0.99)),
                "max_ms": _ms(max(latencies, default=float("nan"))),
            }
        result["peak_rss_mb"] = _peak_memory(stack)
        result["restarts"] = sum(c.restarts for c in stack.children.values())
    finally:
        stack.stop()
        server.drop(name)
    return result


# -- 6. backlog ---------------------------------------------------------------------------------

_FILL = """
INSERT INTO procrastinate_jobs (queue_name, task_name, args)
SELECT 'bench_backlog', 'bench_noop', jsonb_build_object('n', g)
FROM generate_series(1, %s) AS g
"""


def backlog_stage(server: BenchServer, *, sizes: list[int], samples: int) -> dict[str, Any]:
    """How long claiming a job on one queue takes while other jobs wait in another queue:
    procrastinate_fetch_job_v2 timed from the client, `samples` claims per size, median."""
    url = server.clone("bench_backlog")
    claim_ms: dict[str, float] = {}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT worker_id FROM procrastinate_register_worker_v1()"
            ).fetchone()
            assert row is not None
            worker_id = row[0]
            waiting = 0
            for size in sizes:
                conn.execute(_FILL, (size - waiting,))
                waiting = size
                # What autovacuum would have done by now on a queue this size.
                conn.execute("ANALYZE procrastinate_jobs")
                times = []
                for _ in range(samples):
                    conn.execute(
                        "INSERT INTO procrastinate_jobs (queue_name, task_name) "
                        "VALUES ('bench_claim', 'bench_noop')"
                    )
                    started = time.perf_counter()
                    job = conn.execute(
                        "SELECT id FROM procrastinate_fetch_job_v2(%s, %s)",
                        (["bench_claim"], worker_id),
                    ).fetchone()
                    times.append(time.perf_counter() - started)
                    if job is None or job[0] is None:
                        raise RuntimeError("the claim found no job")
                    conn.execute(
                        "SELECT procrastinate_finish_job_v1(%s, 'succeeded', true)", (job[0],)
                    )
                claim_ms[str(size)] = _ms(percentile(times, 0.5))
    finally:
        server.drop("bench_backlog")
    return {"samples": samples, "sizes": sizes, "claim_ms": claim_ms}
