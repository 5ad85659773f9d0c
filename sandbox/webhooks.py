"""Webhook signing and delivery, the way Stripe does both.

Each event is POSTed to every endpoint that wants its type, as the exact JSON that
``GET /v1/events/{id}`` returns, signed with ``Stripe-Signature: t=<unix>,v1=<hex>`` where the
hex is ``HMAC-SHA256(secret, f"{t}.{body}")``. Delivery runs on the server's event loop, never
inside the API request. Failed attempts (non-2xx or network error) are retried with exponential
backoff up to ``max_attempts``. ``duplicates`` sends every event N times; ``shuffle`` holds
deliveries for ``shuffle_window_ms`` and sends each batch in a permuted (never the original)
order, so consumers see events out of order. ``close_delivery`` stops all of it (queued and
retrying deliveries are dropped, without a warning each) for a server whose consumer is
going away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
import random
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import aiohttp

from sandbox.ids import new_id, random_token

__all__ = [
    "WebhookConfig",
    "WebhookDispatcher",
    "WebhookEndpoint",
    "new_webhook_secret",
    "sign_payload",
]

log = logging.getLogger("sandbox.webhooks")


def new_webhook_secret() -> str:
    return f"whsec_{random_token(32)}"


def sign_payload(payload: str, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode("utf-8"), f"{t}.{payload}".encode(), hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


@dataclass(frozen=True)
class WebhookEndpoint:
    id: str
    url: str
    secret: str
    enabled_events: tuple[str, ...] = ("*",)

    def wants(self, event_type: str) -> bool:
        for pattern in self.enabled_events:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "secret": self.secret,
            "enabled_events": list(self.enabled_events),
        }


@dataclass(frozen=True)
class WebhookConfig:
    duplicates: int = 1
    shuffle: bool = False
    shuffle_window_ms: int = 100
    max_attempts: int = 4
    retry_backoff_ms: int = 200
    timeout_ms: int = 5000
    concurrency: int = 1
    seed: int | None = None

    def updated(self, data: Mapping[str, Any]) -> WebhookConfig:
        """A copy with the settings in ``data`` changed; raises ValueError on bad input."""
        known = set(asdict(self))
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown webhook settings: {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        for name, value in data.items():
            if name == "shuffle":
                if not isinstance(value, bool):
                    raise ValueError("shuffle must be true or false")
            elif name == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError("seed must be an integer or null")
            else:
                minimum = 0 if name in ("shuffle_window_ms", "retry_backoff_ms") else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    raise ValueError(f"{name} must be an integer >= {minimum}")
            changes[name] = value
        return replace(self, **changes)


@dataclass
class _Job:
    endpoint: WebhookEndpoint
    event_id: str
    event_type: str
    body: str
    copy: int
    generation: int
    attempt: int = 1


class _Lane:
    """One endpoint's queue, drained in order by one feeder task.

    The feeder starts deliveries in queue order (or in a permuted batch order when shuffling),
    with at most ``concurrency`` attempts in flight; with ``concurrency`` 1 they also arrive
    in that order.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.feeder: asyncio.Task[None] | None = None
        self.limit = 0
        self.slots = asyncio.Semaphore(1)


class WebhookDispatcher:
    def __init__(self, default_secret: str, urls: list[str]) -> None:
        self.default_secret = default_secret
        self._initial_urls = list(urls)
        self._lock = threading.Lock()
        self._endpoints: dict[str, WebhookEndpoint] = {}
        self._config = WebhookConfig()
        self._rng = random.Random()
        self._deliveries: list[dict[str, Any]] = []
        self._pending = 0
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: list[_Job] = []
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None
        self._closed = False  # by close_delivery, until aclose or attached to another loop
        for url in urls:
            self.add_endpoint(url)

    # --- endpoints and settings (any thread) ---------------------------------------------

    def add_endpoint(
        self, url: str, secret: str | None = None, enabled_events: list[str] | None = None
    ) -> WebhookEndpoint:
        endpoint = WebhookEndpoint(
            id=new_id("we"),
            url=url,
            secret=secret or self.default_secret,
            enabled_events=tuple(enabled_events) if enabled_events else ("*",),
        )
        with self._lock:
            self._endpoints[endpoint.id] = endpoint
        return endpoint

    def remove_endpoint(self, endpoint_id: str) -> bool:
        with self._lock:
            return self._endpoints.pop(endpoint_id, None) is not None

    def endpoints(self) -> list[WebhookEndpoint]:
        with self._lock:
            return list(self._endpoints.values())

    @property
    def config(self) -> WebhookConfig:
        with self._lock:
            return self._config

    def configure(self, data: Mapping[str, Any]) -> WebhookConfig:
        with self._lock:
            self._config = self._config.updated(data)
            if "seed" in data:
                self._rng = random.Random(self._config.seed)
            return self._config

    def deliveries(self, event_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                dict(d) for d in self._deliveries if event_id is None or d["event_id"] == event_id
            ]

    def pending(self) -> int:
        with self._lock:
            return self._pending

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "endpoints": len(self._endpoints),
                "attempts": len(self._deliveries),
                "succeeded": sum(1 for d in self._deliveries if d["ok"]),
                "failed_attempts": sum(1 for d in self._deliveries if not d["ok"]),
                "pending": self._pending,
            }

    def reset(self) -> None:
        """Forget deliveries and queued work; endpoints and settings go back to the initial ones."""
        with self._lock:
            self._generation += 1
            self._pending = 0
            self._deliveries.clear()
            self._backlog.clear()
            self._config = WebhookConfig()
            self._rng = random.Random()
            self._endpoints.clear()
        for url in self._initial_urls:
            self.add_endpoint(url)

    # --- event intake (any thread) -------------------------------------------------------

    def notify(self, event_id: str, event_type: str, body: str) -> None:
        """Queue ``body`` for every endpoint that wants ``event_type``; returns at once."""
        with self._lock:
            jobs = [
                _Job(endpoint, event_id, event_type, body, copy, self._generation)
                for endpoint in self._endpoints.values()
                if endpoint.wants(event_type)
                for copy in range(1, self._config.duplicates + 1)
            ]
            if self._closed:
                return
            self._pending += len(jobs)
            loop = self._loop
            if loop is None:
                self._backlog.extend(jobs)
                return
        if not jobs:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._enqueue(jobs)
        else:
            loop.call_soon_threadsafe(self._enqueue, jobs)

    # --- the delivery machinery (event loop only) ----------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the loop deliveries run on (the server's); flushes events queued before."""
        with self._lock:
            if self._loop is loop:
                return
            self._loop = loop
            self._closed = False
            backlog, self._backlog = self._backlog, []
            self._lanes = {}
            self._client = None
        if backlog:
            loop.call_soon_threadsafe(self._enqueue, backlog)

    def close_delivery(self, timeout: float = 5.0) -> int:
        """Stop delivering, from any thread: what is queued, waiting for a retry or being sent
        is dropped (no warning each; one info line says how many) and events from now on
        are not sent, until `aclose` or attached to another loop. For a server whose
        endpoints are about to go away (the dev stack's API as it stops): retries to them
        would only fail, then give up, each with a warning. Returns the deliveries dropped."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            dropped, self._pending = self._pending, 0
            self._generation += 1  # an attempt that still ends records nothing, retries nothing
            self._backlog.clear()
            loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                loop.create_task(self._cancel_deliveries())
            else:
                with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
                    asyncio.run_coroutine_threadsafe(self._cancel_deliveries(), loop).result(
                        timeout
                    )
        if dropped:
            log.info("webhook delivery closed: %d queued or retrying deliveries dropped", dropped)
        return dropped

    async def _cancel_deliveries(self) -> None:
        tasks = list(self._tasks)
        tasks.extend(lane.feeder for lane in self._lanes.values() if lane.feeder is not None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lanes.clear()

    async def aclose(self) -> None:
        await self._cancel_deliveries()
        self._tasks.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None
        with self._lock:
            self._loop = None
            self._closed = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _enqueue(self, jobs: list[_Job]) -> None:
        for job in jobs:
            lane = self._lanes.get(job.endpoint.id)
            if lane is None:
                lane = self._lanes[job.endpoint.id] = _Lane()
            if lane.feeder is None:
                lane.feeder = asyncio.get_running_loop().create_task(self._feed(lane))
            lane.queue.put_nowait(job)

    async def _feed(self, lane: _Lane) -> None:
        while True:
            batch = [await lane.queue.get()]
            config = self.config
            if config.shuffle:
                await asyncio.sleep(config.shuffle_window_ms / 1000)
                while not lane.queue.empty():
                    batch.append(lane.queue.get_nowait())
                self._permute(batch)
            for job in batch:
                if lane.limit != self.config.concurrency:
                    lane.limit = self.config.concurrency
                    lane.slots = asyncio.Semaphore(lane.limit)
                slots = lane.slots
                await slots.acquire()
                self._spawn(self._first_attempt(job, slots))

    async def _first_attempt(self, job: _Job, slots: asyncio.Semaphore) -> None:
        try:
            await self._attempt(job)
        finally:
            slots.release()

    def _permute(self, batch: list[_Job]) -> None:
        if len(batch) < 2:
            return
        original = list(batch)
        with self._lock:
            self._rng.shuffle(batch)
        if batch == original:  # out of order means out of order: never the identity
            batch.append(batch.pop(0))

    def _current(self, job: _Job) -> bool:
        with self._lock:
            return job.generation == self._generation and job.endpoint.id in self._endpoints

    def _finish(self, job: _Job) -> None:
        with self._lock:
            if job.generation == self._generation:
                self._pending -= 1

    async def _attempt(self, job: _Job) -> None:
        if not self._current(job):
            self._finish(job)
            return
        config = self.config
        if self._client is None:
            # aiohttp: about a third of httpx's CPU per request, and the sandbox shares the
            # machine with what it serves.
            self._client = aiohttp.ClientSession()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": sign_payload(job.body, job.endpoint.secret),
        }
        status: int | None = None
        error: str | None = None
        try:
            async with self._client.post(
                job.endpoint.url,
                data=job.body.encode("utf-8"),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=config.timeout_ms / 1000),
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = status is not None and 200 <= status < 300
        with self._lock:
            if job.generation == self._generation:
                self._deliveries.append(
                    {
                        "id": new_id("whd"),
                        "event_id": job.event_id,
                        "event_type": job.event_type,
                        "endpoint_id": job.endpoint.id,
                        "url": job.endpoint.url,
                        "copy": job.copy,
                        "attempt": job.attempt,
                        "status_code": status,
                        "ok": ok,
                        "error": error,
                        "delivered_at": time.time(),
                    }
                )
        with self._lock:
            closed = self._closed
        if closed:  # dropped by close_delivery, which counted it
            return
        if ok or job.attempt >= config.max_attempts:
            if not ok:
                log.warning("giving up on %s to %s", job.event_id, job.endpoint.url)
            self._finish(job)
            return
        delay = config.retry_backoff_ms / 1000 * 2 ** (job.attempt - 1)
        self._spawn(self._retry(replace(job, attempt=job.attempt + 1), delay))

    async def _retry(self, job: _Job, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._attempt(job)
