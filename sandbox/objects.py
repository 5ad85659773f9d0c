"""The sandbox's resources and their Stripe JSON representation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandbox.cards import TEST_CARDS

__all__ = ["Charge", "PaymentIntent", "Refund"]


@dataclass
class PaymentIntent:
    id: str
    amount: int
    currency: str
    created: int
    client_secret: str
    capture_method: str
    payment_method_types: list[str]
    automatic_payment_methods: dict[str, Any] | None
    status: str = "requires_payment_method"
    metadata: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    payment_method: str | None = None
    amount_capturable: int = 0
    amount_received: int = 0
    last_payment_error: dict[str, Any] | None = None
    latest_charge: str | None = None
    next_action: dict[str, Any] | None = None
    cancellation_reason: str | None = None
    canceled_at: int | None = None
    customer: str | None = None
    receipt_email: str | None = None
    statement_descriptor: str | None = None
    statement_descriptor_suffix: str | None = None
    setup_future_usage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": self.amount_capturable,
            "amount_details": {"tip": {}},
            "amount_received": self.amount_received,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": (
                dict(self.automatic_payment_methods) if self.automatic_payment_methods else None
            ),
            "canceled_at": self.canceled_at,
            "cancellation_reason": self.cancellation_reason,
            "capture_method": self.capture_method,
            "client_secret": self.client_secret,
            "confirmation_method": "automatic",
            "created": self.created,
            "currency": self.currency,
            "customer": self.customer,
            "description": self.description,
            "last_payment_error": self.last_payment_error,
            "latest_charge": self.latest_charge,
            "livemode": False,
            "metadata": dict(self.metadata),
            "next_action": self.next_action,
            "on_behalf_of": None,
            "payment_method": self.payment_method,
            "payment_method_configuration_details": None,
            "payment_method_options": {
                "card": {
                    "installments": None,
                    "mandate_options": None,
                    "network": None,
                    "request_three_d_secure": "automatic",
                }
            },
            "payment_method_types": list(self.payment_method_types),
            "processing": None,
            "receipt_email": self.receipt_email,
            "review": None,
            "setup_future_usage": self.setup_future_usage,
            "shipping": None,
            "source": None,
            "statement_descriptor": self.statement_descriptor,
            "statement_descriptor_suffix": self.statement_descriptor_suffix,
            "status": self.status,
            "transfer_data": None,
            "transfer_group": None,
        }


@dataclass
class Charge:
    id: str
    amount: int
    currency: str
    created: int
    payment_intent: str
    payment_method: str
    status: str  # "succeeded" | "failed"
    captured: bool = False
    amount_captured: int = 0
    amount_refunded: int = 0
    refunded: bool = False
    failure_code: str | None = None
    failure_message: str | None = None
    decline_code: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        card = TEST_CARDS.get(self.payment_method)
        failed = self.status == "failed"
        outcome = {
            "network_status": "declined_by_network" if failed else "approved_by_network",
            "reason": self.decline_code if failed else None,
            "risk_level": "normal",
            "risk_score": 20,
            "seller_message": (
                "The bank did not return any further details with this decline."
                if failed
                else "Payment complete."
            ),
            "type": "issuer_declined" if failed else "authorized",
        }
        return {
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount_captured,
            "amount_refunded": self.amount_refunded,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": None,
            "billing_details": {
                "address": dict.fromkeys(
                    ("city", "country", "line1", "line2", "postal_code", "state")
                ),
                "email": None,
                "name": None,
                "phone": None,
            },
            "calculated_statement_descriptor": "AGENTPAY SANDBOX",
            "captured": self.captured,
            "created": self.created,
            "currency": self.currency,
            "customer": None,
            "description": self.description,
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "fraud_details": {},
            "livemode": False,
            "metadata": dict(self.metadata),
            "outcome": outcome,
            "paid": not failed,
            "payment_intent": self.payment_intent,
            "payment_method": self.payment_method,
            "payment_method_details": {
                "card": {
                    "brand": card.brand if card else None,
                    "funding": card.funding if card else None,
                    "last4": card.last4 if card else None,
                },
                "type": "card",
            },
            "receipt_url": None,
            "refunded": self.refunded,
            "review": None,
            "status": self.status,
        }


@dataclass
class Refund:
    id: str
    amount: int
    currency: str
    created: int
    charge: str
    payment_intent: str
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    status: str = "succeeded"
    failure_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "refund",
            "failure_reason": self.failure_reason,
            "amount": self.amount,
            "balance_transaction": None,
            "charge": self.charge,
            "created": self.created,
            "currency": self.currency,
            "destination_details": {"card": {"type": "refund"}, "type": "card"},
            "metadata": dict(self.metadata),
            "payment_intent": self.payment_intent,
            "reason": self.reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": self.status,
            "transfer_reversal": None,
        }
