-- Reads that stayed fast on a young database and took seconds on one with a year of traffic
-- (1.5 million payments, 9 million events, 2.6 million ledger entries). Each index is built
-- while it holds its table's writes, as earlier ones (seconds per million rows; the fleet's
-- jobs and the API's requests wait, then go on).

-- An agent's payments in a state, in the order its pages list them: a page filtered by
-- status (`GET /v1/payments?status=…`; tasks/payments.py, `page`, one branch per status)
-- with a date bound or a cursor walked the created_at index of all the agent's payments and
-- filtered (2–5 s with 500,000 of them, whatever any other agent asked), and so did the
-- count of its payments in flight (`agentpay agents revoke`).
CREATE INDEX payment_jobs_agent_status_created_idx
    ON payment_jobs (agent_id, status, created_at DESC, id DESC);

-- Sums of an account's entries (`ledger_account_balances` for the platform accounts, which
-- keep no running balance; a statement page's entries newer than it) from the index alone.
CREATE INDEX ledger_entries_account_amount_idx ON ledger_entries (account_id, id)
    INCLUDE (amount);
DROP INDEX ledger_entries_account_idx;

-- Payments that name a Customer (`agentpay customers list --shared`): a few, among all.
CREATE INDEX payment_jobs_customer_idx ON payment_jobs (customer, agent_id)
    WHERE customer IS NOT NULL;

-- The last 15 minutes' finished jobs, read from the time index of their events: the planner
-- started from the jobs (every job ever kept, with a look-up of events for each: 1.3 s with
-- 300,000 jobs kept). Materialized, the window is read first. The same in api/metrics.py.
CREATE OR REPLACE VIEW ops_throughput AS
WITH finished AS MATERIALIZED (
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
