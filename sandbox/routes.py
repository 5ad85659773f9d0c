"""The ``/v1`` endpoints: thin handlers over ``payments``, ``refunds`` and the state's stores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.cards import TEST_CARDS, payment_method_object
from sandbox.disputes import close_dispute, get_dispute, update_dispute
from sandbox.errors import StripeAPIError, no_such
from sandbox.listing import created_filter, expand, list_object, paginate
from sandbox.params import get_expand, get_str
from sandbox.payments import (
    cancel_payment_intent,
    capture_payment_intent,
    confirm_payment_intent,
    create_payment_intent,
    get_payment_intent,
    update_payment_intent,
)
from sandbox.pipeline import ApiCall, Handler, run_api_request
from sandbox.refunds import create_refund
from sandbox.search import compile_query

__all__ = ["v1_routes"]


def _expanded(call: ApiCall, obj: dict[str, Any]) -> dict[str, Any]:
    return expand(obj, get_expand(call.params), call.state.lookup)


def _newest_first(items: Iterable[Any], call: ApiCall) -> list[Any]:
    keep = created_filter(call.params)
    return [item for item in reversed(list(items)) if keep(item.created)]


def _page(call: ApiCall, items: list[Any], url: str) -> dict[str, Any]:
    page, has_more = paginate(items, call.params)
    return _expanded(call, list_object([item.to_dict() for item in page], has_more, url))


# --- PaymentIntents ----------------------------------------------------------------------


def pi_create(call: ApiCall) -> dict[str, Any]:
    return _expanded(call, create_payment_intent(call.state, call.params, call.request))


def pi_update(call: ApiCall) -> dict[str, Any]:
    pi = update_payment_intent(call.state, call.path_param("id"), call.params, call.request)
    return _expanded(call, pi)


def pi_confirm(call: ApiCall) -> dict[str, Any]:
    pi = confirm_payment_intent(call.state, call.path_param("id"), call.params, call.request)
    return _expanded(call, pi)


def pi_capture(call: ApiCall) -> dict[str, Any]:
    pi = capture_payment_intent(call.state, call.path_param("id"), call.params, call.request)
    return _expanded(call, pi)


def pi_cancel(call: ApiCall) -> dict[str, Any]:
    pi = cancel_payment_intent(call.state, call.path_param("id"), call.params, call.request)
    return _expanded(call, pi)


def pi_retrieve(call: ApiCall) -> dict[str, Any]:
    with call.state.lock:
        return _expanded(call, get_payment_intent(call.state, call.path_param("id")).to_dict())


def pi_list(call: ApiCall) -> dict[str, Any]:
    customer = get_str(call.params, "customer")
    with call.state.lock:
        items = [
            pi
            for pi in _newest_first(call.state.payment_intents.values(), call)
            if customer is None or pi.customer == customer
        ]
        return _page(call, items, "/v1/payment_intents")


def pi_search(call: ApiCall) -> dict[str, Any]:
    query = get_str(call.params, "query", required=True)
    assert query is not None
    matches = compile_query(query)
    params = dict(call.params)
    page_token = get_str(params, "page")
    if page_token is not None:
        params["starting_after"] = page_token
    with call.state.lock:
        items = [pi for pi in reversed(call.state.payment_intents.values()) if matches(pi)]
        page, has_more = paginate(items, params)
        result = {
            "object": "search_result",
            "data": [pi.to_dict() for pi in page],
            "has_more": has_more,
            "next_page": page[-1].id if has_more and page else None,
            "url": "/v1/payment_intents/search",
        }
        return _expanded(call, result)


# --- Refunds, charges, payment methods ---------------------------------------------------


def refund_create(call: ApiCall) -> dict[str, Any]:
    return _expanded(call, create_refund(call.state, call.params, call.request))


def refund_retrieve(call: ApiCall) -> dict[str, Any]:
    with call.state.lock:
        refund = call.state.refunds.get(call.path_param("id"))
        if refund is None:
            raise no_such("refund", call.path_param("id"), "id")
        return _expanded(call, refund.to_dict())


def refund_list(call: ApiCall) -> dict[str, Any]:
    with call.state.lock:
        return _of_intent_or_charge(call, call.state.refunds.values(), "/v1/refunds")


def _of_intent_or_charge(call: ApiCall, objects: Iterable[Any], url: str) -> dict[str, Any]:
    """A page of refunds or disputes, filtered by `payment_intent` and `charge` as Stripe's
    lists of them are (the caller holds the state's lock)."""
    pi_id = get_str(call.params, "payment_intent")
    charge_id = get_str(call.params, "charge")
    items = [
        o
        for o in _newest_first(objects, call)
        if (pi_id is None or o.payment_intent == pi_id)
        and (charge_id is None or o.charge == charge_id)
    ]
    return _page(call, items, url)


def charge_retrieve(call: ApiCall) -> dict[str, Any]:
    with call.state.lock:
        charge = call.state.charges.get(call.path_param("id"))
        if charge is None:
            raise no_such("charge", call.path_param("id"), "id")
        return _expanded(call, charge.to_dict())


def charge_list(call: ApiCall) -> dict[str, Any]:
    pi_id = get_str(call.params, "payment_intent")
    with call.state.lock:
        items = [
            c
            for c in _newest_first(call.state.charges.values(), call)
            if pi_id is None or c.payment_intent == pi_id
        ]
        return _page(call, items, "/v1/charges")


def payment_method_retrieve(call: ApiCall) -> dict[str, Any]:
    pm_id = call.path_param("id")
    if pm_id not in TEST_CARDS:
        raise no_such("PaymentMethod", pm_id, "payment_method")
    return payment_method_object(pm_id, 0)


# --- Disputes ----------------------------------------------------------------------------


def dispute_retrieve(call: ApiCall) -> dict[str, Any]:
    with call.state.lock:
        return _expanded(call, get_dispute(call.state, call.path_param("id")).to_dict())


def dispute_list(call: ApiCall) -> dict[str, Any]:
    with call.state.lock:
        return _of_intent_or_charge(call, call.state.disputes.values(), "/v1/disputes")


def dispute_update(call: ApiCall) -> dict[str, Any]:
    dispute = update_dispute(call.state, call.path_param("id"), call.params, call.request)
    return _expanded(call, dispute)


def dispute_close(call: ApiCall) -> dict[str, Any]:
    return _expanded(call, close_dispute(call.state, call.path_param("id"), call.request))


# --- Events ------------------------------------------------------------------------------


def _type_matcher(call: ApiCall) -> Callable[[str], bool]:
    wanted: list[str] = []
    single = get_str(call.params, "type")
    if single is not None:
        wanted.append(single)
    many = call.params.get("types")
    if isinstance(many, list):
        wanted.extend(t for t in many if isinstance(t, str))
    if not wanted:
        return lambda _type: True

    def match(event_type: str) -> bool:
        return any(
            w == event_type or (w.endswith("*") and event_type.startswith(w[:-1])) for w in wanted
        )

    return match


def event_retrieve(call: ApiCall) -> str:
    with call.state.lock:
        event = call.state.events.get(call.path_param("id"))
        if event is None:
            raise no_such("event", call.path_param("id"), "id")
        return event.body  # byte for byte what the webhook endpoints received


def event_list(call: ApiCall) -> dict[str, Any]:
    matches = _type_matcher(call)
    keep = created_filter(call.params)
    with call.state.lock:
        items = [
            e.data
            for e in reversed(call.state.events.values())
            if matches(e.type) and keep(e.data["created"])
        ]
        page, has_more = paginate(items, call.params)
        return list_object(page, has_more, "/v1/events")


def not_found(call: ApiCall) -> dict[str, Any]:
    raise StripeAPIError(
        404,
        "invalid_request_error",
        f"Unrecognized request URL ({call.method}: {call.path}). Please see "
        "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        store=False,
    )


def _route(path: str, handler: Handler, methods: list[str]) -> Route:
    async def endpoint(request: Request) -> Response:
        return await run_api_request(request, handler)

    return Route(path, endpoint, methods=methods)


def v1_routes() -> list[Route]:
    return [
        _route("/v1/payment_intents", pi_create, ["POST"]),
        _route("/v1/payment_intents", pi_list, ["GET"]),
        _route("/v1/payment_intents/search", pi_search, ["GET"]),
        _route("/v1/payment_intents/{id}", pi_retrieve, ["GET"]),
        _route("/v1/payment_intents/{id}", pi_update, ["POST"]),
        _route("/v1/payment_intents/{id}/confirm", pi_confirm, ["POST"]),
        _route("/v1/payment_intents/{id}/capture", pi_capture, ["POST"]),
        _route("/v1/payment_intents/{id}/cancel", pi_cancel, ["POST"]),
        _route("/v1/refunds", refund_create, ["POST"]),
        _route("/v1/refunds", refund_list, ["GET"]),
        _route("/v1/refunds/{id}", refund_retrieve, ["GET"]),
        _route("/v1/charges", charge_list, ["GET"]),
        _route("/v1/charges/{id}", charge_retrieve, ["GET"]),
        _route("/v1/payment_methods/{id}", payment_method_retrieve, ["GET"]),
        _route("/v1/disputes", dispute_list, ["GET"]),
        _route("/v1/disputes/{id}", dispute_retrieve, ["GET"]),
        _route("/v1/disputes/{id}", dispute_update, ["POST"]),
        _route("/v1/disputes/{id}/close", dispute_close, ["POST"]),
        _route("/v1/events", event_list, ["GET"]),
        _route("/v1/events/{id}", event_retrieve, ["GET"]),
        _route("/v1/{rest:path}", not_found, ["GET", "POST", "DELETE"]),
    ]
