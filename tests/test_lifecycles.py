"""Sequences, chosen by hypothesis, of what agents and operators do to payments — create them
(cards that pay, decline or ask for authentication; automatic or manual capture; amounts that
risk sends to review), capture, cancel, refund (all or part), approve or reject in review,
retry any request with its Idempotency-Key — with the fleet run to quiet between some of
them. A small model says what each answer must be and where each payment must end; after
every run of the fleet the payments, the provider and the ledger are checked against it and
against the invariants the chaos run checks (one intent per payment as its state says, no
refund made twice, a legal path of events, a sound ledger, the money of each payment in the
ledger as its state says).

CI runs a fixed set of sequences; AGENTPAY_LIFECYCLE_EXAMPLES=N runs N random ones."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from tasks import agents
from tasks.db import Pool
from tests.conftest import auth, run_jobs
from workers.chaos import Tracked, check_invariants

REVIEW_ABOVE = 100_000  # AGENTPAY_RISK_REVIEW_ABOVE's default for usd
CARDS = {
    "pays": "pm_card_visa",
    "declines": "pm_card_chargeDeclined",
    "authenticates": "pm_card_authenticationRequired",
}
# Where each kind of payment stops when nothing is asked of it.
SETTLES = {
    ("pays", "automatic"): "reconciled",
    ("pays", "manual"): "authorized",
    ("declines", "automatic"): "failed",
    ("declines", "manual"): "failed",
    ("authenticates", "automatic"): "requires_action",
    ("authenticates", "manual"): "requires_action",
}
NOT_YET_CHARGED = {"received", "in_review", "approved"}


@dataclass
class Modelled:
    """What the model knows of one payment."""

    id: str
    card: str
    capture: str
    amount: int
    status: str  # as the API must show it now
    settles: str  # where the fleet takes it when it next runs
    refunded: int = 0
    refunding: int = 0  # asked for, not yet made
    decided: str | None = None  # an operator's review decision: approved or rejected

    @property
    def remaining(self) -> int:
        return self.amount - self.refunded - self.refunding


@dataclass
class World:
    api: httpx.AsyncClient
    agent: str
    operator: str
    payments: list[Modelled] = field(default_factory=list)
    # The last request taken (2xx): who sent it, where, its body and key, and the answer.
    last: tuple[str, str, Any, str, int, str] | None = None

    async def call(
        self, who: str, path: str, body: Any = None, key: str | None = None
    ) -> httpx.Response:
        key = key or str(uuid.uuid4())
        headers = {**auth(who), "Idempotency-Key": key}
        response = await self.api.post(path, json=body, headers=headers)
        assert response.status_code < 500, response.text
        if response.is_success:
            self.last = (who, path, body, key, response.status_code, response.text)
        return response


def rarely(data: st.DataObject, label: str) -> bool:
    """True one time in five or so (hypothesis leans to the low end of a range: the common
    case is at 0)."""
    return data.draw(st.integers(0, 4), label=label) == 4


def _expect(response: httpx.Response, status: int, what: str) -> None:
    assert response.status_code == status, f"{what}: {response.status_code} {response.text}"


async def _create(world: World, data: st.DataObject) -> None:
    # Mostly cards that pay: what follows a payment (capture, refunds) needs its money.
    card = "pays"
    if rarely(data, "another card"):
        card = data.draw(st.sampled_from(["declines", "authenticates"]), label="card")
    capture = data.draw(st.sampled_from(["automatic", "manual"]), label="capture")
    review = rarely(data, "review")
    amount = data.draw(
        st.integers(REVIEW_ABOVE + 1, 2 * REVIEW_ABOVE) if review else st.integers(50, 20_000),
        label="amount",
    )
    body = {
        "amount": amount,
        "currency": "usd",
        "payment_method": CARDS[card],
        "capture_method": capture,
    }
    response = await world.call(world.agent, "/v1/payments", body)
    _expect(response, 202, "create")
    settles = "in_review" if review else SETTLES[(card, capture)]
    world.payments.append(
        Modelled(response.json()["id"], card, capture, amount, "received", settles)
    )


async def _capture(world: World, p: Modelled) -> None:
    response = await world.call(world.agent, f"/v1/payments/{p.id}/capture")
    if p.status == "authorized" and p.settles in ("authorized", "reconciled"):
        _expect(response, 202, "capture")
        p.settles = "reconciled"
    else:
        _expect(response, 409, f"capture of a {p.status} payment")


async def _cancel(world: World, p: Modelled) -> None:
    response = await world.call(world.agent, f"/v1/payments/{p.id}/cancel")
    if p.status in NOT_YET_CHARGED:
        _expect(response, 202, "cancel before the provider")
        assert response.json()["status"] == "canceled"
        p.status = p.settles = "canceled"
    elif p.status in ("authorized", "requires_action") and p.settles != "reconciled":
        _expect(response, 202, "cancel at the provider")
        p.settles = "canceled"
    else:
        _expect(response, 409, f"cancel of a {p.status} payment (to {p.settles})")


async def _refund(world: World, p: Modelled, data: st.DataObject) -> None:
    left = max(1, p.remaining)
    # All that remains (None), the edges of what remains, or anything up to just past it.
    amount = data.draw(
        st.sampled_from([None, 1, left, left + 1]) | st.integers(1, left + 1),
        label="refund amount",
    )
    body = None if amount is None else {"amount": amount}
    if p.status in ("reconciled", "partially_refunded"):
        event(
            "refund of all that remains"
            if amount is None
            else f"refund of {'more than' if amount > p.remaining else 'up to'} what remains"
        )
    response = await world.call(world.agent, f"/v1/payments/{p.id}/refunds", body)
    if p.status not in ("reconciled", "partially_refunded") or p.remaining == 0:
        _expect(response, 409, f"refund of a {p.status} payment, {p.remaining} left")
    elif amount is not None and amount > p.remaining:
        _expect(response, 400, f"refund of {amount} with {p.remaining} left")
    else:
        _expect(response, 202, "refund")
        made = response.json()["amount"]
        assert made == (amount if amount is not None else p.remaining)
        p.refunding += made


async def _decide(world: World, p: Modelled, approve: bool) -> None:
    verb, to = ("approve", "approved") if approve else ("reject", "rejected")
    response = await world.call(world.operator, f"/v1/review/{p.id}/{verb}")
    if p.status != "in_review":
        # Deciding the same way again is harmless: the payment as it is.
        _expect(response, 200 if p.decided == to else 409, f"{verb} of a {p.status} payment")
        if p.decided == to:
            assert response.json()["status"] == p.status
        return
    _expect(response, 200, verb)
    p.status = p.decided = response.json()["status"]
    assert p.status == to
    p.settles = SETTLES[(p.card, p.capture)] if approve else "rejected"


async def _retry_last(world: World) -> None:
    """An agent (or operator) that lost the answer to a request that was taken sends it
    again with the same key: the same answer, and nothing happens twice (the model is not
    moved; the checks after the next run of the fleet would see a second effect)."""
    assert world.last is not None
    who, path, body, key, status, text = world.last
    response = await world.call(who, path, body, key)
    assert (response.status_code, response.text) == (status, text)


async def _settle(world: World, pool: Pool, provider_base: str, tracked: list[Tracked]) -> None:
    """Run the fleet to quiet; every payment must be where the model says, and every
    invariant hold."""
    await run_jobs(pool)
    for p in world.payments:
        got = (await world.api.get(f"/v1/payments/{p.id}", headers=auth(world.agent))).json()
        p.refunded += p.refunding
        p.refunding = 0
        if p.settles in ("reconciled", "partially_refunded") and p.refunded:
            p.settles = "refunded" if p.refunded == p.amount else "partially_refunded"
        p.status = p.settles
        assert (got["status"], got["amount_refunded"], got["pending_action"]) == (
            p.status,
            p.refunded,
            None,
        ), p
    # A connection each: one kept alive may be closed by the sandbox as it is reused.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=provider_base, limits=fresh) as provider:
        checks = await check_invariants(pool, provider, tracked)
    # The first check compares each payment with its chaos scenario; the model did here.
    failed = [(c.name, c.failures) for c in checks[1:] if c.failures]
    assert failed == [], failed


@pytest.fixture
def tracked() -> list[Tracked]:
    """The payments of every example of a test: one database and one sandbox serve them
    all, so the invariants are checked over all of them (the sandbox holds their intents)."""
    return []


ACTS = ("capture", "cancel", "refund", "approve", "reject")
# What an agent or operator would do to a payment in each state (the others are mostly
# refused: they are tried too, less often).
FITTING = {
    "received": ("cancel",),
    "in_review": ("approve", "reject", "cancel"),
    "approved": ("cancel",),
    "authorized": ("capture", "cancel"),
    "requires_action": ("cancel",),
    "reconciled": ("refund",),
    "partially_refunded": ("refund",),
}
MAX_PAYMENTS = 5


@settings(
    max_examples=int(os.environ.get("AGENTPAY_LIFECYCLE_EXAMPLES", "40")),
    deadline=None,
    derandomize=not os.environ.get("AGENTPAY_LIFECYCLE_EXAMPLES"),
    # No shrinking: each example takes a second or more, shrinking one takes many minutes,
    # and the notes (every step, with the payment as the model had it) tell the story.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_any_sequence_of_actions_ends_where_the_model_says(
    api: httpx.AsyncClient,
    pool: Pool,
    operator_key: str,
    provider_base: str,
    tracked: list[Tracked],
    data: st.DataObject,
) -> None:
    async with pool.connection() as conn, conn.transaction():
        _, key = await agents.create(conn, f"lifecycle-{uuid.uuid4().hex[:8]}")
    world = World(api, key, operator_key)
    for _ in range(data.draw(st.integers(4, 20), label="steps")):
        step = "create"
        if world.payments:
            step = data.draw(st.sampled_from(["create", "settle", "act", "act", "act", "retry"]))
        if step == "create" and len(world.payments) >= MAX_PAYMENTS:
            step = "settle"
        note(step)
        if step == "create":
            await _create(world, data)
            tracked.append(Tracked("visa", world.payments[-1].id))
            continue
        if step == "settle":
            await _settle(world, pool, provider_base, tracked)
            continue
        if step == "retry":
            if world.last is not None:
                await _retry_last(world)
            continue
        # Mostly a payment something fits (the others mostly refuse everything).
        open_ = [p for p in world.payments if p.status in FITTING]
        pick_open = open_ and not rarely(data, "any payment")
        p = data.draw(st.sampled_from(open_ if pick_open else world.payments), label="payment")
        if p.status == "received" and not rarely(data, "act before the fleet"):
            # Mostly, a payment is acted on once the fleet has taken it somewhere.
            await _settle(world, pool, provider_base, tracked)
        fitting = FITTING.get(p.status, ())
        any_act = not fitting or rarely(data, "any act")
        action = data.draw(st.sampled_from(ACTS if any_act else fitting), label="act")
        note(f"{action} {p.id} ({p.status})")
        event(f"{action} of a {p.status} payment")
        if action == "capture":
            await _capture(world, p)
        elif action == "cancel":
            await _cancel(world, p)
        elif action == "refund":
            await _refund(world, p, data)
        else:
            await _decide(world, p, approve=action == "approve")
    await _settle(world, pool, provider_base, tracked)
