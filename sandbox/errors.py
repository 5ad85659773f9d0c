"""Stripe's error shape, raised by the sandbox's domain code and rendered by the app."""

from __future__ import annotations

from typing import Any

__all__ = [
    "StripeAPIError",
    "card_error",
    "invalid_request",
    "missing_param",
    "no_such",
    "unexpected_state",
]

DOC_URL = "https://stripe.com/docs/error-codes/"


class StripeAPIError(Exception):
    """An error response in Stripe's format.

    ``store`` says whether an idempotency key keeps this result for replay. Stripe only saves
    results once an endpoint began executing: parameter validation failures are not saved (a
    corrected retry with the same key is allowed); declines and state conflicts are.
    """

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        extra: dict[str, Any] | None = None,
        store: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.param = param
        self.decline_code = decline_code
        self.extra = extra or {}
        self.store = store
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {}
        if self.code is not None:
            error["code"] = self.code
        if self.decline_code is not None:
            error["decline_code"] = self.decline_code
        if self.code is not None:
            error["doc_url"] = DOC_URL + self.code.replace("_", "-")
        error["message"] = self.message
        if self.param is not None:
            error["param"] = self.param
        error.update(self.extra)
        error["type"] = self.type
        return {"error": error}


def invalid_request(
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    store: bool = False,
    extra: dict[str, Any] | None = None,
) -> StripeAPIError:
    """A 400 ``invalid_request_error``; by default a validation error (not stored)."""
    return StripeAPIError(
        400, "invalid_request_error", message, code=code, param=param, store=store, extra=extra
    )


def missing_param(param: str) -> StripeAPIError:
    return invalid_request(
        f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def no_such(kind: str, object_id: str, param: str, *, status: int = 404) -> StripeAPIError:
    """Stripe's ``resource_missing``: 404 for a path id, 400 for an id passed as a parameter."""
    return StripeAPIError(
        status,
        "invalid_request_error",
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param,
        store=False,
    )


def unexpected_state(message: str, payment_intent: dict[str, Any]) -> StripeAPIError:
    """The PaymentIntent is in the wrong status for the operation (saved for replay)."""
    return StripeAPIError(
        400,
        "invalid_request_error",
        message,
        code="payment_intent_unexpected_state",
        extra={"payment_intent": payment_intent},
        store=True,
    )


def card_error(
    message: str,
    *,
    code: str,
    decline_code: str | None,
    extra: dict[str, Any],
) -> StripeAPIError:
    """A 402 ``card_error`` (a decline); Stripe saves it for idempotent replay."""
    return StripeAPIError(
        402, "card_error", message, code=code, decline_code=decline_code, extra=extra, store=True
    )
