-- ops_queue_depth.failed_last_hour (`agentpay_jobs_failed_last_hour`) as 0018 made it, with
-- two failures it passed over now counted:
-- - a job of a task that only acts on payments that ended without money — `void_intent`
--   (cancels the PaymentIntent of a failed payment) and `check_late_money` (looks at one
--   that took money all the same) — counts until the same work succeeds: 0018 took every
--   failure of such a payment as dealt with, so these never alerted;
-- - a failed `catch_up_events` (no payment) is dealt with once a later listing finished
--   (provider_event_cursor.listed_at, 0021): 0018 matched jobs by their payment_id, which
--   it has not, so its failure counted for the whole hour.
-- The columns are unchanged.
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
