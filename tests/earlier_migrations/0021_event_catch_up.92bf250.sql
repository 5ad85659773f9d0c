-- Provider events a webhook never delivered (an endpoint down past Stripe's three days of
-- retries, disabled, or not subscribed to a type) are taken in from the provider's event
-- list: `catch_up_events` (tasks/catchup.py, reconcile role) lists the events created since
-- `created_through` (Unix seconds, the provider's clock, less an overlap) of the types that
-- change a settled payment (refunds, disputes) and stores each one not stored yet as if it
-- had been delivered. Maintenance defers it once `checked_at` is older than
-- AGENTPAY_EVENT_CATCH_UP_INTERVAL_SECONDS. One row; it starts now: events before this
-- migration were delivered or not, as before.
CREATE TABLE provider_event_cursor (
    only_row         boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    created_through  bigint NOT NULL,
    checked_at       timestamptz NOT NULL
);
INSERT INTO provider_event_cursor (created_through, checked_at)
VALUES (extract(epoch FROM now())::bigint, now());
