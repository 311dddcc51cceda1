//! The store's side of direct chat: sessions and their messages, so a conversation outlives
//! the terminal it was typed in and resumes with `drover chat --session`. Kept apart from
//! [`Store`](crate::Store) because only the chat API uses it; every query is scoped to the
//! project and to the session's owner, so one person never reads another's chat.

use async_trait::async_trait;
use drover_domain::{
    AgentType, ChatMessage, ChatMessageStatus, ChatRole, ChatSession, ChatSessionId, ProjectId,
    Timestamp,
};

use crate::StoreResult;

/// A session to start.
#[derive(Debug, Clone)]
pub struct NewChatSession {
    pub project_id: ProjectId,
    pub owner: String,
    pub agent: AgentType,
    pub environment: Option<String>,
}

/// A message to add at the end of a session.
#[derive(Debug, Clone)]
pub struct NewChatMessage {
    pub role: ChatRole,
    pub content: String,
    pub status: ChatMessageStatus,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

#[async_trait]
pub trait ChatStore: Send + Sync + 'static {
    async fn create_chat_session(
        &self,
        new: NewChatSession,
        now: Timestamp,
    ) -> StoreResult<ChatSession>;

    /// The session, if it is `owner`'s in `project`; else `ChatSessionNotFound`.
    async fn chat_session(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
    ) -> StoreResult<ChatSession>;

    /// `owner`'s sessions in `project`, the most recently active first, at most `limit`.
    async fn chat_sessions(
        &self,
        project: &ProjectId,
        owner: &str,
        limit: u32,
    ) -> StoreResult<Vec<ChatSession>>;

    /// Appends a message (numbered after the last) and touches the session; one
    /// transaction.
    async fn append_chat_message(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
        message: NewChatMessage,
        now: Timestamp,
    ) -> StoreResult<ChatMessage>;

    /// The last `limit` messages of the session, oldest first.
    async fn chat_messages(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
        limit: u32,
    ) -> StoreResult<Vec<ChatMessage>>;

    /// Deletes the session and its messages; whether there was one.
    async fn delete_chat_session(
        &self,
        project: &ProjectId,
        owner: &str,
        id: &ChatSessionId,
    ) -> StoreResult<bool>;
}
