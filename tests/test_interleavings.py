"""Interleavings, chosen by hypothesis, of everything that acts on one payment at once: the
charge job and its rescued duplicate, a cancel asked through the API at any moment and its
job(s), reconcile jobs (a webhook's, the sweep's), and for manual capture a capture asked
through the API and its job. They are the real task functions, run as asyncio tasks; each
provider call is a gate (before the call, and after it before its answer is returned: the
window where a worker freezes after the provider acted) where a scheduler, driven by
hypothesis, picks which blocked actor goes on. Then the fleet settles what is left (jobs,
retries, the maintenance sweeps) and the payment must be where docs/provider.md promises:
no money taken for a payment that ended without it, a cancel asked before the intent id was
stored never loses to the charge, nothing left stuck, the ledger sound."""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from tasks import charge, payments, provider, reconcile
from tasks.app import Backoff, defer
from tasks.db import Pool
from tasks.settings import Settings
from tests.conftest import auth, in_process_api, run_jobs
from tests.test_cancel_charging import jobs_of, ledger_kinds
from tests.test_faults import intents_of
from tests.test_ledger import assert_ledger_sound
from tests.test_pipeline import create, fetch
from workers.maintenance import WAITING_ON_A_PERSON, sweep_stuck_payments, sweep_stuck_requests

GATED = (
    "create_intent",
    "confirm_intent",
    "retrieve_intent",
    "find_intent",
    "cancel_intent",
    "capture_intent",
)
# How long the actors may take to reach their next gate (or end): past it, something waits
# for something that cannot happen (a lock held across a provider call, a lost wake-up).
QUIET_TIMEOUT = 5.0
MAX_STEPS = 80
# Intent statuses that hold or took money.
MONEY = frozenset({"succeeded", "requires_capture", "processing"})
FINAL = frozenset({"rejected", "failed", "canceled", "reconciled", "refunded"})


@dataclass
class Actor:
    name: str
    state: str = "running"  # running | blocked | done
    where: str = ""
    go: asyncio.Future[None] | None = None
    error: BaseException | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


_ACTOR: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("actor", default=None)


class Scheduler:
    """Runs the actors one at a time: each runs until it reaches a gate (or ends), then the
    next to go on is drawn among the blocked ones."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.actors: dict[str, Actor] = {}
        self.changed = asyncio.Event()
        self.trace: list[str] = []
        self.gating = True
        # Hypothesis's own stop (StopTest: the example ran out of data) met in an actor.
        self.interrupted: BaseException | None = None
        # Actors that join once another has gone on `count` times from its gates (or is
        # done, or nothing else is left to run).
        self.later: list[tuple[str, int, str, Callable[[], Awaitable[Any]]]] = []
        self.released: dict[str, int] = {}
        # How the next actor is picked. "priorities" (PCT, probabilistic concurrency testing):
        # the first blocked one in `order` (each actor takes a drawn place in it as it
        # starts), and at each step of `switches` the first is moved to the end — few choices
        # reach deep orderings (one actor runs far ahead of another). "each step": drawn
        # among the blocked ones at every step, any interleaving at all.
        self.pick = data.draw(st.sampled_from(["priorities", "each step"]), label="pick")
        self.order: list[str] = []
        self.switches: set[int] = set()
        if self.pick == "priorities":
            self.switches = data.draw(
                st.sets(st.integers(0, 40), max_size=4), label="priority switches"
            )

    def spawn(self, name: str, body: Callable[[], Awaitable[Any]]) -> None:
        if self.pick == "priorities" and self.gating:
            place = self.draw(st.integers(0, len(self.order)), f"{name}: priority")
            self.order.insert(place, name)
        actor = Actor(name)
        self.actors[name] = actor

        async def run() -> None:
            _ACTOR.set(actor)
            try:
                await body()
            except Exception as error:  # judged after the run
                actor.error = error
                self.trace.append(f"{name}: raised {type(error).__name__}: {error}")
            except asyncio.CancelledError:
                actor.error = TimeoutError("hung, cancelled")
            except BaseException as error:
                self.interrupted = error
            finally:
                actor.state = "done"
                self.changed.set()

        actor.task = asyncio.create_task(run())

    def spawn_after(
        self, anchor: str, count: int, name: str, body: Callable[[], Awaitable[Any]]
    ) -> None:
        self.later.append((anchor, count, name, body))

    def _due(self, anchor: str, count: int) -> bool:
        actor = self.actors.get(anchor)
        return actor is None or actor.state == "done" or self.released.get(anchor, 0) >= count

    def others_alive(self, name: str) -> bool:
        return any(a.state != "done" for n, a in self.actors.items() if n != name)

    def draw(self, strategy: st.SearchStrategy[Any], label: str) -> Any:
        return self.data.draw(strategy, label=label)

    async def gate(self, where: str) -> None:
        actor = _ACTOR.get()
        if actor is None or not self.gating or self.actors.get(actor.name) is not actor:
            return
        actor.state, actor.where = "blocked", where
        actor.go = asyncio.get_running_loop().create_future()
        self.changed.set()
        await actor.go

    async def _quiet(self) -> None:
        """Until no actor is running (each is blocked at a gate, or done)."""

        async def wait() -> None:
            while True:
                self.changed.clear()
                if all(a.state != "running" for a in self.actors.values()):
                    return
                await self.changed.wait()

        try:
            await asyncio.wait_for(wait(), QUIET_TIMEOUT)
        except TimeoutError:
            running = [a.name for a in self.actors.values() if a.state == "running"]
            raise AssertionError(
                f"actors {running} neither reached a gate nor ended within {QUIET_TIMEOUT} s "
                "(deadlock?)\n" + "\n".join(self.trace)
            ) from None

    def _release(self, actor: Actor) -> None:
        actor.state = "running"
        assert actor.go is not None
        actor.go.set_result(None)

    async def run(self) -> None:
        for step in range(MAX_STEPS + 1):
            await self._quiet()
            blocked = sorted(n for n, a in self.actors.items() if a.state == "blocked")
            due = [j for j in self.later if not blocked or self._due(j[0], j[1])]
            if due:
                for joining in due:
                    self.later.remove(joining)
                    self.trace.append(f"{joining[2]}: joins")
                    self.spawn(joining[2], joining[3])
                await self._quiet()
                blocked = sorted(n for n, a in self.actors.items() if a.state == "blocked")
            if not blocked:
                return
            if step == MAX_STEPS:
                break
            name = blocked[0]
            if self.pick == "each step" and len(blocked) > 1:
                name = self.draw(st.sampled_from(blocked), label=f"step {step}")
            elif self.pick == "priorities":
                first = [n for n in self.order if n in blocked]
                if step in self.switches:
                    self.order.remove(first[0])
                    self.order.append(first[0])
                    self.trace.append(f"(step {step}: {first[0]} goes last)")
                    first = first[1:] + first[:1]
                name = first[0]
            self.trace.append(f"{name}: {self.actors[name].where}")
            self.released[name] = self.released.get(name, 0) + 1
            self._release(self.actors[name])
        # Too many steps: let them all run free.
        self.trace.append("(step limit: ungated)")
        self.gating = False
        for actor in self.actors.values():
            if actor.state == "blocked":
                self._release(actor)
        await self._quiet()

    async def stop(self) -> None:
        """Ungated from now on; actors still blocked go on, and any that hangs is cancelled."""
        self.gating = False
        for actor in self.actors.values():
            if actor.go is not None and not actor.go.done():
                actor.go.set_result(None)
        while tasks := [a.task for a in self.actors.values() if a.task and not a.task.done()]:
            _, hanging = await asyncio.wait(tasks, timeout=QUIET_TIMEOUT)
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)


def _gated(sched_of: Callable[[], Scheduler | None], name: str, real: Any) -> Any:
    async def call(*args: Any, **kwargs: Any) -> Any:
        sched, actor = sched_of(), _ACTOR.get()
        if sched is None or actor is None or sched.actors.get(actor.name) is not actor:
            return await real(*args, **kwargs)
        await sched.gate(f"before {name}")
        if name == "find_intent" and sched.gating and sched.draw(st.booleans(), "search lags"):
            # Stripe's search is eventually consistent: a new intent may not show yet.
            sched.trace.append(f"{actor.name}: search lags, finds nothing")
            return None
        try:
            result = await real(*args, **kwargs)
        except Exception as error:
            await sched.gate(f"after {name}: raised {type(error).__name__}")
            raise
        status = getattr(result, "status", result)
        await sched.gate(f"after {name}: {status}")
        return result

    return call


def retryable(error: BaseException) -> bool:
    """A job outcome the job's retry strategy retries (the job will run again)."""
    return isinstance(error, Backoff.retry_on)


async def settle_fleet(pool: Pool, payment_id: str) -> None:
    """What the fleet does after: every job run when it comes due (retries and re-checks
    brought forward), the maintenance sweeps, until nothing is left to do."""
    # A webhook lost: what `recheck_waiting_payments` defers for a payment waiting on a
    # person (for this payment only: the sweep would take every earlier example's too).
    async with pool.connection() as conn, conn.transaction():
        payment = await payments.get(conn, payment_id)
        if payment is not None and payment["status"] in WAITING_ON_A_PERSON:
            await defer(conn, "reconcile", payment_id=payment_id)
    for _ in range(30):
        async with pool.connection() as conn:
            await conn.execute(
                """UPDATE procrastinate_jobs SET scheduled_at = now()
                    WHERE status = 'todo' AND args->>'payment_id' = %s
                      AND scheduled_at > now()""",
                (payment_id,),
            )
        await run_jobs(pool)
        redriven = await sweep_stuck_payments(pool, older_than=0)
        redriven += await sweep_stuck_requests(pool, older_than=0)
        waiting = await jobs_of(pool, payment_id, "todo") + await jobs_of(pool, payment_id, "doing")
        if payment_id not in redriven and not waiting:
            return
    raise AssertionError("the fleet never settled the payment")


async def finish_job(pool: Pool, payment_id: str, task: str, retried: bool) -> None:
    """The job the actors of `task` ran is over: succeeded, or back to `todo` (retried)."""
    async with pool.connection() as conn:
        await conn.execute(
            """UPDATE procrastinate_jobs SET status = %s
                WHERE id = (SELECT min(id) FROM procrastinate_jobs
                             WHERE task_name = %s AND args->>'payment_id' = %s
                               AND status = 'todo')""",
            ("todo" if retried else "succeeded", task, payment_id),
        )


@pytest.fixture
async def api(settings: Settings, pool: Pool) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process, as conftest's, without the per-agent rate limit: hundreds of
    examples ask it several times each, faster than an agent may."""
    unlimited = settings.model_copy(update={"api_rate_limit_per_second": 0})
    async with in_process_api(unlimited, pool) as (_, client):
        yield client


@pytest.fixture
def gates(monkeypatch: pytest.MonkeyPatch) -> dict[str, Scheduler | None]:
    """The provider calls, gated by the scheduler of the example running (if any)."""
    current: dict[str, Scheduler | None] = {"sched": None}
    for name in GATED:
        monkeypatch.setattr(
            provider, name, _gated(lambda: current["sched"], name, getattr(provider, name))
        )
    return current


@settings(
    max_examples=200,
    deadline=None,
    # Reproducible in CI; AGENTPAY_RANDOM_INTERLEAVINGS=1 with --hypothesis-seed=N explores
    # others.
    derandomize=not os.environ.get("AGENTPAY_RANDOM_INTERLEAVINGS"),
    # No explain phase: it runs the failing example dozens of times more (minutes).
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    # Visa weighted: the races where money is taken need a card that pays.
    method=st.sampled_from(
        ["pm_card_visa", "pm_card_visa", "pm_card_chargeDeclined", "pm_card_authenticationRequired"]
    ),
    capture_method=st.sampled_from(["automatic", "manual"]),
    duplicate_charge=st.booleans(),
    reconcilers=st.integers(0, 2),
    # Asked once the charge job has gone on that many times from its gates; None: never.
    cancel_at=st.none() | st.integers(0, 5),
    cancel_jobs=st.integers(1, 2),
    capture_at=st.none() | st.integers(0, 7),
    data=st.data(),
)
async def test_any_interleaving_keeps_the_promises(
    api: httpx.AsyncClient,
    agent_key: str,
    pool: Pool,
    provider_base: str,
    gates: dict[str, Scheduler | None],
    method: str,
    capture_method: str,
    duplicate_charge: bool,
    reconcilers: int,
    cancel_at: int | None,
    cancel_jobs: int,
    capture_at: int | None,
    data: st.DataObject,
) -> None:
    note(
        f"{method}, {capture_method}, duplicate charge: {duplicate_charge}, "
        f"reconcilers: {reconcilers}, "
        f"cancel after charge step: {cancel_at} ({cancel_jobs} job(s)), "
        f"capture after charge step: {capture_at}"
    )
    created = await create(api, agent_key, payment_method=method, capture_method=capture_method)
    pid = created["id"]
    await run_jobs(pool, ("pricing", "risk"))
    assert (await fetch(api, agent_key, pid))["status"] == "approved"

    sched = Scheduler(data)
    gates["sched"] = sched
    seen: dict[str, Any] = {}
    job_actors: dict[str, list[str]] = {"charge": ["charge"]}

    def job(name: str, run: Callable[[str], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        async def body() -> Any:
            await sched.gate("start")
            return await run(pid)

        return body

    async def ask_cancel() -> None:
        response = await api.post(f"/v1/payments/{pid}/cancel", headers=auth(agent_key))
        assert response.status_code in (202, 409), response.text
        if response.status_code != 202:
            sched.trace.append(f"cancel request: refused, {response.json()['error']['message']}")
            return
        answer = response.json()
        sched.trace.append(
            f"cancel request: accepted, payment {answer['status']}, "
            f"intent id stored: {answer['provider_payment_id']}"
        )
        seen["cancel"] = answer
        if answer["pending_action"] == "cancel":
            names = [f"cancel job {i}" for i in range(cancel_jobs)]
            job_actors["cancel"] = names
            for name in names:
                sched.spawn(name, job(name, charge.cancel_payment))

    async def ask_capture() -> None:
        # Asked once it is authorized (or when nothing else can happen any more).
        while (await fetch(api, agent_key, pid))["status"] != "authorized":
            if not sched.others_alive("capture request"):
                break
            await sched.gate("waiting for `authorized`")
        response = await api.post(f"/v1/payments/{pid}/capture", headers=auth(agent_key))
        assert response.status_code in (202, 409), response.text
        sched.trace.append(f"capture request: {response.status_code}")
        if response.status_code == 202:
            seen["capture"] = response.json()
            job_actors["capture"] = ["capture job"]
            sched.spawn("capture job", job("capture job", charge.capture_payment))

    try:
        sched.spawn("charge", job("charge", charge.charge_payment))
        if duplicate_charge:
            job_actors["charge"].append("charge (rescued)")
            sched.spawn("charge (rescued)", job("charge (rescued)", charge.charge_payment))
        for i in range(reconcilers):
            sched.spawn(f"reconcile {i}", job(f"reconcile {i}", reconcile.reconcile_payment))
        if cancel_at is not None:
            sched.spawn_after("charge", cancel_at, "cancel request", ask_cancel)
        if capture_at is not None and capture_method == "manual":
            sched.spawn_after("charge", capture_at, "capture request", ask_capture)
        await sched.run()
    finally:
        note("interleaving:\n  " + "\n  ".join(sched.trace))
        await sched.stop()
        gates["sched"] = None
    if sched.interrupted is not None:
        raise sched.interrupted

    for actor in sched.actors.values():
        if actor.error is not None and not retryable(actor.error):
            raise AssertionError(f"{actor.name} failed: {actor.error!r}") from actor.error
    for task, names in job_actors.items():
        retried = any(sched.actors[n].error is not None for n in names)
        await finish_job(pool, pid, task, retried)

    await settle_fleet(pool, pid)

    # --- the promises ---------------------------------------------------------------------
    payment = await fetch(api, agent_key, pid)
    status, own = payment["status"], payment["provider_payment_id"]
    intents = {pi["id"]: pi["status"] for pi in intents_of(provider_base, pid)}
    note(f"payment {status}, its intent {own}; intents at the provider: {intents}")
    event(f"ends {status}")
    if "capture" in seen:
        event(f"capture asked -> {status}")
    if "cancel" in seen:
        stored = seen["cancel"]["provider_payment_id"] is not None
        event(f"cancel asked while {seen['cancel']['status']} (id stored: {stored}) -> {status}")

    # 1. Money: only the payment's own intent ever took or holds money, and only as it says.
    others = {i: s for i, s in intents.items() if i != own}
    assert not (set(others.values()) & (MONEY | {"requires_action"})), (
        "an intent that is not the payment's was confirmed",
        others,
    )
    if status in ("canceled", "failed", "rejected"):
        assert not (set(intents.values()) & MONEY), intents
    elif status in ("succeeded", "reconciled"):
        assert [i for i, s in intents.items() if s == "succeeded"] == [own], intents
    elif status == "authorized":
        assert [i for i, s in intents.items() if s == "requires_capture"] == [own], intents
    elif status == "requires_action":
        assert intents.get(own) == "requires_action", intents

    # 2. A cancel asked before the intent id was stored never loses to the charge.
    asked = seen.get("cancel")
    if asked is not None and asked["provider_payment_id"] is None:
        assert status in ("canceled", "failed"), (asked["status"], status)

    # ... and a payment is canceled only when someone asked (a charge job that finds the
    # payment moved on leaves the intent it took alone).
    if status == "canceled":
        assert asked is not None, "canceled, but no cancel was asked for"

    # 3. Nothing stuck.
    assert status in FINAL or (
        status in ("authorized", "requires_action") and payment["pending_action"] is None
    ), payment
    assert await jobs_of(pool, pid, "todo") == [] and await jobs_of(pool, pid, "doing") == []

    # 4. The ledger: sound, and the hold released when no money was taken.
    async with pool.connection() as conn:
        await assert_ledger_sound(conn)
        events = await payments.events(conn, pid)
    kinds = await ledger_kinds(pool, pid)
    expected = {
        "canceled": ["hold", "release"],
        "failed": ["hold", "release"],
        "reconciled": ["capture", "hold"],
        "authorized": ["hold"],
        "requires_action": ["hold"],
    }
    assert kinds == expected[status], (kinds, [(e["type"], e["to_status"]) for e in events])
