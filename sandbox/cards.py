"""Stripe's test PaymentMethod ids and what confirming with each one does."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TEST_CARDS", "TestCard", "payment_method_object"]

Outcome = Literal["succeed", "decline", "authenticate"]


@dataclass(frozen=True)
class TestCard:
    brand: str
    last4: str
    funding: str
    outcome: Outcome
    code: str | None = None  # error code on decline
    decline_code: str | None = None
    message: str | None = None
    param: str | None = None
    # A charge that succeeds and is then disputed for its full amount, with this reason
    # (Stripe's `pm_card_createDispute`, card 4000000000000259: `fraudulent`).
    dispute: str | None = None


_DECLINED = "Your card was declined."

TEST_CARDS: dict[str, TestCard] = {
    "pm_card_visa": TestCard("visa", "4242", "credit", "succeed"),
    "pm_card_visa_debit": TestCard("visa", "5556", "debit", "succeed"),
    "pm_card_mastercard": TestCard("mastercard", "4444", "credit", "succeed"),
    "pm_card_amex": TestCard("amex", "8431", "credit", "succeed"),
    "pm_card_createDispute": TestCard("visa", "0259", "credit", "succeed", dispute="fraudulent"),
    "pm_card_chargeDeclined": TestCard(
        "visa", "0002", "credit", "decline", "card_declined", "generic_decline", _DECLINED
    ),
    "pm_card_chargeDeclinedInsufficientFunds": TestCard(
        "visa",
        "9995",
        "credit",
        "decline",
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_chargeDeclinedLostCard": TestCard(
        "visa", "9987", "credit", "decline", "card_declined", "lost_card", _DECLINED
    ),
    "pm_card_chargeDeclinedStolenCard": TestCard(
        "visa", "9979", "credit", "decline", "card_declined", "stolen_card", _DECLINED
    ),
    "pm_card_chargeDeclinedExpiredCard": TestCard(
        "visa",
        "0069",
        "credit",
        "decline",
        "expired_card",
        "expired_card",
        "Your card has expired.",
        "exp_month",
    ),
    "pm_card_chargeDeclinedIncorrectCvc": TestCard(
        "visa",
        "0127",
        "credit",
        "decline",
        "incorrect_cvc",
        "incorrect_cvc",
        "Your card's security code is incorrect.",
        "cvc",
    ),
    "pm_card_chargeDeclinedProcessingError": TestCard(
        "visa",
        "0119",
        "credit",
        "decline",
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
    "pm_card_authenticationRequired": TestCard("visa", "3184", "credit", "authenticate"),
    "pm_card_threeDSecure2Required": TestCard("visa", "3220", "credit", "authenticate"),
}


def payment_method_object(pm_id: str, created: int) -> dict[str, Any]:
    """The ``payment_method`` object Stripe returns for a test PaymentMethod id."""
    card = TEST_CARDS[pm_id]
    null_address = dict.fromkeys(("city", "country", "line1", "line2", "postal_code", "state"))
    return {
        "id": pm_id,
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {
            "address": null_address,
            "email": None,
            "name": None,
            "phone": None,
        },
        "card": {
            "brand": card.brand,
            "checks": {
                "address_line1_check": None,
                "address_postal_code_check": None,
                "cvc_check": "pass",
            },
            "country": "US",
            "display_brand": card.brand,
            "exp_month": 12,
            "exp_year": datetime.date.today().year + 3,
            "fingerprint": f"fp{card.last4}{card.brand}"[:16],
            "funding": card.funding,
            "generated_from": None,
            "last4": card.last4,
            "networks": {"available": [card.brand], "preferred": None},
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": created,
        "customer": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }
