"""The double-entry ledger of agent budgets: balances, holds, postings, concurrency."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tasks import agents, ledger, payments, pricing, risk
from tasks.db import Pool
from tasks.settings import get_settings
from tests.conftest import auth, run_jobs
from workers.cli import app as cli


async def assert_ledger_sound(conn: Any) -> None:
    """Every account's balance is the sum of its entries; every transaction, and the whole
    ledger, sums to zero per currency; no budget or holds account is below zero."""
    assert await ledger.problems(conn) == []
    cur = await conn.execute(
        """SELECT count(*) AS n FROM ledger_accounts
           WHERE kind IN ('agent_budget', 'agent_holds') AND balance < 0"""
    )
    assert (await cur.fetchone())["n"] == 0


async def balances(conn: Any, agent_id: str, currency: str = "usd") -> tuple[int, int]:
    """(available, held) of an agent in a currency."""
    cur = await conn.execute(
        """SELECT coalesce(sum(balance) FILTER (WHERE kind = 'agent_budget'), 0) AS available,
                  coalesce(sum(balance) FILTER (WHERE kind = 'agent_holds'), 0) AS held
           FROM ledger_accounts WHERE agent_id = %s AND currency = %s""",
        (agent_id, currency),
    )
    row = await cur.fetchone()
    return int(row["available"]), int(row["held"])


async def platform_balances(conn: Any, currency: str = "usd") -> dict[str, int]:
    """The platform accounts' balances in a currency (the sums of their entries)."""
    cur = await conn.execute(
        """SELECT kind, balance FROM ledger_account_balances
           WHERE agent_id IS NULL AND currency = %s ORDER BY kind""",
        (currency,),
    )
    return {r["kind"]: int(r["balance"]) for r in await cur.fetchall()}


async def new_agent(pool: Pool, name: str, budget: int | None = None, currency: str = "usd") -> str:
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, name)
        if budget is not None:
            await ledger.open_budget(conn, agent.id, budget, currency, actor="test")
    return agent.id


async def priced_payment(
    pool: Pool, agent_id: str, amount: int, currency: str = "usd"
) -> dict[str, Any]:
    async with pool.connection() as conn, conn.transaction():
        payment = await payments.insert(
            conn, agent_id=agent_id, currency=currency, payment_method="pm_card_visa", amount=amount
        )
        assert await pricing.advance(conn, payment["id"]) == "priced"
        found = await payments.get(conn, payment["id"])
    assert found is not None
    return found


async def move(pool: Pool, payment_id: str, *path: str) -> None:
    """Drive a payment along `path`, one transaction per step, as the roles would."""
    for to in path:
        async with pool.connection() as conn, conn.transaction():
            payment = await payments.lock(conn, payment_id)
            assert payment is not None
            await payments.transition(conn, payment, to, actor="test:driver")


# --- what the database refuses -----------------------------------------------------------


async def test_the_database_refuses_unbalanced_edited_or_deleted_ledger_rows(
    pool: Pool, database_url: str
) -> None:
    agent_id = await new_agent(pool, "a", budget=1000)
    async with pool.connection() as conn, conn.transaction():
        budget = await ledger.account(conn, ledger.AGENT_BUDGET, "usd", agent_id)
        funding = await ledger.account(conn, ledger.EXTERNAL_FUNDING, "usd")
        eur = await ledger.account(conn, ledger.EXTERNAL_FUNDING, "eur")
    with pytest.raises(psycopg.errors.CheckViolation, match="does not balance"):
        async with pool.connection() as conn, conn.transaction():
            await ledger.post(
                conn, "deposit", [(funding, "usd", -500), (budget, "usd", 400)], actor="t"
            )
    # Summing to zero across currencies is not balancing.
    with pytest.raises(psycopg.errors.CheckViolation, match="does not balance"):
        async with pool.connection() as conn, conn.transaction():
            await ledger.post(
                conn, "deposit", [(eur, "eur", -500), (budget, "usd", 500)], actor="t"
            )
    # An entry's currency is its account's.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        async with pool.connection() as conn, conn.transaction():
            await ledger.post(
                conn, "deposit", [(funding, "eur", -5), (budget, "eur", 5)], actor="t"
            )
    # A budget never goes below zero.
    with pytest.raises(psycopg.errors.CheckViolation, match="agent_not_negative"):
        async with pool.connection() as conn, conn.transaction():
            await ledger.post(
                conn, "deposit", [(funding, "usd", 1001), (budget, "usd", -1001)], actor="t"
            )

    with psycopg.connect(database_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only by posting"):
            conn.execute(
                "UPDATE ledger_accounts SET balance = balance + 1 WHERE id = %s", (budget,)
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE ledger_entries SET amount = amount * 2")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM ledger_entries")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM ledger_transactions")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("TRUNCATE ledger_entries CASCADE")
    async with pool.connection() as conn:
        assert await balances(conn, agent_id) == (1000, 0)
        await assert_ledger_sound(conn)


# --- any mix of outcomes: a property -----------------------------------------------------

OUTCOMES = [
    "reconciled",
    "failed",
    "canceled",
    "review_rejected",
    "refund_part",
    "refund_all",
    "dispute_rest",
]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=st.lists(
        st.one_of(
            st.tuples(st.just("deposit"), st.integers(0, 2), st.integers(1, 5000)),
            # From the provider's smallest charge in usd (min_charge_amount).
            st.tuples(st.sampled_from(OUTCOMES), st.integers(0, 2), st.integers(50, 4000)),
        ),
        min_size=1,
        max_size=8,
    ),
    currency=st.sampled_from(["usd", "kwd"]),
)
async def test_any_mix_of_postings_keeps_every_transaction_and_balance_exact(
    pool: Pool, fees: None, plan: list[tuple[str, int, int]], currency: str
) -> None:
    """Deposits and payments that end reconciled, failed, canceled, rejected in review,
    partly or fully refunded, or partly refunded and the rest lost to a dispute, for
    budgeted and unbudgeted agents, with tax and fees."""
    step = 10 if currency == "kwd" else 1
    tag = secrets.token_hex(5)  # hypothesis seeds `random`: names must differ per example
    names = [f"p{tag}-{i}" for i in range(3)]
    # Agent 0 is unbudgeted (spends from external funding); 1 and 2 start with budgets.
    ids = [
        await new_agent(pool, names[0]),
        await new_agent(pool, names[1], budget=3000 * step, currency=currency),
        await new_agent(pool, names[2], budget=0, currency=currency),
    ]
    for op, who, amount in plan:
        agent_id, amount = ids[who], amount * step
        if op == "deposit":
            async with pool.connection() as conn, conn.transaction():
                await ledger.deposit(conn, agent_id, amount, currency, actor="test")
            continue
        payment = await priced_payment(pool, agent_id, amount, currency)
        rules = get_settings()
        if op == "review_rejected":
            rules = rules.model_copy(update={"risk_review_above": {"default": 0}})
        async with pool.connection() as conn, conn.transaction():
            decided = await risk.advance(conn, payment["id"], rules)
            rejected = await payments.get(conn, payment["id"])
        if decided == "rejected":
            # Only a budget refuses here (agent 0 is held to one once a deposit funds it).
            assert rejected is not None and rejected["failure_code"] == "insufficient_budget"
            continue
        if op == "review_rejected":
            assert decided == "in_review"
            async with pool.connection() as conn, conn.transaction():
                await risk.decide(conn, payment["id"], approve=False, actor="test")
        elif op == "failed":
            await move(pool, payment["id"], "charging", "failed")
        elif op == "canceled":
            await move(pool, payment["id"], "charging", "authorized", "canceled")
        else:
            await move(pool, payment["id"], "charging", "succeeded", "reconciled")
            total = payment["amount_total"]
            half = total // 2 - (total // 2) % step
            refunds = {"refund_part": [half], "refund_all": [total], "dispute_rest": [half]}
            for i, part in enumerate(refunds.get(op, [])):
                if part:
                    async with pool.connection() as conn, conn.transaction():
                        locked = await payments.lock(conn, payment["id"])
                        await ledger.post_refund(
                            conn, locked, refund_id=f"re_{payment['id']}_{i}", amount=part
                        )
            if op == "dispute_rest":
                # The customer disputes what the refund left and wins.
                async with pool.connection() as conn, conn.transaction():
                    locked = await payments.lock(conn, payment["id"])
                    loss = await ledger.post_dispute_loss(
                        conn,
                        locked,
                        dispute_id=f"dp_{payment['id']}",
                        amount=total - half,
                        currency=currency,
                    )
                    assert (loss.booked, loss.returned) == (total - half, 0)
                    # Refunds and the loss took back all of it, fee included.
                    cur = await conn.execute(
                        """SELECT a.kind, sum(e.amount) AS s FROM ledger_entries e
                           JOIN ledger_transactions t ON t.id = e.transaction_id
                           JOIN ledger_accounts a ON a.id = e.account_id
                           WHERE t.payment_id = %s
                             AND a.kind IN ('provider_clearing', 'platform_fees')
                           GROUP BY a.kind""",
                        (payment["id"],),
                    )
                    assert {r["s"] for r in await cur.fetchall()} <= {0}
    async with pool.connection() as conn:
        await assert_ledger_sound(conn)
        for agent_id in ids:
            assert (await balances(conn, agent_id, currency))[1] == 0  # nothing left held
        cur = await conn.execute(
            """SELECT count(*) AS n FROM ledger_transactions t
               JOIN payment_jobs p ON p.id = t.payment_id
               WHERE t.kind = 'capture' AND p.status NOT IN ('reconciled', 'refunded',
                                                              'partially_refunded')"""
        )
        assert (await cur.fetchone())["n"] == 0


# --- postings of one payment, by hand ----------------------------------------------------


async def test_hold_capture_and_refunds_post_exactly_once(pool: Pool, fees: None) -> None:
    agent_id = await new_agent(pool, "budgeted", budget=10_000)
    payment = await priced_payment(pool, agent_id, 1999)  # tax 165, fee 88 → total 2252
    assert (payment["amount_total"], payment["amount_fee"]) == (2252, 88)
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, payment["id"]) == "approved"
        # Holding twice holds once.
        locked = await payments.lock(conn, payment["id"])
        again = await ledger.hold(conn, locked, actor="test")
        assert again.ok and again.source == ledger.AGENT_BUDGET
    async with pool.connection() as conn:
        assert await balances(conn, agent_id) == (10_000 - 2252, 2252)
    await move(pool, payment["id"], "charging", "succeeded", "reconciled")
    async with pool.connection() as conn:
        assert await balances(conn, agent_id) == (10_000 - 2252, 0)
        platform = await platform_balances(conn)
    assert platform == {"external_funding": -10_000, "platform_fees": 88, "provider_clearing": 2164}

    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        await ledger.post_refund(conn, locked, refund_id="re_1", amount=1000)
        await ledger.post_refund(conn, locked, refund_id="re_1", amount=1000)  # same refund
        await ledger.post_refund(conn, locked, refund_id="re_2", amount=1252)
        # The last refund again, all of the capture refunded: booked before, not "too much".
        again = await ledger.post_refund(conn, locked, refund_id="re_2", amount=1252)
        assert again.booked == 0
        with pytest.raises(ValueError, match="exceed"):
            await ledger.post_refund(conn, locked, refund_id="re_3", amount=10)
    async with pool.connection() as conn:
        assert await balances(conn, agent_id) == (10_000, 0)
        platform = await platform_balances(conn)
        # A full refund reverses the capture exactly, fee included.
        assert platform == {"external_funding": -10_000, "platform_fees": 0, "provider_clearing": 0}
        cur = await conn.execute(
            """SELECT e.amount FROM ledger_entries e JOIN ledger_transactions t
                 ON t.id = e.transaction_id JOIN ledger_accounts a ON a.id = e.account_id
               WHERE t.reference = 're_1' AND a.kind = 'platform_fees'"""
        )
        # 1000 of 2252 refunded: fee share 1000 * 88 / 2252 = 39.08 → 39.
        assert [r["amount"] for r in await cur.fetchall()] == [-39]
        await assert_ledger_sound(conn)


async def test_a_lost_dispute_is_booked_once_and_never_gives_the_budget_back(
    pool: Pool, fees: None
) -> None:
    """A chargeback the customer won took the money back at the provider, and the ledger
    still counted it in provider clearing and platform fees. It is now booked once per
    dispute into `disputes_lost`, in the proportion a refund uses; the agent's budget is not
    given back (a refund gives it back). Of a dispute of money refunds gave back already,
    nothing is booked: the provider gives that part back."""
    agent_id = await new_agent(pool, "disputed", budget=10_000)
    payment = await priced_payment(pool, agent_id, 1999)  # total 2252, fee 88
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, payment["id"]) == "approved"
    await move(pool, payment["id"], "charging", "succeeded", "reconciled")
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        refund = await ledger.post_refund(conn, locked, refund_id="re_1", amount=1000)
        assert (refund.booked, refund.returned) == (1000, 0)
        # The customer disputes the rest and wins: the capture is all taken back.
        loss = await ledger.post_dispute_loss(
            conn, locked, dispute_id="dp_1", amount=1252, currency="usd"
        )
        assert (loss.booked, loss.returned, loss.problem) == (1252, 0, None)
        # The same dispute again (`charge.dispute.updated`, then `.closed`): nothing more.
        again = await ledger.post_dispute_loss(
            conn, locked, dispute_id="dp_1", amount=1252, currency="usd"
        )
        assert again.booked == 0 and again.problem is None
    async with pool.connection() as conn:
        # The refund gave 1000 back to the budget; the lost dispute gave nothing back.
        assert await balances(conn, agent_id) == (10_000 - 2252 + 1000, 0)
        assert await platform_balances(conn) == {
            "disputes_lost": 1252,
            "external_funding": -10_000,
            "platform_fees": 0,
            "provider_clearing": 0,
        }
        await assert_ledger_sound(conn)
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        # A second dispute of money taken back already: the provider gives it back.
        twice = await ledger.post_dispute_loss(
            conn, locked, dispute_id="dp_2", amount=500, currency="usd"
        )
        assert (twice.booked, twice.returned, twice.problem) == (0, 500, None)
        # Refunds alone never exceed the capture.
        with pytest.raises(ValueError, match="exceed"):
            await ledger.post_refund(conn, locked, refund_id="re_2", amount=1253)
    async with pool.connection() as conn:
        platform = await platform_balances(conn)
        assert (platform["platform_fees"], platform["provider_clearing"]) == (0, 0)
        assert platform["disputes_lost"] == 1252
        await assert_ledger_sound(conn)

    # A payment with no capture, and a dispute in another currency: nothing booked, said why.
    held = await priced_payment(pool, agent_id, 500)
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, held["id"]) == "approved"
        locked = await payments.lock(conn, held["id"])
        loss = await ledger.post_dispute_loss(
            conn, locked, dispute_id="dp_3", amount=500, currency="usd"
        )
        assert loss.booked == 0 and "no capture" in (loss.problem or "")
    await move(pool, held["id"], "charging", "succeeded", "reconciled")
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, held["id"])
        loss = await ledger.post_dispute_loss(
            conn, locked, dispute_id="dp_3", amount=500, currency="eur"
        )
        assert loss.booked == 0 and "eur" in (loss.problem or "")
        cur = await conn.execute(
            "SELECT count(*) AS n FROM ledger_transactions WHERE reference = 'dp_3'"
        )
        assert (await cur.fetchone())["n"] == 0


async def _reversal_books(conn: Any, payment_id: str) -> dict[str, int]:
    cur = await conn.execute(
        """SELECT a.kind, sum(e.amount) AS s FROM ledger_transactions t
             JOIN ledger_entries e ON e.transaction_id = t.id
             JOIN ledger_accounts a ON a.id = e.account_id
            WHERE t.payment_id = %s AND t.kind IN ('refund', 'dispute_lost')
            GROUP BY a.kind""",
        (payment_id,),
    )
    return {r["kind"]: int(r["s"]) for r in await cur.fetchall()}


async def _captured_payment(
    pool: Pool, agent_id: str, amount: int, captured: int | None
) -> tuple[Any, Any]:
    payment = await priced_payment(pool, agent_id, amount)
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, payment["id"]) == "approved"
    await move(pool, payment["id"], "charging", "succeeded")
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        kw = {} if captured is None else {"amount_captured": captured}
        await payments.transition(conn, locked, "reconciled", actor="test", **kw)
    async with pool.connection() as conn:
        return await payments.get(conn, payment["id"]), await ledger._captured(conn, payment["id"])


async def test_refunds_and_a_lost_dispute_book_the_same_in_any_order(
    pool: Pool, fees: None
) -> None:
    """Refunds and a lost dispute of one payment (fees, partial captures; a dispute of all
    of it, of what refunds left, or of any part), learned in any order, each dispute
    booking twice: refunds go back to the budget, the loss is what refunds left of the
    dispute, and provider clearing and fees give up exactly what both took back."""
    rng = random.Random(7)
    agent_id = await new_agent(pool, "fuzz", budget=10_000_000)
    bad = []
    for case in range(40):
        amount = rng.randint(50, 5000)
        partial = rng.random() < 0.3
        p0 = await priced_payment(pool, agent_id, amount)  # only to learn the total
        total0 = p0["amount_total"]
        payment, cap = await _captured_payment(
            pool, agent_id, amount, rng.randint(1, total0) if partial else None
        )
        T = cap["total"]
        n = rng.randint(0, 3)
        refunds = []
        left = T
        for i in range(n):
            if left <= 1:
                break
            r = rng.randint(1, max(1, left // 2))
            refunds.append((f"re_{case}_{i}", r))
            left -= r
        dispute = rng.choice([T, max(1, T - sum(r for _, r in refunds)), rng.randint(1, T)])
        items = [("refund", rid, r) for rid, r in refunds] + [("dispute", f"dp_{case}", dispute)]
        order = items[:]
        rng.shuffle(order)
        async with pool.connection() as conn, conn.transaction():
            locked = await payments.lock(conn, payment["id"])
            for rep in range(2):  # every dispute booking twice: duplicates book nothing
                for kind, ref, amt in order:
                    if kind == "refund" and rep == 1:
                        continue
                    if kind == "refund":
                        await ledger.post_refund(conn, locked, refund_id=ref, amount=amt)
                    else:
                        await ledger.post_dispute_loss(
                            conn, locked, dispute_id=ref, amount=amt, currency="usd"
                        )
        R = sum(r for _, r in refunds)
        loss = min(dispute, T - R)
        async with pool.connection() as conn:
            books = await _reversal_books(conn, payment["id"])
            await assert_ledger_sound(conn)
        got = (
            books.get("disputes_lost", 0),
            books.get("provider_clearing", 0) + books.get("platform_fees", 0),
            books.get("agent_budget", 0),
            books.get("platform_fees", 0),
        )
        fee = ledger._fee_share(R + loss, [T - cap["fee"], cap["fee"]], "usd")
        want = (loss, -(R + loss), R, -fee)
        if got != want:
            bad.append((case, T, cap["fee"], refunds, dispute, [o[0] for o in order], got, want))
    assert bad == []


# --- concurrency -------------------------------------------------------------------------


async def test_200_concurrent_payments_and_deposits_never_lose_an_update(pool: Pool) -> None:
    agent_id = await new_agent(pool, "busy", budget=20_000)
    rng = random.Random(5)
    amounts = [rng.randint(100, 2000) for _ in range(150)]
    priced = [await priced_payment(pool, agent_id, a) for a in amounts]
    deposits = [rng.randint(100, 1000) for _ in range(50)]

    async def decide(payment_id: str) -> str | None:
        async with pool.connection() as conn, conn.transaction():
            return await risk.advance(conn, payment_id)

    async def deposit(amount: int) -> None:
        async with pool.connection() as conn, conn.transaction():
            await ledger.deposit(conn, agent_id, amount, "usd", actor="test")

    work = [decide(p["id"]) for p in priced] + [deposit(a) for a in deposits]
    random.Random(9).shuffle(work)
    await asyncio.gather(*work)

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status, failure_code, amount_total FROM payment_jobs WHERE agent_id = %s",
            (agent_id,),
        )
        rows = await cur.fetchall()
        available, held = await balances(conn, agent_id)
        await assert_ledger_sound(conn)
    approved = [r["amount_total"] for r in rows if r["status"] == "approved"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(approved) + len(rejected) == 150
    assert approved and rejected  # the budget ran out along the way
    assert {r["failure_code"] for r in rejected} == {"insufficient_budget"}
    assert held == sum(approved)
    assert available == 20_000 + sum(deposits) - sum(approved)
    assert available >= 0

    # Settle them all at once, half captured and half released, concurrently as well.
    async def settle(payment_id: str, ok: bool) -> None:
        await move(
            pool, payment_id, "charging", *(("succeeded", "reconciled") if ok else ("failed",))
        )

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM payment_jobs WHERE agent_id = %s AND status = 'approved' ORDER BY id",
            (agent_id,),
        )
        ids = [r["id"] for r in await cur.fetchall()]
    await asyncio.gather(*(settle(pid, i % 2 == 0) for i, pid in enumerate(ids)))
    async with pool.connection() as conn:
        final_available, final_held = await balances(conn, agent_id)
        cur = await conn.execute(
            "SELECT coalesce(sum(amount_total), 0) AS s FROM payment_jobs "
            "WHERE agent_id = %s AND status = 'reconciled'",
            (agent_id,),
        )
        spent = int((await cur.fetchone())["s"])
        await assert_ledger_sound(conn)
    assert final_held == 0
    assert final_available == 20_000 + sum(deposits) - spent


async def test_postings_of_different_agents_never_wait_on_each_other(
    pool: Pool, fees: None
) -> None:
    """Every kind of posting touches the shared platform accounts (external funding,
    provider clearing, fees), yet one agent's uncommitted postings never make another
    agent's wait: the platform accounts carry no running balance to lock."""
    warm = await new_agent(pool, "warm-up")  # creates the platform accounts first
    first = await priced_payment(pool, warm, 1000)
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, first["id"]) == "approved"
    await move(pool, first["id"], "charging", "succeeded", "reconciled")

    async def prepared(side: int) -> dict[str, Any]:
        unbudgeted = await new_agent(pool, f"u{side}")
        budgeted = await new_agent(pool, f"b{side}", budget=100_000)
        plan: dict[str, Any] = {"budgeted": budgeted}
        for name, agent_id, path in (
            ("hold_u", unbudgeted, ()),
            ("hold_b", budgeted, ()),
            ("capture_u", unbudgeted, ("charging", "succeeded")),
            ("capture_b", budgeted, ("charging", "succeeded")),
            ("release_b", budgeted, ("charging",)),
            ("refund_u", unbudgeted, ("charging", "succeeded", "reconciled")),
        ):
            payment = await priced_payment(pool, agent_id, 1000 + side)
            if path:
                async with pool.connection() as conn, conn.transaction():
                    assert await risk.advance(conn, payment["id"]) == "approved"
                await move(pool, payment["id"], *path)
            plan[name] = payment["id"]
        return plan

    sides = [await prepared(1), await prepared(2)]

    async def post_everything(conn: Any, plan: dict[str, Any]) -> None:
        for name in ("hold_u", "hold_b"):
            assert await risk.advance(conn, plan[name]) == "approved"
        for name, to in (("capture_u", "reconciled"), ("capture_b", "reconciled")):
            await payments.transition(conn, await payments.lock(conn, plan[name]), to, actor="t")
        await payments.transition(
            conn, await payments.lock(conn, plan["release_b"]), "failed", actor="t"
        )
        locked = await payments.lock(conn, plan["refund_u"])
        await ledger.post_refund(conn, locked, refund_id=f"re_{plan['refund_u']}", amount=500)
        await ledger.deposit(conn, plan["budgeted"], 700, "usd", actor="test")

    async with pool.connection() as one, one.transaction():
        await post_everything(one, sides[0])  # left uncommitted while the other side posts
        async with pool.connection() as two, two.transaction():
            await two.execute("SET LOCAL lock_timeout = '3s'")  # waiting would raise
            await post_everything(two, sides[1])

    async with pool.connection() as conn:
        await assert_ledger_sound(conn)
        # No running balance on platform accounts: their balance is the sum of their entries.
        cur = await conn.execute(
            "SELECT count(*) AS n FROM ledger_accounts WHERE agent_id IS NULL AND balance <> 0"
        )
        assert (await cur.fetchone())["n"] == 0
        cur = await conn.execute(
            """SELECT
                 coalesce(sum(p.amount_total) FILTER (WHERE p.status = 'reconciled'), 0)
                     AS captured,
                 coalesce(sum(p.amount_total) FILTER (WHERE NOT EXISTS (
                     SELECT 1 FROM ledger_accounts a
                     WHERE a.kind = 'agent_budget' AND a.agent_id = p.agent_id)), 0)
                     AS unbudgeted_spent
               FROM payment_jobs p"""
        )
        sums = await cur.fetchone()
        platform = await platform_balances(conn)
        cur = await conn.execute(
            "SELECT kind, actor FROM ledger_transactions WHERE payment_id = ANY(%s)",
            ([sides[1]["capture_u"], sides[1]["refund_u"]],),
        )
        actors = sorted((r["kind"], r["actor"]) for r in await cur.fetchall())
    # Postings are by whoever made the transition in their transaction (the refund comes
    # after the transaction's last transition, by "t").
    assert actors == [
        ("capture", "t"),
        ("capture", "test:driver"),
        ("hold", "worker:risk"),
        ("hold", "worker:risk"),
        ("refund", "t"),
    ]
    refunded = 2 * 500
    deposited = 2 * 100_000 + 2 * 700
    assert platform["provider_clearing"] + platform["platform_fees"] == (
        sums["captured"] - refunded
    )
    assert platform["platform_fees"] > 0
    assert platform["external_funding"] == -deposited - sums["unbudgeted_spent"] + refunded


# --- through the pipeline and the provider -----------------------------------------------


async def _pay(api: httpx.AsyncClient, key: str, **body: Any) -> str:
    body = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", **body}
    response = await api.post("/v1/payments", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    payment_id: str = response.json()["id"]
    return payment_id


async def test_succeeded_failed_canceled_and_refunded_payments_leave_exact_balances(
    api: httpx.AsyncClient,
    agent_key: str,
    operator_key: str,
    pool: Pool,
    provider_base: str,
    fees: None,
) -> None:
    me = (await api.get("/v1/balance", headers=auth(agent_key))).json()
    assert (me["budgeted"], me["unlimited"]) == (False, True)
    deposit = await api.post(
        f"/v1/agents/{me['agent_id']}/deposits",
        json={"amount": 50_000, "currency": "usd", "description": "top-up"},
        headers=auth(operator_key),
    )
    assert deposit.status_code == 201, deposit.text
    assert deposit.json()["balance"] == 50_000

    ok = await _pay(api, agent_key)
    declined = await _pay(api, agent_key, payment_method="pm_card_chargeDeclined")
    manual = await _pay(api, agent_key, capture_method="manual")
    refunded = await _pay(api, agent_key, amount=1000)
    partly = await _pay(api, agent_key, amount=3000)
    await run_jobs(pool)
    canceled = await api.post(f"/v1/payments/{manual}/cancel", headers=auth(agent_key))
    assert canceled.status_code == 202, canceled.text
    for pid, amount in ((refunded, None), (partly, 1000)):
        body = {"amount": amount} if amount else None
        response = await api.post(f"/v1/payments/{pid}/refunds", json=body, headers=auth(agent_key))
        assert response.status_code == 202, response.text
    await run_jobs(pool)

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, status, amount_total, amount_refunded FROM payment_jobs WHERE id = ANY(%s)",
            ([ok, declined, manual, refunded, partly],),
        )
        rows = {r["id"]: r for r in await cur.fetchall()}
        await assert_ledger_sound(conn)
    assert [rows[p]["status"] for p in (ok, declined, manual, refunded, partly)] == [
        "reconciled",
        "failed",
        "canceled",
        "refunded",
        "partially_refunded",
    ]
    spent = sum(
        rows[p]["amount_total"] - rows[p]["amount_refunded"] for p in (ok, refunded, partly)
    )
    balance = (await api.get("/v1/balance", headers=auth(agent_key))).json()
    assert balance["budgeted"] is True and balance["unlimited"] is False
    assert balance["available"] == [{"amount": 50_000 - spent, "currency": "usd"}]
    assert balance["held"] == [{"amount": 0, "currency": "usd"}]

    statement = (await api.get("/v1/balance/transactions", headers=auth(agent_key))).json()
    budget_rows = [t for t in statement["data"] if t["account"] == "budget"]
    assert budget_rows[0]["balance_after"] == 50_000 - spent  # newest first
    assert budget_rows[-1]["type"] == "deposit" and budget_rows[-1]["amount"] == 50_000
    types = {t["type"] for t in statement["data"]}
    assert types == {"deposit", "hold", "capture", "release", "refund"}
    page = (await api.get("/v1/balance/transactions?limit=2", headers=auth(agent_key))).json()
    assert page["has_more"] is True and len(page["data"]) == 2
    older = (
        await api.get(
            f"/v1/balance/transactions?limit=2&starting_after={page['data'][-1]['id']}",
            headers=auth(agent_key),
        )
    ).json()
    assert older["data"][0]["id"] < page["data"][-1]["id"]

    # Page by page, each entry's `balance_after` is its account's running total.
    shown: list[dict[str, Any]] = []
    after = None
    while True:
        url = "/v1/balance/transactions?limit=3" + (f"&starting_after={after}" if after else "")
        page = (await api.get(url, headers=auth(agent_key))).json()
        shown += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    running: dict[tuple[str, str], int] = {}
    expected = {}
    for row in sorted(shown, key=lambda r: r["id"]):
        account = (row["account"], row["currency"])
        running[account] = running.get(account, 0) + row["amount"]
        expected[row["id"]] = running[account]
    assert len({r["id"] for r in shown}) == len(shown) >= 10
    assert [r["balance_after"] for r in shown] == [expected[r["id"]] for r in shown]


async def test_deposits_are_for_operators_and_checked(
    api: httpx.AsyncClient, agent_key: str, operator_key: str
) -> None:
    me = (await api.get("/v1/balance", headers=auth(agent_key))).json()["agent_id"]
    url = f"/v1/agents/{me}/deposits"
    body = {"amount": 1000, "currency": "usd"}
    denied = await api.post(url, json=body, headers=auth(agent_key))
    assert denied.status_code == 403
    missing = await api.post(
        "/v1/agents/agt_nobody/deposits", json=body, headers=auth(operator_key)
    )
    assert missing.status_code == 404
    for bad, param in (
        ({"amount": 0, "currency": "usd"}, "amount"),
        ({"amount": 1005, "currency": "kwd"}, "amount"),
        ({"amount": 100, "currency": "xyz"}, "currency"),
        ({"amount": "100", "currency": "usd"}, "amount"),
    ):
        response = await api.post(url, json=bad, headers=auth(operator_key))
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] == param
    # A whole float is a whole number, as for payments.
    whole = await api.post(
        url, json={"amount": 1000.0, "currency": "usd"}, headers=auth(operator_key)
    )
    assert whole.status_code == 201, whole.text
    other = await api.get("/v1/balance?agent_id=agt_someone", headers=auth(agent_key))
    assert other.status_code == 403
    nobody = await api.get("/v1/balance?agent_id=agt_nobody", headers=auth(operator_key))
    assert (nobody.status_code, nobody.json()["error"]["param"]) == (404, "agent_id")
    balance = (await api.get(f"/v1/balance?agent_id={me}", headers=auth(operator_key))).json()
    assert balance["available"] == [{"amount": 1000, "currency": "usd"}]


async def test_cli_creates_an_agent_with_a_budget_and_funds_it(
    pool: Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(cli, list(args))

    created = await asyncio.to_thread(
        invoke, "agents", "create", "shopper", "--budget", "5000", "--currency", "eur", "--json"
    )
    assert created.exit_code == 0, created.output
    agent_id = json.loads(created.output)["id"]
    funded = await asyncio.to_thread(
        invoke, "agents", "deposit", "shopper", "250", "--currency", "eur"
    )
    assert funded.exit_code == 0, funded.output
    assert "balance 5250 eur" in funded.output
    missing = await asyncio.to_thread(invoke, "agents", "deposit", "nobody", "250")
    assert missing.exit_code == 2  # not found
    # An operator reads it as the agent does (GET /v1/balance).
    shown = await asyncio.to_thread(invoke, "agents", "balance", "shopper", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["available"] == [{"amount": 5250, "currency": "eur"}]
    table = await asyncio.to_thread(invoke, "agents", "balance", "shopper")
    assert "eur" in table.output and "5250" in table.output, table.output
    nobody = await asyncio.to_thread(invoke, "agents", "balance", "nobody")
    assert nobody.exit_code == 2
    bad = await asyncio.to_thread(
        invoke, "agents", "create", "x", "--budget", "15", "--currency", "kwd"
    )
    assert bad.exit_code != 0
    zero = await asyncio.to_thread(invoke, "agents", "create", "frugal", "--budget", "0")
    assert zero.exit_code == 0, zero.output
    get_settings.cache_clear()
    async with pool.connection() as conn:
        assert await balances(conn, agent_id, "eur") == (5250, 0)
        assert await agents.find(conn, "x") is None  # refused before anything was created
        unlimited = [a["name"] for a in await ledger.unlimited_agents(conn)]
        assert "shopper" not in unlimited and "frugal" not in unlimited
        await assert_ledger_sound(conn)
