-- One delivery per endpoint and event: every server fans the events it sees out to the
-- endpoints, and the second to insert a delivery for the same (webhook, event) adds
-- nothing. Test deliveries carry no event and are not constrained.

CREATE UNIQUE INDEX webhook_deliveries_once ON webhook_deliveries (webhook_id, event_seq)
    WHERE event_seq IS NOT NULL;
