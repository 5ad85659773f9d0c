"""Risk role: priced → approved | in_review | rejected, and the operators' review.

Every rule lives in `evaluate` and gives its reason as a `Finding` (rule, code, outcome,
message). Rules, with their settings (tasks/settings.py, `AGENTPAY_RISK_*`):

- blocked: the agent (`risk_blocked_agents`, ids or names, or a revoked agent) or the
  payment method (`risk_blocked_payment_methods`) → rejected;
- amount: total above `risk_reject_above[currency]` → rejected; above
  `risk_review_above[currency]` → in_review ("default" for currencies not listed);
- velocity: more than `risk_velocity_max_count` payments, or more than
  `risk_velocity_max_amount[currency]`, from the agent within the last
  `risk_velocity_window_seconds` (counting those that passed risk) → rejected;
- budget: a hold for the total on the agent's budget (tasks/ledger.py) → rejected with
  `insufficient_budget` (or `no_budget` when agents without a budget may not spend).

A payment that no rule rejects gets the hold, then waits in_review if a rule asked for review,
or is approved. The decision and every reason are stored on the payment (`risk_decision`) and
in the transition's event. One agent's risk steps run one at a time (the agent row is locked),
so velocity and budget are judged on settled numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from tasks import ledger, payments
from tasks.app import Backoff, app, defer, pool
from tasks.db import Conn
from tasks.settings import Settings, get_settings

ROLE = "risk"
ACTOR = f"worker:{ROLE}"

REJECT = "reject"
REVIEW = "review"


@dataclass(frozen=True)
class Finding:
    rule: str
    code: str
    outcome: str  # REJECT or REVIEW
    message: str
    data: dict[str, Any] = field(default_factory=dict)


class ReviewError(Exception):
    """An operator's decision that cannot be applied (`code`: not_found, not_in_review)."""

    def __init__(self, code: str, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def _limit(table: dict[str, int], currency: str) -> int | None:
    value = table.get(currency, table.get("default"))
    return None if value is None else int(value)


def amount_rules(payment: payments.Payment, settings: Settings) -> list[Finding]:
    total, currency = int(payment["amount_total"]), payment["currency"]
    hard = _limit(settings.risk_reject_above, currency)
    if hard is not None and total > hard:
        return [
            Finding(
                "amount",
                "amount_over_limit",
                REJECT,
                f"total {total} is above the limit of {hard} {currency}",
                {"amount": total, "limit": hard},
            )
        ]
    review = _limit(settings.risk_review_above, currency)
    if review is not None and total > review:
        return [
            Finding(
                "amount",
                "amount_over_review_threshold",
                REVIEW,
                f"total {total} is above the review threshold of {review} {currency}",
                {"amount": total, "threshold": review},
            )
        ]
    return []


def blocked_rules(
    payment: payments.Payment, agent: dict[str, Any], settings: Settings
) -> list[Finding]:
    found = []
    blocked = set(settings.risk_blocked_agents)
    if agent["id"] in blocked or agent["name"] in blocked:
        found.append(Finding("blocked", "agent_blocked", REJECT, "the agent is blocked"))
    elif agent["revoked_at"] is not None:
        found.append(Finding("blocked", "agent_blocked", REJECT, "the agent is revoked"))
    if payment["payment_method"] in settings.risk_blocked_payment_methods:
        found.append(
            Finding(
                "blocked",
                "payment_method_blocked",
                REJECT,
                f"payment method {payment['payment_method']} is blocked",
            )
        )
    return found


async def velocity_rules(
    conn: Conn, payment: payments.Payment, settings: Settings
) -> list[Finding]:
    """The agent's other payments that passed risk, created within the window of this one's
    creation (before or after it: risk may take them out of order), this one included. The
    window is around when the payment was made, not when risk runs: with risk behind (a
    burst of one agent, whose steps run one at a time, an outage, a deploy) a window ending
    at `now()` counted fewer and fewer of the burst, and none once risk was a window late."""
    cur = await conn.execute(
        """SELECT count(*) AS n,
                  coalesce(sum(amount_total) FILTER (WHERE currency = %(currency)s), 0) AS amount
           FROM payment_jobs
           WHERE agent_id = %(agent)s AND id <> %(id)s
             AND created_at > %(created)s - make_interval(secs => %(window)s)
             AND created_at < %(created)s + make_interval(secs => %(window)s)
             AND status NOT IN ('received', 'priced', 'rejected')""",
        {
            "currency": payment["currency"],
            "agent": payment["agent_id"],
            "id": payment["id"],
            "created": payment["created_at"],
            "window": settings.risk_velocity_window_seconds,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    count, amount = int(row["n"]) + 1, int(row["amount"]) + int(payment["amount_total"])
    window = settings.risk_velocity_window_seconds
    found = []
    if count > settings.risk_velocity_max_count:
        found.append(
            Finding(
                "velocity",
                "velocity_count_exceeded",
                REJECT,
                f"{count} payments in {window:g}s (at most {settings.risk_velocity_max_count})",
                {"count": count, "limit": settings.risk_velocity_max_count, "window": window},
            )
        )
    limit = _limit(settings.risk_velocity_max_amount, payment["currency"])
    if limit is not None and amount > limit:
        found.append(
            Finding(
                "velocity",
                "velocity_amount_exceeded",
                REJECT,
                f"{amount} {payment['currency']} in {window:g}s (at most {limit})",
                {"amount": amount, "limit": limit, "window": window},
            )
        )
    return found


async def evaluate(
    conn: Conn, payment: payments.Payment, agent: dict[str, Any], settings: Settings
) -> list[Finding]:
    """Every rule but the budget (which needs a hold, placed by `advance`)."""
    return [
        *blocked_rules(payment, agent, settings),
        *amount_rules(payment, settings),
        *await velocity_rules(conn, payment, settings),
    ]


async def _lock_agent(conn: Conn, agent_id: str) -> dict[str, Any]:
    """The agent, locked, and `now`: the transaction's time, by the database's clock (the
    decision's `decided_at`, beside the payment's own times)."""
    cur = await conn.execute(
        "SELECT id, name, revoked_at, now() AS now FROM agents WHERE id = %s FOR NO KEY UPDATE",
        (agent_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def _database_now(conn: Conn) -> datetime:
    cur = await conn.execute("SELECT now() AS now")
    row = await cur.fetchone()
    assert row is not None
    now: datetime = row["now"]
    return now


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


async def advance(conn: Conn, payment_id: str, settings: Settings | None = None) -> str | None:
    """One risk step in the caller's transaction; None when the payment is already past."""
    settings = settings or get_settings()
    payment = await payments.lock(conn, payment_id)
    if payment is None or payment["status"] != "priced":
        return None
    agent = await _lock_agent(conn, payment["agent_id"])
    findings = await evaluate(conn, payment, agent, settings)
    hold: ledger.Hold | None = None
    if not any(f.outcome == REJECT for f in findings):
        hold = await ledger.hold(conn, payment, actor=ACTOR, settings=settings)
        if not hold.ok:
            assert hold.code is not None and hold.message is not None
            findings.append(Finding("budget", hold.code, REJECT, hold.message))
    if any(f.outcome == REJECT for f in findings):
        to = "rejected"
        deciding = [f for f in findings if f.outcome == REJECT]
    elif findings:
        to, deciding = "in_review", findings
    else:
        to, deciding = "approved", []
    decision = {
        "decision": to,
        "reasons": [asdict(f) for f in findings],
        "hold": {"transaction_id": hold.transaction_id, "source": hold.source}
        if hold and hold.ok
        else None,
        "decided_at": _iso(agent["now"]),
    }
    columns: dict[str, Any] = {"risk_decision": Jsonb(decision)}
    if to == "rejected":
        columns |= {"failure_code": deciding[0].code, "failure_message": deciding[0].message}
    reason = ", ".join(f.code for f in deciding) or "approved"
    await payments.transition(
        conn, payment, to, actor=ACTOR, reason=reason, data=decision, **columns
    )
    if to == "approved":
        await defer(conn, "charge", payment_id=payment_id)
    return to


# --- operators' review -------------------------------------------------------------------


async def in_review(conn: Conn, *, limit: int = 100) -> list[payments.Payment]:
    """Payments waiting for an operator, oldest first."""
    cur = await conn.execute(
        """SELECT * FROM payment_jobs WHERE status = 'in_review'
           ORDER BY updated_at, id LIMIT %s""",
        (limit,),
    )
    return await cur.fetchall()


async def decide(
    conn: Conn, payment_id: str, *, approve: bool, actor: str, note: str | None = None
) -> payments.Payment:
    """An operator's decision on an in_review payment, in the caller's transaction: approve
    continues the pipeline (the charge job is deferred), reject ends it (the hold is
    released). Deciding the same way again returns the payment unchanged; anything else
    raises ReviewError."""
    payment = await payments.lock(conn, payment_id)
    if payment is None:
        raise ReviewError("not_found", f"no payment {payment_id}")
    to = "approved" if approve else "rejected"
    previous = (payment["risk_decision"] or {}).get("review")
    if payment["status"] != "in_review":
        if previous and previous.get("decision") == to:
            return payment
        raise ReviewError(
            "not_in_review",
            f"payment {payment_id} is {payment['status']}, not in_review",
            payment["status"],
        )
    review = {
        "decision": to,
        "by": actor,
        "note": note,
        # The transaction's time, by the database's clock (beside the payment's own times).
        "decided_at": _iso(await _database_now(conn)),
    }
    decision = {**(payment["risk_decision"] or {}), "review": review}
    columns: dict[str, Any] = {"risk_decision": Jsonb(decision)}
    if not approve:
        columns |= {
            "failure_code": "rejected_in_review",
            "failure_message": note or "rejected by an operator",
        }
    await payments.transition(
        conn,
        payment,
        to,
        actor=actor,
        reason=f"review: {to}" + (f" ({note})" if note else ""),
        data={"review": review},
        **columns,
    )
    if approve:
        await defer(conn, "charge", payment_id=payment_id)
    return payment


@app.task(name=ROLE, queue=ROLE, retry=Backoff())
async def check(payment_id: str) -> Any:
    async with pool().connection() as conn, conn.transaction():
        return await advance(conn, payment_id)
