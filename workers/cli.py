"""The `agentpay` command."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console

from tasks.settings import ROLES, Settings, get_settings
from workers import cli_audit, cli_ledger, cli_ops
from workers.cli_bench import bench as bench_command
from workers.cli_common import (
    NO_DATABASE,
    NOT_FOUND,
    USAGE,
    AsJson,
    DataDir,
    Operator,
    database_errors,
    dump_json,
    fail,
    on_database,
    operator_actor,
    plain,
    say_error,
    settings_for,
    stop_signals_interrupt,
)

if TYPE_CHECKING:
    from workers.devstack import DevStack

console = Console()
app = typer.Typer(
    name="agentpay",
    help="Payments for AI agents: a Postgres job queue and one worker fleet per role.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings are paragraphs: rewrap their lines
)
agents_app = typer.Typer(
    help="Create, list, fund and revoke agents and their API keys.", no_args_is_help=True
)
app.add_typer(agents_app, name="agents")
app.command("status")(cli_ops.status)
app.add_typer(cli_ops.payments_app, name="payments")
app.add_typer(cli_ops.jobs_app, name="jobs")
app.add_typer(cli_ops.mismatches_app, name="mismatches")
app.add_typer(cli_ops.customers_app, name="customers")
app.command("bench")(bench_command)
app.add_typer(cli_ledger.prices_app, name="prices")
app.add_typer(cli_ledger.review_app, name="review")
agents_app.command("deposit")(cli_ledger.agents_deposit)
agents_app.command("balance")(cli_ledger.agents_balance)
app.command("audit")(cli_audit.audit)


def main() -> None:
    try:
        app()
    except ValidationError as error:
        # A setting that does not parse (AGENTPAY_…): one line each and the usage exit code,
        # not a traceback, from every command (the workers' and the API's processes too).
        for problem in error.errors():
            name = "_".join(str(part) for part in problem["loc"]).upper()
            where = f"AGENTPAY_{name}: " if name else ""
            say_error(f"Invalid setting: {where}{problem['msg']}")
        raise SystemExit(USAGE) from None
    except SettingsError as error:
        # A dict or list setting whose JSON does not parse fails before validation.
        field = re.search(r'field "(\w+)"', str(error))
        name = f"AGENTPAY_{field.group(1).upper()}: " if field else ""
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        say_error(f"Invalid setting: {name}not valid JSON{cause}")
        raise SystemExit(USAGE) from None


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Port of the API")] = 8000,
    data_dir: DataDir = None,
    workers_per_role: Annotated[int, typer.Option(min=1, help="Worker processes per role")] = 1,
) -> None:
    """Run the whole stack until Ctrl-C: embedded Postgres (unless DATABASE_URL is set), the
    sandbox provider (unless STRIPE_API_BASE is set), migrations, the API and the workers.
    Writes `<data-dir>/stack.json` when ready."""
    from workers import logs
    from workers.devstack import DevStack, StackError

    logs.configure("WARNING")
    stop_signals_interrupt()
    settings = settings_for(data_dir)
    stack = DevStack(settings, port=port, workers_per_role=workers_per_role)
    try:
        _serve(stack, settings, workers_per_role)
    except StackError as error:
        raise fail(str(error)) from None
    finally:
        stack.stop()


def _serve(stack: DevStack, settings: Settings, workers_per_role: int) -> None:
    """Start the dev stack, say where everything is, and run until interrupted."""
    from workers.devstack import run_forever
    from workers.logs import scrub

    with console.status("Starting the stack…"):
        info = stack.start()
    console.print(f"[bold green]agentpay is running[/] — API {info['api_url']}")
    console.print(f"  database     {scrub(info['database_url'])}")
    console.print(f"  provider     {info['provider_base']}")
    console.print(f"  workers      {workers_per_role} per role ({', '.join(ROLES)})")
    console.print(f"  stack file   {settings.stack_file}  (keys for the dev agent and operator)")
    console.print(f"  logs         {settings.data_dir / 'logs'}")
    if "worker_metrics_ports" in info:
        console.print(f"  metrics      {info['worker_metrics_ports']}  (worker=port)")
    if stack.lost_at_provider:
        console.print(
            f"[yellow]{stack.lost_at_provider} payment(s) of an earlier start wait on the "
            "provider, and this sandbox starts empty (it keeps nothing across restarts): "
            "they cannot finish. Give a fresh --data-dir to start clean.[/]"
        )
    console.print("Press Ctrl-C to stop.")
    run_forever()


@app.command()
def demo(
    data_dir: DataDir = None,
    payments: Annotated[int, typer.Option(min=1, help="Payments to send")] = 300,
    agents: Annotated[int, typer.Option(min=1, help="Demo agents sending them")] = 5,
    workers_per_role: Annotated[int, typer.Option(min=1, help="Worker processes per role")] = 1,
    port: Annotated[int, typer.Option(help="Port of the API (0: any free port)")] = 0,
) -> None:
    """Start a dev stack of its own (in `<data-dir>/demo`), let demo agents send payments over
    HTTP, show progress, and print a summary of outcomes, throughput and latency. Exits
    non-zero if a payment did not end where it should. (Its stack lifts the per-agent
    velocity limits: a few agents send thousands of payments a minute.)"""
    from workers import logs
    from workers.demo import run_demo
    from workers.devstack import StackError

    logs.configure("WARNING")
    stop_signals_interrupt()
    try:
        ok = run_demo(
            settings_for(data_dir),
            payments=payments,
            agents=agents,
            workers_per_role=workers_per_role,
            port=port,
            console=console,
        )
    except StackError as error:
        raise fail(str(error)) from None
    raise typer.Exit(0 if ok else 1)


@app.command()
def chaos(
    payments: Annotated[int, typer.Option(min=1, help="Payments in the mix")] = 300,
    seconds: Annotated[float, typer.Option(min=5, help="How long the faults last")] = 60,
    seed: Annotated[int, typer.Option(help="Seed of the mix and of the faults")] = 1,
    data_dir: DataDir = None,
) -> None:
    """Run a dev stack of its own (in `<data-dir>/chaos`) and send a mix of payments (cards,
    declines, manual captures, cancels, refunds, reviews, disputes the run accepts as lost)
    while killing random workers with
    SIGKILL, restarting Postgres once and making the sandbox fail 10% of requests and lose
    5% of responses. Then stop the faults, let the fleet drain, and check every invariant.
    Exits non-zero if any check fails."""
    from workers import logs
    from workers.chaos import run_chaos
    from workers.devstack import StackError

    logs.configure("ERROR")
    stop_signals_interrupt()
    try:
        ok = run_chaos(
            settings_for(data_dir), payments=payments, seconds=seconds, seed=seed, console=console
        )
    except StackError as error:
        raise fail(str(error)) from None
    raise typer.Exit(0 if ok else 1)


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply the database migrations that have not been applied yet (safe to run again)."""
    import schema

    settings = settings_for(data_dir)
    with database_errors():
        try:
            applied = schema.migrate(
                settings.resolved_database_url(),
                on_applied=lambda name: console.print(f"applied {name}"),
            )
        except schema.MigrationEdited as error:
            raise fail(str(error)) from error
        except schema.MigrationLocked as error:
            say_error(str(error))
            raise typer.Exit(NO_DATABASE) from error
    if not applied:
        console.print("database is up to date")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes serving the port (one Python process uses one core) "
            "[default: AGENTPAY_API_PROCESSES, 1]",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Serve the HTTP API (records and enqueues; never calls the provider). With
    `--processes N`, N processes share the port under one supervisor that restarts any
    that dies."""
    import uvicorn

    from workers import logs

    settings = settings_for(data_dir)
    with database_errors():  # not configured: say so now, not in every request
        settings.resolved_database_url()
    logs.configure()
    if host not in ("127.0.0.1", "::1", "localhost") and not settings.metrics_token:
        logging.getLogger("agentpay.api").warning(
            "serving on a public interface with /metrics open to anyone who reaches it "
            "(the whole platform's payment volume): set AGENTPAY_METRICS_TOKEN",
            extra={"host": host},
        )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again so the process
    # "dies of it" (exit status -15). A stop that was asked for is a clean exit: status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=processes or settings.api_processes,
        log_config=logs.dict_config(),
        access_log=False,
        lifespan="on",
        # Long-polls answer as the stop begins (api/app.py); any other request still open
        # after the grace is cut off, so a stop ends within a process manager's timeout.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
        # The C HTTP parser and event loop of uvicorn[standard]: less CPU per request
        # than h11 on the plain asyncio loop.
        http="httptools",
        loop="uvloop",
    )


@app.command()
def worker(
    role: Annotated[str, typer.Argument(help=f"One of: {', '.join(ROLES)}")],
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Jobs run at once [default: per-role setting]")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Run one role's worker: claims that role's jobs until SIGTERM/SIGINT, then finishes
    what it holds and exits. Run several processes to scale a role."""
    from workers import logs
    from workers.worker import MetricsUnavailable, run_role

    if role not in ROLES:
        raise typer.BadParameter(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    with database_errors():  # not configured: say so now
        settings_for(data_dir).resolved_database_url()
    logs.configure()
    try:
        asyncio.run(run_role(role, concurrency=concurrency))
    except MetricsUnavailable as error:  # its port taken: a setting to change, one line
        raise fail(str(error), USAGE) from None


@app.command()
def sandbox(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 12111,
    webhook_url: Annotated[
        list[str] | None, typer.Option(help="Deliver webhooks to this URL (repeatable)")
    ] = None,
) -> None:
    """Run the local Stripe-compatible provider on its own."""
    from sandbox.server import serve

    serve(host, port, get_settings().stripe_webhook_secret, list(webhook_url or []))


@agents_app.command("create")
def agents_create(
    name: Annotated[str, typer.Argument(help="A unique name for the agent")],
    operator: Annotated[bool, typer.Option("--operator", help="May use operator routes")] = False,
    as_json: AsJson = False,
    data_dir: DataDir = None,
    budget: Annotated[
        int | None, typer.Option(help="Hold the agent to a budget of this many minor units")
    ] = None,
    currency: Annotated[str, typer.Option(help="Currency of --budget")] = "usd",
) -> None:
    """Create an agent and print its API key. The key is shown once; only a hash is kept.
    Recorded in `agentpay audit` as by `operator:$AGENTPAY_OPERATOR`, else by the OS user
    (here `--operator` makes the new agent an operator: it names no one)."""
    from tasks import agents

    cli_ledger.check_budget(budget, currency)
    actor = operator_actor(None)

    async def create(conn: Any) -> tuple[agents.Agent, str]:
        created = await agents.create(conn, name, is_operator=operator, actor=actor)
        if budget is not None:
            await cli_ledger.open_budget(conn, created[0].id, budget, currency)
        return created

    try:
        agent, key = on_database(data_dir, create)
    except psycopg.errors.UniqueViolation:
        raise fail(f"an agent named {name!r} exists already (names are never reused)") from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "id": agent.id,
                    "name": agent.name,
                    "is_operator": agent.is_operator,
                    "operator": agent.is_operator,  # its first name, kept for scripts
                    "key": key,
                }
            )
        )
    else:
        console.print(
            f"agent [bold]{agent.name}[/] ({agent.id}){' — operator' if operator else ''}"
        )
        console.print(f"key: {key}")
        console.print("[dim]Store it now: it is not shown again.[/]")


@agents_app.command("revoke")
def agents_revoke(
    name: Annotated[str, typer.Argument(help="The agent's name or id")],
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Revoke an agent and every key it has. Its payments not in a final state go on (their
    budget holds stay until each ends): the command says how many, by state. An agent
    revoked already stays as it is (exit 0: running it again is harmless)."""
    from tasks import agents

    actor = operator_actor(operator)
    revoked = on_database(data_dir, lambda conn: agents.revoke(conn, name, actor=actor))
    if revoked is None:
        raise fail(f"no agent named {name!r}", NOT_FOUND)
    done = (
        f"{revoked['name']} ({revoked['id']}) was revoked already, at "
        f"{revoked['revoked_at']:%Y-%m-%d %H:%M:%S %Z}"
        if revoked["already_revoked"]
        else f"revoked {revoked['name']} ({revoked['id']}) and its keys"
    )
    console.print(plain(done), soft_wrap=True)
    in_flight = revoked["in_flight"]
    if in_flight:
        states = ", ".join(f"{n} {state}" for state, n in in_flight.items())
        console.print(
            plain(
                f"{sum(in_flight.values())} of its payments are still in flight ({states}): "
                "the fleet carries them on, and a hold on the budget stays until its payment "
                "ends. To stop one not yet charged: agentpay payments cancel ID"
            ),
            style="yellow",
            soft_wrap=True,
        )


@agents_app.command("rotate-key")
def agents_rotate_key(
    name: Annotated[str, typer.Argument(help="The agent's name or id")],
    as_json: AsJson = False,
    operator: Operator = None,
    data_dir: DataDir = None,
) -> None:
    """Give a live agent a new API key and revoke all its others at once (a key leaked, or
    due for rotation): its budget, payments and history stay. The key is shown once."""
    from tasks import agents

    actor = operator_actor(operator)
    rotated = on_database(data_dir, lambda conn: agents.rotate_key(conn, name, actor=actor))
    if rotated is None:
        raise fail(f"no live agent named {name!r}", NOT_FOUND)
    agent, key = rotated
    if as_json:
        typer.echo(json.dumps({"id": agent["id"], "name": agent["name"], "key": key}))
    else:
        console.print(plain(f"new key for {agent['name']} ({agent['id']}): {key}"))
        console.print(
            "[dim]Its other keys are revoked. Store this one now: it is not shown again.[/]"
        )


@agents_app.command("list")
def agents_list(
    include_revoked: Annotated[
        bool, typer.Option("--all/--live", help="Include revoked agents, or only live ones")
    ] = True,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """List agents with the prefixes of their live keys (the keys themselves are not kept)."""
    from rich.table import Table

    from tasks import agents

    rows = on_database(
        data_dir,
        lambda conn: agents.list_all(conn, include_revoked=include_revoked),
        transaction=False,
    )
    if as_json:
        typer.echo(dump_json(rows))
        return
    table = Table()
    for column in ("id", "name", "operator", "keys", "created", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            plain(row["name"]),
            "yes" if row["is_operator"] else "",
            ", ".join(f"{p}…" for p in row["key_prefixes"]),
            f"{row['created_at']:%Y-%m-%d %H:%M}",
            f"{row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "",
        )
    console.print(table)
