"""What an API of an older release leaves undone of a lost dispute during a rolling deploy (the
new migrations in, the old API still serving webhooks), done by the next maintenance round of
the new release (workers/maintenance.py, `repair_dispute_losses`): a loss whose event was
stored without being booked (a release before 0020) is booked, and `amount_lost_to_disputes`
a release before 0024 left behind its ledger postings is set to what they say."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from psycopg.types.json import Jsonb

from tasks import disputes, ledger, payments
from tasks.db import Pool
from tasks.reconcile import reconcile_payment
from tasks.settings import Settings
from tests.conftest import auth
from tests.test_capture_refund import reconciled
from tests.test_pipeline import fetch
from tests.test_webhooks import (
    _books,
    _dispute_lost_bookings,
    _lost_dispute,
    _mismatches,
    post_event,
    succeeded_without_its_reconcile,
)
from workers.maintenance import Maintenance


async def maintenance_round(pool: Pool, settings: Settings) -> None:
    """One maintenance round of a process that just started (what it runs once a period
    is due)."""
    from tasks.app import app

    assert await Maintenance(app, pool, settings).run_once()


async def old_api_stores(pool: Pool, payment: dict[str, Any], event: dict[str, Any]) -> None:
    """What the webhook receiver of a release before 0020 did with a dispute's event: stored
    it, handled, about its payment, and recorded it in the payment's events — nothing
    booked."""
    dispute = event["data"]["object"]
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO webhook_events (id, type, provider_object_id, payment_id, livemode,
                                           payload, handled)
               VALUES (%s, %s, %s, %s, false, %s, true)""",
            (event["id"], event["type"], dispute["payment_intent"], payment["id"], Jsonb(event)),
        )
        locked = await payments.lock(conn, payment["id"])
        assert locked is not None
        await payments.record_event(
            conn,
            locked,
            "dispute",
            actor="provider",
            reason=f"{event['type']}: {dispute['status']} ({dispute['reason']})",
            data={"event_id": event["id"], "event_type": event["type"], "dispute": dispute},
        )


async def events_of(api: httpx.AsyncClient, key: str, payment_id: str) -> list[dict[str, Any]]:
    answer = await api.get(f"/v1/payments/{payment_id}/events", headers=auth(key))
    return list(answer.json()["data"])


async def test_a_loss_an_old_api_stored_without_booking_is_booked_by_maintenance(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release before 0020 stored `charge.dispute.updated` and then `.closed`, both `lost`,
    as handled and booked nothing; the catch-up skips events stored already, so provider
    clearing kept counting money the provider took back, for good. Maintenance books it,
    once, as the event would be now: in the ledger, on the payment, in a `dispute` event
    saying what was lost. A dispute the API of this release booked is left alone, and a
    second round changes nothing."""
    payment = await reconciled(api, agent_key, pool)
    total = payment["amount_total"]
    for n, kind in enumerate(["charge.dispute.updated", "charge.dispute.closed"]):
        await old_api_stores(pool, payment, _lost_dispute(payment, total, f"evt_old_{n}", kind))
    # Another payment, whose lost dispute the API of this release booked.
    handled = await reconciled(api, agent_key, pool)
    event = _lost_dispute(handled, handled["amount_total"], "evt_new", "charge.dispute.closed")
    event["data"]["object"]["id"] = "dp_test_new"
    assert (await post_event(api, event)).status_code == 200
    handled_events = await events_of(api, agent_key, handled["id"])

    with caplog.at_level(logging.WARNING, logger="agentpay.maintenance"):
        await maintenance_round(pool, settings)
    [logged] = [r for r in caplog.records if "booked by maintenance" in r.getMessage()]
    assert "dp_test_overlap" in logged.getMessage() and payment["id"] in logged.getMessage()

    assert await _dispute_lost_bookings(pool, payment["id"]) == [("dp_test_overlap", total)]
    books = await _books(pool, payment["id"])
    assert books.get("provider_clearing", 0) + books.get("platform_fees", 0) == 0
    assert (await fetch(api, agent_key, payment["id"]))["amount_lost_to_disputes"] == total
    assert await _mismatches(pool, payment["id"]) == []
    events = await events_of(api, agent_key, payment["id"])
    dispute_events = [e for e in events if e["type"] == "dispute"]
    assert [e["data"].get("booked_loss") for e in dispute_events] == [None, None, total]
    assert dispute_events[-1]["data"]["event_id"] == "evt_old_0"  # the first saying lost
    assert dispute_events[-1]["data"]["booked_by"] == "maintenance"

    # Once: the next round finds nothing, books and records nothing.
    await maintenance_round(pool, settings)
    assert await _dispute_lost_bookings(pool, payment["id"]) == [("dp_test_overlap", total)]
    assert await events_of(api, agent_key, payment["id"]) == events
    assert await events_of(api, agent_key, handled["id"]) == handled_events
    assert await _dispute_lost_bookings(pool, handled["id"]) == [
        ("dp_test_new", handled["amount_total"])
    ]


async def test_a_loss_an_old_api_stored_before_the_capture_waits_for_it_as_now(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, settings: Settings
) -> None:
    """The old API stored the lost dispute of a payment not reconciled yet: nothing to book
    it from. Maintenance does what the event does now — a `dispute_lost` mismatch, once,
    however many rounds — and reconcile's capture books it."""
    payment = await succeeded_without_its_reconcile(api, agent_key, pool)
    total = payment["amount_total"]
    await old_api_stores(
        pool, payment, _lost_dispute(payment, total, "evt_old_early", "charge.dispute.closed")
    )
    for _ in range(2):
        await maintenance_round(pool, settings)
    assert [(m[0], m[2]) for m in await _mismatches(pool, payment["id"])] == [
        ("dispute_lost", False)
    ]
    assert await reconcile_payment.func(payment["id"]) == "reconciled"
    assert await _dispute_lost_bookings(pool, payment["id"]) == [("dp_test_overlap", total)]
    assert [(m[0], m[2]) for m in await _mismatches(pool, payment["id"])] == [
        ("dispute_lost", True)
    ]
    await maintenance_round(pool, settings)
    assert await _dispute_lost_bookings(pool, payment["id"]) == [("dp_test_overlap", total)]
    assert (await fetch(api, agent_key, payment["id"]))["amount_lost_to_disputes"] == total


async def test_amount_lost_to_disputes_an_old_api_left_at_0_is_set_from_the_ledger(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release with 0020 but not 0024 booked the loss in the ledger and left the payment's
    `amount_lost_to_disputes` (0024 filled it once, from the postings made by then) at 0 for
    good: the agent read that nothing was lost. Maintenance sets it from the postings."""
    payment = await reconciled(api, agent_key, pool)
    total = payment["amount_total"]
    async with pool.connection() as conn, conn.transaction():
        locked = await payments.lock(conn, payment["id"])
        assert locked is not None
        loss = await ledger.post_dispute_loss(
            conn, locked, dispute_id="dp_test_old", amount=total, currency=payment["currency"]
        )
        assert loss.booked == total
    right = await reconciled(api, agent_key, pool)  # nothing lost: nothing to set
    assert (await fetch(api, agent_key, payment["id"]))["amount_lost_to_disputes"] == 0

    with caplog.at_level(logging.WARNING, logger="agentpay.maintenance"):
        await maintenance_round(pool, settings)
    assert any(
        payment["id"] in r.getMessage() and "amount_lost_to_disputes" in r.getMessage()
        for r in caplog.records
    )
    assert (await fetch(api, agent_key, payment["id"]))["amount_lost_to_disputes"] == total
    assert (await fetch(api, agent_key, right["id"]))["amount_lost_to_disputes"] == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agentpay.maintenance"):
        await maintenance_round(pool, settings)  # once
    assert not any("amount_lost_to_disputes" in r.getMessage() for r in caplog.records)


async def test_maintenance_repairs_once_a_sweep_period_not_every_round(
    pool: Pool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.app import app
    from workers import maintenance as module

    rounds: list[None] = []

    async def counted(pool: Pool) -> list[str]:
        rounds.append(None)
        return []

    monkeypatch.setattr(module, "repair_dispute_losses", counted)
    every = Maintenance(app, pool, settings.model_copy(update={"sweep_after_seconds": 600.0}))
    for _ in range(3):
        assert await every.run_once()
    assert len(rounds) == 1


async def test_the_look_for_missed_losses_reads_the_index_of_lost_disputes(pool: Pool) -> None:
    """Webhook events are kept 30 days, and lost disputes are a few of them: the look reads
    the partial index of 0028, not the table."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        cur = await conn.execute(
            disputes.sql.SQL("EXPLAIN SELECT w.id FROM webhook_events w WHERE {}").format(
                disputes._NOT_DEALT_WITH
            ),
            {},  # (its `%%` stands for `%` when it has parameters, as where it is used)
        )
        plan = "\n".join(row["QUERY PLAN"] for row in await cur.fetchall())
    assert "webhook_events_lost_disputes_idx" in plan, plan
