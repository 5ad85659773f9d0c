"""`agentpay bench`: every performance figure of issue 7 in one run (see docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def bench(
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Tiny sizes: proves the harness works (its figures mean little)"
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where the bench keeps its Postgres, logs and bench.json "
            "(env AGENTPAY_DATA_DIR; default .data)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure agentpay on this machine, in one run on one Postgres (embedded unless
    DATABASE_URL is set): pgbench's commit ceiling, plain procrastinate's no-op jobs/s, the
    enqueue rate and latency, the pipeline's payments/s with 1 and 2 workers per role,
    latency to the final state at 20 payments/s, claim time with a backlog, and peak memory;
    with the CPU the throughput figures cost and what the targets allow. Prints a table of
    the figures, their ratios and the targets; writes `<data-dir>/bench.json`. Exits 0
    whether or not the targets pass: it reports them (pass or FAIL in the table, `targets`
    in the JSON); non-zero only when it could not run or was stopped. Takes under five
    minutes on two cores (about 90 s on a quiet machine; --quick: about 20 s there), longer
    on a busy one."""
    from bench import report, runner
    from workers import logs
    from workers.cli_common import settings_for, stop_signals_interrupt

    logs.configure("WARNING")
    stop_signals_interrupt()
    settings = settings_for(data_dir)
    console = Console(stderr=as_json)
    with console.status("benchmarking…") as status:
        result = runner.run(
            settings.data_dir,
            quick=quick,
            database_url=settings.database_url,
            progress=lambda line: status.update(f"benchmarking: {line}…"),
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        report.print_table(result, console)
        console.print(f"written to {settings.data_dir / 'bench.json'}")
