-- Who changed agents, keys and prices, when, and from what to what. Those rows are changed in
-- place (an agent's revoked_at, a key's revoked_at, a price's amount): before, nothing said
-- who minted an operator key, revoked an agent or changed a price, nor what a price was.
-- One row per action, written in the same transaction as the change (tasks/agents.py,
-- tasks/pricing.py):
--
--   action            subject    data
--   agent.create      agent id   name, is_operator, key_prefix
--   agent.rotate_key  agent id   name, is_operator, key_prefix (the new key's),
--                                keys_revoked (their prefixes)
--   agent.revoke      agent id   name, is_operator, keys_revoked, in_flight ({state: count}
--                                of its payments not in a final state then)
--   price.set         SKU        currency, previous and new {unit_amount, description,
--                                active} (previous null: a new price); only when one changed
--   customer.bind     cus_…      agent_id, previous_agent_id (tasks/customers.py; actor
--                                `agent:<id>` when its first payment bound it, first_use)
--   customer.unbind   cus_…      agent_id null, previous_agent_id
--
-- `actor` as payment_events record it: `operator:<name>` (the CLI's --operator,
-- AGENTPAY_OPERATOR or the OS user; the operator agent's name over HTTP), `stack:<name>` (the
-- keys a dev, demo or chaos stack mints itself), or `db:<user>` when the caller named none.
-- A key is never kept here, only its prefix (apk_ and 6 characters), as api_keys keeps it.
-- Agents and prices made before this migration have no rows.
CREATE TABLE operator_audit (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),  -- the transaction's: the change's own time
    actor    text NOT NULL,
    action   text NOT NULL CHECK (action ~ '^[a-z]+\.[a-z_]+$'),
    subject  text NOT NULL,
    data     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX operator_audit_subject_idx ON operator_audit (subject, id);

CREATE FUNCTION operator_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'operator_audit is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER operator_audit_append_only
    BEFORE UPDATE OR DELETE ON operator_audit
    FOR EACH ROW EXECUTE FUNCTION operator_audit_append_only();
CREATE TRIGGER operator_audit_no_truncate
    BEFORE TRUNCATE ON operator_audit
    FOR EACH STATEMENT EXECUTE FUNCTION operator_audit_append_only();
