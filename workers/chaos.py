"""`agentpay chaos`: run the dev stack, send a mix of payments while killing workers, restarting
Postgres and making the provider fail, then check that no money went wrong.

The faults: a random worker process is SIGKILLed every few seconds (the stack starts it again,
as a process manager would), Postgres is stopped and started once, and the sandbox fails 10%
of requests (a failed call with an idempotency key keeps failing under that key, as Stripe
replays a saved 500) and loses 5% of responses after they took effect. A few payments are
disputed by the customer's bank (Stripe's disputing test card), and the run accepts each
dispute at the provider once the payment is reconciled. Then the faults stop, the fleet
drains, and every invariant is checked and printed with its count.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from api.models import wait_is_over
from tasks import ledger, payments
from tasks.db import Pool, open_pool
from tasks.settings import Settings
from workers.devstack import DevStack, new_agent_keys

# Timings that let the fleet heal within a short run.
CHAOS_ENV = {
    "AGENTPAY_HEARTBEAT_SECONDS": "1",
    "AGENTPAY_SHUTDOWN_GRACE_SECONDS": "4",
    "AGENTPAY_STALLED_AFTER_SECONDS": "8",
    "AGENTPAY_MAINTENANCE_INTERVAL_SECONDS": "1",
    "AGENTPAY_POLL_INTERVAL_SECONDS": "1",
    "AGENTPAY_SWEEP_AFTER_SECONDS": "15",
    # A dispute event whose webhook the provider gave up on (the API's database was down for
    # all its tries) is taken in from the provider's event list within the run.
    "AGENTPAY_EVENT_CATCH_UP_INTERVAL_SECONDS": "10",
}

# scenario → (share of the mix, the state the payment must end in)
SCENARIOS: dict[str, tuple[int, str]] = {
    "visa": (40, "reconciled"),
    "declined": (10, "failed"),
    "capture": (10, "reconciled"),
    "release": (8, "canceled"),
    "hold": (4, "authorized"),
    "refund_full": (10, "refunded"),
    "refund_partial": (10, "partially_refunded"),
    "cancel_early": (8, "canceled"),
    "review_approve": (5, "reconciled"),
    "review_wait": (3, "in_review"),
    "dispute_lost": (4, "reconciled"),
}
# The sandbox's faults (docs/reliability.md). A failed call with an idempotency key is saved
# under it and replayed to its retries, as Stripe does with a 500 met once the call began
# (`error_saved`): the harder case.
FAULTS = {"error_rate": 0.10, "error_saved": True, "lose_response_rate": 0.05}
# Fewer provider requests than this under the faults, and a run has 1% odds or more that
# none fires: too few to tell faults that did not fire from faults that were never set.
ENOUGH_REQUESTS = math.ceil(
    math.log(0.01) / math.log(1 - FAULTS["error_rate"] - FAULTS["lose_response_rate"])
)
LONG_POLL_SECONDS = 30
REVIEW_AMOUNT = 150_000  # above the default review threshold (AGENTPAY_RISK_REVIEW_ABOVE)

PAYMENT_METHOD = {"declined": "pm_card_chargeDeclined", "dispute_lost": "pm_card_createDispute"}
# The run's requests to the provider itself (the sandbox takes any test key).
PROVIDER_AUTH = {"Authorization": "Bearer sk_test_chaos"}
MANUAL = {"capture", "release", "hold"}
SUCCEEDED_STATES = {"succeeded", "reconciled", "partially_refunded", "refunded"}
# Those past reconcile, which posted the capture to the ledger.
CAPTURED_STATES = SUCCEEDED_STATES - {"succeeded"}
# Payment states in which its total is held on the agent's holds account (risk took it).
HELD_STATES = {"approved", "in_review", "charging", "requires_action", "authorized", "succeeded"}
# PaymentIntent states in which the provider took or holds the customer's money.
MONEY_MOVED = {"succeeded", "requires_capture", "processing"}


@dataclass
class Check:
    name: str
    count: int
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Tracked:
    scenario: str
    id: str | None = None
    error: str | None = None
    too_late: bool = False  # a cancel_early that came after the charge
    # cancel_early: seconds between the POST and the cancel, so that cancels land in every
    # state up to the charge (`charging` included) and some after it.
    cancel_after: float = 0.0
    while_charging: bool = False  # a cancel_early the API took while the charge was under way
    dispute_accepted: bool = False  # a dispute_lost whose dispute the run closed (lost)


class Api:
    """HTTP with retries: the chaos run restarts the database under the API."""

    def __init__(self, base_url: str) -> None:
        # Longer than a long-poll (LONG_POLL_SECONDS) takes when nothing happens.
        self.client = httpx.AsyncClient(base_url=base_url, timeout=LONG_POLL_SECONDS + 15)

    async def call(
        self,
        method: str,
        path: str,
        key: str,
        *,
        json: Any = None,
        idempotency_key: str | None = None,
        within: float = 120,
    ) -> tuple[int, dict[str, Any]]:
        """(status, body) of the first answer that is not a 5xx or 429, tried for `within`
        seconds."""
        headers = {"Authorization": f"Bearer {key}"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        delay = 0.2
        deadline = time.monotonic() + within
        last = ""
        while True:
            try:
                response = await self.client.request(method, path, json=json, headers=headers)
                if response.status_code < 500 and response.status_code != 429:
                    return response.status_code, response.json()
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError as error:
                last = repr(error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path} kept failing: {last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    async def close(self) -> None:
        await self.client.aclose()


async def _wait_status(api: Api, key: str, payment_id: str, wanted: set[str], within: float) -> str:
    """Long-poll the payment until it is in one of `wanted` or past it, as the server
    decides (`wait_is_over`), or `within` seconds passed; its state then."""
    deadline = time.monotonic() + within
    query = "&".join(f"status={w}" for w in sorted(wanted))
    while True:
        _, payment = await api.call(
            "GET",
            f"/v1/payments/{payment_id}/wait?timeout={LONG_POLL_SECONDS}&{query}",
            key,
            within=max(1.0, deadline - time.monotonic()),
        )
        over = wait_is_over(payment["status"], payment.get("pending_action"), wanted)
        if over or time.monotonic() > deadline:
            return str(payment["status"])


async def _play(
    api: Api,
    provider: httpx.AsyncClient,
    key: str,
    operator_key: str,
    tracked: Tracked,
    n: int,
    run: str,
    within: float,
) -> None:
    """One payment's scenario: create it, then act on it as an agent (or operator) would.
    Its idempotency keys carry the run's id: the operator's are kept a day, and a run on a
    database an earlier run used must not meet them."""
    s = tracked.scenario
    tag = f"chaos-{run}-{n}"
    amount = REVIEW_AMOUNT if s.startswith("review") else 1000 + n * 10
    body = {
        "amount": amount,
        "currency": "usd",
        "payment_method": PAYMENT_METHOD.get(s, "pm_card_visa"),
        "capture_method": "manual" if s in MANUAL else "automatic",
        "metadata": {"chaos": s},
    }
    code, payment = await api.call("POST", "/v1/payments", key, json=body, idempotency_key=tag)
    if code != 202:
        raise RuntimeError(f"create refused: {code} {payment}")
    pid = tracked.id = payment["id"]
    if s == "cancel_early":
        await asyncio.sleep(tracked.cancel_after)
        code, answer = await api.call(
            "POST", f"/v1/payments/{pid}/cancel", key, idempotency_key=f"{tag}-c"
        )
        if code == 409 and answer.get("error", {}).get("code") == "payment_unexpected_state":
            # Too late to cancel (already charged): an agent's fair outcome.
            tracked.scenario = "visa"
            tracked.too_late = True
        elif code >= 400:
            raise RuntimeError(f"cancel refused: {code} {answer}")
        elif answer["status"] == "charging":
            # Asked while the charge was under way: the provider settles it, by whichever
            # it did first, the confirm or the cancel.
            tracked.while_charging = True
            ended = await _wait_status(api, key, pid, {"canceled", "succeeded", "failed"}, within)
            if ended != "canceled":
                tracked.scenario = "visa"
                tracked.too_late = True
    elif s in ("capture", "release"):
        if await _wait_status(api, key, pid, {"authorized", "failed"}, within) == "authorized":
            action = "capture" if s == "capture" else "cancel"
            await _act(api, key, f"/v1/payments/{pid}/{action}", f"{tag}-a")
    elif s == "review_approve":
        if await _wait_status(api, key, pid, {"in_review"}, within) == "in_review":
            await _act(api, operator_key, f"/v1/review/{pid}/approve", f"{tag}-v")
    elif s in ("refund_full", "refund_partial"):
        if await _wait_status(api, key, pid, {"reconciled", "failed"}, within) == "reconciled":
            refund = amount if s == "refund_full" else amount // 2
            await _act(api, key, f"/v1/payments/{pid}/refunds", f"{tag}-r", {"amount": refund})
    elif s == "dispute_lost":
        # The customer's bank disputed the charge; once the payment is reconciled the
        # merchant accepts the dispute at the provider (the Dashboard's "accept").
        if await _wait_status(api, key, pid, {"reconciled", "failed"}, within) == "reconciled":
            _, paid = await api.call("GET", f"/v1/payments/{pid}", key)
            await _accept_dispute(provider, str(paid["provider_payment_id"]), within)
            tracked.dispute_accepted = True


async def _accept_dispute(provider: httpx.AsyncClient, intent_id: str, within: float) -> None:
    """Close (accept: `lost`) the dispute of the intent at the provider, through its faults:
    read the dispute, close it unless it is lost already, and read again — a close whose
    answer was lost may have closed it, and a failed one did nothing."""
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        try:
            listed = await provider.get(
                "/v1/disputes", params={"payment_intent": intent_id}, headers=PROVIDER_AUTH
            )
            if listed.status_code == 200:
                found = listed.json()["data"]
                if not found:
                    raise RuntimeError(f"no dispute of {intent_id} at the provider")
                if found[0]["status"] == "lost":
                    return
                closed = await provider.post(
                    f"/v1/disputes/{found[0]['id']}/close", headers=PROVIDER_AUTH
                )
                last = f"close: {closed.status_code} {closed.text[:200]}"
                if closed.status_code == 200:
                    return
            else:
                last = f"list: {listed.status_code} {listed.text[:200]}"
        except httpx.TransportError as error:
            last = repr(error)
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the dispute of {intent_id} was not closed: {last}")


async def _act(api: Api, key: str, path: str, idempotency_key: str, json: Any = None) -> None:
    code, body = await api.call("POST", path, key, json=json, idempotency_key=idempotency_key)
    if code >= 400:
        raise RuntimeError(f"POST {path} refused: {code} {body}")


class Killer(threading.Thread):
    """SIGKILLs a random worker every few seconds until stopped."""

    def __init__(self, stack: DevStack, every: tuple[float, float], seed: int) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.stack = stack
        self.every = every
        self.rng = random.Random(seed)
        self.kills = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        import signal

        while not self.stopped.wait(self.rng.uniform(*self.every)):
            victims = [w for w in self.stack.workers() if w.alive()]
            if victims:
                self.rng.choice(victims).signal(signal.SIGKILL)
                self.kills += 1


def run_chaos(
    settings: Settings,
    *,
    payments: int,
    seconds: float,
    console: Console,
    seed: int = 1,
    workers_per_role: int = 2,
) -> bool:
    # A stack of its own in <data-dir>/chaos (it restarts its Postgres), with its own
    # operator and agent: a `dev` stack running in the data directory is left alone, and so
    # are its keys on a shared DATABASE_URL (though two fleets on one database share queues).
    settings = settings.model_copy(update={"data_dir": settings.data_dir / "chaos"})
    stack = DevStack(
        settings, port=0, workers_per_role=workers_per_role, env=CHAOS_ENV, name="chaos"
    )
    try:
        with console.status("Starting the stack…"):
            info = stack.start()
        checks = asyncio.run(_run(stack, info, payments, seconds, console, seed))
    finally:
        with console.status("Stopping the stack…"):
            stack.stop()
    return _report(console, checks)


async def _run(
    stack: DevStack,
    info: dict[str, str],
    n: int,
    seconds: float,
    console: Console,
    seed: int,
) -> list[Check]:
    rng = random.Random(seed)
    names = list(SCENARIOS)
    plan = [
        Tracked(rng.choices(names, weights=[SCENARIOS[s][0] for s in names])[0]) for _ in range(n)
    ]
    for tracked in plan:
        tracked.cancel_after = rng.choice((0.0, rng.uniform(0.0, 0.3)))
    provider = httpx.AsyncClient(base_url=info["provider_base"], timeout=30)
    api = Api(info["api_url"])
    keys = await new_agent_keys(info["database_url"], "chaos-agent", 4)
    operator_key = info["operator_key"]
    run = secrets.token_hex(4)
    # Refused settings (a 400) or a provider that is not the sandbox (a 404) must not leave
    # a run without its provider faults that then passes.
    requests_before = await _provider_requests(provider)
    (await provider.post("/_sandbox/faults", json={**FAULTS, "seed": seed})).raise_for_status()
    killer = Killer(stack, (2.0, 4.0), seed)
    killer.start()
    started = time.monotonic()
    restarted = asyncio.create_task(_restart_postgres_once(stack, seconds / 3, console))

    async def paced(i: int, tracked: Tracked) -> None:
        await asyncio.sleep(seconds * i / max(n, 1))
        try:
            await _play(
                api,
                provider,
                keys[i % len(keys)],
                operator_key,
                tracked,
                i,
                run,
                within=seconds + 180,
            )
        except Exception as error:
            tracked.error = repr(error)

    players = [asyncio.create_task(paced(i, t)) for i, t in enumerate(plan)]
    with console.status("Chaos: sending payments, killing workers, failing the provider…"):
        await asyncio.sleep(seconds)
        killer.stopped.set()
        injected = await _clear_faults(provider)
        requests_after = await _provider_requests(provider)
        await restarted
    console.print(
        f"Faults stopped after {time.monotonic() - started:.0f}s: "
        f"{killer.kills} workers killed, "
        + ("Postgres restarted once, " if stack.pg else "external Postgres not restarted, ")
        + f"provider: {injected.get('error', 0)} failed requests, "
        f"{injected.get('lose_response', 0)} responses lost after the fact"
    )
    with console.status("Draining: waiting for every payment to settle…"):
        await asyncio.gather(*players)
        async with open_pool(info["database_url"], min_size=1, max_size=2) as pool:
            await _drain(pool, plan, within=240)
            checks = await check_invariants(pool, provider, plan)
    requests = None
    if requests_before is not None and requests_after is not None:
        requests = requests_after - requests_before
    checks.insert(0, _faults_check(killer.kills, injected, requests))
    late = sum(t.too_late for t in plan)
    during = sum(t.while_charging for t in plan)
    console.print(
        f"{during} early cancels came while the charge was under way; {late} came too late "
        "(the payment was charged first)"
    )
    await provider.aclose()
    await api.close()
    return checks


async def _clear_faults(
    provider: httpx.AsyncClient, tries: int = 10, pause: float = 1.0
) -> dict[str, int]:
    """The faults off before the drain; how many of each the sandbox injected. A run that
    sends more than the machine carries can keep the sandbox (a thread of this process) from
    answering for a while: try again rather than end the run without its checks."""
    for attempt in range(tries):
        try:
            current = await provider.get("/_sandbox/faults")
            current.raise_for_status()
            (await provider.delete("/_sandbox/faults")).raise_for_status()
            injected: dict[str, int] = current.json()["injected"]
            return injected
        except httpx.TransportError:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


async def _provider_requests(provider: httpx.AsyncClient) -> int | None:
    """How many /v1 requests the sandbox has answered so far (None: it did not say)."""
    try:
        stats = await provider.get("/_sandbox/stats")
        stats.raise_for_status()
        return int(stats.json()["requests"]["total"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _faults_check(kills: int, injected: dict[str, int], requests: int | None = None) -> Check:
    """The run met its faults: one in which no worker was killed, or the provider failed
    nothing (its faults were refused, or too few requests for any to fire), proves nothing.
    `requests`: the provider requests made while the faults were on, when known; too few of
    them is said as such, with what to do. (Postgres is restarted unless the stack runs on an
    external DATABASE_URL: said above.)"""
    provider = injected.get("error", 0) + injected.get("lose_response", 0)
    check = Check("faults injected: workers killed, provider errors and lost responses", kills)
    check.count += provider
    if not kills:
        check.failures.append("no worker was killed")
    if not provider:
        if requests is not None and requests < ENOUGH_REQUESTS:
            check.failures.append(
                f"only {requests} provider requests: too few for the faults to fire; "
                "raise --payments or --seconds"
            )
        else:
            check.failures.append("the provider failed no request and lost no response")
    return check


async def _restart_postgres_once(stack: DevStack, after: float, console: Console) -> None:
    if stack.pg is None:
        return
    await asyncio.sleep(after)
    await asyncio.to_thread(stack.pg.stop_server)
    await asyncio.sleep(5)
    await asyncio.to_thread(stack.pg.start_server)


async def _drain(pool: Pool, plan: list[Tracked], within: float) -> None:
    """Wait until every tracked payment is in its expected state (or it is too late)."""
    deadline = time.monotonic() + within
    wanted = {t.id: SCENARIOS[t.scenario][1] for t in plan if t.id}
    # Accepted disputes come back as the provider's event (a webhook, or the catch-up), not
    # as a job: each one's loss booked is part of settling.
    accepted = [t.id for t in plan if t.id and t.dispute_accepted]
    while time.monotonic() < deadline:
        async with pool.connection() as conn:
            # Each payment in its own scenario's state (a refund retried later with backoff
            # leaves its payment `reconciled`: that is not the end of a refund scenario),
            # or in a final state it cannot leave; and no job due now.
            cur = await conn.execute(
                """SELECT (SELECT count(*) FROM payment_jobs p
                             JOIN unnest(%s::text[], %s::text[]) AS w(id, wanted) USING (id)
                            WHERE p.status <> w.wanted
                              AND p.status NOT IN ('failed', 'rejected', 'canceled',
                                                   'refunded')) AS moving,
                          (SELECT count(*) FROM procrastinate_jobs
                            WHERE status IN ('todo', 'doing')
                              AND (scheduled_at IS NULL OR scheduled_at < now())) AS jobs,
                          (SELECT count(*) FROM unnest(%s::text[]) AS d(id)
                            WHERE NOT EXISTS (
                                SELECT 1 FROM ledger_transactions t
                                 WHERE t.payment_id = d.id AND t.kind = 'dispute_lost'))
                              AS unbooked""",
                (list(wanted), list(wanted.values()), accepted),
            )
            row = await cur.fetchone()
        if row is not None and row["moving"] == row["jobs"] == row["unbooked"] == 0:
            return
        await asyncio.sleep(0.5)


async def _all_pages(provider: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": 100, **({"starting_after": after} if after else {})}
        page = (await provider.get(path, params=params, headers=PROVIDER_AUTH)).json()
        items += page["data"]
        if not page.get("has_more") or not page["data"]:
            return items
        after = page["data"][-1]["id"]


async def check_invariants(
    pool: Pool, provider: httpx.AsyncClient, plan: list[Tracked]
) -> list[Check]:
    """The run's payments (those of `plan`: a database an earlier run or a dev stack used
    holds others, which this run's sandbox never saw) against the provider, the state
    machine, the ledger and the queue."""
    ids = [t.id for t in plan if t.id]
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT id, status, amount_total, amount_captured, amount_refunded, refunds_pending,
                      amount_lost_to_disputes,
                      (SELECT count(*) FROM payment_refunds r
                        WHERE r.payment_id = p.id AND r.status = 'pending') AS pending
                 FROM payment_jobs p WHERE id = ANY(%s)""",
            (ids,),
        )
        rows = {r["id"]: r for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT payment_id, from_status, to_status FROM payment_events"
            " WHERE type <> 'created' AND from_status IS DISTINCT FROM to_status"
            " AND payment_id = ANY(%s) ORDER BY id",
            (ids,),
        )
        events = await cur.fetchall()
        cur = await conn.execute("SELECT from_status, to_status FROM payment_transitions")
        legal = {(r["from_status"], r["to_status"]) for r in await cur.fetchall()}
        cur = await conn.execute("SELECT id FROM procrastinate_jobs WHERE status = 'doing'")
        doing = [str(r["id"]) for r in await cur.fetchall()]
        cur = await conn.execute(
            """SELECT t.payment_id, t.reference, sum(e.amount) AS amount
                 FROM ledger_transactions t
                 JOIN ledger_entries e ON e.transaction_id = t.id
                 JOIN ledger_accounts a ON a.id = e.account_id
                WHERE t.kind = 'dispute_lost' AND a.kind = 'disputes_lost'
                  AND t.payment_id = ANY(%s)
                GROUP BY t.payment_id, t.reference, t.id ORDER BY t.id""",
            (ids,),
        )
        booked: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for r in await cur.fetchall():
            booked[r["payment_id"]].append((r["reference"], int(r["amount"])))
        ledger = await _ledger_checks(conn)

    intents = await _all_pages(provider, "/v1/payment_intents")
    payment_of = {pi["id"]: pi.get("metadata", {}).get("payment_id", "?") for pi in intents}
    disputes: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for d in await _all_pages(provider, "/v1/disputes"):
        pid = payment_of.get(d.get("payment_intent") or "", f"intent {d.get('payment_intent')}")
        disputes[pid].append((d["id"], d["status"], d["amount"]))
    lost = {
        pid: sum(amount for _, status, amount in found if status == "lost")
        for pid, found in disputes.items()
    }
    async with pool.connection() as conn:
        money = await _money_checks(conn, rows, lost)
    disputed = {t.id for t in plan if t.id and t.scenario == "dispute_lost"}
    shown = {pid: row["amount_lost_to_disputes"] for pid, row in rows.items()}
    dispute_check = _dispute_check(disputed, disputes, booked, shown)

    checks = []
    final = Check("payments in the state their scenario asked for", len(plan))
    for t in plan:
        want = SCENARIOS[t.scenario][1]
        got = rows[t.id]["status"] if t.id in rows else None
        if t.error or got != want:
            final.failures.append(f"{t.id or '-'} ({t.scenario}): {got} ≠ {want} {t.error or ''}")
    checks.append(final)

    by_payment: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for pi in intents:
        by_payment[pi.get("metadata", {}).get("payment_id", "?")].append(pi)
    one = Check(
        "PaymentIntents: one succeeded (with the amount captured) per succeeded payment, one "
        "holding per authorized one, none taking or holding money for the others",
        len(rows),
    )
    for pid, row in rows.items():
        found = [(pi["status"], pi.get("amount_received", 0)) for pi in by_payment.get(pid, [])]
        if not _intents_match(row, found):
            one.failures.append(f"{pid} ({row['status']}): intents {found}")
    stray = [pid for pid in by_payment if pid not in rows]
    one.failures += [f"PaymentIntent for unknown payment {pid}" for pid in stray]
    checks.append(one)

    refunds = await _all_pages(provider, "/v1/refunds")
    refund_check = Check("refunds: none made twice, sums and pending counts match", len(refunds))
    keys = Counter((r.get("metadata") or {}).get("refund_id") for r in refunds)
    refund_check.failures += [f"refund {k} made {c} times" for k, c in keys.items() if c > 1]
    refunded: Counter[str] = Counter()
    for r in refunds:
        refunded[(r.get("metadata") or {}).get("payment_id", "?")] += r["amount"]
    for pid, row in rows.items():
        if refunded[pid] != row["amount_refunded"]:
            refund_check.failures.append(
                f"{pid}: provider {refunded[pid]} ≠ ours {row['amount_refunded']}"
            )
        if row["refunds_pending"] != row["pending"]:
            refund_check.failures.append(
                f"{pid}: {row['refunds_pending']} refunds counted pending, {row['pending']} are"
            )
    checks.append(refund_check)

    paths = Check("every payment's events form a legal path", len(rows))
    last: dict[str, str] = {}
    for e in events:
        previous = last.get(e["payment_id"], "received")
        if e["from_status"] != previous or (e["from_status"], e["to_status"]) not in legal:
            paths.failures.append(
                f"{e['payment_id']}: {previous} / {e['from_status']} → {e['to_status']}"
            )
        last[e["payment_id"]] = e["to_status"]
    for pid, row in rows.items():
        if last.get(pid, "received") != row["status"]:
            paths.failures.append(f"{pid}: events end at {last.get(pid)}, it is {row['status']}")
    checks.append(paths)

    checks += ledger
    checks.append(money)
    checks.append(dispute_check)
    checks.append(Check("no procrastinate job left doing", len(doing), [f"job {j}" for j in doing]))
    return checks


def _intents_match(payment: dict[str, Any], intents: list[tuple[str, int]]) -> bool:
    """Whether the provider's intents for a payment (status, amount received) are what its
    state says: one `succeeded` that received what the payment collected (`amount_captured`,
    or its total before reconcile wrote it) for a succeeded payment, one
    `requires_capture` for an authorized one, for a failed (declined) one its intent
    canceled (nothing may confirm it later), and for any other at most one intent, which
    neither took nor holds money (a canceled payment's is `canceled`, or never confirmed: an
    intent a charge job made after the cancel, whose own cancel call failed or was cut)."""
    status = payment["status"]
    if status in SUCCEEDED_STATES:
        return intents == [("succeeded", payments.collected(payment))]
    if status == "authorized":
        return [s for s, _ in intents] == ["requires_capture"]
    if status == "canceled":
        return [s for s, _ in intents] in ([], ["canceled"], ["requires_confirmation"])
    if status == "failed":  # declined: its intent canceled (`void_intent`), or none made
        return [s for s, _ in intents] in ([], ["canceled"])
    return len(intents) <= 1 and not {s for s, _ in intents} & MONEY_MOVED


async def _money_checks(
    conn: Any, rows: dict[str, dict[str, Any]], lost: dict[str, int] | None = None
) -> Check:
    """Each payment's money in the ledger as its state says: a hold of its total while it
    waits (in review, authorized), none once it ended; collected (provider clearing and
    platform fees) what was captured less what was refunded and what disputes the provider
    says were lost took back (`lost`, per payment) once reconciled, nothing otherwise."""
    lost = lost or {}
    cur = await conn.execute(
        """SELECT t.payment_id,
                  coalesce(sum(e.amount) FILTER (WHERE a.kind = 'agent_holds'), 0) AS held,
                  coalesce(sum(e.amount) FILTER (
                      WHERE a.kind IN ('provider_clearing', 'platform_fees')), 0) AS collected
             FROM ledger_transactions t
             JOIN ledger_entries e ON e.transaction_id = t.id
             JOIN ledger_accounts a ON a.id = e.account_id
            WHERE t.payment_id = ANY(%s)
            GROUP BY t.payment_id""",
        (list(rows),),
    )
    money = {r["payment_id"]: (r["held"], r["collected"]) for r in await cur.fetchall()}
    check = Check(
        "each payment's hold and collected money in the ledger match its state", len(rows)
    )
    for pid, row in rows.items():
        held, collected = money.get(pid, (0, 0))
        waiting = row["status"] in HELD_STATES
        want_held = row["amount_total"] if waiting else 0
        settled = row["status"] in CAPTURED_STATES
        want_collected = (
            payments.collected(row) - row["amount_refunded"] - lost.get(pid, 0) if settled else 0
        )
        if (held, collected) != (want_held, want_collected):
            check.failures.append(
                f"{pid} ({row['status']}): held {held}, collected {collected}; "
                f"expected {want_held}, {want_collected}"
            )
    return check


def _dispute_check(
    disputed: set[str],
    disputes: dict[str, list[tuple[str, str, int]]],
    booked: dict[str, list[tuple[str, int]]],
    shown: dict[str, int] | None = None,
) -> Check:
    """Lost disputes in the ledger as at the provider: each payment whose scenario is
    disputed (`disputed`) has one dispute there, lost (the run accepted it), and no other
    payment has one (`disputes`: payment id → (dispute id, status, amount)); each lost
    dispute is booked once in `disputes_lost`, under its own id, for the provider's amount,
    and nothing else is (`booked`: payment id → (reference, amount) per `dispute_lost`
    transaction); and each payment shows the agent what it lost (`shown`: payment id →
    `amount_lost_to_disputes`)."""
    check = Check(
        "lost disputes: each booked once in disputes_lost, for the amount the provider lost",
        sum(len(found) for found in disputes.values()),
    )
    for pid in sorted(disputed | set(disputes) | set(booked)):
        found = disputes.get(pid, [])
        if pid in disputed and [status for _, status, _ in found] != ["lost"]:
            check.failures.append(f"{pid}: provider disputes {found}, expected one lost")
        elif pid not in disputed and found:
            check.failures.append(f"{pid}: disputed at the provider {found}, its scenario was not")
        want = sorted(
            (dispute_id, amount) for dispute_id, status, amount in found if status == "lost"
        )
        got = sorted(booked.get(pid, []))
        if got != want:
            check.failures.append(f"{pid}: disputes_lost booked {got}, the provider lost {want}")
    for pid, amount in sorted((shown or {}).items()):
        lost = sum(a for _, status, a in disputes.get(pid, []) if status == "lost")
        if amount != lost:
            check.failures.append(
                f"{pid}: shows {amount} lost to disputes, the provider lost {lost}"
            )
    return check


async def _ledger_checks(conn: Any) -> list[Check]:
    """The ledger balances per currency, and every account's balance is the sum of its entries."""
    cur = await conn.execute("SELECT count(*) AS n FROM ledger_accounts")
    row = await cur.fetchone()
    name = "ledger balances per currency; every balance equals the sum of its entries"
    return [Check(name, row["n"] if row else 0, await ledger.problems(conn))]


def _report(console: Console, checks: list[Check]) -> bool:
    table = Table(title="Chaos checks")
    for column in ("check", "count", "result"):
        table.add_column(column)
    for check in checks:
        result = "[green]ok[/]" if check.ok else f"[red]{len(check.failures)} failed[/]"
        table.add_row(check.name, str(check.count), result)
    console.print(table)
    for check in checks:
        for failure in check.failures[:10]:
            console.print(f"[red]✗[/] {check.name}: {failure}")
    return all(check.ok for check in checks)
