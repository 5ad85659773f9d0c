"""The backbone: POST → pricing → risk → charge → reconcile, one transaction per step."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from tasks import agents, charge, customers, payments, pricing, reconcile, risk
from tasks.db import Pool
from tests.conftest import async_wait_for, auth, run_jobs


async def create(api: httpx.AsyncClient, key: str, **body: Any) -> dict[str, Any]:
    body = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", **body}
    response = await api.post("/v1/payments", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def fetch(api: httpx.AsyncClient, key: str, payment_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/payments/{payment_id}", headers=auth(key))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def counts(pool: Pool) -> tuple[int, int, int]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM payment_jobs) AS p,
                      (SELECT count(*) FROM payment_events) AS e,
                      (SELECT count(*) FROM procrastinate_jobs) AS j"""
        )
        row = await cur.fetchone()
    assert row is not None
    return row["p"], row["e"], row["j"]


async def test_visa_payment_runs_the_whole_pipeline(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    created = await create(api, agent_key, metadata={"order": "42"})
    assert created["status"] == "received"
    assert created["id"].startswith("pay_")

    await run_jobs(pool)

    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "reconciled"
    assert payment["amount_total"] == 2000
    assert payment["provider_payment_id"].startswith("pi_")
    assert payment["failure"] is None
    assert payment["metadata"] == {"order": "42"}

    events = (await api.get(f"/v1/payments/{created['id']}/events", headers=auth(agent_key))).json()
    path = [(e["from_status"], e["to_status"]) for e in events["data"]]
    assert path == [
        (None, "received"),
        ("received", "priced"),
        ("priced", "approved"),
        ("approved", "charging"),
        ("charging", "succeeded"),
        ("succeeded", "reconciled"),
    ]
    assert [e["actor"] for e in events["data"]][1:] == [
        "worker:pricing",
        "worker:risk",
        "worker:charge",
        "worker:charge",
        "worker:reconcile",
    ]

    intent = httpx.get(
        f"{provider_base}/v1/payment_intents/{payment['provider_payment_id']}",
        headers={"Authorization": "Bearer sk_test_x"},
    ).json()
    assert intent["status"] == "succeeded"
    assert intent["metadata"] == {"payment_id": created["id"], "agent_id": created["agent_id"]}


async def test_a_payment_names_the_customer_its_saved_card_belongs_to(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """Stripe refuses a payment method attached to a Customer without that Customer (and one
    used without a Customer cannot be used again): the payment carries `customer` to the
    PaymentIntent it creates. Anything but a Customer id is refused before it is recorded."""
    async with pool.connection() as conn, conn.transaction():
        agent = await conn.execute("SELECT id FROM agents WHERE name = 'agent-a'")
        row = await agent.fetchone()
        assert row is not None
        await customers.bind(conn, "cus_Saved42", row["id"], actor="operator:test")
    created = await create(api, agent_key, customer="cus_Saved42")
    assert created["customer"] == "cus_Saved42"
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert (payment["status"], payment["customer"]) == ("reconciled", "cus_Saved42")
    intent = httpx.get(
        f"{provider_base}/v1/payment_intents/{payment['provider_payment_id']}",
        headers={"Authorization": "Bearer sk_test_x"},
    ).json()
    assert intent["customer"] == "cus_Saved42"
    plain = await create(api, agent_key)
    assert plain["customer"] is None
    for bad in ("pm_card_visa", "cus_", "cus_a b", 42):
        refused = await api.post(
            "/v1/payments",
            json={
                "amount": 2000,
                "currency": "usd",
                "payment_method": "pm_card_visa",
                "customer": bad,
            },
            headers=auth(agent_key),
        )
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["param"] == "customer"


@pytest.mark.parametrize(
    ("card", "code"),
    [
        ("pm_card_chargeDeclined", "card_declined"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
async def test_declined_card_fails_with_the_provider_code(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str, card: str, code: str
) -> None:
    created = await create(api, agent_key, payment_method=card)
    await run_jobs(pool)
    payment = await fetch(api, agent_key, created["id"])
    assert payment["status"] == "failed"
    assert payment["failure"]["code"] == code
    assert payment["failure"]["message"]


async def test_rerunning_any_step_on_an_advanced_payment_changes_nothing(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    created = await create(api, agent_key)
    await run_jobs(pool)
    before_counts = await counts(pool)
    async with pool.connection() as conn:
        before = await payments.get(conn, created["id"])
    assert before is not None and before["status"] == "reconciled"

    for step in (pricing.advance, risk.advance):
        async with pool.connection() as conn, conn.transaction():
            assert await step(conn, created["id"]) is None
    assert await charge.charge_payment(created["id"]) is None
    assert await reconcile.reconcile_payment(created["id"]) is None

    async with pool.connection() as conn:
        after = await payments.get(conn, created["id"])
    assert after == before
    assert await counts(pool) == before_counts


async def test_running_each_job_twice_advances_the_payment_once(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, provider_base: str
) -> None:
    """At-least-once delivery: every job of the pipeline delivered twice."""
    created = await create(api, agent_key)
    pid = created["id"]
    async with pool.connection() as conn, conn.transaction():
        assert await pricing.advance(conn, pid) == "priced"
    async with pool.connection() as conn, conn.transaction():
        assert await pricing.advance(conn, pid) is None
        assert await risk.advance(conn, pid) == "approved"
    async with pool.connection() as conn, conn.transaction():
        assert await risk.advance(conn, pid) is None
    assert await charge.charge_payment(pid) == "succeeded"
    assert await charge.charge_payment(pid) is None
    assert await reconcile.reconcile_payment(pid) == "reconciled"
    assert await reconcile.reconcile_payment(pid) is None

    async with pool.connection() as conn:
        events = await payments.events(conn, pid)
    assert [e["to_status"] for e in events] == [
        "received",
        "priced",
        "approved",
        "charging",
        "succeeded",
        "reconciled",
    ]
    intents = httpx.get(
        f"{provider_base}/v1/payment_intents/search",
        params={"query": f"metadata['payment_id']:'{pid}'"},
        headers={"Authorization": "Bearer sk_test_x"},
    ).json()
    assert len(intents["data"]) == 1


async def test_the_database_refuses_illegal_transitions_from_raw_sql(
    api: httpx.AsyncClient, agent_key: str, database_url: str
) -> None:
    created = await create(api, agent_key)
    with psycopg.connect(database_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="illegal payment transition"):
            conn.execute(
                "UPDATE payment_jobs SET status = 'succeeded' WHERE id = %s", (created["id"],)
            )
        with pytest.raises(psycopg.errors.CheckViolation, match="starts in state received"):
            conn.execute(
                """INSERT INTO payment_jobs (id, agent_id, status, currency, payment_method,
                                             amount_requested)
                   VALUES ('pay_x', %s, 'reconciled', 'usd', 'pm_card_visa', 100)""",
                (created["agent_id"],),
            )
        # A legal move from raw SQL is recorded, attributed to the database user.
        conn.execute("UPDATE payment_jobs SET status = 'canceled' WHERE id = %s", (created["id"],))
        row = conn.execute(
            """SELECT from_status, to_status, actor FROM payment_events
               WHERE payment_id = %s ORDER BY id DESC LIMIT 1""",
            (created["id"],),
        ).fetchone()
        assert row is not None
        assert row[:2] == ("received", "canceled")
        assert row[2].startswith("db:")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM payment_events WHERE payment_id = %s", (created["id"],))


async def test_no_job_without_its_payment_and_no_payment_without_its_job(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import payments as route

    async def failing_defer(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("the queue refused the job")

    monkeypatch.setattr(route, "defer", failing_defer)
    response = await api.post(
        "/v1/payments",
        json={"amount": 100, "currency": "usd", "payment_method": "pm_card_visa"},
        headers=auth(agent_key),
    )
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "api_error"
    assert await counts(pool) == (0, 0, 0)
    monkeypatch.undo()

    async def failing_insert(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.errors.CheckViolation("the insert failed")

    monkeypatch.setattr(route.payments, "insert", failing_insert)
    response = await api.post(
        "/v1/payments",
        json={"amount": 100, "currency": "usd", "payment_method": "pm_card_visa"},
        headers=auth(agent_key),
    )
    assert response.status_code == 500
    assert await counts(pool) == (0, 0, 0)


async def test_a_rolled_back_step_leaves_no_transition_and_no_next_job(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = await create(api, agent_key)
    before = await counts(pool)
    with pytest.raises(RuntimeError):
        async with pool.connection() as conn, conn.transaction():
            assert await pricing.advance(conn, created["id"]) == "priced"
            raise RuntimeError("crash before commit")
    assert await counts(pool) == before
    async with pool.connection() as conn:
        payment = await payments.get(conn, created["id"])
    assert payment is not None and payment["status"] == "received"


async def charging_payment(pool: Pool, agent_name: str) -> payments.Payment:
    """A payment driven to `charging`, as the roles would leave it for the provider call."""
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, agent_name)
        payment = await payments.insert(
            conn, agent_id=agent.id, currency="usd", payment_method="pm_card_visa", amount=500
        )
        for to in ("priced", "approved", "charging"):
            await payments.transition(conn, payment, to, actor="test")
    return payment


async def test_the_provider_id_is_stored_once(pool: Pool) -> None:
    """A re-run that got another id (it cannot, with a stable key, but the code must not
    care) never replaces the stored one."""
    payment = await charging_payment(pool, "agent-store-id")
    async with pool.connection() as conn:
        first = await payments.store_provider_id(conn, payment["id"], "pi_first")
        second = await payments.store_provider_id(conn, payment["id"], "pi_second")
        assert first == second == ("pi_first", True)
        stored = await payments.get(conn, payment["id"])
    assert stored is not None and stored["provider_payment_id"] == "pi_first"
    # A payment not being charged takes no id: one whose cancel was asked for first.
    other = await charging_payment(pool, "agent-store-canceling")
    async with pool.connection() as conn:
        await payments.update(conn, other["id"], cancel_requested_at=datetime.now(UTC))
        assert await payments.store_provider_id(conn, other["id"], "pi_late") == (None, False)
        assert (await payments.get(conn, other["id"]) or {}).get("provider_payment_id") is None


async def test_storing_the_provider_id_while_another_stores_one_returns_the_other(
    pool: Pool,
) -> None:
    """Reconcile stores an id in its transaction; the charge job's store waits for it and,
    once it commits, returns that id — not a stale read of the row without one."""
    payment = await charging_payment(pool, "agent-store-race")
    async with pool.connection() as first, pool.connection() as second:
        async with first.transaction():
            await first.execute(
                "UPDATE payment_jobs SET provider_payment_id = 'pi_found' WHERE id = %s",
                (payment["id"],),
            )
            waiting = asyncio.create_task(
                payments.store_provider_id(second, payment["id"], "pi_created")
            )

            async def blocked() -> bool:
                cur = await first.execute(
                    "SELECT count(*) AS n FROM pg_locks"
                    " WHERE NOT granted AND locktype = 'transactionid'"
                )
                row = await cur.fetchone()
                return bool(row and row["n"])

            await async_wait_for(blocked, what="the second store to wait for the lock")
        assert await asyncio.wait_for(waiting, 10) == ("pi_found", True)


async def test_defer_writes_the_job_procrastinate_would(pool: Pool) -> None:
    """`tasks.app.defer` runs procrastinate's own query: the task's queue and name, its
    arguments, and with `schedule_in` a start time that far ahead; only if the caller
    commits."""
    from tasks.app import defer

    async with pool.connection() as conn, conn.transaction():
        await defer(conn, "capture", payment_id="pay_x")
        await defer(conn, "reconcile", payment_id="pay_y", schedule_in=60)
    with pytest.raises(RuntimeError):
        async with pool.connection() as conn, conn.transaction():
            await defer(conn, "risk", payment_id="pay_z")
            raise RuntimeError("rolled back")
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT queue_name, task_name, args, status, priority,
                      extract(epoch FROM scheduled_at - now()) AS due_in
               FROM procrastinate_jobs ORDER BY id"""
        )
        rows = await cur.fetchall()
    assert [(r["queue_name"], r["task_name"], r["args"], r["status"]) for r in rows] == [
        ("charge", "capture", {"payment_id": "pay_x"}, "todo"),
        ("reconcile", "reconcile", {"payment_id": "pay_y"}, "todo"),
    ]
    assert rows[0]["due_in"] is None and rows[0]["priority"] == 0
    assert 55 < rows[1]["due_in"] <= 60
