"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.routes import health, payments
from tasks.db import open_pool
from tasks.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_pool(
            settings.resolved_database_url(),
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            name="api",
        ) as pool:
            app.state.pool = pool
            yield

    app = FastAPI(
        title="agentpay",
        version="0.1.0",
        description="Payments for AI agents: record and enqueue over HTTP; workers do the rest.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)
    app.include_router(health.router)
    app.include_router(payments.router)
    return app
