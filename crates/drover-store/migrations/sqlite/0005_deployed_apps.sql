-- Apps deployed by runs: services of a project's `deployments` environment that are added
-- at run time rather than from the config, so a restarted server brings them back.

CREATE TABLE environment_apps (
    environment_id  TEXT NOT NULL REFERENCES environments (id),
    name            TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    -- the AppSpec, as JSON
    spec            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (environment_id, name)
);
