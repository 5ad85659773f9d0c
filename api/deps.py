"""Dependencies: the process pool, the calling agent (authenticated and rate-limited) and
the operator check."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import ratelimit
from api.errors import ApiError
from api.query import check_query
from tasks import agents
from tasks.db import Pool

_bearer = HTTPBearer(auto_error=False, description="An agent's API key: `Bearer apk_…`")


async def get_pool(request: Request) -> Pool:
    pool: Pool = request.app.state.pool
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]


# Browsers (the /ops page) may use Basic too: the key as the password, as Stripe takes it.
# Only to read: a browser sends cached Basic credentials with any cross-site form POST, so a
# page an operator visits could otherwise refund or cancel payments in their name (CSRF).
# Bearer headers are never sent by a browser on its own.
READING = frozenset({"GET", "HEAD"})
_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="agentpay"'}
_READING_CHALLENGE = {
    "WWW-Authenticate": 'Bearer realm="agentpay", Basic realm="agentpay", charset="UTF-8"'
}


def _challenge(request: Request) -> dict[str, str]:
    return _READING_CHALLENGE if request.method in READING else _BEARER_CHALLENGE


def presented_key(request: Request) -> str | None:
    """The API key of `Authorization: Bearer <key>`, or, on GET and HEAD only, of HTTP Basic
    (key as the password, or as the user name with an empty password)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic" and request.method in READING:
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or user or None
    return None


async def current_agent(
    request: Request,
    pool: PoolDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> agents.Agent:
    """The agent whose key is in `Authorization`, after it took a token from its rate limit
    (api/ratelimit.py). 401 without a live key, 429 over the limit (or, for an address that
    sent too many keys that were none, before the key is looked up), then 400 for a query
    parameter the route does not take (api/query.py)."""
    key = presented_key(request)
    if key is None:
        basic = request.headers.get("authorization", "").lower().startswith("basic ")
        raise ApiError(
            401,
            "missing_api_key",
            "HTTP Basic is accepted for reading (GET) only; send Authorization: Bearer <key>"
            if basic and request.method not in READING
            else "Provide an API key: Authorization: Bearer <key>",
            type_="authentication_error",
            headers=_challenge(request),
        )
    settings = request.app.state.settings
    address = request.client.host if request.client else ""
    invalid_keys: ratelimit.InvalidKeys = request.app.state.invalid_keys
    ratelimit.refuse_if_waiting(
        invalid_keys.wait(address),
        "too_many_invalid_keys",
        "Too many requests with an invalid API key from this address",
    )
    async with pool.connection() as conn:
        agent = await ratelimit.authenticate(
            conn,
            key,
            rate=settings.api_rate_limit_per_second,
            burst=settings.api_rate_limit_burst,
        )
    if agent is None:
        invalid_keys.spent(address)
        raise ApiError(
            401,
            "invalid_api_key",
            "Invalid or revoked API key",
            type_="authentication_error",
            headers=_challenge(request),
        )
    check_query(request)
    return agent


AgentDep = Annotated[agents.Agent, Depends(current_agent)]


async def operator(agent: AgentDep) -> agents.Agent:
    if not agent.is_operator:
        raise ApiError(
            403, "operator_only", "This route needs an operator key", type_="permission_error"
        )
    return agent


OperatorDep = Annotated[agents.Agent, Depends(operator)]
