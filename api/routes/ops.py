"""Operators: the /ops page, and the steering actions (retry or cancel a job, cancel a
payment) behind both the operator routes here and `agentpay jobs|payments` (workers/cli_ops.py).

Every action is recorded in `payment_events` with the operator's identity
(`operator:<name>`), in the same transaction as the action itself; a retry or cancel of a job
without a payment in `operator_audit` (`job.retry`, `job.cancel`).
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ConfigDict, Field

from api.deps import OperatorDep, PoolDep
from api.errors import ApiError, responses
from api.idempotency import IdempotencyDep
from api.metrics import Snapshot, read_snapshot
from api.models import ApiModel, Payment, SafeText
from tasks import audit, charge, payments
from tasks.db import Conn

router = APIRouter(tags=["operations"])

ERRORS = responses(
    400,
    401,
    403,
    404,
    409,
    413,
    429,
    500,
    described={404: "No such job or payment", 409: "Its state does not allow the action"},
)


# -- the steering actions (shared with the CLI) ----------------------------------------------


class Refused(Exception):
    """The action does not apply: `code` is 'not_found' or 'conflict'."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _lock_job(conn: Conn, job_id: int) -> dict[str, Any]:
    cur = await conn.execute(
        """SELECT id, queue_name, task_name, status::text AS status, attempts, scheduled_at,
                  args ->> 'payment_id' AS payment_id
             FROM procrastinate_jobs WHERE id = %s FOR UPDATE""",
        (job_id,),
    )
    job = await cur.fetchone()
    if job is None:
        raise Refused("not_found", f"No job {job_id}")
    return job


# The operator audit's action for a job without a payment (or whose payment is gone).
_AUDIT_ACTIONS = {"operator_job_retry": "job.retry", "operator_job_cancel": "job.cancel"}


async def _record_job_action(
    conn: Conn, job: dict[str, Any], type_: str, *, actor: str, reason: str | None, **data: Any
) -> None:
    """In the job's payment's events; a job without a payment (`catch_up_events`) in the
    operator audit (`job.retry`, `job.cancel`, subject the job id)."""
    data = {"job_id": job["id"], "role": job["queue_name"], "task": job["task_name"], **data}
    payment = await payments.get(conn, job["payment_id"]) if job["payment_id"] else None
    if payment is None:
        await audit.record(
            conn, _AUDIT_ACTIONS[type_], str(job["id"]), {**data, "reason": reason}, actor=actor
        )
        return
    await payments.record_event(conn, payment, type_, actor=actor, reason=reason, data=data)


async def resolve_mismatch(
    conn: Conn, mismatch_id: int, *, actor: str, reason: str
) -> dict[str, Any]:
    """Mark a reconcile mismatch settled by an operator (who, when, how: `reason`), with a
    `mismatch_resolved` event on its payment. Refused: an unknown id (not_found), one
    resolved already (conflict). Runs in the caller's transaction."""
    cur = await conn.execute(
        """SELECT id, payment_id, field, expected, actual, found_at, resolved_at, resolved_by,
                  resolution
             FROM reconcile_mismatches WHERE id = %s FOR UPDATE""",
        (mismatch_id,),
    )
    found = await cur.fetchone()
    if found is None:
        raise Refused("not_found", f"No reconcile mismatch {mismatch_id}")
    if found["resolved_at"] is not None:
        raise Refused(
            "conflict",
            f"Reconcile mismatch {mismatch_id} was resolved already, by "
            f"{found['resolved_by']} at {found['resolved_at']:%Y-%m-%d %H:%M:%S %Z}.",
        )
    cur = await conn.execute(
        """UPDATE reconcile_mismatches SET resolved_at = now(), resolved_by = %s, resolution = %s
            WHERE id = %s
        RETURNING resolved_at, resolved_by, resolution""",
        (actor, reason, mismatch_id),
    )
    found |= await cur.fetchone() or {}
    payment = await payments.get(conn, found["payment_id"])
    assert payment is not None  # a foreign key
    await payments.record_event(
        conn,
        payment,
        "mismatch_resolved",
        actor=actor,
        reason=reason,
        data={"mismatch_id": mismatch_id, "field": found["field"]},
    )
    return found


async def retry_job(
    conn: Conn, job_id: int, *, actor: str, reason: str | None = None
) -> dict[str, Any]:
    """Run a job again now: a failed job goes back to the queue with its retries whole (unless
    another job already does the same work: refused); a waiting job scheduled for later
    becomes due now. A running job is refused (if its worker died, the stalled-job rescue
    puts it back by itself). Runs in the caller's transaction."""
    job = await _lock_job(conn, job_id)
    if job["status"] == "failed":
        cur = await conn.execute(
            """SELECT o.id FROM procrastinate_jobs o, procrastinate_jobs j
                WHERE j.id = %s AND o.id <> j.id AND o.task_name = j.task_name
                  AND o.args = j.args AND o.status IN ('todo', 'doing')
                LIMIT 1""",
            (job_id,),
        )
        other = await cur.fetchone()
        if other is not None:
            # The sweep (or someone) has put the same work back already: two would race.
            raise Refused(
                "conflict",
                f"Job {other['id']} already does this work (waiting or running); "
                f"job {job_id} stays failed.",
            )
        # Back in the queue with its retries whole again: procrastinate counts the failed
        # tries, and a job that used them all would fail for good at its first glitch. A
        # cancel asked while it ran is over (a waiting job may not carry it).
        await conn.execute(
            "UPDATE procrastinate_jobs SET abort_requested = false WHERE id = %s", (job_id,)
        )
        await conn.execute(
            "SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", (job_id,)
        )
        await conn.execute("UPDATE procrastinate_jobs SET attempts = 0 WHERE id = %s", (job_id,))
    elif job["status"] == "todo":
        await conn.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE id = %s", (job_id,)
        )
    else:
        raise Refused(
            "conflict",
            f"Job {job_id} is {job['status']}; only a failed or waiting job can be retried.",
        )
    await _record_job_action(
        conn, job, "operator_job_retry", actor=actor, reason=reason, job_status=job["status"]
    )
    return await _job(conn, job_id)


async def cancel_job(
    conn: Conn, job_id: int, *, actor: str, reason: str | None = None
) -> dict[str, Any]:
    """Cancel a job: a waiting job will not run; a running one is asked to abort (its worker
    stops it within seconds; every step is safe to interrupt). A payment left with no job
    that is not final is driven on again by the stuck-payment sweep — to stop a payment,
    cancel the payment. Runs in the caller's transaction."""
    job = await _lock_job(conn, job_id)
    if job["status"] not in ("todo", "doing"):
        raise Refused(
            "conflict",
            f"Job {job_id} is {job['status']}; only a waiting or running job can be canceled.",
        )
    await conn.execute(
        "SELECT procrastinate_cancel_job_v1(%s, %s, false)", (job_id, job["status"] == "doing")
    )
    await _record_job_action(
        conn, job, "operator_job_cancel", actor=actor, reason=reason, job_status=job["status"]
    )
    return await _job(conn, job_id)


async def cancel_payment(
    conn: Conn, payment_id: str, *, actor: str, reason: str | None = None
) -> payments.Payment:
    """Cancel a payment as an operator (tasks.charge.request_cancel: at once when it has not
    reached the provider, through the provider when charging, authorized or
    requires_action)."""
    payment = await payments.lock(conn, payment_id)
    if payment is None:
        raise Refused("not_found", f"No payment {payment_id}")
    try:
        return await charge.request_cancel(
            conn, payment, actor=actor, reason=reason or "canceled by an operator"
        )
    except ValueError as error:
        raise Refused("conflict", str(error)) from error


async def _job(conn: Conn, job_id: int) -> dict[str, Any]:
    cur = await conn.execute(
        """SELECT id, queue_name AS role, task_name AS task, status::text AS status, attempts,
                  scheduled_at, abort_requested, args ->> 'payment_id' AS payment_id
             FROM procrastinate_jobs WHERE id = %s""",
        (job_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def payment_timeline(conn: Conn, payment_id: str) -> dict[str, Any] | None:
    """One payment: its row, every event, every job still in the queue table (finished ones
    are pruned after a while; their effects are in the events), and its refunds."""
    payment = await payments.get(conn, payment_id)
    if payment is None:
        return None
    events = await payments.events(conn, payment_id)
    cur = await conn.execute(
        """SELECT j.id, j.queue_name AS role, j.task_name AS task, j.status::text AS status,
                  j.attempts, j.scheduled_at,
                  (SELECT min(e.at) FROM procrastinate_events e
                    WHERE e.job_id = j.id AND e.type = 'deferred') AS deferred_at,
                  (SELECT max(e.at) FROM procrastinate_events e
                    WHERE e.job_id = j.id AND e.type IN ('succeeded', 'failed', 'cancelled',
                                                          'aborted')) AS finished_at
             FROM procrastinate_jobs j
            WHERE j.args ->> 'payment_id' = %s
            ORDER BY j.id""",
        (payment_id,),
    )
    jobs = await cur.fetchall()
    cur = await conn.execute(
        """SELECT id, amount, currency, status, provider_refund_id, created_at
             FROM payment_refunds WHERE payment_id = %s ORDER BY created_at""",
        (payment_id,),
    )
    refunds = await cur.fetchall()
    return {
        "payment": payments.public(payment),
        "provider": {
            "payment_id": payment["provider_payment_id"],
            "idempotency_key": payment["provider_idempotency_key"],
        },
        "events": events,
        "jobs": jobs,
        "refunds": refunds,
    }


def _raise(error: Refused) -> ApiError:
    if error.code == "not_found":
        return ApiError(404, "resource_missing", error.message, type_="invalid_request_error")
    return ApiError(409, "invalid_state", error.message, type_="invalid_request_error")


class Action(ApiModel):
    model_config = ConfigDict(extra="forbid")

    reason: SafeText | None = Field(
        default=None, max_length=500, description="Why (kept in events)"
    )


class Resolution(ApiModel):
    model_config = ConfigDict(extra="forbid")

    reason: SafeText = Field(
        min_length=1,
        max_length=500,
        description="What was done about it (kept with the mismatch and in the events)",
    )


class Job(ApiModel):
    id: int
    role: str
    task: str
    status: str
    attempts: int
    scheduled_at: datetime | None
    abort_requested: bool
    payment_id: str | None


@router.post("/v1/ops/jobs/{job_id}/retry", response_model=Job, responses=ERRORS)
async def retry_job_route(
    job_id: int, operator: OperatorDep, idem: IdempotencyDep, body: Action | None = None
) -> Response:
    """Run a job again now: a failed job goes back to its queue; a job scheduled for later
    becomes due now. A running job is refused."""
    async with idem.transaction() as conn:
        try:
            job = await retry_job(
                conn, job_id, actor=operator.actor, reason=body.reason if body else None
            )
        except Refused as error:
            raise _raise(error) from error
        return await idem.respond(Job.model_validate(job))


@router.post("/v1/ops/jobs/{job_id}/cancel", response_model=Job, responses=ERRORS)
async def cancel_job_route(
    job_id: int, operator: OperatorDep, idem: IdempotencyDep, body: Action | None = None
) -> Response:
    """Cancel a waiting job, or ask a running one to abort."""
    async with idem.transaction() as conn:
        try:
            job = await cancel_job(
                conn, job_id, actor=operator.actor, reason=body.reason if body else None
            )
        except Refused as error:
            raise _raise(error) from error
        return await idem.respond(Job.model_validate(job))


@router.post("/v1/ops/payments/{payment_id}/cancel", response_model=Payment, responses=ERRORS)
async def cancel_payment_route(
    payment_id: str, operator: OperatorDep, idem: IdempotencyDep, body: Action | None = None
) -> Response:
    """Cancel any agent's payment (not yet at the provider: at once; charging, authorized or
    requires_action: through the provider)."""
    async with idem.transaction() as conn:
        try:
            payment = await cancel_payment(
                conn, payment_id, actor=operator.actor, reason=body.reason if body else None
            )
        except Refused as error:
            raise _raise(error) from error
        return await idem.respond(Payment.model_validate(payments.public(payment)))


class Mismatch(ApiModel):
    id: int
    payment_id: str
    field: str
    expected: Any
    actual: Any
    found_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None


@router.post("/v1/ops/mismatches/{mismatch_id}/resolve", response_model=Mismatch, responses=ERRORS)
async def resolve_mismatch_route(
    mismatch_id: int, operator: OperatorDep, idem: IdempotencyDep, body: Resolution
) -> Response:
    """Mark a reconcile mismatch settled, saying what was done (`reason`, required: a
    difference about money is not closed without an explanation): it leaves
    `ops_reconcile_mismatches` and the open-mismatch gauge."""
    async with idem.transaction() as conn:
        try:
            found = await resolve_mismatch(
                conn, mismatch_id, actor=operator.actor, reason=body.reason
            )
        except Refused as error:
            raise _raise(error) from error
        return await idem.respond(Mismatch.model_validate(found))


@router.get("/v1/ops/status", responses=ERRORS)
async def status_route(_: OperatorDep, pool: PoolDep, request: Request) -> dict[str, Any]:
    """What `agentpay status --json` prints: every ops view at one instant."""
    async with pool.connection() as conn:
        snapshot = await read_snapshot(conn, request.app.state.settings)
    return snapshot.as_json()


@router.get("/v1/ops/payments/{payment_id}", responses=ERRORS)
async def payment_route(_: OperatorDep, payment_id: str, pool: PoolDep) -> dict[str, Any]:
    """One payment's timeline: events, jobs, refunds and provider ids."""
    async with pool.connection() as conn:
        found = await payment_timeline(conn, payment_id)
    if found is None:
        raise ApiError(404, "resource_missing", f"No payment {payment_id}")
    return found


# -- the page ---------------------------------------------------------------------------------


@router.get("/ops", response_class=HTMLResponse, include_in_schema=False)
async def ops_page(
    _: OperatorDep,
    pool: PoolDep,
    request: Request,
    refresh: Annotated[int, Query(ge=0, le=3600, description="Seconds; 0: never")] = 5,
) -> HTMLResponse:
    """The operators' page: queues per role, throughput, stuck payments, the review queue,
    recent failures and reconcile mismatches, refreshing itself every `refresh` seconds."""
    async with pool.connection() as conn:
        snapshot = await read_snapshot(conn, request.app.state.settings)
    return HTMLResponse(render_page(snapshot, refresh), headers={"Cache-Control": "no-store"})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return html.escape(str(value))


def _table(
    title: str, rows: list[dict[str, Any]], columns: list[str], *, total: int | None = None
) -> str:
    shown = f" ({total})" if total is not None else ""
    out = [f"<section><h2>{html.escape(title)}{shown}</h2>"]
    if not rows:
        out.append("<p class=none>none</p></section>")
        return "".join(out)
    out.append("<table><thead><tr>")
    out += [f"<th>{html.escape(c)}</th>" for c in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append(
            "<tr>" + "".join(f'<td data-col="{c}">{_cell(row.get(c))}</td>' for c in columns)
        )
        out.append("</tr>")
    out.append("</tbody></table></section>")
    return "".join(out)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse} th,td{padding:.2em .7em;border-bottom:1px solid #ddd;
text-align:left} td{font-variant-numeric:tabular-nums} .none{color:#888}
.alert{color:#b00;font-weight:bold} .meta{color:#666}
"""


def render_page(s: Snapshot, refresh: int) -> str:
    fleet_stuck = s.stuck_by_waiting_on()["fleet"]
    head = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    alerts = []
    if fleet_stuck:
        alerts.append(f"{fleet_stuck} payment(s) stuck in the fleet")
    for q in s.queues:
        if q["failed_last_hour"]:
            alerts.append(f"{q['role']}: {q['failed_last_hour']} job(s) failed in the last hour")
    alert_html = "".join(f'<p class="alert">{html.escape(a)}</p>' for a in alerts)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        head,
        "<title>agentpay operations</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>agentpay operations</h1>",
        f'<p class="meta">as of {_cell(s.at)} UTC'
        + (f" · refreshes every {refresh}s" if refresh else "")
        + "</p>",
        alert_html,
        _table(
            "Queues",
            s.queues,
            [
                "role",
                "waiting",
                "scheduled",
                "running",
                "oldest_waiting_seconds",
                "failed_last_hour",
            ],
        ),
        _table(
            "Throughput",
            s.throughput,
            [
                "role",
                "succeeded_1m",
                "succeeded_5m",
                "failed_5m",
                "per_second_5m",
                "p50_seconds_5m",
                "p95_seconds_5m",
            ],
        ),
        _table(
            f"Stuck payments (no move for {s.stuck_after_seconds:g}s)",
            s.stuck,
            [
                "payment_id",
                "status",
                "waiting_on",
                "stuck_on",
                "stuck_seconds",
                "last_event_type",
                "last_event_actor",
                "last_event_reason",
                "job_id",
                "job_status",
            ],
            total=s.counts["stuck"],
        ),
        _table(
            "Review queue",
            s.review,
            ["payment_id", "agent_id", "amount_total", "currency", "waiting_seconds", "reason"],
            total=s.counts["review"],
        ),
        _table(
            "Recent failures (24 h)",
            s.failures,
            ["at", "kind", "payment_id", "role", "task", "job_id", "status", "code", "reason"],
            total=s.counts["failures"],
        ),
        _table(
            "Reconcile mismatches",
            s.mismatches,
            [
                "id",
                "at",
                "payment_id",
                "status",
                "provider_payment_id",
                "field",
                "expected",
                "actual",
            ],
            total=s.counts["mismatches"],
        ),
        _table(
            "Workers",
            s.workers,
            ["worker_id", "role", "host", "pid", "heartbeat_age_seconds", "running"],
        ),
        "</body></html>",
    ]
    return "".join(parts)
