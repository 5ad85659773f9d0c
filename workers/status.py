"""`agentpay status`: the ops views (api/metrics.py `read_snapshot`, the same snapshot /metrics
and the /ops page render) as rich tables, as JSON, or refreshed in place."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from api.metrics import Snapshot, read_snapshot
from tasks.db import open_pool
from tasks.settings import ROLES, Settings
from workers.cli_common import CLI_SESSION, dump_json, plain


async def fetch(settings: Settings) -> Snapshot:
    # CLI_SESSION: a table locked by another session (`LOCK TABLE` in psql, a migration)
    # makes it a refusal after the lock timeout, not a wait for as long as the lock is held.
    async with open_pool(
        settings.resolved_database_url(), min_size=1, max_size=1, timeout=10, session=CLI_SESSION
    ) as pool:
        async with pool.connection() as conn:
            return await read_snapshot(conn, settings)


def to_json(snapshot: Snapshot) -> str:
    return dump_json(snapshot.as_json(), indent=2)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    if isinstance(value, dict | list):  # JSON columns, as JSON: an operator copies from them
        return json.dumps(value, default=str)
    return str(value)


# Columns an operator copies whole into a command: the other columns wrap first, so these
# stay on one line wherever the terminal has room for them.
_IDS = frozenset({"id", "payment_id", "job_id", "agent_id", "worker_id"})
# The least width a wrapping column is left when the ids keep theirs.
_NARROWEST = 4


class _Table:
    """Rows as a table whose id columns are not wrapped — when the terminal has room for the
    ids whole and `_NARROWEST` characters of every other column; in a narrower one every
    column folds alike (rich would shrink the others to nothing)."""

    def __init__(self, title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
        self.title, self.rows, self.columns = title, rows, columns

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cells = [[_fmt(row.get(c)) for c in self.columns] for row in self.rows]
        ids = [max(len(line[i]) for line in cells) for i, c in enumerate(self.columns) if c in _IDS]
        others = len(self.columns) - len(ids)
        room = sum(ids) + _NARROWEST * others + 3 * len(self.columns) + 1 <= options.max_width
        table = Table(title=self.title, title_justify="left", expand=False)
        for column in self.columns:
            table.add_column(column, overflow="fold", no_wrap=room and column in _IDS)
        for line in cells:
            table.add_row(*(plain(cell) for cell in line))
        yield table


def _table(title: str, rows: list[dict[str, Any]], columns: list[str], total: int | None) -> Any:
    suffix = f" ({total})" if total is not None else ""
    if not rows:
        return Text(f"{title}{suffix}: none", style="dim")
    return _Table(f"{title}{suffix}", rows, columns)


def _workers_headline(s: Snapshot) -> list[tuple[str, str]]:
    """Live workers per role (red when a role has none: its queue is not worked), then the
    stalled ones (stopped heartbeating: killed or cut off), if any."""
    by_role = s.workers_by_role()
    others = sorted({role for role, _ in by_role} - set(ROLES))
    parts: list[tuple[str, str]] = [("workers: ", "")]
    for role in [*ROLES, *others]:
        alive = by_role.get((role, "alive"), 0)
        if role in ROLES or alive:
            parts.append((f"{role} {alive}", "" if alive else "bold red"))
            parts.append((", ", ""))
    parts.pop()
    stalled = sum(count for (_, state), count in by_role.items() if state == "stalled")
    if stalled:
        parts.append((f"  stalled: {stalled}", "bold red"))
    return parts


def render(s: Snapshot, *, limit: int = 10) -> Group:
    """The snapshot as rich renderables: queues and throughput always, then what needs an
    operator (stuck payments, the review queue, failures, mismatches), `limit` rows each."""
    stuck = s.stuck_by_waiting_on()
    headline = Text.assemble(
        ("agentpay status ", "bold"),
        (f"as of {s.at:%Y-%m-%d %H:%M:%S} UTC  ", "dim"),
        (
            f"stuck: {stuck['fleet']} fleet, {stuck['operator']} operator, "
            f"{stuck['agent']} agent  ",
            "bold red" if stuck["fleet"] else "",
        ),
        f"review: {s.counts['review']}  ",
        *_workers_headline(s),
    )
    queues = Table(title="Queues", title_justify="left")
    for column in (
        "role",
        "waiting",
        "scheduled",
        "running",
        "oldest wait s",
        "failed 1h",
        "done 1m",
        "done 5m",
        "per s",
        "p50 s",
        "p95 s",
    ):
        queues.add_column(
            column, justify="left" if column == "role" else "right", no_wrap=column == "role"
        )
    throughput = {t["role"]: t for t in s.throughput}
    for q in s.queues:
        t = throughput.get(q["role"], {})
        queues.add_row(
            q["role"],
            _fmt(q["waiting"]),
            _fmt(q["scheduled"]),
            _fmt(q["running"]),
            _fmt(q["oldest_waiting_seconds"]),
            Text(_fmt(q["failed_last_hour"]), style="red" if q["failed_last_hour"] else ""),
            _fmt(t.get("succeeded_1m")),
            _fmt(t.get("succeeded_5m")),
            _fmt(t.get("per_second_5m")),
            _fmt(t.get("p50_seconds_5m")),
            _fmt(t.get("p95_seconds_5m")),
        )
    parts: list[Any] = [headline, queues]
    parts.append(
        _table(
            f"Stuck payments (no move for {s.stuck_after_seconds:g}s)",
            s.stuck[:limit],
            [
                "payment_id",
                "status",
                "waiting_on",
                "stuck_on",
                "stuck_seconds",
                "last_event_type",
                "last_event_reason",
                "job_id",
                "job_status",
            ],
            s.counts["stuck"],
        )
    )
    parts.append(
        _table(
            "Review queue",
            s.review[:limit],
            ["payment_id", "agent_id", "amount_total", "currency", "waiting_seconds", "reason"],
            s.counts["review"],
        )
    )
    parts.append(
        _table(
            "Recent failures (24 h)",
            s.failures[:limit],
            ["at", "kind", "payment_id", "role", "task", "job_id", "code", "reason"],
            s.counts["failures"],
        )
    )
    parts.append(
        _table(
            "Reconcile mismatches (resolve: agentpay mismatches resolve ID --reason …)",
            s.mismatches[:limit],
            ["id", "at", "payment_id", "field", "expected", "actual"],
            s.counts["mismatches"],
        )
    )
    if s.unlimited_agents:
        names = ", ".join(a.get("name", a.get("id", "?")) for a in s.unlimited_agents)
        parts.append(
            plain(f"Agents that may spend without a budget (from external funding): {names}")
        )
        parts[-1].stylize("yellow")
    return Group(*parts)


def show(settings: Settings, console: Console, *, as_json: bool, watch: float | None) -> None:
    """Print once, or (with `watch` seconds) refresh in place until Ctrl-C."""
    if watch is None:
        snapshot = asyncio.run(fetch(settings))
        if as_json:
            console.print_json(to_json(snapshot)) if console.is_terminal else print(
                to_json(snapshot)
            )
        else:
            console.print(render(snapshot))
        return
    asyncio.run(_watch(settings, console, as_json=as_json, every=watch))


async def _watch(settings: Settings, console: Console, *, as_json: bool, every: float) -> None:
    async with open_pool(
        settings.resolved_database_url(), min_size=1, max_size=1, session=CLI_SESSION
    ) as pool:
        if as_json:
            # One JSON document per line, for scripts that follow the fleet.
            while True:
                try:
                    async with pool.connection() as conn:
                        snapshot = await read_snapshot(conn, settings)
                except Exception as error:  # the database is away: say so, keep watching
                    print(f"cannot read the database: {error}", file=sys.stderr, flush=True)
                else:
                    print(dump_json(snapshot.as_json()), flush=True)
                await asyncio.sleep(every)
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                try:
                    async with pool.connection() as conn:
                        snapshot = await read_snapshot(conn, settings)
                    live.update(render(snapshot), refresh=True)
                except Exception as error:  # the database is away: say so, keep watching
                    live.update(
                        Text(f"cannot read the database: {error}", style="red"), refresh=True
                    )
                await asyncio.sleep(every)
