"""The FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import errors, idempotency, metrics, ratelimit
from api.limits import BodyLimits
from api.routes import actions, health, ledger, ops, payments, prices, review, webhooks
from api.routes import agents as agents_routes
from tasks.db import Pool, open_pool
from tasks.settings import Settings, get_settings

log = logging.getLogger("agentpay.api")


async def prune_idempotency_keys(pool: Pool, settings: Settings) -> None:
    """Forever: delete idempotency keys past their retention (every API process may run
    this; the DELETE is the same whoever runs it)."""
    retention = settings.idempotency_retention_hours * 3600
    while True:
        try:
            async with pool.connection() as conn:
                pruned = await idempotency.prune(conn, retention)
            if pruned:
                log.info("pruned %d idempotency keys", pruned)
        except Exception:
            log.exception("pruning idempotency keys failed; will try again")
        await asyncio.sleep(settings.idempotency_prune_interval_seconds)


_NUMERIC_KEYWORDS = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
)


def _integral_bounds(node: Any) -> None:
    """FastAPI writes every numeric bound as a float (`"maximum": 99999999.0`); write whole
    numbers as integers, so that clients and fuzzers see integer bounds of integer fields."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _NUMERIC_KEYWORDS and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                _integral_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _integral_bounds(item)


def _document_as_it_behaves(app: FastAPI) -> None:
    """FastAPI documents a 422 for request validation; this API answers those 400 in the
    one error shape (api/errors.py), so the 422s and their schemas leave the document. What
    the middleware and dependencies answer on any route (400, 413 and 415 for bodies, 429 for
    rate limits) is documented on every route they apply to. Integer bounds are written as
    integers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        error = {"$ref": "#/components/schemas/ErrorResponse"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                found = operation.setdefault("responses", {})
                found.pop("422", None)
                # api/limits.py refuses bodies on every route: too large, not UTF-8, too deep,
                # not JSON.
                codes = ["400", "413", "415"] if "requestBody" in operation else []
                # api/deps.py rate-limits every caller it authenticates by bearer key.
                if {"HTTPBearer": []} in operation.get("security", []):
                    codes.append("429")
                for code in codes:
                    if code not in found:
                        documented = errors.responses(int(code))[int(code)]
                        found[code] = {
                            "description": documented["description"],
                            "content": {"application/json": {"schema": error}},
                            **(
                                {"headers": documented["headers"]}
                                if "headers" in documented
                                else {}
                            ),
                        }
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _integral_bounds(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


API_DB_WAIT_SECONDS = 5.0
# Every API connection's session: a statement waits at most this long for a row lock (a
# duplicate request whose first is still running gets `idempotency_key_busy`, any other a
# 503 to retry: a request never hangs on a lock), and a transaction left idle this long —
# its API process died mid-request, out of the database's sight — is ended, releasing
# what it held (an Idempotency-Key, a payment row).
API_SESSION = {"lock_timeout": "3s", "idle_in_transaction_session_timeout": "30s"}


def _stop_waiting_on_signals(app: FastAPI) -> Callable[[], None]:
    """On SIGTERM or SIGINT, before the server's own handler (uvicorn's, which then waits
    for every open request to end), the long-polls answer at once with the payment as it is:
    one would otherwise hold the shutdown for up to its timeout (60 s), past a process
    manager's kill timeout. Returns what puts the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()

    def stop() -> None:
        app.state.stopping = True
        found = getattr(app.state, "status_hub", None)
        if found is not None:
            found.stop()

    chained: dict[signal.Signals, Callable[..., Any]] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(stop)
            previous(signum, frame)

        chained[sig] = previous
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, previous in chained.items():
            signal.signal(sig, previous)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_pool(
            settings.resolved_database_url(),
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            name="api",
            # A request waits this long for a connection, then gets a 503 with Retry-After
            # (api/errors.py), rather than hanging while the database is away.
            timeout=API_DB_WAIT_SECONDS,
            session=API_SESSION,
        ) as pool:
            app.state.pool = pool
            pruner = asyncio.create_task(prune_idempotency_keys(pool, settings))
            restore_signals = _stop_waiting_on_signals(app)
            try:
                yield
            finally:
                restore_signals()
                pruner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruner
                status_hub = getattr(app.state, "status_hub", None)
                if status_hub is not None:
                    await status_hub.close()

    app = FastAPI(
        title="agentpay",
        version="0.1.0",
        description="Payments for AI agents: record and enqueue over HTTP; workers do the rest.",
        lifespan=lifespan,
        # A body sent without a Content-Type is read as JSON (agents post `json.dumps(...)`
        # as bytes with no type). FastAPI's strict default guards a server that
        # trusts its network against a browser's cross-site request without credentials;
        # every route here that acts needs a Bearer key (HTTP Basic only reads; webhooks need
        # the provider's signature), which no such request carries. A body of another type
        # is a 415 (api/limits.py).
        strict_content_type=False,
        # `/v1/payments/` is a 404 in the one error shape, not a redirect a client would
        # follow with its POST resent (or turned into a GET).
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics_cache = metrics.ScrapeCache()
    app.state.invalid_keys = ratelimit.InvalidKeys(
        settings.api_invalid_keys_per_second, settings.api_invalid_keys_burst
    )
    errors.install(app)
    idempotency.install(app)
    app.add_middleware(
        BodyLimits,
        max_body_bytes=settings.api_max_body_bytes,
        webhook_max_body_bytes=settings.webhook_max_body_bytes,
        max_depth=settings.api_max_json_depth,
    )
    _document_as_it_behaves(app)
    app.include_router(health.router)
    app.include_router(payments.router)
    app.include_router(actions.router)
    app.include_router(webhooks.router)
    app.include_router(ledger.router)
    app.include_router(prices.router)
    app.include_router(review.router)
    app.include_router(agents_routes.router)
    app.include_router(metrics.router)
    app.include_router(ops.router)
    return app
