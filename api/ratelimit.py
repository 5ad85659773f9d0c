"""Per-agent rate limits: a token bucket per agent, kept in Postgres.

Every API process shares the same buckets (`api_rate_limits`, refilled and taken from by the
`agentpay_take_token` function of schema/migrations/0003_api.sql in one statement), so the
limit holds however many API processes run. The bucket refills at
`AGENTPAY_API_RATE_LIMIT_PER_SECOND` tokens a second and holds at most
`AGENTPAY_API_RATE_LIMIT_BURST`; a request without a token is answered 429 with
`Retry-After`. A rate of 0 turns the limit off.

`authenticate()` finds the caller's agent by key and takes its token in one statement (one
round trip, one autocommit transaction). The bucket table is unlogged, so that transaction
writes no WAL and its commit does not wait for a flush: a token does not need to survive
a crash.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict

from api.errors import ApiError
from tasks.agents import Agent, hash_key
from tasks.db import Conn

# The agent of a live key, and (when the limit is on) the token taken from its bucket.
_AUTHENTICATE = """
SELECT k.key_hash, a.id, a.name, a.is_operator,
       CASE WHEN %(rate)s > 0 THEN agentpay_take_token(a.id, %(rate)s, %(burst)s)
            ELSE 0 END AS wait
FROM api_keys k JOIN agents a ON a.id = k.agent_id
WHERE k.key_hash = %(hash)s AND k.revoked_at IS NULL AND a.revoked_at IS NULL
"""


async def authenticate(conn: Conn, key: str, *, rate: float, burst: int) -> Agent | None:
    """The agent a live key belongs to (None if there is none), after it took a token from
    its bucket; 429 with the seconds to wait if the bucket is empty."""
    digest = hash_key(key)
    cur = await conn.execute(
        _AUTHENTICATE, {"hash": digest, "rate": float(rate), "burst": float(burst)}
    )
    row = await cur.fetchone()
    # The lookup is by digest; compare it once more in constant time all the same.
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), digest):
        return None
    refuse_if_waiting(float(row["wait"]))
    return Agent(row["id"], row["name"], row["is_operator"])


def refuse_if_waiting(
    wait: float, code: str = "rate_limited", what: str = "Too many requests from this agent"
) -> None:
    """A 429 with Retry-After (whole seconds, at least 1) when `wait` seconds remain."""
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise ApiError(
            429,
            code,
            f"{what}; retry in {seconds} s.",
            type_="rate_limit_error",
            headers={"Retry-After": str(seconds)},
        )


class InvalidKeys:
    """Per client address, a token bucket of requests whose key was no live key, in this
    process's memory (a guesser needs no agent's bucket to flood: each wrong key cost a
    database lookup). `wait(address)` is how long the address must wait before the next
    request is looked at (0: now); `spent(address)` takes a token for a wrong key. At most
    `MAX_ADDRESSES` buckets are kept, the least recently used dropped first (a dropped one
    is whole again: forgetting is the lenient side)."""

    MAX_ADDRESSES = 10_000

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait(self, address: str) -> float:
        if self.rate <= 0 or address not in self._buckets:
            return 0.0
        tokens = self._tokens(address, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def spent(self, address: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._buckets[address] = (self._tokens(address, now) - 1, now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.MAX_ADDRESSES:
            self._buckets.popitem(last=False)
