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
from tasks import agents
from tasks.db import Pool

_bearer = HTTPBearer(auto_error=False, description="An agent's API key: `Bearer apk_…`")


async def get_pool(request: Request) -> Pool:
    pool: Pool = request.app.state.pool
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]


# Browsers (the /ops page) are offered Basic too: the key as the password, as Stripe takes it.
_CHALLENGE = {"WWW-Authenticate": 'Bearer, Basic realm="agentpay", charset="UTF-8"'}


def presented_key(request: Request) -> str | None:
    """The API key of `Authorization: Bearer <key>`, or of HTTP Basic (key as the password,
    or as the user name with an empty password)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
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
    (api/ratelimit.py). 401 without a live key, 429 over the limit."""
    key = presented_key(request)
    if key is None:
        raise ApiError(
            401,
            "missing_api_key",
            "Provide an API key: Authorization: Bearer <key>",
            type_="authentication_error",
            headers=_CHALLENGE,
        )
    settings = request.app.state.settings
    async with pool.connection() as conn:
        agent = await ratelimit.authenticate(
            conn,
            key,
            rate=settings.api_rate_limit_per_second,
            burst=settings.api_rate_limit_burst,
        )
    if agent is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "Invalid or revoked API key",
            type_="authentication_error",
            headers=_CHALLENGE,
        )
    return agent


AgentDep = Annotated[agents.Agent, Depends(current_agent)]


async def operator(agent: AgentDep) -> agents.Agent:
    if not agent.is_operator:
        raise ApiError(
            403, "operator_only", "This route needs an operator key", type_="permission_error"
        )
    return agent


OperatorDep = Annotated[agents.Agent, Depends(operator)]
