-- Stuck requests are the fleet's to move: a capture or cancel asked for (the payment waits in
-- `authorized` / `requires_action`, but on a charge job, not on the agent) and a refund still
-- `pending` (its payment is `reconciled` or `partially_refunded`, which 0005's view left
-- out). Both now show in ops_stuck_payments with waiting_on = 'fleet', so the
-- `agentpay_stuck_payments{waiting_on="fleet"}` alert covers them, as docs/operations.md
-- says. Same columns as before; a payment with a pending refund is stuck since that refund
-- last changed.
--
-- And ops_queue_depth.failed_last_hour counts jobs that failed within the hour and are still
-- failed (it counted failure events: a job that failed twice counted twice, and one an
-- operator had retried after fixing the cause kept the alert firing for the hour).

CREATE OR REPLACE VIEW ops_stuck_payments AS
WITH candidates AS (
    -- Payments in a state the fleet, an operator or an agent must move on from.
    SELECT p.*, p.updated_at AS since, false AS refund_pending
      FROM payment_jobs p
      JOIN payment_states s ON s.status = p.status AND NOT s.is_final
     WHERE p.status <> 'partially_refunded'
       AND p.updated_at < now() - make_interval(secs => ops_setting('agentpay.stuck_after_seconds', 300))
    UNION ALL
    -- Payments with a refund still pending, from the oldest such refund.
    SELECT p.*, r.since, true AS refund_pending
      FROM (SELECT payment_id, min(updated_at) AS since FROM payment_refunds
             WHERE status = 'pending' GROUP BY payment_id) r
      JOIN payment_jobs p ON p.id = r.payment_id
     WHERE r.since < now() - make_interval(secs => ops_setting('agentpay.stuck_after_seconds', 300))
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
       p.since AS updated_at,
       extract(epoch FROM now() - p.since)::double precision AS stuck_seconds,
       ev.type AS last_event_type,
       ev.actor AS last_event_actor,
       ev.reason AS last_event_reason,
       ev.created_at AS last_event_at,
       job.id AS job_id,
       job.status::text AS job_status,
       job.attempts AS job_attempts
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
 ORDER BY p.since;

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
