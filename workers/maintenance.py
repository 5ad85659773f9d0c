"""Maintenance services that keep the fleet healthy without anyone acting.

Each is a plain async function (testable on its own); `run_maintenance` runs them on an
interval in every worker process, one process at a time (an advisory lock elects the one):
- `rescue_stalled_jobs`: jobs of a worker that stopped heartbeating go back to the queue
  (not before the database has been back for as long, after an outage: see `run_once`);
- `sweep_stuck_payments`: a non-final payment with no job is driven on again;
- `recheck_waiting_payments`, `expire_abandoned_authentications`: a payment waiting on a
  person is looked at at the provider now and then, and canceled after a day of
  `requires_action`;
- `repair_dispute_losses` (every `sweep_after_seconds`): a lost dispute an API of an older
  release stored without booking it, or booked without `amount_lost_to_disputes`, is
  booked, or the column set, as this release does (during a deploy);
- every `event_catch_up_interval_seconds`, `catch_up_events` is deferred (tasks/catchup.py):
  refund and dispute events no webhook delivered are taken in from the provider's list;
- `prune_finished_jobs` (every `prune_interval_seconds`, every round while there is a
  backlog): finished procrastinate jobs are deleted after a retention, so the table every
  claim reads stays small — the history of every payment lives in payment_events;
  with it, `fold_counts` keeps the ops views' running totals as small as the set of live
  connections, and `prune_webhook_events` deletes provider webhook events after their
  retention.
"""

from __future__ import annotations

import asyncio
import logging

import procrastinate
import psycopg
from procrastinate.jobs import Status
from psycopg import sql

from tasks import catchup, charge, disputes, payments, refunds
from tasks.app import defer
from tasks.db import Pool
from tasks.settings import Settings

log = logging.getLogger("agentpay.maintenance")

_LOCK_KEY = 0x61676E746D  # "agntm"

# Which role moves a payment on from each non-final state it can wait in unattended.
NEXT_ROLE = {
    "received": "pricing",
    "priced": "risk",
    "approved": "charge",
    "charging": "reconcile",
    "succeeded": "reconcile",
}


async def rescue_stalled_jobs(app: procrastinate.App, stalled_after: float) -> list[int]:
    """Put back in the queue the jobs whose worker stopped heartbeating (killed, frozen,
    cut off). The steps they run are safe to run twice. One an operator canceled while it
    ran (`jobs cancel`), which its dead worker could not stop, ends `aborted` as asked
    (procrastinate's retry would mark it failed, and leave it impossible to retry)."""
    stalled = list(await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after))
    if not stalled:
        return []
    # (procrastinate's query of stalled jobs leaves `abort_requested` out: one query for all)
    # A rescued job is due now by the database's clock, which procrastinate's claim compares
    # with: by this worker's, one that runs fast left it waiting as long.
    asked = await app.connector.execute_query_one_async(
        """SELECT now() AS now,
                  coalesce(array_agg(id) FILTER (WHERE abort_requested), '{}') AS ids
             FROM procrastinate_jobs WHERE id = ANY(%(ids)s)""",
        ids=[job.id for job in stalled],
    )
    to_abort, now = set(asked["ids"]), asked["now"]
    rescued = []
    for job in stalled:
        assert job.id is not None
        aborted = job.id in to_abort
        if aborted:
            await app.job_manager.finish_job_by_id_async(
                job.id, status=Status.ABORTED, delete_job=False
            )
        else:
            await app.job_manager.retry_job_by_id_async(job.id, retry_at=now)
        log.warning(
            "rescued stalled job",
            extra={
                "job_id": job.id,
                "role": job.queue,
                "payment_id": job.task_kwargs.get("payment_id"),
                "outcome": "aborted" if aborted else "todo",
            },
        )
        rescued.append(job.id)
    return rescued


# No job for the payment waiting or running, and none of its jobs failed within the last
# `older_than` seconds: a job that fails for good (a bad key, a bug) is run again once per
# sweep period, not every maintenance round. (The payment itself does not change when its
# job fails, so its `updated_at` alone says nothing about the last try.) Refund jobs do not
# count: they drive no step, and before reconcile they wait for it (the refund by retrying,
# the refund sync by deferring itself again), so they would hide a payment whose reconcile
# failed for good.
_NO_JOB_LATELY = sql.SQL(
    """NOT EXISTS (
                     SELECT 1 FROM procrastinate_jobs j
                     WHERE j.args->>'payment_id' = p.id
                       AND j.task_name NOT IN ({sync}, {refund})
                       AND (j.status IN ('todo', 'doing')
                            OR (j.status = 'failed' AND EXISTS (
                                SELECT 1 FROM procrastinate_events e
                                 WHERE e.job_id = j.id AND e.type = 'failed'
                                   AND e.at > now() - make_interval(secs => %(older)s)))))"""
).format(sync=sql.Literal(refunds.SYNC_TASK), refund=sql.Literal(refunds.TASK))


async def sweep_stuck_payments(pool: Pool, older_than: float) -> list[str]:
    """Re-drive payments that sit in a non-final state longer than `older_than` seconds with
    no job waiting or running for them (a job that failed for good, a lost deferral)."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            sql.SQL("""SELECT p.id, p.status FROM payment_jobs p
               WHERE p.status = ANY(%(states)s)
                 AND p.updated_at < now() - make_interval(secs => %(older)s)
                 AND {no_job_lately}
               ORDER BY p.updated_at
               LIMIT 500
               FOR UPDATE OF p SKIP LOCKED""").format(no_job_lately=_NO_JOB_LATELY),
            {"states": list(NEXT_ROLE), "older": older_than},
        )
        stuck = await cur.fetchall()
        for row in stuck:
            await defer(conn, NEXT_ROLE[row["status"]], payment_id=row["id"])
    if stuck:
        log.warning("re-drove stuck payments", extra={"count": len(stuck)})
    return [row["id"] for row in stuck]


WAITING_ON_A_PERSON = ("authorized", "requires_action")


async def recheck_waiting_payments(pool: Pool, older_than: float) -> list[str]:
    """Payments waiting on a person (an agent's capture, a customer's 3-D Secure) can be moved
    on by the provider alone. So that a lost or late webhook never leaves one behind, defer a
    reconcile (it retrieves the PaymentIntent and settles the payment) for each that has not
    changed, and has not been looked at, for `older_than` seconds."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            """SELECT p.id FROM payment_jobs p
               WHERE p.status = ANY(%(states)s)
                 AND p.updated_at < now() - make_interval(secs => %(older)s)
                 AND NOT EXISTS (
                     SELECT 1 FROM procrastinate_jobs j
                       JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'deferred'
                      WHERE j.args->>'payment_id' = p.id AND j.task_name = 'reconcile'
                        AND (j.status IN ('todo', 'doing')
                             OR e.at > now() - make_interval(secs => %(older)s)))
               ORDER BY p.updated_at
               LIMIT 500
               FOR UPDATE OF p SKIP LOCKED""",
            {"states": list(WAITING_ON_A_PERSON), "older": older_than},
        )
        due = [row["id"] for row in await cur.fetchall()]
        for payment_id in due:
            await defer(conn, "reconcile", payment_id=payment_id)
    return due


# Who cancels a payment whose customer never completed 3-D Secure (its events' actor).
EXPIRY_ACTOR = "maintenance"


async def expire_abandoned_authentications(pool: Pool, older_than: float) -> list[str]:
    """Cancel each payment left `requires_action` (the customer never completed 3-D Secure)
    for `older_than` seconds: the provider keeps such a PaymentIntent open for good, its
    budget hold stayed, and the recheck of waiting payments looked at it at the provider
    every period for ever — a cost that grew with every abandoned payment. The cancel goes
    through the provider as an agent's would (`charge.request_cancel`): should the customer
    complete it meanwhile, the provider decides. Returns the payments canceled."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            """SELECT * FROM payment_jobs
               WHERE status = 'requires_action' AND cancel_requested_at IS NULL
                 AND updated_at < now() - make_interval(secs => %s)
               ORDER BY updated_at
               LIMIT 500
               FOR UPDATE SKIP LOCKED""",
            (older_than,),
        )
        expired = []
        for payment in await cur.fetchall():  # locked, as payments.lock reads one
            expired.append(payment["id"])
            await charge.request_cancel(
                conn,
                payment,
                actor=EXPIRY_ACTOR,
                reason=f"authentication not completed within {older_than:g}s",
            )
    if expired:
        log.warning("canceled %d payment(s) whose authentication was never completed", len(expired))
    return expired


async def sweep_stuck_requests(pool: Pool, older_than: float) -> list[str]:
    """Re-drive what an agent or operator asked for whose job is gone (failed for good after
    its retries, or lost): a capture of an `authorized` payment, a cancel of a `charging`,
    `authorized` or `requires_action` one, a refund still `pending`, the sync of refunds
    made outside agentpay whose latest job failed, and the void or the look at an intent of
    an ended payment (`void_intent`, `cancel_unowned_intents`, `check_late_money`) whose
    latest job failed; and books lost disputes left waiting on captured payments. The jobs
    are idempotent (stable provider keys; a provider refund is taken in once, by its id), so
    a re-drive never acts twice.
    Returns what was re-driven (payment ids, refund ids)."""
    redriven: list[str] = []
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            sql.SQL("""SELECT p.id, CASE WHEN p.cancel_requested_at IS NOT NULL THEN 'cancel'
                                 ELSE 'capture' END AS task
               FROM payment_jobs p
               WHERE ((p.status = ANY(%(cancel_in)s) AND p.cancel_requested_at IS NOT NULL)
                      OR (p.status = ANY(%(capture_in)s) AND p.capture_requested_at IS NOT NULL))
                 AND p.updated_at < now() - make_interval(secs => %(older)s)
                 AND {no_job_lately}
               ORDER BY p.updated_at
               LIMIT 500
               FOR UPDATE OF p SKIP LOCKED""").format(no_job_lately=_NO_JOB_LATELY),
            {
                "older": older_than,
                "cancel_in": sorted(payments.CANCEL_PENDING_IN),
                "capture_in": sorted(payments.CAPTURE_PENDING_IN),
            },
        )
        for row in await cur.fetchall():
            await defer(conn, row["task"], payment_id=row["id"])
            redriven.append(row["id"])
        cur = await conn.execute(
            """SELECT r.id, r.payment_id FROM payment_refunds r
               WHERE r.status = 'pending'
                 AND r.updated_at < now() - make_interval(secs => %s)
                 AND NOT EXISTS (
                     SELECT 1 FROM procrastinate_jobs j
                     WHERE j.args->>'payment_id' = r.payment_id AND j.args->>'refund_id' = r.id
                       AND (j.status IN ('todo', 'doing')
                            OR (j.status = 'failed' AND EXISTS (
                                SELECT 1 FROM procrastinate_events e
                                 WHERE e.job_id = j.id AND e.type = 'failed'
                                   AND e.at > now() - make_interval(secs => %s)))))
               ORDER BY r.created_at
               LIMIT 500
               FOR UPDATE OF r SKIP LOCKED""",
            (older_than, older_than),
        )
        for row in await cur.fetchall():
            await defer(conn, "refund", payment_id=row["payment_id"], refund_id=row["id"])
            redriven.append(row["id"])
        # The sync of refunds made outside agentpay: its latest job for the payment failed
        # for good (its retries ran out, or a worker of an older release did not know it),
        # so a refund made in the Dashboard would never be counted. Its job, run again.
        cur = await conn.execute(
            """SELECT p.id FROM procrastinate_jobs f
                 JOIN payment_jobs p ON p.id = f.args->>'payment_id'
                WHERE f.task_name = %(sync)s AND f.status = 'failed'  -- few: an index of them
                  AND p.status = ANY(%(states)s)
                  AND NOT EXISTS (  -- the payment's latest sync
                      SELECT 1 FROM procrastinate_jobs n
                       WHERE n.args->>'payment_id' = f.args->>'payment_id'
                         AND n.task_name = %(sync)s AND n.id > f.id)
                  AND NOT EXISTS (
                      SELECT 1 FROM procrastinate_events e
                       WHERE e.job_id = f.id AND e.type = 'failed'
                         AND e.at > now() - make_interval(secs => %(older)s))
                ORDER BY f.id
                LIMIT 500
                FOR UPDATE OF p SKIP LOCKED""",
            {"sync": refunds.SYNC_TASK, "states": sorted(refunds.SYNCABLE), "older": older_than},
        )
        for row in await cur.fetchall():
            await defer(conn, refunds.SYNC_TASK, payment_id=row["id"])
            redriven.append(row["id"])
        # The void of a failed payment's intent, the search for intents a canceled payment
        # never took, and the look at an ended payment's intent that took money: their
        # latest job for that work failed for good (the provider refused a key, or did not
        # know the intent for a while): run again, so an intent left open or money taken is
        # not forgotten once the hour of its alert has passed.
        cur = await conn.execute(
            """SELECT f.task_name, f.args FROM procrastinate_jobs f
                WHERE f.task_name = ANY(%(tasks)s) AND f.status = 'failed'
                  AND NOT EXISTS (
                      SELECT 1 FROM procrastinate_jobs n
                       WHERE n.args->>'payment_id' = f.args->>'payment_id'
                         AND n.task_name = f.task_name AND n.args = f.args AND n.id > f.id)
                  AND NOT EXISTS (
                      SELECT 1 FROM procrastinate_events e
                       WHERE e.job_id = f.id AND e.type = 'failed'
                         AND e.at > now() - make_interval(secs => %(older)s))
                ORDER BY f.id
                LIMIT 500""",
            {"tasks": REDRIVEN_BY_ARGS, "older": older_than},
        )
        for row in await cur.fetchall():
            await defer(conn, row["task_name"], **row["args"])
            redriven.append(str(row["args"].get("payment_id")))
    # Lost disputes left waiting on payments captured already (reconcile books them with the
    # capture; a release before it did not): in a transaction of their own, which locks
    # payments as refunds do, after the one above has let go of its rows.
    async with pool.connection() as conn, conn.transaction():
        redriven += await disputes.book_left_waiting(conn)
    if redriven:
        log.warning("re-drove stuck requests", extra={"count": len(redriven)})
    return redriven


async def repair_dispute_losses(pool: Pool) -> list[str]:
    """What an API of an older release, still serving webhooks during a deploy, left undone
    of a lost dispute: one that stored the event without booking it (before 0020) — the loss
    booked now as its event is (`disputes.book_missed`, one transaction per payment) — and
    one that booked it without `amount_lost_to_disputes` (before 0024) — the column set to
    what the ledger's postings say (`disputes.repair_lost_amounts`). Each repair is logged
    as a warning. Returns the payments repaired. Run once a sweep period (`Maintenance`)."""
    repaired: list[str] = []
    async with pool.connection() as conn:
        missed = await disputes.missed_payments(conn)
    for payment_id in missed:
        try:
            async with pool.connection() as conn, conn.transaction():
                done = await disputes.book_missed(conn, payment_id)
        except Exception as error:
            if database_lost(error):
                raise
            # One payment's failure (a lock or statement timeout, bad data) holds up no other.
            log.exception("booking a missed lost dispute failed", extra={"payment_id": payment_id})
            continue
        for item in done:
            log.warning(
                "lost dispute %s of payment %s booked by maintenance: the API that stored "
                "its event %s did not book it",
                item["dispute_id"],
                payment_id,
                item["event_id"],
                extra={"payment_id": payment_id, **item},
            )
        if done:
            repaired.append(payment_id)
    async with pool.connection() as conn, conn.transaction():
        fixed = await disputes.repair_lost_amounts(conn)
    for item in fixed:
        log.warning(
            "amount_lost_to_disputes of payment %s repaired: %s, the ledger's dispute postings "
            "say %s",
            item["payment_id"],
            item["was"],
            item["now"],
            extra=item,
        )
        repaired.append(item["payment_id"])
    return repaired


# The tasks whose failed job `sweep_stuck_requests` runs again unless a later job of the
# same work exists (the refund sync: of the same payment; the others: same arguments).
REDRIVEN_BY_ARGS = [charge.VOID_TASK, charge.UNOWNED_TASK, charge.LATE_TASK]
REDRIVEN_AFTER_FAILURE = [refunds.SYNC_TASK, *REDRIVEN_BY_ARGS]


async def prune_finished_jobs(
    pool: Pool, *, succeeded_after: float, failed_after: float, batch: int = 5000
) -> int:
    """Delete procrastinate jobs that finished longer ago than their retention: succeeded,
    cancelled or aborted ones after `succeeded_after` seconds, failed ones after
    `failed_after`, and with these the job_failures rows older than that. At most `batch`
    per call; returns how many jobs went (their events go with them). A job retried since
    it finished is not finished any more, and stays. So does a job of a task
    `sweep_stuck_requests` re-drives after a failure (`REDRIVEN_AFTER_FAILURE`) while a
    failed job it came after, for the same work, is kept: the sweep takes that failure as
    dealt with because the later job exists, and would run it again every sweep period
    until the failure is pruned too."""
    pruned = 0
    for statuses, keep in (
        (["succeeded", "cancelled", "aborted"], succeeded_after),
        (["failed"], failed_after),
    ):
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """WITH old AS (
                       SELECT j.id FROM procrastinate_events e
                         JOIN procrastinate_jobs j ON j.id = e.job_id
                        WHERE e.type IN ('succeeded', 'failed', 'cancelled', 'aborted')
                          AND e.type::text = ANY(%(statuses)s)
                          AND e.at < now() - make_interval(secs => %(keep)s)
                          AND j.status::text = ANY(%(statuses)s)
                          -- Finished long ago and not since (a job retried and finished
                          -- again has a newer event: its retention starts again).
                          AND NOT EXISTS (SELECT 1 FROM procrastinate_events n
                                           WHERE n.job_id = j.id
                                             AND n.at >= now() - make_interval(secs => %(keep)s))
                          AND NOT EXISTS (SELECT 1 FROM procrastinate_periodic_defers d
                                           WHERE d.job_id = j.id)
                          -- A later run of a failed job the sweep re-drives (the refund
                          -- sync, a void, a look at late money) is what tells the sweep
                          -- that failure was dealt with: it stays as long as the failure.
                          AND NOT (j.task_name = ANY(%(dealt)s) AND EXISTS (
                                   SELECT 1 FROM procrastinate_jobs f
                                    WHERE f.status = 'failed' AND f.task_name = j.task_name
                                      AND f.id < j.id
                                      AND f.args->>'payment_id' = j.args->>'payment_id'
                                      AND (f.task_name = %(sync)s OR f.args = j.args)))
                        ORDER BY e.at
                        LIMIT %(batch)s
                   )
                   -- The status again: a job retried since the CTE read it (an operator's
                   -- retry commits in between) is re-checked here, on its new row, and stays.
                   DELETE FROM procrastinate_jobs j USING old
                    WHERE j.id = old.id AND j.status::text = ANY(%(statuses)s)
                   RETURNING j.id""",
                {
                    "statuses": statuses,
                    "keep": keep,
                    "batch": batch,
                    "dealt": REDRIVEN_AFTER_FAILURE,
                    "sync": refunds.SYNC_TASK,
                },
            )
            pruned += len(await cur.fetchall())
            if statuses == ["failed"]:
                # The failures of jobs without a payment (ops_recent_failures), with them.
                await conn.execute(
                    "DELETE FROM job_failures WHERE at < now() - make_interval(secs => %s)",
                    (keep,),
                )
    if pruned:
        log.info("pruned finished jobs", extra={"count": pruned})
    return pruned


async def prune_webhook_events(pool: Pool, *, older_than: float, batch: int = 5000) -> int:
    """Delete provider webhook events that arrived more than `older_than` seconds ago, oldest
    first, at most `batch`; returns how many went (their counts stay in ops_webhook_totals)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """DELETE FROM webhook_events
                WHERE id IN (SELECT id FROM webhook_events
                              WHERE received_at < now() - make_interval(secs => %s)
                              ORDER BY received_at LIMIT %s)""",
            (older_than, batch),
        )
        pruned = cur.rowcount
    if pruned:
        log.info("pruned webhook events", extra={"count": pruned})
    return pruned


# The server is going away or gone (admin, crash or cannot-connect-now shutdowns), and the
# connection exceptions of class 08.
_GONE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def database_lost(error: BaseException) -> bool:
    """Whether `error`, or one in its chain, is the database going away: a connection that
    broke or could not be made (psycopg raises those without a SQLSTATE; so is a pool
    timeout), a connection exception (class 08) or a server shutting down. Not every
    `OperationalError` is: a statement or lock timeout, a deadlock or a full disk are
    answers of a database that is there."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, psycopg.OperationalError):
            state = seen.sqlstate
            if state is None or state.startswith("08") or state in _GONE_SQLSTATES:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


async def fold_counts(pool: Pool) -> int:
    """Fold the running totals of the ops views (transitions, webhook events) that backends
    no longer connected wrote into one row per label set (schema/migrations/0014); returns
    how many rows were folded."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT ops_fold_counts() AS n")
        row = await cur.fetchone()
    folded = int(row["n"]) if row else 0
    if folded:
        log.info("folded the totals of closed connections", extra={"count": folded})
    return folded


class Maintenance:
    """The services' schedule in one process (rescue and sweep every round; folding the
    ops totals and pruning every `prune_interval_seconds`, pruning every round while its
    batches come back full)."""

    def __init__(self, app: procrastinate.App, pool: Pool, settings: Settings) -> None:
        self.app = app
        self.pool = pool
        self.settings = settings
        self._next_prune = 0.0
        self._next_dispute_repair = 0.0
        self._lost = False
        self._back_at = float("-inf")  # when this process last got the database back

    def failed(self, error: BaseException) -> None:
        """A round failed. If it lost the database (`database_lost`), the rescue waits for
        the workers' heartbeats again once it is back (see `run_once`); any other failure (a
        bug, bad data, a statement or lock timeout, a job that finished while it was
        rescued) does not hold the rescue back."""
        if database_lost(error):
            self._lost = True

    async def run_once(self) -> bool:
        """One round, if no other process is running one; True if it ran.

        After the database restarted (or this process lost it for a while) every worker's
        heartbeat is as old as the outage: none could write one. A live worker's jobs would
        be rescued, and run twice, before it heartbeats again. So the stalled-job rescue,
        and the pruning of stalled workers' rows, wait until the database has been up, and
        reachable from here, for `stalled_after_seconds`."""
        s = self.settings
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """SELECT pg_try_advisory_xact_lock(%s) AS mine,
                          extract(epoch FROM now() - pg_postmaster_start_time()) AS up""",
                (_LOCK_KEY,),
            )
            row = await cur.fetchone()
            if not (row and row["mine"]):
                return False
            now = asyncio.get_running_loop().time()
            if self._lost:
                self._lost, self._back_at = False, now
            if min(float(row["up"]), now - self._back_at) >= s.stalled_after_seconds:
                await rescue_stalled_jobs(self.app, s.stalled_after_seconds)
                # Their workers are gone; their rows go once the `stalled` gauge and
                # `agentpay status` have shown them for long enough to alert on (a row pruned
                # at once would show for one maintenance round, less than a scrape interval).
                await self.app.job_manager.prune_stalled_workers(
                    max(s.stalled_worker_retention_seconds, s.stalled_after_seconds)
                )
            await sweep_stuck_payments(self.pool, s.sweep_after_seconds)
            await sweep_stuck_requests(self.pool, s.sweep_after_seconds)
            await recheck_waiting_payments(self.pool, s.recheck_waiting_after_seconds)
            await expire_abandoned_authentications(self.pool, s.requires_action_expire_seconds)
            await catchup.defer_if_due(conn, s.event_catch_up_interval_seconds)
            if now >= self._next_prune:
                self._next_prune = now + s.prune_interval_seconds  # also when it fails
                await fold_counts(self.pool)
                pruned = await prune_finished_jobs(
                    self.pool,
                    succeeded_after=s.prune_succeeded_after_seconds,
                    failed_after=s.prune_failed_after_seconds,
                    batch=s.prune_batch_size,
                )
                events = await prune_webhook_events(
                    self.pool, older_than=s.webhook_retention_days * 86400, batch=s.prune_batch_size
                )
                if max(pruned, events) >= s.prune_batch_size:
                    # A full batch: more are due (a fleet finishing more jobs than a batch an
                    # interval). Go on next round instead of falling further behind.
                    self._next_prune = now
            if now >= self._next_dispute_repair:
                # Once a sweep period, not every round: what it looks for comes only from
                # an API of an older release, during a deploy.
                self._next_dispute_repair = now + s.sweep_after_seconds  # also when it fails
                await repair_dispute_losses(self.pool)
        return True


async def run_maintenance(app: procrastinate.App, pool: Pool, settings: Settings) -> None:
    """Forever, every `maintenance_interval_seconds`; errors are logged, never fatal."""
    maintenance = Maintenance(app, pool, settings)
    while True:
        try:
            await maintenance.run_once()
        except Exception as error:
            maintenance.failed(error)
            log.exception("maintenance round failed; trying again next round")
        await asyncio.sleep(settings.maintenance_interval_seconds)
