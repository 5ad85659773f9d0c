-- Agents, payments, their audit trail, and the state machine Postgres enforces.

CREATE TABLE agents (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    is_operator boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- API keys: only a SHA-256 of the key is stored (keys are 256-bit random tokens).
CREATE TABLE api_keys (
    key_hash   bytea PRIMARY KEY,
    agent_id   text NOT NULL REFERENCES agents (id),
    prefix     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_agent_idx ON api_keys (agent_id);

-- The states of a payment and the only transitions between them.
CREATE TABLE payment_states (
    status   text PRIMARY KEY,
    is_final boolean NOT NULL
);
INSERT INTO payment_states (status, is_final) VALUES
    ('received', false), ('priced', false), ('in_review', false), ('approved', false),
    ('charging', false), ('requires_action', false), ('authorized', false),
    ('succeeded', false), ('reconciled', true), ('partially_refunded', false),
    ('refunded', true), ('rejected', true), ('failed', true), ('canceled', true);

CREATE TABLE payment_transitions (
    from_status text NOT NULL REFERENCES payment_states (status),
    to_status   text NOT NULL REFERENCES payment_states (status),
    PRIMARY KEY (from_status, to_status)
);
INSERT INTO payment_transitions (from_status, to_status) VALUES
    ('received', 'priced'), ('received', 'rejected'), ('received', 'canceled'),
    ('priced', 'approved'), ('priced', 'in_review'), ('priced', 'rejected'), ('priced', 'canceled'),
    ('in_review', 'approved'), ('in_review', 'rejected'), ('in_review', 'canceled'),
    ('approved', 'charging'), ('approved', 'canceled'),
    ('charging', 'succeeded'), ('charging', 'authorized'), ('charging', 'requires_action'),
    ('charging', 'failed'), ('charging', 'canceled'),
    ('requires_action', 'succeeded'), ('requires_action', 'authorized'),
    ('requires_action', 'failed'), ('requires_action', 'canceled'),
    ('authorized', 'succeeded'), ('authorized', 'canceled'), ('authorized', 'failed'),
    ('succeeded', 'reconciled'),
    ('reconciled', 'partially_refunded'), ('reconciled', 'refunded'),
    ('partially_refunded', 'refunded');

CREATE TABLE payment_jobs (
    id                  text PRIMARY KEY,
    agent_id            text NOT NULL REFERENCES agents (id),
    status              text NOT NULL DEFAULT 'received' REFERENCES payment_states (status),
    currency            text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    amount_subtotal     bigint CHECK (amount_subtotal >= 0),
    amount_fee          bigint CHECK (amount_fee >= 0),
    amount_tax          bigint CHECK (amount_tax >= 0),
    amount_total        bigint CHECK (amount_total >= 0),
    amount_refunded     bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    -- What the agent asked for: a fixed amount, or line items that pricing turns into one.
    amount_requested    bigint CHECK (amount_requested > 0),
    line_items          jsonb,
    capture_method      text NOT NULL DEFAULT 'automatic'
                        CHECK (capture_method IN ('automatic', 'manual')),
    payment_method      text NOT NULL,
    description         text,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The provider side: the key is stored before the first call, the id as soon as it is known.
    provider_idempotency_key text UNIQUE,
    provider_payment_id text UNIQUE,
    failure_code        text,
    failure_message     text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (amount_requested IS NOT NULL OR line_items IS NOT NULL),
    CHECK (amount_total IS NULL
           OR amount_total = amount_subtotal + amount_tax + amount_fee),
    CHECK (amount_refunded <= coalesce(amount_total, 0))
);
CREATE INDEX payment_jobs_agent_created_idx ON payment_jobs (agent_id, created_at DESC, id DESC);
CREATE INDEX payment_jobs_status_updated_idx ON payment_jobs (status, updated_at);

-- Append-only audit trail: one row per transition (and per notable non-transition event).
CREATE TABLE payment_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id  text NOT NULL REFERENCES payment_jobs (id),
    type        text NOT NULL,
    from_status text,
    to_status   text,
    actor       text NOT NULL,
    reason      text,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX payment_events_payment_idx ON payment_events (payment_id, id);

-- Who and why of the next transition come from transaction-local settings, set by the
-- application right before it changes a status (tasks/payments.py). Raw SQL still gets an
-- event, attributed to the database user.
CREATE FUNCTION agentpay_event_context(OUT actor text, OUT reason text, OUT data jsonb)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('agentpay.actor', true), ''), 'db:' || session_user),
           nullif(current_setting('agentpay.reason', true), ''),
           coalesce(nullif(current_setting('agentpay.event_data', true), '')::jsonb, '{}'::jsonb)
$$;

CREATE FUNCTION payment_jobs_check_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'received' THEN
            RAISE EXCEPTION 'a payment starts in state received, not %', NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT EXISTS (SELECT 1 FROM payment_transitions
                       WHERE from_status = OLD.status AND to_status = NEW.status) THEN
            RAISE EXCEPTION 'illegal payment transition % -> % (payment %)',
                OLD.status, NEW.status, OLD.id
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF NEW.id <> OLD.id OR NEW.agent_id <> OLD.agent_id OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'id, agent_id and created_at of a payment never change'
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END;
$$;

CREATE TRIGGER payment_jobs_check_transition
    BEFORE INSERT OR UPDATE ON payment_jobs
    FOR EACH ROW EXECUTE FUNCTION payment_jobs_check_transition();

CREATE FUNCTION payment_jobs_record_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ctx record;
BEGIN
    ctx := agentpay_event_context();
    IF TG_OP = 'INSERT' THEN
        INSERT INTO payment_events (payment_id, type, from_status, to_status, actor, reason, data)
        VALUES (NEW.id, 'created', NULL, NEW.status, ctx.actor, ctx.reason, ctx.data);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO payment_events (payment_id, type, from_status, to_status, actor, reason, data)
        VALUES (NEW.id, 'transition', OLD.status, NEW.status, ctx.actor, ctx.reason, ctx.data);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_jobs_record_event
    AFTER INSERT OR UPDATE OF status ON payment_jobs
    FOR EACH ROW EXECUTE FUNCTION payment_jobs_record_event();

CREATE FUNCTION payment_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payment_events is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER payment_events_append_only
    BEFORE UPDATE OR DELETE ON payment_events
    FOR EACH ROW EXECUTE FUNCTION payment_events_append_only();
CREATE TRIGGER payment_events_no_truncate
    BEFORE TRUNCATE ON payment_events
    FOR EACH STATEMENT EXECUTE FUNCTION payment_events_append_only();
