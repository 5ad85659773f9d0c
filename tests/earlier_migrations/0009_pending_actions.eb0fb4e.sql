-- An agent that asked for something on a payment (a capture, a cancel, a refund) learns how it
-- ended by waiting on the payment (GET /v1/payments/{id}/wait): the payment object says what
-- is still pending (`pending_action`), and a waiter is woken when that changes, not only when
-- the status does. A refused capture or cancel leaves the status as it was and clears the
-- request; a refund that fails leaves the payment as it was: before, neither woke anyone.
--
-- `refunds_pending`: how many of the payment's refunds are `pending`, kept by a trigger on
-- payment_refunds in the same transaction as the refund's own change, so it is never out of
-- step with the refunds.

ALTER TABLE payment_jobs
    ADD COLUMN refunds_pending integer NOT NULL DEFAULT 0 CHECK (refunds_pending >= 0);

UPDATE payment_jobs p
   SET refunds_pending = r.n
  FROM (SELECT payment_id, count(*) AS n FROM payment_refunds
         WHERE status = 'pending' GROUP BY payment_id) r
 WHERE r.payment_id = p.id;

CREATE FUNCTION payment_refunds_count_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    delta integer := 0;
    payment text;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'pending' THEN
        delta := delta + 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'pending' THEN
        delta := delta - 1;
    END IF;
    IF delta <> 0 THEN
        payment := CASE WHEN TG_OP = 'DELETE' THEN OLD.payment_id ELSE NEW.payment_id END;
        UPDATE payment_jobs SET refunds_pending = refunds_pending + delta WHERE id = payment;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_refunds_count_pending
    AFTER INSERT OR UPDATE OF status OR DELETE ON payment_refunds
    FOR EACH ROW EXECUTE FUNCTION payment_refunds_count_pending();

-- The wake-up (0003's trigger, same function, same payload) fires on what an agent waits for.
DROP TRIGGER payment_jobs_notify_status ON payment_jobs;
CREATE TRIGGER payment_jobs_notify_status
    AFTER UPDATE OF status, capture_requested_at, cancel_requested_at, refunds_pending
    ON payment_jobs
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                       OR NEW.capture_requested_at IS DISTINCT FROM OLD.capture_requested_at
                       OR NEW.cancel_requested_at IS DISTINCT FROM OLD.cancel_requested_at
                       OR NEW.refunds_pending IS DISTINCT FROM OLD.refunds_pending)
    EXECUTE FUNCTION payment_jobs_notify_status();
