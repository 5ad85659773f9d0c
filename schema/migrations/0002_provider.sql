-- The provider side: capture/cancel requests, refunds, webhook events stored once, and the
-- mismatches reconcile finds between a payment and the provider's PaymentIntent.

-- A capture or cancel asked for by an agent or operator, carried out by the charge role.
-- At most one of the two is ever asked for a payment (the request functions refuse the other).
ALTER TABLE payment_jobs
    ADD COLUMN capture_requested_at timestamptz,
    ADD COLUMN cancel_requested_at  timestamptz;

-- Refunds: ours first (the id keys the provider call), the provider's id once it answered.
CREATE TABLE payment_refunds (
    id                 text PRIMARY KEY,
    payment_id         text NOT NULL REFERENCES payment_jobs (id),
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason             text,
    actor              text NOT NULL,
    provider_refund_id text UNIQUE,
    provider_status    text,
    failure_code       text,
    failure_message    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_refunds_payment_idx ON payment_refunds (payment_id, created_at);
CREATE INDEX payment_refunds_pending_idx ON payment_refunds (created_at) WHERE status = 'pending';

-- Every provider webhook event, stored once by its id (a redelivery finds it and does nothing).
CREATE TABLE webhook_events (
    id                  text PRIMARY KEY,
    type                text NOT NULL,
    provider_object_id  text,
    payment_id          text REFERENCES payment_jobs (id),
    livemode            boolean NOT NULL DEFAULT false,
    payload             jsonb NOT NULL,
    handled             boolean NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_payment_idx ON webhook_events (payment_id, received_at);

-- Where the provider's PaymentIntent disagreed with the payment when reconcile checked it.
CREATE TABLE reconcile_mismatches (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id          text NOT NULL REFERENCES payment_jobs (id),
    provider_payment_id text,
    field               text NOT NULL,
    expected            jsonb,
    actual              jsonb,
    found_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconcile_mismatches_payment_idx ON reconcile_mismatches (payment_id);
