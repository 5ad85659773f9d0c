"""Idempotency-Key with Stripe's semantics: replay, concurrent duplicates, conflicts,
per-agent scope, retention, and atomicity with the business write."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psycopg
import pytest

from api import idempotency
from tasks import agents
from tasks.db import Pool
from tests.conftest import auth

BODY = {"amount": 2500, "currency": "usd", "payment_method": "pm_card_visa"}


async def counts(pool: Pool) -> dict[str, int]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM payment_jobs) AS payments,
                      (SELECT count(*) FROM payment_events) AS events,
                      (SELECT count(*) FROM procrastinate_jobs) AS jobs,
                      (SELECT count(*) FROM idempotency_keys) AS keys"""
        )
        row = await cur.fetchone()
    assert row is not None
    return dict(row)


def post(api: httpx.AsyncClient, key: str, body: Any, idem: str | None) -> Any:
    headers = auth(key)
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return api.post("/v1/payments", json=body, headers=headers)


async def test_same_key_same_body_replays_the_stored_response(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    first = await post(api, agent_key, BODY, "order-1")
    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    # The same parameters in another order and spacing are the same request.
    again = await api.post(
        "/v1/payments",
        content=b'{"payment_method": "pm_card_visa",   "currency": "usd", "amount": 2500}',
        headers={
            **auth(agent_key),
            "Idempotency-Key": "order-1",
            "Content-Type": "application/json",
        },
    )
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    # So is the amount spelled as a whole float (validation reads 2500.0 as 2500).
    whole = await post(api, agent_key, {**BODY, "amount": 2500.0}, "order-1")
    assert whole.headers.get("Idempotent-Replayed") == "true", whole.text
    assert whole.content == first.content
    assert await counts(pool) == {"payments": 1, "events": 1, "jobs": 1, "keys": 1}
    # An empty body and an empty object ask the same (here: cancel with no reason).
    pid = first.json()["id"]
    cancel = await api.post(
        f"/v1/payments/{pid}/cancel", headers={**auth(agent_key), "Idempotency-Key": "c-1"}
    )
    assert cancel.status_code == 202
    empty_object = await api.post(
        f"/v1/payments/{pid}/cancel",
        json={},
        headers={**auth(agent_key), "Idempotency-Key": "c-1"},
    )
    assert empty_object.headers.get("Idempotent-Replayed") == "true", empty_object.text


async def test_twenty_concurrent_copies_create_one_payment_and_get_one_body(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    responses = await asyncio.gather(
        *(post(api, agent_key, BODY, "same-moment") for _ in range(20))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 19
    assert await counts(pool) == {"payments": 1, "events": 1, "jobs": 1, "keys": 1}


async def test_a_duplicate_of_a_request_still_running_is_told_busy_not_left_waiting(
    settings: Any, database_url: str, agent_key: str
) -> None:
    """The first request holds its key and does not finish (its API process hangs, or died
    out of the database's sight): a duplicate waits the lock timeout, then gets 409
    `idempotency_key_busy` with Retry-After — it used to wait as long as the first one
    held on, and duplicates piling up took every connection of the API's pool."""
    from api.app import API_SESSION, create_app
    from tasks.db import open_pool

    with psycopg.connect(database_url) as holder:
        agent_id = holder.execute(
            "SELECT agent_id FROM api_keys WHERE key_hash = %s", (agents.hash_key(agent_key),)
        ).fetchone()
        assert agent_id is not None
        holder.execute(
            "INSERT INTO idempotency_keys (agent_id, key, request_method, request_path,"
            " request_hash) VALUES (%s, 'held-key', 'POST', '/v1/payments', '\\x00')",
            (agent_id[0],),
        )
        async with open_pool(database_url, min_size=1, max_size=2, session=API_SESSION) as p:
            app = create_app(settings)
            app.state.pool = p
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as api:
                answer = await asyncio.wait_for(post(api, agent_key, BODY, "held-key"), 20)
                assert answer.status_code == 409, answer.text
                assert answer.json()["error"]["code"] == "idempotency_key_busy"
                assert answer.headers["Retry-After"] == "1"
        holder.rollback()


async def test_same_key_with_another_body_is_refused_and_changes_nothing(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    first = await post(api, agent_key, BODY, "order-2")
    assert first.status_code == 202
    before = await counts(pool)

    other = await post(api, agent_key, {**BODY, "amount": 2600}, "order-2")
    assert other.status_code == 409
    assert other.json()["error"] == {
        "type": "idempotency_error",
        "code": "idempotency_key_reused",
        "message": other.json()["error"]["message"],
        "param": "Idempotency-Key",
    }
    # The same key on another route is another request too.
    cancel = await api.post(
        f"/v1/payments/{first.json()['id']}/cancel",
        headers={**auth(agent_key), "Idempotency-Key": "order-2"},
    )
    assert cancel.status_code == 409
    assert await counts(pool) == before
    fetched = await api.get(f"/v1/payments/{first.json()['id']}", headers=auth(agent_key))
    assert fetched.json()["status"] == "received"


async def test_keys_are_scoped_per_agent(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    async with pool.connection() as conn, conn.transaction():
        _, other_key = await agents.create(conn, "agent-b")
    a = await post(api, agent_key, BODY, "shared-key")
    b = await post(api, other_key, BODY, "shared-key")
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    assert "Idempotent-Replayed" not in b.headers
    assert (await counts(pool))["payments"] == 2


async def test_without_a_key_every_post_creates_a_payment(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    for _ in range(2):
        assert (await post(api, agent_key, BODY, None)).status_code == 202
    assert await counts(pool) == {"payments": 2, "events": 2, "jobs": 2, "keys": 0}


async def test_a_failed_write_stores_no_key_and_a_retry_runs_afresh(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key row and the payment commit together: a crash between the payment insert and
    the end of the transaction leaves neither, and the retry is a first request."""
    import api.routes.payments as routes

    real_defer = routes.defer

    async def crash(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("connection lost in the middle of the transaction")

    monkeypatch.setattr(routes, "defer", crash)
    failed = await post(api, agent_key, BODY, "crash-1")
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "internal_error"
    assert "connection lost" not in failed.text
    assert await counts(pool) == {"payments": 0, "events": 0, "jobs": 0, "keys": 0}

    monkeypatch.setattr(routes, "defer", real_defer)
    retried = await post(api, agent_key, BODY, "crash-1")
    assert retried.status_code == 202
    assert "Idempotent-Replayed" not in retried.headers
    assert await counts(pool) == {"payments": 1, "events": 1, "jobs": 1, "keys": 1}


async def test_the_database_refuses_a_key_without_its_response(pool: Pool) -> None:
    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "agent-x")
    with pytest.raises(psycopg.errors.CheckViolation):
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO idempotency_keys
                       (agent_id, key, request_method, request_path, request_hash)
                   VALUES (%s, 'k', 'POST', '/v1/payments', '\\x00')""",
                (agent.id,),
            )
    assert (await counts(pool))["keys"] == 0


async def test_keys_are_kept_for_the_retention_then_pruned_and_reusable(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    old = await post(api, agent_key, BODY, "old-key")
    fresh = await post(api, agent_key, BODY, "fresh-key")
    assert old.status_code == fresh.status_code == 202
    async with pool.connection() as conn:
        await conn.execute(
            """UPDATE idempotency_keys SET created_at = now() - interval '25 hours'
               WHERE key = 'old-key'"""
        )
    # An expired key is used afresh, even with other parameters.
    reused = await post(api, agent_key, {**BODY, "amount": 999}, "old-key")
    assert reused.status_code == 202
    assert reused.json()["id"] != old.json()["id"]
    assert reused.json()["amount_subtotal"] is None  # a new, unpriced payment

    async with pool.connection() as conn:
        await conn.execute(
            """UPDATE idempotency_keys SET created_at = now() - interval '25 hours'
               WHERE key = 'old-key'"""
        )
        pruned = await idempotency.prune(conn, 24 * 3600)
        cur = await conn.execute("SELECT key FROM idempotency_keys ORDER BY key")
        left = [row["key"] for row in await cur.fetchall()]
    assert pruned == 1
    assert left == ["fresh-key"]
    replay = await post(api, agent_key, BODY, "fresh-key")
    assert replay.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve", "tab\tkey"])
async def test_malformed_keys_are_refused(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, key: str
) -> None:
    response = await api.post(
        "/v1/payments",
        json=BODY,
        headers={**auth(agent_key), "Idempotency-Key": key.encode()},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("parameter_invalid", "Idempotency-Key")
    # In docs/api.md's words, not as the pattern.
    assert error["message"] == (
        "Idempotency-Key: must be printable ASCII, no spaces, at most 255 characters "
        "(and not empty)"
    )
    assert (await counts(pool))["payments"] == 0


async def test_action_routes_replay_their_answers_including_refusals(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    created = (await post(api, agent_key, BODY, None)).json()
    path = f"/v1/payments/{created['id']}"
    headers = {**auth(agent_key), "Idempotency-Key": "capture-1"}
    # Capturing a payment that is not authorized is refused; the refusal is stored.
    refused = await api.post(f"{path}/capture", headers=headers)
    assert refused.status_code == 409
    again = await api.post(f"{path}/capture", headers=headers)
    assert again.status_code == 409 and again.content == refused.content
    assert again.headers["Idempotent-Replayed"] == "true"

    cancel = {**auth(agent_key), "Idempotency-Key": "cancel-1"}
    first = await api.post(f"{path}/cancel", json={"reason": "no longer needed"}, headers=cancel)
    assert first.status_code == 202 and first.json()["status"] == "canceled"
    events = await counts(pool)
    replay = await api.post(f"{path}/cancel", json={"reason": "no longer needed"}, headers=cancel)
    assert replay.status_code == 202 and replay.content == first.content
    assert replay.headers["Idempotent-Replayed"] == "true"
    # A retry without the key is a new request: the payment is already canceled.
    fresh = await api.post(f"{path}/cancel", headers=auth(agent_key))
    assert fresh.status_code == 409
    assert await counts(pool) == events


async def test_operator_decisions_and_steering_replay_their_answers(
    api: httpx.AsyncClient, agent_key: str, operator_key: str, pool: Pool
) -> None:
    """Review decisions and ops actions are POSTs like any other: a retry with the same key
    gets the first answer back and acts once."""
    from tests.conftest import run_jobs

    big = {**BODY, "amount": 150_000}  # above the default review threshold
    created = (await post(api, agent_key, big, "big-1")).json()
    await run_jobs(pool, ("pricing", "risk"))
    path = f"/v1/review/{created['id']}/approve"
    headers = {**auth(operator_key), "Idempotency-Key": "approve-1"}
    first = await api.post(path, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "approved"
    again = await api.post(path, headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    other = f"/v1/review/{created['id']}/reject"
    fresh = await api.post(other, headers={**auth(operator_key), "Idempotency-Key": "reject-1"})
    assert fresh.status_code == 409  # the opposite decision on a decided payment is refused
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM payment_events WHERE payment_id = %s"
            " AND to_status = 'approved'",
            (created["id"],),
        )
        assert await cur.fetchone() == {"n": 1}

    cancel = f"/v1/ops/payments/{created['id']}/cancel"
    headers = {**auth(operator_key), "Idempotency-Key": "ops-cancel-1"}
    first = await api.post(cancel, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "canceled"
    again = await api.post(cancel, headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content


async def test_a_block_declared_without_refusals_keeps_no_savepoint_and_stores_no_4xx(
    pool: Pool,
) -> None:
    """`transaction(may_refuse=False)` (the create-payment route): a 4xx raised there anyway
    is answered but not stored, and the whole block rolls back, key included, so a retry
    runs afresh; the default block stores and replays the same refusal."""
    from api.errors import ApiError

    async with pool.connection() as conn, conn.transaction():
        agent, _ = await agents.create(conn, "agent-refusals")

    def idem() -> idempotency.Idempotency:
        return idempotency.Idempotency(pool, agent, "k-1", b"h", "POST", "/x", 3600)

    with pytest.raises(ApiError):
        async with idem().transaction(may_refuse=False) as conn:
            await conn.execute("UPDATE agents SET name = 'renamed' WHERE id = %s", (agent.id,))
            raise ApiError(409, "conflict", "refused")
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT name FROM agents WHERE id = %s", (agent.id,))
        assert (await cur.fetchone()) == {"name": "agent-refusals"}
    assert (await counts(pool))["keys"] == 0

    with pytest.raises(ApiError):
        async with idem().transaction() as conn:
            raise ApiError(409, "conflict", "refused")
    assert (await counts(pool))["keys"] == 1
    with pytest.raises(idempotency.Replay) as replay:
        async with idem().transaction():
            pass
    assert replay.value.status == 409
