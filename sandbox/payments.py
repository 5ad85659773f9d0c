"""PaymentIntent operations and their state transitions, with Stripe's rules and events.

Every function runs under ``state.lock``, validates first (raising errors that are not saved
for idempotent replay), then mutates and records events. Declines raise a 402 after the state
change, as Stripe does: the PaymentIntent really moved to ``requires_payment_method``.
"""

from __future__ import annotations

from typing import Any

from sandbox.cards import TEST_CARDS, TestCard, payment_method_object
from sandbox.disputes import open_dispute
from sandbox.errors import (
    DOC_URL,
    card_error,
    invalid_request,
    missing_param,
    no_such,
    unexpected_state,
)
from sandbox.ids import new_id, now, random_token
from sandbox.objects import Charge, PaymentIntent
from sandbox.params import get_bool, get_int, get_metadata, get_str
from sandbox.state import RequestInfo, SandboxState

__all__ = [
    "CANCELABLE",
    "authenticate_payment_intent",
    "cancel_payment_intent",
    "capture_payment_intent",
    "confirm_payment_intent",
    "create_payment_intent",
    "get_payment_intent",
    "update_payment_intent",
]

MAX_AMOUNT = 99_999_999
CONFIRMABLE = ("requires_payment_method", "requires_confirmation", "requires_action")
CANCELABLE = (
    "requires_payment_method",
    "requires_capture",
    "requires_confirmation",
    "requires_action",
    "processing",
)
CAPTURE_METHODS = ("automatic", "automatic_async", "manual")
CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
REDIRECT_MESSAGE = (
    "This PaymentIntent is configured to accept payment methods enabled in your Dashboard, "
    "some of which may require a full page redirect to succeed. If you do not want to accept "
    "redirect-based payment methods, set `automatic_payment_methods[enabled]` to `true` and "
    "`automatic_payment_methods[allow_redirects]` to `never` when creating Setup Intents and "
    "Payment Intents. If you do want to accept redirect-based payment methods, set the "
    "`return_url` parameter when confirming the Payment Intent."
)


def get_payment_intent(state: SandboxState, pi_id: str, *, param: str = "intent") -> PaymentIntent:
    pi = state.payment_intents.get(pi_id)
    if pi is None:
        raise no_such("payment_intent", pi_id, param, status=404 if param == "intent" else 400)
    return pi


def _payment_method(params: dict[str, Any]) -> str | None:
    pm = get_str(params, "payment_method")
    if pm is not None and pm not in TEST_CARDS:
        raise no_such("PaymentMethod", pm, "payment_method", status=400)
    return pm


def _amount(params: dict[str, Any], *, required: bool) -> int | None:
    amount = get_int(params, "amount", required=required, minimum=1)
    if amount is not None and amount > MAX_AMOUNT:
        raise invalid_request(
            f"Amount must be no more than {MAX_AMOUNT}", code="amount_too_large", param="amount"
        )
    return amount


def _currency(params: dict[str, Any], *, required: bool) -> str | None:
    currency = get_str(params, "currency", required=required)
    if currency is None:
        return None
    if len(currency) != 3 or not currency.isalpha():
        raise invalid_request(f"Invalid currency: {currency.lower()}.", param="currency")
    return currency.lower()


def _method_settings(params: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """``payment_method_types`` and ``automatic_payment_methods``, defaulted like Stripe."""
    types = params.get("payment_method_types")
    apm = params.get("automatic_payment_methods")
    if types is not None and apm is not None:
        raise invalid_request(
            "You may only specify one of these parameters: automatic_payment_methods, "
            "payment_method_types.",
            param="automatic_payment_methods",
        )
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise invalid_request("Invalid array", param="payment_method_types")
        return list(types), None
    if apm is not None:
        if not isinstance(apm, dict):
            raise invalid_request("Invalid object", param="automatic_payment_methods")
        enabled = get_bool(apm, "enabled")
        if enabled is None:
            raise missing_param("automatic_payment_methods[enabled]")
        redirects = get_str(apm, "allow_redirects", choices=("always", "never")) or "always"
        if enabled:
            return ["card"], {"allow_redirects": redirects, "enabled": True}
        return ["card"], None
    return ["card"], {"allow_redirects": "always", "enabled": True}


def _check_confirmable(
    pi: PaymentIntent, params: dict[str, Any], pm: str | None, *, creating: bool
) -> str:
    """Validate a confirmation before anything changes; returns the PaymentMethod to use."""
    if pi.status not in CONFIRMABLE:
        reason = (
            "it has already succeeded after being previously confirmed"
            if pi.status == "succeeded"
            else f"it has a status of {pi.status}"
        )
        raise unexpected_state(
            f"You cannot confirm this PaymentIntent because {reason}.", pi.to_dict()
        )
    method = pm or pi.payment_method
    if method is None:
        raise invalid_request(
            "You cannot confirm this PaymentIntent because it's missing a payment method. "
            "Update the PaymentIntent with a payment method and then confirm it again.",
            code="payment_intent_unexpected_state",
            param=None if creating else "payment_method",
        )
    if "card" not in pi.payment_method_types:
        raise invalid_request(
            "The PaymentMethod provided (card) is not allowed for this PaymentIntent. Please "
            "attach a PaymentMethod of one of the following types: "
            f"{', '.join(pi.payment_method_types)}.",
            code="payment_intent_incompatible_payment_method",
            param="payment_method",
        )
    apm = pi.automatic_payment_methods
    if apm and apm.get("allow_redirects") != "never" and not get_str(params, "return_url"):
        raise invalid_request(REDIRECT_MESSAGE, param="return_url")
    return method


def create_payment_intent(
    state: SandboxState, params: dict[str, Any], req: RequestInfo
) -> dict[str, Any]:
    amount = _amount(params, required=True)
    currency = _currency(params, required=True)
    assert amount is not None and currency is not None
    capture_method = get_str(params, "capture_method", choices=CAPTURE_METHODS)
    types, apm = _method_settings(params)
    pm = _payment_method(params)
    confirm = get_bool(params, "confirm") or False
    metadata = get_metadata(params) or {}
    setup_future_usage = get_str(
        params, "setup_future_usage", choices=("on_session", "off_session")
    )
    created = now()
    pi_id = new_id("pi")
    pi = PaymentIntent(
        id=pi_id,
        amount=amount,
        currency=currency,
        created=created,
        client_secret=f"{pi_id}_secret_{random_token(25)}",
        capture_method=capture_method or "automatic_async",
        payment_method_types=types,
        automatic_payment_methods=apm,
        status="requires_confirmation" if pm else "requires_payment_method",
        metadata={k: v for k, v in metadata.items() if v != ""},
        description=get_str(params, "description"),
        payment_method=pm,
        customer=get_str(params, "customer"),
        receipt_email=get_str(params, "receipt_email"),
        statement_descriptor=get_str(params, "statement_descriptor"),
        statement_descriptor_suffix=get_str(params, "statement_descriptor_suffix"),
        setup_future_usage=setup_future_usage,
    )
    with state.lock:
        method = _check_confirmable(pi, params, pm, creating=True) if confirm else None
        state.payment_intents[pi.id] = pi
        state.emit("payment_intent.created", pi.to_dict(), req)
        if method is not None:
            _attempt(state, pi, method, params, req)
        return pi.to_dict()


def update_payment_intent(
    state: SandboxState, pi_id: str, params: dict[str, Any], req: RequestInfo
) -> dict[str, Any]:
    with state.lock:
        pi = get_payment_intent(state, pi_id)
        metadata = get_metadata(params)
        money_fields = ("amount", "currency", "payment_method", "capture_method")
        if any(f in params for f in money_fields) and pi.status not in CONFIRMABLE:
            raise unexpected_state(
                "You cannot update this PaymentIntent because it has a status of "
                f"{pi.status}. Only metadata and description may be updated.",
                pi.to_dict(),
            )
        amount = _amount(params, required=False)
        currency = _currency(params, required=False)
        pm = _payment_method(params)
        capture_method = get_str(params, "capture_method", choices=CAPTURE_METHODS)
        description = get_str(params, "description")
        if amount is not None:
            pi.amount = amount
        if currency is not None:
            pi.currency = currency
        if capture_method is not None:
            pi.capture_method = capture_method
        if pm is not None:
            pi.payment_method = pm
            if pi.status in ("requires_payment_method", "requires_action"):
                pi.status = "requires_confirmation"
                pi.next_action = None
        if description is not None:
            pi.description = description
        if metadata is not None:
            _merge_metadata(pi.metadata, metadata, replace=params.get("metadata") == "")
        return pi.to_dict()


def _merge_metadata(target: dict[str, str], update: dict[str, str], *, replace: bool) -> None:
    if replace:
        target.clear()
    for key, value in update.items():
        if value == "":
            target.pop(key, None)
        else:
            target[key] = value


def confirm_payment_intent(
    state: SandboxState, pi_id: str, params: dict[str, Any], req: RequestInfo
) -> dict[str, Any]:
    with state.lock:
        pi = get_payment_intent(state, pi_id)
        pm = _payment_method(params)
        method = _check_confirmable(pi, params, pm, creating=False)
        _attempt(state, pi, method, params, req)
        return pi.to_dict()


def _attempt(
    state: SandboxState, pi: PaymentIntent, pm: str, params: dict[str, Any], req: RequestInfo
) -> None:
    """Run one payment attempt with ``pm``: succeed, need authentication, or decline."""
    card = TEST_CARDS[pm]
    pi.payment_method = pm
    off_session = get_bool(params, "off_session") or False
    error_on_action = get_bool(params, "error_on_requires_action") or False
    if card.outcome == "succeed":
        _authorize(state, pi, req)
    elif card.outcome == "authenticate" and not (off_session or error_on_action):
        pi.status = "requires_action"
        pi.last_payment_error = None
        pi.next_action = {
            "type": "use_stripe_sdk",
            "use_stripe_sdk": {
                "source": new_id("src"),
                "stripe_js": f"https://hooks.stripe.com/redirect/authenticate/{pi.id}",
                "type": "three_d_secure_redirect",
            },
        }
        state.emit("payment_intent.requires_action", pi.to_dict(), req)
    else:
        if card.outcome == "authenticate":
            card = TestCard(
                card.brand,
                card.last4,
                card.funding,
                "decline",
                "authentication_required",
                "authentication_required",
                "Your card was declined. This transaction requires authentication.",
            )
        _decline(state, pi, pm, card, req)


def _authorize(state: SandboxState, pi: PaymentIntent, req: RequestInfo) -> None:
    """A successful authorization: captured at once, or held for a manual capture."""
    assert pi.payment_method is not None
    manual = pi.capture_method == "manual"
    charge = Charge(
        id=new_id("ch"),
        amount=pi.amount,
        currency=pi.currency,
        created=now(),
        payment_intent=pi.id,
        payment_method=pi.payment_method,
        status="succeeded",
        captured=not manual,
        amount_captured=0 if manual else pi.amount,
        description=pi.description,
        metadata=dict(pi.metadata),
    )
    state.charges[charge.id] = charge
    pi.latest_charge = charge.id
    pi.last_payment_error = None
    pi.next_action = None
    if manual:
        pi.status = "requires_capture"
        pi.amount_capturable = pi.amount
        state.emit("payment_intent.amount_capturable_updated", pi.to_dict(), req)
    else:
        pi.status = "succeeded"
        pi.amount_received = pi.amount
        state.emit("payment_intent.succeeded", pi.to_dict(), req)
        open_dispute(state, pi, charge, req)


def _decline(
    state: SandboxState, pi: PaymentIntent, pm: str, card: TestCard, req: RequestInfo
) -> None:
    assert card.code is not None and card.message is not None
    charge = Charge(
        id=new_id("ch"),
        amount=pi.amount,
        currency=pi.currency,
        created=now(),
        payment_intent=pi.id,
        payment_method=pm,
        status="failed",
        failure_code=card.code,
        failure_message=card.message,
        decline_code=card.decline_code,
        description=pi.description,
        metadata=dict(pi.metadata),
    )
    state.charges[charge.id] = charge
    pm_object = payment_method_object(pm, pi.created)
    error: dict[str, Any] = {
        "charge": charge.id,
        "code": card.code,
        "decline_code": card.decline_code,
        "doc_url": DOC_URL + card.code.replace("_", "-"),
        "message": card.message,
        "payment_method": pm_object,
        "type": "card_error",
    }
    if card.param is not None:
        error["param"] = card.param
    pi.status = "requires_payment_method"
    pi.latest_charge = charge.id
    pi.last_payment_error = error
    pi.next_action = None
    snapshot = pi.to_dict()
    state.emit("payment_intent.payment_failed", snapshot, req)
    raise card_error(
        card.message,
        code=card.code,
        decline_code=card.decline_code,
        extra={
            "charge": charge.id,
            "payment_intent": snapshot,
            "payment_method": pm_object,
            **({"param": card.param} if card.param else {}),
        },
    )


def capture_payment_intent(
    state: SandboxState, pi_id: str, params: dict[str, Any], req: RequestInfo
) -> dict[str, Any]:
    with state.lock:
        pi = get_payment_intent(state, pi_id)
        if pi.status != "requires_capture":
            raise unexpected_state(
                "This PaymentIntent could not be captured because it has a status of "
                f"{pi.status}. Only a PaymentIntent with one of the following statuses may be "
                "captured: requires_capture.",
                pi.to_dict(),
            )
        amount = get_int(params, "amount_to_capture", minimum=1)
        if amount is None:
            amount = pi.amount_capturable
        if amount > pi.amount_capturable:
            raise invalid_request(
                f"The amount_to_capture ({amount}) must be less than or equal to the "
                f"PaymentIntent's amount_capturable ({pi.amount_capturable}).",
                code="amount_too_large",
                param="amount_to_capture",
            )
        metadata = get_metadata(params)
        if metadata is not None:
            _merge_metadata(pi.metadata, metadata, replace=False)
        assert pi.latest_charge is not None
        charge = state.charges[pi.latest_charge]
        charge.captured = True
        charge.amount_captured = amount
        pi.status = "succeeded"
        pi.amount_received = amount
        pi.amount_capturable = 0
        state.emit("payment_intent.succeeded", pi.to_dict(), req)
        open_dispute(state, pi, charge, req)
        return pi.to_dict()


def cancel_payment_intent(
    state: SandboxState, pi_id: str, params: dict[str, Any], req: RequestInfo
) -> dict[str, Any]:
    with state.lock:
        pi = get_payment_intent(state, pi_id)
        if pi.status not in CANCELABLE:
            raise unexpected_state(
                "You cannot cancel this PaymentIntent because it has a status of "
                f"{pi.status}. Only a PaymentIntent with one of the following statuses may be "
                f"canceled: {', '.join(CANCELABLE)}.",
                pi.to_dict(),
            )
        reason = get_str(params, "cancellation_reason", choices=CANCELLATION_REASONS)
        # The held funds are released. Since API version 2025-03-31.basil (the SDK's is
        # later) that makes no Refund and leaves the charge's `amount_refunded` and
        # `refunded` alone; so does a partial capture.
        pi.status = "canceled"
        pi.canceled_at = now()
        pi.cancellation_reason = reason
        pi.amount_capturable = 0
        pi.next_action = None
        state.emit("payment_intent.canceled", pi.to_dict(), req)
        return pi.to_dict()


def authenticate_payment_intent(
    state: SandboxState, pi_id: str, succeed: bool, req: RequestInfo
) -> dict[str, Any]:
    """What the customer finishing (or failing) 3-D Secure does to a ``requires_action`` PI."""
    with state.lock:
        pi = get_payment_intent(state, pi_id)
        if pi.status != "requires_action":
            raise unexpected_state(
                f"This PaymentIntent has a status of {pi.status}, not requires_action.",
                pi.to_dict(),
            )
        if succeed:
            _authorize(state, pi, req)
        else:
            assert pi.payment_method is not None
            pi.status = "requires_payment_method"
            pi.next_action = None
            pi.last_payment_error = {
                "code": "payment_intent_authentication_failure",
                "doc_url": DOC_URL + "payment-intent-authentication-failure",
                "message": (
                    "The provided PaymentMethod has failed authentication. You can provide "
                    "payment_method_data or a new PaymentMethod to attempt to fulfill this "
                    "PaymentIntent again."
                ),
                "payment_method": payment_method_object(pi.payment_method, pi.created),
                "type": "invalid_request_error",
            }
            state.emit("payment_intent.payment_failed", pi.to_dict(), req)
        return pi.to_dict()
