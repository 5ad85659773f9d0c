"""Agents, for operators: who may call the API (never their keys, which are not kept)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import OperatorDep, PoolDep
from api.errors import responses
from api.models import AgentList
from tasks import agents

router = APIRouter(prefix="/v1/agents", tags=["agents"])


@router.get("", response_model=AgentList, responses=responses(400, 401, 403, 429, 500))
async def list_agents(
    _: OperatorDep,
    pool: PoolDep,
    include_revoked: Annotated[bool, Query(description="Also list revoked agents")] = True,
) -> dict[str, Any]:
    """Every agent, oldest first, with the prefixes of its live keys. Operators only."""
    async with pool.connection() as conn:
        rows = await agents.list_all(conn, include_revoked=include_revoked)
    return {"object": "list", "data": rows}
