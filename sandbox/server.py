"""Run the sandbox: in a background thread (tests, the dev stack) or in the foreground (CLI)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn

from sandbox.app import SandboxApp, create_app
from sandbox.state import SandboxState

__all__ = ["SandboxServer", "serve"]


def _config(
    app: SandboxApp, log_level: str, host: str = "127.0.0.1", port: int = 0
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",  # the lost-response fault relies on the h11 protocol's transport
        loop="asyncio",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
    )


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _NotifyingServer(uvicorn.Server):
    """A uvicorn server that tells a waiting thread when it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._ready.set()


class SandboxServer:
    """The sandbox served by uvicorn on a background thread.

    ``port=0`` binds a free port; ``base_url`` reports the real one. ``start()`` returns once
    the server accepts connections; ``stop_webhooks()`` stops webhook delivery alone;
    ``stop()`` shuts it down. Also a context manager.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_secret: str | None = None,
        webhook_endpoints: list[str] | None = None,
        *,
        log_level: str = "warning",
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.app = create_app(webhook_secret=webhook_secret, webhook_endpoints=webhook_endpoints)
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._server: _NotifyingServer | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def state(self) -> SandboxState:
        state: SandboxState = self.app.state.sandbox
        return state

    @property
    def base_url(self) -> str:
        if self._socket is None:
            raise RuntimeError("the sandbox server is not running")
        return _url(self.host, self.port)

    @property
    def webhook_secret(self) -> str:
        return self.state.webhook_secret

    def start(self) -> SandboxServer:
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._socket = sock
        ready = threading.Event()
        self._server = _NotifyingServer(_config(self.app, self._log_level), ready)

        def run() -> None:
            assert self._server is not None
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # SystemExit from a failed startup included
                self._error = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"sandbox:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(self._startup_timeout) or not self._server.started:
            self.stop()
            raise RuntimeError(f"the sandbox server did not start: {self._error!r}")
        return self

    def stop_webhooks(self) -> int:
        """Stop sending webhooks (before the endpoints they go to stop): queued and retrying
        deliveries are dropped quietly; the server answers requests as before until `stop`.
        Returns how many deliveries were dropped."""
        return self.state.webhooks.close_delivery()

    def stop(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    host: str,
    port: int,
    webhook_secret: str | None,
    webhook_endpoints: list[str],
) -> None:
    """Serve the sandbox in the foreground; returns after SIGINT/SIGTERM and a clean shutdown."""
    app = create_app(webhook_secret=webhook_secret, webhook_endpoints=webhook_endpoints)
    state: SandboxState = app.state.sandbox
    config = _config(app, "info", host, port)
    logging.getLogger("uvicorn.error").info(
        "sandbox provider on %s (webhook secret %s, endpoints %s)",
        _url(host, port),
        state.webhook_secret,
        webhook_endpoints or "none",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place that ends the call instead of the process (or a KeyboardInterrupt).
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
