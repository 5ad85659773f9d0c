"""What operators see, read in one place: the ops_* views (schema/migrations/0005_operations.sql)
and the Prometheus exposition of them at GET /metrics.

`read_snapshot` reads every view in one read-only REPEATABLE READ transaction, so the figures
belong to one instant. `agentpay status` (workers/status.py), the /ops page
(api/routes/ops.py) and /metrics all render that same snapshot, so they agree for the same
state of the database.

/metrics carries what the database knows (queues, throughput, job durations over the last
15 minutes, stuck payments, the review queue, failures, transitions, webhooks, workers).
What only a worker process knows — the exact duration of each job it ran, and the latency
and errors of its provider calls — each worker serves itself on AGENTPAY_METRICS_PORT
(workers/worker.py); docs/operations.md says what to scrape.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from api.deps import PoolDep
from api.errors import ApiError
from tasks import ledger
from tasks.db import Conn, Pool
from tasks.settings import ROLES, Settings, get_settings
from tasks.webhooks import DISPUTE_OPENED

router = APIRouter(tags=["operations"])

# Upper bounds (seconds) of the job-duration buckets, in the API's and the workers' metrics.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Each view, and how many rows of it a snapshot keeps (None: all of them).
_VIEWS: dict[str, int | None] = {
    "queues": None,  # ops_queue_depth
    "throughput": None,  # ops_throughput
    "stuck": 200,  # ops_stuck_payments
    "review": 200,  # ops_review_queue
    "failures": 100,  # ops_recent_failures
    "mismatches": 100,  # ops_reconcile_mismatches
    "transitions": None,  # ops_transition_counts
    "webhooks": None,  # ops_webhook_counts
    "workers": None,  # ops_workers
}
_VIEW_NAMES = {
    "queues": "ops_queue_depth",
    "throughput": "ops_throughput",
    "stuck": "ops_stuck_payments",
    "review": "ops_review_queue",
    "failures": "ops_recent_failures",
    "mismatches": "ops_reconcile_mismatches",
    "transitions": "ops_transition_counts",
    "webhooks": "ops_webhook_counts",
    "workers": "ops_workers",
}

# The query of the duration buckets: finished jobs of the last 15 minutes per role (read
# first, from the events' time index, as ops_throughput: schema/migrations/0029).
_DURATIONS = """
WITH finished AS MATERIALIZED (
    SELECT j.queue_name AS role,
           extract(epoch FROM e.at - (
               SELECT max(s.at) FROM procrastinate_events s
                WHERE s.job_id = e.job_id AND s.type = 'started' AND s.at <= e.at)) AS seconds
      FROM procrastinate_events e
      JOIN procrastinate_jobs j ON j.id = e.job_id
     WHERE e.type IN ('succeeded', 'failed', 'cancelled', 'aborted')
       AND e.at > now() - interval '15 minutes'
)
SELECT r.role, b.le, count(f.seconds) FILTER (WHERE f.seconds <= b.le) AS n,
       count(f.seconds) AS total, coalesce(sum(f.seconds), 0) AS sum
  FROM ops_roles r
  CROSS JOIN unnest(%s::double precision[]) AS b(le)
  LEFT JOIN finished f ON f.role = r.role
 GROUP BY r.role, r.position, b.le
 ORDER BY r.position, b.le
"""


@dataclass
class Snapshot:
    """Every ops view at one instant (`at`, the database's clock)."""

    at: datetime
    stuck_after_seconds: float
    stalled_after_seconds: float
    queues: list[dict[str, Any]]
    throughput: list[dict[str, Any]]
    stuck: list[dict[str, Any]]
    review: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    mismatches: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    webhooks: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    # role -> [(le, cumulative count)], plus count and sum, over the last 15 minutes.
    durations: dict[str, dict[str, Any]] = field(default_factory=dict)
    unlimited_agents: list[dict[str, Any]] = field(default_factory=list)
    # Totals of the (possibly truncated) lists above.
    counts: dict[str, Any] = field(default_factory=dict)

    def workers_by_role(self) -> dict[tuple[str, str], int]:
        """(role, "alive" | "stalled") -> worker processes, by heartbeat age against
        `stalled_after_seconds`; every role is there, at 0 too (a role with no live worker
        is what an operator must see). A worker of an older release, which does not say its
        role, counts under the queue of the job it holds, or else "unknown"."""
        out = {(role, state): 0 for role in ROLES for state in ("alive", "stalled")}
        for w in self.workers:
            state = (
                "alive" if w["heartbeat_age_seconds"] < self.stalled_after_seconds else "stalled"
            )
            key = (w.get("role") or w.get("queues") or "unknown", state)
            out[key] = out.get(key, 0) + 1
        return out

    def stuck_by_waiting_on(self) -> dict[str, int]:
        out = {"fleet": 0, "operator": 0, "agent": 0}
        out.update(self.counts.get("stuck_by_waiting_on", {}))
        return out

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stuck_by_waiting_on"] = self.stuck_by_waiting_on()
        return data


async def read_snapshot(conn: Conn, settings: Settings | None = None) -> Snapshot:
    """Read every ops view in one read-only, repeatable-read transaction."""
    settings = settings or get_settings()
    rows: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, Any] = {}
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = await conn.execute(
            "SELECT now() AS at, set_config('agentpay.stuck_after_seconds', %s, true)",
            (str(settings.stuck_after_seconds),),
        )
        head = await cur.fetchone()
        assert head is not None
        for key, limit in _VIEWS.items():
            # View names are our own constants, never input.
            query = f"SELECT * FROM {_VIEW_NAMES[key]}"  # noqa: S608
            if limit is not None:
                query += f" LIMIT {int(limit)}"
            cur = await conn.execute(query.encode())
            rows[key] = await cur.fetchall()
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM ops_review_queue) AS review,
                      (SELECT count(*) FROM ops_recent_failures) AS failures,
                      (SELECT count(*) FROM ops_reconcile_mismatches) AS mismatches,
                      -- Every mismatch ever found, resolved or not (few: a counter).
                      (SELECT count(*) FROM reconcile_mismatches) AS mismatches_found"""
        )
        totals = await cur.fetchone()
        assert totals is not None
        counts.update(totals)
        # How far back the event catch-up's next listing starts (tasks/catchup.py): the
        # provider lists 30 days of events, and what is older than that is lost.
        cur = await conn.execute(
            """SELECT extract(epoch FROM now()) - created_through AS behind
                 FROM provider_event_cursor"""
        )
        cursor = await cur.fetchone()
        counts["catch_up_behind_seconds"] = float(cursor["behind"]) if cursor else 0.0
        cur = await conn.execute(
            "SELECT waiting_on, count(*) AS n FROM ops_stuck_payments GROUP BY waiting_on"
        )
        by_waiting = {r["waiting_on"]: r["n"] for r in await cur.fetchall()}
        counts["stuck"] = sum(by_waiting.values())
        counts["stuck_by_waiting_on"] = by_waiting
        cur = await conn.execute(
            "SELECT kind, count(*) AS n FROM ops_recent_failures GROUP BY kind"
        )
        counts["failures_by_kind"] = {r["kind"]: r["n"] for r in await cur.fetchall()}
        cur = await conn.execute(_DURATIONS, (list(DURATION_BUCKETS),))
        durations: dict[str, dict[str, Any]] = {}
        for r in await cur.fetchall():
            d = durations.setdefault(
                r["role"], {"buckets": [], "count": r["total"], "sum": float(r["sum"])}
            )
            d["buckets"].append((float(r["le"]), r["n"]))
        unlimited = await ledger.unlimited_agents(conn, settings)
    return Snapshot(
        at=head["at"],
        stuck_after_seconds=settings.stuck_after_seconds,
        stalled_after_seconds=settings.stalled_after_seconds,
        durations=durations,
        unlimited_agents=[dict(a) for a in unlimited],
        counts=counts,
        **rows,
    )


class SnapshotCollector(Collector):
    """Prometheus metric families of one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.s = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.s
        gauges = {
            "waiting": "Jobs due now and waiting for a worker",
            "scheduled": "Jobs waiting for a later time (retries, re-checks)",
            "running": "Jobs a worker holds",
            "oldest_waiting_seconds": "Age of the oldest job due and waiting",
            "failed_last_hour": "Jobs failed for good in the last hour, their work not done since",
        }
        for column, text in gauges.items():
            name = (
                f"agentpay_queue_{column}"
                if column != "failed_last_hour"
                else "agentpay_jobs_failed_last_hour"
            )
            g = GaugeMetricFamily(name, text, labels=["role"])
            for q in s.queues:
                g.add_metric([q["role"]], float(q[column]))
            yield g

        rate = GaugeMetricFamily(
            "agentpay_jobs_per_second_5m", "Jobs finished successfully per second", labels=["role"]
        )
        done = GaugeMetricFamily(
            "agentpay_jobs_succeeded_5m",
            "Jobs finished successfully, last 5 minutes",
            labels=["role"],
        )
        for t in s.throughput:
            rate.add_metric([t["role"]], float(t["per_second_5m"]))
            done.add_metric([t["role"]], float(t["succeeded_5m"]))
        yield rate
        yield done

        hist = GaugeHistogramMetricFamily(
            "agentpay_job_duration_window_seconds",
            "Durations (started to finished) of the jobs finished in the last 15 minutes",
            labels=["role"],
        )
        for role, d in s.durations.items():
            buckets = [(_le(le), float(n)) for le, n in d["buckets"]]
            buckets.append(("+Inf", float(d["count"])))
            hist.add_metric([role], buckets, d["sum"])
        yield hist

        stuck = GaugeMetricFamily(
            "agentpay_stuck_payments",
            f"Payments that have not moved for {s.stuck_after_seconds:g}s, by who they wait on",
            labels=["waiting_on"],
        )
        for who, n in s.stuck_by_waiting_on().items():
            stuck.add_metric([who], float(n))
        yield stuck

        yield GaugeMetricFamily(
            "agentpay_review_queue", "Payments waiting for an operator", value=s.counts["review"]
        )
        oldest_review = max((r["waiting_seconds"] for r in s.review), default=0.0)
        yield GaugeMetricFamily(
            "agentpay_review_oldest_seconds",
            "How long the oldest payment in review has waited",
            value=float(oldest_review),
        )
        fail = GaugeMetricFamily(
            "agentpay_recent_failures", "Failures of the last 24 hours", labels=["kind"]
        )
        for kind in ("payment", "job"):
            fail.add_metric([kind], float(s.counts["failures_by_kind"].get(kind, 0)))
        yield fail
        yield CounterMetricFamily(
            "agentpay_reconcile_mismatches",
            "Fields where the provider disagreed with a payment (found, resolved or not)",
            value=s.counts["mismatches_found"],
        )
        yield GaugeMetricFamily(
            "agentpay_reconcile_mismatches_open",
            "Reconcile mismatches no operator has resolved yet",
            value=s.counts["mismatches"],
        )

        yield GaugeMetricFamily(
            "agentpay_event_catch_up_behind_seconds",
            "Age of the newest events the event catch-up has listed (the provider lists 30 days)",
            value=s.counts.get("catch_up_behind_seconds", 0.0),
        )

        trans = CounterMetricFamily(
            "agentpay_payment_transitions",
            "Payment status changes (from '' is a payment's creation)",
            labels=["from", "to"],
        )
        for t in s.transitions:
            trans.add_metric([t["from_status"], t["to_status"]], float(t["total"]))
        yield trans

        hooks = CounterMetricFamily(
            "agentpay_webhook_events",
            "Provider webhook events received (each once), by type and outcome",
            labels=["type", "outcome"],
        )
        totals = {(w["type"], w["outcome"]): float(w["total"]) for w in s.webhooks}
        # The series an alert watches exist from the start, at 0: a counter that first
        # appears at 1 shows no increase, and the first dispute would go unseen.
        for outcome in ("handled", "ignored"):
            totals.setdefault((DISPUTE_OPENED, outcome), 0.0)
        for (event_type, outcome), total in totals.items():
            hooks.add_metric([event_type, outcome], total)
        yield hooks

        workers = GaugeMetricFamily(
            "agentpay_workers",
            "Worker processes by role and heartbeat (every role's series exist, at 0 too)",
            labels=["role", "state"],
        )
        for (role, state), count in s.workers_by_role().items():
            workers.add_metric([role, state], float(count))
        yield workers


def _le(value: float) -> str:
    return f"{value:g}"


def render(snapshot: Snapshot, settings: Settings) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(pool: PoolDep, request: Request) -> Response:
    """Prometheus metrics of the fleet, read from the ops views. With AGENTPAY_METRICS_TOKEN
    set, only for `Authorization: Bearer <token>`; else open, like /healthz (expose it only
    where your Prometheus can reach it). Scrapes within AGENTPAY_METRICS_CACHE_SECONDS share
    one read."""
    settings: Settings = request.app.state.settings
    if settings.metrics_token:
        sent = request.headers.get("authorization", "")
        expected = f"Bearer {settings.metrics_token}"
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise ApiError(
                401,
                "metrics_token_invalid",
                "/metrics needs Authorization: Bearer <AGENTPAY_METRICS_TOKEN>.",
                type_="authentication_error",
            )
    cache: ScrapeCache = request.app.state.metrics_cache
    body = await cache.get(settings.metrics_cache_seconds, lambda: _scrape(pool, settings))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _scrape(pool: Pool, settings: Settings) -> bytes:
    async with pool.connection() as conn:
        snapshot = await read_snapshot(conn, settings)
    return render(snapshot, settings)


class ScrapeCache:
    """The last scrape's outcome, for `ttl` seconds: its body, or its error (a database that
    is away is not asked again by every scrape waiting in line). One read at a time:
    concurrent scrapes wait for it and share it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._outcome: bytes | Exception | None = None
        self._at = 0.0

    async def get(self, ttl: float, read: Callable[[], Awaitable[bytes]]) -> bytes:
        async with self._lock:
            if self._outcome is None or time.monotonic() - self._at >= ttl:
                try:
                    self._outcome = await read()
                except Exception as error:
                    self._outcome = error
                self._at = time.monotonic()
            if isinstance(self._outcome, Exception):
                raise self._outcome
            return self._outcome
