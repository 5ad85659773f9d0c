-- The events of lost disputes (`charge.dispute.*` whose dispute is `lost`), for the maintenance
-- round that books a loss whose event an API of a release before 0020 stored without booking
-- it (tasks/disputes.py, `book_missed`): a handful among every webhook event kept (30 days),
-- so that look reads this small index instead of the table. Built while it holds the table's
-- inserts, as 0016's (seconds per million events; the provider retries a delivery that
-- failed meanwhile).
CREATE INDEX webhook_events_lost_disputes_idx ON webhook_events (received_at)
    WHERE type LIKE 'charge.dispute.%' AND (payload->'data'->'object'->>'status') = 'lost';
