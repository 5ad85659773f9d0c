"""`agentpay bench --quick --json`: the whole harness end to end, at tiny sizes."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import FIGURES, TARGETS, derive, figure
from tests.conftest import invoke_cli, kill_all

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_reports_every_figure_as_a_positive_number() -> None:
    data_dir = Path("/tmp") / f"apb{os.getpid()}"  # short: Postgres' socket lives in it
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        bench = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers",
                "bench",
                "--quick",
                "--json",
                "--data-dir",
                str(data_dir),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills all it started
        )
        try:
            out, err = (part.decode(errors="replace") for part in bench.communicate(timeout=180))
        except subprocess.TimeoutExpired:
            out, err = kill_all(bench, data_dir)
            raise AssertionError(f"the quick bench took over 180 s:\n{err[-4000:]}") from None
        assert bench.returncode == 0, err[-4000:]
        result = json.loads(out)
        assert json.loads((data_dir / "bench.json").read_text()) == result
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    for path in FIGURES:
        value = figure(result, path)
        assert isinstance(value, int | float) and not isinstance(value, bool), (path, value)
        assert math.isfinite(value) and value > 0, (path, value)

    # Every payment sent made it to the end, and nothing went wrong on the way.
    assert result["warnings"] == []
    for k in ("k1", "k2"):
        pipeline = result["pipeline"][k]
        assert pipeline["reconciled"] == pipeline["final"] == pipeline["payments"] > 0
        assert pipeline["stage_jobs_per_second"] == 4 * pipeline["payments_per_second"]
    assert result["latency"]["final"] == result["latency"]["payments"] > 0
    assert set(result["memory"]["workers_mb"]) == {
        f"{role}.{n}" for role in ("pricing", "risk", "charge", "reconcile") for n in (1, 2)
    }
    assert result["baseline"]["jobs"] == result["sizes"]["baseline_jobs"]

    # The ratios are the figures divided as the issue says, and every target has a verdict.
    ratios = result["ratios"]
    assert math.isclose(
        ratios["enqueue_vs_pgbench"],
        result["enqueue"]["requests_per_second"] / result["pgbench"]["tps"],
    )
    best = max(p["stage_jobs_per_second"] for p in result["pipeline"].values())
    assert math.isclose(
        ratios["pipeline_vs_baseline"], best / result["baseline"]["jobs_per_second"]
    )
    assert [t["figure"] for t in result["targets"]] == [t.path for t in TARGETS]
    assert all(isinstance(t["pass"], bool) for t in result["targets"])

    # A target whose stage had failures fails, whatever its figure (its percentiles leave
    # the failures out); "under 25 ms" fails at 25.
    doubted = copy.deepcopy(result)
    doubted["pipeline"]["k1"]["latency"]["final"] -= 1
    doubted["enqueue"]["paced"]["p99_ms"] = 25.0
    derive(doubted)
    verdicts = {t["figure"]: (t["pass"], t["doubtful"]) for t in doubted["targets"]}
    assert verdicts["latency.p50_ms"] == verdicts["latency.p99_ms"] == (False, True)
    assert verdicts["enqueue.paced.p99_ms"] == (False, False)
    assert any(w.startswith("latency:") for w in doubted["warnings"])
    # A process started again during K = 1: its memory and the latency stage are in doubt.
    restarted = copy.deepcopy(result)
    restarted["pipeline"]["k1"]["restarts"] = 1
    derive(restarted)
    verdicts = {t["figure"]: t["doubtful"] for t in restarted["targets"]}
    assert verdicts["memory.worker_max_mb"] and verdicts["latency.p99_ms"]
    assert not verdicts["ratios.claim_largest_vs_smallest"]


def test_the_bench_exits_0_whatever_its_targets_say(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It reports the targets (docs/performance.md, `bench --help`): a run that missed them
    still exits 0, with their verdicts in what it prints."""
    from bench import runner
    from workers import cli_common

    missed = {"targets": [{"target": "enqueue/s ≥ 0.4 x pgbench -N TPS", "pass": False}]}
    monkeypatch.setattr(runner, "run", lambda *_args, **_kwargs: missed)
    monkeypatch.setattr(cli_common, "stop_signals_interrupt", lambda: None)  # this process's
    monkeypatch.setenv("AGENTPAY_DATA_DIR", str(tmp_path))
    result = invoke_cli(monkeypatch, ["bench", "--quick", "--json"], database_url=None)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == missed
