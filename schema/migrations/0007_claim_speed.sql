-- Claims without planning: procrastinate's fetch function with a generic plan that stays fast
-- under any backlog (issue 7; docs/operations.md, "Keep claims fast").
--
-- 0005 made claims flat under a backlog with one partial index per role queue and a custom
-- plan for every call of procrastinate_fetch_job_v2. The bench's profile then showed that
-- function as the largest single cost in Postgres, ~0.8 ms a call, ~0.3 ms of it planning
-- (planned again on every call, against a dozen indexes). Every agentpay worker listens on
-- one queue, and with one queue the condition can be an equality: `queue_name =
-- target_queue_names[1]` reads the composite index below in (priority, id) order, so its
-- first entry is the job to claim, in a generic plan made once per connection, whatever
-- waits in other queues. Calls with several queues (or none) run procrastinate's statement
-- unchanged. Both statements are procrastinate's own (3.10), copied from its schema; should a
-- procrastinate upgrade replace the function, redo this copy on the new text
-- (tests/test_operations.py fails if the claim plan stops using the index).
-- One index for every queue replaces the per-queue ones: a new queue is fast too.
--
-- A generic plan does not know which queue it serves, so it estimates `queue_name = $1` as
-- 1 / (distinct queue names). When one queue holds (nearly) every waiting job, ANALYZE sees
-- one or two names, the estimate says "every row matches", and walking procrastinate's
-- (priority, id) index over all queues looks as cheap: measured 0.5 ms → 13 ms per claim at
-- 100,000 jobs waiting in another queue. Telling the planner the column has many distinct
-- values (a standing hint; ANALYZE keeps it) makes the per-queue read the cheaper plan in
-- every case. It only changes estimates for queue names not known at plan time.

CREATE INDEX procrastinate_jobs_todo_queue_idx
    ON procrastinate_jobs (queue_name, priority DESC, id) WHERE status = 'todo';
ALTER TABLE procrastinate_jobs ALTER COLUMN queue_name SET (n_distinct = 100);
DROP INDEX procrastinate_jobs_todo_pricing_idx;
DROP INDEX procrastinate_jobs_todo_risk_idx;
DROP INDEX procrastinate_jobs_todo_charge_idx;
DROP INDEX procrastinate_jobs_todo_reconcile_idx;

CREATE OR REPLACE FUNCTION procrastinate_fetch_job_v2(
    target_queue_names character varying[],
    p_worker_id bigint
)
    RETURNS procrastinate_jobs
    LANGUAGE plpgsql
AS $$
DECLARE
    found_jobs procrastinate_jobs;
BEGIN
    IF cardinality(target_queue_names) = 1 THEN
        WITH candidate AS (
            SELECT jobs.*
                FROM procrastinate_jobs AS jobs
                WHERE
                    -- reject the job if its lock has earlier or higher priority jobs
                    NOT EXISTS (
                        SELECT 1
                            FROM procrastinate_jobs AS other_jobs
                            WHERE
                                jobs.lock IS NOT NULL
                                AND other_jobs.lock = jobs.lock
                                AND (
                                    -- job with same lock is already running
                                    other_jobs.status = 'doing'
                                    OR
                                    -- job with same lock is waiting and has higher priority (or same priority but was queued first)
                                    (
                                        other_jobs.status = 'todo'
                                        AND (
                                            other_jobs.priority > jobs.priority
                                            OR (
                                            other_jobs.priority = jobs.priority
                                            AND other_jobs.id < jobs.id
                                            )
                                        )
                                    )
                                )
                    )
                    AND jobs.status = 'todo'
                    AND jobs.queue_name = target_queue_names[1]
                    AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
                ORDER BY jobs.priority DESC, jobs.id ASC LIMIT 1
                FOR UPDATE OF jobs SKIP LOCKED
        )
        UPDATE procrastinate_jobs
            SET status = 'doing', worker_id = p_worker_id
            FROM candidate
            WHERE procrastinate_jobs.id = candidate.id
            RETURNING procrastinate_jobs.* INTO found_jobs;
    ELSE
        WITH candidate AS (
            SELECT jobs.*
                FROM procrastinate_jobs AS jobs
                WHERE
                    -- reject the job if its lock has earlier or higher priority jobs
                    NOT EXISTS (
                        SELECT 1
                            FROM procrastinate_jobs AS other_jobs
                            WHERE
                                jobs.lock IS NOT NULL
                                AND other_jobs.lock = jobs.lock
                                AND (
                                    -- job with same lock is already running
                                    other_jobs.status = 'doing'
                                    OR
                                    -- job with same lock is waiting and has higher priority (or same priority but was queued first)
                                    (
                                        other_jobs.status = 'todo'
                                        AND (
                                            other_jobs.priority > jobs.priority
                                            OR (
                                            other_jobs.priority = jobs.priority
                                            AND other_jobs.id < jobs.id
                                            )
                                        )
                                    )
                                )
                    )
                    AND jobs.status = 'todo'
                    AND (target_queue_names IS NULL OR jobs.queue_name = ANY( target_queue_names ))
                    AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
                ORDER BY jobs.priority DESC, jobs.id ASC LIMIT 1
                FOR UPDATE OF jobs SKIP LOCKED
        )
        UPDATE procrastinate_jobs
            SET status = 'doing', worker_id = p_worker_id
            FROM candidate
            WHERE procrastinate_jobs.id = candidate.id
            RETURNING procrastinate_jobs.* INTO found_jobs;
    END IF;

    RETURN found_jobs;
END;
$$;
ALTER FUNCTION procrastinate_fetch_job_v2(character varying[], bigint) RESET plan_cache_mode;
