-- A dispute the customer won (a chargeback lost) takes the disputed amount back out of what
-- the provider holds for us: the ledger now books it (before, provider clearing and platform
-- fees kept counting money that was gone). One transaction per lost dispute, kind
-- `dispute_lost`, reference the provider's dispute id (`dp_…`): provider clearing and
-- platform fees give the amount up in the proportion a refund uses, and the new platform
-- account `disputes_lost` (per currency, no running balance) takes it — what disputes have
-- cost. The agent's budget is not given back (tasks/ledger.py, docs/ledger.md).
--
-- Both checks are replaced by wider ones NOT VALID: every existing row met the narrower
-- check they replace, and validating would scan ledger_transactions (several rows per
-- payment) while this migration holds its lock. New and updated rows are checked as ever.
ALTER TABLE ledger_accounts
    DROP CONSTRAINT ledger_accounts_kind_check,
    ADD CONSTRAINT ledger_accounts_kind_check
        CHECK (kind IN ('agent_budget', 'agent_holds', 'external_funding', 'provider_clearing',
                        'platform_fees', 'disputes_lost')) NOT VALID;

ALTER TABLE ledger_transactions
    DROP CONSTRAINT ledger_transactions_kind_check,
    ADD CONSTRAINT ledger_transactions_kind_check
        CHECK (kind IN ('deposit', 'hold', 'capture', 'release', 'refund', 'dispute_lost'))
        NOT VALID;
