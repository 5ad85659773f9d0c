"""What the `agentpay` commands share: the --data-dir and --json options, the exit codes, and
one way to run work on the database, where no database is one line and exit code 3, not a
traceback."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import psycopg
import pydantic_core
import typer
from rich.console import Console
from rich.text import Text

from tasks.db import Conn, open_pool
from tasks.settings import NoDatabase, Settings, get_settings
from workers.logs import scrub

T = TypeVar("T")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the dev stack keeps its database, logs and stack.json "
        "[env: AGENTPAY_DATA_DIR; default: .data]",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON")]
Operator = Annotated[
    str | None,
    typer.Option(
        "--operator",
        help="Who is acting, recorded as operator:NAME "
        "[env: AGENTPAY_OPERATOR; default: the OS user]",
        show_default=False,
    ),
]

# Exit codes: 0 done, 1 refused (by the payment's or job's state, or a name taken), 2 not
# found (and Click's usage errors, and a setting that does not parse or cannot be used, e.g.
# a worker's metrics port taken), 3 the database is not available.
REFUSED = 1
NOT_FOUND = USAGE = 2
NO_DATABASE = 3

# A command waits at most this long for a row lock (an operator's open `psql` transaction,
# a worker's step), then gives up with exit code 3 instead of hanging.
CLI_SESSION = {"lock_timeout": "5s"}
# How long a command tries to reach the database before it gives up (exit 3).
CONNECT_SECONDS = 10.0


# C0 and C1 control characters but tab and newline: terminal escape sequences start there.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value: Any) -> Text:
    """A value from the database, to print: never read as rich markup (an agent's cancel
    reason `[/]` would crash the command), and with control characters shown as U+FFFD (an
    agent's text must not send escape sequences to an operator's terminal)."""
    return Text(_CONTROL.sub("\ufffd", "" if value is None else str(value)))


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP (a process manager's or CI's stop, a closed terminal) stop a
    command that runs a stack of its own (demo, chaos, bench) as Ctrl-C does: its clean-up
    runs, and what it started — its Postgres included — stops with it. Only the first one
    counts: a stop asked again does not cut the clean-up short."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        # Started as a script's background job (`agentpay dev &`), the process inherits
        # SIGINT ignored (and Python then installs no handler of its own): the SIGINT raised
        # below would do nothing, and the stack would run on after its SIGTERM.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    asked: list[int] = []

    def stop(sig: int, _: Any) -> None:
        # Once: a second SIGTERM (a process manager or CI that asks twice, at once) landing
        # after the first one's interrupt but before the clean-up holds signals off
        # (`devstack._signals_held`) interrupted the clean-up itself, leaving stack.json and
        # the API and workers behind. A stop that hangs is for SIGKILL.
        if not asked:
            asked.append(sig)
            # Raised as SIGINT, so that whatever handles SIGINT then handles it: inside
            # `asyncio.run`, asyncio's handler cancels the main task (a KeyboardInterrupt
            # raised wherever the loop was left tasks failing with a traceback).
            signal.raise_signal(signal.SIGINT)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def dump_json(value: Any, *, indent: int | None = None) -> str:
    """A command's `--json` document, written as the HTTP API writes its JSON (timestamps
    as `2026-12-02T00:43:25.175763Z`), so the two can be compared as they are."""
    return pydantic_core.to_json(value, indent=indent, fallback=str).decode()


def say_error(message: str) -> None:
    """One message in red on stderr, as text (it may quote the database or a setting: never
    markup)."""
    Console(stderr=True).print(plain(message), style="red", soft_wrap=True)


def fail(message: str, code: int = REFUSED) -> typer.Exit:
    """Say why, in red on stderr (stdout may be a `--json` document a script reads), and
    return the exit to raise with `code`."""
    say_error(message)
    return typer.Exit(code)


def refused(error: Exception) -> typer.Exit:
    """The exit for a refusal that carries `message` and `code` (not_found: NOT_FOUND)."""
    code = NOT_FOUND if getattr(error, "code", "") == "not_found" else REFUSED
    return fail(getattr(error, "message", str(error)), code)


def operator_actor(operator: str | None) -> str:
    """How an operator's action is recorded in payment_events and ledger entries."""
    return f"operator:{operator or os.environ.get('AGENTPAY_OPERATOR') or getpass.getuser()}"


def settings_for(data_dir: Path | None) -> Settings:
    """The settings, with --data-dir (when given) in place of AGENTPAY_DATA_DIR."""
    if data_dir is not None:
        os.environ["AGENTPAY_DATA_DIR"] = str(data_dir)
        get_settings.cache_clear()
    return get_settings()


@contextmanager
def database_errors() -> Iterator[None]:
    """No database configured, none answering (10 s), one without agentpay's schema, or a
    transient refusal (lock or statement timeout, serialization failure): one line on stderr
    and exit code 3. The command's transaction was rolled back — unless the connection broke
    during its commit, when it may have gone through: look before running a deposit or a
    create again. The pool's own warnings (one per failed connection attempt) are not
    printed: the last one's reason ends that line instead."""
    with _pool_warnings_kept() as warnings:
        try:
            yield
        except psycopg.errors.LockNotAvailable as error:
            say_error(
                f"Another transaction holds a row or table this command needs (for over "
                f"{CLI_SESSION['lock_timeout']}); nothing was changed. Try again."
            )
            raise typer.Exit(NO_DATABASE) from error
        except (
            psycopg.errors.UndefinedTable,
            psycopg.errors.UndefinedColumn,
            psycopg.errors.UndefinedFunction,
        ) as error:
            first_line = str(error).splitlines()[0]
            if isinstance(error, psycopg.errors.UndefinedFunction) and not _OURS.search(first_line):
                raise  # a function we do not ship: a bug (a type mismatch), no missing schema
            say_error(
                f"The database lacks agentpay's schema, or this release's migrations "
                f"({first_line}): run `agentpay migrate`."
            )
            raise typer.Exit(NO_DATABASE) from error
        except (NoDatabase, psycopg.OperationalError) as error:
            last = f" (last attempt: {scrub(warnings[-1]).splitlines()[0]})" if warnings else ""
            say_error(f"The database is not available: {error}{last}")
            raise typer.Exit(NO_DATABASE) from error


@contextmanager
def _pool_warnings_kept() -> Iterator[list[str]]:
    """psycopg.pool's warnings kept in a list, not printed, for as long as this lasts."""
    logger = logging.getLogger("psycopg.pool")
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    handler, propagate = Keep(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield kept
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# Functions a migration installs (procrastinate's, and agentpay's own): one missing means a
# migration not applied.
_OURS = re.compile(r"function (procrastinate_|agentpay_|ops_|ledger_|payment)")


def on_database(
    data_dir: Path | None, work: Callable[[Conn], Awaitable[T]], *, transaction: bool = True
) -> T:
    """Run `work(conn)` on the configured database, in one transaction unless told not to."""
    settings = settings_for(data_dir)

    async def run() -> T:
        url = settings.resolved_database_url()
        async with open_pool(
            url, min_size=1, max_size=1, timeout=CONNECT_SECONDS, session=CLI_SESSION
        ) as pool:
            async with pool.connection() as conn:
                if not transaction:
                    return await work(conn)
                async with conn.transaction():
                    return await work(conn)

    with database_errors():
        return asyncio.run(run())
