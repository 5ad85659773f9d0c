"""Agents and their API keys. A key is shown once, at creation; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from tasks import audit
from tasks.db import Conn
from tasks.payments import new_id

KEY_PREFIX = "apk_"


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    is_operator: bool

    @property
    def actor(self) -> str:
        """Who acted, as payment_events record it: `operator:<name>` (as the CLI records an
        operator) or `agent:<id>`."""
        return f"operator:{self.name}" if self.is_operator else f"agent:{self.id}"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def create(
    conn: Conn, name: str, *, is_operator: bool = False, actor: str | None = None
) -> tuple[Agent, str]:
    """Create an agent with one key; returns the agent and the key (never stored). Recorded
    in the operator audit as `agent.create` by `actor` (None: the database user)."""
    agent_id = new_id("agt")
    await conn.execute(
        "INSERT INTO agents (id, name, is_operator) VALUES (%s, %s, %s)",
        (agent_id, name, is_operator),
    )
    key = await add_key(conn, agent_id)
    await audit.record(
        conn,
        "agent.create",
        agent_id,
        {"name": name, "is_operator": is_operator, "key_prefix": key_prefix(key)},
        actor=actor,
    )
    return Agent(agent_id, name, is_operator), key


def key_prefix(key: str) -> str:
    """What is kept of a key to tell it by (api_keys.prefix): `apk_` and 6 characters."""
    return key[: len(KEY_PREFIX) + 6]


async def add_key(conn: Conn, agent_id: str, *, revoke_others: bool = False) -> str:
    """A new key for the agent (its others revoked, with `revoke_others`). Not audited:
    `create` and `rotate_key` record what they did with it."""
    if revoke_others:
        await _revoke_keys(conn, agent_id)
    key = new_key()
    await conn.execute(
        "INSERT INTO api_keys (key_hash, agent_id, prefix) VALUES (%s, %s, %s)",
        (hash_key(key), agent_id, key_prefix(key)),
    )
    return key


async def _revoke_keys(conn: Conn, agent_id: str) -> list[str]:
    """Revoke the agent's live keys; their prefixes."""
    cur = await conn.execute(
        """UPDATE api_keys SET revoked_at = now() WHERE agent_id = %s AND revoked_at IS NULL
           RETURNING prefix""",
        (agent_id,),
    )
    return sorted(str(row["prefix"]) for row in await cur.fetchall())


async def rotate_key(
    conn: Conn, name_or_id: str, *, actor: str | None = None
) -> tuple[dict[str, Any], str] | None:
    """A new key for a live agent (by id, else by name), every other key of it revoked in
    the same transaction; None if there is no such live agent. Its budget, payments and
    history stay: a leaked key is replaced without stranding them. Recorded as
    `agent.rotate_key` by `actor`."""
    found = await find(conn, name_or_id)
    if found is None:
        return None
    # Locked (a concurrent revoke or rotation waits, and sees this key), then read again: a
    # revoke that committed meanwhile leaves nothing to rotate.
    cur = await conn.execute(
        "SELECT revoked_at FROM agents WHERE id = %s FOR UPDATE", (found["id"],)
    )
    row = await cur.fetchone()
    if row is None or row["revoked_at"] is not None:
        return None
    revoked = await _revoke_keys(conn, found["id"])
    key = await add_key(conn, found["id"])
    await audit.record(
        conn,
        "agent.rotate_key",
        found["id"],
        {
            "name": found["name"],
            "is_operator": found["is_operator"],
            "key_prefix": key_prefix(key),
            "keys_revoked": revoked,
        },
        actor=actor,
    )
    return found, key


async def revoke(conn: Conn, name_or_id: str, *, actor: str | None = None) -> dict[str, Any] | None:
    """Revoke an agent (by id, else by name) and all its keys; None if there is no such
    agent. Its payments not in a final state go on (holds stay until each ends): the
    result's `in_flight` counts them by state. Recorded as `agent.revoke` by `actor`. An
    agent revoked already is left as it is (`already_revoked` true, nothing recorded)."""
    found = await find(conn, name_or_id)
    if found is None:
        return None
    # Only the revoke that sets revoked_at records one (a concurrent one waits on the row,
    # then finds it revoked).
    cur = await conn.execute(
        """UPDATE agents SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL
           RETURNING revoked_at""",
        (found["id"],),
    )
    row = await cur.fetchone()
    in_flight = await payments_in_flight(conn, found["id"])
    if row is None:
        cur = await conn.execute("SELECT revoked_at FROM agents WHERE id = %s", (found["id"],))
        before = await cur.fetchone()
        assert before is not None  # agents are never deleted
        return {**found, **before, "in_flight": in_flight, "already_revoked": True}
    revoked = await _revoke_keys(conn, found["id"])
    await audit.record(
        conn,
        "agent.revoke",
        found["id"],
        {
            "name": found["name"],
            "is_operator": found["is_operator"],
            "keys_revoked": revoked,
            "in_flight": in_flight,
        },
        actor=actor,
    )
    return {
        **found,
        "revoked_at": row["revoked_at"],
        "in_flight": in_flight,
        "already_revoked": False,
    }


# The states of a payment the fleet still carries on: every state but the final ones and
# `partially_refunded` (settled: only more refunds may come).
IN_FLIGHT_STATES = frozenset(
    {
        "received",
        "priced",
        "in_review",
        "approved",
        "charging",
        "requires_action",
        "authorized",
        "succeeded",
    }
)


async def payments_in_flight(conn: Conn, agent_id: str) -> dict[str, int]:
    """The agent's payments the fleet still carries on (not in a final state, nor
    `partially_refunded`: settled, only more refunds may come), counted by state."""
    cur = await conn.execute(
        # The states named, not "all but the final ones": the planner reads the agent's
        # payments in those (few) states from an index, where the negation read every
        # payment the agent ever made.
        """SELECT status, count(*) AS n FROM payment_jobs
           WHERE agent_id = %s AND status = ANY(%s)
           GROUP BY status ORDER BY status""",
        (agent_id, sorted(IN_FLIGHT_STATES)),
    )
    return {str(row["status"]): int(row["n"]) for row in await cur.fetchall()}


async def find(conn: Conn, name_or_id: str) -> dict[str, Any] | None:
    """The agent with this id, else the one with this name (ids win: names are free text)."""
    cur = await conn.execute(
        """SELECT id, name, is_operator, created_at, revoked_at FROM agents
           WHERE id = %s OR name = %s
           ORDER BY (id = %s) DESC LIMIT 1""",
        (name_or_id, name_or_id, name_or_id),
    )
    return await cur.fetchone()


async def list_all(conn: Conn, *, include_revoked: bool = True) -> list[dict[str, Any]]:
    """Every agent, oldest first, with the prefixes of its live keys (never the keys)."""
    cur = await conn.execute(
        """SELECT a.id, a.name, a.is_operator, a.created_at, a.revoked_at,
                  coalesce(array_agg(k.prefix ORDER BY k.created_at)
                           FILTER (WHERE k.prefix IS NOT NULL AND k.revoked_at IS NULL),
                           '{}') AS key_prefixes
           FROM agents a LEFT JOIN api_keys k ON k.agent_id = a.id
           WHERE %s OR a.revoked_at IS NULL
           GROUP BY a.id
           ORDER BY a.created_at, a.id""",
        (include_revoked,),
    )
    return await cur.fetchall()
