"""Per-agent rate limits: a token bucket per agent, kept in Postgres.

Every API process shares the same buckets (`api_rate_limits`, refilled and taken from by the
`agentpay_take_token` function of schema/migrations/0003_api.sql in one statement), so the
limit holds however many API processes run. The bucket refills at
`AGENTPAY_API_RATE_LIMIT_PER_SECOND` tokens a second and holds at most
`AGENTPAY_API_RATE_LIMIT_BURST`; a request without a token is answered 429 with
`Retry-After`. A rate of 0 turns the limit off.
"""

from __future__ import annotations

import math

from api.errors import ApiError
from tasks.db import Conn

_TAKE = "SELECT agentpay_take_token(%s, %s, %s) AS wait"


async def take(conn: Conn, agent_id: str, *, rate: float, burst: int) -> None:
    """Take a token from the agent's bucket, or raise 429 with the seconds to wait."""
    if rate <= 0:
        return
    cur = await conn.execute(_TAKE, (agent_id, rate, float(burst)))
    row = await cur.fetchone()
    wait = float(row["wait"]) if row else 0.0
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"Too many requests from this agent; retry in {seconds} s.",
            type_="rate_limit_error",
            headers={"Retry-After": str(seconds)},
        )
