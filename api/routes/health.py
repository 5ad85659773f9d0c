"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import PoolDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it may still be unable to reach the database)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database is not reachable"}})
async def readyz(pool: PoolDep) -> JSONResponse:
    """Ready to take payments: the database answers and the schema is in place."""
    try:
        async with asyncio.timeout(2):
            async with pool.connection(timeout=2) as conn:
                cur = await conn.execute("SELECT to_regclass('payment_jobs') IS NOT NULL AS ok")
                row = await cur.fetchone()
        ready = bool(row and row["ok"])
    except Exception:
        ready = False
    if ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not_ready"}, status_code=503)
