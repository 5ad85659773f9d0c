-- /metrics, `agentpay status` and the /ops page read every ops view on each scrape. Two of
-- them counted their whole table every time (ops_transition_counts every payment event,
-- ops_webhook_counts every webhook event), and ops_stuck_payments read every payment: with a
-- million payments one snapshot took over two seconds, growing with the history, until
-- scrapes time out. Now:
--
-- * The counts are kept as they happen: a trigger adds each new event to a running total,
--   one row per (label values, backend). A backend only ever writes its own rows
--   (`backend` = pg_backend_pid()), so no two transactions wait on the same counter row (no
--   hot row, as the ledger's platform accounts have none, 0006) and a rolled-back event
--   rolls its count back. The maintenance round folds the rows of backends that are gone
--   into backend 0 (`ops_fold_counts()`), so the tables stay as small as the set of live
--   connections. A view sums them: a few hundred rows, whatever the history.
-- * ops_stuck_payments reads only payments in a non-final state, through the
--   (status, updated_at) index.
--
-- The views keep their columns. Events and webhook events are append-only, so the totals
-- equal the counts the views used to make (tests/test_operations.py checks they agree).
-- CREATE TRIGGER waits for transactions writing the event tables to finish and holds new
-- ones until this migration commits: the totals start exactly where the backfill ends.
-- Payment steps wait meanwhile: about a second per two million payment events counted.

CREATE TABLE ops_transition_totals (
    from_status text NOT NULL,  -- '' for a payment's creation
    to_status   text NOT NULL,
    backend     integer NOT NULL,  -- pg_backend_pid() of the writer; 0 once folded
    total       bigint NOT NULL,
    PRIMARY KEY (from_status, to_status, backend)
);

CREATE TABLE ops_webhook_totals (
    type    text NOT NULL,
    outcome text NOT NULL,  -- 'handled' | 'ignored'
    backend integer NOT NULL,
    total   bigint NOT NULL,
    PRIMARY KEY (type, outcome, backend)
);

CREATE FUNCTION payment_events_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ops_transition_totals AS t (from_status, to_status, backend, total)
    VALUES (coalesce(NEW.from_status, ''), coalesce(NEW.to_status, ''), pg_backend_pid(), 1)
    ON CONFLICT (from_status, to_status, backend) DO UPDATE SET total = t.total + 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_events_count
    AFTER INSERT ON payment_events
    FOR EACH ROW WHEN (NEW.type IN ('created', 'transition'))
    EXECUTE FUNCTION payment_events_count();

CREATE FUNCTION webhook_events_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ops_webhook_totals AS t (type, outcome, backend, total)
    VALUES (NEW.type, CASE WHEN NEW.handled THEN 'handled' ELSE 'ignored' END,
            pg_backend_pid(), 1)
    ON CONFLICT (type, outcome, backend) DO UPDATE SET total = t.total + 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_events_count
    AFTER INSERT ON webhook_events
    FOR EACH ROW EXECUTE FUNCTION webhook_events_count();

-- A total is only ever moved, never lost: a handled event cannot become ignored later.
CREATE FUNCTION webhook_events_outcome_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'webhook_events.type and .handled are fixed once stored'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER webhook_events_outcome_fixed
    BEFORE UPDATE OF type, handled ON webhook_events
    FOR EACH ROW WHEN (OLD.type IS DISTINCT FROM NEW.type
                       OR OLD.handled IS DISTINCT FROM NEW.handled)
    EXECUTE FUNCTION webhook_events_outcome_fixed();

INSERT INTO ops_transition_totals (from_status, to_status, backend, total)
SELECT coalesce(from_status, ''), coalesce(to_status, ''), 0, count(*)
  FROM payment_events
 WHERE type IN ('created', 'transition')
 GROUP BY 1, 2;

INSERT INTO ops_webhook_totals (type, outcome, backend, total)
SELECT type, CASE WHEN handled THEN 'handled' ELSE 'ignored' END, 0, count(*)
  FROM webhook_events
 GROUP BY 1, 2;

-- Move the totals of backends that are gone into backend 0; returns how many rows it
-- folded. Rows another transaction holds are skipped (their backend is busy: alive), so
-- the fold never waits on, or deadlocks with, a step that is counting.
CREATE FUNCTION ops_fold_counts() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    transitions bigint;
    webhooks bigint;
BEGIN
    WITH gone AS (
        DELETE FROM ops_transition_totals
         WHERE (from_status, to_status, backend) IN (
               SELECT from_status, to_status, backend FROM ops_transition_totals
                WHERE backend <> 0
                  AND backend NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
                FOR UPDATE SKIP LOCKED)
        RETURNING from_status, to_status, total
    ), folded AS (
        INSERT INTO ops_transition_totals AS t (from_status, to_status, backend, total)
        SELECT from_status, to_status, 0, sum(total) FROM gone GROUP BY 1, 2
        ON CONFLICT (from_status, to_status, backend) DO UPDATE SET total = t.total + EXCLUDED.total
    )
    SELECT count(*) INTO transitions FROM gone;

    WITH gone AS (
        DELETE FROM ops_webhook_totals
         WHERE (type, outcome, backend) IN (
               SELECT type, outcome, backend FROM ops_webhook_totals
                WHERE backend <> 0
                  AND backend NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
                FOR UPDATE SKIP LOCKED)
        RETURNING type, outcome, total
    ), folded AS (
        INSERT INTO ops_webhook_totals AS t (type, outcome, backend, total)
        SELECT type, outcome, 0, sum(total) FROM gone GROUP BY 1, 2
        ON CONFLICT (type, outcome, backend) DO UPDATE SET total = t.total + EXCLUDED.total
    )
    SELECT count(*) INTO webhooks FROM gone;

    RETURN transitions + webhooks;
END;
$$;

CREATE OR REPLACE VIEW ops_transition_counts AS
SELECT from_status, to_status, sum(total)::bigint AS total
  FROM ops_transition_totals
 GROUP BY 1, 2
 ORDER BY 1, 2;

CREATE OR REPLACE VIEW ops_webhook_counts AS
SELECT type, outcome, sum(total)::bigint AS total
  FROM ops_webhook_totals
 GROUP BY 1, 2
 ORDER BY 1, 2;

CREATE OR REPLACE VIEW ops_stuck_payments AS
WITH candidates AS (
    -- Payments in a state the fleet, an operator or an agent must move on from. The list
    -- names every non-final state but partially_refunded (payment_states stays the judge:
    -- tests/test_operations.py checks the list covers them): the planner then estimates
    -- each state from its statistics and reads payment_jobs_status_updated_idx, where a
    -- join on payment_states alone made it read every payment.
    SELECT p.*, p.updated_at AS since, false AS refund_pending
      FROM payment_jobs p
      JOIN payment_states s ON s.status = p.status AND NOT s.is_final
     WHERE p.status IN ('received', 'priced', 'in_review', 'approved', 'charging',
                        'requires_action', 'authorized', 'succeeded')
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
