//! Direct chat (`drover chat`): a conversation between a person and an `llm` agent, kept
//! as a session so it can be resumed. The shapes live here; the model call is the agents'
//! business, keeping them the store's.

use std::fmt;
use std::str::FromStr;

use crate::{AgentType, ChatSessionId, ProjectId, Timestamp, ValidationError};

/// Longest message a person may send, in bytes.
pub const MAX_CHAT_MESSAGE_BYTES: usize = 32 * 1024;
/// Longest reply kept, in bytes; the rest of a longer one is dropped (and marked).
pub const MAX_CHAT_REPLY_BYTES: usize = 256 * 1024;

/// Who said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatRole {
    User,
    Assistant,
}

impl ChatRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

impl FromStr for ChatRole {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            other => Err(ValidationError::new("role", format!("`{other}` is not a chat role"))),
        }
    }
}

impl fmt::Display for ChatRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message ended. A person's messages are always complete; a reply may have been
/// cut short by the person (Ctrl-C, a dropped connection) or by a failing model API, and
/// keeps what had arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatMessageStatus {
    Complete,
    Cancelled,
    Failed,
}

impl ChatMessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

impl FromStr for ChatMessageStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "complete" => Ok(Self::Complete),
            "cancelled" => Ok(Self::Cancelled),
            "failed" => Ok(Self::Failed),
            other => {
                Err(ValidationError::new("status", format!("`{other}` is not a message status")))
            }
        }
    }
}

impl fmt::Display for ChatMessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One conversation, private to the person who started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSession {
    pub id: ChatSessionId,
    pub project_id: ProjectId,
    /// The user it belongs to (`local` in local mode).
    pub owner: String,
    /// The `llm` agent that answers.
    pub agent: AgentType,
    /// The environment the chat acts on (`/run`, `/env`), when it was started with one.
    pub environment: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub message_count: u64,
}

/// One message of a session, numbered from 1 in the order they were said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub seq: u64,
    pub role: ChatRole,
    pub content: String,
    pub status: ChatMessageStatus,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub created_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_statuses_round_trip_through_their_names() {
        for role in [ChatRole::User, ChatRole::Assistant] {
            assert_eq!(role.as_str().parse::<ChatRole>().unwrap(), role);
        }
        for status in
            [ChatMessageStatus::Complete, ChatMessageStatus::Cancelled, ChatMessageStatus::Failed]
        {
            assert_eq!(status.as_str().parse::<ChatMessageStatus>().unwrap(), status);
        }
        assert!("system".parse::<ChatRole>().is_err());
        assert!("done".parse::<ChatMessageStatus>().is_err());
    }
}
