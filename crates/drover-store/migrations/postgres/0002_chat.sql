-- Direct chat sessions (`drover chat`) and their messages (SQLite 0013). A session belongs
-- to one user of one project; messages are numbered from 1 within it, so resuming reads
-- the tail by (session, seq) alone.

CREATE TABLE chat_sessions (
    id            TEXT COLLATE "C" PRIMARY KEY,
    project_id    TEXT COLLATE "C" NOT NULL,
    owner         TEXT COLLATE "C" NOT NULL,
    agent         TEXT NOT NULL,
    environment   TEXT,
    message_count BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

-- A user's sessions, most recent first.
CREATE INDEX chat_sessions_by_owner ON chat_sessions (project_id, owner, updated_at DESC, id DESC);

CREATE TABLE chat_messages (
    session_id    TEXT COLLATE "C" NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL,
    role          TEXT NOT NULL,
    content       TEXT NOT NULL,
    status        TEXT NOT NULL,
    input_tokens  BIGINT,
    output_tokens BIGINT,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
