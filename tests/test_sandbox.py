"""The sandbox provider, driven over real HTTP by the real ``stripe`` SDK."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import stripe

from sandbox import SandboxServer, create_app, decode_form
from sandbox.forms import FormDecodeError
from tests.conftest import wait_for

API_KEY = "sk_test_sandbox_tests"
WEBHOOK_SECRET = "whsec_test_sandbox"
NO_REDIRECTS = {"enabled": True, "allow_redirects": "never"}


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(webhook_secret=WEBHOOK_SECRET) as srv:
        yield srv


@pytest.fixture
def control(server: SandboxServer) -> Iterator[httpx.Client]:
    """The /_sandbox control API; faults and webhook settings are undone after each test."""
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        yield http
        http.delete("/_sandbox/faults").raise_for_status()
        http.post(
            "/_sandbox/webhooks/config",
            json={"duplicates": 1, "shuffle": False, "retry_backoff_ms": 200, "concurrency": 1},
        ).raise_for_status()


@pytest.fixture(autouse=True)
def fast_sdk_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's retry backoff starts at 0.5 s; tests of retries need not wait that long."""
    monkeypatch.setattr(stripe.HTTPClient, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(stripe.HTTPClient, "MAX_DELAY", 0.05)


def sdk(server: SandboxServer, retries: int = 0, api_key: str = API_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key, base_addresses={"api": server.base_url}, max_network_retries=retries
    )


def tag() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def card_params(amount: int = 1000, **extra: Any) -> dict[str, Any]:
    return {"amount": amount, "currency": "usd", "payment_method_types": ["card"], **extra}


def intents_tagged(client: stripe.StripeClient, value: str) -> list[Any]:
    return list(client.v1.payment_intents.search({"query": f"metadata['tag']:'{value}'"}).data)


def events_for(client: stripe.StripeClient, pi_id: str) -> list[str]:
    """Event types about ``pi_id``, oldest first."""
    events = client.v1.events.list({"limit": 100}).data
    return [e.type for e in reversed(events) if e.data.object.id == pi_id]


class Receiver:
    """A tiny webhook endpoint on 127.0.0.1:0 that records every POST."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.fail: Callable[[dict[str, Any]], bool] = lambda _event: False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                event = json.loads(body)
                failing = receiver.fail(event)
                with receiver.cond:
                    receiver.received.append(
                        {"body": body, "sig": self.headers["Stripe-Signature"], "event": event}
                    )
                    receiver.cond.notify_all()
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        self.thread = threading.Thread(
            target=self.http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def about(self, pi_id: str) -> list[dict[str, Any]]:
        with self.cond:
            return [r for r in self.received if r["event"]["data"]["object"]["id"] == pi_id]

    def wait(self, pi_id: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.about(pi_id)) >= count, timeout)
        assert ok, f"expected {count} deliveries about {pi_id}, got {len(self.about(pi_id))}"
        return self.about(pi_id)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver(server: SandboxServer, control: httpx.Client) -> Iterator[Receiver]:
    rec = Receiver()
    endpoint = control.post("/_sandbox/webhooks", json={"url": rec.url}).json()
    assert endpoint["secret"] == WEBHOOK_SECRET
    yield rec
    control.delete(f"/_sandbox/webhooks/{endpoint['id']}").raise_for_status()
    rec.close()


# --- form decoding -------------------------------------------------------------------------


def test_decode_form_nests_dicts_and_lists() -> None:
    body = (
        "amount=100&metadata[payment_id]=pay_1&metadata[note]=&expand[0]=latest_charge"
        "&expand[1]=payment_method&items[0][price]=p1&items[1][price]=p2&tags[]=a&tags[]=b"
        "&automatic_payment_methods[enabled]=true"
    )
    assert decode_form(body) == {
        "amount": "100",
        "metadata": {"payment_id": "pay_1", "note": ""},
        "expand": ["latest_charge", "payment_method"],
        "items": [{"price": "p1"}, {"price": "p2"}],
        "tags": ["a", "b"],
        "automatic_payment_methods": {"enabled": "true"},
    }
    assert decode_form(b"expand[1]=b&expand[0]=a") == {"expand": ["a", "b"]}
    with pytest.raises(FormDecodeError):
        decode_form("metadata=x&metadata[a]=b")


# --- PaymentIntents ------------------------------------------------------------------------


def test_create_then_confirm_with_visa_succeeds(server: SandboxServer) -> None:
    client = sdk(server)
    t = tag()
    pi = client.v1.payment_intents.create(card_params(2500, metadata={"tag": t}))
    assert pi.id.startswith("pi_") and pi.object == "payment_intent"
    assert (pi.status, pi.amount, pi.currency, pi.livemode) == (
        "requires_payment_method",
        2500,
        "usd",
        False,
    )
    assert pi.client_secret.startswith(f"{pi.id}_secret_") and pi.metadata["tag"] == t
    confirmed = client.v1.payment_intents.confirm(
        pi.id, {"payment_method": "pm_card_visa", "expand": ["latest_charge"]}
    )
    assert confirmed.status == "succeeded"
    assert confirmed.amount_received == 2500 and confirmed.amount_capturable == 0
    assert confirmed.payment_method == "pm_card_visa"
    charge = confirmed.latest_charge
    assert charge.id.startswith("ch_") and charge.captured and charge.amount_captured == 2500
    assert charge.payment_intent == pi.id
    assert client.v1.payment_intents.retrieve(pi.id).status == "succeeded"
    assert events_for(client, pi.id) == ["payment_intent.created", "payment_intent.succeeded"]


def test_create_with_confirm_true(server: SandboxServer) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(
        {
            "amount": 1200,
            "currency": "EUR",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "automatic_payment_methods": NO_REDIRECTS,
        }
    )
    assert (pi.status, pi.currency, pi.amount_received) == ("succeeded", "eur", 1200)
    assert pi.automatic_payment_methods.allow_redirects == "never"

    # Like Stripe: dashboard payment methods (the default) need a return_url to confirm,
    # and a refused request creates nothing.
    t = tag()
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.payment_intents.create(
            {
                "amount": 1200,
                "currency": "usd",
                "payment_method": "pm_card_visa",
                "confirm": True,
                "metadata": {"tag": t},
            }
        )
    assert exc.value.param == "return_url"
    assert intents_tagged(client, t) == []
    with_return = client.v1.payment_intents.create(
        {
            "amount": 1200,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "return_url": "https://example.com/done",
        }
    )
    assert with_return.status == "succeeded"


@pytest.mark.parametrize(
    ("payment_method", "decline_code"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
def test_declines_raise_card_error(
    server: SandboxServer, payment_method: str, decline_code: str
) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(card_params())
    with pytest.raises(stripe.CardError) as exc:
        client.v1.payment_intents.confirm(pi.id, {"payment_method": payment_method})
    err = exc.value
    assert err.http_status == 402 and err.code == "card_declined"
    assert err.error.decline_code == decline_code
    assert err.error.payment_intent.id == pi.id
    assert err.error.payment_intent.status == "requires_payment_method"
    after = client.v1.payment_intents.retrieve(pi.id)
    assert after.status == "requires_payment_method"
    assert after.last_payment_error.decline_code == decline_code
    assert after.amount_received == 0
    # The customer retries with a working card: the same PaymentIntent succeeds.
    retried = client.v1.payment_intents.confirm(pi.id, {"payment_method": "pm_card_visa"})
    assert retried.status == "succeeded" and retried.last_payment_error is None
    assert events_for(client, pi.id) == [
        "payment_intent.created",
        "payment_intent.payment_failed",
        "payment_intent.succeeded",
    ]


def test_authentication_required_needs_action(server: SandboxServer, control: httpx.Client) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(
        card_params(payment_method="pm_card_authenticationRequired", confirm=True)
    )
    assert pi.status == "requires_action"
    assert pi.next_action.type == "use_stripe_sdk"
    assert events_for(client, pi.id)[-1] == "payment_intent.requires_action"
    done = control.post(f"/_sandbox/payment_intents/{pi.id}/authenticate", json={})
    assert done.json()["status"] == "succeeded"
    assert client.v1.payment_intents.retrieve(pi.id).next_action is None


def test_manual_capture_then_capture(server: SandboxServer) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(
        card_params(5000, capture_method="manual", payment_method="pm_card_visa", confirm=True)
    )
    assert (pi.status, pi.amount_capturable, pi.amount_received) == ("requires_capture", 5000, 0)
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        client.v1.payment_intents.capture(pi.id, {"amount_to_capture": 5001})
    assert too_much.value.code == "amount_too_large"
    captured = client.v1.payment_intents.capture(pi.id, {"amount_to_capture": 4000})
    assert (captured.status, captured.amount_received, captured.amount_capturable) == (
        "succeeded",
        4000,
        0,
    )
    # The rest is released without a Refund (API versions from 2025-03-31.basil on): none is
    # listed, the charge counts none, and what can be refunded is what was captured.
    assert client.v1.refunds.list({"payment_intent": pi.id}).data == []
    charge = client.v1.charges.retrieve(captured.latest_charge)
    assert (charge.amount_captured, charge.amount_refunded, charge.refunded) == (4000, 0, False)
    with pytest.raises(stripe.InvalidRequestError) as too_large:
        client.v1.refunds.create({"payment_intent": pi.id, "amount": 4001})
    assert (too_large.value.code, too_large.value.param) == (None, "amount")
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.payment_intents.capture(pi.id)
    assert again.value.code == "payment_intent_unexpected_state"
    assert events_for(client, pi.id) == [
        "payment_intent.created",
        "payment_intent.amount_capturable_updated",
        "payment_intent.succeeded",
    ]


def test_manual_capture_then_cancel(server: SandboxServer) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(
        card_params(capture_method="manual", payment_method="pm_card_visa", confirm=True)
    )
    canceled = client.v1.payment_intents.cancel(
        pi.id, {"cancellation_reason": "requested_by_customer", "expand": ["latest_charge"]}
    )
    assert canceled.status == "canceled" and canceled.amount_capturable == 0
    assert canceled.cancellation_reason == "requested_by_customer"
    assert canceled.canceled_at is not None
    # Released without a Refund (API versions from 2025-03-31.basil on).
    assert (canceled.latest_charge.amount_refunded, canceled.latest_charge.refunded) == (0, False)
    assert client.v1.refunds.list({"payment_intent": pi.id}).data == []
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.payment_intents.cancel(pi.id)
    assert exc.value.code == "payment_intent_unexpected_state"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.capture(pi.id)
    assert events_for(client, pi.id)[-1] == "payment_intent.canceled"


def test_refunds_full_partial_and_over_refund(server: SandboxServer) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(
        card_params(1000, payment_method="pm_card_visa", confirm=True, return_url="https://x.y")
    )
    partial = client.v1.refunds.create({"payment_intent": pi.id, "amount": 400})
    assert partial.id.startswith("re_") and partial.object == "refund"
    assert (partial.amount, partial.status, partial.payment_intent) == (400, "succeeded", pi.id)
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (400, False)

    with pytest.raises(stripe.InvalidRequestError) as too_much:
        client.v1.refunds.create({"payment_intent": pi.id, "amount": 601})
    # As Stripe answers it: the parameter named, no code.
    assert too_much.value.code is None and too_much.value.param == "amount"
    assert "greater than unrefunded amount on charge" in str(too_much.value)

    rest = client.v1.refunds.create({"payment_intent": pi.id, "metadata": {"why": "rest"}})
    assert rest.amount == 600 and rest.metadata["why"] == "rest"
    with pytest.raises(stripe.InvalidRequestError) as already:
        client.v1.refunds.create({"payment_intent": pi.id, "amount": 1})
    assert already.value.code == "charge_already_refunded"

    listed = client.v1.refunds.list({"payment_intent": pi.id})
    assert [r.id for r in listed.data] == [rest.id, partial.id]
    assert client.v1.refunds.retrieve(partial.id).amount == 400
    refunded_events = [
        e
        for e in client.v1.events.list({"type": "charge.refunded", "limit": 100}).data
        if e.data.object.payment_intent == pi.id
    ]
    assert [(e.data.object.amount_refunded, e.data.object.refunded) for e in refunded_events] == [
        (1000, True),
        (400, False),
    ]

    unpaid = client.v1.payment_intents.create(card_params())
    with pytest.raises(stripe.InvalidRequestError) as not_paid:
        client.v1.refunds.create({"payment_intent": unpaid.id})
    assert not_paid.value.code == "charge_not_refundable"


def test_unknown_ids_and_payment_methods(server: SandboxServer) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(card_params())
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.payment_intents.confirm(pi.id, {"payment_method": "pm_card_nope"})
    assert exc.value.http_status == 400
    assert (exc.value.code, exc.value.param) == ("resource_missing", "payment_method")
    assert client.v1.payment_intents.retrieve(pi.id).status == "requires_payment_method"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.payment_intents.retrieve("pi_doesnotexist")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as no_amount:
        client.v1.payment_intents.create({"currency": "usd"})
    assert (no_amount.value.code, no_amount.value.param) == ("parameter_missing", "amount")


def test_authentication(server: SandboxServer) -> None:
    response = httpx.get(f"{server.base_url}/v1/payment_intents")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.AuthenticationError):
        sdk(server, api_key="sk_live_realkey123456").v1.payment_intents.list()


# --- idempotency ---------------------------------------------------------------------------


def test_idempotent_replay_returns_the_same_object(server: SandboxServer) -> None:
    client = sdk(server)
    t = tag()
    key = f"create-{t}"
    params = card_params(metadata={"tag": t})
    first = client.v1.payment_intents.create(params, {"idempotency_key": key})
    second = client.v1.payment_intents.create(params, {"idempotency_key": key})
    assert second.id == first.id
    assert first.last_response.headers.get("Idempotent-Replayed") is None
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(intents_tagged(client, t)) == 1
    # Declines are saved too: the replay is the same 402, not a second attempt.
    decline_key = f"confirm-{t}"
    for _ in range(2):
        with pytest.raises(stripe.CardError):
            client.v1.payment_intents.confirm(
                first.id,
                {"payment_method": "pm_card_chargeDeclined"},
                {"idempotency_key": decline_key},
            )
    assert events_for(client, first.id).count("payment_intent.payment_failed") == 1
    # The same key under another API key is another request.
    other = sdk(server, api_key="sk_test_other_account")
    assert other.v1.payment_intents.create(params, {"idempotency_key": key}).id != first.id


def test_idempotency_key_reused_with_other_params(server: SandboxServer) -> None:
    client = sdk(server)
    key = f"k-{tag()}"
    client.v1.payment_intents.create(card_params(100), {"idempotency_key": key})
    with pytest.raises(stripe.IdempotencyError) as exc:
        client.v1.payment_intents.create(card_params(200), {"idempotency_key": key})
    assert exc.value.http_status == 400
    assert exc.value.error.type == "idempotency_error"


def test_idempotency_key_in_flight_conflicts(server: SandboxServer, control: httpx.Client) -> None:
    """A second request with a key still in flight gets 409 (the SDK raises APIError)."""
    client = sdk(server)
    t = tag()
    key = f"slow-{t}"
    params = card_params(metadata={"tag": t})
    control.post(
        "/_sandbox/faults",
        json={"delay_ms": 3000, "count": 1, "paths": ["/v1/payment_intents"], "methods": ["POST"]},
    ).raise_for_status()
    result: dict[str, Any] = {}
    slow = threading.Thread(
        target=lambda: result.update(
            pi=client.v1.payment_intents.create(params, {"idempotency_key": key})
        )
    )
    slow.start()
    wait_for(lambda: server.state.idempotency.in_flight() == 1, what="the slow request")
    with pytest.raises(stripe.APIError) as exc:
        client.v1.payment_intents.create(params, {"idempotency_key": key})
    assert exc.value.http_status == 409
    assert exc.value.error.type == "idempotency_error"
    slow.join(10)
    assert "pi" in result
    # Once the first finished, the same key replays it.
    replay = client.v1.payment_intents.create(params, {"idempotency_key": key})
    assert replay.id == result["pi"].id
    assert len(intents_tagged(client, t)) == 1


# --- search and lists ----------------------------------------------------------------------


def test_search_by_metadata(server: SandboxServer) -> None:
    client = sdk(server)
    t = tag()
    ids = [
        client.v1.payment_intents.create(card_params(metadata={"tag": t, "n": str(i)})).id
        for i in range(3)
    ]
    client.v1.payment_intents.confirm(ids[1], {"payment_method": "pm_card_visa"})
    found = client.v1.payment_intents.search({"query": f"metadata['tag']:'{t}'"})
    assert found.object == "search_result"
    assert [pi.id for pi in found.data] == list(reversed(ids))
    both = client.v1.payment_intents.search(
        {"query": f"metadata['tag']:'{t}' AND status:'succeeded'"}
    )
    assert [pi.id for pi in both.data] == [ids[1]]
    query = f'metadata["n"]:"2" AND metadata["tag"]:"{t}"'
    one = client.v1.payment_intents.search({"query": query})
    assert [pi.id for pi in one.data] == [ids[2]]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.search({"query": "metadata['tag'] = nope"})


def test_list_paginates_newest_first(server: SandboxServer) -> None:
    client = sdk(server)
    created = [client.v1.payment_intents.create(card_params()).id for _ in range(5)]
    page = client.v1.payment_intents.list({"limit": 2})
    assert [pi.id for pi in page.data] == created[::-1][:2] and page.has_more
    after = client.v1.payment_intents.list({"limit": 2, "starting_after": page.data[-1].id})
    assert [pi.id for pi in after.data] == created[::-1][2:4]
    events = client.v1.events.list({"limit": 4, "type": "payment_intent.created"})
    assert [e.type for e in events.data] == ["payment_intent.created"] * 4
    assert [e.data.object.id for e in events.data] == created[::-1][:4]


# --- faults --------------------------------------------------------------------------------


def test_fault_500_with_should_retry_true_is_retried(
    server: SandboxServer, control: httpx.Client
) -> None:
    client = sdk(server, retries=2)
    t = tag()
    before = server.state.faults.snapshot()["injected"]["error"]
    control.post(
        "/_sandbox/faults", json={"error_rate": 1, "error_should_retry": True, "count": 1}
    ).raise_for_status()
    pi = client.v1.payment_intents.create(card_params(metadata={"tag": t}))
    assert pi.status == "requires_payment_method"
    assert server.state.faults.snapshot()["injected"]["error"] == before + 1
    assert [p.id for p in intents_tagged(client, t)] == [pi.id]


def test_fault_500_with_should_retry_false_is_not_retried(
    server: SandboxServer, control: httpx.Client
) -> None:
    client = sdk(server, retries=3)
    t = tag()
    control.post(
        "/_sandbox/faults",
        json={"error_rate": 1, "error_should_retry": False, "count": 3, "paths": ["/v1/pay"]},
    ).raise_for_status()
    with pytest.raises(stripe.APIError) as exc:
        client.v1.payment_intents.create(card_params(metadata={"tag": t}))
    assert exc.value.http_status == 500 and exc.value.error.type == "api_error"
    assert exc.value.headers["Stripe-Should-Retry"] == "false"
    assert control.get("/_sandbox/faults").json()["remaining"] == 2  # exactly one attempt
    control.delete("/_sandbox/faults")
    assert intents_tagged(client, t) == []  # an injected error has no effect


def test_fault_500_without_header_is_retried_by_default(
    server: SandboxServer, control: httpx.Client
) -> None:
    client = sdk(server, retries=2)
    t = tag()
    control.post("/_sandbox/faults", json={"error_rate": 1, "count": 2}).raise_for_status()
    pi = client.v1.payment_intents.create(card_params(metadata={"tag": t}))
    assert control.get("/_sandbox/faults").json()["active"] is False
    assert [p.id for p in intents_tagged(client, t)] == [pi.id]
    # Faults only hit the paths they name.
    control.post(
        "/_sandbox/faults", json={"error_rate": 1, "count": 1, "paths": ["/v1/refunds"]}
    ).raise_for_status()
    assert sdk(server).v1.payment_intents.retrieve(pi.id).id == pi.id
    with pytest.raises(stripe.APIError):
        sdk(server).v1.refunds.list()


def test_a_saved_fault_500_is_replayed_to_every_retry_with_its_key(
    server: SandboxServer, control: httpx.Client
) -> None:
    """`error_saved`: like Stripe's 500 met once the call began, kept under the key and given
    back, marked as a replay of the first request, to every retry with it; nothing is made,
    and another key goes through."""
    client = sdk(server)
    t = tag()
    params = card_params(metadata={"tag": t})
    control.post(
        "/_sandbox/faults", json={"error_rate": 1, "error_saved": True, "count": 1}
    ).raise_for_status()
    with pytest.raises(stripe.APIError) as first:
        client.v1.payment_intents.create(params, {"idempotency_key": f"saved-{t}"})
    with pytest.raises(stripe.APIError) as again:
        client.v1.payment_intents.create(params, {"idempotency_key": f"saved-{t}"})
    assert again.value.http_status == 500
    assert again.value.headers is not None
    assert again.value.headers["Idempotent-Replayed"] == "true"
    assert first.value.headers is not None
    assert again.value.headers["Original-Request"] == first.value.headers["Request-Id"]
    assert intents_tagged(client, t) == []
    made = client.v1.payment_intents.create(params, {"idempotency_key": f"other-{t}"})
    assert [p.id for p in intents_tagged(client, t)] == [made.id]


def test_fault_delay(server: SandboxServer, control: httpx.Client) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(card_params())
    control.post(
        "/_sandbox/faults", json={"delay_ms": 300, "count": 1, "methods": ["GET"]}
    ).raise_for_status()
    started = time.monotonic()
    assert client.v1.payment_intents.retrieve(pi.id).id == pi.id
    assert time.monotonic() - started >= 0.3
    assert control.get("/_sandbox/faults").json()["active"] is False


def test_lost_response_takes_effect_once(server: SandboxServer, control: httpx.Client) -> None:
    client = sdk(server)
    t = tag()
    params = card_params(metadata={"tag": t})
    key = f"lost-{t}"
    control.post(
        "/_sandbox/faults", json={"lose_response_rate": 1, "count": 1, "methods": ["POST"]}
    ).raise_for_status()
    with pytest.raises(stripe.APIConnectionError) as exc:
        client.v1.payment_intents.create(params, {"idempotency_key": key})
    assert exc.value.should_retry
    created = intents_tagged(client, t)
    assert len(created) == 1  # the request took effect although the client saw nothing
    retried = client.v1.payment_intents.create(params, {"idempotency_key": key})
    assert retried.id == created[0].id
    assert retried.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(intents_tagged(client, t)) == 1


def test_lost_response_is_recovered_by_sdk_retries(
    server: SandboxServer, control: httpx.Client
) -> None:
    client = sdk(server, retries=2)
    t = tag()
    pi = client.v1.payment_intents.create(card_params(metadata={"tag": t}))
    control.post(
        "/_sandbox/faults",
        json={"lose_response_rate": 1, "count": 1, "paths": [f"/v1/payment_intents/{pi.id}"]},
    ).raise_for_status()
    confirmed = client.v1.payment_intents.confirm(pi.id, {"payment_method": "pm_card_visa"})
    assert confirmed.status == "succeeded"
    assert confirmed.last_response.headers["Idempotent-Replayed"] == "true"
    assert events_for(client, pi.id).count("payment_intent.succeeded") == 1
    # The 500 flavour of a lost response: APIError, effect still applied once.
    control.post(
        "/_sandbox/faults",
        json={"lose_response_rate": 1, "lose_response_as": "500", "count": 1},
    ).raise_for_status()
    with pytest.raises(stripe.APIError) as exc:
        sdk(server).v1.refunds.create({"payment_intent": pi.id, "amount": 10})
    assert exc.value.http_status == 500
    assert client.v1.charges.retrieve(confirmed.latest_charge).amount_refunded == 10


def test_fault_config_is_validated(control: httpx.Client) -> None:
    bad = control.post("/_sandbox/faults", json={"error_rate": 2})
    assert bad.status_code == 400 and "error_rate" in bad.json()["error"]["message"]
    unknown = control.post("/_sandbox/faults", json={"explode": True})
    assert unknown.status_code == 400
    assert control.get("/_sandbox/faults").json()["active"] is False


# --- webhooks ------------------------------------------------------------------------------


def test_webhooks_are_signed_like_stripe(
    server: SandboxServer, control: httpx.Client, receiver: Receiver
) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(card_params(payment_method="pm_card_visa", confirm=True))
    deliveries = receiver.wait(pi.id, 2)
    types = []
    for delivery in deliveries:
        event = stripe.Webhook.construct_event(delivery["body"], delivery["sig"], WEBHOOK_SECRET)
        types.append(event.type)
        raw = httpx.get(
            f"{server.base_url}/v1/events/{event.id}",
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert raw.text == delivery["body"]  # identical to GET /v1/events/{id}
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(delivery["body"], delivery["sig"], "whsec_wrong")
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(
                delivery["body"].replace(pi.id, "pi_forged"), delivery["sig"], WEBHOOK_SECRET
            )
    assert types == ["payment_intent.created", "payment_intent.succeeded"]
    assert client.construct_event(deliveries[1]["body"], deliveries[1]["sig"], WEBHOOK_SECRET)
    wait_for(lambda: control.get("/_sandbox/webhooks/deliveries").json()["pending"] == 0)
    log = control.get("/_sandbox/webhooks/deliveries").json()["deliveries"]
    mine = [d for d in log if d["url"] == receiver.url]
    assert [(d["event_type"], d["status_code"], d["ok"]) for d in mine] == [
        ("payment_intent.created", 200, True),
        ("payment_intent.succeeded", 200, True),
    ]


def test_webhook_duplicates(
    server: SandboxServer, control: httpx.Client, receiver: Receiver
) -> None:
    control.post("/_sandbox/webhooks/config", json={"duplicates": 3}).raise_for_status()
    pi = sdk(server).v1.payment_intents.create(card_params())
    copies = receiver.wait(pi.id, 3)
    wait_for(lambda: control.get("/_sandbox/webhooks/deliveries").json()["pending"] == 0)
    copies = receiver.about(pi.id)
    assert len(copies) == 3
    assert len({c["event"]["id"] for c in copies}) == 1
    assert {c["event"]["type"] for c in copies} == {"payment_intent.created"}


def test_webhook_failures_are_retried(
    server: SandboxServer, control: httpx.Client, receiver: Receiver
) -> None:
    control.post("/_sandbox/webhooks/config", json={"retry_backoff_ms": 10}).raise_for_status()
    failures = {"left": 2}

    def fail_twice(event: dict[str, Any]) -> bool:
        if failures["left"] > 0:
            failures["left"] -= 1
            return True
        return False

    receiver.fail = fail_twice
    pi = sdk(server).v1.payment_intents.create(card_params())
    receiver.wait(pi.id, 3)
    wait_for(lambda: control.get("/_sandbox/webhooks/deliveries").json()["pending"] == 0)
    attempts = [
        (d["attempt"], d["status_code"])
        for d in control.get("/_sandbox/webhooks/deliveries").json()["deliveries"]
        if d["url"] == receiver.url
    ]
    assert attempts == [(1, 500), (2, 500), (3, 200)]


def test_webhook_shuffle_delivers_out_of_order(
    server: SandboxServer, control: httpx.Client, receiver: Receiver
) -> None:
    control.post(
        "/_sandbox/webhooks/config", json={"shuffle": True, "seed": 7, "concurrency": 1}
    ).raise_for_status()
    pi = sdk(server).v1.payment_intents.create(
        card_params(payment_method="pm_card_visa", confirm=True)
    )
    got = receiver.wait(pi.id, 2)
    assert [d["event"]["type"] for d in got] == [
        "payment_intent.succeeded",
        "payment_intent.created",
    ]


def test_emit_arbitrary_event(
    server: SandboxServer, control: httpx.Client, receiver: Receiver
) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(card_params(payment_method="pm_card_visa", confirm=True))
    receiver.wait(pi.id, 2)
    emitted = control.post(
        f"/_sandbox/payment_intents/{pi.id}/emit", json={"type": "payment_intent.processing"}
    ).json()
    assert emitted["type"] == "payment_intent.processing"
    assert emitted["data"]["object"]["status"] == "processing"
    late = receiver.wait(pi.id, 3)[-1]
    assert late["event"]["id"] == emitted["id"]
    assert client.v1.payment_intents.retrieve(pi.id).status == "succeeded"  # unchanged


# --- disputes ------------------------------------------------------------------------------


def disputed(client: stripe.StripeClient, amount: int = 1000, **extra: Any) -> tuple[Any, Any]:
    """A payment with Stripe's disputing test card, and the dispute it brought."""
    pi = client.v1.payment_intents.create(
        card_params(amount, payment_method="pm_card_createDispute", confirm=True, **extra)
    )
    [dispute] = client.v1.disputes.list({"payment_intent": pi.id}).data
    return pi, dispute


def dispute_events(client: stripe.StripeClient, dispute_id: str) -> list[tuple[str, str]]:
    """(type, the dispute's status in it) of the events about `dispute_id`, oldest first."""
    events = client.v1.events.list({"type": "charge.dispute.*", "limit": 100}).data
    return [
        (e.type, e.data.object.status) for e in reversed(events) if e.data.object.id == dispute_id
    ]


def test_the_disputing_card_succeeds_then_is_disputed_for_its_whole_amount(
    server: SandboxServer, control: httpx.Client, receiver: Receiver
) -> None:
    """`pm_card_createDispute` (card 4000000000000259): the charge succeeds, then the customer
    disputes all of it as fraudulent: a `needs_response` dispute, the money and the dispute
    fee withdrawn, `charge.dispute.created` and `.funds_withdrawn` sent signed like any event."""
    client = sdk(server)
    pi, dispute = disputed(client, 1234)
    assert (pi.status, pi.amount_received) == ("succeeded", 1234)  # the intent stays succeeded
    assert dispute.id.startswith("dp_") and dispute.object == "dispute"
    assert (dispute.amount, dispute.currency, dispute.reason, dispute.status) == (
        1234,
        "usd",
        "fraudulent",
        "needs_response",
    )
    assert (dispute.charge, dispute.payment_intent) == (pi.latest_charge, pi.id)
    assert dispute.is_charge_refundable is False and dispute.livemode is False
    assert dispute.evidence.uncategorized_text is None
    assert dispute.evidence_details.submission_count == 0
    assert dispute.evidence_details.due_by > dispute.created
    [withdrawal] = dispute.balance_transactions
    assert (withdrawal.amount, withdrawal.fee, withdrawal.net) == (-1234, 1500, -2734)
    assert withdrawal.source == dispute.id
    assert client.v1.charges.retrieve(pi.latest_charge).disputed is True
    assert client.v1.disputes.retrieve(dispute.id).to_dict() == dispute.to_dict()
    assert [d.id for d in client.v1.disputes.list({"charge": pi.latest_charge}).data] == [
        dispute.id
    ]
    assert dispute_events(client, dispute.id) == [
        ("charge.dispute.created", "needs_response"),
        ("charge.dispute.funds_withdrawn", "needs_response"),
    ]
    delivered = receiver.wait(dispute.id, 2)
    for delivery in delivered:
        event = stripe.Webhook.construct_event(delivery["body"], delivery["sig"], WEBHOOK_SECRET)
        assert event.data.object.payment_intent == pi.id
    assert [d["event"]["type"] for d in delivered] == [
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
    ]

    visa = client.v1.payment_intents.create(
        card_params(payment_method="pm_card_visa", confirm=True)
    )
    assert client.v1.disputes.list({"payment_intent": visa.id}).data == []
    assert client.v1.charges.retrieve(visa.latest_charge).disputed is False
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.disputes.retrieve("dp_missing")
    assert (missing.value.http_status, missing.value.code, missing.value.param) == (
        404,
        "resource_missing",
        "dispute",
    )


def test_a_manual_capture_is_disputed_once_captured_for_what_was_captured(
    server: SandboxServer,
) -> None:
    client = sdk(server)
    pi = client.v1.payment_intents.create(
        card_params(
            1000, payment_method="pm_card_createDispute", confirm=True, capture_method="manual"
        )
    )
    assert pi.status == "requires_capture"
    assert client.v1.disputes.list({"payment_intent": pi.id}).data == []
    client.v1.payment_intents.capture(pi.id, {"amount_to_capture": 600})
    [dispute] = client.v1.disputes.list({"payment_intent": pi.id}).data
    assert (dispute.amount, dispute.status) == (600, "needs_response")


def test_a_disputed_charge_cannot_be_refunded_unless_the_dispute_was_won(
    server: SandboxServer,
) -> None:
    """As Stripe answers it: `charge_disputed`, while the dispute is open and once it is lost;
    a won dispute gives the charge back to refunds."""
    client = sdk(server)
    pi, dispute = disputed(client)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.refunds.create({"payment_intent": pi.id, "amount": 100})
    assert refused.value.code == "charge_disputed"
    assert refused.value.user_message == (
        f"Charge {pi.latest_charge} has been charged back; cannot issue a refund."
    )
    assert client.v1.refunds.list({"payment_intent": pi.id}).data == []
    client.v1.disputes.close(dispute.id)
    with pytest.raises(stripe.InvalidRequestError) as still:
        client.v1.refunds.create({"payment_intent": pi.id, "amount": 100})
    assert still.value.code == "charge_disputed"

    won_pi, won = disputed(client)
    client.v1.disputes.update(won.id, {"evidence": {"uncategorized_text": "winning_evidence"}})
    assert client.v1.refunds.create({"payment_intent": won_pi.id, "amount": 100}).amount == 100


def test_test_mode_evidence_decides_a_dispute_and_close_accepts_one(
    server: SandboxServer,
) -> None:
    """Stripe's test evidence: `winning_evidence` wins (the money reinstated),
    `losing_evidence` loses; submitted evidence puts the dispute `under_review` first
    (`charge.dispute.updated`), staged evidence (`submit=false`) does nothing until
    submitted. `/close` accepts a dispute: lost. A closed dispute takes no more changes."""
    client = sdk(server)
    _, winning = disputed(client, 800)
    won = client.v1.disputes.update(
        winning.id, {"evidence": {"uncategorized_text": "winning_evidence"}}
    )
    assert (won.status, won.is_charge_refundable) == ("won", True)
    assert won.evidence.uncategorized_text == "winning_evidence"
    assert won.evidence_details.submission_count == 1
    assert [bt.amount for bt in won.balance_transactions] == [-800, 800]
    assert dispute_events(client, winning.id)[2:] == [
        ("charge.dispute.updated", "under_review"),
        ("charge.dispute.funds_reinstated", "won"),
        ("charge.dispute.closed", "won"),
    ]

    _, losing = disputed(client)
    staged = client.v1.disputes.update(
        losing.id,
        {"evidence": {"uncategorized_text": "losing_evidence"}, "submit": False},
    )
    assert (staged.status, staged.evidence_details.has_evidence) == ("needs_response", True)
    assert staged.evidence_details.submission_count == 0
    lost = client.v1.disputes.update(losing.id, {"submit": True, "metadata": {"k": "v"}})
    assert (lost.status, lost.is_charge_refundable, lost.metadata["k"]) == ("lost", False, "v")
    assert len(lost.balance_transactions) == 1
    assert dispute_events(client, losing.id)[2:] == [
        ("charge.dispute.updated", "needs_response"),
        ("charge.dispute.updated", "under_review"),
        ("charge.dispute.closed", "lost"),
    ]

    _, undecided = disputed(client)
    review = client.v1.disputes.update(
        undecided.id, {"evidence": {"product_description": "a widget"}}
    )
    assert review.status == "under_review"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.disputes.update(undecided.id, {"evidence": {"receipt": "file_x"}})
    closed = client.v1.disputes.close(undecided.id)
    assert closed.status == "lost"
    assert dispute_events(client, undecided.id)[-1] == ("charge.dispute.closed", "lost")

    _, accepted = disputed(client)
    assert client.v1.disputes.close(accepted.id).status == "lost"
    assert dispute_events(client, accepted.id)[2:] == [("charge.dispute.closed", "lost")]
    for call in (
        lambda: client.v1.disputes.close(accepted.id),
        lambda: client.v1.disputes.update(
            accepted.id, {"evidence": {"uncategorized_text": "winning_evidence"}}
        ),
    ):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            call()
        assert refused.value.user_message == "This dispute is already closed"
    assert client.v1.disputes.retrieve(accepted.id).status == "lost"
    assert len(dispute_events(client, accepted.id)) == 3

    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.disputes.update(winning.id, {"evidence": {"explanation": "x"}})
    assert (unknown.value.code, unknown.value.param) == (
        "parameter_unknown",
        "evidence[explanation]",
    )


def test_dispute_calls_keep_idempotency_and_faults(
    server: SandboxServer, control: httpx.Client
) -> None:
    """A close retried with its key is replayed, not done twice; a close met by a saved 500
    did nothing and keeps failing under its key; a lost answer to a close took effect."""
    client = sdk(server)
    _, dispute = disputed(client)
    control.post(
        "/_sandbox/faults",
        json={"error_rate": 1, "error_saved": True, "count": 1, "paths": ["/v1/disputes"]},
    ).raise_for_status()
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            client.v1.disputes.close(dispute.id, options={"idempotency_key": f"c-{dispute.id}"})
    assert client.v1.disputes.retrieve(dispute.id).status == "needs_response"

    key = f"c2-{dispute.id}"
    control.post(
        "/_sandbox/faults",
        json={"lose_response_rate": 1, "count": 1, "paths": [f"/v1/disputes/{dispute.id}"]},
    ).raise_for_status()
    with pytest.raises(stripe.APIConnectionError):
        client.v1.disputes.close(dispute.id, options={"idempotency_key": key})
    assert client.v1.disputes.retrieve(dispute.id).status == "lost"
    again = client.v1.disputes.close(dispute.id, options={"idempotency_key": key})
    assert again.status == "lost"
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert dispute_events(client, dispute.id)[2:] == [("charge.dispute.closed", "lost")]


# --- the server and the app ----------------------------------------------------------------


def test_server_lifecycle_stats_and_reset() -> None:
    received: list[str] = []
    rec = Receiver()
    try:
        with SandboxServer(webhook_endpoints=[rec.url]) as srv:
            assert srv.base_url.startswith("http://127.0.0.1:") and srv.port > 0
            secret = srv.state.webhook_secret
            assert secret.startswith("whsec_")
            client = sdk(srv)
            pi = client.v1.payment_intents.create(
                card_params(payment_method="pm_card_visa", confirm=True)
            )
            for delivery in rec.wait(pi.id, 2):
                received.append(
                    stripe.Webhook.construct_event(delivery["body"], delivery["sig"], secret).type
                )
            stats = httpx.get(f"{srv.base_url}/_sandbox/stats").json()
            assert stats["payment_intents"] == {"total": 1, "by_status": {"succeeded": 1}}
            assert stats["events"] == 2 and stats["requests"]["total"] == 1
            assert httpx.post(f"{srv.base_url}/_sandbox/reset").json() == {"reset": True}
            assert srv.state.stats()["payment_intents"]["total"] == 0
            with pytest.raises(stripe.InvalidRequestError):
                client.v1.payment_intents.retrieve(pi.id)
            url = srv.base_url
        assert received == ["payment_intent.created", "payment_intent.succeeded"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/_sandbox/health")
    finally:
        rec.close()


def test_stop_webhooks_drops_deliveries_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A server whose webhook endpoint is about to go away (the dev stack's API as the stack
    stops) stops sending first: the delivery being sent is dropped, with no 'giving up'
    warning, and later events are not queued at all; requests are answered as before."""
    rec = Receiver()
    calls = {"n": 0}
    sending, release = threading.Event(), threading.Event()

    def fail_then_hang(_event: dict[str, Any]) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:  # the last attempt: held until the dispatcher closed delivery
            sending.set()
            release.wait(30)
        return True

    rec.fail = fail_then_hang
    try:
        with SandboxServer(webhook_endpoints=[rec.url]) as srv:
            httpx.post(
                f"{srv.base_url}/_sandbox/webhooks/config",
                json={"max_attempts": 2, "retry_backoff_ms": 10},
            ).raise_for_status()
            client = sdk(srv)
            first = client.v1.payment_intents.create(card_params())
            assert sending.wait(30), "the second attempt was never sent"
            with caplog.at_level(logging.INFO, logger="sandbox.webhooks"):
                assert srv.stop_webhooks() == 1
                release.set()
                later = client.v1.payment_intents.create(card_params())
                assert srv.state.webhooks.pending() == 0  # not queued
                assert srv.stop_webhooks() == 0  # once
            assert client.v1.payment_intents.retrieve(later.id).id == later.id
            # The attempt cut short is not recorded (nor retried, nor given up on).
            attempts = srv.state.webhooks.deliveries()
            assert [(d["attempt"], d["status_code"]) for d in attempts] == [(1, 500)]
            assert attempts[0]["event_id"] == rec.about(first.id)[0]["event"]["id"]
        lines = [
            (r.levelname, r.getMessage()) for r in caplog.records if r.name == "sandbox.webhooks"
        ]
        assert lines == [
            ("INFO", "webhook delivery closed: 1 queued or retrying deliveries dropped")
        ]
    finally:
        release.set()
        rec.close()


def test_create_app_is_independent_per_instance() -> None:
    first, second = create_app(webhook_secret="whsec_a"), create_app()
    assert first.state.sandbox is not second.state.sandbox
    assert first.state.sandbox.webhook_secret == "whsec_a"
    assert second.state.sandbox.webhook_secret != "whsec_a"
