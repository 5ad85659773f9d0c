"""The operator audit: who changed agents, keys, prices and Customers' owners, when, and from
what to what (`operator_audit`, schema/migrations/0019_operator_audit.sql). Append-only; each
row is written in the transaction of the change it records (tasks/agents.py,
tasks/pricing.py, tasks/customers.py)."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from tasks.db import Conn


async def record(
    conn: Conn, action: str, subject: str, data: dict[str, Any], *, actor: str | None
) -> None:
    """One action, in the caller's transaction. `actor` None: the database user (`db:<user>`),
    as payment_events name a change nobody named. Never pass a key in `data`: its prefix."""
    await conn.execute(
        """INSERT INTO operator_audit (actor, action, subject, data)
           VALUES (coalesce(%s::text, 'db:' || session_user), %s, %s, %s)""",
        (actor, action, subject, Jsonb(data)),
    )


async def recent(conn: Conn, *, limit: int = 50) -> list[dict[str, Any]]:
    """The latest actions, newest first."""
    cur = await conn.execute(
        """SELECT id, at, actor, action, subject, data FROM operator_audit
           ORDER BY id DESC LIMIT %s""",
        (limit,),
    )
    return await cur.fetchall()
