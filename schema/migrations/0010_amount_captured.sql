-- What the provider collected for a payment. It is less than `amount_total` when part of an
-- authorized payment was captured at the provider (a partial capture in the Stripe
-- Dashboard), and the rest of the authorization released there. Reconcile writes it as the
-- payment becomes `reconciled`; the ledger's capture posts this much and gives the rest of
-- the hold back, and refunds count against it, not against the total. NULL (every payment
-- reconciled before this migration, and every one not reconciled yet) reads as the total.
--
-- The checks are NOT VALID: they hold for every row written from now on, and adding them does
-- not scan the table under its exclusive lock (the rows already there cannot break them: the
-- column is new, and `amount_refunded <= amount_total` is checked since 0001).

ALTER TABLE payment_jobs ADD COLUMN amount_captured bigint;

ALTER TABLE payment_jobs
    ADD CONSTRAINT payment_jobs_amount_captured_check
    CHECK (amount_captured IS NULL OR amount_captured BETWEEN 0 AND amount_total) NOT VALID;

ALTER TABLE payment_jobs
    ADD CONSTRAINT payment_jobs_refunded_within_captured_check
    CHECK (amount_refunded <= coalesce(amount_captured, amount_total, 0)) NOT VALID;
