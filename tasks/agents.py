"""Agents and their API keys. A key is shown once, at creation; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from tasks.db import Conn
from tasks.payments import new_id

KEY_PREFIX = "apk_"


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    is_operator: bool


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def create(conn: Conn, name: str, *, is_operator: bool = False) -> tuple[Agent, str]:
    """Create an agent with one key; returns the agent and the key (never stored)."""
    agent_id = new_id("agt")
    await conn.execute(
        "INSERT INTO agents (id, name, is_operator) VALUES (%s, %s, %s)",
        (agent_id, name, is_operator),
    )
    key = await add_key(conn, agent_id)
    return Agent(agent_id, name, is_operator), key


async def add_key(conn: Conn, agent_id: str) -> str:
    key = new_key()
    await conn.execute(
        "INSERT INTO api_keys (key_hash, agent_id, prefix) VALUES (%s, %s, %s)",
        (hash_key(key), agent_id, key[: len(KEY_PREFIX) + 6]),
    )
    return key


async def authenticate(conn: Conn, key: str) -> Agent | None:
    """The agent a key belongs to, if the key and the agent are both live."""
    digest = hash_key(key)
    cur = await conn.execute(
        """SELECT k.key_hash, a.id, a.name, a.is_operator
           FROM api_keys k JOIN agents a ON a.id = k.agent_id
           WHERE k.key_hash = %s AND k.revoked_at IS NULL AND a.revoked_at IS NULL""",
        (digest,),
    )
    row = await cur.fetchone()
    # The lookup is by digest; compare it once more in constant time all the same.
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), digest):
        return None
    return Agent(row["id"], row["name"], row["is_operator"])


async def revoke(conn: Conn, name_or_id: str) -> bool:
    """Revoke an agent and all its keys."""
    cur = await conn.execute(
        """UPDATE agents SET revoked_at = now()
           WHERE (id = %s OR name = %s) AND revoked_at IS NULL RETURNING id""",
        (name_or_id, name_or_id),
    )
    row = await cur.fetchone()
    if row is None:
        return False
    await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE agent_id = %s AND revoked_at IS NULL",
        (row["id"],),
    )
    return True


async def find(conn: Conn, name_or_id: str) -> dict[str, Any] | None:
    cur = await conn.execute(
        """SELECT id, name, is_operator, created_at, revoked_at FROM agents
           WHERE id = %s OR name = %s""",
        (name_or_id, name_or_id),
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
