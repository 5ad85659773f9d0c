"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

import schema
from api.deps import PoolDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it may still be unable to reach the database)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {
            "description": "The database is not reachable (`reason`: `database_unreachable`), "
            "or lacks migrations this release needs (`migrations_pending`, with `missing`)"
        }
    },
)
async def readyz(pool: PoolDep) -> JSONResponse:
    """Ready to take payments: the database answers and has every migration this release's
    code needs (a new release's API started before the deploy's `agentpay migrate` is not)."""
    try:
        async with asyncio.timeout(2):
            async with pool.connection(timeout=2) as conn:
                needed = await schema.missing(conn)
    except Exception:
        return JSONResponse({"status": "not_ready", "reason": "database_unreachable"}, 503)
    if needed:
        return JSONResponse(
            {"status": "not_ready", "reason": "migrations_pending", "missing": needed}, 503
        )
    return JSONResponse({"status": "ready"})
