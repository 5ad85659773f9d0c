"""Pricing: the catalog, tax and fee rounding per currency, and the exact split."""

from __future__ import annotations

import asyncio
import json
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from typer.testing import CliRunner

import schema
from tasks import money, payments, pricing
from tasks.db import Pool
from tasks.settings import Settings, get_settings
from tests.conftest import PgServer, auth, migrate_before, run_jobs
from workers.cli import app as cli

# --- the split ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(min_value=0, max_value=10**12),
    weights=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=12).filter(
        lambda ws: sum(ws) > 0
    ),
    currency=st.sampled_from(["usd", "jpy", "kwd", "isk"]),
)
def test_split_always_adds_up_to_the_total(total: int, weights: list[int], currency: str) -> None:
    step = money.granularity(currency)
    total -= total % step
    parts = money.split(total, weights, currency)
    assert sum(parts) == total
    assert len(parts) == len(weights)
    for part, weight in zip(parts, weights, strict=True):
        assert part % step == 0 and part >= 0
        exact = Fraction(total * weight, sum(weights))
        # Largest remainder: every part is its exact share, rounded down or up by one step.
        assert exact - step < part < exact + step
        if weight == 0:
            assert part == 0


def test_split_gives_leftover_units_to_the_largest_remainders() -> None:
    assert money.split(100, [1, 1, 1]) == [34, 33, 33]
    assert money.split(10, [3, 3, 4]) == [3, 3, 4]
    assert money.split(5, [1, 2, 2]) == [1, 2, 2]
    # 3.5, 1.75, 1.75: floors 3, 1, 1; the two units left go to the .75 remainders.
    assert money.split(7, [Decimal("0.5"), Decimal("0.25"), Decimal("0.25")]) == [3, 2, 2]
    assert money.split(1000, [1, 1, 1], "kwd") == [340, 330, 330]
    with pytest.raises(ValueError, match="multiple of 10"):
        money.split(1005, [1, 1], "kwd")
    assert money.split(1000, [1, 1, 1], "isk") == [400, 300, 300]
    with pytest.raises(ValueError, match="not all zero"):
        money.split(10, [0, 0])


# --- tax and fee rounding: a hand-checked table ------------------------------------------

# (currency, tax rate, fee %, fixed fee, subtotal, expected tax, expected fee). Half to even,
# once per amount; three-decimal currencies round to the nearest 10 fils.
TABLE = [
    # USD, 8.25% tax, 2.9% + 30¢ fee
    ("usd", "0.0825", "2.9", 30, 1000, 82, 59),  # 82.5 → 82 (even); 29 + 30
    ("usd", "0.0825", "2.9", 30, 1999, 165, 88),  # 164.9175 → 165; 57.971 + 30 → 88
    ("usd", "0.0825", "2.9", 30, 600, 50, 47),  # 49.5 → 50 (even); 17.4 + 30 → 47
    ("usd", "0.0825", "2.9", 30, 200, 16, 36),  # 16.5 → 16 (even); 5.8 + 30 → 36
    ("usd", "0.0825", "2.9", 30, 1500, 124, 74),  # 123.75 → 124; 43.5 + 30 = 73.5 → 74
    ("usd", "0.0825", "2.9", 30, 2500, 206, 102),  # 206.25 → 206; 72.5 + 30 = 102.5 → 102
    # JPY (zero-decimal), 10% tax, 3.6% fee
    ("jpy", "0.10", "3.6", 0, 1234, 123, 44),  # 123.4 → 123; 44.424 → 44
    ("jpy", "0.10", "3.6", 0, 125, 12, 4),  # 12.5 → 12 (even); 4.5 → 4 (even)
    ("jpy", "0.10", "3.6", 0, 375, 38, 14),  # 37.5 → 38 (even); 13.5 → 14 (even)
    # KWD (three-decimal, last digit 0), 5% tax, 2.5% + 0.100 KWD fee
    ("kwd", "0.05", "2.5", 100, 1000, 50, 120),  # 50; 125 → 12.5 tens → 12 → 120
    ("kwd", "0.05", "2.5", 100, 1230, 60, 130),  # 61.5 → 6.15 tens → 60; 130.75 → 130
    ("kwd", "0.05", "2.5", 100, 1500, 80, 140),  # 75 → 7.5 tens → 8 → 80; 137.5 → 140
    ("kwd", "0.05", "2.5", 100, 1700, 80, 140),  # 85 → 8.5 tens → 8 → 80; 142.5 → 140
]


def _settings(tax: str, fee_percent: str, fixed: int, currency: str) -> Settings:
    return Settings(
        tax_rate=Decimal(tax), fee_percent=Decimal(fee_percent), fee_fixed={currency: fixed}
    )


@pytest.mark.parametrize(
    ("currency", "tax", "pct", "fixed", "subtotal", "want_tax", "want_fee"), TABLE
)
def test_tax_and_fee_match_the_hand_checked_table(
    currency: str, tax: str, pct: str, fixed: int, subtotal: int, want_tax: int, want_fee: int
) -> None:
    s = _settings(tax, pct, fixed, currency)
    amounts = pricing.breakdown([], currency, s, requested=subtotal)
    assert amounts["amount_tax"] == want_tax
    assert amounts["amount_fee"] == want_fee
    assert amounts["amount_total"] == subtotal + want_tax + want_fee
    assert money.amount_problem(amounts["amount_total"], currency) is None


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("fee_fixed", {"USD": 30}, "AGENTPAY_FEE_FIXED: 'USD' is not a lowercase ISO 4217"),
        ("min_charge_amount", {"default": 50}, "AGENTPAY_MIN_CHARGE_AMOUNT: 'default' is not"),
        ("fee_fixed", {"default": 30}, "AGENTPAY_FEE_FIXED: 'default' is not"),
        ("fee_fixed", {"eur": -30}, "AGENTPAY_FEE_FIXED: eur -30 is below 0"),
        ("fee_fixed", {"jod": 5}, "AGENTPAY_FEE_FIXED: jod 5 must be a multiple of 10"),
        ("risk_reject_above", {"JPY": 5}, "AGENTPAY_RISK_REJECT_ABOVE: 'JPY' is not"),
        ("risk_review_above", {"default": -1}, "AGENTPAY_RISK_REVIEW_ABOVE: default -1"),
        ("risk_velocity_max_amount", {"usdd": 1}, "AGENTPAY_RISK_VELOCITY_MAX_AMOUNT: 'usdd'"),
    ],
)
def test_per_currency_settings_name_currencies_and_amounts_they_can_mean(
    setting: str, value: dict[str, int], problem: str
) -> None:
    # Each of these was taken without a word: a fee never charged, a limit never applied,
    # or every eur payment stranded at pricing by the fee's CHECK.
    with pytest.raises(ValueError, match=re.escape(problem)):
        Settings(**{setting: value})


def test_a_total_below_the_providers_smallest_charge_is_rejected_unless_tax_and_fee_lift_it() -> (
    None
):
    s = Settings()
    assert s.min_charge_amount["usd"] == 50 and s.min_charge_amount["jpy"] == 50
    with pytest.raises(pricing.PricingError) as refused:
        pricing.breakdown([{"unit_amount": 20, "quantity": 2}], "usd", s, requested=None)
    assert refused.value.code == "amount_invalid"
    assert "below the provider's smallest charge in usd (50)" in refused.value.message
    lifted = s.model_copy(update={"fee_fixed": {"usd": 30}})
    assert pricing.breakdown([], "usd", lifted, requested=40)["amount_total"] == 70
    off = s.model_copy(update={"min_charge_amount": {}})
    assert pricing.breakdown([], "usd", off, requested=1)["amount_total"] == 1


def test_per_currency_settings_take_what_they_can_mean() -> None:
    s = Settings(
        fee_fixed={"usd": 30, "jod": 10},
        risk_review_above={"default": 0, "jpy": 1},  # review every payment
        risk_reject_above={"default": 1_000_000},
    )
    assert s.fee_fixed == {"usd": 30, "jod": 10}
    assert s.risk_review_above["default"] == 0


def _reference(exact: Fraction, step: int) -> int:
    # Python rounds a Fraction half to even: an independent implementation of the rule.
    return round(exact / step) * step


@settings(max_examples=300, deadline=None)
@given(
    currency=st.sampled_from(["usd", "jpy", "kwd", "isk"]),
    units=st.integers(min_value=1, max_value=500_000),  # the total stays chargeable
    tax_bp=st.integers(min_value=0, max_value=3000),
    fee_bp=st.integers(min_value=0, max_value=1500),
    fixed_units=st.integers(min_value=0, max_value=50),
)
def test_rounding_is_half_even_once_in_every_currency(
    currency: str, units: int, tax_bp: int, fee_bp: int, fixed_units: int
) -> None:
    step = money.granularity(currency)
    subtotal, fixed = units * step, fixed_units * step
    tax, pct = Decimal(tax_bp) / 10000, Decimal(fee_bp) / 100
    s = Settings(tax_rate=tax, fee_percent=pct, fee_fixed={currency: fixed}, min_charge_amount={})
    amounts = pricing.breakdown([], currency, s, requested=subtotal)
    assert amounts["amount_tax"] == _reference(Fraction(subtotal) * Fraction(tax), step)
    want_fee = _reference(Fraction(subtotal) * Fraction(pct) / 100 + fixed, step)
    assert amounts["amount_fee"] == want_fee
    assert amounts["amount_total"] % step == 0


# --- the catalog and the pricing role ----------------------------------------------------


async def _create(api: httpx.AsyncClient, key: str, **body: Any) -> dict[str, Any]:
    body = {"currency": "usd", "payment_method": "pm_card_visa", **body}
    response = await api.post("/v1/payments", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_catalog_lines_are_priced_with_tax_and_fee(
    api: httpx.AsyncClient,
    agent_key: str,
    operator_key: str,
    pool: Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTPAY_TAX_RATE", "0.0825")
    monkeypatch.setenv("AGENTPAY_FEE_PERCENT", "2.9")
    monkeypatch.setenv("AGENTPAY_FEE_FIXED", '{"usd": 30}')
    get_settings.cache_clear()
    response = await api.post(
        "/v1/prices",
        json={"sku": "widget", "currency": "usd", "unit_amount": 750, "description": "A widget"},
        headers=auth(operator_key),
    )
    assert response.status_code == 200, response.text
    assert response.json()["unit_amount"] == 750

    created = await _create(
        api,
        agent_key,
        line_items=[
            {"sku": "widget", "quantity": 2},
            {"description": "Gift wrap", "unit_amount": 499, "quantity": 1},
        ],
    )
    await run_jobs(pool, ("pricing",))
    payment = (await api.get(f"/v1/payments/{created['id']}", headers=auth(agent_key))).json()
    assert payment["status"] == "priced"
    # 2 * 750 + 499 = 1999; tax 164.9175 → 165; fee 57.971 + 30 → 88.
    assert (payment["amount_subtotal"], payment["amount_tax"], payment["amount_fee"]) == (
        1999,
        165,
        88,
    )
    assert payment["amount_total"] == 2252
    lines = payment["breakdown"]["lines"]
    assert lines[0] == {
        "sku": "widget",
        "description": "A widget",
        "unit_amount": 750,
        "quantity": 2,
        "amount": 1500,
    }
    assert lines[1]["amount"] == 499
    assert payment["breakdown"]["tax"] == {"rate": "0.0825", "basis": "subtotal", "amount": 165}
    assert payment["breakdown"]["fee"]["amount"] == 88


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ({"sku": "nope", "quantity": 1}, "unknown_sku"),
        ({"sku": "retired", "quantity": 1}, "inactive_sku"),
        ({"sku": "widget-eur", "quantity": 1}, "unknown_sku"),  # only priced in eur
    ],
)
async def test_an_unknown_or_inactive_sku_rejects_the_payment_with_the_reason(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, line: dict[str, Any], code: str
) -> None:
    async with pool.connection() as conn, conn.transaction():
        await pricing.set_price(conn, "retired", "usd", 100, active=False)
        await pricing.set_price(conn, "widget-eur", "eur", 100)
    created = await _create(api, agent_key, line_items=[line])
    await run_jobs(pool, ("pricing", "risk"))
    payment = (await api.get(f"/v1/payments/{created['id']}", headers=auth(agent_key))).json()
    assert payment["status"] == "rejected"
    assert payment["failure"]["code"] == code
    assert payment["amount_total"] is None
    async with pool.connection() as conn:
        events = await payments.events(conn, created["id"])
    assert events[-1]["reason"] == code
    assert events[-1]["data"]["reasons"][0]["sku"] == line["sku"]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE queue_name = 'risk'"
        )
        row = await cur.fetchone()
    assert row is not None and row["n"] == 0


async def test_only_operators_set_prices_and_bad_prices_are_refused(
    api: httpx.AsyncClient, agent_key: str, operator_key: str
) -> None:
    body = {"sku": "w", "currency": "usd", "unit_amount": 100}
    denied = await api.post("/v1/prices", json=body, headers=auth(agent_key))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "operator_only"
    bad = await api.post(
        "/v1/prices",
        json={**body, "currency": "kwd", "unit_amount": 105},
        headers=auth(operator_key),
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "unit_amount"
    assert (await api.get("/v1/prices", headers=auth(agent_key))).json()["data"] == []
    retired = {**body, "unit_amount": 100.0, "active": False}  # a whole float is whole
    assert (
        await api.post("/v1/prices", json=retired, headers=auth(operator_key))
    ).status_code == 200
    # Agents see what is on sale; operators see the retired price too.
    assert (await api.get("/v1/prices", headers=auth(agent_key))).json()["data"] == []
    listed = (await api.get("/v1/prices", headers=auth(operator_key))).json()["data"]
    assert [(p["sku"], p["unit_amount"], p["active"]) for p in listed] == [("w", 100, False)]


def test_prices_cli_sets_and_lists_the_catalog(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    runner = CliRunner()
    result = runner.invoke(cli, ["prices", "set", "gizmo", "1234", "--currency", "jpy"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli, ["prices", "set", "gizmo", "999", "--currency", "usd", "--inactive"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["prices", "set", "gizmo", "1005", "--currency", "kwd"])
    assert result.exit_code != 0
    result = runner.invoke(cli, ["prices", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert [
        (p["sku"], p["currency"], p["unit_amount"], p["active"]) for p in json.loads(result.output)
    ] == [
        ("gizmo", "jpy", 1234, True),
        ("gizmo", "usd", 999, False),
    ]
    get_settings.cache_clear()


# --- the catalog as it stood when the payment was received -------------------------------


async def _set(pool: Pool, sku: str, unit_amount: int) -> None:
    async with pool.connection() as conn, conn.transaction():
        await pricing.set_price(conn, sku, "usd", unit_amount, description=sku)


async def _priced(api: httpx.AsyncClient, key: str, pool: Pool, payment_id: str) -> dict[str, Any]:
    """The payment once the pricing role alone ran (risk's job, if any, waits)."""
    await run_jobs(pool, ("pricing",))
    payment: dict[str, Any] = (
        await api.get(f"/v1/payments/{payment_id}", headers=auth(key))
    ).json()
    return payment


WIDGET = [{"sku": "widget", "quantity": 1}]


async def test_a_price_changed_after_the_post_does_not_change_what_the_payment_costs(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """The agent asks for a widget at 1999; an operator sets 99000 before pricing runs (a
    backlog, the role down): the payment costs 1999, as when it was received, and its
    breakdown says so. A payment received after the change costs 99000."""
    await _set(pool, "widget", 1999)
    before = await _create(api, agent_key, line_items=WIDGET)
    await _set(pool, "widget", 99000)
    after = await _create(api, agent_key, line_items=WIDGET)
    payment = await _priced(api, agent_key, pool, before["id"])
    assert (payment["status"], payment["amount_subtotal"]) == ("priced", 1999)
    assert payment["breakdown"]["lines"] == [
        {
            "sku": "widget",
            "description": "widget",
            "unit_amount": 1999,
            "quantity": 1,
            "amount": 1999,
        }
    ]
    later = await _priced(api, agent_key, pool, after["id"])
    assert (later["status"], later["amount_subtotal"]) == ("priced", 99000)
    assert later["breakdown"]["lines"][0]["unit_amount"] == 99000
    # The catalog shows the price as it is now.
    async with pool.connection() as conn:
        assert [(p.sku, p.unit_amount) for p in await pricing.list_prices(conn)] == [
            ("widget", 99000)
        ]


async def test_two_changes_in_one_transaction_leave_the_last_in_force(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """Each change of a transaction is a version of its own, in the order made: the last
    one prices the payments received after the commit."""
    async with pool.connection() as conn, conn.transaction():
        await pricing.set_price(conn, "widget", "usd", 500)
        await pricing.set_price(conn, "widget", "usd", 700)
        # Touched without a change of terms (by hand): no version.
        await conn.execute("UPDATE prices SET updated_at = now() WHERE sku = 'widget'")
    created = await _create(api, agent_key, line_items=WIDGET)
    assert (await _priced(api, agent_key, pool, created["id"]))["amount_subtotal"] == 700
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT unit_amount FROM price_history WHERE sku = 'widget' ORDER BY valid_from"
        )
        assert [r["unit_amount"] for r in await cur.fetchall()] == [500, 700]


async def test_a_sku_retired_after_the_post_is_still_sold_at_its_terms_then(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """Retired after the payment was received: priced as it was on sale; retired before:
    `inactive_sku`."""
    await _set(pool, "widget", 1999)
    before = await _create(api, agent_key, line_items=WIDGET)
    async with pool.connection() as conn, conn.transaction():
        assert await pricing.set_active(conn, "widget", "usd", False) == 1
    after = await _create(api, agent_key, line_items=WIDGET)
    payment = await _priced(api, agent_key, pool, before["id"])
    assert (payment["status"], payment["amount_subtotal"]) == ("priced", 1999)
    refused = await _priced(api, agent_key, pool, after["id"])
    assert refused["status"] == "rejected"
    assert refused["failure"]["code"] == "inactive_sku"


async def test_a_sku_created_after_the_post_leaves_the_payment_unknown_sku(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await _create(api, agent_key, line_items=WIDGET)
    await _set(pool, "widget", 1999)
    payment = await _priced(api, agent_key, pool, created["id"])
    assert payment["status"] == "rejected"
    assert payment["failure"]["code"] == "unknown_sku"
    assert payment["amount_total"] is None


def test_the_migration_keeps_pricing_payments_received_before_it_at_todays_catalog(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database with prices and a payment not yet priced when 0025 comes: the payment is
    priced at the catalog as it stood (the prices are in force since always), not rejected
    `unknown_sku` for want of a version; a change after the migration applies to the
    payments received after it."""
    name = pg_server.fresh_name()
    url = pg_server.create(name)
    try:
        migrate_before(url, "0025_price_history.sql", tmp_path, monkeypatch)
        with psycopg.connect(url) as conn:
            conn.execute(
                """INSERT INTO prices (sku, currency, unit_amount, description)
                   VALUES ('widget', 'usd', 1999, 'A widget'), ('gadget', 'usd', 500, NULL);
                   INSERT INTO agents (id, name) VALUES ('agt_a', 'a');
                   INSERT INTO payment_jobs (id, agent_id, currency, payment_method,
                                             line_items, created_at)
                   VALUES ('pay_old', 'agt_a', 'usd', 'pm_card_visa',
                           '[{"sku": "widget", "quantity": 2}]', now() - interval '1 hour')"""
            )
        assert schema.migrate(url)[0] == "0025_price_history"
        asyncio.run(_price_after_the_migration(url))
    finally:
        pg_server.drop(name)


async def _price_after_the_migration(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(
        url, row_factory=dict_row, autocommit=True
    ) as conn:
        assert await _unit_amount(conn, "pay_old") == 1999
        cur = await conn.execute(
            """SELECT sku, unit_amount, valid_from = '-infinity' AS always FROM price_history
               ORDER BY sku"""
        )
        assert [(r["sku"], r["unit_amount"], r["always"]) for r in await cur.fetchall()] == [
            ("gadget", 500, True),
            ("widget", 1999, True),
        ]
        async with conn.transaction():
            await pricing.set_price(conn, "widget", "usd", 99000)
            new = await payments.insert(
                conn,
                agent_id="agt_a",
                currency="usd",
                payment_method="pm_card_visa",
                line_items=[{"sku": "widget", "quantity": 2}],
            )
        assert await _unit_amount(conn, "pay_old") == 1999
        # Received in the change's transaction, which began before the change: the price
        # before it (a version starts when its change is made, `clock_timestamp()`).
        assert await _unit_amount(conn, new["id"]) == 1999
        async with conn.transaction():
            newer = await payments.insert(
                conn,
                agent_id="agt_a",
                currency="usd",
                payment_method="pm_card_visa",
                line_items=[{"sku": "widget", "quantity": 2}],
            )
        assert await _unit_amount(conn, newer["id"]) == 99000


async def _unit_amount(conn: Any, payment_id: str) -> int:
    """What `pricing.price` makes the payment's widget cost (two of them), without moving it."""
    async with conn.transaction():
        payment = await payments.lock(conn, payment_id)
        assert payment is not None
        amounts = await pricing.price(conn, payment)
    lines = amounts["price_breakdown"]["lines"]
    assert amounts["amount_subtotal"] == 2 * lines[0]["unit_amount"]
    return int(lines[0]["unit_amount"])
