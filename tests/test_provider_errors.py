"""How provider errors are read: which refusals are about the payment (a recorded decline)
and which about us (our configuration: the payment waits and the sweep tries again); a
connection cut, or stalled, after the response's headers is an unknown outcome, retried
like any other; a card error's decline code is the one Stripe sends.

The errors are built by the SDK's own requestor from Stripe-shaped bodies, as it builds
them from a real answer."""

from __future__ import annotations

import json
from typing import Any

from tasks import provider


def sdk_error(status: int, error: dict[str, Any]) -> Any:
    """The exception the SDK raises for a v1 answer `status` with body {"error": error}."""
    from stripe._api_requestor import _APIRequestor

    body = {"error": error}
    return _APIRequestor._global_instance().specific_v1_api_error(
        json.dumps(body), status, body, {}, error
    )


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
