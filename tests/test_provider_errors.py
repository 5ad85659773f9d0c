"""How provider errors are read: which refusals are about the payment (a recorded decline)
and which about us (our configuration: the payment waits and the sweep tries again); a
connection cut, or stalled, after the response's headers is an unknown outcome, retried
like any other; a card error's decline code is the one Stripe sends.

The errors are built by the SDK's own requestor from Stripe-shaped bodies, as it builds
them from a real answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from tasks import charge, payments, provider
from tasks.db import Pool
from tasks.settings import SANDBOX_API_KEY, Settings, get_settings
from tests.conftest import run_jobs
from tests.test_faults import drain, intents_of
from tests.test_pipeline import create, fetch
from workers.maintenance import sweep_stuck_payments


def sdk_error(status: int, error: dict[str, Any]) -> Any:
    """The exception the SDK raises for a v1 answer `status` with body {"error": error}."""
    from stripe._api_requestor import _APIRequestor

    body = {"error": error}
    return _APIRequestor._global_instance().specific_v1_api_error(
        json.dumps(body), status, body, {}, error
    )


# --- 1. an invalid request is a decline only when it is about the payment ------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        # STRIPE_API_BASE ending in /v1: every path is /v1/v1/…, no code.
        (
            404,
            {
                "type": "invalid_request_error",
                "message": "Unrecognized request URL (POST: /v1/v1/payment_intents).",
            },
        ),
        # A parameter this account or API version does not take.
        (
            400,
            {
                "type": "invalid_request_error",
                "code": "parameter_unknown",
                "param": "payment_method_types",
                "message": "Received unknown parameter: payment_method_types",
            },
        ),
        # Automatic payment methods turned on for the account: a return_url is wanted.
        (
            400,
            {
                "type": "invalid_request_error",
                "param": "return_url",
                "message": "This PaymentIntent is configured to accept payment methods ...",
            },
        ),
        # An intent of another account (the key was changed), on a write.
        (
            404,
            {
                "type": "invalid_request_error",
                "code": "resource_missing",
                "param": "intent",
                "message": "No such payment_intent: 'pi_123'",
            },
        ),
        # A payment method type not activated on the account.
        (
            400,
            {
                "type": "invalid_request_error",
                "code": "payment_method_unactivated",
                "message": "The payment method card is not activated for your account.",
            },
        ),
        # The agent's customer exists, in the other mode: the key is wrong, not the id.
        (
            400,
            {
                "type": "invalid_request_error",
                "code": "resource_missing",
                "param": "customer",
                "message": "No such customer: 'cus_1'; a similar object exists in live mode, "
                "but a test mode key was used to make this request.",
            },
        ),
    ],
    ids=[
        "unrecognized-url",
        "parameter-unknown",
        "return-url",
        "missing-intent",
        "unactivated",
        "other-mode",
    ],
)
def test_a_refusal_about_our_configuration_is_no_decline(
    status: int, error: dict[str, Any]
) -> None:
    translated = provider._translate(sdk_error(status, error))
    assert isinstance(translated, provider.ProviderError), translated
    assert not isinstance(translated, provider.Unknown)


@pytest.mark.parametrize(
    ("code", "param"),
    [
        ("payment_intent_unexpected_state", None),
        ("payment_intent_incompatible_payment_method", "payment_method"),
        ("amount_too_large", "amount"),
        ("amount_too_small", "amount"),
        ("charge_already_refunded", None),
        ("charge_already_captured", None),
        ("charge_expired_for_capture", None),
        ("charge_not_refundable", "payment_intent"),
        ("resource_missing", "payment_method"),
        ("resource_missing", "customer"),
        ("expired_card", None),
    ],
)
def test_a_refusal_about_the_payment_is_a_decline(code: str, param: str | None) -> None:
    error = {"type": "invalid_request_error", "code": code, "message": "refused"}
    if param:
        error["param"] = param
    translated = provider._translate(sdk_error(400, error))
    assert isinstance(translated, provider.Declined), translated
    assert translated.code == code


def test_a_refusal_of_the_payment_method_without_a_code_is_a_decline() -> None:
    """Refused for good, about the agent's payment method, with no code: a decline (as a
    ProviderError the payment waited in `charging` for ever, re-driven and refused again)."""
    error = {
        "type": "invalid_request_error",
        "param": "payment_method",
        "message": "The provided PaymentMethod was previously used with a PaymentIntent "
        "without Customer attachment ... may not be used again.",
    }
    translated = provider._translate(sdk_error(400, error))
    assert isinstance(translated, provider.Declined), translated
    assert translated.code == "invalid_request"


def test_every_payment_refusal_is_one_of_stripes_error_codes() -> None:
    """The allowlist names codes Stripe sends (a typo would silently never match)."""
    import typing

    from stripe._payment_intent import PaymentIntent

    def literals(hint: Any) -> set[str]:
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Literal:
            return set(args)
        return set().union(*(literals(arg) for arg in args))

    codes = literals(PaymentIntent.LastPaymentError.__annotations__["code"])
    assert len(codes) > 100
    assert provider.PAYMENT_REFUSALS <= codes, provider.PAYMENT_REFUSALS - codes


def test_a_refusal_carrying_the_payment_intent_is_a_decline() -> None:
    """Whatever its code: the provider says it is about this PaymentIntent."""
    error = {
        "type": "invalid_request_error",
        "code": "some_code_we_never_heard_of",
        "message": "refused",
        "payment_intent": {"id": "pi_1", "object": "payment_intent", "status": "succeeded"},
    }
    translated = provider._translate(sdk_error(400, error))
    assert isinstance(translated, provider.Declined)
    assert translated.code == "some_code_we_never_heard_of"


def test_a_read_refused_is_never_a_decline() -> None:
    error = {"type": "invalid_request_error", "code": "amount_too_large", "message": "refused"}
    assert isinstance(
        provider._translate(sdk_error(400, error), reading=True), provider.ProviderError
    )


@pytest.fixture
def misconfigured(monkeypatch: pytest.MonkeyPatch, provider_base: str) -> Callable[[], None]:
    """The provider's base address set with `/v1` at its end (settings refuse it now, so the
    client is built by hand): every call is answered 404 "Unrecognized request URL", as
    Stripe answers it. Returns the fix."""
    monkeypatch.setenv("AGENTPAY_PROVIDER_RECHECK_SECONDS", "0.1")
    get_settings.cache_clear()
    right = provider.client

    def wrong(settings: Settings | None = None) -> Any:
        s = settings or get_settings()
        return provider.connections.get(
            SANDBOX_API_KEY,
            f"{provider_base}/v1",
            s.provider_timeout_seconds,
            s.provider_max_network_retries,
        )

    monkeypatch.setattr(provider, "client", wrong)
    return lambda: monkeypatch.setattr(provider, "client", right)


async def test_a_misconfigured_provider_address_fails_no_payment(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    misconfigured: Callable[[], None],
) -> None:
    """The charge job fails and is recorded; the payment waits in `charging` with no failure
    (it used to end `failed`, `invalid_request`, for good). Once the address is fixed, the
    sweep drives it on and it is charged once."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    await run_jobs(pool, ("charge",))
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
        cur = await conn.execute(
            "SELECT status, attempts FROM procrastinate_jobs WHERE task_name = 'charge'"
        )
        assert await cur.fetchone() == {"status": "failed", "attempts": 1}
    assert payment is not None
    assert (payment["status"], payment["failure_code"]) == ("charging", None)
    assert intents_of(provider_base, created["id"]) == []

    misconfigured()  # the operator fixes STRIPE_API_BASE
    assert await sweep_stuck_payments(pool, older_than=0) == [created["id"]]
    await drain(pool)
    payment_now = await fetch(api, agent_key, created["id"])
    assert payment_now["status"] == "reconciled", payment_now
    [intent] = intents_of(provider_base, created["id"])
    assert intent["status"] == "succeeded"


async def test_a_misconfigured_provider_address_leaves_a_capture_to_be_asked_again(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A capture refused for a reason that is not the payment's: the job fails, the payment
    stays `authorized` with its capture still asked for (the sweep of requests re-drives
    it), and no `capture_failed` is recorded."""
    created = await create(api, agent_key, capture_method="manual")
    await run_jobs(pool)
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, created["id"])
        assert locked is not None and locked["status"] == "authorized"
        await charge.request_capture(conn, locked, actor="test")

    async def refused(*args: Any) -> provider.Intent:
        raise provider._translate(
            sdk_error(404, {"type": "invalid_request_error", "message": "Unrecognized URL"})
        )

    monkeypatch.setattr(provider, "capture_intent", refused)
    with pytest.raises(provider.ProviderError):
        await charge.capture_payment(created["id"])
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
        kinds = [e["type"] for e in await payments.events(conn, created["id"])]
    assert payment is not None
    assert payment["status"] == "authorized" and payment["capture_requested_at"] is not None
    assert "capture_failed" not in kinds


def test_settings_refuse_a_provider_address_ending_in_v1() -> None:
    for base in ("https://api.stripe.com/v1", "https://api.stripe.com/v1/"):
        with pytest.raises(ValueError, match="STRIPE_API_BASE"):
            Settings(stripe_api_base=base)
    assert Settings(stripe_api_base="https://api.stripe.com").stripe_api_base


# --- 2. a connection cut or stalled after the headers is an unknown outcome ----------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)


HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n"
    b"Request-Id: req_stub\r\n\r\n"
)


class Stub:
    """A local HTTP server that answers every request with `HEAD` and the start of a body,
    then cuts the connection (`stall=False`) or sends nothing more (`stall=True`)."""

    def __init__(self, stall: bool) -> None:
        self.stall = stall
        self.requests = 0
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            self.requests += 1
            writer.write(HEAD + b'{"id": "pi_cut", "object": "payment_int')
            await writer.drain()
            if self.stall:
                await asyncio.wait_for(self.done.wait(), 10)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture(params=[False, True], ids=["cut-mid-body", "stalled-mid-body"])
async def stub(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stub]:
    server_stub = Stub(stall=request.param)
    server = await asyncio.start_server(server_stub.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("STRIPE_API_BASE", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_stub")
    monkeypatch.setenv("AGENTPAY_PROVIDER_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("AGENTPAY_PROVIDER_MAX_NETWORK_RETRIES", "1")
    get_settings.cache_clear()
    yield server_stub
    server_stub.done.set()
    server.close()
    await server.wait_closed()
    get_settings.cache_clear()


PAYMENT = {
    "id": "pay_stub",
    "agent_id": "agt_stub",
    "amount_total": 2000,
    "currency": "usd",
    "payment_method": "pm_card_visa",
    "capture_method": "automatic",
    "description": None,
}


@pytest.mark.parametrize(
    "call",
    [
        lambda: provider.create_intent(PAYMENT),
        lambda: provider.confirm_intent("pay_stub", "pi_stub"),
        lambda: provider.retrieve_intent("pi_stub"),
        lambda: provider.capture_intent("pay_stub", "pi_stub", "1.0"),
        lambda: provider.refund("pay_stub", "pi_stub", "rfd_stub", 100),
        lambda: provider.list_refunds("pi_stub"),
        lambda: provider.retrieve_refund("re_stub"),
    ],
    ids=["create", "confirm", "retrieve", "capture", "refund", "list_refunds", "retrieve_refund"],
)
async def test_a_response_cut_after_its_headers_is_an_unknown_outcome(
    stub: Stub, call: Callable[[], Awaitable[Any]]
) -> None:
    """The SDK's aiohttp client reads the body outside its own error handling: the
    aiohttp/timeout error used to escape as is, and the job failed at once. Now it is a
    connection error like any other — the SDK tries again (same key) and then it is
    `Unknown`, which the job's backoff retries and reconcile resolves."""
    with pytest.raises(provider.Unknown):
        await asyncio.wait_for(call(), 10)
    assert stub.requests == 2  # the SDK's own retry, with the same key


# --- 3. a card error's decline code ---------------------------------------------------------


def test_a_card_errors_decline_code_is_read_from_the_error_object() -> None:
    """Without the PaymentIntent in the answer (a refund's or capture's card error), the
    code recorded is the issuer's reason, not the generic `card_declined`."""
    error = sdk_error(
        402,
        {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
        },
    )
    translated = provider._translate(error)
    assert isinstance(translated, provider.Declined)
    assert translated.code == "insufficient_funds"
    assert translated.intent is None
