-- Durable buses, the dead-letter queue and the worker registry.

-- The broker's id of the message that carries a dispatched attempt, so reconciliation can
-- ask the broker whether it still holds it.
ALTER TABLE stage_attempts ADD COLUMN bus_message_id TEXT;

-- What became of a dead-lettered attempt: NULL while it waits in the DLQ, then
-- 'redriven' or 'discarded'.
ALTER TABLE stage_attempts ADD COLUMN dlq_resolution TEXT;

-- The DLQ listing: a project's unresolved dead letters, newest first.
CREATE INDEX attempts_dead_lettered ON stage_attempts (project_id, id DESC)
    WHERE status = 'dead_lettered' AND dlq_resolution IS NULL;

CREATE TABLE workers (
    id             TEXT PRIMARY KEY NOT NULL,
    agents         TEXT NOT NULL,   -- JSON array of agent types
    version        TEXT NOT NULL,
    hostname       TEXT NOT NULL,
    concurrency    INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    status         TEXT NOT NULL,
    registered_at  INTEGER NOT NULL,
    last_seen_at   INTEGER NOT NULL
);

CREATE INDEX workers_live_last_seen ON workers (last_seen_at) WHERE status = 'live';
