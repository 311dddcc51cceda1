//! The [`ChatStore`]: `chat_sessions` and `chat_messages`. Appending a message and
//! counting it on its session happen in one write transaction (on PostgreSQL the count's
//! update locks the session's row until the message is in), so `seq` has no gaps.

use async_trait::async_trait;
use drover_domain::{AgentType, ChatMessage, ChatSession, ChatSessionId, ProjectId, Timestamp};
use sqlx::FromRow;

use super::{Backend, SqlStore, corrupt, sql};
use crate::{ChatStore, NewChatMessage, NewChatSession, StoreError, StoreResult};

#[derive(FromRow)]
struct SessionRow {
    id: String,
    project_id: String,
    owner: String,
    agent: String,
    environment: Option<String>,
    message_count: i64,
    created_at: i64,
    updated_at: i64,
}

impl SessionRow {
    fn into_session(self) -> StoreResult<ChatSession> {
        Ok(ChatSession {
            id: self.id.parse().map_err(|e| corrupt("chat_sessions.id", e))?,
            project_id: ProjectId::parse(self.project_id)
                .map_err(|e| corrupt("chat_sessions.project_id", e))?,
            owner: self.owner,
            agent: AgentType::parse(self.agent).map_err(|e| corrupt("chat_sessions.agent", e))?,
            environment: self.environment,
            created_at: Timestamp::from_millis(self.created_at),
            updated_at: Timestamp::from_millis(self.updated_at),
            message_count: u64::try_from(self.message_count).unwrap_or(0),
        })
    }
}

#[derive(FromRow)]
struct MessageRow {
    seq: i64,
    role: String,
    content: String,
    status: String,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    created_at: i64,
}

impl MessageRow {
    fn into_message(self) -> StoreResult<ChatMessage> {
        Ok(ChatMessage {
            seq: u64::try_from(self.seq).map_err(|e| corrupt("chat_messages.seq", e))?,
            role: self.role.parse().map_err(|e| corrupt("chat_messages.role", e))?,
            content: self.content,
            status: self.status.parse().map_err(|e| corrupt("chat_messages.status", e))?,
            input_tokens: self.input_tokens.and_then(|t| u64::try_from(t).ok()),
            output_tokens: self.output_tokens.and_then(|t| u64::try_from(t).ok()),
            created_at: Timestamp::from_millis(self.created_at),
        })
    }
}

macro_rules! session_columns {
    () => {
        "id, project_id, owner, agent, environment, message_count, created_at, updated_at"
    };
}

fn not_found(id: &ChatSessionId) -> StoreError {
    StoreError::ChatSessionNotFound(id.to_string())
}

fn as_i64(value: Option<u64>) -> Option<i64> {
    value.and_then(|v| i64::try_from(v).ok())
}

#[async_trait]
impl<B: Backend> ChatStore for SqlStore<B> {
    async fn create_chat_session(
        &self,
        new: NewChatSession,
        now: Timestamp,
    ) -> StoreResult<ChatSession> {
        let session = ChatSession {
            id: ChatSessionId::new(),
            project_id: new.project_id,
            owner: new.owner,
            agent: new.agent,
            environment: new.environment,
            created_at: now,
            updated_at: now,
            message_count: 0,
        };
        sql("INSERT INTO chat_sessions (id, project_id, owner, agent, environment, \
             message_count, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?)")
        .bind(session.id.to_string())
        .bind(session.project_id.as_str())
        .bind(&session.owner)
        .bind(session.agent.as_str())
        .bind(session.environment.as_deref())
        .bind(now.as_millis())
        .bind(now.as_millis())
        .execute(&mut self.writer().await.db())
        .await?;
        Ok(session)
    }

    async fn chat_session(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
    ) -> StoreResult<ChatSession> {
        let row: Option<SessionRow> = sql(concat!(
            "SELECT ",
            session_columns!(),
            " FROM chat_sessions WHERE id = ? AND project_id = ? AND owner = ?"
        ))
        .bind(id.to_string())
        .bind(project.as_str())
        .bind(owner)
        .fetch_optional(&mut self.read())
        .await?;
        row.ok_or_else(|| not_found(id))?.into_session()
    }

    async fn chat_sessions(
        &self,
        project: &ProjectId,
        owner: &str,
        limit: u32,
    ) -> StoreResult<Vec<ChatSession>> {
        let rows: Vec<SessionRow> = sql(concat!(
            "SELECT ",
            session_columns!(),
            " FROM chat_sessions WHERE project_id = ? AND owner = ? \
             ORDER BY updated_at DESC, id DESC LIMIT ?"
        ))
        .bind(project.as_str())
        .bind(owner)
        .bind(i64::from(limit))
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(SessionRow::into_session).collect()
    }

    async fn append_chat_message(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
        message: NewChatMessage,
        now: Timestamp,
    ) -> StoreResult<ChatMessage> {
        self.with_tx(async |tx| {
            let count: Option<(i64,)> =
                sql("UPDATE chat_sessions SET message_count = message_count + 1, updated_at = ? \
             WHERE id = ? AND project_id = ? AND owner = ? RETURNING message_count")
                .bind(now.as_millis())
                .bind(id.to_string())
                .bind(project.as_str())
                .bind(owner)
                .fetch_optional(tx)
                .await?;
            let (seq,) = count.ok_or_else(|| not_found(id))?;
            sql(
                "INSERT INTO chat_messages (session_id, seq, role, content, status, input_tokens, \
             output_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(id.to_string())
            .bind(seq)
            .bind(message.role.as_str())
            .bind(message.content.as_str())
            .bind(message.status.as_str())
            .bind(as_i64(message.input_tokens))
            .bind(as_i64(message.output_tokens))
            .bind(now.as_millis())
            .execute(tx)
            .await?;
            Ok(ChatMessage {
                seq: u64::try_from(seq).map_err(|e| corrupt("chat_sessions.message_count", e))?,
                role: message.role,
                content: message.content,
                status: message.status,
                input_tokens: message.input_tokens,
                output_tokens: message.output_tokens,
                created_at: now,
            })
        })
        .await
    }

    async fn chat_messages(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
        limit: u32,
    ) -> StoreResult<Vec<ChatMessage>> {
        // The owner check and the tail in one query; an empty tail of a session that
        // exists is told apart from no session by a second look only when empty.
        let rows: Vec<MessageRow> =
            sql("SELECT m.seq, m.role, m.content, m.status, m.input_tokens, m.output_tokens, \
             m.created_at FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id \
             WHERE s.id = ? AND s.project_id = ? AND s.owner = ? \
             ORDER BY m.seq DESC LIMIT ?")
            .bind(id.to_string())
            .bind(project.as_str())
            .bind(owner)
            .bind(i64::from(limit))
            .fetch_all(&mut self.read())
            .await?;
        if rows.is_empty() {
            self.chat_session(project, owner, id).await?;
        }
        let mut messages =
            rows.into_iter().map(MessageRow::into_message).collect::<StoreResult<Vec<_>>>()?;
        messages.reverse();
        Ok(messages)
    }

    async fn delete_chat_session(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
    ) -> StoreResult<bool> {
        let deleted =
            sql("DELETE FROM chat_sessions WHERE id = ? AND project_id = ? AND owner = ?")
                .bind(id.to_string())
                .bind(project.as_str())
                .bind(owner)
                .execute(&mut self.writer().await.db())
                .await?
                > 0;
        Ok(deleted)
    }
}
