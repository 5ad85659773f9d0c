-- An operator settles a reconcile mismatch (refunds the money by hand, confirms the provider
-- was right) and marks it resolved: who, when and how. ops_reconcile_mismatches, and so
-- `agentpay status`, the /ops page and the `agentpay_reconcile_mismatches_open` gauge, show
-- only the open ones (they showed every mismatch ever found, forever); the
-- `agentpay_reconcile_mismatches_total` counter still counts all, so an alert on its
-- increase is not fooled by a resolution. The view gains the mismatch's `id` (the handle to
-- resolve it by), at its end.

ALTER TABLE reconcile_mismatches
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolved_by text,
    ADD COLUMN resolution  text,
    ADD CHECK ((resolved_at IS NULL) = (resolved_by IS NULL));

CREATE INDEX reconcile_mismatches_open_idx ON reconcile_mismatches (found_at)
    WHERE resolved_at IS NULL;

CREATE OR REPLACE VIEW ops_reconcile_mismatches AS
SELECT m.found_at AS at,
       m.payment_id,
       p.status,
       coalesce(m.provider_payment_id, p.provider_payment_id) AS provider_payment_id,
       m.field,
       m.expected,
       m.actual,
       m.id
  FROM reconcile_mismatches m
  JOIN payment_jobs p ON p.id = m.payment_id
 WHERE m.resolved_at IS NULL
 ORDER BY m.found_at DESC, m.id DESC;
