"""api/client.py: one idempotency key per logical request, retries with backoff that honour
Retry-After, typed answers — against the API in-process and over real HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
import uvicorn

from api.app import create_app
from api.client import AgentPay, AgentPayConnectionError, AgentPayError, AsyncAgentPay, Payment
from tasks import agents
from tasks.db import Pool
from tasks.settings import Settings


class DropFirstResponse(httpx.AsyncBaseTransport):
    """Performs every request, but loses the response of the first `drops` POSTs: the
    server acted, the client saw a broken connection."""

    def __init__(self, inner: httpx.AsyncBaseTransport, drops: int = 1) -> None:
        self.inner = inner
        self.drops = drops
        self.keys: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("Idempotency-Key"))
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if request.method == "POST" and self.drops > 0:
            self.drops -= 1
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


async def count_payments(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM payment_jobs")
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


@pytest.fixture
async def asgi(settings: Settings, pool: Pool) -> httpx.ASGITransport:
    app = create_app(settings)
    app.state.pool = pool
    return httpx.ASGITransport(app=app, raise_app_exceptions=False)


async def test_a_dropped_response_is_retried_with_the_same_key_and_pays_once(
    asgi: httpx.ASGITransport, agent_key: str, pool: Pool
) -> None:
    transport = DropFirstResponse(asgi, drops=2)
    delays: list[float] = []

    async def no_sleep(seconds: float) -> None:
        delays.append(seconds)

    async with AsyncAgentPay(
        "http://agentpay.test", agent_key, transport=transport, sleep=no_sleep
    ) as client:
        payment = await client.create_payment(
            amount=4200, currency="eur", payment_method="pm_card_visa", metadata={"o": "1"}
        )
        assert isinstance(payment, Payment)
        assert payment.status == "received" and payment.currency == "eur"
        assert payment.metadata == {"o": "1"}
        # A second logical request gets a key of its own.
        second = await client.create_payment(
            amount=4300, currency="eur", payment_method="pm_card_visa"
        )
    assert len(transport.keys) == 4 and len(delays) == 2
    assert transport.keys[0] == transport.keys[1] == transport.keys[2]
    assert transport.keys[3] not in (None, transport.keys[0])
    assert await count_payments(pool) == 2
    assert second.id != payment.id


async def test_retries_429_and_5xx_honouring_retry_after() -> None:
    answers = [
        httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {}}),
        httpx.Response(503, json={"error": {}}),
        httpx.Response(
            200,
            json={
                "object": "list",
                "data": [],
                "has_more": False,
                "url": "/v1/payments",
            },
        ),
    ]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1]

    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    async with AsyncAgentPay(
        "http://x", "apk_k", transport=httpx.MockTransport(handler), sleep=record
    ) as client:
        page = await client.list_payments()
    assert page.data == [] and len(seen) == 3
    assert delays[0] >= 3  # Retry-After wins over a shorter backoff
    assert 0 <= delays[1] <= client.backoff * 2


async def test_a_busy_key_is_retried_and_a_reused_key_is_not() -> None:
    """409 with Retry-After (the same key in progress elsewhere) is sent again with the same
    key; a 409 without it (the key reused for another request) is the caller's to fix."""
    error = {"type": "idempotency_error", "param": "Idempotency-Key", "message": "m"}
    listed = {"object": "list", "data": [], "has_more": False, "url": "/v1/payments"}
    for first, retried in (
        (
            httpx.Response(
                409,
                headers={"Retry-After": "0"},
                json={"error": {**error, "code": "idempotency_key_busy"}},
            ),
            True,
        ),
        (httpx.Response(409, json={"error": {**error, "code": "idempotency_key_reused"}}), False),
    ):
        seen: list[httpx.Request] = []

        def handler(
            request: httpx.Request, first: httpx.Response = first, seen: list[httpx.Request] = seen
        ) -> httpx.Response:
            seen.append(request)
            return first if len(seen) == 1 else httpx.Response(200, json=listed)

        async def no_wait(seconds: float) -> None:
            return None

        async with AsyncAgentPay(
            "http://x", "apk_k", transport=httpx.MockTransport(handler), sleep=no_wait
        ) as client:
            if retried:
                assert (await client.list_payments()).data == []
            else:
                with pytest.raises(AgentPayError):
                    await client.list_payments()
        assert len(seen) == (2 if retried else 1)


async def test_an_id_stays_one_path_segment() -> None:
    """An id an agent made up ("../agents", "x?y") names no other route."""
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(
            404,
            json={
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "message": "No such payment",
                    "param": "id",
                }
            },
        )

    async with AsyncAgentPay(
        "http://x", "apk_k", transport=httpx.MockTransport(handler), max_retries=0
    ) as client:
        for made_up in ("../agents", "x?y", "a/b#c"):
            with pytest.raises(AgentPayError):
                await client.get_payment(made_up)
    assert seen == [
        b"/v1/payments/..%2Fagents",
        b"/v1/payments/x%3Fy",
        b"/v1/payments/a%2Fb%23c",
    ]


async def test_a_naive_datetime_filters_by_local_time_not_utc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`datetime(2025, 1, 15, 12)` went out without an offset, which the API reads as UTC:
    in New York the window was five hours off. A naive datetime is local time, as Python takes
    it; an aware one keeps its moment."""
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        body = {"object": "list", "data": [], "has_more": False, "url": "/v1/payments"}
        return httpx.Response(200, json=body)

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        async with AsyncAgentPay(
            "http://x", "apk_k", transport=httpx.MockTransport(handler), max_retries=0
        ) as client:
            await client.list_payments(
                created_gte=datetime(2025, 1, 15, 12),
                created_lte=datetime(2025, 1, 15, 12, tzinfo=UTC),
            )
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert seen[0].params["created[gte]"] == "2025-01-15T17:00:00+00:00"
    assert seen[0].params["created[lte]"] == "2025-01-15T12:00:00+00:00"


async def test_gives_up_after_max_retries_and_does_not_retry_4xx() -> None:
    calls = 0

    def failing(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(
            500,
            json={"error": {"type": "api_error", "code": "boom", "message": "x", "param": None}},
        )

    async def no_sleep(_: float) -> None:
        return None

    async with AsyncAgentPay(
        "http://x", "k", transport=httpx.MockTransport(failing), sleep=no_sleep, max_retries=2
    ) as client:
        with pytest.raises(AgentPayError) as raised:
            await client.get_payment("pay_1")
    assert calls == 3 and raised.value.status == 500 and raised.value.code == "boom"

    calls = 0

    def refusing(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(
            400,
            json={
                "error": {
                    "type": "invalid_request_error",
                    "code": "parameter_invalid",
                    "message": "amount: bad",
                    "param": "amount",
                }
            },
        )

    async with AsyncAgentPay(
        "http://x", "k", transport=httpx.MockTransport(refusing), sleep=no_sleep
    ) as client:
        with pytest.raises(AgentPayError) as raised:
            await client.create_payment(amount=0, currency="usd", payment_method="pm_card_visa")
    assert calls == 1 and raised.value.param == "amount"

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with AsyncAgentPay(
        "http://x", "k", transport=httpx.MockTransport(unreachable), sleep=no_sleep, max_retries=1
    ) as client:
        with pytest.raises(AgentPayConnectionError):
            await client.get_payment("pay_1")


async def test_a_request_given_up_on_tells_the_key_to_send_it_again_with(
    asgi: httpx.ASGITransport, agent_key: str, pool: Pool
) -> None:
    """Every answer lost, retries spent: the payment was made, the agent cannot know. The
    error carries the key the client made for the POST; the same request sent again with it
    is the same payment, not a second one. A 5xx carries its key too."""
    transport = DropFirstResponse(asgi, drops=3)

    async def no_sleep(_: float) -> None:
        return None

    async with AsyncAgentPay(
        "http://agentpay.test", agent_key, transport=transport, sleep=no_sleep, max_retries=2
    ) as client:
        with pytest.raises(AgentPayConnectionError) as lost:
            await client.create_payment(amount=500, currency="usd", payment_method="pm_card_visa")
        key = lost.value.idempotency_key
        assert key is not None and set(transport.keys) == {key}
        again = await client.create_payment(
            amount=500, currency="usd", payment_method="pm_card_visa", idempotency_key=key
        )
    assert await count_payments(pool) == 1
    assert again.status == "received"

    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            500,
            json={"error": {"type": "api_error", "code": "boom", "message": "x", "param": None}},
        )

    async with AsyncAgentPay(
        "http://x", "k", transport=httpx.MockTransport(failing), max_retries=0
    ) as client:
        with pytest.raises(AgentPayError) as raised:
            await client.create_payment(
                amount=500, currency="usd", payment_method="pm_card_visa", idempotency_key="k-1"
            )
    assert raised.value.idempotency_key == "k-1"


async def test_a_wait_takes_one_state_as_a_string_and_refuses_none_at_all(
    asgi: httpx.ASGITransport, agent_key: str, pool: Pool
) -> None:
    """`status="reconciled"` is one state (it was sent as its letters, a 400); an empty
    collection is refused at once (it was sent as none, the server's default answered at
    once and never matched: the client polled until its timeout)."""
    async with AsyncAgentPay("http://agentpay.test", agent_key, transport=asgi) as client:
        created = await client.create_payment(
            amount=500, currency="usd", payment_method="pm_card_visa"
        )
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE payment_jobs SET status = 'canceled' WHERE id = %s", (created.id,)
            )
        payment = await client.wait_for_payment(created.id, status="canceled", timeout=5)
        assert payment.status == "canceled"
        with pytest.raises(ValueError, match="at least one state"):
            await client.wait_for_payment(created.id, status=[], timeout=5)


async def test_the_client_reads_a_payments_events_and_refunds(
    asgi: httpx.ASGITransport, agent_key: str, pool: Pool
) -> None:
    async with AsyncAgentPay("http://agentpay.test", agent_key, transport=asgi) as client:
        created = await client.create_payment(
            amount=500, currency="usd", payment_method="pm_card_visa"
        )
        events = await client.list_events(created.id)
        assert [(e.type, e.to_status) for e in events] == [("created", "received")]
        assert await client.list_refunds(created.id) == []


@contextlib.contextmanager
def live_api(settings: Settings) -> Iterator[str]:
    """The API served by uvicorn on 127.0.0.1 (its own pool, lifespan and all) in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = 600  # 30 s
        while not server.started and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def make_agent(database_url: str, name: str) -> str:
    key = agents.new_key()
    with psycopg.connect(database_url) as conn:
        agent_id = f"agt_{name}"
        conn.execute("INSERT INTO agents (id, name) VALUES (%s, %s)", (agent_id, name))
        conn.execute(
            "INSERT INTO api_keys (key_hash, agent_id, prefix) VALUES (%s, %s, %s)",
            (agents.hash_key(key), agent_id, key[:10]),
        )
    return key


@pytest.fixture
def live(settings: Settings) -> Iterator[str]:
    with live_api(settings) as url:
        yield url


def test_sync_client_over_real_http(live: str, database_url: str) -> None:
    key = make_agent(database_url, "sync-agent")
    with AgentPay(live, key) as client:
        created = client.create_payment(
            amount=1000, currency="jpy", payment_method="pm_card_visa", idempotency_key="k-1"
        )
        again = client.create_payment(
            amount=1000, currency="jpy", payment_method="pm_card_visa", idempotency_key="k-1"
        )
        assert again == created
        assert client.get_payment(created.id) == created
        assert [p.id for p in client.list_payments().data] == [created.id]
        assert [p.id for p in client.iter_payments(page_size=1)] == [created.id]
        waited = client.wait_for_payment(created.id, timeout=0.2)
        assert waited.status == "received"
        canceled = client.cancel(created.id, reason="changed my mind")
        assert canceled.id == created.id
        assert client.wait_for_payment(created.id, timeout=10).status == "canceled"
        with pytest.raises(AgentPayError) as raised:
            client.get_payment("pay_000000000000000000000000")
        assert raised.value.status == 404 and raised.value.code == "resource_missing"
        # Real HTTP: an announced 10 MB body is refused without being read.
        response = httpx.post(
            f"{live}/v1/payments",
            content=b"x" * (10 * 1024 * 1024),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"


async def test_iter_payments_pages_towards_newer_payments_from_ending_before(
    asgi: httpx.ASGITransport, agent_key: str
) -> None:
    """`ending_before` (how docs/api.md says to follow new payments) gave one page and
    stopped: the next page was asked with both cursors, which is empty. It pages on towards
    the newest; `starting_after` pages on towards the oldest."""
    async with AsyncAgentPay("http://agentpay.test", agent_key, transport=asgi) as client:
        made = [
            await client.create_payment(
                amount=500 + n, currency="usd", payment_method="pm_card_visa"
            )
            for n in range(7)
        ]
        newer = [p.id async for p in client.iter_payments(page_size=2, ending_before=made[0].id)]
        older = [p.id async for p in client.iter_payments(page_size=2, starting_after=made[-1].id)]
        # `limit`, the page size of list_payments, is the page size here too (it was passed
        # twice: a TypeError)
        limited = [p.id async for p in client.iter_payments(limit=3, starting_after=made[-1].id)]
    assert limited == older
    assert len(newer) == len(set(newer)) == 6
    assert set(newer) == {p.id for p in made[1:]}
    assert older == [p.id for p in reversed(made[:-1])]


async def test_a_wait_asks_only_for_what_is_left_and_paces_early_answers(
    asgi: httpx.ASGITransport, agent_key: str
) -> None:
    """A long-poll retried after a lost connection asked the server for the whole timeout
    again (a 15 s wait returned after 28 s); each try now asks for what is left. A server
    that answers at once without the payment being there (an API process that is stopping)
    is not polled in a tight loop."""
    import asyncio
    import time

    async with AsyncAgentPay("http://agentpay.test", agent_key, transport=asgi) as client:
        created = await client.create_payment(
            amount=500, currency="usd", payment_method="pm_card_visa"
        )
        body = (await client.request("GET", f"/v1/payments/{created.id}")).content
    asked: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(float(request.url.params["timeout"]))
        if len(asked) == 1:
            await asyncio.sleep(0.4)  # time the failed try takes (not synchronisation)
            raise httpx.ConnectError("the API restarted", request=request)
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    async with AsyncAgentPay("http://x", "apk_k", transport=httpx.MockTransport(handler)) as client:
        started = time.monotonic()
        payment = await client.wait_for_payment(created.id, timeout=1.5, status="reconciled")
        took = time.monotonic() - started
    assert payment.status == "received"  # never reconciled: answered at the deadline
    assert asked[0] == 1.5 and asked[1] <= 1.1, asked
    assert len(asked) <= 5, asked  # paced (a tight loop made hundreds)
    assert took < 3, took


async def test_a_wait_for_succeeded_returns_on_a_payment_already_past_it() -> None:
    """`succeeded` lasts moments before reconcile moves the payment on: the client took a
    `reconciled` answer for "not yet" and polled until its timeout."""
    now = "2024-02-28T00:00:00Z"
    reconciled = {
        "id": "pay_1",
        "agent_id": "agt_1",
        "status": "reconciled",
        "currency": "usd",
        "amount_subtotal": 500,
        "amount_fee": 0,
        "amount_tax": 0,
        "amount_total": 500,
        "amount_refunded": 0,
        "capture_method": "automatic",
        "payment_method": "pm_card_visa",
        "provider_payment_id": "pi_1",
        "failure": None,
        "description": None,
        "metadata": {},
        "created_at": now,
        "updated_at": now,
    }
    polls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append(request)
        return httpx.Response(200, json=reconciled)

    transport = httpx.MockTransport(handler)
    async with AsyncAgentPay("http://x", "apk_k", transport=transport) as client:
        payment = await client.wait_for_payment("pay_1", timeout=5, status="succeeded")
    assert payment.status == "reconciled" and len(polls) == 1
    with AgentPay("http://x", "apk_k", transport=transport) as sync_client:
        payment = sync_client.wait_for_payment("pay_1", timeout=5, status=["succeeded"])
    assert payment.status == "reconciled" and len(polls) == 2


async def test_a_post_spelled_in_lowercase_still_carries_its_key() -> None:
    """`request("post", …)` went out as a POST without an Idempotency-Key and was retried:
    a deposit whose answer was lost could be made twice."""
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        return httpx.Response(503 if len(keys) == 1 else 200, json={})

    async def no_sleep(_: float) -> None:
        return None

    async with AsyncAgentPay(
        "http://x", "apk_k", transport=httpx.MockTransport(handler), sleep=no_sleep
    ) as client:
        await client.request("post", "/v1/agents/agt_x/deposits", json={"amount": 1})
    assert len(keys) == 2 and keys[0] is not None and keys[0] == keys[1]


def test_a_list_of_no_states_is_refused_not_sent_as_no_filter() -> None:
    """`status=[]` would send no `status` at all: every payment, not none."""
    from api.client import _list_params

    assert _list_params(10, None, None, ["failed", "canceled"], None, None)["status"] == [
        "failed",
        "canceled",
    ]
    with pytest.raises(ValueError, match="at least one state"):
        _list_params(10, None, None, [], None, None)
