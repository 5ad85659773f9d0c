-- Pricing, risk and the double-entry ledger of agent budgets (docs/ledger.md).

-- The price catalog: one unit amount per SKU and currency, managed by operators.
CREATE TABLE prices (
    sku         text NOT NULL CHECK (sku ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
    currency    text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    unit_amount bigint NOT NULL CHECK (unit_amount > 0),
    description text,
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, currency)
);

-- What pricing computed (lines, tax, fee, rounding) and what risk decided (rules, reasons).
ALTER TABLE payment_jobs
    ADD COLUMN price_breakdown jsonb,
    ADD COLUMN risk_decision   jsonb;

-- Velocity: an agent's recent payments in one currency.
CREATE INDEX payment_jobs_agent_currency_created_idx
    ON payment_jobs (agent_id, currency, created_at);

-- Accounts: per agent and currency a budget (what it may still spend) and a holds account
-- (what risk has reserved for payments in flight); per currency the platform accounts.
CREATE TABLE ledger_accounts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('agent_budget', 'agent_holds', 'external_funding',
                                             'provider_clearing', 'platform_fees')),
    agent_id   text REFERENCES agents (id),
    currency   text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    -- Kept equal to the sum of the account's entries by the trigger below, never by hand.
    balance    bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (kind, agent_id, currency),
    UNIQUE (id, currency),
    CHECK ((kind IN ('agent_budget', 'agent_holds')) = (agent_id IS NOT NULL)),
    -- An agent's budget and holds never go below zero, whatever runs concurrently.
    CONSTRAINT ledger_accounts_agent_not_negative
        CHECK (kind NOT IN ('agent_budget', 'agent_holds') OR balance >= 0)
);

-- A transaction: a set of entries that sum to zero per currency. `reference` makes a posting
-- happen once: the payment id for hold/capture/release, the refund id for a refund, the
-- deposit id for a deposit.
CREATE TABLE ledger_transactions (
    id          text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('deposit', 'hold', 'capture', 'release', 'refund')),
    reference   text,
    payment_id  text REFERENCES payment_jobs (id),
    agent_id    text REFERENCES agents (id),
    description text,
    actor       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, reference)
);
CREATE INDEX ledger_transactions_payment_idx ON ledger_transactions (payment_id);

CREATE TABLE ledger_entries (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id text NOT NULL REFERENCES ledger_transactions (id),
    account_id     bigint NOT NULL,
    currency       text NOT NULL,
    amount         bigint NOT NULL CHECK (amount <> 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (account_id, currency) REFERENCES ledger_accounts (id, currency)
);
CREATE INDEX ledger_entries_account_idx ON ledger_entries (account_id, id);
CREATE INDEX ledger_entries_transaction_idx ON ledger_entries (transaction_id);

-- Every entry moves its account's balance in one UPDATE (no read-modify-write anywhere):
-- concurrent postings serialise on the account row and none is lost.
CREATE FUNCTION ledger_entries_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ledger_accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER ledger_entries_apply
    AFTER INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_apply();

-- A balance changes only through an entry.
CREATE FUNCTION ledger_accounts_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance IS DISTINCT FROM OLD.balance AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'a ledger balance changes only by posting entries'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.kind <> OLD.kind OR NEW.agent_id IS DISTINCT FROM OLD.agent_id
       OR NEW.currency <> OLD.currency THEN
        RAISE EXCEPTION 'a ledger account never changes what it is'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER ledger_accounts_guard
    BEFORE UPDATE ON ledger_accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_accounts_guard();

-- Double entry, checked at commit: a transaction's entries sum to zero in every currency.
CREATE FUNCTION ledger_transaction_balances() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    off record;
BEGIN
    SELECT currency, sum(amount) AS total INTO off
    FROM ledger_entries WHERE transaction_id = NEW.transaction_id
    GROUP BY currency HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % does not balance: % % off',
            NEW.transaction_id, off.total, off.currency
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER ledger_transaction_balances
    AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balances();

-- Append-only: a correction is a new transaction.
CREATE FUNCTION ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: post a correcting transaction', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER ledger_transactions_append_only
    BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_transactions_no_truncate
    BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Operators' view: every account with its balance and the sum of its entries side by side.
CREATE VIEW ledger_account_balances AS
SELECT a.id, a.kind, a.agent_id, a.currency, a.balance,
       coalesce((SELECT sum(e.amount) FROM ledger_entries e WHERE e.account_id = a.id), 0)
           AS entries_sum
FROM ledger_accounts a;
