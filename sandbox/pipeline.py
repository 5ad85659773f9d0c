"""What happens to every ``/v1`` request around its handler, in Stripe's order.

1. authentication (``Bearer sk_test_...``) -> 401 otherwise;
2. parameters decoded (form body for POST, query string for GET);
3. fault draw: an injected error returns a 500 here, before anything runs or is saved;
4. idempotency (POST with ``Idempotency-Key``): replay a saved result, refuse a key in flight
   (409) or reused with other parameters (400), else claim the key;
5. injected delay (the key stays in flight meanwhile), then the handler;
6. the result is saved under the key unless Stripe would not save it;
7. a *lost response* fault marks the response so the app drops the connection instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sandbox.errors import StripeAPIError
from sandbox.faults import FaultDecision
from sandbox.forms import FormDecodeError, decode_form
from sandbox.idempotency import SavedResponse
from sandbox.ids import new_id
from sandbox.state import API_VERSION, RequestInfo, SandboxState, dumps

__all__ = ["DROP_CONNECTION_HEADER", "ApiCall", "Handler", "run_api_request"]

log = logging.getLogger("sandbox")

DROP_CONNECTION_HEADER = "x-sandbox-drop-connection"
KEY_PREFIXES = ("sk_test_", "rk_test_")
MAX_KEY_LENGTH = 255  # of an Idempotency-Key, as at Stripe


@dataclass(frozen=True)
class ApiCall:
    """One API request as a handler sees it."""

    state: SandboxState
    method: str
    path: str
    path_params: dict[str, str]
    params: dict[str, Any]
    request: RequestInfo

    def path_param(self, name: str) -> str:
        return self.path_params[name]


# A handler returns the response object, or an already-serialized JSON string.
Handler = Callable[[ApiCall], dict[str, Any] | str]


def _api_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    key = ""
    if scheme.lower() == "bearer":
        key = credentials.strip()
    elif scheme.lower() == "basic":
        try:
            key = base64.b64decode(credentials).decode("utf-8").partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            key = ""
    if not key:
        raise StripeAPIError(
            401,
            "invalid_request_error",
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
            "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or "
            "we can help at https://support.stripe.com/.",
            store=False,
        )
    if not key.startswith(KEY_PREFIXES):
        masked = key[:8] + "*" * 12 + key[-4:] if len(key) > 12 else "*" * len(key)
        raise StripeAPIError(
            401,
            "invalid_request_error",
            f"Invalid API Key provided: {masked}",
            code="api_key_invalid",
            store=False,
        )
    return key


def _json(status: int, body: dict[str, Any] | str, headers: dict[str, str]) -> Response:
    payload = body if isinstance(body, str) else dumps(body)
    return Response(payload, status, headers, media_type="application/json")


def _fault_error(decision: FaultDecision, *, saved: bool = False) -> StripeAPIError:
    headers = {}
    if decision.should_retry is not None:
        headers["Stripe-Should-Retry"] = "true" if decision.should_retry else "false"
    return StripeAPIError(
        500,
        "api_error",
        "An unknown error occurred while processing your request (injected by the sandbox).",
        store=saved,
        headers=headers,
    )


async def run_api_request(request: Request, handler: Handler) -> Response:
    state: SandboxState = request.app.state.sandbox
    state.webhooks.attach(asyncio.get_running_loop())
    request_id = new_id("req", 14)
    headers = {
        "Request-Id": request_id,
        "Stripe-Version": request.headers.get("stripe-version", API_VERSION),
    }
    response = await _run(state, request, handler, request_id, headers)
    state.count_request(response.status_code)
    return response


async def _run(
    state: SandboxState,
    request: Request,
    handler: Handler,
    request_id: str,
    headers: dict[str, str],
) -> Response:
    method, path = request.method, request.url.path
    try:
        api_key = _api_key(request)
        raw = await request.body() if method == "POST" else request.url.query
        params = decode_form(raw)
    except StripeAPIError as exc:
        return _json(exc.status, exc.body(), headers)
    except (FormDecodeError, UnicodeDecodeError) as exc:
        error = StripeAPIError(400, "invalid_request_error", str(exc), store=False)
        return _json(400, error.body(), headers)

    key = request.headers.get("idempotency-key") if method == "POST" else None
    if key and len(key) > MAX_KEY_LENGTH:
        error = StripeAPIError(
            400,
            "invalid_request_error",
            f"Keys for idempotent requests can only be {MAX_KEY_LENGTH} characters long and "
            f"cannot contain whitespace. You passed in a key of length {len(key)}.",
            store=False,
        )
        return _json(400, error.body(), headers)
    decision = state.faults.decide(method, path)
    if decision.error and not (decision.error_saved and key):
        if decision.delay_ms:
            await asyncio.sleep(decision.delay_ms / 1000)
        fault = _fault_error(decision)
        return _json(fault.status, fault.body(), {**headers, **fault.headers})
    if key:
        outcome = state.idempotency.begin(api_key, key, method, path, params)
        if outcome.kind == "replay":
            assert outcome.saved is not None
            saved = outcome.saved
            replay_headers = {
                **headers,
                **saved.headers,
                "Idempotency-Key": key,
                "Idempotent-Replayed": "true",
                "Original-Request": saved.request_id,
            }
            response = _json(saved.status, saved.body.decode("utf-8"), replay_headers)
            return _mark_lost(response, decision)
        if outcome.kind == "in_flight":
            error = StripeAPIError(
                409,
                "idempotency_error",
                "There is currently another in-progress request using this Idempotent Key "
                "(that probably means you submitted twice, and the other request is still "
                f"going through): {key}. Please try again later.",
                store=False,
            )
            return _json(409, error.body(), headers)
        if outcome.kind == "mismatch":
            detail = (
                f" (it was first used for {outcome.first_path})"
                if outcome.first_path != path
                else ""
            )
            error = StripeAPIError(
                400,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with{detail}. Try using a key other than '{key}' if you meant "
                "to execute a different request.",
                store=False,
            )
            return _json(400, error.body(), headers)
        headers["Idempotency-Key"] = key

    saved_response: SavedResponse | None = None
    try:
        if decision.delay_ms:
            await asyncio.sleep(decision.delay_ms / 1000)
        call = ApiCall(
            state=state,
            method=method,
            path=path,
            path_params={k: str(v) for k, v in request.path_params.items()},
            params=params,
            request=RequestInfo(request_id, key or None),
        )
        store = True
        extra_headers: dict[str, str] = {}
        try:
            if decision.error and not decision.error_after_effect:
                # error_saved: the endpoint began, failed, and keeps the failure
                raise _fault_error(decision, saved=True)
            status, body = 200, handler(call)
            if decision.error:  # error_after_effect: it took effect; a 500 is kept instead
                raise _fault_error(decision, saved=True)
        except StripeAPIError as exc:
            status, body, store, extra_headers = exc.status, exc.body(), exc.store, exc.headers
        except Exception:
            log.exception("sandbox handler failed: %s %s", method, path)
            status, store = 500, False
            body = StripeAPIError(500, "api_error", "An unknown error occurred.").body()
        payload = body if isinstance(body, str) else dumps(body)
        if store:
            saved_response = SavedResponse(status, payload.encode("utf-8"), request_id)
        response = _json(status, payload, {**headers, **extra_headers})
    finally:
        if key:
            state.idempotency.finish(api_key, key, saved_response)
    return _mark_lost(response, decision)


def _mark_lost(response: Response, decision: FaultDecision) -> Response:
    """Apply a lost-response fault to a response whose effect has already happened."""
    if not decision.lose_response:
        return response
    if decision.lose_as == "500":
        error = StripeAPIError(
            500,
            "api_error",
            "The response was lost (injected by the sandbox); the request may have succeeded.",
        )
        return _json(500, error.body(), {"Request-Id": response.headers["request-id"]})
    response.headers[DROP_CONNECTION_HEADER] = "1"
    return response
