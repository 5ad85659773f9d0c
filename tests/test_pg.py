"""The embedded Postgres: started, stopped and started again (as the outage tests and the chaos
run do), and gone once let go of."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import quit_postgres_under
from workers.pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


def test_a_restarted_server_answers_again_and_stops_with_its_owner() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="appg"))
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    try:
        pg.stop_server()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        pg.start_server()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.cleanup()
    assert not (pg.pgdata / "postmaster.pid").exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    shutil.rmtree(data_dir)


def test_a_user_that_died_without_letting_go_does_not_keep_the_server_up() -> None:
    """A dev stack killed without its clean-up (SIGKILL, a closed terminal's SIGHUP) stayed
    listed as a user of its Postgres, so every later stop of that data directory left the
    server running."""
    data_dir = Path(tempfile.mkdtemp(prefix="appg"))
    use = (
        "import sys; from pathlib import Path; from workers.pg import EmbeddedPostgres; "
        f"pg = EmbeddedPostgres(Path({str(data_dir)!r})); pg.start(); print('up', flush=True); "
        "sys.stdin.read() if sys.argv[1] == 'hold' else pg.cleanup()"
    )
    pidfile = data_dir / "pg" / "postmaster.pid"
    try:
        killed = subprocess.Popen(
            [sys.executable, "-c", use, "hold"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert killed.stdout is not None and killed.stdout.readline() == b"up\n"
        killed.kill()
        killed.wait(10)
        assert pidfile.exists()  # nobody stopped it
        later = subprocess.run(
            [sys.executable, "-c", use, "let-go"], cwd=ROOT, capture_output=True, timeout=120
        )
        assert later.returncode == 0, later.stderr
        assert not pidfile.exists()  # the last live user let go: stopped
    finally:
        quit_postgres_under(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
