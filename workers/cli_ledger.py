"""`agentpay prices`, `agentpay review` and `agentpay agents deposit`: the operators' side of
pricing, risk and budgets, straight against the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from workers.cli_common import (
    NOT_FOUND,
    AsJson,
    DataDir,
    Operator,
    fail,
    on_database,
    operator_actor,
    plain,
    refused,
)

console = Console()

prices_app = typer.Typer(
    help="The price catalog: SKU → unit amount per currency.", no_args_is_help=True
)
review_app = typer.Typer(
    help="Payments risk sent to in_review: list them, approve or reject.", no_args_is_help=True
)

Currency = Annotated[str, typer.Option(help="Lowercase ISO 4217 currency")]


def _check_currency(currency: str) -> str:
    from tasks import money

    if currency not in money.CURRENCIES:
        raise typer.BadParameter(
            f"unknown currency {currency!r}: use e.g. usd", param_hint="--currency"
        )
    return currency


# --- prices ------------------------------------------------------------------------------


@prices_app.command("set")
def prices_set(
    sku: Annotated[str, typer.Argument(help="The SKU")],
    unit_amount: Annotated[int, typer.Argument(help="Unit amount in minor units (1999 = $19.99)")],
    currency: Currency = "usd",
    description: Annotated[
        str | None, typer.Option(help="What it is [default: the previous description]")
    ] = None,
    inactive: Annotated[bool, typer.Option("--inactive", help="Retire it (not on sale)")] = False,
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Create or replace the price of SKU in a currency. Says what it was; a change is kept
    in `agentpay audit` (who, when, from what to what)."""
    from tasks import money, pricing

    _check_currency(currency)
    problem = money.amount_problem(unit_amount, currency)
    if problem:
        raise typer.BadParameter(problem, param_hint="UNIT_AMOUNT")
    actor = operator_actor(operator)

    async def work(conn: Any) -> tuple[pricing.Price | None, pricing.Price]:
        return await pricing.change_price(
            conn,
            sku,
            currency,
            unit_amount,
            description=description,
            active=not inactive,
            actor=actor,
        )

    previous, price = on_database(data_dir, work)
    console.print(plain(f"{price.sku} = {_terms(price)}"), soft_wrap=True)
    if previous is None:
        console.print("new price")
    elif previous == price:
        console.print("unchanged")
    else:
        console.print(plain(f"was {_terms(previous)}"), soft_wrap=True)
    if description is None and price.description is not None:
        console.print(plain(f"description kept: {price.description!r}"), soft_wrap=True)


def _terms(price: Any) -> str:
    state = "active" if price.active else "inactive"
    described = f", {price.description!r}" if price.description is not None else ""
    return f"{price.unit_amount} {price.currency} ({state}{described})"


@prices_app.command("list")
def prices_list(
    currency: Annotated[str | None, typer.Option(help="Only this currency")] = None,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """List the catalog, retired prices included."""
    from tasks import pricing

    async def work(conn: Any) -> list[pricing.Price]:
        return await pricing.list_prices(conn, currency=currency)

    prices = on_database(data_dir, work)
    if as_json:
        typer.echo(json.dumps([p.__dict__ for p in prices]))
        return
    table = Table("sku", "currency", "unit amount", "active", "description")
    for p in prices:
        table.add_row(
            p.sku, p.currency, str(p.unit_amount), "yes" if p.active else "no", plain(p.description)
        )
    console.print(table)


# --- review ------------------------------------------------------------------------------


@review_app.command("list")
def review_list(as_json: AsJson = False, data_dir: DataDir = None) -> None:
    """Payments waiting for an operator, oldest first, with the reasons."""
    from tasks import risk

    rows = on_database(data_dir, lambda conn: risk.in_review(conn, limit=1000))
    if as_json:
        out = [
            {k: r[k] for k in ("id", "agent_id", "amount_total", "currency")}
            | {"reasons": [x["code"] for x in (r["risk_decision"] or {}).get("reasons", [])]}
            for r in rows
        ]
        typer.echo(json.dumps(out))
        return
    table = Table("payment", "agent", "total", "currency", "reasons")
    for r in rows:
        reasons = ", ".join(x["code"] for x in (r["risk_decision"] or {}).get("reasons", []))
        table.add_row(r["id"], r["agent_id"], str(r["amount_total"]), r["currency"], reasons)
    console.print(table)


def _decide(
    payment_id: str, approve: bool, note: str | None, operator: str | None, data_dir: Path | None
) -> None:
    from tasks import risk

    actor = operator_actor(operator)

    async def work(conn: Any) -> dict[str, Any]:
        return await risk.decide(conn, payment_id, approve=approve, actor=actor, note=note)

    try:
        payment = on_database(data_dir, work)
    except risk.ReviewError as error:
        raise refused(error) from None
    console.print(f"{payment['id']} is {payment['status']}")


Note = Annotated[
    str | None,
    typer.Option(
        "--note", "--reason", help="Why (kept in the payment's events); --reason is the same"
    ),
]


@review_app.command("approve")
def review_approve(
    payment_id: Annotated[str, typer.Argument(help="The payment id (pay_…)")],
    note: Note = None,
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Approve an in_review payment: it goes on to be charged."""
    _decide(payment_id, True, note, operator, data_dir)


@review_app.command("reject")
def review_reject(
    payment_id: Annotated[str, typer.Argument(help="The payment id (pay_…)")],
    note: Note = None,
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Reject an in_review payment: it ends rejected and its budget hold is released."""
    _decide(payment_id, False, note, operator, data_dir)


# --- agents deposit ----------------------------------------------------------------------


def agents_deposit(
    name: Annotated[str, typer.Argument(help="The agent's name or id")],
    amount: Annotated[int, typer.Argument(help="Minor units to add (5000 = $50.00)")],
    currency: Currency = "usd",
    description: Annotated[str | None, typer.Option(help="What it is for")] = None,
    as_json: AsJson = False,
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Fund an agent's budget. From then on the agent is held to its budget."""
    from tasks import agents, ledger, money

    _check_currency(currency)
    problem = money.amount_problem(amount, currency)
    if problem:
        raise typer.BadParameter(problem, param_hint="AMOUNT")
    actor = operator_actor(operator)

    async def work(conn: Any) -> dict[str, Any] | None:
        agent = await agents.find(conn, name)
        if agent is None:
            return None
        return await ledger.deposit(
            conn, agent["id"], amount, currency, actor=actor, description=description
        )

    deposit = on_database(data_dir, work)
    if deposit is None:
        raise fail(f"no agent named {name!r}", NOT_FOUND)
    if as_json:
        typer.echo(json.dumps(deposit))
    else:
        console.print(
            f"deposited {amount} {currency} to {name}: balance {deposit['balance']} {currency}"
        )


def agents_balance(
    name: Annotated[str, typer.Argument(help="The agent's name or id")],
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """An agent's budget per currency: available, and held for its payments in flight (what
    the agent reads at GET /v1/balance)."""
    from tasks import agents, ledger

    async def work(conn: Any) -> dict[str, Any] | None:
        agent = await agents.find(conn, name)
        return None if agent is None else await ledger.balance(conn, agent["id"])

    found = on_database(data_dir, work, transaction=False)
    if found is None:
        raise fail(f"no agent named {name!r}", NOT_FOUND)
    if as_json:
        typer.echo(json.dumps(found))
        return
    if not found["budgeted"]:
        spends = "may spend without one" if found["unlimited"] else "may not spend"
        console.print(plain(f"{name} has no budget: it {spends}"))
    held = {h["currency"]: h["amount"] for h in found["held"]}
    table = Table("currency", "available", "held")
    for row in found["available"]:
        table.add_row(row["currency"], str(row["amount"]), str(held.pop(row["currency"], 0)))
    for currency, amount in held.items():
        table.add_row(currency, "", str(amount))
    if table.row_count:
        console.print(table)


async def open_budget(conn: Any, agent_id: str, amount: int, currency: str) -> None:
    """`agents create --budget`: hold the new agent to a budget, in its creating
    transaction."""
    from tasks import ledger

    await ledger.open_budget(conn, agent_id, amount, currency, actor=operator_actor(None))


def check_budget(amount: int | None, currency: str) -> None:
    """Refuse a `--budget` the currency cannot hold before anything is created."""
    from tasks import money

    if amount is None:
        return
    _check_currency(currency)
    if amount < 0:
        raise typer.BadParameter("a budget is not negative", param_hint="--budget")
    problem = money.amount_problem(amount, currency) if amount else None
    if problem:
        raise typer.BadParameter(problem, param_hint="--budget")
