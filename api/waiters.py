"""Long-poll wake-ups: one LISTEN connection per API process, fanned out to every waiter.

A trigger (schema/migrations/0003_api.sql) NOTIFYs `agentpay_payment_status` with
`{"id", "status"}` whenever a payment's status changes, at commit. `StatusHub` holds one
dedicated connection (not from the pool) listening on that channel and sets the event of
every request waiting on that payment; the request then re-reads the payment. Nothing is
lost if a notification is: each waiter also re-reads every `recheck` seconds, and all are
woken whenever the listener (re)connects (not when it loses its connection: the database is
likely away then, and a re-read would only fail). `stop()`, as the API process stops, wakes
every waiter for good: each answers with the payment as it is, instead of holding the
shutdown for up to its whole timeout.

The listener starts with the first waiter. When its connection fails it reconnects with
backoff while anyone waits, and stops when no one does (the next waiter starts it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator

import psycopg

from tasks.db import SESSION_TIMEZONE

log = logging.getLogger("agentpay.api")

CHANNEL = "agentpay_payment_status"


class StatusHub:
    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._per_owner: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.stopping = False

    @contextlib.contextmanager
    def watch(self, payment_id: str, *, owner: str = "") -> Iterator[asyncio.Event]:
        """An event set whenever `payment_id` changes status (or might have), for `owner`
        (an agent: `waits_of` counts them)."""
        self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        event = asyncio.Event()
        self._waiters.setdefault(payment_id, set()).add(event)
        self._ensure_running()
        try:
            yield event
        finally:
            waiters = self._waiters.get(payment_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[payment_id]
            left = self._per_owner[owner] - 1
            if left:
                self._per_owner[owner] = left
            else:
                del self._per_owner[owner]

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def waits_of(self, owner: str) -> int:
        """How many waits `owner` holds open."""
        return self._per_owner.get(owner, 0)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="listen")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.listening.clear()

    def stop(self) -> None:
        """The process stops: every waiter, now and later, answers at once."""
        self.stopping = True
        self._wake_all()

    def _wake(self, payment_id: str) -> None:
        for event in self._waiters.get(payment_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    def _dispatch(self, payload: str) -> None:
        try:
            payment_id = json.loads(payload)["id"]
        except (ValueError, KeyError, TypeError):
            log.warning("unexpected payload on %s: %r", CHANNEL, payload[:200])
            return
        self._wake(payment_id)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, application_name="agentpay-api-listen"
                )
                async with conn:
                    # As every connection of ours (tasks.db.make_pool).
                    await conn.execute(
                        "SELECT set_config('TimeZone', %s, false)", (SESSION_TIMEZONE,)
                    )
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    # Whatever changed while no one listened: every waiter looks again.
                    self._wake_all()
                    backoff = 0.1
                    async for notify in conn.notifies():
                        self._dispatch(notify.payload)
            except psycopg.Error as error:
                log.warning("status listener lost its connection: %s", error)
            self.listening.clear()
            if not self._waiters:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
