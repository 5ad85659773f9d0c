"""The double-entry ledger of agent budgets (docs/ledger.md).

Accounts: per agent and currency an `agent_budget` (what the agent may still spend) and an
`agent_holds` (what risk reserved for its payments in flight); per currency the platform's
`external_funding` (where deposits come from, and what agents without a budget spend),
`provider_clearing` (what the provider collected for us), `platform_fees` and `disputes_lost`
(what chargebacks took back).

A transaction's entries sum to zero in every currency (checked by Postgres at commit); the
ledger is append-only (a correction is a new transaction). An entry on an agent's budget or
holds account moves that account's materialised balance in one
`UPDATE … SET balance = balance + amount` made by a trigger, so it is always the sum of its
entries, concurrent postings never lose an update, and budget and holds accounts can never go
below zero (a CHECK in the database). Platform accounts (external funding, provider clearing,
fees) carry no running balance: theirs is the sum of their entries, computed on read
(`ledger_account_balances`), so postings of different agents never wait on one shared row.
Entries of one transaction are written in account-id order, so concurrent postings lock rows
in the same order. Account ids are looked up with a plain SELECT (no lock, no write) and
inserted only when missing.

Postings of a payment, each at most once (keyed by the payment or refund id):
- hold (risk, priced → approved | in_review): source -total, agent holds +total; the source
  is the agent's budget, or external funding for an agent without a budget;
- capture (succeeded → reconciled): holds -total, provider clearing +(total - fee),
  platform fees +fee; after a partial capture at the provider, provider clearing and platform
  fees share what was collected (in proportion) and the source gets the rest back;
- release (→ rejected | failed | canceled): holds -total, source +total;
- refund (provider-confirmed): source +amount, provider clearing and platform fees - the
  amount split between them in proportion (largest remainder, cumulative over refunds and
  lost disputes);
- dispute_lost (a chargeback the customer won, keyed by the dispute id): disputes lost
  +amount, provider clearing and platform fees - the amount split as a refund's. The agent's
  budget is not given back: the agent spent it, the platform lost it. Refunds and lost
  disputes of the same money are both booked; beyond the capture, out of clearing alone.

Every payment transition passes through `on_transition` inside the transition's own
transaction, so ledger effects commit or roll back with the state change that causes them.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg

from tasks import money
from tasks.db import Conn
from tasks.settings import Settings, get_settings

Payment = dict

log = logging.getLogger("agentpay.ledger")

AGENT_BUDGET = "agent_budget"
AGENT_HOLDS = "agent_holds"
EXTERNAL_FUNDING = "external_funding"
PROVIDER_CLEARING = "provider_clearing"
PLATFORM_FEES = "platform_fees"
DISPUTES_LOST = "disputes_lost"
# The transaction kind of a lost dispute (and of the part of it the provider gave back).
DISPUTE_LOST = "dispute_lost"

_NOT_NEGATIVE = "ledger_accounts_agent_not_negative"
# Transitions that end a payment without a charge: its hold goes back where it came from.
_RELEASE_ON = frozenset({"rejected", "failed", "canceled"})


@dataclass(frozen=True)
class Hold:
    """What placing a hold did: `ok`, or the reason it could not (`code`, `message`)."""

    ok: bool
    transaction_id: str | None = None
    source: str | None = None
    code: str | None = None
    message: str | None = None


def _new_id() -> str:
    return f"ltx_{secrets.token_hex(12)}"


# --- accounts ----------------------------------------------------------------------------


_AGENT_KINDS = (AGENT_BUDGET, AGENT_HOLDS)


async def account(conn: Conn, kind: str, currency: str, agent_id: str | None = None) -> int:
    """The id of an account, created on first use."""
    found = await _find_account(conn, kind, currency, agent_id)
    return found if found is not None else await _create_account(conn, kind, currency, agent_id)


async def _find_account(conn: Conn, kind: str, currency: str, agent_id: str | None) -> int | None:
    # A plain read: it neither writes nor waits, whatever other postings hold.
    cur = await conn.execute(
        """SELECT id FROM ledger_accounts
           WHERE kind = %s AND agent_id IS NOT DISTINCT FROM %s AND currency = %s""",
        (kind, agent_id, currency),
    )
    row = await cur.fetchone()
    return int(row["id"]) if row else None


async def _create_account(conn: Conn, kind: str, currency: str, agent_id: str | None) -> int:
    # Only for an account not seen yet; a concurrent first use of the same account waits
    # here for the other's commit and then reads its row.
    cur = await conn.execute(
        """INSERT INTO ledger_accounts (kind, agent_id, currency) VALUES (%s, %s, %s)
           ON CONFLICT (kind, agent_id, currency) DO NOTHING
           RETURNING id""",
        (kind, agent_id, currency),
    )
    row = await cur.fetchone()
    if row is not None:
        return int(row["id"])
    found = await _find_account(conn, kind, currency, agent_id)
    assert found is not None
    return found


async def _accounts(conn: Conn, currency: str, agent_id: str, *platform: str) -> dict[str, Any]:
    """In one read: the agent's budget and holds accounts in `currency` and the named
    platform accounts of `currency` (kind → id, absent when not created yet), and whether the
    agent is held to a budget (a budget account in any currency)."""
    cur = await conn.execute(
        """SELECT kind, currency, id FROM ledger_accounts
           WHERE (kind = ANY(%s) AND agent_id = %s)
              OR (kind = ANY(%s) AND agent_id IS NULL AND currency = %s)""",
        (list(_AGENT_KINDS), agent_id, list(platform), currency),
    )
    found: dict[str, Any] = {"budgeted": False}
    for row in await cur.fetchall():
        if row["kind"] == AGENT_BUDGET:
            found["budgeted"] = True
        if row["currency"] == currency:
            found[row["kind"]] = int(row["id"])
    return found


async def unlimited_agents(conn: Conn, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Live agents that may spend without a budget: those never created with a budget nor
    funded — or none at all when `allow_unbudgeted_spending` is off."""
    settings = settings or get_settings()
    if not settings.allow_unbudgeted_spending:
        return []
    cur = await conn.execute(
        """SELECT a.id, a.name, a.is_operator FROM agents a
           WHERE a.revoked_at IS NULL
             AND NOT EXISTS (SELECT 1 FROM ledger_accounts l
                             WHERE l.kind = %s AND l.agent_id = a.id)
           ORDER BY a.name""",
        (AGENT_BUDGET,),
    )
    return await cur.fetchall()


# --- posting -----------------------------------------------------------------------------


async def post(
    conn: Conn,
    kind: str,
    entries: list[tuple[int, str, int]],
    *,
    actor: str | None,
    reference: str | None = None,
    payment_id: str | None = None,
    agent_id: str | None = None,
    description: str | None = None,
) -> str | None:
    """Post one transaction of `entries` (account id, currency, amount; zero amounts are
    left out) by `actor` (None: whoever the transaction's current payment transition is by,
    as set by tasks.payments). Returns its id, or None when a transaction of this kind and
    reference was posted before (a posting happens once). The database refuses entries that
    do not sum to zero per currency (at commit) and a budget or holds account going below
    zero."""
    # One account-id order for every posting: concurrent postings lock rows alike.
    rows = sorted(e for e in entries if e[2])
    # The transaction and its entries in one statement (one round trip); no entries are
    # written when the transaction was posted before.
    cur = await conn.execute(
        """WITH txn AS (
               INSERT INTO ledger_transactions (id, kind, reference, payment_id, agent_id,
                                                description, actor)
               -- No actor given: who the current transition is by (set by tasks.payments
               -- for the trigger).
               VALUES (%s, %s, %s, %s, %s, %s,
                       coalesce(%s::text, nullif(current_setting('agentpay.actor', true), ''),
                                'db:' || session_user))
               ON CONFLICT (kind, reference) DO NOTHING
               RETURNING id
           ), entries AS (
               INSERT INTO ledger_entries (transaction_id, account_id, currency, amount)
               SELECT txn.id, e.account_id, e.currency, e.amount
               FROM txn, unnest(%s::bigint[], %s::text[], %s::bigint[])
                   WITH ORDINALITY AS e(account_id, currency, amount, n)
               ORDER BY e.n
               RETURNING 1
           )
           SELECT id FROM txn""",
        (
            _new_id(),
            kind,
            reference,
            payment_id,
            agent_id,
            description,
            actor,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
        ),
    )
    row = await cur.fetchone()
    return str(row["id"]) if row else None


async def deposit(
    conn: Conn,
    agent_id: str,
    amount: int,
    currency: str,
    *,
    actor: str,
    description: str | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Fund an agent's budget from external funding (the agent is held to a budget from
    now on). Returns the deposit: its transaction id and the new balance."""
    problem = money.amount_problem(amount, currency)
    if problem:
        raise ValueError(problem)
    budget = await account(conn, AGENT_BUDGET, currency, agent_id)
    funding = await account(conn, EXTERNAL_FUNDING, currency)
    txn_id = await post(
        conn,
        "deposit",
        [(funding, currency, -amount), (budget, currency, amount)],
        actor=actor,
        reference=reference,
        agent_id=agent_id,
        description=description or "deposit",
    )
    return {
        "id": txn_id,
        "object": "deposit",
        "agent_id": agent_id,
        "amount": amount,
        "currency": currency,
        "balance": await _balance(conn, budget),
    }


async def open_budget(
    conn: Conn, agent_id: str, amount: int, currency: str, *, actor: str
) -> dict[str, Any]:
    """Hold an agent to a budget of `amount` in `currency` (zero is a budget too)."""
    if amount == 0:
        budget = await account(conn, AGENT_BUDGET, currency, agent_id)
        return {
            "id": None,
            "object": "deposit",
            "agent_id": agent_id,
            "amount": 0,
            "currency": currency,
            "balance": await _balance(conn, budget),
        }
    return await deposit(conn, agent_id, amount, currency, actor=actor, description="budget")


async def hold(
    conn: Conn, payment: Payment, *, actor: str, settings: Settings | None = None
) -> Hold:
    """Reserve the payment's total on the agent's budget (or, for an agent without a budget
    when that is allowed, on external funding). Safe to call twice."""
    settings = settings or get_settings()
    existing = await _transaction_of(conn, "hold", payment["id"])
    if existing is not None:
        return Hold(
            ok=True, transaction_id=existing, source=await _hold_source_kind(conn, existing)
        )
    agent_id, currency, total = payment["agent_id"], payment["currency"], payment["amount_total"]
    found = await _accounts(conn, currency, agent_id, EXTERNAL_FUNDING)
    if found["budgeted"]:
        source_kind = AGENT_BUDGET
    elif settings.allow_unbudgeted_spending:
        source_kind = EXTERNAL_FUNDING
    else:
        return Hold(
            ok=False,
            code="no_budget",
            message="the agent has no budget and agents without one may not spend",
        )
    source = found.get(source_kind) or await _create_account(
        conn, source_kind, currency, agent_id if source_kind == AGENT_BUDGET else None
    )
    holds = found.get(AGENT_HOLDS) or await _create_account(conn, AGENT_HOLDS, currency, agent_id)

    async def place() -> str | None:
        return await post(
            conn,
            "hold",
            [(source, currency, -total), (holds, currency, total)],
            actor=actor,
            reference=payment["id"],
            payment_id=payment["id"],
            agent_id=agent_id,
            description="hold for the payment total",
        )

    if source_kind == EXTERNAL_FUNDING:
        # Nothing here can go below zero (holds only grow): no savepoint needed.
        return Hold(ok=True, transaction_id=await place(), source=source_kind)
    try:
        async with conn.transaction():  # a savepoint: a refused hold leaves nothing behind
            txn_id = await place()
    except psycopg.errors.CheckViolation as error:
        if error.diag.constraint_name != _NOT_NEGATIVE:
            raise
        available = await _balance(conn, source)
        return Hold(
            ok=False,
            source=source_kind,
            code="insufficient_budget",
            message=f"budget {available} {currency} is less than the total {total}",
        )
    return Hold(ok=True, transaction_id=txn_id, source=source_kind)


async def capture(conn: Conn, payment: Payment, *, actor: str | None) -> str | None:
    """Turn the payment's hold into spending: provider clearing gets what was collected less
    the fee, platform fees the fee. When the provider collected less than the hold (a partial
    capture at the provider: the payment's `amount_captured`), the fee is its share of what
    was collected (in proportion, as for a refund) and the rest of the hold goes back to its
    source. Nothing when there is no open hold. `actor` None: the transition's."""
    held = await _open_hold(conn, payment["id"])
    if held is None:
        return None
    currency, total = payment["currency"], held["amount"]
    # Reconcile writes it within 0..total, and a CHECK holds it there.
    captured = payment.get("amount_captured")
    collected = total if captured is None else int(captured)
    fee = min(int(payment["amount_fee"] or 0), total)
    if collected < total:
        fee = _fee_share(collected, [total - fee, fee], currency)
    clearing, fees = await _platform_accounts(conn, currency)
    released = [(held["source"], currency, total - collected)] if collected < total else []
    return await post(
        conn,
        "capture",
        [
            (held["holds"], currency, -total),
            (clearing, currency, collected - fee),
            (fees, currency, fee),
            *released,
        ],
        actor=actor,
        reference=payment["id"],
        payment_id=payment["id"],
        agent_id=payment["agent_id"],
        description="payment captured",
    )


async def release(conn: Conn, payment: Payment, *, actor: str | None) -> str | None:
    """Give the payment's hold back to where it came from. Nothing when there is no open
    hold. `actor` None: the transition's."""
    held = await _open_hold(conn, payment["id"])
    if held is None:
        return None
    currency, total = payment["currency"], held["amount"]
    return await post(
        conn,
        "release",
        [(held["holds"], currency, -total), (held["source"], currency, total)],
        actor=actor,
        reference=payment["id"],
        payment_id=payment["id"],
        agent_id=payment["agent_id"],
        description=f"hold released ({payment['status']})",
    )


async def on_transition(conn: Conn, payment: Payment, from_status: str, to_status: str) -> None:
    """Ledger effects of a payment moving from `from_status` to `to_status` (the row is locked
    and already updated; `payment` holds the new values): reconciled captures the hold,
    rejected / failed / canceled release it."""
    if to_status == "reconciled":
        await capture(conn, payment, actor=None)
    elif to_status in _RELEASE_ON:
        await release(conn, payment, actor=None)


@dataclass(frozen=True)
class Reversal:
    """What booking a refund or a lost dispute did: `booked`, posted now (0 when nothing
    was, or it was booked before); `returned`, the part of a lost dispute the provider gives
    back because a refund had given it to the customer already (Stripe marks such a dispute
    lost, "partially won": a refund and a chargeback never take the same money twice) — of
    a dispute, what was not booked for that reason; of a refund learned after the loss was
    booked, what it took back out of `disputes_lost`; `problem`: why nothing could be
    booked."""

    booked: int = 0
    returned: int = 0
    problem: str | None = None


async def post_refund(conn: Conn, payment: Payment, *, refund_id: str, amount: int) -> Reversal:
    """Ledger effects of a refund of `amount` that the provider has confirmed: the amount
    goes back to where the payment's hold came from, out of provider clearing and platform
    fees in proportion (cumulative over the payment's refunds and lost disputes, so a full
    refund reverses the capture exactly). Once per `refund_id`. Refunds never exceed the
    capture (ValueError). A refund learned after a lost dispute of the same money was booked
    (it was made before the dispute: the provider refuses a refund of a disputed charge)
    shows that the provider gave that part of the dispute back: it leaves `disputes_lost`
    again (`Reversal.returned`), so that refunds and losses never take back more than the
    capture collected, whatever order they are learned in."""
    if amount <= 0:
        raise ValueError("a refund amount is positive")
    if await _transaction_of(conn, "refund", refund_id) is not None:
        return Reversal()  # booked before
    captured = await _captured(conn, payment["id"])
    if captured is None:
        log.warning(
            "refund %s of payment %s: nothing captured to reverse", refund_id, payment["id"]
        )
        return Reversal(problem="the payment has no capture in the ledger")
    refunded = await _reversed(conn, payment["id"], ("refund",))
    if refunded + amount > captured["total"]:
        raise ValueError(
            f"refunds of payment {payment['id']} ({refunded + amount}) exceed what was "
            f"captured ({captured['total']})"
        )
    before = await _reversed(conn, payment["id"])
    booked = await _post_reversal(
        conn,
        payment,
        "refund",
        captured,
        amount,
        before=before,
        to_account=captured["source"],
        reference=refund_id,
        actor=None,
        description="refund",
    )
    over = before + booked - captured["total"]
    if over <= 0:
        return Reversal(booked=booked)
    # What this refund takes back beyond the capture came out of provider clearing alone
    # (`_post_reversal`); the lost dispute gives it back there.
    currency = payment["currency"]
    clearing, _ = await _platform_accounts(conn, currency)
    await post(
        conn,
        DISPUTE_LOST,
        [
            (await account(conn, DISPUTES_LOST, currency), currency, -over),
            (clearing, currency, over),
        ],
        actor="provider",
        reference=f"{refund_id}:returned",
        payment_id=payment["id"],
        agent_id=payment["agent_id"],
        description=f"dispute loss given back: refund {refund_id} had returned it already",
    )
    return Reversal(booked=booked, returned=over)


async def post_dispute_loss(
    conn: Conn, payment: Payment, *, dispute_id: str, amount: int, currency: str
) -> Reversal:
    """Ledger effects of a dispute the customer won: `amount` (positive, in `currency`, the
    dispute's) leaves provider clearing and platform fees in the proportion a refund uses,
    and goes to `disputes_lost`; the agent's budget stays as it is. Once per `dispute_id`.
    What refunds gave back already is not booked (`Reversal.returned`): the provider gives
    it back (a dispute of the whole charge after a partial refund, lost, is "partially won"
    at Stripe). Nothing is booked when the payment has no capture or another currency
    (`problem` says why). The caller holds the payment row locked (as refunds do), so the
    proportion is taken on settled numbers."""
    if amount <= 0:
        raise ValueError("a disputed amount is positive")
    if await _transaction_of(conn, DISPUTE_LOST, dispute_id) is not None:
        return Reversal()
    captured = await _captured(conn, payment["id"])
    if captured is None:
        return Reversal(problem="the payment has no capture in the ledger to take it from")
    if currency != payment["currency"]:
        return Reversal(
            problem=f"the dispute is in {currency}, the payment in {payment['currency']}"
        )
    before = await _reversed(conn, payment["id"])
    loss = min(amount, max(0, captured["total"] - before))
    if loss == 0:
        return Reversal(returned=amount)
    booked = await _post_reversal(
        conn,
        payment,
        DISPUTE_LOST,
        captured,
        loss,
        before=before,
        to_account=await account(conn, DISPUTES_LOST, currency),
        reference=dispute_id,
        actor="provider",
        description="dispute lost",
    )
    return Reversal(booked=booked, returned=amount - loss)


async def _post_reversal(
    conn: Conn,
    payment: Payment,
    kind: str,
    captured: dict[str, int],
    amount: int,
    *,
    before: int,
    to_account: int,
    reference: str,
    actor: str | None,
    description: str,
) -> int:
    """Take `amount` of a captured payment back out of provider clearing and platform fees
    into `to_account`, `before` having been taken back already. The fee's part is its share
    of everything taken back so far, before and after this one, so reversals adding up to
    the capture reverse it exactly; what is taken back beyond the capture comes out of
    provider clearing alone. Returns `amount`, or 0 when it was posted before."""
    currency, total = payment["currency"], captured["total"]
    after = before + amount
    weights = [total - captured["fee"], captured["fee"]]
    fee_part = _fee_share(min(after, total), weights, currency) - _fee_share(
        min(before, total), weights, currency
    )
    clearing, fees = await _platform_accounts(conn, currency)
    posted = await post(
        conn,
        kind,
        [
            (to_account, currency, amount),
            (clearing, currency, -(amount - fee_part)),
            (fees, currency, -fee_part),
        ],
        actor=actor,
        reference=reference,
        payment_id=payment["id"],
        agent_id=payment["agent_id"],
        description=description,
    )
    return 0 if posted is None else amount


def _fee_share(total: int, weights: list[int], currency: str) -> int:
    if total == 0 or weights[1] == 0:
        return 0
    if weights[0] == 0:
        return total
    step = money.granularity(currency)
    return money.split(total, weights, currency if total % step == 0 else None)[1]


# --- reading -----------------------------------------------------------------------------


async def balance(conn: Conn, agent_id: str) -> dict[str, Any]:
    """An agent's balances per currency: `available` (budget) and `held` (holds)."""
    cur = await conn.execute(
        """SELECT kind, currency, balance FROM ledger_accounts
           WHERE agent_id = %s ORDER BY currency""",
        (agent_id,),
    )
    available: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for row in await cur.fetchall():
        item = {"amount": row["balance"], "currency": row["currency"]}
        (available if row["kind"] == AGENT_BUDGET else held).append(item)
    budgeted = bool(available)
    return {
        "object": "balance",
        "agent_id": agent_id,
        "budgeted": budgeted,
        "unlimited": not budgeted and get_settings().allow_unbudgeted_spending,
        "available": available,
        "held": held,
    }


async def statement(
    conn: Conn, agent_id: str, *, limit: int = 50, starting_after: int | None = None
) -> list[dict[str, Any]]:
    """The entries on an agent's accounts, newest first, each with the account's balance
    right after it: the account's balance now, less what was posted to it after the entry
    (the entries newer than the page, summed once per account, and those before it on the
    page). A page reads what it shows and the entries newer than it, through the
    `(account_id, id)` index, not the agent's whole history nor the whole ledger (the row
    comparisons keep the planner on that index: with `x.account_id = a.id` alone it may walk
    the primary key backwards and filter, through every account's entries); balances and
    entries are read by one statement, so they agree."""
    cur = await conn.execute(
        """WITH accounts AS (
               SELECT id, kind, balance FROM ledger_accounts WHERE agent_id = %(agent)s),
           page AS (
               SELECT e.*, a.kind AS account_kind, a.balance
                 FROM accounts a
                 CROSS JOIN LATERAL (
                       SELECT * FROM ledger_entries x
                        WHERE x.account_id = a.id
                          AND (x.account_id, x.id)
                              < (a.id, coalesce(%(after)s::bigint, 9223372036854775807))
                        ORDER BY x.account_id DESC, x.id DESC LIMIT %(limit)s) e
                ORDER BY e.id DESC LIMIT %(limit)s),
           newer AS (
               SELECT a.id AS account_id,
                      (SELECT sum(x.amount) FROM ledger_entries x
                        WHERE x.account_id = a.id
                          AND (x.account_id, x.id) >= (a.id, %(after)s::bigint)) AS amount
                 FROM accounts a
                WHERE %(after)s::bigint IS NOT NULL)
           SELECT p.id, p.transaction_id, t.kind AS type, p.account_kind AS account, p.amount,
                  p.currency,
                  p.balance - coalesce(n.amount, 0)
                      - coalesce(sum(p.amount) OVER (
                            PARTITION BY p.account_id ORDER BY p.id DESC
                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                      AS balance_after,
                  t.payment_id, t.description, t.actor, p.created_at
             FROM page p
             JOIN ledger_transactions t ON t.id = p.transaction_id
             LEFT JOIN newer n ON n.account_id = p.account_id
            ORDER BY p.id DESC""",
        {"agent": agent_id, "after": starting_after, "limit": limit},
    )
    rows = await cur.fetchall()
    for row in rows:
        row["object"] = "balance_transaction"
        row["balance_after"] = int(row["balance_after"])
        row["account"] = "budget" if row["account"] == AGENT_BUDGET else "holds"
    return rows


async def problems(conn: Conn) -> list[str]:
    """What is wrong with the ledger (empty when all is well): an account whose balance is
    not the sum of its entries, a transaction or a currency whose entries do not sum to
    zero."""
    found = []
    cur = await conn.execute(
        "SELECT id, kind, balance, entries_sum FROM ledger_account_balances "
        "WHERE balance <> entries_sum"
    )
    for row in await cur.fetchall():
        found.append(
            f"account {row['id']} ({row['kind']}): balance {row['balance']} "
            f"but entries sum to {row['entries_sum']}"
        )
    cur = await conn.execute(
        """SELECT transaction_id, currency, sum(amount) AS s FROM ledger_entries
           GROUP BY transaction_id, currency HAVING sum(amount) <> 0"""
    )
    for row in await cur.fetchall():
        found.append(f"transaction {row['transaction_id']} is off by {row['s']} {row['currency']}")
    cur = await conn.execute(
        "SELECT currency, sum(amount) AS s FROM ledger_entries GROUP BY currency "
        "HAVING sum(amount) <> 0"
    )
    for row in await cur.fetchall():
        found.append(f"the ledger is off by {row['s']} {row['currency']}")
    return found


# --- helpers -----------------------------------------------------------------------------


async def _balance(conn: Conn, account_id: int) -> int:
    """An account's balance: materialised for agent accounts, the sum of the entries for
    platform accounts (the subquery runs only for those)."""
    cur = await conn.execute(
        """SELECT CASE WHEN a.kind = ANY(%s) THEN a.balance
                       ELSE (SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e
                             WHERE e.account_id = a.id) END AS balance
           FROM ledger_accounts a WHERE a.id = %s""",
        (list(_AGENT_KINDS), account_id),
    )
    row = await cur.fetchone()
    return int(row["balance"]) if row else 0


async def _platform_accounts(conn: Conn, currency: str) -> tuple[int, int]:
    """The provider clearing and platform fees accounts of `currency`, in one read."""
    cur = await conn.execute(
        """SELECT kind, id FROM ledger_accounts
           WHERE kind = ANY(%s) AND agent_id IS NULL AND currency = %s""",
        ([PROVIDER_CLEARING, PLATFORM_FEES], currency),
    )
    found = {row["kind"]: int(row["id"]) for row in await cur.fetchall()}
    clearing = found.get(PROVIDER_CLEARING) or await _create_account(
        conn, PROVIDER_CLEARING, currency, None
    )
    fees = found.get(PLATFORM_FEES) or await _create_account(conn, PLATFORM_FEES, currency, None)
    return clearing, fees


async def _transaction_of(conn: Conn, kind: str, reference: str) -> str | None:
    cur = await conn.execute(
        "SELECT id FROM ledger_transactions WHERE kind = %s AND reference = %s", (kind, reference)
    )
    row = await cur.fetchone()
    return str(row["id"]) if row else None


async def _hold_source_kind(conn: Conn, txn_id: str) -> str | None:
    cur = await conn.execute(
        """SELECT a.kind FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.account_id
           WHERE e.transaction_id = %s AND e.amount < 0""",
        (txn_id,),
    )
    row = await cur.fetchone()
    return str(row["kind"]) if row else None


async def _hold_entries(conn: Conn, payment_id: str) -> dict[str, int] | None:
    """The hold of a payment: its amount, holds account and source account."""
    cur = await conn.execute(
        """SELECT e.account_id, e.amount FROM ledger_entries e
           JOIN ledger_transactions t ON t.id = e.transaction_id
           WHERE t.kind = 'hold' AND t.reference = %s""",
        (payment_id,),
    )
    return _hold_from(await cur.fetchall())


def _hold_from(rows: list[dict[str, Any]]) -> dict[str, int] | None:
    if not rows:
        return None
    credit = next(r for r in rows if r["amount"] > 0)
    debit = next(r for r in rows if r["amount"] < 0)
    return {
        "amount": credit["amount"],
        "holds": credit["account_id"],
        "source": debit["account_id"],
    }


async def _open_hold(conn: Conn, payment_id: str) -> dict[str, int] | None:
    """The payment's hold if it is neither captured nor released yet (one read)."""
    cur = await conn.execute(
        """SELECT e.account_id, e.amount FROM ledger_entries e
           JOIN ledger_transactions t ON t.id = e.transaction_id
           WHERE t.kind = 'hold' AND t.reference = %s
             AND NOT EXISTS (SELECT 1 FROM ledger_transactions c
                             WHERE c.kind IN ('capture', 'release') AND c.reference = %s)""",
        (payment_id, payment_id),
    )
    return _hold_from(await cur.fetchall())


async def _captured(conn: Conn, payment_id: str) -> dict[str, int] | None:
    """What a payment's capture took: the total collected (provider clearing and fees: less
    than the hold after a partial capture), the fee part, and the hold's source account."""
    cur = await conn.execute(
        """SELECT a.kind, e.amount FROM ledger_entries e
           JOIN ledger_transactions t ON t.id = e.transaction_id
           JOIN ledger_accounts a ON a.id = e.account_id
           WHERE t.kind = 'capture' AND t.reference = %s""",
        (payment_id,),
    )
    rows = await cur.fetchall()
    if not rows:
        return None
    held = await _hold_entries(conn, payment_id)
    assert held is not None
    fee = sum(r["amount"] for r in rows if r["kind"] == PLATFORM_FEES)
    total = sum(r["amount"] for r in rows if r["kind"] in (PROVIDER_CLEARING, PLATFORM_FEES))
    return {"total": total, "fee": fee, "source": held["source"]}


async def _reversed(
    conn: Conn, payment_id: str, kinds: tuple[str, ...] = ("refund", DISPUTE_LOST)
) -> int:
    """How much of the payment's capture its refunds and lost disputes (or only `kinds`)
    took back: what left provider clearing and platform fees in such transactions, less
    what a dispute loss the provider gave back returned there."""
    cur = await conn.execute(
        """SELECT coalesce(-sum(e.amount), 0) AS s FROM ledger_entries e
           JOIN ledger_transactions t ON t.id = e.transaction_id
           JOIN ledger_accounts a ON a.id = e.account_id
           WHERE t.kind = ANY(%s) AND t.payment_id = %s AND a.kind = ANY(%s)""",
        (list(kinds), payment_id, [PROVIDER_CLEARING, PLATFORM_FEES]),
    )
    row = await cur.fetchone()
    return int(row["s"]) if row else 0
