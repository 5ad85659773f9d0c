"""Dependencies: the process pool and the calling agent."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from tasks import agents
from tasks.db import Pool

_bearer = HTTPBearer(auto_error=False, description="An agent's API key: `Bearer apk_…`")


def get_pool(request: Request) -> Pool:
    pool: Pool = request.app.state.pool
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]


async def current_agent(
    pool: PoolDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> agents.Agent:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "missing_api_key",
            "Provide an API key: Authorization: Bearer <key>",
            type_="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    async with pool.connection() as conn:
        agent = await agents.authenticate(conn, credentials.credentials)
    if agent is None:
        raise ApiError(
            401,
            "invalid_api_key",
            "Invalid or revoked API key",
            type_="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
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
