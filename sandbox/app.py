"""The sandbox ASGI app: Stripe's ``/v1`` wire protocol plus the ``/_sandbox`` control API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from sandbox.control import control_routes
from sandbox.pipeline import DROP_CONNECTION_HEADER
from sandbox.routes import v1_routes
from sandbox.state import SandboxState, dumps

__all__ = ["SandboxApp", "create_app"]

_DROP = DROP_CONNECTION_HEADER.encode("latin-1")
_LOST_BODY = dumps(
    {
        "error": {
            "message": "The response was lost (injected by the sandbox); "
            "the request may have succeeded.",
            "type": "api_error",
        }
    }
).encode()


def _transport_of(send: Send) -> asyncio.BaseTransport | None:
    """The connection's transport behind uvicorn's ``send`` (a bound method of its cycle)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


class SandboxApp(Starlette):
    """Starlette, plus: responses marked as lost become a dropped connection.

    The pipeline marks a response with ``x-sandbox-drop-connection``; here, where the server's
    own ``send`` is still at hand, the connection is closed before a single response byte is
    written, exactly what a client sees when a response is lost. Under a server whose transport
    cannot be reached (e.g. an in-process ASGI test client) a 500 ``api_error`` is sent instead.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        self.state.sandbox.webhooks.attach(asyncio.get_running_loop())
        dropped = False

        async def guarded_send(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            if message["type"] == "http.response.start" and any(
                name == _DROP for name, _ in message.get("headers", [])
            ):
                dropped = True
                transport = _transport_of(send)
                if transport is not None:
                    transport.close()
                    await asyncio.sleep(0)  # let the server see the connection is gone
                    return
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_LOST_BODY)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _LOST_BODY})
                return
            await send(message)

        await super().__call__(scope, receive, guarded_send)


def create_app(
    *,
    webhook_secret: str | None = None,
    webhook_endpoints: list[str] | None = None,
) -> SandboxApp:
    """A fresh sandbox with its own in-memory state at ``app.state.sandbox``.

    ``webhook_endpoints`` receive every event signed with ``webhook_secret`` (a random
    ``whsec_...`` when None; read it back from ``app.state.sandbox.webhook_secret``).
    """
    state = SandboxState(webhook_secret=webhook_secret, webhook_endpoints=webhook_endpoints)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.webhooks.attach(asyncio.get_running_loop())
        try:
            yield
        finally:
            await state.webhooks.aclose()

    app = SandboxApp(routes=[*v1_routes(), *control_routes()], lifespan=lifespan)
    app.state.sandbox = state
    return app
