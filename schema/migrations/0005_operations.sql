-- Operations: what operators read (views named ops_*), and what keeps claims fast.
--
-- Every view here is what `agentpay status`, /metrics and the /ops page read, so the three
-- always agree. Thresholds come from transaction-local settings when a caller sets them
-- (`SET agentpay.stuck_after_seconds = 60` in psql), else from the defaults written below.

-- ---------------------------------------------------------------------------------------
-- Fast claims under backlog.
--
-- procrastinate_fetch_job_v2 picks `ORDER BY priority DESC, id LIMIT 1` among todo jobs with
-- `queue_name = ANY($1)`. Its only ordered index is (priority DESC, id) over *all* queues, so
-- with 100,000 jobs waiting in one queue a claim on another walks past all of them (EXPLAIN
-- ANALYZE: "Rows Removed by Filter: 100000", ~50x the empty-database time). A composite
-- (queue_name, priority DESC, id) index does not help: the planner cannot read `= ANY(array)`
-- in index order. One partial index per role queue does: with the queue known at plan time,
-- `queue_name = ANY('{risk}')` implies the index predicate and the first index entry is the
-- job to claim. "Known at plan time" needs a custom plan: plpgsql caches the statement, and
-- after five calls may switch to a generic plan (queue unknown, back to the shared index) —
-- typically while queues are empty, to be paid for when a backlog forms. Force custom plans
-- for this one function (planning costs ~0.1 ms; the claim stays flat with any backlog).
CREATE INDEX procrastinate_jobs_todo_pricing_idx ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND queue_name = 'pricing';
CREATE INDEX procrastinate_jobs_todo_risk_idx ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND queue_name = 'risk';
CREATE INDEX procrastinate_jobs_todo_charge_idx ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND queue_name = 'charge';
CREATE INDEX procrastinate_jobs_todo_reconcile_idx ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND queue_name = 'reconcile';
ALTER FUNCTION procrastinate_fetch_job_v2(character varying[], bigint)
    SET plan_cache_mode = force_custom_plan;

-- Jobs of a payment (the stuck-payment sweep, `agentpay payments show`, the stuck view).
CREATE INDEX procrastinate_jobs_payment_idx ON procrastinate_jobs ((args ->> 'payment_id'));
-- Finished jobs by time (throughput, failures in the last hour, pruning).
CREATE INDEX procrastinate_events_finished_idx ON procrastinate_events (at)
    WHERE type IN ('succeeded', 'failed', 'cancelled', 'aborted');
-- Incidents by time (recent failures, reconcile mismatches).
CREATE INDEX payment_events_incidents_idx ON payment_events (created_at)
    WHERE type IN ('job_failed', 'reconcile_mismatch') OR to_status IN ('failed', 'rejected');

-- ---------------------------------------------------------------------------------------
-- Thresholds: a transaction-local setting when present, else the default.
CREATE FUNCTION ops_setting(name text, fallback double precision)
RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting(name, true), '')::double precision, fallback)
$$;

-- The role queues, always listed (a role with nothing to do shows zeros).
CREATE VIEW ops_roles (role, position) AS
    VALUES ('pricing', 1), ('risk', 2), ('charge', 3), ('reconcile', 4);

-- Queue depth per role: waiting (due now), scheduled (due later), running, the age of the
-- oldest waiting job, and jobs that failed for good in the last hour.
CREATE VIEW ops_queue_depth AS
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
    SELECT j.queue_name, count(*) AS failed_last_hour
      FROM procrastinate_events e
      JOIN procrastinate_jobs j ON j.id = e.job_id
     WHERE e.type IN ('succeeded', 'failed', 'cancelled', 'aborted')
       AND e.type = 'failed'
       AND e.at > now() - interval '1 hour'
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

-- Jobs finished per role over the last minutes, and how long they ran (started → finished).
CREATE VIEW ops_throughput AS
WITH finished AS (
    SELECT j.queue_name, e.type, e.at,
           extract(epoch FROM e.at - (
               SELECT max(s.at) FROM procrastinate_events s
                WHERE s.job_id = e.job_id AND s.type = 'started' AND s.at <= e.at
           )) AS seconds
      FROM procrastinate_events e
      JOIN procrastinate_jobs j ON j.id = e.job_id
     WHERE e.type IN ('succeeded', 'failed', 'cancelled', 'aborted')
       AND e.at > now() - interval '15 minutes'
)
SELECT r.role,
       count(f.*) FILTER (WHERE f.type = 'succeeded' AND f.at > now() - interval '1 minute')
           AS succeeded_1m,
       count(f.*) FILTER (WHERE f.type = 'succeeded' AND f.at > now() - interval '5 minutes')
           AS succeeded_5m,
       count(f.*) FILTER (WHERE f.type = 'succeeded') AS succeeded_15m,
       count(f.*) FILTER (WHERE f.type = 'failed' AND f.at > now() - interval '5 minutes')
           AS failed_5m,
       round((count(f.*) FILTER (WHERE f.type = 'succeeded'
                                  AND f.at > now() - interval '5 minutes') / 300.0)::numeric,
             3)::double precision AS per_second_5m,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY f.seconds)
           FILTER (WHERE f.at > now() - interval '5 minutes') AS p50_seconds_5m,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY f.seconds)
           FILTER (WHERE f.at > now() - interval '5 minutes') AS p95_seconds_5m
  FROM ops_roles r
  LEFT JOIN finished f ON f.queue_name = r.role
 GROUP BY r.role, r.position
 ORDER BY r.position;

-- Payments that have not moved for longer than agentpay.stuck_after_seconds (default 300),
-- with who they wait on, their last event and the job (if any) that should move them.
-- waiting_on: 'fleet' (a worker should move it: page someone if it is here), 'operator'
-- (in review), 'agent' (authorized: capture or cancel; requires_action: the customer).
CREATE VIEW ops_stuck_payments AS
SELECT p.id AS payment_id,
       p.agent_id,
       p.status,
       CASE p.status
           WHEN 'in_review' THEN 'operator'
           WHEN 'authorized' THEN 'agent'
           WHEN 'requires_action' THEN 'agent'
           ELSE 'fleet'
       END AS waiting_on,
       p.amount_total,
       p.currency,
       p.updated_at,
       extract(epoch FROM now() - p.updated_at)::double precision AS stuck_seconds,
       ev.type AS last_event_type,
       ev.actor AS last_event_actor,
       ev.reason AS last_event_reason,
       ev.created_at AS last_event_at,
       job.id AS job_id,
       job.status::text AS job_status,
       job.attempts AS job_attempts
  FROM payment_jobs p
  JOIN payment_states s ON s.status = p.status AND NOT s.is_final
  LEFT JOIN LATERAL (
      SELECT e.type, e.actor, e.reason, e.created_at FROM payment_events e
       WHERE e.payment_id = p.id ORDER BY e.id DESC LIMIT 1
  ) ev ON true
  LEFT JOIN LATERAL (
      SELECT j.id, j.status, j.attempts FROM procrastinate_jobs j
       WHERE j.args ->> 'payment_id' = p.id AND j.status IN ('todo', 'doing')
       ORDER BY j.id DESC LIMIT 1
  ) job ON true
 WHERE p.status <> 'partially_refunded'
   AND p.updated_at < now() - make_interval(secs => ops_setting('agentpay.stuck_after_seconds', 300))
 ORDER BY p.updated_at;

-- Payments waiting for an operator's decision, oldest first, with why they are there.
CREATE VIEW ops_review_queue AS
SELECT p.id AS payment_id,
       p.agent_id,
       p.amount_total,
       p.currency,
       p.payment_method,
       p.updated_at AS in_review_since,
       extract(epoch FROM now() - p.updated_at)::double precision AS waiting_seconds,
       ev.reason,
       ev.data AS risk
  FROM payment_jobs p
  LEFT JOIN LATERAL (
      SELECT e.reason, e.data FROM payment_events e
       WHERE e.payment_id = p.id AND e.to_status = 'in_review' AND e.type = 'transition'
       ORDER BY e.id DESC LIMIT 1
  ) ev ON true
 WHERE p.status = 'in_review'
 ORDER BY p.updated_at;

-- What failed in the last 24 hours and why: payments that ended failed or rejected, and jobs
-- that failed for good (recorded by the worker with the error).
CREATE VIEW ops_recent_failures AS
SELECT e.created_at AS at,
       CASE WHEN e.type = 'job_failed' THEN 'job' ELSE 'payment' END AS kind,
       e.payment_id,
       coalesce(e.data ->> 'role', '') AS role,
       (e.data ->> 'job_id')::bigint AS job_id,
       CASE WHEN e.type = 'job_failed' THEN e.from_status ELSE e.to_status END AS status,
       coalesce(CASE WHEN e.type = 'job_failed' THEN e.data ->> 'error_type' END,
                p.failure_code, e.to_status) AS code,
       coalesce(CASE WHEN e.type = 'job_failed' THEN e.data ->> 'error' END,
                p.failure_message, e.reason, '') AS reason,
       e.actor
  FROM payment_events e
  JOIN payment_jobs p ON p.id = e.payment_id
 WHERE (e.type IN ('job_failed', 'reconcile_mismatch') OR e.to_status IN ('failed', 'rejected'))
   AND e.type <> 'reconcile_mismatch'
   AND e.created_at > now() - interval '24 hours'
 ORDER BY e.created_at DESC;

-- Where the provider disagreed with a payment (one row per field reconcile found wrong,
-- from the reconcile_mismatches table), newest first.
CREATE VIEW ops_reconcile_mismatches AS
SELECT m.found_at AS at,
       m.payment_id,
       p.status,
       coalesce(m.provider_payment_id, p.provider_payment_id) AS provider_payment_id,
       m.field,
       m.expected,
       m.actual
  FROM reconcile_mismatches m
  JOIN payment_jobs p ON p.id = m.payment_id
 ORDER BY m.found_at DESC, m.id DESC;

-- Provider webhook events received (each stored once), by type and outcome: 'handled' (it
-- concerned a payment and was acted on) or 'ignored' (stored, not for us).
CREATE VIEW ops_webhook_counts AS
SELECT type,
       CASE WHEN handled THEN 'handled' ELSE 'ignored' END AS outcome,
       count(*)::bigint AS total
  FROM webhook_events
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- Every status change ever made, by from/to ('' for a payment's creation). Append-only
-- input, so each count only grows: /metrics exposes them as counters.
CREATE VIEW ops_transition_counts AS
SELECT coalesce(from_status, '') AS from_status, to_status, count(*)::bigint AS total
  FROM payment_events
 WHERE type IN ('created', 'transition')
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- Worker processes by heartbeat, with the jobs each holds.
CREATE VIEW ops_workers AS
SELECT w.id AS worker_id,
       w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat)::double precision AS heartbeat_age_seconds,
       count(j.id)::bigint AS running,
       coalesce(string_agg(DISTINCT j.queue_name, ','), '') AS queues
  FROM procrastinate_workers w
  LEFT JOIN procrastinate_jobs j ON j.worker_id = w.id AND j.status = 'doing'
 GROUP BY w.id
 ORDER BY w.id;
