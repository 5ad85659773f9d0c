"""The embedded Postgres: started, stopped and started again (as the outage tests and the chaos
run do), and gone once let go of."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from workers.pg import EmbeddedPostgres


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
