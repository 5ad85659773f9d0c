-- Stuck requests are the fleet's to move: a capture or cancel asked for (the payment waits in
-- `authorized` / `requires_action`, but on a charge job, not on the agent) and a refund still
-- `pending` (its payment is `reconciled` or `partially_refunded`, which 0005's view left
-- out). Both now show in ops_stuck_payments with waiting_on = 'fleet', so the
-- `agentpay_stuck_payments{waiting_on="fleet"}` alert covers them, as docs/operations.md
-- says. Same columns as before; a payment with a pending refund is stuck since that refund
-- last changed.

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
