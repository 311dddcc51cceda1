-- Identities: users with a global role, project memberships with a role each, API tokens
-- (stored as SHA-256 hashes, never in clear), refresh tokens of login sessions, and
-- idempotency keys of write requests. Security-relevant actions go to `audit_log`
-- (project `global` for actions on users and tokens).

CREATE TABLE users (
    name            TEXT PRIMARY KEY NOT NULL,
    role            TEXT NOT NULL,
    password_hash   TEXT,
    created_at      INTEGER NOT NULL,
    disabled_at     INTEGER
);

CREATE TABLE memberships (
    project_id  TEXT NOT NULL REFERENCES projects (id),
    user_name   TEXT NOT NULL REFERENCES users (name),
    role        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_name)
);

CREATE INDEX memberships_by_user ON memberships (user_name);

CREATE TABLE api_tokens (
    id              TEXT PRIMARY KEY NOT NULL,
    user_name       TEXT NOT NULL REFERENCES users (name),
    name            TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    scope           TEXT NOT NULL,
    project_id      TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    revoked_at      INTEGER,
    last_used_at    INTEGER
);

CREATE INDEX api_tokens_by_user ON api_tokens (user_name, id DESC);

CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY NOT NULL,
    user_name   TEXT NOT NULL REFERENCES users (name),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);

CREATE TABLE idempotency_keys (
    project_id      TEXT NOT NULL,
    key             TEXT NOT NULL,
    route           TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    status          INTEGER NOT NULL,
    response        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (project_id, route, key)
);

CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);
CREATE INDEX audit_by_time ON audit_log (id DESC);
