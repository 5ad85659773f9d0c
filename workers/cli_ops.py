"""Operators' commands: `agentpay status`, `agentpay payments list|show|cancel`, `agentpay jobs
retry|cancel`, `agentpay mismatches resolve`, `agentpay customers bind|unbind|show|list`. Each
action is recorded as `operator:<name>` (the OS user, or --operator)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from workers.cli_common import (
    NOT_FOUND,
    AsJson,
    DataDir,
    Operator,
    database_errors,
    dump_json,
    fail,
    on_database,
    operator_actor,
    plain,
    refused,
    settings_for,
)


class _Console:
    """A rich Console made when first used by a command (so it sees the terminal and
    COLUMNS of the moment, not of import time)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(Console(), name)


console: Any = _Console()

payments_app = typer.Typer(help="Look at and steer single payments.", no_args_is_help=True)
jobs_app = typer.Typer(help="Retry or cancel queue jobs.", no_args_is_help=True)
mismatches_app = typer.Typer(
    help="Settle what reconcile found the provider disagreeing with.", no_args_is_help=True
)

Reason = Annotated[str | None, typer.Option("--reason", help="Why (kept in the payment events)")]


def status(
    as_json: AsJson = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C")] = False,
    every: Annotated[
        float, typer.Option("--every", min=0.2, help="Seconds between refreshes with --watch")
    ] = 2.0,
    data_dir: DataDir = None,
) -> None:
    """The fleet at a glance from the ops_* views: live workers per role, queue depth,
    oldest wait and failures per role, throughput, stuck payments, the review queue, recent
    failures, reconcile mismatches, agents that may spend without a budget. The numbers are
    those of /metrics and the /ops page."""
    from workers.status import show

    with database_errors():
        show(settings_for(data_dir), Console(), as_json=as_json, watch=every if watch else None)


@payments_app.command("list")
def payments_list(
    status: Annotated[
        list[str] | None,
        typer.Option("--status", help="Only in this state (repeat it for any of several)"),
    ] = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only this agent's (name or id)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many")] = 20,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """Payments, newest first: id, when, agent, state, total, failure. What GET /v1/payments
    lists for an operator key; `payments show ID` tells one's whole story."""
    from typing import get_args

    from api.models import PaymentStatus
    from tasks import agents, payments

    states = get_args(PaymentStatus)
    for state in status or []:
        if state not in states:
            raise typer.BadParameter(
                f"{state!r} is no payment state ({', '.join(states)})", param_hint="--status"
            )

    async def work(conn: Any) -> tuple[list[dict[str, Any]], bool] | None:
        agent_id = None
        if agent is not None:
            found = await agents.find(conn, agent)
            if found is None:
                return None
            agent_id = found["id"]
        return await payments.page(conn, agent_id=agent_id, limit=limit, status=status)

    found = on_database(data_dir, work, transaction=False)
    if found is None:
        raise fail(f"no agent named {agent!r}", NOT_FOUND)
    rows, has_more = found
    shown = [payments.public(row) for row in rows]
    if as_json:
        typer.echo(dump_json({"data": shown, "has_more": has_more}))
        return
    table = Table("id", "created", "agent", "status", "total", "failure")
    for p in shown:
        failure = p["failure"]["code"] if p["failure"] else None
        table.add_row(
            p["id"],
            f"{p['created_at']:%Y-%m-%d %H:%M:%S}",
            plain(p["agent_id"]),
            p["status"],
            f"{p['amount_total'] if p['amount_total'] is not None else '-'} {p['currency']}",
            plain(failure),
        )
    console.print(table)
    if has_more:
        console.print(plain(f"more than {limit}: raise --limit or narrow with --status, --agent"))


@payments_app.command("show")
def payments_show(
    payment_id: Annotated[str, typer.Argument(help="The payment's id (pay_…)")],
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """One payment's timeline: its state, every event (who, from, to, why), its jobs and
    refunds, and its provider ids."""
    from api.routes.ops import payment_timeline

    found = on_database(data_dir, lambda c: payment_timeline(c, payment_id))
    if found is None:
        raise fail(f"No payment {payment_id}", NOT_FOUND)
    if as_json:
        typer.echo(dump_json(found, indent=2))
        return
    p = found["payment"]
    console.print(
        f"[bold]{p['id']}[/]  {p['status']}  {p['amount_total']} {p['currency']}  "
        f"agent {p['agent_id']}  method {p['payment_method']}"
    )
    console.print(
        f"provider payment {found['provider']['payment_id'] or '-'}  "
        f"key {found['provider']['idempotency_key'] or '-'}"
    )
    if p["failure"]:
        console.print(
            plain(f"failure {p['failure']['code']}: {p['failure']['message']}"), style="red"
        )
    events = Table(title="Events", title_justify="left")
    for column in ("at", "type", "from", "to", "actor", "reason"):
        events.add_column(column)
    for e in found["events"]:
        reason = e["reason"]
        if e["type"] == "job_failed" and e["data"].get("error"):
            reason = f"{reason}: {e['data'].get('error_type')}: {e['data']['error']}"
        events.add_row(
            f"{e['created_at']:%H:%M:%S.%f}"[:-3],
            *(plain(e[k]) for k in ("type", "from_status", "to_status", "actor")),
            plain(reason),
        )
    console.print(events)
    _print_rows(
        "Jobs",
        found["jobs"],
        ["id", "role", "task", "status", "attempts", "deferred_at", "finished_at"],
    )
    if found["refunds"]:
        _print_rows(
            "Refunds",
            found["refunds"],
            ["id", "amount", "currency", "status", "provider_refund_id"],
        )


def _print_rows(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(plain(row.get(c)) for c in columns))
    console.print(table)


@payments_app.command("cancel")
def payments_cancel(
    payment_id: Annotated[str, typer.Argument(help="The payment's id (pay_…)")],
    operator: Operator = None,
    reason: Reason = None,
    data_dir: DataDir = None,
) -> None:
    """Cancel a payment: at once if it has not reached the provider (received, priced,
    in_review, approved); through the provider if charging, authorized or requires_action
    (while charging, a charge that took the money first wins). Other states are refused
    (exit 1); an unknown id exits 2."""
    from api.routes.ops import Refused, cancel_payment
    from tasks import payments

    actor = operator_actor(operator)
    try:
        payment = on_database(
            data_dir, lambda c: cancel_payment(c, payment_id, actor=actor, reason=reason)
        )
    except Refused as error:
        raise refused(error) from error
    if payments.pending_action(payment) == "cancel":
        # At the provider: the charge role cancels it there, and the payment then moves.
        console.print(
            f"{payment['id']}: {payment['status']}, cancel requested (by {actor}); the charge "
            "role cancels it at the provider — `agentpay payments show` follows it"
        )
    else:
        console.print(f"{payment['id']}: {payment['status']} (by {actor})")


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[int, typer.Argument(help="The job's id (procrastinate_jobs.id)")],
    operator: Operator = None,
    reason: Reason = None,
    data_dir: DataDir = None,
) -> None:
    """Run a job again now: a failed job goes back to its queue with its retries whole; a job
    waiting for a later time becomes due now. Refused (exit 1): a running job (the stalled-job
    rescue handles a dead worker's jobs), and a failed one while another job already does the
    same work (e.g. the sweep's re-drive). Recorded in the job's payment's events, or, for a
    job without a payment (catch_up_events), in `agentpay audit` as job.retry."""
    from api.routes.ops import Refused, retry_job

    actor = operator_actor(operator)
    try:
        job = on_database(data_dir, lambda c: retry_job(c, job_id, actor=actor, reason=reason))
    except Refused as error:
        raise refused(error) from error
    console.print(f"job {job['id']} ({job['role']}): {job['status']} (by {actor})")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[int, typer.Argument(help="The job's id (procrastinate_jobs.id)")],
    operator: Operator = None,
    reason: Reason = None,
    data_dir: DataDir = None,
) -> None:
    """Cancel a waiting job, or ask a running one to abort. A non-final payment left without
    a job is driven on again by the stuck-payment sweep: to stop a payment, cancel it.
    Recorded in the job's payment's events, or, for a job without a payment
    (catch_up_events), in `agentpay audit` as job.cancel."""
    from api.routes.ops import Refused, cancel_job

    actor = operator_actor(operator)
    try:
        job = on_database(data_dir, lambda c: cancel_job(c, job_id, actor=actor, reason=reason))
    except Refused as error:
        raise refused(error) from error
    state = "abort requested" if job["abort_requested"] else job["status"]
    console.print(f"job {job['id']} ({job['role']}): {state} (by {actor})")


@mismatches_app.command("resolve")
def mismatches_resolve(
    mismatch_id: Annotated[
        int, typer.Argument(help="The mismatch's id (ops_reconcile_mismatches.id)")
    ],
    reason: Annotated[
        str,
        typer.Option("--reason", help="What was done about it (required; kept with it)"),
    ],
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Mark a reconcile mismatch settled once you have dealt with it (say how with --reason):
    it leaves ops_reconcile_mismatches, `agentpay status` and the open-mismatch gauge; its row
    keeps who resolved it, when and why, and its payment gets a `mismatch_resolved` event."""
    from api.routes.ops import Refused, resolve_mismatch

    if not reason.strip():
        raise typer.BadParameter("say what was done about it", param_hint="--reason")
    actor = operator_actor(operator)
    try:
        found = on_database(
            data_dir, lambda c: resolve_mismatch(c, mismatch_id, actor=actor, reason=reason)
        )
    except Refused as error:
        raise refused(error) from error
    console.print(
        plain(
            f"mismatch {found['id']} ({found['payment_id']}, {found['field']}): resolved by {actor}"
        )
    )


# --- customers ---------------------------------------------------------------------------

customers_app = typer.Typer(
    help="Which agent may charge each provider Customer's saved payment methods.",
    no_args_is_help=True,
)

CustomerId = Annotated[str, typer.Argument(help="The provider Customer's id (cus_…)")]


def _check_customer(customer: str) -> str:
    if not re.fullmatch(r"cus_[A-Za-z0-9]+", customer):
        raise typer.BadParameter(f"{customer!r} is no Customer id (cus_…)", param_hint="CUSTOMER")
    return customer


@customers_app.command("bind")
def customers_bind(
    customer: CustomerId,
    agent: Annotated[str, typer.Argument(help="The agent's name or id")],
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Bind CUSTOMER to AGENT: from now on only AGENT's payments (and operators') may name it;
    it is moved from any agent it was bound to. Payments already made keep going."""
    from tasks import agents, customers

    _check_customer(customer)
    actor = operator_actor(operator)

    async def work(conn: Any) -> tuple[dict[str, Any] | None, str | None]:
        found = await agents.find(conn, agent)
        if found is None or found["revoked_at"] is not None:
            return None, None
        return found, await customers.bind(conn, customer, found["id"], actor=actor)

    found, previous = on_database(data_dir, work)
    if found is None:
        raise fail(f"no live agent named {agent!r}", NOT_FOUND)
    moved = f" (moved from {previous})" if previous else ""
    console.print(plain(f"{customer} bound to {found['name']} ({found['id']}){moved}"))


@customers_app.command("unbind")
def customers_unbind(
    customer: CustomerId, operator: Operator = None, data_dir: DataDir = None
) -> None:
    """Take CUSTOMER from its agent: no agent's payment may name it then (with
    AGENTPAY_CUSTOMER_BINDING=first_use, the next agent whose payment names it gets it)."""
    from tasks import customers

    _check_customer(customer)
    actor = operator_actor(operator)
    previous = on_database(data_dir, lambda conn: customers.unbind(conn, customer, actor=actor))
    if previous is None:
        raise fail(f"{customer} is bound to no agent", NOT_FOUND)
    console.print(plain(f"{customer} unbound (was {previous})"))


@customers_app.command("show")
def customers_show(customer: CustomerId, as_json: AsJson = False, data_dir: DataDir = None) -> None:
    """CUSTOMER's agent now, and every change of its owner: who bound, moved or unbound it,
    when."""
    from tasks import customers

    _check_customer(customer)

    async def work(conn: Any) -> dict[str, Any]:
        bound = await customers.binding(conn, customer)
        return {
            "customer": customer,
            "agent_id": bound["agent_id"] if bound else None,
            "bound_by": bound["bound_by"] if bound else None,
            "bound_at": bound["bound_at"] if bound else None,
            "changes": await customers.changes(conn, customer),
        }

    found = on_database(data_dir, work, transaction=False)
    if as_json:
        typer.echo(dump_json(found))
        return
    bound = (
        f"bound to {found['agent_id']} by {found['bound_by']} at {found['bound_at']:%Y-%m-%d %H:%M}"
        if found["agent_id"]
        else "bound to no agent"
    )
    console.print(plain(f"{customer}: {bound}"))
    table = Table("at", "agent", "before", "by")
    for change in found["changes"]:
        table.add_row(
            f"{change['at']:%Y-%m-%d %H:%M:%S}",
            plain(change["agent_id"] or "(unbound)"),
            plain(change["previous_agent_id"]),
            plain(change["actor"]),
        )
    console.print(table)


@customers_app.command("list")
def customers_list(
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's")] = None,
    shared: Annotated[
        bool,
        typer.Option(
            "--shared",
            help="Instead: Customers that payments of agents other than their owner named "
            "(before they were bound, or moved), and those no agent owns",
        ),
    ] = False,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """Bound Customers and their agents."""
    from tasks import agents, customers

    async def work(conn: Any) -> list[dict[str, Any]] | None:
        if shared:
            return await customers.shared(conn)
        if agent is None:
            return await customers.list_all(conn)
        found = await agents.find(conn, agent)
        return None if found is None else await customers.list_all(conn, agent_id=found["id"])

    rows = on_database(data_dir, work, transaction=False)
    if rows is None:
        raise fail(f"no agent named {agent!r}", NOT_FOUND)
    if as_json:
        typer.echo(dump_json(rows))
        return
    if shared:
        table = Table("customer", "owner", "named by payments of")
        for row in rows:
            table.add_row(row["customer"], plain(row["agent_id"]), ", ".join(row["others"]))
    else:
        table = Table("customer", "agent", "bound by", "bound at")
        for row in rows:
            table.add_row(
                row["customer"],
                plain(f"{row['agent_name']} ({row['agent_id']})"),
                plain(row["bound_by"]),
                f"{row['bound_at']:%Y-%m-%d %H:%M}",
            )
    console.print(table)
