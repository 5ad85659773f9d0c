-- The agent-facing API: stored idempotent responses, per-agent rate limits, listing, and the
-- notification that wakes agents waiting on a payment's outcome (docs/api.md).

-- One row per (agent, Idempotency-Key). The row is inserted in the same transaction as the
-- business write it guards, and the response is stored before that transaction commits, so a
-- committed key always has its response and a committed write always has its key.
-- Concurrent duplicates block on the primary key until the first commits, then replay it.
CREATE TABLE idempotency_keys (
    agent_id        text NOT NULL REFERENCES agents (id),
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_method  text NOT NULL,
    request_path    text NOT NULL,
    -- SHA-256 of the method, the path and the canonical JSON body: a reuse of the key with
    -- anything else is refused.
    request_hash    bytea NOT NULL,
    response_status smallint CHECK (response_status BETWEEN 200 AND 499),
    -- `json`, not `jsonb`: the text is kept as sent, so a replay is the same bytes.
    response_body   json,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, key)
);
-- Pruning (keys older than the retention, at least 24 hours) scans by age.
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- Checked at commit: no key is ever committed without its stored response.
CREATE FUNCTION idempotency_keys_require_response() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM idempotency_keys
               WHERE agent_id = NEW.agent_id AND key = NEW.key
                 AND (response_status IS NULL OR response_body IS NULL)) THEN
        RAISE EXCEPTION 'idempotency key % of agent % committed without its response',
            NEW.key, NEW.agent_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER idempotency_keys_require_response
    AFTER INSERT OR UPDATE ON idempotency_keys
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION idempotency_keys_require_response();

-- Rate limits: one token bucket per agent. Losing it in a crash only refills the buckets, so
-- it is not WAL-logged.
CREATE UNLOGGED TABLE api_rate_limits (
    agent_id   text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at timestamptz NOT NULL
);

-- Take one token from the agent's bucket (refilled at `rate` tokens a second, holding at most
-- `burst`). Returns 0 when the request may go ahead, else the seconds until a token is due.
-- Concurrent requests of one agent serialise on its row for the length of this call only.
CREATE FUNCTION agentpay_take_token(p_agent text, p_rate double precision, p_burst double precision)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    now_      timestamptz := clock_timestamp();
    available double precision;
BEGIN
    INSERT INTO api_rate_limits (agent_id, tokens, updated_at)
    VALUES (p_agent, p_burst, now_)
    ON CONFLICT (agent_id) DO NOTHING;
    SELECT least(p_burst,
                 tokens + greatest(0, extract(epoch FROM now_ - updated_at)) * p_rate)
      INTO available
      FROM api_rate_limits WHERE agent_id = p_agent FOR UPDATE;
    IF available >= 1 THEN
        UPDATE api_rate_limits SET tokens = available - 1, updated_at = greatest(updated_at, now_)
         WHERE agent_id = p_agent;
        RETURN 0;
    END IF;
    UPDATE api_rate_limits SET tokens = available, updated_at = greatest(updated_at, now_)
     WHERE agent_id = p_agent;
    RETURN (1 - available) / p_rate;
END;
$$;

-- Operators list every agent's payments newest first (agents use payment_jobs_agent_created_idx).
CREATE INDEX payment_jobs_created_idx ON payment_jobs (created_at DESC, id DESC);

-- Wake the API processes' long-polls: every status change is announced at commit on one
-- channel; each API process holds one LISTEN connection and fans out to its waiters.
CREATE FUNCTION payment_jobs_notify_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agentpay_payment_status',
                      json_build_object('id', NEW.id, 'status', NEW.status)::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER payment_jobs_notify_status
    AFTER UPDATE OF status ON payment_jobs
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION payment_jobs_notify_status();
