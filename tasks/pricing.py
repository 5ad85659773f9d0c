"""Pricing role: received → priced (or rejected). Turns what the agent asked for into amounts.

A payment asks for a fixed `amount` or for line items, each `{sku, quantity}` (the unit amount
comes from the price catalog, in the payment's currency, as it stood when the payment was
received: `lookup`) or `{description, unit_amount, quantity}`. From the subtotal:

- tax = subtotal * `tax_rate`, on the total (not per line);
- fee = subtotal * `fee_percent` / 100 + `fee_fixed[currency]`;

each computed exactly with `Decimal` and rounded once (half to even) to the currency's minor
units (multiples of 10 for three-decimal currencies, of 100 for ISK). total = subtotal + tax
+ fee. The breakdown is stored on the payment (`price_breakdown`). An unknown or inactive
SKU, or a total the currency cannot charge, rejects the payment with that reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from tasks import audit, money, payments
from tasks.app import Backoff, app, defer, pool
from tasks.db import Conn
from tasks.settings import Settings, get_settings

ROLE = "pricing"
ACTOR = f"worker:{ROLE}"


class PricingError(Exception):
    """Why a payment cannot be priced: `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str, **data: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass(frozen=True)
class Price:
    sku: str
    currency: str
    unit_amount: int
    description: str | None
    active: bool


# --- the catalog -------------------------------------------------------------------------


async def set_price(
    conn: Conn,
    sku: str,
    currency: str,
    unit_amount: int,
    *,
    description: str | None = None,
    active: bool = True,
    actor: str | None = None,
) -> Price:
    """Create or replace the price of `sku` in `currency` (validated like a charge amount);
    `change_price`, without the previous price."""
    _, price = await change_price(
        conn, sku, currency, unit_amount, description=description, active=active, actor=actor
    )
    return price


async def change_price(
    conn: Conn,
    sku: str,
    currency: str,
    unit_amount: int,
    *,
    description: str | None = None,
    active: bool = True,
    actor: str | None = None,
) -> tuple[Price | None, Price]:
    """Create or replace the price of `sku` in `currency`; the previous price (None: there
    was none) and the new one. A description left out keeps the previous one. A change is
    recorded in the operator audit as `price.set` by `actor` (None: the database user),
    with the previous and the new price; setting the same price again changes and records
    nothing."""
    problem = money.amount_problem(unit_amount, currency)
    if problem:
        raise ValueError(problem)
    # A new price is inserted; an existing one is locked first, so that the previous price
    # recorded is the one replaced even when another transaction sets it at the same time
    # (prices are never deleted: the second read finds the row the insert ran into).
    while True:
        cur = await conn.execute(
            """INSERT INTO prices (sku, currency, unit_amount, description, active)
               VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (sku, currency) DO NOTHING
               RETURNING sku, currency, unit_amount, description, active""",
            (sku, currency, unit_amount, description, active),
        )
        inserted = await cur.fetchone()
        if inserted is not None:
            previous, price = None, Price(**inserted)
            break
        cur = await conn.execute(
            """SELECT sku, currency, unit_amount, description, active FROM prices
               WHERE sku = %s AND currency = %s FOR UPDATE""",
            (sku, currency),
        )
        row = await cur.fetchone()
        if row is None:
            continue  # deleted by hand in between: insert it
        previous = Price(**row)
        price = Price(
            sku,
            currency,
            unit_amount,
            previous.description if description is None else description,
            active,
        )
        if price == previous:
            return previous, price
        await conn.execute(
            """UPDATE prices SET unit_amount = %s, description = %s, active = %s,
                                 updated_at = now()
               WHERE sku = %s AND currency = %s""",
            (price.unit_amount, price.description, price.active, sku, currency),
        )
        break
    await _record(conn, previous, price, actor)
    return previous, price


def _terms(price: Price | None) -> dict[str, Any] | None:
    if price is None:
        return None
    return {
        "unit_amount": price.unit_amount,
        "description": price.description,
        "active": price.active,
    }


async def _record(conn: Conn, previous: Price | None, price: Price, actor: str | None) -> None:
    await audit.record(
        conn,
        "price.set",
        price.sku,
        {"currency": price.currency, "previous": _terms(previous), "new": _terms(price)},
        actor=actor,
    )


async def set_active(
    conn: Conn, sku: str, currency: str | None, active: bool, *, actor: str | None = None
) -> int:
    """Activate or deactivate a SKU (in one currency, or all); returns the prices changed,
    each recorded as `price.set` by `actor`."""
    cur = await conn.execute(
        """SELECT sku, currency, unit_amount, description, active FROM prices
           WHERE sku = %s AND (%s::text IS NULL OR currency = %s) AND active <> %s
           ORDER BY currency FOR UPDATE""",
        (sku, currency, currency, active),
    )
    changed = [Price(**row) for row in await cur.fetchall()]
    for previous in changed:
        await conn.execute(
            """UPDATE prices SET active = %s, updated_at = now()
               WHERE sku = %s AND currency = %s""",
            (active, previous.sku, previous.currency),
        )
        await _record(conn, previous, dataclasses.replace(previous, active=active), actor)
    return len(changed)


async def list_prices(
    conn: Conn, *, currency: str | None = None, include_inactive: bool = True
) -> list[Price]:
    cur = await conn.execute(
        """SELECT sku, currency, unit_amount, description, active FROM prices
           WHERE (%s::text IS NULL OR currency = %s) AND (%s OR active)
           ORDER BY sku, currency""",
        (currency, currency, include_inactive),
    )
    return [Price(**row) for row in await cur.fetchall()]


async def lookup(conn: Conn, skus: list[str], currency: str, at: datetime) -> dict[str, Price]:
    """The catalog as it stood at `at` (a payment's `created_at`: when it was received), for
    pricing: each SKU's price in `currency` from the last version of it in force then
    (`price_history`, migration 0025), so that a change made after a payment came applies only
    to payments received after it. A SKU with no price then is left out."""
    cur = await conn.execute(
        """SELECT v.sku, v.currency, v.unit_amount, v.description, v.active
             FROM unnest(%s::text[]) AS s (sku)
            CROSS JOIN LATERAL (
                  SELECT sku, currency, unit_amount, description, active FROM price_history
                   WHERE sku = s.sku AND currency = %s AND valid_from <= %s
                   ORDER BY valid_from DESC
                   LIMIT 1) AS v""",
        (skus, currency, at),
    )
    return {row["sku"]: Price(**row) for row in await cur.fetchall()}


# --- the arithmetic ----------------------------------------------------------------------


def tax_amount(subtotal: int, currency: str, settings: Settings) -> int:
    """Tax on the whole subtotal, rounded once."""
    return money.apply_rate(subtotal, settings.tax_rate, currency)


def fee_amount(subtotal: int, currency: str, settings: Settings) -> int:
    """The platform fee: a percentage of the subtotal plus the currency's fixed part, summed
    exactly and rounded once."""
    exact = Decimal(subtotal) * settings.fee_percent / Decimal(100)
    exact += Decimal(settings.fee_fixed.get(currency, 0))
    return money.round_minor(exact, currency)


def below_minimum(total: int, currency: str, settings: Settings) -> str | None:
    """Why `total` is too small for the provider to charge (`min_charge_amount`), or None."""
    minimum = settings.min_charge_amount.get(currency)
    if minimum is not None and total < minimum:
        return f"{total} is below the provider's smallest charge in {currency} ({minimum})"
    return None


def breakdown(
    lines: list[dict[str, Any]], currency: str, settings: Settings, *, requested: int | None
) -> dict[str, Any]:
    """Amounts and the stored breakdown of resolved lines (each with unit_amount and
    quantity), or of a fixed `requested` amount. Raises PricingError when the total cannot
    be charged."""
    subtotal = requested if requested is not None else 0
    priced_lines = []
    for line in lines:
        amount = int(line["unit_amount"]) * int(line["quantity"])
        priced_lines.append({**line, "amount": amount})
        subtotal += amount
    problem = money.amount_problem(subtotal, currency)
    if problem:
        raise PricingError("amount_invalid", f"subtotal: {problem}", subtotal=subtotal)
    tax = tax_amount(subtotal, currency, settings)
    fee = fee_amount(subtotal, currency, settings)
    total = subtotal + tax + fee
    problem = money.amount_problem(total, currency) or below_minimum(total, currency, settings)
    if problem:
        raise PricingError("amount_invalid", f"total with tax and fee: {problem}", total=total)
    return {
        "amount_subtotal": subtotal,
        "amount_tax": tax,
        "amount_fee": fee,
        "amount_total": total,
        "price_breakdown": {
            "lines": priced_lines,
            "subtotal": subtotal,
            "tax": {"rate": str(settings.tax_rate), "basis": "subtotal", "amount": tax},
            "fee": {
                "percent": str(settings.fee_percent),
                "fixed": settings.fee_fixed.get(currency, 0),
                "basis": "subtotal",
                "amount": fee,
            },
            "rounding": f"{money.ROUNDING} once per amount, to {money.granularity(currency)} "
            f"minor unit(s)",
            "total": total,
        },
    }


async def resolve_lines(
    conn: Conn, line_items: list[dict[str, Any]], currency: str, at: datetime
) -> list[dict[str, Any]]:
    """Line items with their unit amounts: SKU lines from the catalog as it stood at `at`
    (active, in this currency), custom lines as given. Raises PricingError for an unknown or
    inactive SKU."""
    skus = [str(i["sku"]) for i in line_items if i.get("sku")]
    catalog = await lookup(conn, skus, currency, at) if skus else {}
    resolved = []
    for item in line_items:
        quantity = int(item.get("quantity") or 1)
        sku = item.get("sku")
        if sku:
            price = catalog.get(sku)
            if price is None:
                raise PricingError(
                    "unknown_sku", f"no price for SKU {sku!r} in {currency}", sku=sku
                )
            if not price.active:
                raise PricingError("inactive_sku", f"SKU {sku!r} is not on sale", sku=sku)
            resolved.append(
                {
                    "sku": sku,
                    "description": price.description or sku,
                    "unit_amount": price.unit_amount,
                    "quantity": quantity,
                }
            )
        else:
            resolved.append(
                {
                    "description": item.get("description"),
                    "unit_amount": int(item["unit_amount"]),
                    "quantity": quantity,
                }
            )
    return resolved


async def price(
    conn: Conn, payment: payments.Payment, settings: Settings | None = None
) -> dict[str, Any]:
    """The amounts of a payment (subtotal, tax, fee, total, in minor units) and its
    breakdown, its SKUs at the catalog's prices when it was received. Raises PricingError
    when it cannot be priced."""
    settings = settings or get_settings()
    currency = payment["currency"]
    if payment["line_items"]:
        lines = await resolve_lines(conn, payment["line_items"], currency, payment["created_at"])
        return breakdown(lines, currency, settings, requested=None)
    return breakdown([], currency, settings, requested=int(payment["amount_requested"]))


# --- the role ----------------------------------------------------------------------------


async def advance(conn: Conn, payment_id: str) -> str | None:
    """One pricing step in the caller's transaction; returns the new status, or None when
    the payment is already past pricing (a re-run does nothing)."""
    payment = await payments.lock(conn, payment_id)
    if payment is None or payment["status"] != "received":
        return None
    try:
        amounts = await price(conn, payment)
    except PricingError as error:
        await payments.transition(
            conn,
            payment,
            "rejected",
            actor=ACTOR,
            reason=error.code,
            data={"decision": "rejected", "reasons": [{"code": error.code, **error.data}]},
            failure_code=error.code,
            failure_message=error.message,
        )
        return "rejected"
    data = {k: v for k, v in amounts.items() if k != "price_breakdown"}
    amounts["price_breakdown"] = Jsonb(amounts["price_breakdown"])
    await payments.transition(
        conn, payment, "priced", actor=ACTOR, reason="priced", data=data, **amounts
    )
    await defer(conn, "risk", payment_id=payment_id)
    return "priced"


@app.task(name=ROLE, queue=ROLE, retry=Backoff())
async def price_payment(payment_id: str) -> Any:
    async with pool().connection() as conn, conn.transaction():
        return await advance(conn, payment_id)
