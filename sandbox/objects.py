"""The sandbox's resources and their Stripe JSON representation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandbox.cards import TEST_CARDS

__all__ = ["EVIDENCE_FIELDS", "Charge", "Dispute", "PaymentIntent", "Refund"]


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
    disputed: bool = False

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
            "disputed": self.disputed,
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


# The evidence a dispute takes (`evidence[...]` of `POST /v1/disputes/{id}`), each a string:
# text, or the id of an uploaded file.
EVIDENCE_FIELDS = (
    "access_activity_log",
    "billing_address",
    "cancellation_policy",
    "cancellation_policy_disclosure",
    "cancellation_rebuttal",
    "customer_communication",
    "customer_email_address",
    "customer_name",
    "customer_purchase_ip",
    "customer_signature",
    "duplicate_charge_documentation",
    "duplicate_charge_explanation",
    "duplicate_charge_id",
    "product_description",
    "receipt",
    "refund_policy",
    "refund_policy_disclosure",
    "refund_refusal_explanation",
    "service_date",
    "service_documentation",
    "shipping_address",
    "shipping_carrier",
    "shipping_date",
    "shipping_documentation",
    "shipping_tracking_number",
    "uncategorized_file",
    "uncategorized_text",
)


@dataclass
class Dispute:
    """A chargeback of a charge (`dp_…`). `status`: `needs_response`, `under_review` once
    evidence was submitted, then `won` or `lost`."""

    id: str
    amount: int
    currency: str
    created: int
    charge: str
    payment_intent: str
    reason: str
    brand: str | None
    status: str = "needs_response"
    evidence: dict[str, str] = field(default_factory=dict)
    submission_count: int = 0
    is_charge_refundable: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    balance_transactions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.status in ("won", "lost", "warning_closed")

    def to_dict(self) -> dict[str, Any]:
        evidence: dict[str, Any] = {name: self.evidence.get(name) for name in EVIDENCE_FIELDS}
        evidence["enhanced_evidence"] = {}
        return {
            "id": self.id,
            "object": "dispute",
            "amount": self.amount,
            "balance_transactions": [dict(bt) for bt in self.balance_transactions],
            "charge": self.charge,
            "created": self.created,
            "currency": self.currency,
            "enhanced_eligibility_types": [],
            "evidence": evidence,
            "evidence_details": {
                # the end of the UTC day eight days on
                "due_by": (self.created // 86_400 + 9) * 86_400 - 1,
                "enhanced_eligibility": {},
                "has_evidence": bool(self.evidence),
                "past_due": False,
                "submission_count": self.submission_count,
            },
            "is_charge_refundable": self.is_charge_refundable,
            "livemode": False,
            "metadata": dict(self.metadata),
            "payment_intent": self.payment_intent,
            "payment_method_details": {
                "card": {
                    "brand": self.brand,
                    "case_type": "chargeback",
                    "network_reason_code": "10.4" if self.reason == "fraudulent" else None,
                },
                "type": "card",
            },
            "reason": self.reason,
            "status": self.status,
        }
