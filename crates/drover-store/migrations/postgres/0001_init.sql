-- drover's schema (PostgreSQL): the final state of the SQLite migrations 0001-0012, written
-- fresh. It holds exactly what the SQLite schema holds, in the same representation, so one
-- row mapping serves both databases:
--
-- * times are BIGINT milliseconds since the Unix epoch;
-- * ids are UUIDv7 strings (ordering by id is ordering by creation time), kept as TEXT
--   with the "C" collation, like every key that is sorted or compared by range, so that
--   order is byte order, as in SQLite, whatever the database's locale;
-- * JSON documents (payloads, outputs, specs) are TEXT: the store reads and writes them
--   whole and never queries inside them;
-- * integers are BIGINT throughout (the row mapping reads 64-bit integers).

CREATE TABLE projects (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

INSERT INTO projects (id, name, created_at) VALUES ('default', 'Default project', 0);

-- Runs ------------------------------------------------------------------------------------

CREATE TABLE runs (
    id              TEXT COLLATE "C" PRIMARY KEY,
    project_id      TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    pipeline        TEXT NOT NULL,
    request         TEXT NOT NULL,
    status          TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    error           TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    -- The environment it runs in (its workspace, services, activity), if not its own.
    environment_id  TEXT COLLATE "C",
    workspace       TEXT,
    -- The environment's variables for its agents (JSON object); NULL when none.
    variables       TEXT,
    -- What its stages may spend together (JSON); NULL: no limit.
    budget          TEXT,
    -- The pipeline it follows, as submitted (JSON `PipelineSpec`).
    pipeline_spec   TEXT,
    -- Who submitted it; usage is reported per submitter.
    submitted_by    TEXT
);

-- A project's runs newest first (ids are time-ordered), all or by status.
CREATE INDEX runs_by_project ON runs (project_id, id DESC);
CREATE INDEX runs_by_project_status ON runs (project_id, status, id DESC);
-- Usage reports: a project's runs created since a time.
CREATE INDEX runs_by_project_created ON runs (project_id, created_at);
-- The runs still under way in an environment (the sweep of finished runs' environments).
CREATE INDEX runs_unfinished_by_environment ON runs (environment_id)
    WHERE status IN ('queued', 'running', 'waiting_approval');

-- Stage attempts ----------------------------------------------------------------------------

CREATE TABLE stage_attempts (
    id                TEXT COLLATE "C" PRIMARY KEY,
    project_id        TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    run_id            TEXT COLLATE "C" NOT NULL REFERENCES runs (id),
    stage             TEXT NOT NULL,
    stage_index       BIGINT NOT NULL,
    agent             TEXT NOT NULL,
    attempt           BIGINT NOT NULL,
    fencing_token     BIGINT NOT NULL,
    status            TEXT NOT NULL,
    worker_id         TEXT,
    available_at      BIGINT NOT NULL,
    lease_expires_at  BIGINT,
    deadline_at       BIGINT,
    output            TEXT,
    error             TEXT,
    created_at        BIGINT NOT NULL,
    dispatched_at     BIGINT,
    started_at        BIGINT,
    finished_at       BIGINT,
    -- The broker's id of the message that carries it once dispatched.
    bus_message_id    TEXT,
    -- What became of it as a dead letter: NULL while it waits, then 'redriven' or
    -- 'discarded'.
    dlq_resolution    TEXT,
    -- A stage's Nth attempt exists at most once, whatever races happen above; also a
    -- run's attempts in pipeline order.
    UNIQUE (run_id, stage_index, attempt)
);

-- The dispatcher: due pending attempts, oldest first, all agent types or one.
CREATE INDEX attempts_pending_due ON stage_attempts (available_at) WHERE status = 'pending';
CREATE INDEX attempts_pending_by_agent ON stage_attempts (agent, available_at)
    WHERE status = 'pending';
-- The reconciler: dispatched attempts no worker started, by dispatch time (and agent).
CREATE INDEX attempts_dispatched ON stage_attempts (dispatched_at) WHERE status = 'dispatched';
CREATE INDEX attempts_dispatched_by_agent ON stage_attempts (agent, dispatched_at)
    WHERE status = 'dispatched';
-- The reaper: running attempts by lease expiry and by deadline.
CREATE INDEX attempts_running_lease ON stage_attempts (lease_expires_at) WHERE status = 'running';
CREATE INDEX attempts_running_deadline ON stage_attempts (deadline_at) WHERE status = 'running';
-- The dead-letter queue: a project's unresolved dead letters, newest first.
CREATE INDEX attempts_dead_lettered ON stage_attempts (project_id, id DESC)
    WHERE status = 'dead_lettered' AND dlq_resolution IS NULL;

-- Events ----------------------------------------------------------------------------------

-- One global sequence, handed out in commit order (the store serializes event inserts
-- with an advisory lock), so "events after N" never misses one that commits later.
CREATE TABLE events (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id      TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    run_id          TEXT COLLATE "C",
    attempt_id      TEXT COLLATE "C",
    environment_id  TEXT COLLATE "C",
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    correlation_id  TEXT,
    created_at      BIGINT NOT NULL
);

CREATE INDEX events_by_project ON events (project_id, seq);
CREATE INDEX events_by_run ON events (run_id, seq) WHERE run_id IS NOT NULL;
CREATE INDEX events_by_environment ON events (environment_id, seq)
    WHERE environment_id IS NOT NULL;
-- Retention: events older than the window are deleted by age.
CREATE INDEX events_by_time ON events (created_at);

-- Workers ---------------------------------------------------------------------------------

CREATE TABLE workers (
    id             TEXT COLLATE "C" PRIMARY KEY,
    agents         TEXT NOT NULL,   -- JSON array of agent types
    version        TEXT NOT NULL,
    hostname       TEXT NOT NULL,
    concurrency    BIGINT NOT NULL,
    kind           TEXT NOT NULL,
    status         TEXT NOT NULL,
    registered_at  BIGINT NOT NULL,
    last_seen_at   BIGINT NOT NULL
);

CREATE INDEX workers_live_last_seen ON workers (last_seen_at) WHERE status = 'live';

-- Environments ----------------------------------------------------------------------------

CREATE TABLE environments (
    id              TEXT COLLATE "C" PRIMARY KEY,
    project_id      TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    name            TEXT COLLATE "C" NOT NULL,
    status          TEXT NOT NULL,
    desired         TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    port_base       BIGINT NOT NULL,
    port_count      BIGINT NOT NULL,
    repo            TEXT,
    branch          TEXT,
    error           TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    last_active_at  BIGINT NOT NULL
);

-- Names are unique among a project's live environments; a port block belongs to one live
-- environment (a backstop: allocation already avoids overlaps).
CREATE UNIQUE INDEX environments_live_name ON environments (project_id, name)
    WHERE status <> 'deleted';
CREATE UNIQUE INDEX environments_live_port_base ON environments (port_base)
    WHERE status <> 'deleted';
CREATE INDEX environments_by_project ON environments (project_id, id DESC);

-- The observed state of service instances, with the process group each runs in.
CREATE TABLE service_instances (
    -- '' for a shared instance
    environment_id  TEXT COLLATE "C" NOT NULL,
    service         TEXT COLLATE "C" NOT NULL,
    status          TEXT NOT NULL,
    -- the process group leader while it runs
    pid             BIGINT,
    restarts        BIGINT NOT NULL,
    reason          TEXT,
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (environment_id, service)
);

-- Apps deployed by runs: run-time services of a project's `deployments` environment.
CREATE TABLE environment_apps (
    environment_id  TEXT COLLATE "C" NOT NULL REFERENCES environments (id),
    name            TEXT COLLATE "C" NOT NULL,
    run_id          TEXT NOT NULL,
    -- the AppSpec, as JSON
    spec            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (environment_id, name)
);

-- Audit -----------------------------------------------------------------------------------

CREATE TABLE audit_log (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id  TEXT COLLATE "C" NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    reason      TEXT,
    at          BIGINT NOT NULL
);

CREATE INDEX audit_by_project ON audit_log (project_id, id DESC);

-- Identities ------------------------------------------------------------------------------

CREATE TABLE users (
    name            TEXT COLLATE "C" PRIMARY KEY,
    role            TEXT NOT NULL,
    password_hash   TEXT,
    created_at      BIGINT NOT NULL,
    disabled_at     BIGINT
);

CREATE TABLE memberships (
    project_id  TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    user_name   TEXT COLLATE "C" NOT NULL REFERENCES users (name),
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, user_name)
);

CREATE INDEX memberships_by_user ON memberships (user_name);

-- API tokens, as SHA-256 hashes only.
CREATE TABLE api_tokens (
    id              TEXT COLLATE "C" PRIMARY KEY,
    user_name       TEXT COLLATE "C" NOT NULL REFERENCES users (name),
    name            TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    scope           TEXT NOT NULL,
    project_id      TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT,
    revoked_at      BIGINT,
    last_used_at    BIGINT
);

CREATE INDEX api_tokens_by_user ON api_tokens (user_name, id DESC);

CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_name   TEXT COLLATE "C" NOT NULL REFERENCES users (name),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);

CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);

CREATE TABLE idempotency_keys (
    project_id      TEXT COLLATE "C" NOT NULL,
    key             TEXT NOT NULL,
    route           TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    status          BIGINT NOT NULL,
    response        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (project_id, route, key)
);

CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);

-- Secrets ---------------------------------------------------------------------------------

-- Sealed values only: an AEAD ciphertext under the master key `key_id` names, with a
-- random nonce, and the project and name as associated data. The key is kept outside the
-- database.
CREATE TABLE secrets (
    project_id  TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    name        TEXT COLLATE "C" NOT NULL,
    key_id      TEXT NOT NULL,
    nonce       BYTEA NOT NULL,
    ciphertext  BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, name)
);

-- Webhooks --------------------------------------------------------------------------------

-- An endpoint receives the project's events whose kinds match `kinds` (a JSON list of kinds
-- and families; empty: every kind), signed with `secret` (kept as is: signing needs it).
CREATE TABLE webhooks (
    id                    TEXT COLLATE "C" PRIMARY KEY,
    project_id            TEXT COLLATE "C" NOT NULL REFERENCES projects (id),
    url                   TEXT NOT NULL,
    kinds                 TEXT NOT NULL,
    description           TEXT,
    secret                TEXT NOT NULL,
    enabled               BOOLEAN NOT NULL,
    disabled_reason       TEXT,
    consecutive_failures  BIGINT NOT NULL DEFAULT 0,
    breaker_open_until    BIGINT,
    created_by            TEXT NOT NULL,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL
);

CREATE INDEX webhooks_by_project ON webhooks (project_id, id);

-- A delivery is one event (or a test) for one endpoint, retried in place.
CREATE TABLE webhook_deliveries (
    id                TEXT COLLATE "C" PRIMARY KEY,
    webhook_id        TEXT COLLATE "C" NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    project_id        TEXT COLLATE "C" NOT NULL,
    event_seq         BIGINT,
    kind              TEXT NOT NULL,
    body              TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    next_attempt_at   BIGINT,
    window_start      BIGINT NOT NULL,
    last_status_code  BIGINT,
    last_error        TEXT,
    latency_ms        BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);

-- The log of an endpoint, newest first, and its trimming.
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
-- What the delivery loop sends next.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'failed');
