"""The issue's targets, the ratios they are judged on, the table and the JSON of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stages import STAGE_JOBS_PER_PAYMENT

# Every figure a complete run reports, as paths into the JSON (all positive numbers).
FIGURES = (
    "pgbench.tps",
    "baseline.jobs_per_second",
    "enqueue.requests_per_second",
    "enqueue.p50_ms",
    "enqueue.p99_ms",
    "enqueue.paced.rate",
    "enqueue.paced.p99_ms",
    "pipeline.k1.payments_per_second",
    "pipeline.k1.stage_jobs_per_second",
    "pipeline.k2.payments_per_second",
    "pipeline.k2.stage_jobs_per_second",
    "latency.p50_ms",
    "latency.p95_ms",
    "latency.p99_ms",
    "backlog.smallest_ms",
    "backlog.largest_ms",
    "memory.api_mb",
    "memory.worker_max_mb",
    "ratios.pipeline_vs_baseline",
    "ratios.enqueue_vs_pgbench",
    "ratios.claim_largest_vs_smallest",
    "cpu_budget.baseline_ms_per_job",
    "cpu_budget.pipeline_ms_per_stage_job",
    "cpu_budget.pipeline_target_ms_per_stage_job",
    "cpu_budget.enqueue_ms_per_request",
    "cpu_budget.enqueue_target_ms_per_request",
)


def figure(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for part in path.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Target:
    name: str
    path: str
    limit: float
    at_least: bool  # True: value ≥ limit passes; False: value ≤ limit passes
    # The stage whose figures it is judged on: a warning about that stage (failed requests,
    # payments that never finished) fails it, since its percentiles or rates leave them out.
    stage: str
    strict: bool = False  # the limit itself fails ("under 25 ms")

    def check(self, result: dict[str, Any], doubtful: set[str]) -> dict[str, Any]:
        value = float(figure(result, self.path))
        if self.at_least:
            ok = value > self.limit if self.strict else value >= self.limit
        else:
            ok = value < self.limit if self.strict else value <= self.limit
        return {
            "target": self.name,
            "figure": self.path,
            "value": value,
            "limit": self.limit,
            "at_least": self.at_least,
            "doubtful": self.stage in doubtful,
            "pass": math.isfinite(value) and ok and self.stage not in doubtful,
        }


TARGETS = (
    Target(
        "pipeline stage-jobs/s ≥ 1.5 x plain procrastinate no-op jobs/s",
        "ratios.pipeline_vs_baseline",
        1.5,
        at_least=True,
        stage="pipeline",
    ),
    Target(
        "enqueue/s ≥ 0.4 x pgbench -N TPS",
        "ratios.enqueue_vs_pgbench",
        0.4,
        at_least=True,
        stage="enqueue",
    ),
    Target(
        "enqueue p99 < 25 ms at half the enqueue rate",
        "enqueue.paced.p99_ms",
        25,
        at_least=False,
        stage="enqueue",
        strict=True,
    ),
    Target(
        "latency to final state p50 ≤ 100 ms at 20/s",
        "latency.p50_ms",
        100,
        at_least=False,
        stage="latency",
    ),
    Target(
        "latency to final state p99 ≤ 500 ms at 20/s",
        "latency.p99_ms",
        500,
        at_least=False,
        stage="latency",
    ),
    Target(
        "claim time at the largest backlog ≤ 2 x at the smallest",
        "ratios.claim_largest_vs_smallest",
        2,
        at_least=False,
        stage="backlog",
    ),
    Target(
        "each worker process ≤ 120 MB peak RSS",
        "memory.worker_max_mb",
        120,
        at_least=False,
        stage="memory",
    ),
    Target("the API ≤ 150 MB peak RSS", "memory.api_mb", 150, at_least=False, stage="memory"),
)


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def derive(result: dict[str, Any]) -> None:
    """Add the summary figures, ratios and target verdicts to a run's result, in place."""
    pipelines = result["pipeline"]
    best = max(pipelines.values(), key=lambda p: p["stage_jobs_per_second"])
    result["pipeline_best_k"] = best["workers_per_role"]
    result["latency"] = pipelines["k1"]["latency"]

    backlog = result["backlog"]
    sizes = backlog["sizes"]
    backlog["smallest_ms"] = backlog["claim_ms"][str(sizes[0])]
    backlog["largest_ms"] = backlog["claim_ms"][str(sizes[-1])]

    workers: dict[str, float] = {}
    api_mb = result["enqueue"].get("api_peak_rss_mb") or 0.0
    for pipeline in pipelines.values():
        for name, mb in pipeline["peak_rss_mb"].items():
            if mb is None:
                continue
            if name == "api":
                api_mb = max(api_mb, mb)
            else:
                workers[name] = max(workers.get(name, 0.0), mb)
    result["memory"] = {
        "api_mb": api_mb,
        "workers_mb": workers,
        "worker_max_mb": max(workers.values(), default=math.nan),
    }
    result["ratios"] = {
        "pipeline_vs_baseline": _div(
            best["stage_jobs_per_second"], result["baseline"]["jobs_per_second"]
        ),
        "enqueue_vs_pgbench": _div(
            result["enqueue"]["requests_per_second"], result["pgbench"]["tps"]
        ),
        "claim_largest_vs_smallest": _div(backlog["largest_ms"], backlog["smallest_ms"]),
    }
    warnings = _warnings(result)
    result["warnings"] = [message for _, message in warnings]
    doubtful = {stage for stages, _ in warnings for stage in stages}
    result["targets"] = [target.check(result, doubtful) for target in TARGETS]
    result["cpu_budget"] = _cpu_budget(result, best)


def _warnings(result: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """What makes figures doubtful — errors, payments that never finished, restarts — as
    (the stages whose figures it touches, message): their rates and percentiles leave those
    out."""
    found: list[tuple[tuple[str, ...], str]] = []
    enqueue = result["enqueue"]
    if enqueue["errors"]:
        found.append(
            (
                ("enqueue",),
                f"enqueue: {enqueue['errors']} failed requests ({enqueue['first_error']})",
            )
        )
    for key, p in result["pipeline"].items():
        problems = []
        if p["errors"]:
            problems.append(f"{p['errors']} failed POSTs ({p['first_error']})")
        if p["final"] < p["payments"]:
            problems.append(f"only {p['final']} of {p['payments']} payments final")
        if p["reconciled"] < p["final"]:
            problems.append(
                f"{p['final'] - p['reconciled']} final but not reconciled ({p['statuses']})"
            )
        found += [(("pipeline",), f"pipeline {key}: {problem}") for problem in problems]
        if p["restarts"]:
            # A process started again: the peak RSS read is the new one's (a worker killed
            # for its memory would pass), and K = 1's stack also serves the latency stage.
            stages = ("pipeline", "memory", *(("latency",) if key == "k1" else ()))
            found.append((stages, f"pipeline {key}: {p['restarts']} process restarts"))
    latency = result["latency"]
    if (
        latency["final"] < latency["payments"]
        or latency["errors"]
        or set(latency["statuses"]) != {"reconciled"}
    ):
        found.append(
            (
                ("latency",),
                f"latency: {latency['final']} of {latency['payments']} final, "
                f"{latency['errors']} failed POSTs, {latency['statuses']}",
            )
        )
    return found


def _cpu_budget(result: dict[str, Any], best: dict[str, Any]) -> dict[str, float]:
    """What the figures cost in CPU, and what the two throughput targets allow: with every
    core busy, a rate of R per second leaves (cores x 1000 / R) CPU ms for each unit."""
    cores = float(result["machine"].get("nproc") or 1)
    base, enq = result["baseline"], result["enqueue"]
    base_ms = 1000 * (base["worker_cpu_seconds"] + (base.get("postgres_cpu_seconds") or 0.0))
    pipeline_ms = sum(ms for group, ms in best["cpu_ms_per_payment"].items() if group != "bench")
    return {
        "baseline_ms_per_job": _div(base_ms, base["jobs"]),
        "pipeline_ms_per_stage_job": pipeline_ms / STAGE_JOBS_PER_PAYMENT,
        "pipeline_target_ms_per_stage_job": _div(cores * 1000, 1.5 * base["jobs_per_second"]),
        "enqueue_ms_per_request": sum(enq["cpu_ms_per_request"].values()) or math.nan,
        "enqueue_target_ms_per_request": _div(cores * 1000, 0.4 * result["pgbench"]["tps"]),
    }


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"agentpay bench ({result['mode']}, {result['seconds']:.0f} s)")
    table.add_column("stage")
    table.add_column("figure")
    table.add_column("value", justify="right")
    pg, base, enq = result["pgbench"], result["baseline"], result["enqueue"]
    table.add_row("1 Postgres", f"pgbench -N TPS ({pg['clients']} clients)", _f(pg["tps"], 0))
    table.add_row(
        "2 baseline",
        f"procrastinate no-op jobs/s (concurrency {base['concurrency']})",
        _f(base["jobs_per_second"], 0),
    )
    table.add_row(
        "3 enqueue",
        f"POST /v1/payments per s ({enq['clients']} clients)",
        _f(enq["requests_per_second"], 0),
    )
    table.add_row("", "p50 / p99 latency, ms", f"{_f(enq['p50_ms'])} / {_f(enq['p99_ms'])}")
    paced = enq["paced"]
    table.add_row(
        "",
        f"p50 / p99 at {_f(paced['rate'], 0)}/s paced, ms",
        f"{_f(paced['p50_ms'])} / {_f(paced['p99_ms'])}",
    )
    for key, p in result["pipeline"].items():
        table.add_row(
            f"4 pipeline {key}",
            "payments/s POST → final; stage-jobs/s",
            f"{_f(p['payments_per_second'])}; {_f(p['stage_jobs_per_second'], 0)}",
        )
    lat = result["latency"]
    table.add_row(
        "5 latency",
        f"p50 / p95 / p99 at {_f(lat['rate'], 0)}/s, ms",
        f"{_f(lat['p50_ms'], 0)} / {_f(lat['p95_ms'], 0)} / {_f(lat['p99_ms'], 0)}",
    )
    for size, ms in result["backlog"]["claim_ms"].items():
        table.add_row("6 backlog", f"claim ms with {int(size):,} waiting (median)", _f(ms, 2))
    mem = result["memory"]
    table.add_row("7 memory", "API peak RSS, MB", _f(mem["api_mb"], 0))
    for name, mb in sorted(mem["workers_mb"].items()):
        table.add_row("", f"worker {name} peak RSS, MB", _f(mb, 0))
    ratios = result["ratios"]
    table.add_section()
    table.add_row(
        "ratio",
        f"pipeline stage-jobs/s (k={result['pipeline_best_k']}) ÷ baseline",
        _f(ratios["pipeline_vs_baseline"], 2),
    )
    table.add_row("ratio", "enqueue/s ÷ pgbench TPS", _f(ratios["enqueue_vs_pgbench"], 3))
    table.add_row(
        "ratio", "claim at largest ÷ smallest backlog", _f(ratios["claim_largest_vs_smallest"], 2)
    )
    budget = result["cpu_budget"]
    table.add_section()
    rows = (
        ("baseline_ms_per_job", "ms per no-op job, baseline (worker + Postgres)"),
        (
            "pipeline_ms_per_stage_job",
            f"ms per stage-job, pipeline k={result['pipeline_best_k']} (all processes)",
        ),
        ("pipeline_target_ms_per_stage_job", "ms per stage-job the 1.5x target allows"),
        ("enqueue_ms_per_request", "ms per POST (API + Postgres + load)"),
        ("enqueue_target_ms_per_request", "ms per POST the 0.4x target allows"),
    )
    for i, (key, label) in enumerate(rows):
        table.add_row("CPU" if i == 0 else "", label, _f(budget[key], 2))
    console.print(table)

    verdicts = Table(title="Targets (issue 7)")
    verdicts.add_column("target")
    verdicts.add_column("value", justify="right")
    verdicts.add_column("", justify="center")
    for t in result["targets"]:
        verdict = "[green]pass[/]" if t["pass"] else "[red]FAIL[/]"
        if t["doubtful"]:
            verdict = "[red]FAIL (see warnings)[/]"
        verdicts.add_row(t["target"], _f(t["value"], 2), verdict)
    console.print(verdicts)
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
