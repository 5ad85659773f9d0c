"""The ``/_sandbox`` control API (JSON, no auth): faults, webhooks, stats, reset, test hooks."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.errors import StripeAPIError
from sandbox.faults import FaultConfig
from sandbox.payments import authenticate_payment_intent, get_payment_intent
from sandbox.refunds import fail_refund
from sandbox.state import RequestInfo, SandboxState

__all__ = ["control_routes"]

# The status a PaymentIntent has when Stripe sends each event; used by ``emit``.
IMPLIED_STATUS = {
    "payment_intent.processing": "processing",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.canceled": "canceled",
    "payment_intent.payment_failed": "requires_payment_method",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.amount_capturable_updated": "requires_capture",
}


class ControlError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ControlError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError("body must be a JSON object")
    return data


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": "invalid_request_error", "message": message}}, status_code=status
    )


ControlHandler = Callable[[Request], Awaitable[Response]]


def _handled(fn: ControlHandler) -> ControlHandler:
    """Turn ControlError / ValueError / StripeAPIError into JSON error responses."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ControlError as exc:
            return _error(str(exc), exc.status)
        except StripeAPIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except ValueError as exc:
            return _error(str(exc))

    return endpoint


# --- faults --------------------------------------------------------------------------------


async def faults_get(request: Request) -> Response:
    return JSONResponse(_state(request).faults.snapshot())


async def faults_set(request: Request) -> Response:
    state = _state(request)
    state.faults.configure(FaultConfig.from_json(await _body(request)))
    return JSONResponse(state.faults.snapshot())


async def faults_clear(request: Request) -> Response:
    state = _state(request)
    state.faults.clear()
    return JSONResponse(state.faults.snapshot())


# --- webhooks ------------------------------------------------------------------------------


async def webhooks_list(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(
        {
            "default_secret": state.webhook_secret,
            "endpoints": [e.to_json() for e in state.webhooks.endpoints()],
            "config": asdict(state.webhooks.config),
        }
    )


async def webhooks_add(request: Request) -> Response:
    body = await _body(request)
    url = body.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ControlError("url must be an http(s) URL")
    secret = body.get("secret")
    if secret is not None and not isinstance(secret, str):
        raise ControlError("secret must be a string")
    events = body.get("enabled_events")
    if events is not None and (
        not isinstance(events, list) or not all(isinstance(e, str) for e in events)
    ):
        raise ControlError("enabled_events must be a list of strings")
    endpoint = _state(request).webhooks.add_endpoint(url, secret, events)
    return JSONResponse(endpoint.to_json(), status_code=201)


async def webhooks_remove(request: Request) -> Response:
    endpoint_id = request.path_params["id"]
    if not _state(request).webhooks.remove_endpoint(endpoint_id):
        raise ControlError(f"no such webhook endpoint: {endpoint_id}", 404)
    return JSONResponse({"id": endpoint_id, "deleted": True})


async def webhooks_config_get(request: Request) -> Response:
    return JSONResponse(asdict(_state(request).webhooks.config))


async def webhooks_config_set(request: Request) -> Response:
    config = _state(request).webhooks.configure(await _body(request))
    return JSONResponse(asdict(config))


async def webhooks_deliveries(request: Request) -> Response:
    webhooks = _state(request).webhooks
    event_id = request.query_params.get("event_id")
    return JSONResponse(
        {"pending": webhooks.pending(), "deliveries": webhooks.deliveries(event_id)}
    )


# --- state ---------------------------------------------------------------------------------


async def reset(request: Request) -> Response:
    state = _state(request)
    state.reset()
    return JSONResponse({"reset": True})


async def stats(request: Request) -> Response:
    return JSONResponse(_state(request).stats())


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


# --- PaymentIntent test hooks --------------------------------------------------------------


async def pi_emit(request: Request) -> Response:
    """Emit an arbitrary event about a PaymentIntent without changing it.

    ``{"type": "payment_intent.processing", "status": optional}``: ``data.object`` is the
    PaymentIntent as it is now, with ``status`` set to what the event type implies (or to
    ``status``). ``charge.*`` types carry the PaymentIntent's latest charge instead.
    """
    state = _state(request)
    body = await _body(request)
    type_ = body.get("type")
    if not isinstance(type_, str) or not type_.startswith(("payment_intent.", "charge.")):
        raise ControlError("type must be a payment_intent.* or charge.* event type")
    status = body.get("status")
    if status is not None and not isinstance(status, str):
        raise ControlError("status must be a string")
    with state.lock:
        pi = get_payment_intent(state, request.path_params["id"])
        if type_.startswith("charge."):
            if pi.latest_charge is None:
                raise ControlError("this PaymentIntent has no charge yet")
            obj = state.charges[pi.latest_charge].to_dict()
        else:
            obj = pi.to_dict()
            obj["status"] = status or IMPLIED_STATUS.get(type_, pi.status)
        event = state.emit(type_, obj, RequestInfo())
    return JSONResponse(event.data)


async def pi_authenticate(request: Request) -> Response:
    """The customer completes (``{"outcome": "succeed"}``) or fails 3-D Secure."""
    body = await _body(request)
    outcome = body.get("outcome", "succeed")
    if outcome not in ("succeed", "fail"):
        raise ControlError('outcome must be "succeed" or "fail"')
    pi = authenticate_payment_intent(
        _state(request), request.path_params["id"], outcome == "succeed", RequestInfo()
    )
    return JSONResponse(pi)


async def refund_fail(request: Request) -> Response:
    """A refund that succeeded fails afterwards (Stripe: a closed card)."""
    refund = fail_refund(_state(request), request.path_params["id"], RequestInfo())
    return JSONResponse(refund)


def control_routes() -> list[Route]:
    def route(path: str, fn: ControlHandler, method: str) -> Route:
        return Route(path, _handled(fn), methods=[method])

    return [
        route("/_sandbox/health", health, "GET"),
        route("/_sandbox/faults", faults_get, "GET"),
        route("/_sandbox/faults", faults_set, "POST"),
        route("/_sandbox/faults", faults_clear, "DELETE"),
        route("/_sandbox/webhooks", webhooks_list, "GET"),
        route("/_sandbox/webhooks", webhooks_add, "POST"),
        route("/_sandbox/webhooks/config", webhooks_config_get, "GET"),
        route("/_sandbox/webhooks/config", webhooks_config_set, "POST"),
        route("/_sandbox/webhooks/deliveries", webhooks_deliveries, "GET"),
        route("/_sandbox/webhooks/{id}", webhooks_remove, "DELETE"),
        route("/_sandbox/reset", reset, "POST"),
        route("/_sandbox/stats", stats, "GET"),
        route("/_sandbox/payment_intents/{id}/emit", pi_emit, "POST"),
        route("/_sandbox/payment_intents/{id}/authenticate", pi_authenticate, "POST"),
        route("/_sandbox/refunds/{id}/fail", refund_fail, "POST"),
    ]
