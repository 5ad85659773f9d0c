"""Ordered SQL migrations, applied once each.

`schema/migrations/NNNN_name.sql` files run in name order, each in its own transaction, and
are recorded in `schema_migrations`. Procrastinate's own schema is installed first and
recorded as `procrastinate-<version>`; a later procrastinate release is brought up to date
with the migration files it ships. Concurrent runners serialise on an advisory lock, so
every process of a deploy may call `migrate()` safely.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same in every process that migrates.
_ADVISORY_LOCK_KEY = 0x61676E7470  # "agntp"

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


def project_migrations() -> list[Migration]:
    files = sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [Migration(f.stem, f.read_text(encoding="utf-8")) for f in files]


def _procrastinate_version() -> str:
    return importlib.metadata.version("procrastinate")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _procrastinate_migrations(installed: str) -> list[Migration]:
    """Procrastinate's upgrade scripts newer than the version the database has."""
    from procrastinate.schema import SchemaManager

    folder = Path(SchemaManager.get_migrations_path())
    found = []
    for f in sorted(folder.glob("*.sql")):
        version = f.name.split("_", 1)[0]
        if _version_key(version) > _version_key(installed):
            found.append(Migration(f"procrastinate:{f.stem}", f.read_text(encoding="utf-8")))
    return found


def _procrastinate_schema() -> str:
    from procrastinate.schema import SchemaManager

    return SchemaManager.get_schema()


def migrate(database_url: str) -> list[str]:
    """Apply what is missing; return the names applied (empty when up to date)."""
    applied: list[str] = []
    # A server that does not answer is an error within 10 s, not after the OS's TCP timeout
    # (a libpq parameter of the URL, if it has one, wins).
    params = conninfo_to_dict(database_url)
    params.setdefault("connect_timeout", 10)
    with psycopg.connect(make_conninfo("", **params), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        try:
            conn.execute(_CREATE_LEDGER)
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            applied += _migrate_procrastinate(conn, done)
            for migration in project_migrations():
                if migration.name not in done:
                    _apply(conn, migration)
                    applied.append(migration.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))
    return applied


def _migrate_procrastinate(conn: psycopg.Connection, done: set[str]) -> list[str]:
    current = f"procrastinate-{_procrastinate_version()}"
    if current in done:
        return []
    recorded = sorted(
        (name.removeprefix("procrastinate-") for name in done if name.startswith("procrastinate-")),
        key=_version_key,
    )
    if not recorded:
        steps = [Migration(current, _procrastinate_schema())]
    else:
        steps = [
            *_procrastinate_migrations(recorded[-1]),
            Migration(current, "SELECT 1"),
        ]
    for step in steps:
        _apply(conn, step)
    return [step.name for step in steps]


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    with conn.transaction():
        # Migration files are our own, trusted text; no parameters are involved.
        conn.execute(migration.sql.encode())
        conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (migration.name,))
