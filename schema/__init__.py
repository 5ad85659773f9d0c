"""Ordered SQL migrations, applied once each.

`schema/migrations/NNNN_name.sql` files run in name order, each in its own transaction, and
are recorded in `schema_migrations` with a checksum of their text: a migration edited after it
was applied is refused (`MigrationEdited`), since its change would never reach a database
that has it already — unless the database has one of the known earlier texts of
schema/earlier.py (migrations edited before this rule was kept): it is accepted and stamped
with the current checksum, after the migration that repairs it where it left another schema
(applied right after the migration it must follow). Procrastinate's own schema is installed
first and recorded as `procrastinate-<version>`; a later procrastinate release is brought up
to date with the migration files it ships. Concurrent runners serialise on an advisory lock,
so every process of a deploy may call `migrate()` safely.

A migration waits at most `LOCK_TIMEOUT` for each lock it needs: while it waits, every
query that needs the same table queues behind it, so one long transaction elsewhere (an open
`psql` session) would otherwise stall the API and the fleet for as long as it stays open.
It gives up, rolls back and tries again, `LOCK_ATTEMPTS` times in all, then fails
(`MigrationLocked`). `LOCK_TIMEOUT` stays below the API's own `lock_timeout` (3 s), so a
request queued behind a waiting migration is let through before it would give up.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row

from schema.earlier import EARLIER, REPAIRS

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same in every process that migrates.
_ADVISORY_LOCK_KEY = 0x61676E7470  # "agntp"

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text
"""
# Whether the ledger is there as `_CREATE_LEDGER` makes it, read without taking a lock: its
# DDL takes an exclusive lock even when it changes nothing, and would wait on (and make
# wait) every reader of the table — `/readyz` and the workers read it (`missing`).
_LEDGER_IN_PLACE = """
SELECT EXISTS (SELECT 1 FROM information_schema.columns
                WHERE table_schema = current_schema() AND table_name = 'schema_migrations'
                  AND column_name = 'checksum')
"""

LOCK_TIMEOUT = "2s"
LOCK_ATTEMPTS = 15

log = logging.getLogger("agentpay.schema")


class MigrationEdited(RuntimeError):
    """Migrations whose text changed after they were applied."""


class MigrationLocked(RuntimeError):
    """A migration that gave up waiting for a lock another session holds (`LOCK_ATTEMPTS`
    tries of `LOCK_TIMEOUT`); it was rolled back, those before it stay applied."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def project_migrations() -> list[Migration]:
    files = sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [Migration(f.stem, f.read_text(encoding="utf-8")) for f in files]


@functools.cache
def expected() -> tuple[str, ...]:
    """What a database must have recorded for this release's code to run on it: procrastinate's
    schema at the installed version, and every project migration."""
    return (f"procrastinate-{_procrastinate_version()}", *(m.name for m in project_migrations()))


async def missing(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """This release's migrations the database has not recorded (all of them when it has none
    recorded at all), in order. The processes of a release wait until this is empty before
    they work: code that reads a column its migration has not added yet would fail its jobs
    for good."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            return list(expected())
        await cur.execute(
            "SELECT name FROM unnest(%s::text[]) WITH ORDINALITY AS e (name, n)"
            " WHERE name NOT IN (SELECT name FROM schema_migrations) ORDER BY n",
            (list(expected()),),
        )
        return [name for (name,) in await cur.fetchall()]


def _procrastinate_version() -> str:
    return importlib.metadata.version("procrastinate")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _procrastinate_migrations(installed: str) -> list[Migration]:
    """Procrastinate's upgrade scripts from the version the database has on. A script is
    named after the version it upgrades *from* (procrastinate's rule: from 3.10.0, apply the
    scripts numbered 3.10.0 and above), so those numbered `installed` itself are included."""
    from procrastinate.schema import SchemaManager

    folder = Path(SchemaManager.get_migrations_path())
    found = []
    for f in sorted(folder.glob("*.sql")):
        version = f.name.split("_", 1)[0]
        if _version_key(version) >= _version_key(installed):
            found.append(Migration(f"procrastinate:{f.stem}", f.read_text(encoding="utf-8")))
    return found


def _procrastinate_schema() -> str:
    from procrastinate.schema import SchemaManager

    return SchemaManager.get_schema()


def migrate(database_url: str, on_applied: Callable[[str], None] | None = None) -> list[str]:
    """Apply what is missing; return the names applied (empty when up to date). Each is
    committed on its own, and passed to `on_applied` then (a later one may fail)."""
    applied: list[str] = []
    report = on_applied or (lambda name: None)
    # A server that does not answer is an error within 10 s, not after the OS's TCP timeout
    # (a libpq parameter of the URL, if it has one, wins).
    params = conninfo_to_dict(database_url)
    params.setdefault("connect_timeout", 10)
    with psycopg.connect(make_conninfo("", **params), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        try:
            in_place = conn.execute(_LEDGER_IN_PLACE).fetchone()
            if not (in_place and in_place[0]):
                conn.execute(_CREATE_LEDGER)
            done: dict[str, str | None] = dict(
                conn.execute("SELECT name, checksum FROM schema_migrations").fetchall()
            )
            ours = project_migrations()
            repairs = _check_unedited(conn, ours, done)
            steps = _procrastinate_steps(set(done)) + _ordered(
                [m for m in ours if m.name not in done], repairs
            )
            for step in steps:
                _apply(
                    conn, step, restamp=[m for m in ours if m.name in repairs.get(step.name, ())]
                )
                applied.append(step.name)
                report(step.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))
    return applied


def _procrastinate_steps(done: set[str]) -> list[Migration]:
    """What brings procrastinate's schema to the installed version: all of it on a new
    database, else the upgrade scripts not applied yet, then the version's own record."""
    current = f"procrastinate-{_procrastinate_version()}"
    if current in done:
        return []
    recorded = sorted(
        (name.removeprefix("procrastinate-") for name in done if name.startswith("procrastinate-")),
        key=_version_key,
    )
    if not recorded:
        return [Migration(current, _procrastinate_schema())]
    # Each script is recorded as it is applied: an upgrade stopped half-way (a lock wait
    # given up) goes on from where it stopped.
    return [
        *(m for m in _procrastinate_migrations(recorded[-1]) if m.name not in done),
        Migration(current, "SELECT 1"),
    ]


def _check_unedited(
    conn: psycopg.Connection, ours: list[Migration], done: dict[str, str | None]
) -> dict[str, set[str]]:
    """Refuse to go on when an applied migration's text changed, unless it is a known earlier
    text (schema/earlier.py): a harmless one is stamped with the current checksum now; one
    that needs a repair is returned, {repair migration: {migrations it repairs}}, and stamped
    when its repair is applied (at once when that was applied before). Record the checksums
    of those applied before checksums were kept."""
    repairs: dict[str, set[str]] = {}
    edited = []
    for m in ours:
        recorded = done.get(m.name)
        if recorded in (None, m.checksum):
            continue
        earlier = EARLIER.get(m.name, {}).get(recorded)
        if earlier is None:
            edited.append(m.name)
        elif earlier.repair is None or earlier.repair in done:
            log.info("migration %s was applied from an earlier text (%s)", m.name, earlier.differs)
            _stamp(conn, m)
        else:
            log.warning(
                "migration %s was applied from an earlier text (%s): %s repairs it",
                m.name,
                earlier.differs,
                earlier.repair,
            )
            repairs.setdefault(earlier.repair, set()).add(m.name)
    if edited:
        raise MigrationEdited(
            f"applied migrations were edited since: {', '.join(edited)}. An applied migration "
            "never reaches this database again; restore its text and put the change in a new "
            "migration."
        )
    for m in ours:
        if m.name in done and done[m.name] is None:
            if m.name in EARLIER:
                # Recorded before checksums were kept: which of its texts ran is unknown.
                log.warning(
                    "migration %s has no checksum recorded; stamped with this release's, but "
                    "it may have been applied from an earlier text (schema/earlier.py)",
                    m.name,
                )
            _stamp(conn, m)
    return repairs


def _stamp(conn: psycopg.Connection, m: Migration) -> None:
    conn.execute("UPDATE schema_migrations SET checksum = %s WHERE name = %s", (m.checksum, m.name))


def _ordered(steps: list[Migration], repairs: dict[str, set[str]]) -> list[Migration]:
    """`steps` with each repair the database needs moved to right after the migration it
    must follow (`REPAIRS`), or first when that one is applied already."""
    for name in repairs:
        step = next(m for m in steps if m.name == name)
        steps.remove(step)
        after = next((i + 1 for i, m in enumerate(steps) if m.name == REPAIRS[name]), 0)
        steps.insert(after, step)
    return steps


def _apply(
    conn: psycopg.Connection, migration: Migration, restamp: list[Migration] | None = None
) -> None:
    """Run `migration` and record it, in one transaction, with the checksums of `restamp`
    (those it repairs) stamped."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                # Migration files are our own, trusted text; no parameters are involved.
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
                    (migration.name, migration.checksum),
                )
                for m in restamp or ():
                    _stamp(conn, m)
            return
        except psycopg.errors.LockNotAvailable as error:
            if attempt == LOCK_ATTEMPTS:
                raise MigrationLocked(
                    f"migration {migration.name} waited {LOCK_ATTEMPTS} times {LOCK_TIMEOUT} "
                    "for a lock other sessions hold, and was rolled back (those before it "
                    f"stay applied). {_long_transactions(conn)}End them and run migrate "
                    "again."
                ) from error
            log.warning(
                "migration %s waited %s for a lock another session holds; trying again",
                migration.name,
                LOCK_TIMEOUT,
            )
            time.sleep(1)


def _long_transactions(conn: psycopg.Connection) -> str:
    """The other sessions of this database in a transaction for longer than a lock wait:
    those that may hold the lock (pid, application, state, age)."""
    rows = conn.execute(
        """SELECT pid, coalesce(nullif(application_name, ''), usename) AS who, state,
                  round(extract(epoch FROM now() - xact_start))::int AS seconds
             FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND xact_start < now() - %s::interval
            ORDER BY xact_start
            LIMIT 5""",
        (LOCK_TIMEOUT,),
    ).fetchall()
    if not rows:
        return ""
    found = "; ".join(f"pid {pid} ({who}, {state}, {age} s)" for pid, who, state, age in rows)
    return f"Sessions in a transaction for longer: {found}. "
