-- Environments: workspaces with port blocks and services, their audit trail, and the
-- observed state of service instances (including the process group each runs in, so a
-- restarted server finds what a killed one left behind).

ALTER TABLE events ADD COLUMN environment_id TEXT;
CREATE INDEX events_by_environment ON events (environment_id, seq) WHERE environment_id IS NOT NULL;

CREATE TABLE environments (
    id              TEXT PRIMARY KEY NOT NULL,
    project_id      TEXT NOT NULL REFERENCES projects (id),
    name            TEXT NOT NULL,
    status          TEXT NOT NULL,
    desired         TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    port_base       INTEGER NOT NULL,
    port_count      INTEGER NOT NULL,
    repo            TEXT,
    branch          TEXT,
    error           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_active_at  INTEGER NOT NULL
);

-- Names are unique among a project's live environments; a port block belongs to one live
-- environment (a backstop: allocation already avoids overlaps).
CREATE UNIQUE INDEX environments_live_name ON environments (project_id, name) WHERE status <> 'deleted';
CREATE UNIQUE INDEX environments_live_port_base ON environments (port_base) WHERE status <> 'deleted';
CREATE INDEX environments_by_project ON environments (project_id, id DESC);

CREATE TABLE service_instances (
    -- '' for a shared instance
    environment_id  TEXT NOT NULL,
    service         TEXT NOT NULL,
    status          TEXT NOT NULL,
    -- the process group leader while it runs
    pid             INTEGER,
    restarts        INTEGER NOT NULL,
    reason          TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (environment_id, service)
);

CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    reason      TEXT,
    at          INTEGER NOT NULL
);

CREATE INDEX audit_by_project ON audit_log (project_id, id DESC);
