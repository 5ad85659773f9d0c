-- Provider events a webhook never delivered (an endpoint down past Stripe's three days of
-- retries, disabled, or not subscribed to a type) are taken in from the provider's event
-- list: `catch_up_events` (tasks/catchup.py, reconcile role) lists the events of the types
-- that change a settled payment (refunds, disputes) created since `created_through` (Unix
-- seconds: when the last listing that finished started, by the worker's clock; each
-- listing starts AGENTPAY_EVENT_CATCH_UP_OVERLAP_SECONDS before it, for clocks that differ)
-- and stores each one not stored yet as if it had been delivered. Maintenance defers a
-- listing once `asked_at` is AGENTPAY_EVENT_CATCH_UP_INTERVAL_SECONDS old and none waits,
-- and sets `asked_at` then: a listing that keeps failing is tried once an interval.
-- `listed_at`: when the last listing finished. One row; it starts now: events before this
-- migration were delivered or not, as before.
CREATE TABLE provider_event_cursor (
    only_row         boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    created_through  bigint NOT NULL,
    asked_at         timestamptz NOT NULL,
    listed_at        timestamptz
);
INSERT INTO provider_event_cursor (created_through, asked_at)
VALUES (extract(epoch FROM now())::bigint, now());
