-- What lost disputes (chargebacks the customer's bank won) took back of a payment, for the
-- agent to read on the payment itself: it was told only by the payment's `dispute` events,
-- and the payment's state does not change when a dispute is lost. The ledger's
-- `dispute_lost` postings to `disputes_lost` (0020) are the truth; the column follows them in
-- the same transaction (tasks/disputes.py, tasks/refunds.py). Filled here from the postings
-- already made (a payment has at most a few; the column's default costs no table rewrite).

ALTER TABLE payment_jobs ADD COLUMN amount_lost_to_disputes bigint NOT NULL DEFAULT 0;

UPDATE payment_jobs p
   SET amount_lost_to_disputes = lost.amount
  FROM (SELECT t.payment_id, sum(e.amount) AS amount
          FROM ledger_transactions t
          JOIN ledger_entries e ON e.transaction_id = t.id
          JOIN ledger_accounts a ON a.id = e.account_id
         WHERE t.kind = 'dispute_lost' AND a.kind = 'disputes_lost'
         GROUP BY t.payment_id) AS lost
 WHERE p.id = lost.payment_id AND lost.amount <> 0;

-- NOT VALID: every row meets it (the column is new), and validating would scan the table
-- under this migration's lock.
ALTER TABLE payment_jobs
    ADD CONSTRAINT payment_jobs_amount_lost_to_disputes_check
    CHECK (amount_lost_to_disputes >= 0) NOT VALID;
