"""`agentpay audit`: who changed agents, keys, prices and Customers' owners, when, and from
what to what."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from workers.cli_common import AsJson, DataDir, dump_json, on_database, plain

console = Console()


def audit(
    limit: Annotated[int, typer.Option(min=1, help="How many actions, newest first")] = 50,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """Operators' changes to agents, keys, prices and Customers' owners, newest first: agents
    created (operators among them), keys rotated, agents revoked, prices set, provider
    Customers bound to an agent or unbound, and jobs without a payment retried or canceled
    (`job.retry`, `job.cancel`: a payment's job is in `payments show`) — who
    (`operator:NAME`), when, on what, and what changed (a price's previous and new terms; a
    Customer's agent and the one before; of a key, only its prefix)."""
    from tasks import audit as audit_log

    rows = on_database(
        data_dir, lambda conn: audit_log.recent(conn, limit=limit), transaction=False
    )
    if as_json:
        typer.echo(dump_json(rows))
        return
    table = Table("at", "actor", "action", "subject", "what")
    for row in rows:
        table.add_row(
            f"{row['at']:%Y-%m-%d %H:%M:%S}",
            plain(row["actor"]),
            plain(row["action"]),
            plain(row["subject"]),
            plain(describe(row["action"], row["data"])),
        )
    console.print(table)


def describe(action: str, data: dict[str, Any]) -> str:
    """One line of what an action changed."""
    if action == "price.set":
        return _price_change(data)
    if action in ("customer.bind", "customer.unbind"):
        previous = data.get("previous_agent_id")
        was = f" (was {previous})" if previous else ""
        if action == "customer.unbind":
            return f"unbound{was}"
        return f"bound to {data.get('agent_id')}{was}"
    if action in ("job.retry", "job.cancel"):
        why = f": {data['reason']}" if data.get("reason") else ""
        return f"{data.get('task')} job ({data.get('role')}), {data.get('job_status')}{why}"
    if action.startswith("agent."):
        parts = [str(data.get("name")) + (" (operator)" if data.get("is_operator") else "")]
        if data.get("key_prefix"):
            parts.append(f"key {data['key_prefix']}…")
        if data.get("keys_revoked"):
            parts.append("revoked " + ", ".join(f"{p}…" for p in data["keys_revoked"]))
        if data.get("in_flight"):
            states = ", ".join(f"{n} {s}" for s, n in data["in_flight"].items())
            parts.append(f"payments in flight: {states}")
        return "; ".join(parts)
    return dump_json(data)


def _price_change(data: dict[str, Any]) -> str:
    currency, previous, new = data.get("currency"), data.get("previous"), data.get("new") or {}

    def terms(p: dict[str, Any]) -> str:
        state = "active" if p.get("active") else "inactive"
        described = f", {p['description']!r}" if p.get("description") is not None else ""
        return f"{p.get('unit_amount')} {currency} ({state}{described})"

    if previous is None:
        return f"new: {terms(new)}"
    return f"{terms(previous)} → {terms(new)}"
