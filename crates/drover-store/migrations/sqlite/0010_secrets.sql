-- Project secrets, encrypted at rest: each value sealed with an AEAD under the master key
-- `key_id` names (a fingerprint of the key, never the key), a random nonce per value, and
-- the project and name as associated data, so a row moved to another name or project no
-- longer opens. Nothing here can be read without the key, which is kept outside the
-- database. Reads and changes of secrets are recorded in `audit_log` (`secret.*`).

CREATE TABLE secrets (
    project_id  TEXT NOT NULL REFERENCES projects (id),
    name        TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, name)
) WITHOUT ROWID;
