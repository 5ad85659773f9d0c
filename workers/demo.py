"""The demo: the dev stack, several agents sending payments over HTTP, a live progress bar and
a summary of outcomes, throughput and latency."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.client import AsyncAgentPay
from tasks.db import open_pool
from tasks.settings import Settings
from workers.devstack import DevStack, new_agent_keys

# What each demo card must end as (status, failure code).
EXPECTED = {
    "pm_card_visa": ("reconciled", None),
    "pm_card_chargeDeclined": ("failed", "card_declined"),
    "pm_card_chargeDeclinedInsufficientFunds": ("failed", "insufficient_funds"),
}
MIX = ["pm_card_visa"] * 8 + ["pm_card_chargeDeclined", "pm_card_chargeDeclinedInsufficientFunds"]

# A few agents send thousands of payments in a minute: the per-agent velocity limits (600
# payments and $100,000 a minute by default) would reject some, and every payment here must
# end as its card says.
DEMO_ENV = {
    "AGENTPAY_RISK_VELOCITY_MAX_COUNT": str(10**9),
    "AGENTPAY_RISK_VELOCITY_MAX_AMOUNT": '{"default": 1000000000000000}',
}

FINAL_SQL = """
SELECT p.id, p.status, p.payment_method, p.failure_code, p.created_at,
       (SELECT max(e.created_at) FROM payment_events e WHERE e.payment_id = p.id) AS settled_at
FROM payment_jobs p JOIN payment_states s USING (status)
WHERE p.id = ANY(%s) AND s.is_final
"""


def run_demo(
    settings: Settings,
    *,
    payments: int,
    agents: int,
    workers_per_role: int,
    port: int,
    console: Console,
) -> bool:
    # A stack of its own (its Postgres and stack.json in <data-dir>/demo, its own operator
    # and agent): a `dev` stack running in the data directory is left alone, and so are its
    # keys on a shared DATABASE_URL (though two fleets on one database share its queues).
    settings = settings.model_copy(update={"data_dir": settings.data_dir / "demo"})
    stack = DevStack(
        settings, port=port, workers_per_role=workers_per_role, env=DEMO_ENV, name="demo"
    )
    try:
        with console.status("Starting Postgres, the sandbox provider, the API and the workers…"):
            info = stack.start()
        console.print(f"Stack up: API {info['api_url']}, {workers_per_role} worker(s) per role")
        return asyncio.run(_run(info, payments, agents, console))
    finally:
        with console.status("Stopping the stack…"):
            stack.stop()


async def _run(info: dict[str, str], n_payments: int, n_agents: int, console: Console) -> bool:
    async with open_pool(info["database_url"], min_size=1, max_size=4) as pool:
        keys = await new_agent_keys(info["database_url"], "demo-agent", n_agents)
        rng = random.Random(7)
        plan = [
            (keys[i % len(keys)], rng.choice(MIX), rng.randint(100, 50_000))
            for i in range(n_payments)
        ]
        started = time.monotonic()
        ids: list[str] = []
        final: dict[str, dict[str, Any]] = {}
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            sent = progress.add_task("sent by agents", total=n_payments)
            done = progress.add_task("in a final state", total=n_payments)
            sender = asyncio.create_task(_send(info["api_url"], plan, ids, progress, sent))
            deadline = time.monotonic() + 60 + n_payments * 0.5
            while time.monotonic() < deadline:
                async with pool.connection() as conn:
                    cur = await conn.execute(FINAL_SQL, (ids,))
                    for row in await cur.fetchall():
                        final[row["id"]] = row
                progress.update(done, completed=len(final))
                if sender.done() and len(final) == n_payments:
                    break
                await asyncio.sleep(0.25)
            await sender
        elapsed = time.monotonic() - started
    return _summarise(console, plan, ids, final, elapsed)


async def _send(
    api_url: str, plan: list[tuple[str, str, int]], ids: list[str], progress: Progress, task: Any
) -> None:
    """Each demo agent sends its payments through the agents' client (api/client.py): one
    Idempotency-Key per payment, retried on transport errors, 429 and 5xx."""
    limit = asyncio.Semaphore(16)
    clients = {key: AsyncAgentPay(api_url, key, timeout=30) for key in {k for k, _, _ in plan}}
    try:

        async def one(key: str, card: str, amount: int, n: int) -> None:
            async with limit:
                payment = await clients[key].create_payment(
                    amount=amount,
                    currency="usd",
                    payment_method=card,
                    idempotency_key=f"demo-{n}",
                )
                ids.append(payment.id)
                progress.advance(task)

        await asyncio.gather(*(one(k, c, a, n) for n, (k, c, a) in enumerate(plan)))
    finally:
        for client in clients.values():
            await client.aclose()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _summarise(
    console: Console,
    plan: list[tuple[str, str, int]],
    ids: list[str],
    final: dict[str, dict[str, Any]],
    elapsed: float,
) -> bool:
    outcomes = Counter(
        (row["payment_method"], row["status"], row["failure_code"]) for row in final.values()
    )
    table = Table(title="Outcomes")
    for column in ("payment method", "status", "failure", "payments", "expected"):
        table.add_column(column)
    wrong = 0
    for (card, status, code), count in sorted(outcomes.items()):
        ok = EXPECTED[card] == (status, code)
        wrong += 0 if ok else count
        table.add_row(card, status, code or "", str(count), "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(table)

    latencies = [(r["settled_at"] - r["created_at"]).total_seconds() * 1000 for r in final.values()]
    stats = Table(title="Throughput and latency (POST → final state)")
    stats.add_column("measure")
    stats.add_column("value", justify="right")
    stats.add_row("payments", f"{len(final)} of {len(plan)} final")
    stats.add_row("wall time", f"{elapsed:.1f} s")
    stats.add_row("throughput", f"{len(final) / elapsed:.1f} payments/s")
    for q in (0.5, 0.95, 0.99):
        stats.add_row(f"p{int(q * 100)} latency", f"{_percentile(latencies, q):.0f} ms")
    console.print(stats)

    unfinished = len(plan) - len(final)
    if unfinished or wrong:
        console.print(f"[red]{unfinished} payment(s) not final, {wrong} in the wrong state[/]")
        return False
    console.print("[bold green]Every payment reached the state it should.[/]")
    return True
