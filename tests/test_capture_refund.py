"""Manual capture, cancel and refunds: API → job on the charge queue → provider → state."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from tasks import payments, refunds
from tasks.db import Pool
from tasks.settings import Settings
from tests.conftest import auth, run_jobs
from tests.test_pipeline import create, fetch

SK = {"Authorization": "Bearer sk_test_x"}


def intent(provider_base: str, intent_id: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(
        f"{provider_base}/v1/payment_intents/{intent_id}", headers=SK
    ).json()
    return result


def provider_refunds(provider_base: str, intent_id: str) -> list[dict[str, Any]]:
    result = httpx.get(
        f"{provider_base}/v1/refunds", params={"payment_intent": intent_id}, headers=SK
    ).json()
    data: list[dict[str, Any]] = result["data"]
    return data


async def mismatches_of(pool: Pool, payment_id: str) -> list[dict[str, Any]]:
    """The payment's reconcile mismatches, oldest first: field, expected, actual."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT field, expected, actual FROM reconcile_mismatches
                WHERE payment_id = %s ORDER BY id""",
            (payment_id,),
        )
        return await cur.fetchall()


def refund_at_provider(provider_base: str, intent_id: str, amount: int) -> dict[str, Any]:
    """A refund made at the provider directly (the Dashboard), not through agentpay."""
    response = httpx.post(
        f"{provider_base}/v1/refunds",
        data={"payment_intent": intent_id, "amount": str(amount)},
        headers=SK,
    )
    response.raise_for_status()
    made: dict[str, Any] = response.json()
    return made


async def authorized(api: httpx.AsyncClient, key: str, pool: Pool) -> dict[str, Any]:
    created = await create(api, key, capture_method="manual", amount=3000)
    await run_jobs(pool)
    payment = await fetch(api, key, created["id"])
    assert payment["status"] == "authorized"
    return payment


async def reconciled(api: httpx.AsyncClient, key: str, pool: Pool) -> dict[str, Any]:
    created = await create(api, key, amount=2000)
    await run_jobs(pool)
    payment = await fetch(api, key, created["id"])
    assert payment["status"] == "reconciled"
    return payment


async def test_manual_capture_waits_in_authorized_then_capture_moves_it_on(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    payment = await authorized(api, agent_key, pool)
    pi = intent(provider_base, payment["provider_payment_id"])
    assert pi["status"] == "requires_capture" and pi["amount_received"] == 0

    response = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "authorized"  # the API never calls the provider
    # Asking again is harmless: one capture, one request event, one job queued.
    for _ in range(3):
        again = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
        assert again.status_code == 202
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = 'capture'"
        )
        assert await cur.fetchone() == {"n": 1}

    await run_jobs(pool)
    after = await fetch(api, agent_key, payment["id"])
    assert after["status"] == "reconciled"
    pi = intent(provider_base, payment["provider_payment_id"])
    assert pi["status"] == "succeeded" and pi["amount_received"] == 3000
    async with pool.connection() as conn:
        events = await payments.events(conn, payment["id"])
    assert [e["type"] for e in events].count("capture_requested") == 1
    assert [(e["from_status"], e["to_status"]) for e in events if e["type"] == "transition"][
        -2:
    ] == [("authorized", "succeeded"), ("succeeded", "reconciled")]

    # Captured: cancel is refused, in the one error shape.
    refused = await api.post(f"/v1/payments/{payment['id']}/cancel", headers=auth(agent_key))
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "payment_unexpected_state"


async def test_a_capture_asked_for_again_after_a_refusal_is_a_new_call(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider keeps a refusal under its key (24 hours at Stripe) and replays it: a
    capture asked for again after a refusal must be another call, with its own key, while
    every retry of one request repeats that request's call."""
    from tasks import provider

    payment = await authorized(api, agent_key, pool)
    real = provider.capture_intent
    requests: list[str] = []

    async def refuse_the_first(payment_id: str, intent_id: str, request: str) -> Any:
        requests.append(request)
        if len(requests) == 1:
            raise provider.Declined("processing_error", "try again later")
        return await real(payment_id, intent_id, request)

    monkeypatch.setattr(provider, "capture_intent", refuse_the_first)
    for _ in range(2):
        asked = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
        assert asked.status_code == 202, asked.text
        await run_jobs(pool)
    async with pool.connection() as conn:
        events = [e["type"] for e in await payments.events(conn, payment["id"])]
    assert events.count("capture_failed") == 1
    assert len(requests) == 2 and requests[0] != requests[1]
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"


async def test_cancel_releases_an_authorized_payment(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    payment = await authorized(api, agent_key, pool)
    response = await api.post(
        f"/v1/payments/{payment['id']}/cancel",
        json={"reason": "order abandoned"},
        headers=auth(agent_key),
    )
    assert response.status_code == 202, response.text
    # A cancel is pending: capture is refused now.
    capture = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
    assert capture.status_code == 409

    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "canceled"
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "canceled"


async def test_a_cancel_asked_for_while_a_capture_is_pending_is_refused(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The reverse of the above: once a capture is asked for, a cancel is a 409 and records
    nothing; the capture goes on."""
    payment = await authorized(api, agent_key, pool)
    capture = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
    assert capture.status_code == 202, capture.text
    refused = await api.post(f"/v1/payments/{payment['id']}/cancel", headers=auth(agent_key))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "payment_unexpected_state"
    assert (await fetch(api, agent_key, payment["id"]))["pending_action"] == "capture"

    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"
    pi = intent(provider_base, payment["provider_payment_id"])
    assert (pi["status"], pi["amount_received"]) == ("succeeded", 3000)
    async with pool.connection() as conn:
        events = [e["type"] for e in await payments.events(conn, payment["id"])]
    assert "cancel_requested" not in events


async def test_a_cancel_the_provider_refuses_with_nothing_changed_lets_a_capture_follow(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provider refuses the cancel of an `authorized` payment, and its intent is as it
    was (still `requires_capture`): the refusal is recorded (`cancel_failed`), the request
    is withdrawn, and the payment stays `authorized`, free to be captured."""
    from tasks import provider

    payment = await authorized(api, agent_key, pool)
    calls: list[str] = []

    async def refuse(payment_id: str, intent_id: str, request: str) -> provider.Intent:
        calls.append(intent_id)
        raise provider.Declined("payment_intent_unexpected_state", "cannot cancel right now")

    monkeypatch.setattr(provider, "cancel_intent", refuse)
    asked = await api.post(f"/v1/payments/{payment['id']}/cancel", headers=auth(agent_key))
    assert asked.status_code == 202, asked.text
    assert asked.json()["pending_action"] == "cancel"
    await run_jobs(pool)
    assert calls == [payment["provider_payment_id"]]

    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["pending_action"]) == ("authorized", None)
    async with pool.connection() as conn:
        row = await payments.get(conn, payment["id"])
        events = await payments.events(conn, payment["id"])
    assert row is not None and row["cancel_requested_at"] is None
    failed = [e for e in events if e["type"] == "cancel_failed"]
    assert len(failed) == 1
    assert failed[0]["data"]["code"] == "payment_intent_unexpected_state"
    assert failed[0]["data"]["provider_status"] == "requires_capture"
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "requires_capture"

    capture = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(agent_key))
    assert capture.status_code == 202, capture.text
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"
    pi = intent(provider_base, payment["provider_payment_id"])
    assert (pi["status"], pi["amount_received"]) == ("succeeded", 3000)


async def test_cancel_of_a_payment_waiting_for_authentication_cancels_its_intent(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    created = await create(api, agent_key, payment_method="pm_card_authenticationRequired")
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "requires_action"
    response = await api.post(f"/v1/payments/{payment['id']}/cancel", headers=auth(agent_key))
    assert response.status_code == 202
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "canceled"
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "canceled"


async def test_a_payment_left_waiting_for_authentication_is_canceled_after_a_day(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The customer never completed 3-D Secure: the provider keeps the intent open for good,
    and the payment held its budget, and was looked at at the provider every recheck period,
    for ever. Past `AGENTPAY_REQUIRES_ACTION_EXPIRE_SECONDS` maintenance cancels it as an
    agent's cancel would."""
    from workers.maintenance import expire_abandoned_authentications

    created = await create(api, agent_key, payment_method="pm_card_authenticationRequired")
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "requires_action"
    assert await expire_abandoned_authentications(pool, older_than=3600) == []  # not yet
    assert await expire_abandoned_authentications(pool, older_than=0) == [payment["id"]]
    assert await expire_abandoned_authentications(pool, older_than=0) == []  # asked once
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "canceled"
    assert intent(provider_base, payment["provider_payment_id"])["status"] == "canceled"
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    asked = [e for e in events if e["type"] == "cancel_requested"]
    assert [(e["actor"], e["reason"]) for e in asked] == [
        ("maintenance", "authentication not completed within 0s")
    ]


async def test_cancel_before_the_provider_is_immediate_and_nothing_is_charged(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    created = await create(api, agent_key)
    response = await api.post(f"/v1/payments/{created['id']}/cancel", headers=auth(agent_key))
    assert response.status_code == 202
    assert response.json()["status"] == "canceled"
    await run_jobs(pool)  # the pricing job finds it canceled and does nothing
    assert (await fetch(api, agent_key, created["id"]))["status"] == "canceled"
    found = httpx.get(
        f"{provider_base}/v1/payment_intents/search",
        params={"query": f"metadata['payment_id']:'{created['id']}'"},
        headers=SK,
    ).json()
    assert found["data"] == []


async def test_actions_on_another_agents_payment_are_not_found(
    api: httpx.AsyncClient, agent_key: str, operator_key: str, pool: Pool, provider_base: str
) -> None:
    from tasks import agents

    async with pool.connection() as conn, conn.transaction():
        _, other_key = await agents.create(conn, "agent-b")
    payment = await authorized(api, agent_key, pool)
    for action in ("capture", "cancel", "refunds"):
        response = await api.post(f"/v1/payments/{payment['id']}/{action}", headers=auth(other_key))
        assert response.status_code == 404, action
        assert response.json()["error"]["code"] == "resource_missing"
    # An operator may act on any payment.
    response = await api.post(f"/v1/payments/{payment['id']}/capture", headers=auth(operator_key))
    assert response.status_code == 202
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"


async def test_partial_then_full_refund(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    payment = await reconciled(api, agent_key, pool)
    pid = payment["id"]

    first = await api.post(
        f"/v1/payments/{pid}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "pending" and first.json()["amount"] == 500
    await run_jobs(pool)
    after = await fetch(api, agent_key, pid)
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 500)

    # partially_refunded → partially_refunded is no status change: amount and an event.
    second = await api.post(
        f"/v1/payments/{pid}/refunds",
        json={"amount": 700, "reason": "requested_by_customer"},
        headers=auth(agent_key),
    )
    assert second.status_code == 202
    # Never more than remains, counting what is pending.
    too_much = await api.post(
        f"/v1/payments/{pid}/refunds", json={"amount": 801}, headers=auth(agent_key)
    )
    assert too_much.status_code == 400
    assert too_much.json()["error"]["param"] == "amount"
    assert (await fetch(api, agent_key, pid))["pending_action"] == "refund"
    await run_jobs(pool)
    after = await fetch(api, agent_key, pid)
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 1200)
    assert after["pending_action"] is None

    rest = await api.post(f"/v1/payments/{pid}/refunds", headers=auth(agent_key))
    assert rest.status_code == 202 and rest.json()["amount"] == 800
    await run_jobs(pool)
    after = await fetch(api, agent_key, pid)
    assert (after["status"], after["amount_refunded"]) == ("refunded", 2000)

    listed = (await api.get(f"/v1/payments/{pid}/refunds", headers=auth(agent_key))).json()
    assert [(r["amount"], r["status"]) for r in listed["data"]] == [
        (500, "succeeded"),
        (700, "succeeded"),
        (800, "succeeded"),
    ]
    at_provider = provider_refunds(provider_base, payment["provider_payment_id"])
    assert sorted(r["amount"] for r in at_provider) == [500, 700, 800]
    assert {r["id"] for r in at_provider} == {r["provider_refund_id"] for r in listed["data"]}

    async with pool.connection() as conn:
        events = await payments.events(conn, pid)
    assert [e["to_status"] for e in events if e["type"] == "transition"][-2:] == [
        "partially_refunded",
        "refunded",
    ]
    assert [e["type"] for e in events].count("refund") == 1
    nothing = await api.post(f"/v1/payments/{pid}/refunds", headers=auth(agent_key))
    assert nothing.status_code == 409


async def test_two_refunds_sent_at_once_never_add_up_to_more_than_was_paid(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Two refunds of 1,500 on a 2,000 payment, sent at the same moment: the payment's row
    lock orders them, so the second sees the first's pending 1,500 and is refused (400
    amount_invalid); only one reaches the provider."""
    import asyncio

    paid = await reconciled(api, agent_key, pool)  # 2,000
    path = f"/v1/payments/{paid['id']}/refunds"
    answers = await asyncio.gather(
        *(
            api.post(
                path,
                json={"amount": 1500},
                headers={**auth(agent_key), "Idempotency-Key": f"race-{n}"},
            )
            for n in range(2)
        )
    )
    assert sorted(a.status_code for a in answers) == [202, 400], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 400).json()["error"]
    assert (refused["code"], refused["param"]) == ("amount_invalid", "amount")
    async with pool.connection() as conn:
        assert [r["amount"] for r in await refunds.for_payment(conn, paid["id"])] == [1500]

    await run_jobs(pool)
    at_provider = provider_refunds(provider_base, paid["provider_payment_id"])
    assert sum(r["amount"] for r in at_provider) == 1500
    after = await fetch(api, agent_key, paid["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 1500)


async def test_the_pending_refund_count_follows_every_change_of_the_refunds(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """`refunds_pending` is recounted by the database on any change of a refund, even one
    made by hand (moved to another payment, settled, deleted), so it never drifts."""
    first = await reconciled(api, agent_key, pool)
    second = await reconciled(api, agent_key, pool)
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, first["id"])
        assert locked is not None
        refund = await refunds.request_refund(conn, locked, amount=300, actor="test")

    async def counts() -> tuple[int, int]:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, refunds_pending FROM payment_jobs WHERE id = ANY(%s)",
                ([first["id"], second["id"]],),
            )
            found = {r["id"]: r["refunds_pending"] for r in await cur.fetchall()}
        return found[first["id"]], found[second["id"]]

    assert await counts() == (1, 0)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_refunds SET payment_id = %s WHERE id = %s", (second["id"], refund["id"])
        )
        assert await counts() == (0, 1)
        await conn.execute(
            "UPDATE payment_refunds SET status = 'failed' WHERE id = %s", (refund["id"],)
        )
        assert await counts() == (0, 0)
        await conn.execute(
            "UPDATE payment_refunds SET status = 'pending' WHERE id = %s", (refund["id"],)
        )
        assert await counts() == (0, 1)
        await conn.execute("DELETE FROM payment_refunds WHERE id = %s", (refund["id"],))
        assert await counts() == (0, 0)


async def test_refund_amounts_follow_the_currency_and_nothing_left_is_a_conflict(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    kwd = await create(api, agent_key, amount=2000, currency="kwd")
    await run_jobs(pool)
    assert (await fetch(api, agent_key, kwd["id"]))["status"] == "reconciled"
    odd = await api.post(
        f"/v1/payments/{kwd['id']}/refunds", json={"amount": 5}, headers=auth(agent_key)
    )
    assert odd.status_code == 400, odd.text
    assert odd.json()["error"]["param"] == "amount" and "end in 0" in odd.text
    # All of it pending: a refund of "what remains" finds nothing — the payment's state.
    whole = await api.post(f"/v1/payments/{kwd['id']}/refunds", headers=auth(agent_key))
    assert whole.status_code == 202 and whole.json()["amount"] == 2000
    again = await api.post(f"/v1/payments/{kwd['id']}/refunds", headers=auth(agent_key))
    assert again.status_code == 409, again.text
    assert again.json()["error"]["param"] is None
    # Whatever amount is asked for then: the same answer, the state is what is wrong.
    some = await api.post(
        f"/v1/payments/{kwd['id']}/refunds", json={"amount": 10}, headers=auth(agent_key)
    )
    assert some.status_code == 409, some.text
    assert some.json()["error"]["code"] == again.json()["error"]["code"]
    async with pool.connection() as conn:
        assert [r["amount"] for r in await refunds.for_payment(conn, kwd["id"])] == [2000]


async def test_a_payment_takes_a_bounded_number_of_refunds(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-cent refunds without end each cost provider calls, events and a sync listing all
    of them: one agent could spend the fleet's provider rate limit. Past the cap a refund is
    a 409 refund_limit_reached, and nothing is recorded — but for one of all that remains,
    which is always taken (the money would be stuck otherwise)."""
    monkeypatch.setattr(refunds, "MAX_REFUNDS_PER_PAYMENT", 3)
    paid = await create(api, agent_key, amount=2000)
    await run_jobs(pool)
    async with pool.connection() as conn:  # made in the Dashboard (and failed): not counted
        for n in range(3):
            await conn.execute(
                "INSERT INTO payment_refunds (id, payment_id, amount, currency, actor, status)"
                " VALUES (%s, %s, 1, 'usd', %s, 'failed')",
                (f"rfd_outside_{n}", paid["id"], refunds.OUTSIDE_ACTOR),
            )
    path = f"/v1/payments/{paid['id']}/refunds"
    answers = [await api.post(path, json={"amount": 1}, headers=auth(agent_key)) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 409]
    assert answers[3].json()["error"]["code"] == "refund_limit_reached"
    assert "all that remains (1997)" in answers[3].json()["error"]["message"]
    async with pool.connection() as conn:
        assert len(await refunds.for_payment(conn, paid["id"])) == 3 + 3
    rest = await api.post(path, headers=auth(agent_key))
    assert rest.status_code == 202 and rest.json()["amount"] == 1997


async def test_refund_before_reconcile_is_refused_and_leaves_nothing(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    payment = await authorized(api, agent_key, pool)
    response = await api.post(f"/v1/payments/{payment['id']}/refunds", headers=auth(agent_key))
    assert response.status_code == 409
    assert set(response.json()["error"]) == {"type", "code", "message", "param"}
    async with pool.connection() as conn:
        assert await refunds.for_payment(conn, payment["id"]) == []


async def test_a_refund_whose_commit_failed_is_retried_without_refunding_twice(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payment = await reconciled(api, agent_key, pool)
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        assert locked is not None
        refund = await refunds.request_refund(conn, locked, amount=900, actor="test")

    real = refunds._succeed
    calls = 0

    async def lost_commit(*args: Any, **kwargs: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise psycopg.OperationalError("connection lost before the commit")
        return await real(*args, **kwargs)

    monkeypatch.setattr(refunds, "_succeed", lost_commit)
    with pytest.raises(psycopg.OperationalError):
        await refunds.refund_payment(payment["id"], refund["id"])
    assert await refunds.refund_payment(payment["id"], refund["id"]) == "partially_refunded"
    assert await refunds.refund_payment(payment["id"], refund["id"]) is None

    at_provider = provider_refunds(provider_base, payment["provider_payment_id"])
    assert [r["amount"] for r in at_provider] == [900]
    after = await fetch(api, agent_key, payment["id"])
    assert after["amount_refunded"] == 900


async def test_a_refund_made_by_an_earlier_try_is_found_not_made_again(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """An earlier try refunded at the provider, but its answer was lost and the call's key
    is gone (Stripe forgets keys after 24 hours; until then it may replay a saved 500): the
    job finds the provider's refund by our refund id and makes no second one."""
    payment = await reconciled(api, agent_key, pool)
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        assert locked is not None
        refund = await refunds.request_refund(conn, locked, amount=600, actor="test")
    earlier = httpx.post(
        f"{provider_base}/v1/refunds",
        data={
            "payment_intent": payment["provider_payment_id"],
            "amount": "600",
            "metadata[payment_id]": payment["id"],
            "metadata[refund_id]": refund["id"],
        },
        headers={**SK, "Idempotency-Key": "a-key-the-provider-has-forgotten"},
    ).json()
    assert earlier["status"] == "succeeded"
    await run_jobs(pool)
    at_provider = provider_refunds(provider_base, payment["provider_payment_id"])
    assert [r["id"] for r in at_provider] == [earlier["id"]]
    async with pool.connection() as conn:
        mine = await refunds.get(conn, refund["id"])
    assert mine is not None
    assert (mine["status"], mine["provider_refund_id"]) == ("succeeded", earlier["id"])
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 600)


@pytest.mark.parametrize("after_effect", [False, True], ids=["no-effect", "after-effect"])
async def test_a_refund_whose_key_replays_a_saved_500_is_made_once_under_a_derived_key(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, after_effect: bool
) -> None:
    """The provider saved a 500 under the refund's key (as Stripe does with an error met once
    the call began) and replays it to every retry for 24 hours: the refund is looked for and
    made under a key derived from the failed request if the failed call made none — once
    either way."""
    payment = await reconciled(api, agent_key, pool)
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        assert locked is not None
        refund = await refunds.request_refund(conn, locked, amount=700, actor="test")
    httpx.post(
        f"{provider_base}/_sandbox/faults",
        json={
            "error_rate": 1,
            "error_saved": True,
            "error_after_effect": after_effect,
            "count": 1,
            "paths": ["/v1/refunds"],
            "methods": ["POST"],
        },
    ).raise_for_status()
    assert await refunds.refund_payment(payment["id"], refund["id"]) == "partially_refunded"
    at_provider = provider_refunds(provider_base, payment["provider_payment_id"])
    assert [(r["amount"], r["metadata"]["refund_id"]) for r in at_provider] == [(700, refund["id"])]
    after = await fetch(api, agent_key, payment["id"])
    assert after["amount_refunded"] == 700


async def test_a_refund_the_provider_refuses_is_recorded_failed(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Someone refunded at the provider directly and its event is not in (lost, or late):
    ours no longer fits. Stripe refuses it naming `amount`, with no code: that failed the
    job for good and left the refund `pending` for ever (re-driven and refused by every
    sweep, its amount counted as pending). It is recorded failed, and the refusal brings the
    sync of refunds made elsewhere, so what remains to refund here is what remains there."""
    payment = await reconciled(api, agent_key, pool)
    refund_at_provider(provider_base, payment["provider_payment_id"], 1900)
    response = await api.post(
        f"/v1/payments/{payment['id']}/refunds", json={"amount": 1000}, headers=auth(agent_key)
    )
    assert response.status_code == 202
    await run_jobs(pool)
    listed = (
        await api.get(f"/v1/payments/{payment['id']}/refunds", headers=auth(agent_key))
    ).json()
    ours = next(r for r in listed["data"] if r["amount"] == 1000)
    assert ours["status"] == "failed"
    assert ours["failure"]["code"] == "amount_too_large"
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["amount_refunded"], after["pending_action"]) == (
        "partially_refunded",
        1900,
        None,
    )
    # What the provider still holds can be refunded.
    rest = await api.post(f"/v1/payments/{payment['id']}/refunds", headers=auth(agent_key))
    assert rest.status_code == 202 and rest.json()["amount"] == 100, rest.text
    await run_jobs(pool)
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["amount_refunded"]) == ("refunded", 2000)


async def test_a_refund_of_more_than_a_dashboard_capture_took_fails_and_frees_the_rest(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Captured in part in the Dashboard, the payment reads `succeeded` before reconcile
    books what was collected; a refund of all of it asked then was refused by the provider
    (more than the charge holds) and stayed `pending` for ever, and what the customer paid
    could not be refunded through agentpay at all. It fails, and the rest can be refunded."""
    from tasks.reconcile import reconcile_payment

    held = await authorized(api, agent_key, pool)
    httpx.post(
        f"{provider_base}/v1/payment_intents/{held['provider_payment_id']}/capture",
        data={"amount_to_capture": "1000"},
        headers=SK,
    ).raise_for_status()
    assert await reconcile_payment.func(held["id"]) == "succeeded"
    asked = await api.post(f"/v1/payments/{held['id']}/refunds", headers=auth(agent_key))
    assert asked.status_code == 202 and asked.json()["amount"] == held["amount_total"]
    await run_jobs(pool)
    after = await fetch(api, agent_key, held["id"])
    assert (after["status"], after["amount_captured"], after["pending_action"]) == (
        "reconciled",
        1000,
        None,
    )
    refunds_now = (
        await api.get(f"/v1/payments/{held['id']}/refunds", headers=auth(agent_key))
    ).json()["data"]
    assert [(r["status"], r["failure"]["code"]) for r in refunds_now] == [
        ("failed", "amount_too_large")
    ]
    again = await api.post(f"/v1/payments/{held['id']}/refunds", headers=auth(agent_key))
    assert again.status_code == 202 and again.json()["amount"] == 1000, again.text
    await run_jobs(pool)
    after = await fetch(api, agent_key, held["id"])
    assert (after["status"], after["amount_refunded"]) == ("refunded", 1000)


async def _lose_jobs(pool: Pool, task: str) -> None:
    """The request's job failed for good (its retries ran out)."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE procrastinate_jobs SET status = 'failed' WHERE task_name = %s"
            " AND status = 'todo'",
            (task,),
        )


async def test_a_capture_with_parameters_is_refused_not_taken_as_a_whole_capture(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """Only whole captures exist: an agent asking for part of the amount must not find the
    customer charged the whole of it."""
    payment = await authorized(api, agent_key, pool)
    url = f"/v1/payments/{payment['id']}/capture"
    refused = await api.post(url, json={"amount_to_capture": 1000}, headers=auth(agent_key))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "parameter_unknown"
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["pending_action"]) == ("authorized", None)
    accepted = await api.post(url, json={}, headers=auth(agent_key))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["pending_action"] == "capture"


async def test_a_refund_asked_for_before_reconcile_is_made_once_reconciled(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The default wait answers at `succeeded`, and an agent refunds at once: the refund is
    taken (it was a 409, stored under the agent's idempotency key for a day), and its job
    goes to the provider only once reconcile has booked the capture it reverses."""
    from tests.conftest import async_wait_for
    from tests.test_ledger import assert_ledger_sound

    created = await create(api, agent_key, amount=2000)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    assert (await fetch(api, agent_key, created["id"]))["status"] == "succeeded"
    response = await api.post(
        f"/v1/payments/{created['id']}/refunds",
        json={"amount": 500},
        headers={**auth(agent_key), "Idempotency-Key": f"refund-{created['id']}"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    await run_jobs(pool, ("charge",))  # the refund job: not before reconcile
    pi_id = (await fetch(api, agent_key, created["id"]))["provider_payment_id"]
    made = httpx.get(f"{provider_base}/v1/refunds", params={"payment_intent": pi_id}, headers=SK)
    assert made.json()["data"] == []

    async def refunded() -> dict[str, Any] | None:
        await run_jobs(pool)  # reconcile, then the refund job's next try
        payment = await fetch(api, agent_key, created["id"])
        return payment if payment["pending_action"] is None else None

    payment = await async_wait_for(refunded, what="the refund to be made")
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 500)
    async with pool.connection() as conn:
        await assert_ledger_sound(conn)


async def test_a_partial_capture_at_the_provider_books_what_was_collected(
    api: httpx.AsyncClient,
    agent_key: str,
    operator_key: str,
    pool: Pool,
    provider_base: str,
    fees: None,
) -> None:
    """Part of an authorized payment captured in the Dashboard: the agent spends what the
    customer paid, the rest of the hold comes back, the fee is its share of what was
    collected, and refunds give back at most that."""
    from tests.test_ledger import assert_ledger_sound, balances
    from workers.maintenance import recheck_waiting_payments

    me = (await api.get("/v1/balance", headers=auth(agent_key))).json()["agent_id"]
    funded = await api.post(
        f"/v1/agents/{me}/deposits",
        json={"amount": 10_000, "currency": "usd"},
        headers=auth(operator_key),
    )
    assert funded.status_code == 201, funded.text
    async with pool.connection() as conn:
        before, _ = await balances(conn, me)
    held = await authorized(api, agent_key, pool)  # 3,000 + tax 248 + fee 117
    assert (held["amount_total"], held["amount_fee"]) == (3365, 117)
    httpx.post(
        f"{provider_base}/v1/payment_intents/{held['provider_payment_id']}/capture",
        data={"amount_to_capture": "1000"},
        headers=SK,
    ).raise_for_status()
    await recheck_waiting_payments(pool, older_than=0)  # as a webhook would
    await run_jobs(pool)

    payment = await fetch(api, agent_key, held["id"])
    assert (payment["status"], payment["amount_captured"]) == ("reconciled", 1000)
    async with pool.connection() as conn:
        assert await balances(conn, me) == (before - 1000, 0)
        cur = await conn.execute(
            """SELECT a.kind, e.amount FROM ledger_entries e
                 JOIN ledger_transactions t ON t.id = e.transaction_id
                 JOIN ledger_accounts a ON a.id = e.account_id
                WHERE t.kind = 'capture' AND t.reference = %s""",
            (held["id"],),
        )
        posted = {row["kind"]: row["amount"] for row in await cur.fetchall()}
    assert posted == {
        "agent_holds": -3365,
        "provider_clearing": 965,
        "platform_fees": 35,  # 117 / 3,365 of the 1,000 collected
        "agent_budget": 2365,  # the part never captured, back
    }

    # Refunding "all that remains" means what was collected, and reaches `refunded`.
    response = await api.post(f"/v1/payments/{held['id']}/refunds", headers=auth(agent_key))
    assert response.status_code == 202, response.text
    assert response.json()["amount"] == 1000
    await run_jobs(pool)
    refunded = await fetch(api, agent_key, held["id"])
    assert (refunded["status"], refunded["amount_refunded"]) == ("refunded", 1000)
    async with pool.connection() as conn:
        assert await balances(conn, me) == (before, 0)
        await assert_ledger_sound(conn)
    more = await api.post(
        f"/v1/payments/{held['id']}/refunds", json={"amount": 1}, headers=auth(agent_key)
    )
    assert more.status_code == 409, more.text


async def test_a_refund_at_the_provider_after_a_partial_capture_counts_whatever_its_amount(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """At the API version the SDK pins (from 2025-03-31.basil on), a partial capture
    releases the rest without a Refund: every refund the provider lists after it gave back
    collected money, even one of exactly the uncaptured amount, and is taken in."""
    from workers.maintenance import recheck_waiting_payments

    held = await authorized(api, agent_key, pool)
    total = held["amount_total"]
    httpx.post(
        f"{provider_base}/v1/payment_intents/{held['provider_payment_id']}/capture",
        data={"amount_to_capture": str(total - 1000)},
        headers=SK,
    ).raise_for_status()
    await recheck_waiting_payments(pool, older_than=0)  # as a webhook would
    await run_jobs(pool)
    assert (await fetch(api, agent_key, held["id"]))["amount_captured"] == total - 1000
    refund_at_provider(provider_base, held["provider_payment_id"], 1000)  # = the part released
    assert await refunds.sync_refunds.func(held["id"]) == 1
    payment = await fetch(api, agent_key, held["id"])
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 1000)
    rest = await api.post(f"/v1/payments/{held['id']}/refunds", headers=auth(agent_key))
    assert rest.status_code == 202, rest.text
    assert rest.json()["amount"] == total - 2000  # what the provider still has to give back


async def test_the_sweep_re_drives_captures_and_refunds_whose_jobs_are_gone(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    from workers.maintenance import sweep_stuck_requests

    held = await authorized(api, agent_key, pool)
    paid = await reconciled(api, agent_key, pool)
    capture = await api.post(f"/v1/payments/{held['id']}/capture", headers=auth(agent_key))
    assert capture.status_code == 202, capture.text
    response = await api.post(
        f"/v1/payments/{paid['id']}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert response.status_code == 202, response.text
    refund_id = response.json()["id"]
    await _lose_jobs(pool, "capture")
    await _lose_jobs(pool, "refund")
    await run_jobs(pool)
    assert (await fetch(api, agent_key, held["id"]))["status"] == "authorized"  # stuck

    # Nothing is re-driven while its job still exists or it has not waited long enough.
    assert await sweep_stuck_requests(pool, older_than=3600) == []
    assert sorted(await sweep_stuck_requests(pool, older_than=0)) == sorted([held["id"], refund_id])
    await run_jobs(pool)
    assert (await fetch(api, agent_key, held["id"]))["status"] == "reconciled"
    refunded = await fetch(api, agent_key, paid["id"])
    assert (refunded["status"], refunded["amount_refunded"]) == ("partially_refunded", 500)
    assert len(provider_refunds(provider_base, paid["provider_payment_id"])) == 1
    assert await sweep_stuck_requests(pool, older_than=0) == []


async def test_the_sweep_re_drives_a_refund_sync_that_failed_for_good(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A refund made in the Dashboard whose sync job failed for good (retries ran out, or a
    worker of an older release did not know the task) is still counted, by the sweep."""
    from tasks.app import defer
    from workers.maintenance import sweep_stuck_requests

    paid = await reconciled(api, agent_key, pool)
    refund_at_provider(provider_base, paid["provider_payment_id"], 600)
    async with pool.connection() as conn, conn.transaction():
        await defer(conn, refunds.SYNC_TASK, payment_id=paid["id"])
        # Run and failed on its last try (procrastinate records the `failed` event).
        for status in ("doing", "failed"):
            await conn.execute(
                "UPDATE procrastinate_jobs SET status = %s WHERE task_name = %s",
                (status, refunds.SYNC_TASK),
            )
    await run_jobs(pool)
    assert (await fetch(api, agent_key, paid["id"]))["amount_refunded"] == 0  # not counted

    assert await sweep_stuck_requests(pool, older_than=3600) == []  # it failed just now
    assert await sweep_stuck_requests(pool, older_than=0) == [paid["id"]]
    assert await sweep_stuck_requests(pool, older_than=0) == []  # its new job waits
    await run_jobs(pool)
    after = await fetch(api, agent_key, paid["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 600)
    assert await sweep_stuck_requests(pool, older_than=0) == []  # its latest sync succeeded


async def test_a_refund_that_fails_after_it_succeeded_is_put_before_an_operator(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Stripe can fail a refund after it succeeded (a closed card). The money may be spent
    already, so nothing is undone by itself: the refund event brings a sync, which records
    a reconcile mismatch for an operator, once."""
    from tasks import webhooks

    paid = await reconciled(api, agent_key, pool)
    asked = await api.post(f"/v1/payments/{paid['id']}/refunds", headers=auth(agent_key))
    assert asked.status_code == 202, asked.text
    await run_jobs(pool)
    refund = (await api.get(f"/v1/payments/{paid['id']}/refunds", headers=auth(agent_key))).json()[
        "data"
    ][0]
    assert (await fetch(api, agent_key, paid["id"]))["status"] == "refunded"
    failed = httpx.post(
        f"{provider_base}/_sandbox/refunds/{refund['provider_refund_id']}/fail"
    ).json()
    assert failed["status"] == "failed"

    for n in (1, 2):  # the event, then the same event again: one mismatch
        event = {
            "id": f"evt_refund_failed_{n}",
            "type": "refund.failed",
            "data": {"object": failed},
        }
        async with pool.connection() as conn, conn.transaction():
            stored = await webhooks.store(conn, event)
        assert stored["sync_refunds"] is True
        await run_jobs(pool)
        found = await mismatches_of(pool, paid["id"])
        assert [(m["field"], m["expected"]["refund_id"], m["actual"]["status"]) for m in found] == [
            ("refund_status", refund["id"], "failed")
        ]
    after = await fetch(api, agent_key, paid["id"])
    assert (after["status"], after["amount_refunded"]) == ("refunded", 2000)  # for a person

    # The operator gives the money back with our refund's id on it: counted once, as it was.
    again = httpx.post(
        f"{provider_base}/v1/refunds",
        data={"payment_intent": paid["provider_payment_id"], "metadata[refund_id]": refund["id"]},
        headers=SK,
    ).json()
    assert (again["status"], again["amount"]) == ("succeeded", 2000)
    async with pool.connection() as conn, conn.transaction():
        await webhooks.store(
            conn, {"id": "evt_again", "type": "refund.created", "data": {"object": again}}
        )
    await run_jobs(pool)
    listed = (await api.get(f"/v1/payments/{paid['id']}/refunds", headers=auth(agent_key))).json()
    assert [r["id"] for r in listed["data"]] == [refund["id"]]
    # It names the refund that succeeded now, not the failed one, and the events say so.
    assert listed["data"][0]["provider_refund_id"] == again["id"]
    events = (await api.get(f"/v1/payments/{paid['id']}/events", headers=auth(agent_key))).json()
    replaced = [e["data"] for e in events["data"] if e["type"] == "refund_replaced"]
    assert replaced == [
        {
            "refund_id": refund["id"],
            "failed_provider_refund_id": failed["id"],
            "provider_refund_id": again["id"],
        }
    ]
    assert (await fetch(api, agent_key, paid["id"]))["amount_refunded"] == 2000
    assert [m["field"] for m in await mismatches_of(pool, paid["id"])] == [
        "refund_status"
    ]  # not made twice


async def test_only_a_plain_re_issue_of_a_failed_refund_replaces_it(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A re-issue for another amount is not taken as the refund (the failure stays before an
    operator); a same-amount one is, even seen in the same sync as the failure (which is
    still put before the operator); and a replacement that fails in turn is put before the
    operator again."""
    from tasks import webhooks

    async def refunded_then_failed() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        paid = await reconciled(api, agent_key, pool)
        asked = await api.post(
            f"/v1/payments/{paid['id']}/refunds", json={"amount": 1000}, headers=auth(agent_key)
        )
        assert asked.status_code == 202, asked.text
        await run_jobs(pool)
        refund = await ours(paid, asked.json()["id"])
        assert refund["status"] == "succeeded"
        failed = httpx.post(
            f"{provider_base}/_sandbox/refunds/{refund['provider_refund_id']}/fail"
        ).json()
        assert failed["status"] == "failed"
        return paid, refund, failed

    async def ours(paid: dict[str, Any], refund_id: str) -> dict[str, Any]:
        listed = await api.get(f"/v1/payments/{paid['id']}/refunds", headers=auth(agent_key))
        return next(r for r in listed.json()["data"] if r["id"] == refund_id)

    async def sync(event_id: str, refund: dict[str, Any]) -> None:
        async with pool.connection() as conn, conn.transaction():
            await webhooks.store(
                conn, {"id": event_id, "type": "refund.updated", "data": {"object": refund}}
            )
        await run_jobs(pool)

    def refund_again(paid: dict[str, Any], refund_id: str, amount: int) -> dict[str, Any]:
        made: dict[str, Any] = httpx.post(
            f"{provider_base}/v1/refunds",
            data={
                "payment_intent": paid["provider_payment_id"],
                "amount": amount,
                "metadata[refund_id]": refund_id,
            },
            headers=SK,
        ).json()
        assert (made["status"], made["amount"]) == ("succeeded", amount), made
        return made

    def failed_ids(found: list[dict[str, Any]]) -> list[str]:
        return [m["actual"]["provider_refund_id"] for m in found if m["field"] == "refund_status"]

    # Another amount: not ours.
    paid, refund, failed = await refunded_then_failed()
    refund_again(paid, refund["id"], 500)
    await sync("evt_1", failed)
    assert (await ours(paid, refund["id"]))["provider_refund_id"] == refund["provider_refund_id"]
    assert failed_ids(await mismatches_of(pool, paid["id"])) == [refund["provider_refund_id"]]

    # The same amount, in the sync that first sees the failure: ours, and the failure recorded.
    paid, refund, failed = await refunded_then_failed()
    right = refund_again(paid, refund["id"], 1000)
    await sync("evt_2", failed)
    assert (await ours(paid, refund["id"]))["provider_refund_id"] == right["id"]
    after = await fetch(api, agent_key, paid["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 1000)
    assert failed_ids(await mismatches_of(pool, paid["id"])) == [refund["provider_refund_id"]]

    # The replacement fails in turn: before the operator again, once.
    failed_again = httpx.post(f"{provider_base}/_sandbox/refunds/{right['id']}/fail").json()
    for n in (3, 4):
        await sync(f"evt_{n}", failed_again)
    assert failed_ids(await mismatches_of(pool, paid["id"])) == [
        refund["provider_refund_id"],
        right["id"],
    ]


async def test_a_re_issue_taken_in_as_made_outside_is_not_taken_again(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """An operator re-issued a failed refund without our id (taken in as made outside
    agentpay), then added our id to it at the provider: the sync goes on as before (it
    failed for good on the provider refund id being taken)."""
    from tasks import refunds, webhooks

    paid = await reconciled(api, agent_key, pool)
    asked = await api.post(
        f"/v1/payments/{paid['id']}/refunds", json={"amount": 1000}, headers=auth(agent_key)
    )
    await run_jobs(pool)
    listed = (await api.get(f"/v1/payments/{paid['id']}/refunds", headers=auth(agent_key))).json()
    first_id = listed["data"][0]["provider_refund_id"]
    failed = httpx.post(f"{provider_base}/_sandbox/refunds/{first_id}/fail").json()
    again = httpx.post(
        f"{provider_base}/v1/refunds",
        data={
            "payment_intent": paid["provider_payment_id"],
            "amount": 1000,
            "metadata[refund_id]": asked.json()["id"],
        },
        headers=SK,
    ).json()
    async with pool.connection() as conn, conn.transaction():
        # As the sync had taken it in before its metadata named our refund.
        await conn.execute(
            """INSERT INTO payment_refunds (id, payment_id, amount, currency, reason, actor,
                                            status, provider_refund_id, provider_status)
               VALUES ('rfd_outside1', %s, 1000, 'usd', 'made at the provider', 'provider',
                       'succeeded', %s, 'succeeded')""",
            (paid["id"], again["id"]),
        )
        await webhooks.store(
            conn, {"id": "evt_f", "type": "refund.failed", "data": {"object": failed}}
        )
    await run_jobs(pool)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status FROM procrastinate_jobs WHERE task_name = %s", (refunds.SYNC_TASK,)
        )
        assert {r["status"] for r in await cur.fetchall()} == {"succeeded"}
    assert [m["field"] for m in await mismatches_of(pool, paid["id"])] == ["refund_status"]


async def test_a_refund_made_twice_at_the_provider_is_put_before_an_operator(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A call whose server error the provider saved can still be carried out later, after
    the retry under a derived key made the refund: two provider refunds carry our refund's
    id. Only one is counted, so the sync records the other once, for an operator."""
    paid = await reconciled(api, agent_key, pool)
    asked = await api.post(
        f"/v1/payments/{paid['id']}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert asked.status_code == 202, asked.text
    await run_jobs(pool)
    refund_id = asked.json()["id"]
    late = httpx.post(
        f"{provider_base}/v1/refunds",
        data={
            "payment_intent": paid["provider_payment_id"],
            "amount": "500",
            "metadata[refund_id]": refund_id,
        },
        headers=SK,
    ).json()
    for _ in range(2):  # the refund's events: once
        assert await refunds.sync_refunds.func(paid["id"]) == 0
    found = await mismatches_of(pool, paid["id"])
    assert [(m["field"], m["expected"]["refund_id"]) for m in found] == [
        ("refund_count", refund_id)
    ]
    assert late["id"] in found[0]["actual"]["provider_refund_ids"]
    assert found[0]["actual"]["amount"] == 1000
    after = await fetch(api, agent_key, paid["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 500)


async def test_a_refund_pending_at_the_provider_counts_only_once_it_succeeds(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks import provider
    from tasks.app import TransientError

    paid = await reconciled(api, agent_key, pool)
    response = await api.post(
        f"/v1/payments/{paid['id']}/refunds", json={"amount": 700}, headers=auth(agent_key)
    )
    refund_id = response.json()["id"]
    answers = iter(["pending", "pending", "succeeded"])

    async def create(*args: Any, **kwargs: Any) -> provider.Refund:
        return provider.Refund(id="re_slow", status=next(answers), amount=700)

    async def retrieve(provider_refund_id: str) -> provider.Refund:
        assert provider_refund_id == "re_slow"  # never a second create
        return provider.Refund(id="re_slow", status=next(answers), amount=700)

    monkeypatch.setattr(provider, "refund", create)
    monkeypatch.setattr(provider, "retrieve_refund", retrieve)
    for _ in range(2):
        with pytest.raises(TransientError, match="pending"):
            await refunds.refund_payment(paid["id"], refund_id)
        payment = await fetch(api, agent_key, paid["id"])
        assert (payment["status"], payment["amount_refunded"]) == ("reconciled", 0)
        async with pool.connection() as conn:
            row = await refunds.get(conn, refund_id)
        assert row is not None
        assert (row["status"], row["provider_refund_id"]) == ("pending", "re_slow")
    assert await refunds.refund_payment(paid["id"], refund_id) == "partially_refunded"
    payment = await fetch(api, agent_key, paid["id"])
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 700)


@pytest.mark.parametrize("last_look", ["pending", "refused"])
async def test_a_refund_pending_at_the_provider_is_stuck_from_when_it_was_asked_for(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    last_look: str,
) -> None:
    """Every look at a refund still pending at the provider (the job's retries, the sweep's
    re-drive) set its updated_at, from which ops_stuck_payments measured it: it never showed
    as stuck. It is measured from when it was asked for, and a look leaves updated_at. A
    refund job that runs out of retries on it is no failure for the failed-job alert: the
    provider has not finished, and the stuck alert shows it — but one whose last look failed
    on our side (the provider refused our key) is, though an earlier look saw it pending."""
    from api.metrics import read_snapshot
    from tasks import provider
    from tasks.app import TransientError

    paid = await reconciled(api, agent_key, pool)
    response = await api.post(
        f"/v1/payments/{paid['id']}/refunds", json={"amount": 700}, headers=auth(agent_key)
    )
    refund_id = response.json()["id"]

    async def pending(*args: Any, **kwargs: Any) -> provider.Refund:
        return provider.Refund(id="re_slow", status="pending", amount=700)

    monkeypatch.setattr(provider, "refund", pending)
    monkeypatch.setattr(provider, "retrieve_refund", pending)
    with pytest.raises(TransientError):
        await refunds.refund_payment(paid["id"], refund_id)
    if last_look == "refused":

        async def refused(*args: Any, **kwargs: Any) -> provider.Refund:
            raise provider.ProviderError("AuthenticationError (401): Invalid API Key provided")

        monkeypatch.setattr(provider, "retrieve_refund", refused)
    async with pool.connection() as conn:  # asked for two days ago, still pending
        await conn.execute(
            """UPDATE payment_refunds SET created_at = now() - interval '2 days',
                      updated_at = now() - interval '2 days' WHERE id = %s""",
            (refund_id,),
        )
        # Its job's last try is due: it finds the refund pending once more.
        await conn.execute(
            """UPDATE procrastinate_jobs SET attempts = 11, scheduled_at = now()
                WHERE task_name = 'refund' AND status = 'todo'"""
        )
    await run_jobs(pool, ("charge",), observed=True)
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT status, provider_status, now() - updated_at > interval '1 day' AS old
                 FROM payment_refunds WHERE id = %s""",
            (refund_id,),
        )
        assert await cur.fetchone() == {
            "status": "pending",
            "provider_status": "pending",
            "old": True,
        }
        cur = await conn.execute(
            "SELECT status::text FROM procrastinate_jobs WHERE task_name = 'refund'"
        )
        assert [r["status"] for r in await cur.fetchall()] == ["failed"]
        s = await read_snapshot(conn, settings)
    assert [(r["payment_id"], r["waiting_on"], r["stuck_on"]) for r in s.stuck] == [
        (paid["id"], "fleet", "refund_pending")
    ]
    assert s.stuck[0]["stuck_seconds"] > 86400
    failed = {q["role"]: q["failed_last_hour"] for q in s.queues}["charge"]
    assert failed == (1 if last_look == "refused" else 0)


async def test_a_payment_the_provider_moved_on_without_a_webhook_is_caught_up(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Captured at the provider directly (no webhook reaches us): the recheck of payments
    waiting on a person finds it and reconcile settles it."""
    from workers.maintenance import recheck_waiting_payments

    held = await authorized(api, agent_key, pool)
    assert await recheck_waiting_payments(pool, older_than=3600) == []  # not due yet
    captured = httpx.post(
        f"{provider_base}/v1/payment_intents/{held['provider_payment_id']}/capture", headers=SK
    )
    assert captured.json()["status"] == "succeeded"
    assert await recheck_waiting_payments(pool, older_than=0) == [held["id"]]
    await run_jobs(pool)
    assert (await fetch(api, agent_key, held["id"]))["status"] == "reconciled"
    assert await recheck_waiting_payments(pool, older_than=0) == []  # no longer waiting


async def test_a_reconcile_that_read_a_state_since_left_looks_again(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A webhook's reconcile read the payment while `charging`; the charge job then moved it
    to `requires_action`, though the customer had already authenticated. The reconcile's
    answer is stale for the new state, so it settles nothing, but it must not drop the news:
    another reconcile settles the payment from the provider."""
    from tasks import reconcile

    created = await create(api, agent_key, payment_method="pm_card_authenticationRequired")
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "requires_action"
    authenticated = httpx.post(
        f"{provider_base}/_sandbox/payment_intents/{payment['provider_payment_id']}/authenticate",
        json={"outcome": "succeed"},
    )
    assert authenticated.json()["status"] == "succeeded", authenticated.text

    real_get = reconcile.payments.get

    async def read_before_the_charge_job_finished(conn: Any, payment_id: str) -> Any:
        found = await real_get(conn, payment_id)
        return {**found, "status": "charging"}

    monkeypatch.setattr(reconcile.payments, "get", read_before_the_charge_job_finished)
    assert await reconcile.reconcile_payment.func(payment["id"]) is None
    monkeypatch.setattr(reconcile.payments, "get", real_get)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "requires_action"
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"


async def test_a_partial_capture_made_at_the_provider_is_a_recorded_mismatch(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Captured for less at the provider directly (a partial capture in the Dashboard): the
    intent's amount is unchanged, but what was collected is not what the payment says."""
    from workers.maintenance import recheck_waiting_payments

    held = await authorized(api, agent_key, pool)
    captured = httpx.post(
        f"{provider_base}/v1/payment_intents/{held['provider_payment_id']}/capture",
        data={"amount_to_capture": "1000"},
        headers=SK,
    ).json()
    assert (captured["status"], captured["amount_received"]) == ("succeeded", 1000)
    assert await recheck_waiting_payments(pool, older_than=0) == [held["id"]]
    await run_jobs(pool)
    assert (await fetch(api, agent_key, held["id"]))["status"] == "reconciled"
    assert await mismatches_of(pool, held["id"]) == [
        {"field": "amount_received", "expected": 3000, "actual": 1000}
    ]


async def test_metadata_changed_at_the_provider_is_a_recorded_mismatch(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """The intent's `metadata[agent_id]` was changed at the provider (the Dashboard, another
    tool) between the charge and reconcile: reconcile records the disagreement and still
    reconciles the payment (the money is as it should be)."""
    created = await create(api, agent_key, amount=2000)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "succeeded"
    updated = httpx.post(
        f"{provider_base}/v1/payment_intents/{payment['provider_payment_id']}",
        data={"metadata[agent_id]": "someone-else"},
        headers=SK,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["metadata"]["agent_id"] == "someone-else"
    assert updated.json()["metadata"]["payment_id"] == payment["id"]  # merged, not replaced

    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"
    assert await mismatches_of(pool, payment["id"]) == [
        {"field": "metadata.agent_id", "expected": payment["agent_id"], "actual": "someone-else"}
    ]


async def test_a_refund_made_at_the_provider_before_reconcile_is_taken_in_once_reconciled(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An authorized payment captured in the Dashboard and partly refunded there at once: the
    refund's event comes while agentpay still has the payment `authorized`. It is taken in
    once reconcile has booked the capture (the event used to be dropped: money back at the
    provider, never counted)."""
    from tasks import webhooks
    from tasks.settings import get_settings
    from tests.conftest import async_wait_for
    from tests.test_ledger import assert_ledger_sound
    from workers.maintenance import recheck_waiting_payments

    monkeypatch.setenv("AGENTPAY_PROVIDER_RECHECK_SECONDS", "0.2")
    get_settings.cache_clear()
    held = await authorized(api, agent_key, pool)
    intent_id = held["provider_payment_id"]
    httpx.post(
        f"{provider_base}/v1/payment_intents/{intent_id}/capture", headers=SK
    ).raise_for_status()
    made = refund_at_provider(provider_base, intent_id, 1000)
    async with pool.connection() as conn, conn.transaction():
        stored = await webhooks.store(
            conn, {"id": "evt_early_refund", "type": "refund.created", "data": {"object": made}}
        )
    assert stored["sync_refunds"] is True
    await recheck_waiting_payments(pool, older_than=0)  # as the capture's webhook would

    async def taken_in() -> dict[str, Any] | None:
        await run_jobs(pool)
        payment = await fetch(api, agent_key, held["id"])
        return payment if payment["amount_refunded"] else None

    payment = await async_wait_for(taken_in, what="the Dashboard refund to be taken in")
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 1000)
    async with pool.connection() as conn:
        await assert_ledger_sound(conn)


async def test_a_refund_made_elsewhere_with_a_refund_id_of_its_own_is_taken_in(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Another tool's refund may carry a `refund_id` in its metadata (its own ticket number):
    only one of this payment's refund ids makes a provider refund ours."""
    paid = await reconciled(api, agent_key, pool)
    httpx.post(
        f"{provider_base}/v1/refunds",
        data={
            "payment_intent": paid["provider_payment_id"],
            "amount": "700",
            "metadata[refund_id]": "ZD-48213",
        },
        headers=SK,
    ).raise_for_status()
    assert await refunds.sync_refunds.func(paid["id"]) == 1
    payment = await fetch(api, agent_key, paid["id"])
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 700)


async def test_a_refund_at_the_provider_beyond_what_remains_is_put_before_an_operator(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A refund of ours failed at the provider after it was counted; an operator gives the
    money back from the Dashboard without our refund id. By agentpay's count it is more than
    remains: the sync records it for an operator (once) and goes on taking in the refunds that
    fit, instead of failing on the payment's limits at every try."""
    paid = await reconciled(api, agent_key, pool)  # 2,000
    asked = await api.post(
        f"/v1/payments/{paid['id']}/refunds", json={"amount": 1500}, headers=auth(agent_key)
    )
    assert asked.status_code == 202, asked.text
    await run_jobs(pool)
    refund = (await api.get(f"/v1/payments/{paid['id']}/refunds", headers=auth(agent_key))).json()[
        "data"
    ][0]
    httpx.post(f"{provider_base}/_sandbox/refunds/{refund['provider_refund_id']}/fail")
    reissued = refund_at_provider(provider_base, paid["provider_payment_id"], 1500)
    for _ in range(2):
        assert await refunds.sync_refunds.func(paid["id"]) == 0
    found = await mismatches_of(pool, paid["id"])
    assert [m["field"] for m in found] == ["refund_status", "refund_excess"]
    assert found[1]["actual"] == {"provider_refund_id": reissued["id"], "amount": 1500}
    refund_at_provider(provider_base, paid["provider_payment_id"], 500)  # fits: taken in
    assert await refunds.sync_refunds.func(paid["id"]) == 1
    payment = await fetch(api, agent_key, paid["id"])
    assert (payment["status"], payment["amount_refunded"]) == ("refunded", 2000)


async def test_a_waiting_refund_does_not_hide_a_payment_whose_reconcile_is_gone(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """A refund asked for at `succeeded` waits (its job retries) until reconcile has run: if
    the reconcile job is lost, the sweep must still re-drive it."""
    from workers.maintenance import sweep_stuck_payments

    created = await create(api, agent_key, amount=2000)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    assert (await fetch(api, agent_key, created["id"]))["status"] == "succeeded"
    asked = await api.post(
        f"/v1/payments/{created['id']}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert asked.status_code == 202, asked.text
    async with pool.connection() as conn:
        await conn.execute(
            "DELETE FROM procrastinate_jobs WHERE task_name = 'reconcile' AND status = 'todo'"
        )
    assert await sweep_stuck_payments(pool, older_than=0) == [created["id"]]


async def test_a_refund_taken_in_is_not_counted_again_nor_an_excess_at_the_next_sync(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Stripe sends several events for one refund, each a sync: a refund taken in already
    is neither counted again nor, being more than what remains now, a mismatch."""
    paid = await reconciled(api, agent_key, pool)  # 2,000
    refund_at_provider(provider_base, paid["provider_payment_id"], 1500)
    assert [await refunds.sync_refunds.func(paid["id"]) for _ in range(2)] == [1, 0]
    payment = await fetch(api, agent_key, paid["id"])
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 1500)
    assert await mismatches_of(pool, paid["id"]) == []


async def test_syncs_waiting_for_reconcile_merge_into_one(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """Two refund events before reconcile (one came while the other's sync ran) made two
    syncs, each deferring itself again every few seconds until reconcile: one does."""
    from tasks.app import defer

    held = await authorized(api, agent_key, pool)
    async with pool.connection() as conn:
        for _ in range(2):
            await defer(conn, refunds.SYNC_TASK, payment_id=held["id"])
    await run_jobs(pool, ("charge",))
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT count(*) AS n FROM procrastinate_jobs
                WHERE task_name = %s AND status = 'todo' AND args->>'payment_id' = %s""",
            (refunds.SYNC_TASK, held["id"]),
        )
        assert (await cur.fetchone())["n"] == 1
