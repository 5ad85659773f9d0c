"""The payment provider, through the official stripe SDK. The only module that imports stripe.

Pointing agentpay at real Stripe test mode is a matter of settings: set `STRIPE_API_KEY` to a
`sk_test_…` key and leave `STRIPE_API_BASE` unset (docs/provider.md). Every call carries an
idempotency key derived from the payment id and the operation (design rule 3), so a retried
call can never act twice.

Stripe keeps a server error that happened once a call began under the call's key, and
answers every retry with that key with it, for the key's 24 hours. Such a replayed failure
moves the call to a key derived from the failed request (`_keyed`): only for calls that
cannot act twice under two keys.

`stripe` is imported by the functions that call it, not when this module is imported: the
modules that only record requests (`tasks.charge.request_cancel`, used by the API) import
this one for its types, and the API process must never load the SDK.

Errors come back as one of three things: `Declined` (a decline, or a request the provider
refuses about this payment: a recorded failure), `Unknown` (timeout, connection lost, 5xx or
409 after the SDK's own retries: retried by the job with backoff, resolved by retrieve), or
`ProviderError` (anything retrying cannot fix, such as a bad API key or a refusal about our
configuration: the job fails and is recorded, and the sweep drives the payment on later).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.app import Throttled, TransientError
from tasks.settings import SANDBOX_API_KEY, Settings, get_settings

if TYPE_CHECKING:
    import stripe

log = logging.getLogger("agentpay.provider")


@dataclass(frozen=True)
class Intent:
    """What agentpay needs to know of a provider PaymentIntent."""

    id: str
    status: str
    amount: int
    amount_received: int
    currency: str
    metadata: dict[str, str]
    failure_code: str | None
    failure_message: str | None

    @classmethod
    def from_stripe(cls, obj: Any) -> Intent:
        pi: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
        error = pi.get("last_payment_error") or {}
        return cls(
            id=pi["id"],
            status=pi["status"],
            amount=int(pi["amount"]),
            amount_received=int(pi.get("amount_received") or 0),
            currency=pi["currency"],
            metadata=dict(pi.get("metadata") or {}),
            failure_code=_failure_code(error.get("code"), error.get("decline_code")),
            failure_message=error.get("message"),
        )


class Declined(Exception):
    """The provider refused the payment for good (a card decline, a request refused because
    of this payment: its intent's state, its amount, its payment method — `_translate`)."""

    def __init__(self, code: str, message: str, intent: Intent | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.intent = intent


class ProviderError(Exception):
    """The provider refused the call for a reason retrying does not fix (a bad API key, a
    wrong address, a request of ours it does not accept). Not retried by the job: it fails
    and is recorded, the payment waits, and the sweep drives it on again later."""


class Unknown(TransientError):
    """The call's outcome is not known (timeout, 5xx after retries, lost response). Try the
    same call again with the same idempotency key, or retrieve."""


class RateLimited(Unknown, Throttled):
    """The provider refused the pace (429, after the SDK's own retries): tried again like any
    unknown outcome, for longer (`tasks.app.Throttled`)."""


def _failure_code(code: str | None, decline_code: str | None) -> str | None:
    # A specific decline reason ("insufficient_funds") says more than "card_declined";
    # Stripe's "generic_decline" says less.
    if decline_code and decline_code != "generic_decline":
        return decline_code
    return code


def idempotency_key(payment_id: str, operation: str) -> str:
    """Stable per payment and operation: never random, never a timestamp."""
    return f"agentpay:{payment_id}:{operation}"


@functools.cache
def _http_client_class() -> type[Any]:
    """The SDK's aiohttp client, with the response body read inside the error handling.

    `stripe.AIOHTTPClient.request_async` reads the body after the SDK's own handling of
    network errors: a connection cut mid-body (`aiohttp.ClientPayloadError`) or the timeout
    running out after the headers came (`TimeoutError`) escaped untranslated — neither
    retried by the SDK nor an unknown outcome to the job's backoff, so the job failed at
    once. Here they are what any lost connection is, an `APIConnectionError` the SDK may
    retry (same key): after its retries, `Unknown` (`_translate`). Every call goes through
    this client, so this one place covers them all."""
    import aiohttp
    import stripe

    class _AIOHTTPClient(stripe.AIOHTTPClient):
        async def request_async(
            self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
        ) -> tuple[bytes, int, Mapping[str, str]]:
            content, status, response_headers = await self.request_stream_async(
                method, url, headers, post_data=post_data
            )
            try:
                body = await content.read()
            except (aiohttp.ClientError, TimeoutError) as error:
                raise stripe.APIConnectionError(
                    f"The connection was lost while reading the answer (HTTP {status}): "
                    f"{type(error).__name__}: {error}",
                    should_retry=True,
                ) from error
            return body, status, response_headers

    return _AIOHTTPClient


class _Clients:
    """One SDK client per event loop and configuration: its HTTP session (aiohttp) belongs to
    the loop it was opened on. The SDK's aiohttp client costs about a third of the CPU per
    call of its httpx client (measured against the sandbox: 0.5 ms against 1.6 to 1.8 ms,
    SDK included), and a payment makes three calls."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[Any, ...], tuple[Any, Any]]
        ] = weakref.WeakKeyDictionary()

    def get(self, api_key: str, api_base: str | None, timeout: float, retries: int) -> Any:
        per_loop = self._by_loop.setdefault(asyncio.get_running_loop(), {})
        key = (api_key, api_base, timeout, retries)
        if key not in per_loop:
            import aiohttp
            import stripe

            http = _http_client_class()(timeout=aiohttp.ClientTimeout(total=timeout))
            sdk = stripe.StripeClient(
                api_key,
                base_addresses={"api": api_base} if api_base else None,
                max_network_retries=retries,
                http_client=http,
            )
            per_loop[key] = (sdk, http)
        return per_loop[key][0]

    async def close(self) -> None:
        """Close this event loop's provider connections (a worker does as it stops)."""
        for _, http in self._by_loop.pop(asyncio.get_running_loop(), {}).values():
            await http.close_async()


# Not a module-level function: every public coroutine function here is a provider call
# (workers.worker.instrument_provider times each), and closing connections is not one.
connections = _Clients()


def client(settings: Settings | None = None) -> Any:
    s = settings or get_settings()
    base = s.stripe_api_base
    if base is None and s.stripe_api_key == SANDBOX_API_KEY:
        # Only the sandbox key ever goes to the dev stack's sandbox: a real key with no
        # STRIPE_API_BASE goes to Stripe, whatever a stale stack.json says.
        base = s.read_stack().get("provider_base")
    return connections.get(
        s.stripe_api_key, base, s.provider_timeout_seconds, s.provider_max_network_retries
    )


# The refusals (`InvalidRequestError`) that are about the payment itself — its PaymentIntent's
# or charge's state, its amount, its payment method or customer, the card — and so are a
# recorded outcome (`Declined`). Any other refusal is about us (an address, a parameter the
# account or API version does not take, a payment method type not activated, an object of
# another account): no outcome, so a `ProviderError` — the payment waits and the sweep tries
# again, and a fixed configuration lets it go on. A refusal whose answer carries the
# PaymentIntent is about the payment whatever its code. Chosen from Stripe's error codes
# (docs.stripe.com/error-codes; the SDK lists them in `PaymentIntent.LastPaymentError.code`);
# codes about our account or our request, not the payment (`payment_method_unactivated`,
# `balance_insufficient`, `parameter_*`, `*_invalid_parameter`), or that pass
# (`payment_intent_rate_limit_exceeded`, `payment_method_provider_timeout`), are left out.
PAYMENT_REFUSALS = frozenset(
    {
        # the PaymentIntent's state
        "payment_intent_unexpected_state",
        "payment_intent_incompatible_payment_method",
        "payment_intent_authentication_failure",
        "payment_intent_payment_attempt_failed",
        "payment_intent_payment_attempt_expired",
        # the charge's state (capture, refund)
        "charge_already_captured",
        "charge_already_refunded",
        "charge_disputed",
        "charge_expired_for_capture",
        "charge_not_refundable",
        "refund_disputed_payment",
        "capture_charge_authorization_expired",
        "capture_unauthorized_payment",
        # the amount
        "amount_too_large",
        "amount_too_small",
        "invalid_charge_amount",
        "charge_exceeds_source_limit",
        "charge_exceeds_transaction_limit",
        # the payment method and the card
        "payment_method_unexpected_state",
        "payment_method_currency_mismatch",
        "payment_method_provider_decline",
        "payment_method_customer_decline",
        "authentication_required",
        "card_declined",
        "card_decline_rate_limit_exceeded",
        "expired_card",
        "incorrect_cvc",
        "incorrect_number",
        "incorrect_zip",
        "invalid_cvc",
        "invalid_expiry_month",
        "invalid_expiry_year",
        "invalid_number",
        "insufficient_funds",
        "processing_error",
    }
)
# A refusal naming the payment method or customer the agent gave is about the payment, with
# or without a code (`resource_missing`; a method used before without a customer and refused
# for good comes with none): else the payment would wait in `charging` for ever, re-driven and
# refused again. An intent, a charge or a refund we name that the provider does not know is
# another account's (the key was changed) or a lost object: ours.
PAYMENT_RESOURCES = frozenset({"payment_method", "customer"})
# What Stripe says when an id exists, but in the other mode or account than the key's: the
# key is wrong, not the agent's id (every saved-card payment would fail for good meanwhile).
_OTHER_MODE = "a similar object exists in"


def _about_the_payment(error: stripe.InvalidRequestError) -> bool:
    if error.error is not None and error.error.payment_intent:
        return True
    if _OTHER_MODE in str(error.user_message or error):
        return False
    if error.param in PAYMENT_RESOURCES and not (error.code or "").startswith("parameter_"):
        return True  # `parameter_*`: a parameter of ours the API does not take there
    return error.code in PAYMENT_REFUSALS


def _translate(error: stripe.StripeError, *, reading: bool = False) -> Exception:
    """What a provider error means for us: a decline (recorded failure), an unknown outcome
    (retried with the same key, or resolved by retrieve), or a permanent error (not retried
    by the job; the sweep drives the payment on later: a bad key, a wrong address, our bug).
    `reading`: the call only looks (retrieve, search) — the provider refusing a read (no such
    object: a key of another account, a lost object) says nothing about the payment's
    outcome, so it is never a decline. A refused write is a decline only when the refusal is
    about the payment (`PAYMENT_REFUSALS`)."""
    import stripe

    if isinstance(error, stripe.CardError):
        body: Any = error.json_body or {}
        pi = (body.get("error") or {}).get("payment_intent")
        decline_code = error.error.decline_code if error.error is not None else None
        return Declined(
            _failure_code(error.code, decline_code) or "card_declined",
            error.user_message or str(error),
            Intent.from_stripe(pi) if pi else None,
        )
    if isinstance(error, stripe.RateLimitError):
        return RateLimited(f"RateLimitError: {error.user_message or error}")
    if isinstance(error, stripe.APIConnectionError | stripe.APIError):
        # A 409 (the same key still in flight) is an APIError: the SDK makes one of every
        # status it has no class for.
        return Unknown(f"{type(error).__name__}: {error.user_message or error}")
    if isinstance(error, stripe.IdempotencyError):
        # Same key, other parameters: a bug of ours, never fixed by retrying.
        return ProviderError(f"IdempotencyError: {error.user_message or error}")
    if isinstance(error, stripe.InvalidRequestError) and not reading and _about_the_payment(error):
        return Declined(error.code or "invalid_request", error.user_message or str(error))
    return ProviderError(
        f"{type(error).__name__} ({error.http_status}, {error.code or 'no code'}): "
        f"{error.user_message or error}"
    )


async def _call(method: Any, *args: Any, reading: bool = False) -> Intent:
    import stripe

    try:
        pi = await method(*args)
    except stripe.StripeError as error:
        raise _translate(error, reading=reading) from error
    return Intent.from_stripe(pi)


# How far one call follows the chain of derived keys. Each try walks the chain again from
# the payment's own key (every saved failure replays at once) to its first key that is not
# poisoned, so the bound must stay far above any chain the provider can make: with 1 call in
# 10 failing and saved (the chaos run), 3 was reached once in 2,000 payments, and that
# payment could never get past it.
REKEYS = 12


def derived_key(key: str, failed: str) -> str:
    """The key to call again under once the provider replays the server error of request
    `failed`, saved under `key`: the same for every worker that gets that answer, and never
    longer than Stripe's 255 characters however long the chain grows (the operation's own
    key, then a digest of the chain)."""
    own = key.split(":after:", 1)[0]
    digest = hashlib.sha256(f"{key}\n{failed}".encode()).hexdigest()[:32]
    return f"{own}:after:{digest}"


def _saved_failure(error: Any) -> str | None:
    """The id of the request whose server error the provider saved under the key and has
    just replayed (`Idempotent-Replayed: true`, `Original-Request`); None for any other
    error."""
    headers = {str(k).lower(): v for k, v in dict(getattr(error, "headers", None) or {}).items()}
    if (getattr(error, "http_status", None) or 0) < 500:
        return None
    if str(headers.get("idempotent-replayed", "")).lower() != "true":
        return None
    return str(headers.get("original-request") or "replayed")


async def _keyed(
    method: Any,
    *args: Any,
    key: str,
    look_first: Callable[[], Awaitable[Any]] | None = None,
) -> Any:
    """`method(*args, {"idempotency_key": key})`; when the provider replays a server error it
    saved under `key`, the call is made again under a key derived from the failed request's
    id — the same for every worker that gets that answer, so concurrent tries still share one
    key. Without this the payment would wait for the key to expire (24 hours at Stripe).

    Only for calls that cannot act twice under two keys: the PaymentIntent's own state
    refuses a second confirm, capture or cancel; a refund is looked for first (`look_first`:
    what the failed call made after all, or None); so is an intent, by search, and a second
    create makes at most an intent that is never confirmed."""
    import stripe

    for rekeyed in range(REKEYS + 1):
        try:
            return await method(*args, {"idempotency_key": key})
        except stripe.StripeError as error:
            failed = _saved_failure(error)
            if failed is None or rekeyed == REKEYS:
                raise
            log.warning(
                "the provider replays a failure saved under the key; calling again under a "
                "derived key",
                extra={"idempotency_key": key, "original_request": failed},
            )
            if look_first is not None and (found := await look_first()) is not None:
                return found
            key = derived_key(key, failed)
    raise AssertionError("unreachable")


async def _keyed_intent(
    method: Any,
    *args: Any,
    key: str,
    look_first: Callable[[], Awaitable[Intent | None]] | None = None,
) -> Intent:
    import stripe

    try:
        result = await _keyed(method, *args, key=key, look_first=look_first)
    except stripe.StripeError as error:
        raise _translate(error) from error
    return result if isinstance(result, Intent) else Intent.from_stripe(result)


async def create_intent(payment: dict[str, Any]) -> Intent:
    """Create (not confirm) the PaymentIntent of a payment."""
    params = {
        "amount": payment["amount_total"],
        "currency": payment["currency"],
        "payment_method": payment["payment_method"],
        "capture_method": payment["capture_method"],
        "payment_method_types": ["card"],
        "description": payment["description"] or f"agentpay {payment['id']}",
        "metadata": {"payment_id": payment["id"], "agent_id": payment["agent_id"]},
    }
    if payment.get("customer"):
        params["customer"] = payment["customer"]
    return await _keyed_intent(
        client().v1.payment_intents.create_async,
        params,
        key=idempotency_key(payment["id"], "create"),
        look_first=lambda: _found_intent(payment["id"]),
    )


async def _found_intent(payment_id: str) -> Intent | None:
    """An intent the failed create made after all, as far as search shows it (search lags,
    and some accounts have none: then a second, never confirmed intent is the price)."""
    try:
        return await find_intent(payment_id)
    except ProviderError:
        return None


async def confirm_intent(payment_id: str, intent_id: str) -> Intent:
    return await _keyed_intent(
        client().v1.payment_intents.confirm_async,
        intent_id,
        {},
        key=idempotency_key(payment_id, "confirm"),
    )


async def retrieve_intent(intent_id: str) -> Intent:
    return await _call(client().v1.payment_intents.retrieve_async, intent_id, reading=True)


# Which of several intents found for one payment tells its story best (there should be one).
_RANK = {"succeeded": 0, "requires_capture": 1, "processing": 2, "requires_action": 3}


async def find_intent(payment_id: str) -> Intent | None:
    """The PaymentIntent created for a payment whose intent id we never stored (the create
    call's outcome was lost), found by `metadata['payment_id']`; None if there is none.

    Stripe's search is eventually consistent (a just-created intent may not show for about a
    minute), so None means "not found yet", never "safe to create another" — creation stays
    keyed by the payment id."""
    intents = await find_intents(payment_id)
    if not intents:
        return None
    return min(intents, key=lambda i: _RANK.get(i.status, 9))


async def find_intents(payment_id: str) -> list[Intent]:
    """Every PaymentIntent made for a payment (up to 10), by `metadata['payment_id']`; as
    `find_intent`, eventually consistent."""
    import stripe

    escaped = payment_id.replace("\\", "\\\\").replace("'", "\\'")
    try:
        result = await client().v1.payment_intents.search_async(
            {"query": f"metadata['payment_id']:'{escaped}'", "limit": 10}
        )
    except stripe.StripeError as error:
        raise _translate(error, reading=True) from error
    return [Intent.from_stripe(pi) for pi in result.data]


async def _intent_action(action: str, payment_id: str, intent_id: str, request: str) -> Intent:
    """Capture or cancel an intent. `request` names the request this call carries out: one
    key per request, so a retry repeats its call while the action asked for again after a
    refusal is a new call, not a replay of the refusal the provider keeps for 24 hours."""
    return await _keyed_intent(
        getattr(client().v1.payment_intents, f"{action}_async"),
        intent_id,
        {},
        key=idempotency_key(payment_id, f"{action}:{request}"),
    )


async def capture_intent(payment_id: str, intent_id: str, request: str) -> Intent:
    return await _intent_action("capture", payment_id, intent_id, request)


async def cancel_intent(payment_id: str, intent_id: str, request: str) -> Intent:
    return await _intent_action("cancel", payment_id, intent_id, request)


# A refund refused because the charge has less left than it asks for (Stripe's code for it, or
# ours when its answer carries none).
OVER_REFUND = "amount_too_large"
# Refusals of a refund that say the provider holds less of the charge than agentpay counts:
# something was refunded elsewhere (the Dashboard) and its event is not in yet, or was lost.
REMAINDER_REFUSALS = frozenset({OVER_REFUND, "charge_already_refunded"})

# The refund reasons Stripe accepts; any other reason of ours stays in our records only.
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})


@dataclass(frozen=True)
class Refund:
    """What agentpay needs to know of a provider Refund. `refund_id`: ours, from its metadata
    (None for a refund made outside agentpay, e.g. in the Dashboard)."""

    id: str
    status: str
    amount: int
    refund_id: str | None = None

    @classmethod
    def from_stripe(cls, refund: Any) -> Refund:
        data = refund if isinstance(refund, dict) else refund.to_dict()
        ours = (data.get("metadata") or {}).get("refund_id")
        return cls(
            id=data["id"],
            status=data["status"],
            amount=int(data["amount"]),
            refund_id=ours if isinstance(ours, str) else None,
        )


async def refund(
    payment_id: str, intent_id: str, refund_id: str, amount: int, reason: str | None = None
) -> Refund:
    """Refund `amount` of a payment; `refund_id` is ours and keys the call, so a retried
    refund never refunds twice."""
    params: dict[str, Any] = {
        "payment_intent": intent_id,
        "amount": amount,
        "metadata": {"payment_id": payment_id, "refund_id": refund_id},
    }
    if reason in REFUND_REASONS:
        params["reason"] = reason
    import stripe

    try:
        result = await _keyed(
            client().v1.refunds.create_async,
            params,
            key=idempotency_key(payment_id, f"refund:{refund_id}"),
            look_first=lambda: find_refund(intent_id, refund_id),
        )
    except stripe.InvalidRequestError as error:
        if error.param == "amount" and not error.code:
            # Stripe refuses a refund above what the charge has left ("Refund amount ($x) is
            # greater than unrefunded amount on charge ($y)") with no code: about this
            # refund, not about us. Else it failed for good, unrecorded, and stayed pending.
            raise Declined(OVER_REFUND, error.user_message or str(error)) from error
        raise _translate(error) from error
    except stripe.StripeError as error:
        raise _translate(error) from error
    return result if isinstance(result, Refund) else Refund.from_stripe(result)


async def list_refunds(intent_id: str) -> list[Refund]:
    """Every refund of a PaymentIntent at the provider, ours and any made elsewhere. Listing
    is consistent at once (unlike search)."""
    import stripe

    found: list[Refund] = []
    params: dict[str, Any] = {"payment_intent": intent_id, "limit": 100}
    try:
        while True:
            page = await client().v1.refunds.list_async(params)
            found.extend(Refund.from_stripe(item) for item in page.data)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1]["id"]
    except stripe.StripeError as error:
        raise _translate(error, reading=True) from error


async def list_events(types: list[str], created_gte: int, created_lte: int) -> list[dict[str, Any]]:
    """The provider's events of `types` created from `created_gte` to `created_lte` (Unix
    seconds, both included), newest first, each as the JSON a webhook would carry."""
    import stripe

    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {
        "types": types,
        "created": {"gte": created_gte, "lte": created_lte},
        "limit": 100,
    }
    try:
        while True:
            page = await client().v1.events.list_async(params)
            found.extend(item.to_dict(for_json=True) for item in page.data)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1]["id"]
    except stripe.StripeError as error:
        raise _translate(error, reading=True) from error


async def find_refund(intent_id: str, refund_id: str) -> Refund | None:
    """The provider's refund made for our `refund_id` (in its metadata), or None.

    Asked before a refund is made: a create whose answer was lost — or that the provider
    keeps answering with a saved error for its key's lifetime (24 hours at Stripe) — may
    have refunded already, and once the key has expired a second create would refund again."""
    return next((r for r in await list_refunds(intent_id) if r.refund_id == refund_id), None)


async def retrieve_refund(provider_refund_id: str) -> Refund:
    """The provider's current view of a refund (a `pending` one settles later)."""
    import stripe

    try:
        result = await client().v1.refunds.retrieve_async(provider_refund_id)
    except stripe.StripeError as error:
        raise _translate(error, reading=True) from error
    return Refund.from_stripe(result)
