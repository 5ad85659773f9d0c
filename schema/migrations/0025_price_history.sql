-- A payment naming catalog SKUs is priced at the catalog price in force when it was received
-- (its created_at), not when its pricing job runs: with a backlog, or the pricing role down,
-- a price an operator changed after the agent's POST changed what the customer was charged,
-- a price retired meanwhile rejected the payment, and a SKU created meanwhile priced one that
-- was unknown when it came. `prices` stays the catalog as it is now (GET /v1/prices,
-- `agentpay prices list`); `price_history` keeps every version of each price with the moment
-- it came into force, and pricing reads, per SKU, the last version that started at or before
-- the payment's created_at (tasks/pricing.py, lookup).
--
-- A version is written by a trigger on `prices`, whoever changes it (tasks/pricing.py, a
-- process of the previous release during a deploy, SQL by hand), and only when its terms
-- (unit amount, description, active) change: setting a price to what it is records nothing.
-- It starts at clock_timestamp(), not now(): now() is when the transaction began, the same
-- for two changes of one transaction (their versions would collide, neither first), and
-- possibly long before the change; pricing cannot see a version before it commits, so its
-- start is taken as late as the trigger can, as close to that commit as the database allows.
-- A payment received in between (the change made, not yet committed) and priced before the
-- commit still gets the earlier terms: a window as long as the changing transaction stays
-- open after its change (its last statements in tasks/pricing.py; longer only by hand). A
-- version starts at least a microsecond after the one before it, so a clock stepped back
-- never puts them out of order.
--
-- Prices are never deleted (tasks/pricing.py); one deleted by hand keeps its last version in
-- force here: retire it (`--inactive`) instead.
CREATE TABLE price_history (
    sku         text NOT NULL,
    currency    text NOT NULL,
    unit_amount bigint NOT NULL CHECK (unit_amount > 0),
    description text,
    active      boolean NOT NULL,
    valid_from  timestamptz NOT NULL,
    PRIMARY KEY (sku, currency, valid_from)
);

CREATE FUNCTION price_history_record() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND (NEW.sku, NEW.currency, NEW.unit_amount, NEW.description, NEW.active)
           IS NOT DISTINCT FROM
           (OLD.sku, OLD.currency, OLD.unit_amount, OLD.description, OLD.active) THEN
        RETURN NULL;
    END IF;
    INSERT INTO price_history (sku, currency, unit_amount, description, active, valid_from)
    SELECT NEW.sku, NEW.currency, NEW.unit_amount, NEW.description, NEW.active,
           greatest(clock_timestamp(), max(h.valid_from) + interval '1 microsecond')
      FROM price_history h
     WHERE h.sku = NEW.sku AND h.currency = NEW.currency;
    RETURN NULL;
END;
$$;

-- The trigger first: it locks `prices` against changes (waiting for those in flight) until
-- this migration commits, so none falls between the copy below and the trigger.
CREATE TRIGGER price_history_record
    AFTER INSERT OR UPDATE ON prices
    FOR EACH ROW EXECUTE FUNCTION price_history_record();

-- Today's prices have been in force since always: a payment received before this migration
-- and priced after it is priced as the catalog stands, as it would have been before (not
-- rejected `unknown_sku` for want of an older version).
INSERT INTO price_history (sku, currency, unit_amount, description, active, valid_from)
SELECT sku, currency, unit_amount, description, active, '-infinity' FROM prices;
