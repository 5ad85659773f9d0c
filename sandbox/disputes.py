"""Disputes (chargebacks), as Stripe's test mode makes them.

A charge made with a disputing test card (`pm_card_createDispute`) succeeds and is disputed
at once for all it captured (`open_dispute`, from the automatic capture or the manual one):
a `needs_response` dispute, the money and a dispute fee withdrawn (its balance transaction),
`charge.dispute.created` and `charge.dispute.funds_withdrawn`. The charge is then `disputed`
and cannot be refunded (`charge_disputed`, `sandbox.refunds`).

`POST /v1/disputes/{id}` stages evidence (`submit=false`) or submits it (the default): the
dispute goes `under_review` (`charge.dispute.updated`), and Stripe's test-mode evidence
decides it — `evidence[uncategorized_text]=winning_evidence`: `won`, the money reinstated
(`charge.dispute.funds_reinstated`), `losing_evidence`: `lost`; either way
`charge.dispute.closed`. Other evidence leaves it under review. `POST
/v1/disputes/{id}/close` accepts it: `lost`, `charge.dispute.closed`. A closed dispute
takes no more changes.
"""

from __future__ import annotations

from typing import Any

from sandbox.cards import TEST_CARDS
from sandbox.errors import invalid_request, no_such
from sandbox.ids import new_id, now
from sandbox.objects import EVIDENCE_FIELDS, Charge, Dispute, PaymentIntent
from sandbox.params import get_bool, get_metadata
from sandbox.state import RequestInfo, SandboxState

__all__ = ["close_dispute", "get_dispute", "open_dispute", "refusing_refunds", "update_dispute"]

DISPUTE_FEE = 1500  # minor units of the dispute's currency (Stripe's is $15.00)
WINNING = "winning_evidence"
LOSING = "losing_evidence"
ALREADY_CLOSED = "This dispute is already closed"


def get_dispute(state: SandboxState, dispute_id: str) -> Dispute:
    dispute = state.disputes.get(dispute_id)
    if dispute is None:
        raise no_such("dispute", dispute_id, "dispute")
    return dispute


def refusing_refunds(state: SandboxState, charge: Charge) -> Dispute | None:
    """The dispute that keeps `charge` from being refunded (open or lost), if any."""
    return next(
        (
            d
            for d in state.disputes.values()
            if d.charge == charge.id and not d.is_charge_refundable
        ),
        None,
    )


def _balance_transaction(dispute: Dispute, amount: int, fee: int, what: str) -> dict[str, Any]:
    created = now()
    return {
        "id": new_id("txn"),
        "object": "balance_transaction",
        "amount": amount,
        "available_on": created,
        "created": created,
        "currency": dispute.currency,
        "description": f"Chargeback {what} for {dispute.charge}",
        "exchange_rate": None,
        "fee": fee,
        "fee_details": (
            [
                {
                    "amount": fee,
                    "application": None,
                    "currency": dispute.currency,
                    "description": "Dispute fee",
                    "type": "stripe_fee",
                }
            ]
            if fee
            else []
        ),
        "net": amount - fee,
        "reporting_category": "dispute" if amount < 0 else "dispute_reversal",
        "source": dispute.id,
        "status": "available",
        "type": "adjustment",
    }


def open_dispute(
    state: SandboxState, pi: PaymentIntent, charge: Charge, req: RequestInfo
) -> Dispute | None:
    """The chargeback a disputing test card brings once its charge is captured (under
    `state.lock`, after the intent's own event); None for any other card."""
    card = TEST_CARDS.get(charge.payment_method)
    if card is None or card.dispute is None or charge.amount_captured <= 0:
        return None
    dispute = Dispute(
        id=new_id("dp"),
        amount=charge.amount_captured,
        currency=charge.currency,
        created=now(),
        charge=charge.id,
        payment_intent=pi.id,
        reason=card.dispute,
        brand=card.brand,
    )
    dispute.balance_transactions.append(
        _balance_transaction(dispute, -dispute.amount, DISPUTE_FEE, "withdrawal")
    )
    state.disputes[dispute.id] = dispute
    charge.disputed = True
    state.emit("charge.dispute.created", dispute.to_dict(), req)
    state.emit("charge.dispute.funds_withdrawn", dispute.to_dict(), req)
    return dispute


def _evidence(params: dict[str, Any]) -> dict[str, str]:
    raw = params.get("evidence")
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, dict):
        raise invalid_request("Invalid object", param="evidence")
    evidence: dict[str, str] = {}
    for name, value in raw.items():
        if name not in EVIDENCE_FIELDS:
            raise invalid_request(
                f"Received unknown parameter: evidence[{name}]",
                code="parameter_unknown",
                param=f"evidence[{name}]",
            )
        if not isinstance(value, str):
            raise invalid_request(
                f"Invalid string: evidence[{name}]",
                code="parameter_invalid_string",
                param=f"evidence[{name}]",
            )
        evidence[name] = value
    return evidence


def update_dispute(
    state: SandboxState, dispute_id: str, params: dict[str, Any], req: RequestInfo
) -> dict[str, Any]:
    with state.lock:
        dispute = get_dispute(state, dispute_id)
        evidence = _evidence(params)
        metadata = get_metadata(params)
        submit = get_bool(params, "submit")
        if dispute.closed:
            raise invalid_request(ALREADY_CLOSED, store=True)
        if evidence and dispute.status == "under_review":
            raise invalid_request(
                "This dispute's evidence was submitted already and is under review; "
                "it can no longer be changed.",
                store=True,
            )
        dispute.evidence.update(evidence)
        if metadata is not None:
            if params.get("metadata") == "":
                dispute.metadata.clear()
            for key, value in metadata.items():
                if value == "":
                    dispute.metadata.pop(key, None)
                else:
                    dispute.metadata[key] = value
        submitting = (
            dispute.status == "needs_response"
            and bool(dispute.evidence)
            and (submit is True or (submit is None and bool(evidence)))
        )
        if submitting:
            dispute.submission_count += 1
            dispute.status = "under_review"
        if evidence or metadata is not None or submitting:
            state.emit("charge.dispute.updated", dispute.to_dict(), req)
        if submitting:
            decided = dispute.evidence.get("uncategorized_text")
            if decided == WINNING:
                _close(state, dispute, "won", req)
            elif decided == LOSING:
                _close(state, dispute, "lost", req)
        return dispute.to_dict()


def close_dispute(state: SandboxState, dispute_id: str, req: RequestInfo) -> dict[str, Any]:
    """The dispute accepted: `lost`, for good."""
    with state.lock:
        dispute = get_dispute(state, dispute_id)
        if dispute.closed:
            raise invalid_request(ALREADY_CLOSED, store=True)
        _close(state, dispute, "lost", req)
        return dispute.to_dict()


def _close(state: SandboxState, dispute: Dispute, status: str, req: RequestInfo) -> None:
    dispute.status = status
    if status == "won":
        # The money comes back (the dispute fee does not) and the charge may be refunded.
        dispute.is_charge_refundable = True
        dispute.balance_transactions.append(
            _balance_transaction(dispute, dispute.amount, 0, "reversal")
        )
        state.emit("charge.dispute.funds_reinstated", dispute.to_dict(), req)
    state.emit("charge.dispute.closed", dispute.to_dict(), req)
