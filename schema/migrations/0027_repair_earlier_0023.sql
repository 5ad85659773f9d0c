-- Databases migrated with an earlier text of 0023 (schema/earlier.py) are brought to what
-- its text in this release makes: the text first committed (e653bea) made no job_failures
-- and left ops_recent_failures as 0005 made it; it and the next (094ceb3) defined
-- ops_queue_depth without the later rules for failed refund jobs and cancel_unowned_intents.
-- The table and its index are made if missing and both views are defined again as 0023
-- defines them: on a database migrated with this release's 0023 nothing changes.
-- `agentpay migrate` applies it right after 0023 when the database has one of those texts.

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
              AND r.provider_status IN ('pending', 'requires_action'))
           -- and it failed of that (the job's last word: "is pending at the provider"), not
           -- of something on our side (a refused key) after an earlier look saw it pending
           AND EXISTS (
           SELECT 1 FROM payment_events pe
            WHERE pe.payment_id = j.args ->> 'payment_id' AND pe.type = 'job_failed'
              AND pe.data ->> 'job_id' = j.id::text
              AND pe.data ->> 'error_type' = 'TransientError'))
       AND (j.task_name IN ('void_intent', 'cancel_unowned_intents', 'check_late_money')
            OR NOT EXISTS (
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

CREATE TABLE IF NOT EXISTS job_failures (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    job_id      bigint NOT NULL,
    role        text NOT NULL,
    task        text NOT NULL,
    attempts    integer NOT NULL,
    error_type  text NOT NULL,
    error       text NOT NULL
);
CREATE INDEX IF NOT EXISTS job_failures_at_idx ON job_failures (at);

CREATE OR REPLACE VIEW ops_recent_failures AS
SELECT * FROM (
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
           e.actor,
           CASE WHEN e.type = 'job_failed' THEN e.data ->> 'task' END AS task
      FROM payment_events e
      JOIN payment_jobs p ON p.id = e.payment_id
     WHERE (e.type IN ('job_failed', 'reconcile_mismatch') OR e.to_status IN ('failed', 'rejected'))
       AND e.type <> 'reconcile_mismatch'
       AND e.created_at > now() - interval '24 hours'
    UNION ALL
    SELECT f.at, 'job', NULL, f.role, f.job_id, NULL, f.error_type, f.error,
           'worker:' || f.role, f.task
      FROM job_failures f
     WHERE f.at > now() - interval '24 hours'
) failures
ORDER BY at DESC;
