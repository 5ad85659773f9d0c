"""Load generators: closed loop (as fast as the API answers) and paced (open loop at a fixed
rate, latency counted from when each request was due, so a slow answer is not hidden by the
requests it delayed)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field

from bench.http import Connection, HttpError


@dataclass
class Sent:
    """What a load run sent: the payments created, when each POST started (wall clock), and
    each request's latency in seconds."""

    ids: list[str] = field(default_factory=list)
    started_at: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    elapsed: float = 0.0


def _payment(n: int) -> dict[str, object]:
    return {"amount": 1000 + n % 9000, "currency": "usd", "payment_method": "pm_card_visa"}


async def _post(conn: Connection, n: int, sent: Sent, due: float | None = None) -> None:
    wall = time.time()
    start = time.perf_counter()
    try:
        status, body = await conn.request(
            "POST", "/v1/payments", _payment(n), {"Idempotency-Key": uuid.uuid4().hex}
        )
    except HttpError as exc:
        sent.errors += 1
        sent.first_error = sent.first_error or str(exc)
        return
    end = time.perf_counter()
    if status != 202:
        sent.errors += 1
        sent.first_error = sent.first_error or f"{status}: {body[:300]!r}"
        return
    payment_id = json.loads(body)["id"]
    sent.ids.append(payment_id)
    sent.started_at[payment_id] = wall
    sent.latencies.append(end - (start if due is None else due))


async def closed_loop(
    api_url: str,
    keys: list[str],
    *,
    clients: int,
    count: int | None = None,
    seconds: float | None = None,
) -> Sent:
    """`clients` connections, client i as agent `keys[i % len(keys)]`, each POST one payment
    after another, until `count` payments were sent in all or `seconds` have passed."""
    sent = Sent()
    numbers = itertools.count()
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else float("inf")

    async def client(key: str) -> None:
        conn = Connection(api_url, {"Authorization": f"Bearer {key}"})
        try:
            while time.perf_counter() < deadline:
                n = next(numbers)
                if count is not None and n >= count:
                    return
                await _post(conn, n, sent)
        finally:
            await conn.close()

    await asyncio.gather(*(client(keys[i % len(keys)]) for i in range(clients)))
    sent.elapsed = time.perf_counter() - started
    return sent


async def paced(
    api_url: str, keys: list[str], *, rate: float, seconds: float, connections: int
) -> Sent:
    """One POST every 1/rate seconds for `seconds`, each on a free connection of a pool of
    `connections` (connection i as agent `keys[i % len(keys)]`); a request's latency runs
    from when it was due."""
    sent = Sent()
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for i in range(connections):
        key = keys[i % len(keys)]
        pool.put_nowait(Connection(api_url, {"Authorization": f"Bearer {key}"}))

    async def one(n: int, due: float) -> None:
        conn = await pool.get()
        try:
            await _post(conn, n, sent, due)
        finally:
            pool.put_nowait(conn)

    started = time.perf_counter()
    total = max(1, round(rate * seconds))
    tasks = []
    for n in range(total):
        due = started + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n, due)))
    await asyncio.gather(*tasks)
    sent.elapsed = time.perf_counter() - started
    while not pool.empty():
        await pool.get_nowait().close()
    return sent
