-- Webhook events are kept AGENTPAY_WEBHOOK_RETENTION_DAYS (default 30), then deleted by the
-- maintenance round, oldest first, a batch at a time (they were kept forever: a few kB each,
-- several per payment). The index serves that deletion. Their counts live on in
-- ops_webhook_totals (0014), so /metrics does not change when they go.
CREATE INDEX webhook_events_received_idx ON webhook_events (received_at);
