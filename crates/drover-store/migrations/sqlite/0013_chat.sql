-- Direct chat sessions (`drover chat`) and their messages. A session belongs to one user
-- of one project; messages are numbered from 1 within it, so resuming reads the tail by
-- (session, seq) alone.

CREATE TABLE chat_sessions (
    id            TEXT PRIMARY KEY,
    project_id    TEXT NOT NULL,
    owner         TEXT NOT NULL,
    agent         TEXT NOT NULL,
    environment   TEXT,
    message_count INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE INDEX chat_sessions_by_owner ON chat_sessions (project_id, owner, updated_at DESC);

CREATE TABLE chat_messages (
    session_id    TEXT NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    role          TEXT NOT NULL,
    content       TEXT NOT NULL,
    status        TEXT NOT NULL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
