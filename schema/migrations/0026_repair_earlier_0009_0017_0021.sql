-- Databases migrated with an earlier text of a migration that was edited after it was first
-- committed (schema/earlier.py lists every such text) are brought to what this text of each
-- makes; on a database migrated with the texts in this release nothing changes. Each repair
-- looks for what only the earlier text made before it acts. `agentpay migrate` applies this
-- migration right after 0021 (before 0022, which reads 0021's `listed_at`) when the
-- database has one of those texts; otherwise in its turn.
--
-- 0009 as first committed: a CHECK (refunds_pending >= 0) that scanned the table (dropped), a
-- trigger function that added and took away one instead of recounting (it could drift: the
-- counts are made again from the refunds) and a trigger not fired on a refund's payment_id.

CREATE OR REPLACE FUNCTION payment_refunds_count_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'pending' THEN
        UPDATE payment_jobs SET refunds_pending = (
                   SELECT count(*) FROM payment_refunds
                    WHERE payment_id = OLD.payment_id AND status = 'pending')
         WHERE id = OLD.payment_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'pending'
       AND NOT (TG_OP = 'UPDATE' AND OLD.status = 'pending'
                AND OLD.payment_id = NEW.payment_id) THEN
        UPDATE payment_jobs SET refunds_pending = (
                   SELECT count(*) FROM payment_refunds
                    WHERE payment_id = NEW.payment_id AND status = 'pending')
         WHERE id = NEW.payment_id;
    END IF;
    RETURN NULL;
END;
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint
                WHERE conrelid = 'payment_jobs'::regclass
                  AND conname = 'payment_jobs_refunds_pending_check') THEN
        ALTER TABLE payment_jobs DROP CONSTRAINT payment_jobs_refunds_pending_check;
        UPDATE payment_jobs p
           SET refunds_pending = n.pending
          FROM (SELECT q.id, count(r.id) FILTER (WHERE r.status = 'pending') AS pending
                  FROM payment_jobs q LEFT JOIN payment_refunds r ON r.payment_id = q.id
                 GROUP BY q.id) n
         WHERE n.id = p.id AND p.refunds_pending <> n.pending;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger
                WHERE tgrelid = 'payment_refunds'::regclass
                  AND tgname = 'payment_refunds_count_pending'
                  AND pg_get_triggerdef(oid) NOT LIKE '%payment_id%') THEN
        DROP TRIGGER payment_refunds_count_pending ON payment_refunds;
        CREATE TRIGGER payment_refunds_count_pending
            AFTER INSERT OR UPDATE OF status, payment_id OR DELETE ON payment_refunds
            FOR EACH ROW EXECUTE FUNCTION payment_refunds_count_pending();
    END IF;
END;
$$;

-- 0017 as committed at 1a253cd: owner changes kept in a table of their own,
-- customer_owner_changes, which 0019's operator audit replaced. Its rows are moved there as
-- the audit records them (customer.bind / customer.unbind) and the table is dropped.
DO $$
BEGIN
    IF to_regclass('customer_owner_changes') IS NOT NULL THEN
        INSERT INTO operator_audit (at, actor, action, subject, data)
        SELECT at, actor,
               CASE WHEN agent_id IS NULL THEN 'customer.unbind' ELSE 'customer.bind' END,
               customer,
               jsonb_build_object('agent_id', agent_id, 'previous_agent_id', previous_agent_id)
          FROM customer_owner_changes
         ORDER BY id;
        DROP TABLE customer_owner_changes;
    END IF;
END;
$$;

-- 0021 as first committed: provider_event_cursor.checked_at, since split into asked_at (the
-- same moment: when a listing was last asked for) and listed_at (when one last finished).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
                WHERE table_schema = current_schema()
                  AND table_name = 'provider_event_cursor' AND column_name = 'checked_at') THEN
        ALTER TABLE provider_event_cursor RENAME COLUMN checked_at TO asked_at;
    END IF;
    -- Postgres 18 names a column's NOT NULL constraint after the column it was made on.
    IF EXISTS (SELECT 1 FROM pg_constraint
                WHERE conrelid = 'provider_event_cursor'::regclass
                  AND conname = 'provider_event_cursor_checked_at_not_null') THEN
        ALTER TABLE provider_event_cursor
            RENAME CONSTRAINT provider_event_cursor_checked_at_not_null
            TO provider_event_cursor_asked_at_not_null;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema()
                      AND table_name = 'provider_event_cursor'
                      AND column_name = 'listed_at') THEN
        ALTER TABLE provider_event_cursor ADD COLUMN listed_at timestamptz;
    END IF;
END;
$$;
