"""Refunds of a PaymentIntent's captured charge, full or partial, never more than remains."""

from __future__ import annotations

from typing import Any

from sandbox.disputes import refusing_refunds
from sandbox.errors import invalid_request, no_such
from sandbox.ids import new_id, now
from sandbox.objects import Charge, Refund
from sandbox.params import get_int, get_metadata, get_str
from sandbox.payments import get_payment_intent
from sandbox.state import RequestInfo, SandboxState

__all__ = ["create_refund", "format_amount"]

REASONS = ("duplicate", "fraudulent", "requested_by_customer")
ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())


def format_amount(amount: int, currency: str) -> str:
    """``1234, "usd"`` -> ``"$12.34"``-style text for error messages (symbol only for usd)."""
    exponent = 0 if currency in ZERO_DECIMAL else 3 if currency in THREE_DECIMAL else 2
    value = f"{amount / 10**exponent:.{exponent}f}"
    return f"${value}" if currency == "usd" else f"{value} {currency.upper()}"


def _refundable_charge(state: SandboxState, params: dict[str, Any]) -> Charge:
    pi_id = get_str(params, "payment_intent")
    charge_id = get_str(params, "charge")
    if pi_id is None and charge_id is None:
        raise invalid_request(
            "One of the following params should be provided for this request: "
            "payment_intent or charge.",
            code="parameter_missing",
            param="payment_intent",
        )
    if charge_id is not None:
        charge = state.charges.get(charge_id)
        if charge is None:
            raise no_such("charge", charge_id, "charge", status=400)
        if pi_id is not None and charge.payment_intent != pi_id:
            raise invalid_request(
                f"Charge {charge_id} does not belong to PaymentIntent {pi_id}.", param="charge"
            )
    else:
        assert pi_id is not None
        pi = get_payment_intent(state, pi_id, param="payment_intent")
        latest = state.charges.get(pi.latest_charge) if pi.latest_charge else None
        if pi.status != "succeeded" or latest is None:
            raise invalid_request(
                f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                code="charge_not_refundable",
                param="payment_intent",
                store=True,
            )
        charge = latest
    if charge.status != "succeeded" or not charge.captured:
        raise invalid_request(
            f"Charge {charge.id} has not been captured and cannot be refunded.",
            code="charge_not_refundable",
            param="charge",
            store=True,
        )
    return charge


def create_refund(state: SandboxState, params: dict[str, Any], req: RequestInfo) -> dict[str, Any]:
    with state.lock:
        amount = get_int(params, "amount", minimum=1)
        reason = get_str(params, "reason", choices=REASONS)
        metadata = get_metadata(params) or {}
        charge = _refundable_charge(state, params)
        if refusing_refunds(state, charge) is not None:
            raise invalid_request(
                f"Charge {charge.id} has been charged back; cannot issue a refund.",
                code="charge_disputed",
                store=True,
            )
        remaining = charge.amount_captured - charge.amount_refunded
        if remaining <= 0:
            raise invalid_request(
                f"Charge {charge.id} has already been refunded.",
                code="charge_already_refunded",
                store=True,
            )
        if amount is None:
            amount = remaining
        if amount > remaining:
            raise invalid_request(
                f"Refund amount ({format_amount(amount, charge.currency)}) is greater than "
                f"unrefunded amount on charge ({format_amount(remaining, charge.currency)})",
                # Stripe names the parameter and gives no code for this refusal.
                code=None,
                param="amount",
                store=True,
            )
        refund = Refund(
            id=new_id("re"),
            amount=amount,
            currency=charge.currency,
            created=now(),
            charge=charge.id,
            payment_intent=charge.payment_intent,
            reason=reason,
            metadata={k: v for k, v in metadata.items() if v != ""},
        )
        state.refunds[refund.id] = refund
        charge.amount_refunded += amount
        charge.refunded = charge.amount_refunded >= charge.amount_captured
        state.emit("charge.refunded", charge.to_dict(), req)
        return refund.to_dict()


def fail_refund(state: SandboxState, refund_id: str, req: RequestInfo) -> dict[str, Any]:
    """A refund that succeeded fails afterwards, as Stripe's can (the card was closed): the
    money goes back to the balance, the charge counts it as unrefunded again, and
    `charge.refund.updated` and `refund.failed` are sent."""
    with state.lock:
        refund = state.refunds.get(refund_id)
        if refund is None:
            raise no_such("refund", refund_id, "id")
        if refund.status != "succeeded":
            raise invalid_request(f"Refund {refund_id} is {refund.status}, not succeeded.")
        refund.status = "failed"
        refund.failure_reason = "expired_or_canceled_card"
        charge = state.charges[refund.charge]
        charge.amount_refunded -= refund.amount
        charge.refunded = charge.amount_refunded >= charge.amount_captured
        state.emit("charge.refund.updated", refund.to_dict(), req)
        state.emit("refund.failed", refund.to_dict(), req)
        return refund.to_dict()
