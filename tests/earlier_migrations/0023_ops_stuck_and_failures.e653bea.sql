-- Operators were shown less, or more, than there is:
--
-- * A refund pending at the provider never showed as stuck. ops_stuck_payments measured it
--   from its latest updated_at, and every look at it (the job's retries, the sweep's
--   re-drive every AGENTPAY_SWEEP_AFTER_SECONDS) set that to now(): it stayed younger than
--   the threshold for ever. It is measured from the refund's created_at (when it was asked
--   for, through payment_refunds_pending_idx), and a look that finds it still pending no
--   longer moves its updated_at (tasks/refunds.py).
-- * A payment both not moving and with a refund pending was two rows (a UNION ALL), so
--   agentpay_stuck_payments counted it twice. One row per payment now, from the older of
--   the two; the new last column `stuck_on` says why: `not_moving`, `refund_pending`, or
--   both (`not_moving,refund_pending`). The other columns are unchanged.
-- * ops_queue_depth.failed_last_hour (the failed-job alert) counted a refund job that ran
--   out of retries while the provider still held its refund `pending` — nothing failed,
--   nothing to fix or retry: the provider has not finished. Such a refund is the stuck
--   alert's (above, from when it was asked for), not this one's. Otherwise as 0022 made it;
--   the columns are unchanged.
CREATE OR REPLACE VIEW ops_stuck_payments AS
WITH not_moving AS (
    -- Payments in a state the fleet, an operator or an agent must move on from (the list as
    -- 0014 gave it, read through payment_jobs_status_updated_idx).
    SELECT p.*, p.updated_at AS since
      FROM payment_jobs p
      JOIN payment_states s ON s.status = p.status AND NOT s.is_final
     WHERE p.status IN ('received', 'priced', 'in_review', 'approved', 'charging',
                        'requires_action', 'authorized', 'succeeded')
       AND p.updated_at < now() - make_interval(secs => ops_setting('agentpay.stuck_after_seconds', 300))
), refund_pending AS (
    -- Payments with a refund pending since it was asked for, from the oldest such refund
    -- (through payment_refunds_pending_idx).
    SELECT payment_id, min(created_at) AS since
      FROM payment_refunds
     WHERE status = 'pending'
       AND created_at < now() - make_interval(secs => ops_setting('agentpay.stuck_after_seconds', 300))
     GROUP BY payment_id
), both_ways AS (
    -- Each payment once: read once from payment_jobs, by the index or by its id.
    SELECT m.*, r.since AS refund_since
      FROM not_moving m
      LEFT JOIN refund_pending r ON r.payment_id = m.id
    UNION ALL
    SELECT p.*, NULL::timestamptz AS since, r.since AS refund_since
      FROM refund_pending r
      JOIN payment_jobs p ON p.id = r.payment_id
     WHERE NOT EXISTS (SELECT 1 FROM not_moving m WHERE m.id = r.payment_id)
), candidates AS (
    SELECT b.*,
           b.refund_since IS NOT NULL AS refund_pending,
           least(b.since, b.refund_since) AS stuck_since,
           concat_ws(',', CASE WHEN b.since IS NOT NULL THEN 'not_moving' END,
                          CASE WHEN b.refund_since IS NOT NULL THEN 'refund_pending' END)
               AS stuck_on
      FROM both_ways b
)
SELECT p.id AS payment_id,
       p.agent_id,
       p.status,
       CASE
           WHEN p.refund_pending THEN 'fleet'
           WHEN p.status = 'in_review' THEN 'operator'
           WHEN p.status IN ('authorized', 'requires_action')
                AND p.capture_requested_at IS NULL AND p.cancel_requested_at IS NULL THEN 'agent'
           ELSE 'fleet'
       END AS waiting_on,
       p.amount_total,
       p.currency,
       p.stuck_since AS updated_at,
       extract(epoch FROM now() - p.stuck_since)::double precision AS stuck_seconds,
       ev.type AS last_event_type,
       ev.actor AS last_event_actor,
       ev.reason AS last_event_reason,
       ev.created_at AS last_event_at,
       job.id AS job_id,
       job.status::text AS job_status,
       job.attempts AS job_attempts,
       p.stuck_on
  FROM candidates p
  LEFT JOIN LATERAL (
      SELECT e.type, e.actor, e.reason, e.created_at FROM payment_events e
       WHERE e.payment_id = p.id ORDER BY e.id DESC LIMIT 1
  ) ev ON true
  LEFT JOIN LATERAL (
      SELECT j.id, j.status, j.attempts FROM procrastinate_jobs j
       WHERE j.args ->> 'payment_id' = p.id AND j.status IN ('todo', 'doing')
       ORDER BY j.id DESC LIMIT 1
  ) job ON true
 ORDER BY p.stuck_since;

CREATE OR REPLACE VIEW ops_queue_depth AS
WITH live AS (
    SELECT queue_name,
           count(*) FILTER (WHERE status = 'todo'
                              AND (scheduled_at IS NULL OR scheduled_at <= now())) AS waiting,
           count(*) FILTER (WHERE status = 'todo' AND scheduled_at > now()) AS scheduled,
           count(*) FILTER (WHERE status = 'doing') AS running,
           min(id) FILTER (WHERE status = 'todo' AND scheduled_at IS NULL) AS oldest_id,
           min(scheduled_at) FILTER (WHERE status = 'todo' AND scheduled_at <= now())
               AS oldest_scheduled_at
      FROM procrastinate_jobs
     WHERE status IN ('todo', 'doing')
     GROUP BY queue_name
), failed AS (
    SELECT j.queue_name, count(DISTINCT j.id) AS failed_last_hour
      FROM procrastinate_events e
      JOIN procrastinate_jobs j ON j.id = e.job_id
     WHERE e.type = 'failed'
       AND e.at > now() - interval '1 hour'
       AND j.status = 'failed'
       AND NOT EXISTS (
           SELECT 1 FROM procrastinate_jobs k
            WHERE k.args ->> 'payment_id' = j.args ->> 'payment_id'
              AND k.task_name = j.task_name AND k.args = j.args
              AND k.id > j.id AND k.status = 'succeeded')
       AND NOT (j.task_name = 'catch_up_events' AND EXISTS (
           SELECT 1 FROM provider_event_cursor c WHERE c.listed_at > e.at))
       AND NOT (j.task_name = 'refund' AND EXISTS (
           SELECT 1 FROM payment_refunds r
            WHERE r.id = j.args ->> 'refund_id' AND r.status = 'pending'
              AND r.provider_status IN ('pending', 'requires_action')))
       AND (j.task_name IN ('void_intent', 'check_late_money') OR NOT EXISTS (
           SELECT 1 FROM payment_jobs p
            WHERE p.id = j.args ->> 'payment_id'
              AND p.status IN ('canceled', 'rejected', 'failed')))
       AND NOT (j.task_name IN ('pricing', 'risk', 'charge', 'reconcile') AND EXISTS (
           SELECT 1 FROM payment_events pe
            WHERE pe.payment_id = j.args ->> 'payment_id'
              AND pe.type = 'transition' AND pe.created_at > e.at))
     GROUP BY j.queue_name
), queues AS (
    SELECT role AS queue_name, position FROM ops_roles
    UNION
    SELECT queue_name, 100 FROM live WHERE queue_name NOT IN (SELECT role FROM ops_roles)
)
SELECT q.queue_name AS role,
       coalesce(l.waiting, 0)::bigint AS waiting,
       coalesce(l.scheduled, 0)::bigint AS scheduled,
       coalesce(l.running, 0)::bigint AS running,
       coalesce(extract(epoch FROM now() - least(
           (SELECT e.at FROM procrastinate_events e
             WHERE e.job_id = l.oldest_id AND e.type = 'deferred' ORDER BY e.id LIMIT 1),
           l.oldest_scheduled_at)), 0)::double precision AS oldest_waiting_seconds,
       coalesce(f.failed_last_hour, 0)::bigint AS failed_last_hour
  FROM queues q
  LEFT JOIN live l ON l.queue_name = q.queue_name
  LEFT JOIN failed f ON f.queue_name = q.queue_name
 ORDER BY q.position, q.queue_name;
