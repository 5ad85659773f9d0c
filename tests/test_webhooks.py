"""POST /v1/webhooks/stripe: signatures (agreeing with the SDK and the sandbox), each event
stored once, duplicates with one effect, and events out of order never moving a payment back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
import uvicorn

from api.app import create_app
from sandbox.webhooks import sign_payload
from tasks import charge, payments, provider, reconcile, webhooks
from tasks.app import defer
from tasks.db import Pool
from tasks.settings import Settings
from tests.conftest import WEBHOOK_SECRET, async_wait_for, auth, run_jobs, server_port, wait_for
from tests.test_pipeline import create, fetch

EVENT = {
    "id": "evt_test_1",
    "object": "event",
    "type": "payment_intent.succeeded",
    "data": {"object": {"id": "pi_unknown", "object": "payment_intent", "metadata": {}}},
}


# --- the signature scheme --------------------------------------------------------------------


def stripe_accepts(payload: str, header: str, secret: str = WEBHOOK_SECRET) -> bool:
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=300)
    except stripe.SignatureVerificationError:
        return False
    return True


def ours_accepts(payload: str, header: str, secret: str = WEBHOOK_SECRET) -> bool:
    try:
        webhooks.verify(payload.encode(), header, secret, tolerance=300)
    except webhooks.SignatureError:
        return False
    return True


def test_the_verifier_agrees_with_the_sdk_and_the_sandbox() -> None:
    payload = json.dumps(EVENT, indent=2)
    now = int(time.time())
    good = {
        "sandbox": sign_payload(payload, WEBHOOK_SECRET),
        "sdk": stripe.WebhookSignature.generate_signature_header(payload, WEBHOOK_SECRET),
        "ours": webhooks.sign(payload, WEBHOOK_SECRET),
        "several": f"t={now},v1=00ff,v0=abc,"
        + sign_payload(payload, WEBHOOK_SECRET, now).split(",")[1],
    }
    for name, header in good.items():
        assert stripe_accepts(payload, header), name
        assert ours_accepts(payload, header), name

    bad = {
        "tampered": (payload.replace("succeeded", "failed"), good["sandbox"]),
        "other secret": (payload, sign_payload(payload, "whsec_other")),
        "stale": (payload, sign_payload(payload, WEBHOOK_SECRET, now - 301)),
        "no v1": (payload, f"t={now},v0=" + "0" * 64),
        "no timestamp": (payload, good["sandbox"].split(",")[1]),
        "garbage": (payload, "nonsense"),
    }
    for name, (body, header) in bad.items():
        assert not stripe_accepts(body, header), name
        assert not ours_accepts(body, header), name


# --- the route, in-process -----------------------------------------------------------------


async def post_event(
    api: httpx.AsyncClient, event: dict[str, Any], header: str | None = None, query: str = ""
) -> httpx.Response:
    body = json.dumps(event)
    return await api.post(
        f"/v1/webhooks/stripe{query}",
        content=body,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": header
            if header is not None
            else sign_payload(body, WEBHOOK_SECRET),
        },
    )


async def stored(pool: Pool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id, type, payment_id, handled FROM webhook_events")
        return await cur.fetchall()


async def reconcile_jobs(pool: Pool, payment_id: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT count(*) AS n FROM procrastinate_jobs
               WHERE task_name = 'reconcile' AND args->>'payment_id' = %s""",
            (payment_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def test_bad_or_stale_signatures_are_refused_and_store_nothing(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    body = json.dumps(EVENT)
    cases = {
        "signature_invalid": sign_payload(body, "whsec_not_ours"),
        "signature_expired": sign_payload(body, WEBHOOK_SECRET, int(time.time()) - 600),
        "signature_missing": "",
    }
    for code, header in cases.items():
        response = await post_event(api, EVENT, header)
        assert response.status_code == 400, code
        error = response.json()["error"]
        assert error["code"] == code
        assert set(error) == {"type", "code", "message", "param"}
    assert await stored(pool) == []


async def test_a_deep_body_costs_an_unsigned_sender_one_signature_check(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    """Webhook bodies may be 1 MiB: no one may make the API scan one before its signature is
    checked. A deep body unsigned is refused for its signature; signed, by the parser (a 400,
    never a 500)."""
    deep = "[" * 200_000 + "]" * 200_000
    for header, code in (
        (sign_payload(deep, "whsec_not_ours"), "signature_invalid"),
        (sign_payload(deep, WEBHOOK_SECRET), "payload_invalid"),
    ):
        response = await api.post(
            "/v1/webhooks/stripe",
            content=deep,
            headers={"Content-Type": "application/json", "Stripe-Signature": header},
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == code
    assert await stored(pool) == []


async def test_unknown_event_types_are_stored_and_ignored(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    event = {**EVENT, "id": "evt_test_2", "type": "customer.created", "data": {"object": {}}}
    # An endpoint registered with a query string of its own is no unknown parameter.
    response = await post_event(api, event, query="?source=stripe")
    assert response.status_code == 200, response.text
    assert response.json()["reconcile"] is False
    assert await stored(pool) == [
        {"id": "evt_test_2", "type": "customer.created", "payment_id": None, "handled": False}
    ]
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM procrastinate_jobs")
        assert await cur.fetchone() == {"n": 0}


async def succeeded_without_its_reconcile(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> dict[str, Any]:
    """A payment charged and `succeeded` whose reconcile job the charge step deferred is
    lost: only an event can bring one back."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "succeeded"
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM procrastinate_jobs WHERE task_name = 'reconcile'")
    return payment


async def test_an_event_stored_once_defers_one_reconcile(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    payment = await succeeded_without_its_reconcile(api, agent_key, pool)
    event = {
        **EVENT,
        "data": {
            "object": {
                "id": payment["provider_payment_id"],
                "object": "payment_intent",
                "metadata": {"payment_id": payment["id"]},
            }
        },
    }
    answers = [(await post_event(api, event)).json() for _ in range(5)]
    assert [(a["duplicate"], a["reconcile"]) for a in answers] == [(False, True)] + [
        (True, False)
    ] * 4
    assert answers[0]["payment_id"] == payment["id"]
    assert await reconcile_jobs(pool, payment["id"]) == 1
    assert len(await stored(pool)) == 1
    # A different event while that reconcile waits: stored, no second job.
    other = await post_event(api, {**event, "id": "evt_test_other"})
    assert other.json() == {**answers[0], "id": "evt_test_other", "reconcile": False}
    assert await reconcile_jobs(pool, payment["id"]) == 1

    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"
    # Final now: an event about it stores and changes nothing.
    late = await post_event(api, {**event, "id": "evt_test_late"})
    assert late.json()["reconcile"] is False
    assert await reconcile_jobs(pool, payment["id"]) == 1


async def test_a_dispute_is_recorded_in_its_payments_events_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """A chargeback (`charge.dispute.created`, then its updates and its end) was stored as
    "handled" with nothing done: the payment showed no sign of it. Each dispute event is now
    in the payment's events, once however often it is delivered; it brings no reconcile (the
    PaymentIntent does not change)."""
    created = await create(api, agent_key)
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    dispute = {
        "id": "dp_test_1",
        "object": "dispute",
        "amount": payment["amount_total"],
        "currency": payment["currency"],
        "charge": "ch_test_1",
        "payment_intent": payment["provider_payment_id"],
        "reason": "fraudulent",
        "status": "needs_response",
    }
    # The series an alert on disputes watches is there before the first one, at 0.
    scraped = (await api.get("/metrics")).text
    assert (
        'agentpay_webhook_events_total{outcome="handled",type="charge.dispute.created"} 0.0'
        in scraped
    )
    opened = {**EVENT, "id": "evt_test_dispute_1", "type": "charge.dispute.created"}
    opened["data"] = {"object": dispute}
    closed = {**EVENT, "id": "evt_test_dispute_2", "type": "charge.dispute.closed"}
    closed["data"] = {"object": {**dispute, "status": "lost"}}
    answers = [await post_event(api, e) for e in (opened, opened, closed)]
    assert [(a.status_code, a.json()["duplicate"]) for a in answers] == [
        (200, False),
        (200, True),
        (200, False),
    ]
    assert {a.json()["payment_id"] for a in answers} == {payment["id"]}
    assert not any(a.json()["reconcile"] for a in answers)
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    disputes = [e for e in events if e["type"] == "dispute"]
    assert [(e["reason"], e["data"]["dispute"]["status"]) for e in disputes] == [
        ("charge.dispute.created: needs_response (fraudulent)", "needs_response"),
        ("charge.dispute.closed: lost (fraudulent)", "lost"),
    ]
    assert disputes[0]["data"]["dispute"] == {
        "id": "dp_test_1",
        "status": "needs_response",
        "amount": payment["amount_total"],
        "currency": payment["currency"],
        "reason": "fraudulent",
    }
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"


async def test_a_lost_dispute_is_booked_once_and_one_that_cannot_be_is_a_mismatch(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """A dispute the customer won was only an event: provider clearing kept counting the
    money. The first event saying `lost` books it in the ledger (`dispute_lost`), the next
    ones (`charge.dispute.updated`, then `.closed`) add nothing; a lost dispute the ledger
    cannot book (the payment has no capture) goes before the operator as a mismatch, once."""

    def lost(payment: dict[str, Any], dispute_id: str, n: int, kind: str) -> dict[str, Any]:
        dispute = {
            "id": dispute_id,
            "object": "dispute",
            "amount": payment["amount_total"],
            "currency": payment["currency"],
            "payment_intent": payment["provider_payment_id"],
            "reason": "fraudulent",
            "status": "lost",
        }
        return {
            **EVENT,
            "id": f"evt_test_{dispute_id}_{n}",
            "type": kind,
            "data": {"object": dispute},
        }

    created = await create(api, agent_key)
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    for n, kind in enumerate(["charge.dispute.updated", "charge.dispute.closed"]):
        answer = await post_event(api, lost(payment, "dp_test_lost", n, kind))
        assert answer.status_code == 200 and answer.json()["duplicate"] is False
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT a.kind, e.amount FROM ledger_entries e
               JOIN ledger_transactions t ON t.id = e.transaction_id
               JOIN ledger_accounts a ON a.id = e.account_id
               WHERE t.kind = 'dispute_lost' AND t.reference = 'dp_test_lost'
               ORDER BY a.kind"""
        )
        booked = [(r["kind"], r["amount"]) for r in await cur.fetchall()]
    total = payment["amount_total"]
    assert booked == [("disputes_lost", total), ("provider_clearing", -total)]
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    assert [e["data"].get("booked_loss") for e in events if e["type"] == "dispute"] == [
        total,
        None,
    ]

    # Lost before the payment was captured in the ledger (still `succeeded`): not booked,
    # one mismatch however many events say so.
    waiting = await succeeded_without_its_reconcile(api, agent_key, pool)
    for n in range(2):
        answer = await post_event(api, lost(waiting, "dp_test_early", n, "charge.dispute.closed"))
        assert answer.status_code == 200
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT field, expected, actual FROM reconcile_mismatches WHERE payment_id = %s",
            (waiting["id"],),
        )
        mismatches = await cur.fetchall()
        cur = await conn.execute(
            "SELECT count(*) AS n FROM ledger_transactions WHERE reference = 'dp_test_early'"
        )
        assert (await cur.fetchone())["n"] == 0
    assert [(m["field"], m["expected"], m["actual"]["id"]) for m in mismatches] == [
        ("dispute_lost", {"booked": 0}, "dp_test_early")
    ]


async def test_an_event_with_nul_or_a_lone_surrogate_is_stored_once_and_acted_on(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Metadata someone typed may hold `"\\u0000"` or a lone `"\\ud800"`: Postgres jsonb
    refused the event (a 500), and the provider delivered it again, forever. The stored copy
    has U+FFFD in their place."""
    payment = await succeeded_without_its_reconcile(api, agent_key, pool)
    metadata = {"payment_id": payment["id"], "note": "a\u0000b", "\ud800key": "c\udfffd"}
    event = {
        **EVENT,
        "id": "evt_test_unstorable",
        "data": {
            "object": {
                "id": payment["provider_payment_id"],
                "object": "payment_intent",
                "metadata": metadata,
            }
        },
    }
    body = json.dumps(event)
    assert "\\u0000" in body and "\\ud800" in body and "\\udfff" in body
    answers = [await post_event(api, event) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert [(a.json()["duplicate"], a.json()["reconcile"]) for a in answers] == [
        (False, True),
        (True, False),
    ]
    assert answers[0].json()["payment_id"] == payment["id"]
    assert await reconcile_jobs(pool, payment["id"]) == 1
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id, payload FROM webhook_events")
        rows = await cur.fetchall()
    assert [r["id"] for r in rows] == ["evt_test_unstorable"]
    assert rows[0]["payload"]["data"]["object"]["metadata"] == {
        "payment_id": payment["id"],
        "note": "a\ufffdb",
        "\ufffdkey": "c\ufffdd",
    }
    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"


async def test_an_event_during_a_running_charge_still_defers_a_reconcile(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A charge job already running may hold an older answer (requires_action, say) and
    commit it after this event: the event must still bring a reconcile. A charge job still
    waiting reads the provider after the event, so none is needed then."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_jobs SET status = 'charging' WHERE id = %s", (created["id"],)
        )
    event = {
        **EVENT,
        "data": {
            "object": {
                "id": "pi_test",
                "object": "payment_intent",
                "metadata": {"payment_id": created["id"]},
            }
        },
    }
    waiting = await post_event(api, {**event, "id": "evt_while_waiting"})
    assert waiting.json()["reconcile"] is False  # the waiting charge job will read it
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE procrastinate_jobs SET status = 'doing' WHERE task_name = 'charge'"
        )
    running = await post_event(api, {**event, "id": "evt_while_running"})
    assert running.json()["reconcile"] is True
    assert await reconcile_jobs(pool, created["id"]) == 1


async def test_a_reconcile_that_finds_its_charge_succeeded_meanwhile_defers_no_other(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider's `succeeded` webhook often comes while the charge job runs: its
    reconcile reads the provider while the payment is `charging`, and finds it `succeeded`
    by the time it locks it. The charge's move deferred a reconcile, which may be running
    already: another one was deferred, a provider call and a job for nothing (six in ten
    payments of a quiet dev stack made one)."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    payment_id = created["id"]
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_jobs SET status = 'charging' WHERE id = %s", (payment_id,)
        )

    async def charge_finishes_meanwhile(pid: str) -> None:
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE payment_jobs SET status = 'succeeded' WHERE id = %s", (payment_id,)
            )
            await defer(conn, "reconcile", payment_id=payment_id)
            await conn.execute(  # the charge's reconcile is running already
                "UPDATE procrastinate_jobs SET status = 'doing' WHERE task_name = 'reconcile'"
            )

    monkeypatch.setattr(provider, "find_intent", charge_finishes_meanwhile)
    assert await reconcile.reconcile_payment(payment_id) is None
    assert await reconcile_jobs(pool, payment_id) == 1  # the charge's, and no other


@pytest.mark.parametrize(
    "event_type",
    ["payment_intent.created", "charge.succeeded", "charge.captured", "charge.updated"],
)
async def test_an_event_without_news_is_stored_but_brings_no_reconcile(
    event_type: str, api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """`payment_intent.created` reports no outcome, and a charge event repeats the outcome
    of a `payment_intent.*` event sent beside it: stored and tied to their payment, but no
    reconcile job, even while the charge job runs (when an outcome event would bring one)."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_jobs SET status = 'charging' WHERE id = %s", (created["id"],)
        )
        await conn.execute(
            "UPDATE procrastinate_jobs SET status = 'doing' WHERE task_name = 'charge'"
        )
    intent = {
        "id": "pi_test",
        "object": "payment_intent",
        "metadata": {"payment_id": created["id"]},
    }
    charge = {
        "id": "ch_test",
        "object": "charge",
        "payment_intent": "pi_test",
        "metadata": {"payment_id": created["id"]},
    }
    answer = await post_event(
        api,
        {
            **EVENT,
            "id": "evt_no_news",
            "type": event_type,
            "data": {"object": intent if event_type.startswith("payment_intent.") else charge},
        },
    )
    assert answer.json() == {
        "received": True,
        "id": "evt_no_news",
        "duplicate": False,
        "payment_id": created["id"],
        "reconcile": False,
        "sync_refunds": False,
    }
    assert [(e["type"], e["payment_id"], e["handled"]) for e in await stored(pool)] == [
        (event_type, created["id"], True)
    ]
    assert await reconcile_jobs(pool, created["id"]) == 0
    outcome = await post_event(
        api,
        {**EVENT, "id": "evt_succeeded", "data": {"object": {**intent, "status": "succeeded"}}},
    )
    assert outcome.json()["reconcile"] is True


async def test_a_refund_made_outside_agentpay_is_taken_in_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Refunded in the Dashboard: the refund event brings a sync that records the provider's
    refund as one of the payment's (amount, status, ledger), once, beside agentpay's own."""
    from tasks import refunds
    from tests.test_capture_refund import provider_refunds, reconciled, refund_at_provider
    from tests.test_ledger import assert_ledger_sound

    payment = await reconciled(api, agent_key, pool)
    pid, intent_id = payment["id"], payment["provider_payment_id"]
    ours = await api.post(
        f"/v1/payments/{pid}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert ours.status_code == 202
    await run_jobs(pool)
    outside = refund_at_provider(provider_base, intent_id, 300)
    assert outside["status"] == "succeeded"
    charge = {"id": "ch_x", "object": "charge", "payment_intent": intent_id, "metadata": {}}
    event = {**EVENT, "id": "evt_refunded", "type": "charge.refunded", "data": {"object": charge}}
    answers = [(await post_event(api, event)).json() for _ in range(2)]
    assert [(a["duplicate"], a["sync_refunds"]) for a in answers] == [(False, True), (True, False)]
    updated = await post_event(
        api,
        {
            **event,
            "id": "evt_updated",
            "type": "refund.updated",
            "data": {"object": {**outside, "object": "refund"}},
        },
    )
    assert updated.json()["payment_id"] == pid
    assert updated.json()["sync_refunds"] is False  # one is waiting already
    await run_jobs(pool)

    after = await fetch(api, agent_key, pid)
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 800)
    async with pool.connection() as conn:
        rows = await refunds.for_payment(conn, pid)
        assert await refunds.sync_refunds.func(pid) == 0  # taken in once
    assert [(r["amount"], r["status"]) for r in rows] == [(500, "succeeded"), (300, "succeeded")]
    assert rows[0]["actor"] != "provider" and rows[1]["actor"] == "provider"
    assert rows[1]["provider_refund_id"] == outside["id"]
    # What remains is what the provider has not refunded.
    rest = await api.post(f"/v1/payments/{pid}/refunds", headers=auth(agent_key))
    assert rest.status_code == 202 and rest.json()["amount"] == 1200
    await run_jobs(pool)
    after = await fetch(api, agent_key, pid)
    assert (after["status"], after["amount_refunded"]) == ("refunded", 2000)
    assert sum(r["amount"] for r in provider_refunds(provider_base, intent_id)) == 2000
    async with pool.connection() as conn:
        await assert_ledger_sound(conn)
        cur = await conn.execute(
            "SELECT sum(amount) AS n FROM ledger_transactions t JOIN ledger_entries e"
            " ON e.transaction_id = t.id WHERE t.payment_id = %s AND t.kind = 'refund'"
            " AND e.amount > 0",
            (pid,),
        )
        assert (await cur.fetchone())["n"] == 2000  # every refund went back to its source


# --- the sandbox delivering to the API over HTTP -------------------------------------------


@pytest.fixture
def api_url(settings: Settings) -> Iterator[str]:
    """The API served over HTTP (on this test's database), for the sandbox to call."""
    port = server_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=15, what="the API to serve")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def subscribe(provider_base: str, api_url: str, events: list[str] | None = None) -> None:
    body: dict[str, Any] = {"url": f"{api_url}/v1/webhooks/stripe"}
    if events:
        body["enabled_events"] = events
    httpx.post(f"{provider_base}/_sandbox/webhooks", json=body).raise_for_status()


def deliveries_done(provider_base: str) -> list[dict[str, Any]]:
    state = httpx.get(f"{provider_base}/_sandbox/webhooks/deliveries").json()
    if state["pending"]:
        return []
    found: list[dict[str, Any]] = state["deliveries"]
    return found


async def test_the_same_event_delivered_five_times_has_one_effect(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, api_url: str
) -> None:
    subscribe(provider_base, api_url)
    httpx.post(
        f"{provider_base}/_sandbox/webhooks/config", json={"duplicates": 5}
    ).raise_for_status()
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "succeeded"

    delivered = wait_for(lambda: deliveries_done(provider_base), timeout=20, what="deliveries")
    event_ids = {d["event_id"] for d in delivered}
    assert len(event_ids) >= 2  # payment_intent.created and .succeeded at least
    assert len(delivered) == 5 * len(event_ids)
    assert all(d["ok"] and d["status_code"] == 200 for d in delivered)

    rows = await stored(pool)
    assert {r["id"] for r in rows} == event_ids
    assert all(r["payment_id"] == payment["id"] and r["handled"] for r in rows)
    # One reconcile from the charge step, at most one per distinct event: never one per
    # delivery.
    assert 1 <= await reconcile_jobs(pool, payment["id"]) <= 1 + len(event_ids)

    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"
    async with pool.connection() as conn:
        events = await payments.events(conn, payment["id"])
    assert [e["to_status"] for e in events if e["type"] in ("created", "transition")] == [
        "received",
        "priced",
        "approved",
        "charging",
        "succeeded",
        "reconciled",
    ]
    assert not [e for e in events if e["type"] == "reconcile_mismatch"]


async def test_succeeded_then_processing_leaves_the_payment_succeeded(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, api_url: str
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk", "charge"))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "succeeded"
    subscribe(provider_base, api_url, ["payment_intent.succeeded", "payment_intent.processing"])
    for type_ in ("payment_intent.succeeded", "payment_intent.processing"):
        httpx.post(
            f"{provider_base}/_sandbox/payment_intents/{payment['provider_payment_id']}/emit",
            json={"type": type_},
        ).raise_for_status()
    delivered = wait_for(lambda: deliveries_done(provider_base), timeout=20, what="deliveries")
    assert [d["event_type"] for d in delivered] == [
        "payment_intent.succeeded",
        "payment_intent.processing",
    ]
    assert all(d["ok"] for d in delivered)

    await run_jobs(pool)
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"
    async with pool.connection() as conn:
        events = await payments.events(conn, payment["id"])
    after_success = [e["to_status"] for e in events][
        [e["to_status"] for e in events].index("succeeded") :
    ]
    assert after_success == ["succeeded", "reconciled"]


async def test_a_late_processing_event_resolves_an_unknown_outcome_from_provider_truth(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, api_url: str
) -> None:
    """The charge step's answer never got committed (payment `charging`, intent succeeded);
    a `processing` event arrives: reconcile reads the intent and settles it succeeded."""
    created = await create(api, agent_key)
    await run_jobs(pool, ("pricing", "risk"))
    claimed = await charge.claim(created["id"])
    assert claimed is not None
    intent = await charge.call_provider(claimed)
    assert intent.status == "succeeded"
    async with pool.connection() as conn:
        # The charge job is gone (as if it failed for good): only the webhook drives it now.
        await conn.execute("DELETE FROM procrastinate_jobs WHERE task_name = 'charge'")

    subscribe(provider_base, api_url, ["payment_intent.processing"])
    httpx.post(
        f"{provider_base}/_sandbox/payment_intents/{intent.id}/emit",
        json={"type": "payment_intent.processing"},
    ).raise_for_status()

    async def reconcile_deferred() -> bool:
        return await reconcile_jobs(pool, created["id"]) == 1

    await async_wait_for(reconcile_deferred, timeout=20, what="the webhook to defer reconcile")
    await run_jobs(pool, ("reconcile",))
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    assert payment["provider_payment_id"] == intent.id
    found = httpx.get(
        f"{provider_base}/v1/payment_intents/search",
        params={"query": f"metadata['payment_id']:'{created['id']}'"},
        headers={"Authorization": "Bearer sk_test_x"},
    ).json()
    assert len(found["data"]) == 1


def _lost_dispute(payment: dict[str, Any], amount: int, event_id: str, kind: str) -> dict[str, Any]:
    dispute = {
        "id": "dp_test_overlap",
        "object": "dispute",
        "amount": amount,
        "currency": payment["currency"],
        "payment_intent": payment["provider_payment_id"],
        "reason": "fraudulent",
        "status": "lost",
    }
    return {**EVENT, "id": event_id, "type": kind, "data": {"object": dispute}}


async def _mismatches(pool: Pool, payment_id: str) -> list[tuple[str, Any, bool]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT field, actual, resolved_at IS NOT NULL AS resolved
                 FROM reconcile_mismatches WHERE payment_id = %s ORDER BY id""",
            (payment_id,),
        )
        return [(r["field"], r["actual"], r["resolved"]) for r in await cur.fetchall()]


async def _books(pool: Pool, payment_id: str) -> dict[str, int]:
    """A payment's ledger entries summed per account kind."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT a.kind, sum(e.amount) AS s FROM ledger_transactions t
                 JOIN ledger_entries e ON e.transaction_id = t.id
                 JOIN ledger_accounts a ON a.id = e.account_id
                WHERE t.payment_id = %s GROUP BY a.kind""",
            (payment_id,),
        )
        return {r["kind"]: int(r["s"]) for r in await cur.fetchall()}


@pytest.mark.parametrize("dispute_first", [False, True], ids=["refund-first", "dispute-first"])
async def test_a_lost_dispute_of_money_refunded_before_it_books_only_the_rest(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, dispute_first: bool
) -> None:
    """A Dashboard refund of 300, then the customer's bank wins a dispute of the whole charge.
    Stripe gives back the part refunded already (the dispute is `lost`, "partially won"):
    the platform lost the total less 300. The ledger booked the whole dispute on top of the
    refund, took 300 more out of provider clearing than the provider did, and told the
    operator the customer had got it twice (`reversed_excess`). Now the loss is the rest
    whichever the ledger learns first: the dispute's booking leaves the refunded part out,
    or a refund learned after the loss takes that part back out of `disputes_lost` (when
    the dispute's event is booked before the refund's sync ran: two webhooks close
    together, or a catch-up). Same books either way, no mismatch."""
    from tests.test_capture_refund import reconciled, refund_at_provider

    payment = await reconciled(api, agent_key, pool)
    total = payment["amount_total"]
    made = refund_at_provider(provider_base, payment["provider_payment_id"], 300)
    refund_event = {**EVENT, "id": "evt_test_refund", "type": "refund.created"}
    refund_event["data"] = {"object": made}
    closed = _lost_dispute(payment, total, "evt_test_overlap", "charge.dispute.closed")
    for event in (closed, refund_event) if dispute_first else (refund_event, closed):
        assert (await post_event(api, event)).status_code == 200
        await run_jobs(pool)
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["amount_refunded"]) == ("partially_refunded", 300)
    assert after["amount_lost_to_disputes"] == total - 300
    assert await _mismatches(pool, payment["id"]) == []
    books = await _books(pool, payment["id"])
    # Collected once and taken back once in all: provider clearing and fees are back at 0;
    # the refund's 300 went back to the budget, the rest is the dispute's loss.
    assert books.get("provider_clearing", 0) + books.get("platform_fees", 0) == 0
    assert books["disputes_lost"] == total - 300
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    [dispute] = [e["data"] for e in events if e["type"] == "dispute"]
    if dispute_first:
        assert (dispute.get("booked_loss"), dispute.get("returned_by_refunds")) == (total, None)
    else:
        assert (dispute["booked_loss"], dispute["returned_by_refunds"]) == (total - 300, 300)


async def test_a_dispute_lost_before_the_capture_is_booked_when_reconcile_captures(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """The dispute's last event (`charge.dispute.closed`, lost) came while the payment was
    `succeeded`, its reconcile not run yet: nothing to book it from, a `dispute_lost`
    mismatch saying a later event would book it — but no later event comes, and the loss
    was never booked (an operator following the runbook booked it by hand). Reconcile's
    capture books it now, once, and settles the mismatch."""
    from tasks.reconcile import reconcile_payment

    payment = await succeeded_without_its_reconcile(api, agent_key, pool)
    total = payment["amount_total"]
    closed = _lost_dispute(payment, total, "evt_test_last", "charge.dispute.closed")
    assert (await post_event(api, closed)).status_code == 200
    assert [(m[0], m[2]) for m in await _mismatches(pool, payment["id"])] == [
        ("dispute_lost", False)
    ]
    assert await reconcile_payment.func(payment["id"]) == "reconciled"
    assert [(m[0], m[2]) for m in await _mismatches(pool, payment["id"])] == [
        ("dispute_lost", True)
    ]
    books = await _books(pool, payment["id"])
    assert books["disputes_lost"] == total
    assert books.get("provider_clearing", 0) + books.get("platform_fees", 0) == 0
    # A later event of the dispute (a retry of the last, or a catch-up) books nothing more.
    again = _lost_dispute(payment, total, "evt_test_last_again", "charge.dispute.closed")
    assert (await post_event(api, again)).status_code == 200
    await run_jobs(pool)
    assert (await _books(pool, payment["id"]))["disputes_lost"] == total
    events = (
        await api.get(f"/v1/payments/{payment['id']}/events", headers=auth(agent_key))
    ).json()["data"]
    [resolved] = [e for e in events if e["type"] == "mismatch_resolved"]
    assert resolved["reason"] == "lost dispute booked in the ledger with the payment's capture"


async def test_refunds_learned_after_a_lost_dispute_each_take_their_part_back_from_it(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """A lost dispute of the whole charge booked, then two refunds made before it learned
    (300 and 200): each gives its part of the loss back, once, however often it is synced."""
    from tests.test_capture_refund import reconciled, refund_at_provider

    payment = await reconciled(api, agent_key, pool)
    total = payment["amount_total"]
    closed = _lost_dispute(payment, total, "evt_test_ex", "charge.dispute.closed")
    assert (await post_event(api, closed)).status_code == 200
    for n, amount in enumerate((300, 200)):
        made = refund_at_provider(provider_base, payment["provider_payment_id"], amount)
        event = {**EVENT, "id": f"evt_test_ex_refund_{n}", "type": "refund.created"}
        event["data"] = {"object": made}
        assert (await post_event(api, event)).status_code == 200
        await run_jobs(pool)
    async with pool.connection() as conn:
        await defer(conn, "sync_refunds", payment_id=payment["id"])  # once more: no change
    await run_jobs(pool)
    assert await _mismatches(pool, payment["id"]) == []
    books = await _books(pool, payment["id"])
    assert books["disputes_lost"] == total - 500
    assert books.get("provider_clearing", 0) + books.get("platform_fees", 0) == 0
    bookings = await _dispute_lost_bookings(pool, payment["id"])
    assert [amount for _, amount in bookings] == [total, -300, -200]
    assert (await fetch(api, agent_key, payment["id"]))["amount_lost_to_disputes"] == total - 500
    # The migration that added the column fills it from the postings the same way.
    migration = Path(__file__).resolve().parent.parent / "schema" / "migrations"
    sql = (migration / "0024_amount_lost_to_disputes.sql").read_text()
    backfill = sql[sql.index("UPDATE payment_jobs") : sql.index(";", sql.index("UPDATE"))]
    async with pool.connection() as conn:
        await conn.execute("UPDATE payment_jobs SET amount_lost_to_disputes = 0")
        await conn.execute(backfill)
    assert (await fetch(api, agent_key, payment["id"]))["amount_lost_to_disputes"] == total - 500


# --- a dispute made by the sandbox, end to end ------------------------------------------------


def provider_disputes(provider_base: str, intent_id: str) -> list[dict[str, Any]]:
    listed = httpx.get(
        f"{provider_base}/v1/disputes",
        params={"payment_intent": intent_id},
        headers={"Authorization": "Bearer sk_test_x"},
    )
    listed.raise_for_status()
    found: list[dict[str, Any]] = listed.json()["data"]
    return found


async def dispute_events(api: httpx.AsyncClient, key: str, payment_id: str) -> list[Any]:
    events = (await api.get(f"/v1/payments/{payment_id}/events", headers=auth(key))).json()
    return [e for e in events["data"] if e["type"] == "dispute"]


async def _dispute_lost_bookings(pool: Pool, payment_id: str) -> list[tuple[str, int]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT t.reference, e.amount FROM ledger_transactions t
                 JOIN ledger_entries e ON e.transaction_id = t.id
                 JOIN ledger_accounts a ON a.id = e.account_id
                WHERE t.payment_id = %s AND t.kind = 'dispute_lost'
                  AND a.kind = 'disputes_lost' ORDER BY t.created_at, t.id""",
            (payment_id,),
        )
        return [(r["reference"], int(r["amount"])) for r in await cur.fetchall()]


async def test_a_chargeback_from_the_provider_is_recorded_and_its_loss_booked_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, api_url: str
) -> None:
    """A payment with Stripe's disputing card through the whole pipeline: the provider
    disputes the charge and delivers the dispute's events over HTTP, each recorded in the
    payment's events; the dispute accepted at the provider (`/close`) comes back as
    `charge.dispute.closed`, lost, and the loss is booked once in `disputes_lost`; a refund
    asked for afterwards is refused by the provider (`charge_disputed`) and recorded failed,
    the books untouched."""
    subscribe(provider_base, api_url)
    created = await create(api, agent_key, payment_method="pm_card_createDispute")
    await run_jobs(pool)
    wait_for(lambda: deliveries_done(provider_base), timeout=20, what="deliveries")
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    total = payment["amount_total"]
    [dispute] = provider_disputes(provider_base, payment["provider_payment_id"])
    assert (dispute["amount"], dispute["status"]) == (total, "needs_response")
    opened = await dispute_events(api, agent_key, payment["id"])
    assert [e["reason"] for e in opened] == [
        "charge.dispute.created: needs_response (fraudulent)",
        "charge.dispute.funds_withdrawn: needs_response (fraudulent)",
    ]
    assert opened[0]["data"]["dispute"]["id"] == dispute["id"]
    assert await _dispute_lost_bookings(pool, payment["id"]) == []

    httpx.post(
        f"{provider_base}/v1/disputes/{dispute['id']}/close",
        headers={"Authorization": "Bearer sk_test_x"},
    ).raise_for_status()
    wait_for(
        lambda: any(
            d["event_type"] == "charge.dispute.closed" for d in deliveries_done(provider_base)
        ),
        timeout=20,
        what="the dispute's closing event to be delivered",
    )
    await run_jobs(pool)
    events = await dispute_events(api, agent_key, payment["id"])
    assert [(e["reason"], e["data"].get("booked_loss")) for e in events[2:]] == [
        ("charge.dispute.closed: lost (fraudulent)", total)
    ]
    assert await _dispute_lost_bookings(pool, payment["id"]) == [(dispute["id"], total)]
    books = await _books(pool, payment["id"])
    assert books.get("provider_clearing", 0) + books.get("platform_fees", 0) == 0
    assert (await fetch(api, agent_key, payment["id"]))["status"] == "reconciled"

    # The provider refuses to refund a charge lost to a dispute: so does the API, at once.
    asked = await api.post(
        f"/v1/payments/{payment['id']}/refunds", json={"amount": 500}, headers=auth(agent_key)
    )
    assert asked.status_code == 409, asked.text
    assert asked.json()["error"]["code"] == "charge_disputed"
    assert (await api.get(f"/v1/payments/{payment['id']}/refunds", headers=auth(agent_key))).json()[
        "data"
    ] == []
    after = await fetch(api, agent_key, payment["id"])
    assert (after["status"], after["amount_refunded"]) == ("reconciled", 0)
    assert after["amount_lost_to_disputes"] == total  # the agent sees it on the payment
    assert await _books(pool, payment["id"]) == books
    assert await _dispute_lost_bookings(pool, payment["id"]) == [(dispute["id"], total)]


async def test_a_loss_a_previous_release_left_waiting_is_booked_by_the_sweep(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispute lost before the capture, on a payment a release before this one then
    reconciled without booking it: the `dispute_lost` mismatch said reconcile would book
    it, but reconcile is over for that payment. The sweep of stuck requests books it."""
    from tasks import disputes
    from tasks.reconcile import reconcile_payment
    from workers.maintenance import sweep_stuck_requests

    payment = await succeeded_without_its_reconcile(api, agent_key, pool)
    total = payment["amount_total"]
    closed = _lost_dispute(payment, total, "evt_test_old_release", "charge.dispute.closed")
    assert (await post_event(api, closed)).status_code == 200

    async def previous_release(conn: Any, payment: Any) -> int:
        return 0

    monkeypatch.setattr(disputes, "book_waiting", previous_release)
    assert await reconcile_payment.func(payment["id"]) == "reconciled"
    monkeypatch.undo()
    assert (await _books(pool, payment["id"])).get("disputes_lost", 0) == 0
    assert await sweep_stuck_requests(pool, 0) == [payment["id"]]
    assert [(m[0], m[2]) for m in await _mismatches(pool, payment["id"])] == [
        ("dispute_lost", True)
    ]
    assert (await _books(pool, payment["id"]))["disputes_lost"] == total
    assert await sweep_stuck_requests(pool, 0) == []  # once


async def test_a_refund_of_a_charge_disputed_open_or_lost_is_refused_at_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """A refund of a disputed charge was taken (202), then failed at the provider
    (`charge_disputed`): the agent learned it only from the refund's outcome. While a dispute
    is open or once it is lost, the request is refused at once with the provider's code; an
    inquiry does not stop it, nor a dispute the merchant won — whatever order the events came
    in."""
    created = await create(api, agent_key)
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"

    def event(dispute_id: str, status: str) -> dict[str, Any]:
        dispute = {
            "id": dispute_id,
            "object": "dispute",
            "amount": 100,
            "currency": payment["currency"],
            "payment_intent": payment["provider_payment_id"],
            "reason": "fraudulent",
            "status": status,
        }
        kind = "charge.dispute.closed" if status in ("won", "lost") else "charge.dispute.created"
        return {
            **EVENT,
            "id": f"evt_test_{dispute_id}_{status}",
            "type": kind,
            "data": {"object": dispute},
        }

    async def refund() -> httpx.Response:
        return await api.post(
            f"/v1/payments/{payment['id']}/refunds", json={"amount": 10}, headers=auth(agent_key)
        )

    async def deliver(dispute_id: str, status: str) -> None:
        answer = await post_event(api, event(dispute_id, status))
        assert answer.status_code == 200 and answer.json()["payment_id"] == payment["id"]

    await deliver("dp_inquiry", "warning_needs_response")
    assert (await refund()).status_code == 202

    await deliver("dp_won", "under_review")
    refused = await refund()
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "charge_disputed"
    assert "dp_won is under_review" in refused.json()["error"]["message"]
    await deliver("dp_won", "won")
    assert (await refund()).status_code == 202

    # The loss delivered before the dispute's first event: it stays lost.
    await deliver("dp_lost", "lost")
    await deliver("dp_lost", "needs_response")
    refused = await refund()
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "charge_disputed"
    assert "dp_lost is lost" in refused.json()["error"]["message"]
    assert [
        r["amount"]
        for r in (
            await api.get(f"/v1/payments/{payment['id']}/refunds", headers=auth(agent_key))
        ).json()["data"]
    ] == [10, 10]
