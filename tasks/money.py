"""Money: integer minor units, lowercase ISO 4217 currencies, Stripe's exponents.

Fractions (tax, fees, splits) are computed with `Decimal` built from strings and rounded
once, with an explicit rounding mode, into the currency's minor units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

# Stripe's zero-decimal currencies: the amount is in whole units.
ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
# Stripe's three-decimal currencies: the last digit of the minor amount must be 0.
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())

# ISO 4217 currencies Stripe can charge in.
CURRENCIES = frozenset(
    """
    aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd bwp
    byn bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel
    gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw kwd
    kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn
    nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr sek sgd
    shp sle sos srd std szl thb tjs tnd top try ttd twd tzs uah ugx usd uyu uzs vnd vuv wst
    xaf xcd xof xpf yer zar zmw
    """.split()
)

# Currencies whose amounts go in steps of more than one minor unit: the three-decimal ones
# (the last digit must be 0), and ISK, a zero-decimal currency Stripe still takes with two
# decimals for compatibility (a multiple of 100).
STEP = {**dict.fromkeys(THREE_DECIMAL, 10), "isk": 100}

# Stripe's upper bound for one charge, in minor units.
MAX_AMOUNT = 99_999_999

# Stripe's smallest charge per settlement currency (docs.stripe.com/currencies, "Minimum
# and maximum charge amounts"), in minor units; the default of AGENTPAY_MIN_CHARGE_AMOUNT.
STRIPE_MIN_CHARGE = {
    **dict.fromkeys("usd aud brl cad chf eur inr nzd sgd".split(), 50),
    "aed": 200,
    "bgn": 100,
    "czk": 1500,
    "dkk": 250,
    "gbp": 30,
    "hkd": 400,
    "huf": 17500,
    "jpy": 50,
    "mxn": 1000,
    "myr": 200,
    "nok": 300,
    "pln": 200,
    "ron": 200,
    "sek": 300,
    "thb": 1000,
}

ROUNDING = ROUND_HALF_EVEN


def exponent(currency: str) -> int:
    if currency in ZERO_DECIMAL:
        return 0
    if currency in THREE_DECIMAL:
        return 3
    return 2


def amount_problem(amount: int, currency: str) -> str | None:
    """Why `amount` (minor units) cannot be charged in `currency`, or None if it can."""
    if currency not in CURRENCIES:
        return f"unknown currency {currency!r}: use a lowercase ISO 4217 code such as 'usd'"
    if amount <= 0:
        return "amount must be a positive integer in minor units"
    if amount > MAX_AMOUNT:
        return f"amount must be at most {MAX_AMOUNT} minor units"
    step = granularity(currency)
    if amount % step:
        if currency in THREE_DECIMAL:
            return f"amounts in {currency} must end in 0 (three-decimal currency)"
        return f"amounts in {currency} must be a multiple of {step} (whole units, two decimals)"
    return None


def round_minor(value: Decimal, currency: str) -> int:
    """Round a Decimal amount in minor units to an integer the currency accepts (a multiple
    of its `granularity`)."""
    step = granularity(currency)
    return int((value / step).quantize(Decimal(1), rounding=ROUNDING)) * step


def granularity(currency: str) -> int:
    """The smallest step of a chargeable amount in minor units (10 for three-decimal
    currencies, whose last digit must be 0; 100 for ISK; 1 otherwise)."""
    return STEP.get(currency, 1)


def apply_rate(amount: int, rate: Decimal, currency: str) -> int:
    """`amount * rate`, computed exactly and rounded once (ROUNDING) to the currency."""
    return round_minor(Decimal(amount) * rate, currency)


def split(total: int, weights: Sequence[int | Decimal], currency: str | None = None) -> list[int]:
    """Split `total` minor units in proportion to `weights` so that the parts always add up
    to `total` exactly (largest remainder: every part gets the floor of its exact share, and
    the units left over go to the largest remainders, ties to the earliest part).

    With a `currency` that steps by more than one minor unit (three-decimal ones, ISK) the
    parts are multiples of its step (`total` must be too).
    Parts are never negative; weights must be non-negative and not all zero.
    """
    if total < 0:
        raise ValueError("total must not be negative")
    if not weights:
        raise ValueError("at least one weight is needed")
    # Exact rational arithmetic: no precision limit, no rounding before the final step.
    exact = [Fraction(Decimal(w)) for w in weights]
    weight_sum = sum(exact, Fraction(0))
    if any(w < 0 for w in exact) or weight_sum == 0:
        raise ValueError("weights must be non-negative and not all zero")
    step = granularity(currency) if currency else 1
    if total % step:
        raise ValueError(f"a {currency} total must be a multiple of {step}")
    units = total // step
    shares = [units * w / weight_sum for w in exact]
    parts = [math.floor(share) for share in shares]
    left = units - sum(parts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - parts[i]), i))
    for i in by_remainder[:left]:
        parts[i] += 1
    return [part * step for part in parts]
