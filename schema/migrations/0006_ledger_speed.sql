-- The ledger off the payment path's hot rows (issue 7, docs/ledger.md).
--
-- Until now every entry moved its account's `balance` with an UPDATE, platform accounts
-- included: every hold of an agent without a budget updated the one `external_funding` row of
-- its currency, every capture the one `provider_clearing` and `platform_fees` rows, and each
-- kept that row lock until its COMMIT had flushed — risk and reconcile steps of all agents ran
-- one at a time. From here on only agent accounts (budget, holds) keep a materialised
-- balance, because the budget check needs it and they are per agent; a platform account's
-- balance is the sum of its entries, computed on read (`ledger_account_balances`).

-- Entries move the materialised balance of agent accounts only (still one
-- `UPDATE … SET balance = balance + amount`: no read-modify-write, no lost update, and the
-- never-below-zero CHECK of budget and holds accounts). A platform account's row is looked at
-- and not locked: the WHERE clause does not match it.
CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ledger_accounts SET balance = balance + NEW.amount
    WHERE id = NEW.account_id AND kind IN ('agent_budget', 'agent_holds');
    RETURN NULL;
END;
$$;

-- Platform accounts carry no running balance: what 0004 materialised for them is dropped
-- (it is derived data; every entry stays), and the column stays zero for them for good.
ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_guard;
UPDATE ledger_accounts SET balance = 0
WHERE kind NOT IN ('agent_budget', 'agent_holds') AND balance <> 0;
ALTER TABLE ledger_accounts ENABLE TRIGGER ledger_accounts_guard;
ALTER TABLE ledger_accounts
    ADD CONSTRAINT ledger_accounts_platform_unmaterialised
        CHECK (kind IN ('agent_budget', 'agent_holds') OR balance = 0);
COMMENT ON COLUMN ledger_accounts.balance IS
    'Agent budget and holds accounts: the sum of the account''s entries, kept by a trigger. '
    'Platform accounts: always 0 — their balance is the sum of their entries, read it from '
    'ledger_account_balances.';

-- Operators' view: every account's balance (materialised for agent accounts, the sum of the
-- entries for platform accounts) and the sum of its entries side by side; they differ only
-- if an agent account's materialised balance went wrong (`tasks.ledger.problems()`).
CREATE OR REPLACE VIEW ledger_account_balances AS
SELECT a.id, a.kind, a.agent_id, a.currency,
       CASE WHEN a.kind IN ('agent_budget', 'agent_holds') THEN a.balance
            ELSE s.total::bigint END AS balance,
       s.total AS entries_sum
FROM ledger_accounts a
CROSS JOIN LATERAL (
    SELECT coalesce(sum(e.amount), 0) AS total FROM ledger_entries e WHERE e.account_id = a.id
) s;
