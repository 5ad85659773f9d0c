"""The short chaos run: workers SIGKILLed, Postgres restarted, the provider failing — and every
invariant still holds."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from sandbox.server import SandboxServer
from tasks import agents, payments
from tasks.db import Pool
from tasks.settings import Settings
from workers.chaos import Tracked, check_invariants, run_chaos


def test_a_short_chaos_run_keeps_every_invariant() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="apc", dir="/tmp"))  # short: Postgres' socket
    # Its own embedded Postgres (so it can be restarted) and its own sandbox.
    settings = Settings(database_url=None, stripe_api_base=None, data_dir=data_dir)
    out = io.StringIO()
    try:
        ok = run_chaos(
            settings, payments=60, seconds=15, seed=3, console=Console(file=out, width=160)
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    report = out.getvalue()
    assert ok, report
    assert "Postgres restarted once" in report
    assert "workers killed" in report and " 0 workers killed" not in report
    for check in (
        "faults injected: workers killed, provider errors and lost responses",
        "payments in the state their scenario asked for",
        "PaymentIntents: one succeeded (with the amount captured) per succeeded payment",
        "each payment's hold and collected money in the ledger match its state",
        "lost disputes: each booked once in disputes_lost",
        "refunds: none made twice",
        "every payment's events form a legal path",
        "ledger balances per currency",
        "no procrastinate job left doing",
    ):
        assert check in report


async def test_the_checks_catch_a_missing_charge_and_an_illegal_path(
    pool: Pool, provider_base: str
) -> None:
    """The checks are not vacuous: a reconciled payment with no PaymentIntent behind it, none
    of its money in the ledger, and an event that skips the state machine are all
    reported."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "checked")
        payment = await payments.insert(
            conn, agent_id=agent.id, currency="usd", payment_method="pm_card_visa", amount=100
        )
        for status in ("priced", "approved", "charging", "succeeded", "reconciled"):
            await conn.execute(
                "UPDATE payment_jobs SET status = %s, amount_subtotal = 100, amount_tax = 0,"
                " amount_fee = 0, amount_total = 100, amount_captured = 100 WHERE id = %s",
                (status, payment["id"]),
            )
        await conn.execute(
            """INSERT INTO payment_events (payment_id, type, from_status, to_status, actor)
               VALUES (%s, 'transition', 'reconciled', 'received', 'test')""",
            (payment["id"],),
        )
    async with httpx.AsyncClient(base_url=provider_base) as provider:
        plan = [Tracked("visa", id=payment["id"])]
        checks = {c.name: c for c in await check_invariants(pool, provider, plan)}
    intents = next(c for name, c in checks.items() if name.startswith("PaymentIntents:"))
    assert intents.failures == [f"{payment['id']} (reconciled): intents []"]
    money = checks["each payment's hold and collected money in the ledger match its state"]
    assert money.failures == [f"{payment['id']} (reconciled): held 0, collected 0; expected 0, 100"]
    assert not checks["every payment's events form a legal path"].ok
    assert checks["no procrastinate job left doing"].ok


async def test_the_faults_are_cleared_even_through_a_sandbox_slow_to_answer() -> None:
    """An overloaded run's sandbox may not accept a connection for a while: clearing the
    faults tries again instead of ending the run, checks unrun, on a traceback."""
    from workers import chaos

    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) < 3:
            raise httpx.ConnectTimeout("the sandbox is busy")
        return httpx.Response(200, json={"active": True, "injected": {"error": 4}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://x") as p:
        assert await chaos._clear_faults(p, pause=0) == {"error": 4}
        assert calls == ["GET", "GET", "GET", "DELETE"]
        calls.clear()
        with pytest.raises(httpx.ConnectTimeout):
            await chaos._clear_faults(p, tries=2, pause=0)


def test_the_dispute_check_catches_a_loss_unbooked_booked_twice_or_wrong() -> None:
    """A lost dispute at the provider must be in `disputes_lost` once, under its id, for its
    amount; a payment whose scenario disputes has one, lost; no other payment has one."""
    from workers.chaos import _dispute_check

    lost = {"pay_a": [("dp_a", "lost", 1000)]}
    assert _dispute_check({"pay_a"}, lost, {"pay_a": [("dp_a", 1000)]}).ok
    booked_once = {"pay_a": [("dp_a", 1000)]}
    assert _dispute_check({"pay_a"}, lost, booked_once, {"pay_a": 1000, "pay_c": 0}).ok
    assert not _dispute_check({"pay_a"}, lost, booked_once, {"pay_a": 0}).ok  # not shown
    assert _dispute_check({"pay_a"}, lost, {}).failures == [
        "pay_a: disputes_lost booked [], the provider lost [('dp_a', 1000)]"
    ]
    twice = {"pay_a": [("dp_a", 1000), ("dp_a:again", 1000)]}
    assert len(_dispute_check({"pay_a"}, lost, twice).failures) == 1
    assert not _dispute_check({"pay_a"}, lost, {"pay_a": [("dp_a", 900)]}).ok
    still_open = {"pay_a": [("dp_a", "needs_response", 1000)]}
    assert _dispute_check({"pay_a"}, still_open, {}).failures == [
        "pay_a: provider disputes [('dp_a', 'needs_response', 1000)], expected one lost"
    ]
    assert not _dispute_check({"pay_a"}, {}, {}).ok  # never disputed
    stray = _dispute_check(set(), {"pay_b": [("dp_b", "needs_response", 5)]}, {})
    assert stray.failures == [
        "pay_b: disputed at the provider [('dp_b', 'needs_response', 5)], its scenario was not"
    ]
    assert stray.count == 1


def test_a_run_whose_faults_did_not_fire_fails() -> None:
    """A run in which the provider's faults were refused (or too few requests for any to
    fire), or no worker was killed, proves nothing: it says so and fails."""
    from workers.chaos import _faults_check

    assert _faults_check(3, {"error": 2, "lose_response": 1}).ok
    assert _faults_check(3, {"error": 0, "lose_response": 0}).failures == [
        "the provider failed no request and lost no response"
    ]
    assert _faults_check(0, {"error": 1}).failures == ["no worker was killed"]
    # Enough requests that faults set would have fired: failing none fails as before.
    assert _faults_check(3, {"error": 0, "lose_response": 0}, requests=400).failures == [
        "the provider failed no request and lost no response"
    ]


def test_a_run_too_short_for_the_faults_to_fire_says_so() -> None:
    """`chaos --payments 30 --seconds 5`: too few provider requests while the faults were on
    for any to fire. It still fails (the run proved nothing), saying why and what to do."""
    from workers.chaos import ENOUGH_REQUESTS, _faults_check

    assert _faults_check(3, {"error": 0, "lose_response": 0}, requests=7).failures == [
        "only 7 provider requests: too few for the faults to fire; raise --payments or --seconds"
    ]
    assert _faults_check(3, {"error": 1}, requests=7).ok
    enough = _faults_check(3, {"error": 0}, requests=ENOUGH_REQUESTS).failures
    assert enough == ["the provider failed no request and lost no response"]


async def test_the_run_counts_the_provider_requests(sandbox: SandboxServer) -> None:
    from workers.chaos import _provider_requests

    async with httpx.AsyncClient(base_url=sandbox.base_url) as provider:
        before = await _provider_requests(provider)
        assert before is not None
        listed = await provider.get(
            "/v1/payment_intents", headers={"Authorization": "Bearer sk_test_chaos"}
        )
        listed.raise_for_status()
        assert await _provider_requests(provider) == before + 1
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(404)), base_url="http://x"
    ) as not_the_sandbox:
        assert await _provider_requests(not_the_sandbox) is None


def test_the_intent_check_catches_a_declined_payments_intent_left_open() -> None:
    """A declined payment's intent left open (`requires_payment_method`: another confirm
    could still take money for a payment that ended) passed the check as "holds no money";
    its void is checked now."""
    from workers.chaos import _intents_match

    failed = {"status": "failed", "amount_total": 2000, "amount_captured": None}
    assert not _intents_match(failed, [("requires_payment_method", 0)])
    assert _intents_match(failed, [("canceled", 0)])
    assert _intents_match(failed, [])
