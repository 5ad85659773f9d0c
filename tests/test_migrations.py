"""The migration runner: procrastinate's upgrade scripts, edited migrations, lock waits."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import psycopg
import pytest

import schema
from tests.conftest import invoke_cli


def test_procrastinate_scripts_numbered_the_installed_version_are_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script is named after the version it upgrades from: a database at 3.10.0 needs the
    3.10.0 scripts of the next release (and none older)."""
    from procrastinate.schema import SchemaManager

    for name in ("03.04.00_01_pre_old", "03.10.00_01_pre_next", "03.11.00_50_post_later"):
        (tmp_path / f"{name}.sql").write_text("SELECT 1;\n")
    monkeypatch.setattr(SchemaManager, "get_migrations_path", staticmethod(lambda: str(tmp_path)))
    found = [m.name for m in schema._procrastinate_migrations("3.10.0")]
    assert found == ["procrastinate:03.10.00_01_pre_next", "procrastinate:03.11.00_50_post_later"]


def _our_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS_DIR, folder)
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", folder)
    return folder


def test_an_applied_migration_that_was_edited_is_refused(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        # A database migrated before checksums were kept: they are recorded, not refused.
        conn.execute("UPDATE schema_migrations SET checksum = NULL")
        assert schema.migrate(database_url) == []
        missing = conn.execute(
            "SELECT count(*) FROM schema_migrations WHERE checksum IS NULL AND name ~ '^[0-9]'"
        ).fetchone()
        assert missing == (0,)

    folder = _our_migrations(tmp_path, monkeypatch)
    edited = folder / "0005_operations.sql"
    edited.write_text(edited.read_text() + "\nCREATE INDEX never_made ON payment_jobs (id);\n")
    (folder / "0999_later.sql").write_text("CREATE TABLE later_one (id int);\n")
    with pytest.raises(schema.MigrationEdited, match="0005_operations"):
        schema.migrate(database_url)
    result = invoke_cli(monkeypatch, ["migrate"], database_url=database_url)
    assert result.exit_code == 1, result.output
    assert "0005_operations" in result.output
    with psycopg.connect(database_url) as conn:  # nothing after it ran either
        assert conn.execute("SELECT to_regclass('later_one')").fetchone() == (None,)


def test_a_migration_gives_up_its_lock_wait_instead_of_stalling_everyone(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session holding a table (an operator's open transaction) makes the migration that
    needs it wait: at most LOCK_TIMEOUT a try, then it rolls back, so the queries queued
    behind it go on; it fails after LOCK_ATTEMPTS, and succeeds once the table is free.
    `agentpay migrate` says what it applied before (each is committed), which migration gave
    up and which session may hold the lock, and exits 3."""
    folder = _our_migrations(tmp_path, monkeypatch)
    (folder / "0998_first.sql").write_text("CREATE TABLE first_one (id int);\n")
    (folder / "0999_later.sql").write_text("ALTER TABLE payment_jobs ADD COLUMN later int;\n")
    monkeypatch.setattr(schema, "LOCK_TIMEOUT", "200ms")
    monkeypatch.setattr(schema, "LOCK_ATTEMPTS", 2)
    # (An application name rich would read as markup: the message is printed as text.)
    with psycopg.connect(database_url, application_name="operator-psql [/]") as holder:
        holder.execute("SELECT count(*) FROM payment_jobs").fetchone()  # holds it till commit
        holder_pid = holder.info.backend_pid
        result = invoke_cli(monkeypatch, ["migrate"], database_url=database_url)
        with pytest.raises(
            schema.MigrationLocked, match=f"pid {holder_pid} \\(operator-psql \\[/\\]"
        ):
            schema.migrate(database_url)
        holder.rollback()
    assert result.exit_code == 3, result.output
    assert result.output.startswith("applied 0998_first\n"), result.output
    assert "migration 0999_later waited 2 times 200ms" in result.output
    assert f"pid {holder_pid} (operator-psql [/], idle in transaction" in result.output
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM schema_migrations WHERE name = '0999_later'"
        ).fetchone() == (0,)
    assert schema.migrate(database_url) == ["0999_later"]


def test_commands_on_a_database_without_the_schema_say_to_migrate(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`agentpay status` on a database nobody migrated: one line saying what to do and exit
    3, not a traceback."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP VIEW ops_queue_depth CASCADE")
    result = invoke_cli(monkeypatch, ["status"], database_url=database_url)
    assert result.exit_code == 3, result.output
    assert "run `agentpay migrate`" in result.output
    assert "ops_queue_depth" in result.output


def test_a_procrastinate_upgrade_stopped_half_way_goes_on_where_it_stopped(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next release's scripts, the second failing the first time (a lock wait given up):
    the second run applies what is left, not the first script again."""
    from procrastinate.schema import SchemaManager

    installed = schema._procrastinate_version()
    major, minor, _ = (int(part) for part in installed.split("."))
    tag = f"{major:02d}.{minor:02d}.00"
    (tmp_path / f"{tag}_01_pre_first.sql").write_text("CREATE TABLE upgrade_first (id int);\n")
    second = tmp_path / f"{tag}_50_post_second.sql"
    second.write_text("SELECT 1 / 0;\n")
    monkeypatch.setattr(SchemaManager, "get_migrations_path", staticmethod(lambda: str(tmp_path)))
    monkeypatch.setattr(schema, "_procrastinate_version", lambda: f"{major}.{minor + 1}.0")
    with pytest.raises(psycopg.errors.DivisionByZero):
        schema.migrate(database_url)
    second.write_text("CREATE TABLE upgrade_second (id int);\n")
    assert schema.migrate(database_url) == [
        f"procrastinate:{tag}_50_post_second",
        f"procrastinate-{major}.{minor + 1}.0",
    ]


def test_an_up_to_date_migrate_does_not_wait_on_readers_of_its_ledger(database_url: str) -> None:
    """`migrate` with nothing to do ran DDL on `schema_migrations` every time (an exclusive
    lock, even for `ADD COLUMN IF NOT EXISTS`): one open transaction that read the table (a
    `pg_dump`, an operator's `psql`) held it up, and every `/readyz` and starting worker,
    which read the table too, queued behind it."""
    with psycopg.connect(database_url) as reader:
        reader.execute("SELECT count(*) FROM schema_migrations").fetchone()  # open transaction
        done: list[list[str]] = []
        runner = threading.Thread(target=lambda: done.append(schema.migrate(database_url)))
        runner.start()
        runner.join(30)
        finished_while_read = not runner.is_alive()
        reader.rollback()
    runner.join(30)
    assert finished_while_read
    assert done == [[]]


def test_a_missing_function_of_ours_says_to_migrate_and_any_other_is_a_bug() -> None:
    """A release whose procrastinate or agentpay functions are not in the database yet: the
    command says to run migrate (exit 3). An undefined function that is not one we ship
    (`operator does not exist: text = integer`) is a bug in a query, and is not hidden."""
    import typer

    from workers.cli_common import database_errors

    ours = psycopg.errors.UndefinedFunction(
        "function procrastinate_retry_job_v2(bigint, timestamp with time zone) does not exist"
    )
    with pytest.raises(typer.Exit) as exited, database_errors():
        raise ours
    assert exited.value.exit_code == 3
    bug = psycopg.errors.UndefinedFunction("operator does not exist: text = integer")
    with pytest.raises(psycopg.errors.UndefinedFunction), database_errors():
        raise bug
