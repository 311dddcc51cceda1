-- Webhooks: each project's endpoints and the log of their deliveries.
--
-- An endpoint receives the project's events whose kinds match `kinds` (a JSON list of
-- kinds and families such as `stage.`; empty: every kind), signed with `secret` (a
-- Standard Webhooks `whsec_` secret, kept as is: signing needs it in clear). It counts
-- failed attempts in a row; at a threshold its circuit breaker opens (nothing is sent
-- before `breaker_open_until`), at another it is disabled, with a reason.
--
-- A delivery is one event (or a test) for one endpoint, retried in place: its id is the
-- `webhook-id` header of every attempt, its body is what every attempt sends. Deleting an
-- endpoint deletes its deliveries.

CREATE TABLE webhooks (
    id                    TEXT PRIMARY KEY NOT NULL,
    project_id            TEXT NOT NULL REFERENCES projects (id),
    url                   TEXT NOT NULL,
    kinds                 TEXT NOT NULL,
    description           TEXT,
    secret                TEXT NOT NULL,
    enabled               INTEGER NOT NULL,
    disabled_reason       TEXT,
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    breaker_open_until    INTEGER,
    created_by            TEXT NOT NULL,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
);

CREATE INDEX webhooks_by_project ON webhooks (project_id, id);

CREATE TABLE webhook_deliveries (
    id                TEXT PRIMARY KEY NOT NULL,
    webhook_id        TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    project_id        TEXT NOT NULL,
    event_seq         INTEGER,
    kind              TEXT NOT NULL,
    body              TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER,
    window_start      INTEGER NOT NULL,
    last_status_code  INTEGER,
    last_error        TEXT,
    latency_ms        INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

-- The log of an endpoint, newest first, and its trimming.
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
-- What the delivery loop sends next.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'failed');
