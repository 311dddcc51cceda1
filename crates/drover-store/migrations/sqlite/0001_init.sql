-- drover's initial schema (SQLite). Times are integer milliseconds since the Unix epoch;
-- ids are UUIDv7 strings, so ordering by id is ordering by creation time.

CREATE TABLE projects (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

INSERT INTO projects (id, name, created_at) VALUES ('default', 'Default project', 0);

CREATE TABLE runs (
    id              TEXT PRIMARY KEY NOT NULL,
    project_id      TEXT NOT NULL REFERENCES projects (id),
    pipeline        TEXT NOT NULL,
    request         TEXT NOT NULL,
    status          TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    error           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER
);

-- Listing a project's runs, newest first, optionally by status.
CREATE INDEX runs_by_project ON runs (project_id, id DESC);
CREATE INDEX runs_by_project_status ON runs (project_id, status, id DESC);

CREATE TABLE stage_attempts (
    id                TEXT PRIMARY KEY NOT NULL,
    project_id        TEXT NOT NULL REFERENCES projects (id),
    run_id            TEXT NOT NULL REFERENCES runs (id),
    stage             TEXT NOT NULL,
    stage_index       INTEGER NOT NULL,
    agent             TEXT NOT NULL,
    attempt           INTEGER NOT NULL,
    fencing_token     INTEGER NOT NULL,
    status            TEXT NOT NULL,
    worker_id         TEXT,
    available_at      INTEGER NOT NULL,
    lease_expires_at  INTEGER,
    deadline_at       INTEGER,
    output            TEXT,
    error             TEXT,
    created_at        INTEGER NOT NULL,
    dispatched_at     INTEGER,
    started_at        INTEGER,
    finished_at       INTEGER,
    -- A stage's Nth attempt exists at most once, whatever races happen above.
    UNIQUE (run_id, stage_index, attempt)
);

-- The dispatcher's query: due pending attempts.
CREATE INDEX attempts_pending_due ON stage_attempts (available_at) WHERE status = 'pending';
-- The reaper's queries: running attempts by lease expiry and by deadline.
CREATE INDEX attempts_running_lease ON stage_attempts (lease_expires_at) WHERE status = 'running';
CREATE INDEX attempts_running_deadline ON stage_attempts (deadline_at) WHERE status = 'running';
CREATE INDEX attempts_dispatched ON stage_attempts (dispatched_at) WHERE status = 'dispatched';

CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id      TEXT NOT NULL REFERENCES projects (id),
    run_id          TEXT,
    attempt_id      TEXT,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    correlation_id  TEXT,
    created_at      INTEGER NOT NULL
);

CREATE INDEX events_by_run ON events (run_id, seq) WHERE run_id IS NOT NULL;
CREATE INDEX events_by_project ON events (project_id, seq);
