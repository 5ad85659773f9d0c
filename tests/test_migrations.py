"""The migration runner: procrastinate's upgrade scripts, edited migrations, lock waits."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest

import schema
from schema.earlier import EARLIER, REPAIRS
from tasks import payments
from tasks.app import Backoff, bind
from tasks.db import open_pool, stale_plan
from tasks.settings import Settings
from tests.conftest import (
    TEMPLATE,
    PgServer,
    async_wait_for,
    auth,
    failed_last_hour,
    in_process_api,
    invoke_cli,
    run_jobs,
)


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


# The checksum of every text of every migration ever committed, the current one last (from
# `git log --format=%H -- schema/migrations/NNNN_*.sql` and `git show <commit>:<file>`). A
# migration edited after it was committed is refused by every database that applied it;
# each earlier text must be in schema/earlier.py, with what differs and, when a database
# migrated with it has another schema, the migration that repairs it.
COMMITTED_TEXTS: dict[str, list[str]] = {
    "0001_payments": ["3738ae0020cb21b8828f100be33663241d983b513cd1b1ab90723ed9fffc5f1a"],
    "0002_provider": ["4e2a796c96f78c882ef4a498855ef2596b22382771728c4bc84890d8852d0259"],
    "0003_api": ["a7499949d527cb3d320c8e506bad345287326100f672dad684ea3c9aa362597f"],
    "0004_ledger": ["e7295715f756482da1e780c8023581656f8e34c7fee82d2edcd1d256f74fdd6f"],
    "0005_operations": ["85f2ac50281544bf4fde8b33115973542c2ded0c4fde28a6e51c1beae7f5deb8"],
    "0006_ledger_speed": ["ce0001a03eabb82ed57d8894b86eacc0f1f4ac6862e7cef6f57f303db21ae6c6"],
    "0007_claim_speed": ["c61ff2af81b222a1ab608712bdfd33a51b64d7f409e5e9e9cceb73588fcb08f6"],
    "0008_ops_views": ["2377dec5619ca224656458b44d4b211b44f8d6fe687371cde9c3a2a3343b02a0"],
    "0009_pending_actions": [
        "b46f1b78385d39b2ea50777752b826d3e6256f2b72b31d89efddd68cd4b29ed6",  # eb0fb4e
        "e4ced85718fdbf57b86805f2109b4fc3764955bffa58049e49f542c4a3e1c484",
    ],
    "0010_amount_captured": ["4161e58c2e8795214db840017e0ba6e0787779282faed35fded2c6bc1365f231"],
    "0011_failed_jobs_index": ["42cb5ab47aea97079d90cf3eb4ef4bfa0c1503881041ba7a8b62f9c91bd5242a"],
    "0012_customer": ["00de5d3cbc5d948b8e8dfaad321021b7e2c53e69ebf7347df1fb70e5c286a3da"],
    "0013_worker_roles": ["94f7b129c165045bc6891213154625ac1286fa3de37cdb3ab0c51c7bea0e9190"],
    "0014_ops_counts": [
        "6ece1cbca8d4aeee21f38c8d0717e10a51b85cfc8b6f644c93ce4519bb028f74",  # e7989d0
        "0bb2d1d62e6a00af2c12dc2aee966b19e9400fc4724f869829baf5a9669c9d63",
    ],
    "0015_mismatch_resolution": [
        "c10de15573509cff78c28a6fa8944e2b8997a8367e37e74d85cf791d47e0c526"
    ],
    "0016_webhook_retention": ["afd81a143255852c3df91d349ef3f51edeca7779e663cb780edc1161880baa85"],
    "0017_customer_owners": [
        "9956c750ea93d3304b8f3c061fd8e7faa30a08c49445a0e1634807a94440595f",  # 8dcea6b
        "6411964c452ce6bbeb7a01acb68706e8f0481a68e76ad322840ab7d289f50180",  # 1a253cd
        "19d1abeaf03c520b05441db6d26d4cc9255c4ddb1bde239d926b16bed10a6cdc",
    ],
    "0018_failures_dealt_with": [
        "aa6cc5adbc456da5b09a3c8f90546dadbd717accd9db48ce3b8ee0bbbdabc170"
    ],
    "0019_operator_audit": [
        "e6d65bea039b6f8223b8d0ba86f1e4d383a0ad8874ae7ae2ae42376f37aa475d",  # 8ac5bd1
        "9d1d57738d3b3a9cbbe865f965c3e2767a5f5c847f8ca7b7086d2e7e3c3b45a1",
    ],
    "0020_dispute_losses": ["6b9c070ab85cef50d3f2033221f781dbe5074259d3de71d95af233175ecbb57e"],
    "0021_event_catch_up": [
        "d50c3acec2846537456f94af32f15cd301f237a98a6174da9277f88b198120eb",  # 92bf250
        "df6b19413b7e621e282be66cd7298bb58a2d8da354fccc58535232a26f51a319",
    ],
    "0022_failures_of_ended_payments": [
        "938964fafb2243693228050729b971d2b8e54c2a5d50f47f23f8d61892c947d0",  # 40925a2
        "9ddf93b3568e3ee578bbe4b549df0460e0e4b695827ca8e9560fe3dc363f3e92",
    ],
    "0023_ops_stuck_and_failures": [
        "661af51cd26a05a3d982475f5e29335bf7609cea77b02e7dc5461387453f6d0f",  # e653bea
        "b96f3b95a207e8a0cc7bde6629c48a29cd18d57f29e1bc4f06fdb8765296d01f",  # 094ceb3
        "13a5016fd875e1472cff1fba3d2f936fe24d828a7c25bd7af4fb9b589b6b2ead",
    ],
    "0024_amount_lost_to_disputes": [
        "04d2a74db2e7533d0ff525d8b67e7400cd21ad7c12bbe598127794070c8ca836"
    ],
    "0025_price_history": ["d88407dff54ab30f5983ce5d16c0edc85ed05fd158a34510848df6bf9739ab15"],
    "0026_repair_earlier_0009_0017_0021": [
        "c16fd530985f5a09c3ff14aec5c81faa7baa034fb5cc5135f5a90d0f22c4023a"
    ],
    "0027_repair_earlier_0023": [
        "243424e903e035e861f7ceed7b674506563851c995bb36196527684ad9b31f1f"
    ],
    "0028_lost_dispute_events": [
        "e9ae6d81b708ec5654db8605c227b45d83de48379c933d2769efd7a8831a77b8"
    ],
    "0029_reads_at_scale": ["aded92202f44d33970bdbb732aae073ee7502e71d88d63b00cfd7e0e7316648e"],
}

# The earlier texts whose databases have another schema (tests/earlier_migrations/, each
# named after the commit that made it): migrated with one, then with this release, a database
# must end as one migrated with this release alone.
EARLIER_DIR = Path(__file__).parent / "earlier_migrations"


def test_every_committed_text_of_a_migration_is_current_or_known_earlier() -> None:
    """A migration edited without its previous text in schema/earlier.py would be refused by
    every database that applied it (`agentpay migrate` exits 1): edit the migration only
    together with an entry there, and this table."""
    current = {m.name: m.checksum for m in schema.project_migrations()}
    assert current == {name: texts[-1] for name, texts in COMMITTED_TEXTS.items()}, (
        "a migration's text changed (or one was added): record its checksum in "
        "COMMITTED_TEXTS, and the previous one in schema/earlier.py with what differs"
    )
    earlier_committed = {(n, c) for n, texts in COMMITTED_TEXTS.items() for c in texts[:-1]}
    assert earlier_committed == {(n, c) for n, texts in EARLIER.items() for c in texts}
    for entries in EARLIER.values():
        for entry in entries.values():
            assert entry.differs
            assert entry.repair is None or entry.repair in REPAIRS
    for repair, after in REPAIRS.items():
        assert repair in current and after in current and after < repair
    structural = {(n, c) for n, texts in EARLIER.items() for c, e in texts.items() if e.repair}
    stored = {
        (n, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in EARLIER_DIR.glob("*.sql")
        for n in [f.name.split(".", 1)[0]]
    }
    assert stored == structural


def _dump_schema(pg_server: PgServer, url: str) -> str:
    pg_dump = str(pg_server.embedded.bin("pg_dump")) if pg_server.embedded else "pg_dump"
    out = subprocess.run(
        [pg_dump, "--schema-only", "--no-owner", url], check=True, capture_output=True, text=True
    ).stdout
    # (pg_dump 17.6+ brackets its output with a random \restrict key.)
    return "\n".join(
        line for line in out.splitlines() if not line.startswith(("--", "\\restrict", "\\unres"))
    )


@pytest.mark.parametrize("text", sorted(f.name for f in EARLIER_DIR.glob("*.sql")))
def test_a_database_migrated_with_an_earlier_text_ends_as_one_migrated_now(
    text: str, pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database migrated by a commit whose text of a migration differs (its migrations up
    to that one, that one as it was then): `migrate` of this release accepts it, applies the
    repair where the migrations after it need it, and the schema is the same as a database
    migrated by this release alone."""
    name = text.split(".", 1)[0]
    folder = tmp_path / "then"
    folder.mkdir()
    for m in schema.project_migrations():
        if m.name < name:
            (folder / f"{m.name}.sql").write_text(m.sql, encoding="utf-8")
    (folder / f"{name}.sql").write_bytes((EARLIER_DIR / text).read_bytes())
    database = pg_server.fresh_name()
    url = pg_server.create(database)
    try:
        monkeypatch.setattr(schema, "MIGRATIONS_DIR", folder)
        assert schema.migrate(url)[-1] == name
        monkeypatch.undo()
        schema.migrate(url)
        assert _dump_schema(pg_server, url) == _dump_schema(pg_server, pg_server.url(TEMPLATE))
        assert schema.migrate(url) == []
        with psycopg.connect(url) as conn:
            recorded = dict(conn.execute("SELECT name, checksum FROM schema_migrations"))
        assert all(recorded[m.name] == m.checksum for m in schema.project_migrations())
    finally:
        pg_server.drop(database)


@pytest.mark.parametrize(
    ("name", "checksum"),
    [(n, c) for n, texts in EARLIER.items() for c, e in texts.items() if e.repair is None],
)
def test_a_harmless_earlier_text_is_accepted_and_stamped(
    name: str, checksum: str, database_url: str
) -> None:
    """A text that differs in comments, data or a view defined again later: the database is
    as this release's text makes it, and only its checksum is stamped."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = %s WHERE name = %s", (checksum, name))
        assert schema.migrate(database_url) == []
        current = next(m.checksum for m in schema.project_migrations() if m.name == name)
        assert conn.execute(
            "SELECT checksum FROM schema_migrations WHERE name = %s", (name,)
        ).fetchone() == (current,)


def test_a_database_without_checksums_is_stamped_with_a_warning_where_texts_differed(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = NULL")
    with caplog.at_level("WARNING", logger="agentpay.schema"):
        assert schema.migrate(database_url) == []
    warned = {
        found.group(1)
        for r in caplog.records
        if (found := re.match(r"migration (\S+) has no checksum", r.getMessage()))
    }
    assert warned == set(EARLIER)


# A migration that adds a column while processes run: psycopg prepares a statement after 5
# executions on a connection, and a prepared `SELECT *` / `RETURNING *` of the altered table
# then fails (FeatureNotSupported, "cached plan must not change result type") on that
# connection, every time outside a transaction.

_POST = {"amount": 1000, "currency": "usd", "payment_method": "pm_card_visa"}


def _add_column(database_url: str, column: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE payment_jobs ADD COLUMN {column} integer")


async def test_a_connection_that_met_a_new_column_is_replaced(database_url: str) -> None:
    async with open_pool(database_url, min_size=1, max_size=1) as one:
        for _ in range(6):
            async with one.connection() as conn:
                await payments.get(conn, "pay_none")
        _add_column(database_url, "later_one")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as met:
            async with one.connection() as conn:
                await payments.get(conn, "pay_none")
        assert stale_plan(met.value)
        async with one.connection() as conn:  # a new connection: prepared nothing yet
            assert await payments.get(conn, "pay_none") is None


async def test_a_request_and_a_job_that_meet_a_new_column_are_tried_again(
    database_url: str, settings: Settings, agent_key: str
) -> None:
    """A POST that meets the new column is a 503 the agent sends again (not a 500), and a job
    that does is retried (it failed for good): a deploy's migration does not fail payments
    of the processes still running."""
    async with open_pool(database_url, min_size=1, max_size=1) as one, bind(one):
        async with in_process_api(settings, one) as (_, api):
            for _ in range(6):
                response = await api.post("/v1/payments", json=_POST, headers=auth(agent_key))
                assert response.status_code == 202, response.text
            _add_column(database_url, "later_one")
            again = {**auth(agent_key), "Idempotency-Key": "after-the-migration"}
            first = await api.post("/v1/payments", json=_POST, headers=again)
            assert first.status_code == 503, first.text
            assert first.json()["error"]["code"] == "database_unavailable"
            assert first.headers["Retry-After"]
            second = await api.post("/v1/payments", json=_POST, headers=again)
            assert second.status_code == 202, second.text

        # The pricing step's read of the payment, prepared on the only connection, then a
        # second migration: the first pricing job meets it.
        for _ in range(6):
            async with one.connection() as conn, conn.transaction():
                await payments.lock(conn, second.json()["id"])
        _add_column(database_url, "later_two")

        async def all_priced() -> bool:
            await run_jobs(one, ("pricing",), observed=True)
            async with one.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'received') AS waiting,"
                    " (SELECT count(*) FROM procrastinate_jobs WHERE status = 'failed')"
                    " AS failed FROM payment_jobs"
                )
                row = await cur.fetchone()
            assert row is not None and row["failed"] == 0
            return row["waiting"] == 0

        await async_wait_for(all_priced, timeout=30, what="every payment priced")
        assert await failed_last_hour(one, "pricing") == 0


def test_a_statement_prepared_before_a_migration_is_retried_by_every_task() -> None:
    from procrastinate import jobs

    error = psycopg.errors.FeatureNotSupported("cached plan must not change result type")
    job = jobs.Job(id=1, queue="pricing", lock=None, queueing_lock=None, task_name="pricing")
    assert Backoff().get_retry_decision(exception=error, job=job) is not None
    other = psycopg.errors.FeatureNotSupported("something else is not supported")
    assert Backoff().get_retry_decision(exception=other, job=job) is None
