-- Events older than the retention window are deleted by age.
CREATE INDEX events_by_time ON events (created_at);
