//! `/api/v1/chat/sessions`: direct chat with an `llm` agent (`drover chat`). A session is
//! private to the person who started it and kept in the store, so it resumes later from
//! any terminal. Sending a message answers with a server-sent event stream: the stored
//! message (`message`), the reply piece by piece as the model produces it (`delta`), then
//! the stored reply (`done`) or what went wrong (`error`, a problem). The reply is produced
//! by a task of its own: if the reader goes away (Ctrl-C, a lost connection) the model
//! request stops and what had arrived is kept as a `cancelled` reply, so the session always
//! reads as it happened. One reply at a time per session.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use drover_agents::{ChatReply, LlmAgentRunner};
use drover_domain::{
    AgentRunner, AgentType, ChatMessage, ChatMessageStatus, ChatRole, ChatSession, ChatSessionId,
    ErrorCode, LlmAgent, MAX_CHAT_MESSAGE_BYTES, MAX_CHAT_REPLY_BYTES, Redactor, SecretValues,
    Timestamp,
};
use drover_store::{NewChatMessage, NewChatSession};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::openapi::InProject;
use crate::wire::time;
use crate::{AppState, Caller};

/// How many of a session's last messages go to the model with a new one.
const HISTORY_MESSAGES: u32 = 50;
/// The most messages `GET /chat/sessions/{id}` shows (the last ones).
const MAX_SHOWN_MESSAGES: u32 = 500;
/// Largest page of sessions.
const MAX_PAGE: u32 = 200;
/// The longest a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// Pieces of a reply waiting for a slow reader; the model waits beyond that.
const PIECES_BUFFER: usize = 256;

/// Sessions with a reply under way, so a second message waits for the first's reply.
#[derive(Debug, Clone, Default)]
pub(crate) struct Replying(Arc<Mutex<HashSet<ChatSessionId>>>);

impl Replying {
    fn begin(&self, id: ChatSessionId) -> Option<ReplyingGuard> {
        let mut busy = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        busy.insert(id).then(|| ReplyingGuard { set: self.clone(), id })
    }
}

/// Marks its session as replying until dropped.
struct ReplyingGuard {
    set: Replying,
    id: ChatSessionId,
}

impl Drop for ReplyingGuard {
    fn drop(&mut self) {
        self.set.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.id);
    }
}

/// The body of `POST /chat/sessions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChatSessionBody {
    /// The `llm` agent to talk to; may be left out when the configuration has exactly one.
    #[serde(default)]
    pub agent: Option<String>,
    /// An environment of the project the chat is about (its name or id): its variables
    /// are given to the model, and `drover chat`'s `/run` runs there.
    #[serde(default)]
    pub environment: Option<String>,
}

/// The body of `POST /chat/sessions/{id}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageBody {
    #[schema(schema_with = crate::wire::rules::chat_content)]
    pub content: String,
}

/// A chat session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatSessionView {
    pub id: String,
    pub agent: String,
    pub environment: Option<String>,
    pub owner: String,
    pub message_count: u64,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&ChatSession> for ChatSessionView {
    fn from(session: &ChatSession) -> Self {
        Self {
            id: session.id.to_string(),
            agent: session.agent.to_string(),
            environment: session.environment.clone(),
            owner: session.owner.clone(),
            message_count: session.message_count,
            created_at: time(session.created_at),
            updated_at: time(session.updated_at),
        }
    }
}

/// One message of a session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatMessageView {
    /// Its place in the session, from 1.
    pub seq: u64,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    /// `complete`, `cancelled` (cut short by the reader) or `failed` (by the model API).
    pub status: String,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub created_at: String,
}

impl From<&ChatMessage> for ChatMessageView {
    fn from(message: &ChatMessage) -> Self {
        Self {
            seq: message.seq,
            role: message.role.to_string(),
            content: message.content.clone(),
            status: message.status.to_string(),
            input_tokens: message.input_tokens,
            output_tokens: message.output_tokens,
            created_at: time(message.created_at),
        }
    }
}

/// A session and its last messages, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatTranscriptView {
    #[serde(flatten)]
    pub session: ChatSessionView,
    pub messages: Vec<ChatMessageView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatSessionList {
    pub items: Vec<ChatSessionView>,
}

/// A piece of a reply (`delta` events of the message stream).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    pub text: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionsQuery {
    /// How many, most recently active first: 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

fn session_id(raw: &str) -> Result<ChatSessionId, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(ErrorCode::ChatSessionNotFound, format!("no chat session {raw}"))
    })
}

/// The `llm` agent a session talks to: the one named, or the only one configured.
fn chat_agent(state: &AppState, name: Option<&str>) -> Result<(AgentType, LlmAgent), ApiError> {
    let agents = state.engine().agents();
    let llm: Vec<(&AgentType, &LlmAgent)> = agents
        .iter()
        .filter_map(|agent| match &agent.runner {
            AgentRunner::Llm(spec) => Some((&agent.name, spec)),
            _ => None,
        })
        .collect();
    let found = match name {
        Some(name) => llm.iter().find(|(agent, _)| agent.as_str() == name).ok_or_else(|| {
            let known = agents.iter().any(|agent| agent.name.as_str() == name);
            ApiError::new(
                ErrorCode::NoChatAgent,
                if known {
                    format!("agent `{name}` is not an `llm` agent; only those can chat")
                } else {
                    format!("no agent `{name}` is configured")
                },
            )
        })?,
        None => match llm.as_slice() {
            [only] => only,
            [] => {
                return Err(ApiError::new(
                    ErrorCode::NoChatAgent,
                    "no `llm` agent is configured; define one under [agents] (kind = \"llm\")",
                ));
            }
            several => {
                let names: Vec<&str> = several.iter().map(|(name, _)| name.as_str()).collect();
                return Err(ApiError::new(
                    ErrorCode::NoChatAgent,
                    format!("several `llm` agents are configured; pick one: {}", names.join(", ")),
                ));
            }
        },
    };
    Ok((found.0.clone(), found.1.clone()))
}

/// Start a chat session with an `llm` agent.
#[utoipa::path(
    post, path = "/api/v1/chat/sessions", tag = "chat",
    params(InProject),
    request_body = CreateChatSessionBody,
    responses(
        (status = 201, body = ChatSessionView),
        (status = 404, description = "`environment_not_found`: no such environment", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`no_chat_agent`: no such `llm` agent, or none named while several are configured", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateChatSessionBody>,
) -> Result<(StatusCode, Json<ChatSessionView>), ApiError> {
    let (agent, _) = chat_agent(&state, body.agent.as_deref().map(str::trim))?;
    let environment = match body.environment.as_deref().map(str::trim) {
        Some(env) if !env.is_empty() => {
            Some(state.envs().find(&caller.project, env).await?.name.to_string())
        }
        _ => None,
    };
    let new = NewChatSession {
        project_id: caller.project.clone(),
        owner: caller.user,
        agent,
        environment,
    };
    let session = state.chat().create_chat_session(new, now()).await?;
    Ok((StatusCode::CREATED, Json(ChatSessionView::from(&session))))
}

/// The caller's chat sessions in the project, most recently active first.
#[utoipa::path(
    get, path = "/api/v1/chat/sessions", tag = "chat",
    params(SessionsQuery, InProject),
    responses((status = 200, body = ChatSessionList))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<SessionsQuery>,
) -> Result<Json<ChatSessionList>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let sessions = state.chat().chat_sessions(&caller.project, &caller.user, limit).await?;
    Ok(Json(ChatSessionList { items: sessions.iter().map(ChatSessionView::from).collect() }))
}

/// A chat session and its last 500 messages, oldest first.
#[utoipa::path(
    get, path = "/api/v1/chat/sessions/{id}", tag = "chat",
    params(("id" = String, Path, description = "Chat session id"), InProject),
    responses(
        (status = 200, body = ChatTranscriptView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ChatTranscriptView>, ApiError> {
    let id = session_id(&id)?;
    let session = state.chat().chat_session(&caller.project, &caller.user, &id).await?;
    let messages =
        state.chat().chat_messages(&caller.project, &caller.user, &id, MAX_SHOWN_MESSAGES).await?;
    Ok(Json(ChatTranscriptView {
        session: ChatSessionView::from(&session),
        messages: messages.iter().map(ChatMessageView::from).collect(),
    }))
}

/// Delete a chat session and its messages.
#[utoipa::path(
    delete, path = "/api/v1/chat/sessions/{id}", tag = "chat",
    params(("id" = String, Path, description = "Chat session id"), InProject),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let parsed = session_id(&id)?;
    if state.chat().delete_chat_session(&caller.project, &caller.user, &parsed).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(ErrorCode::ChatSessionNotFound, format!("no chat session {id}")))
    }
}

/// Say something and stream the reply: `message` (the stored message), `delta` events
/// (`{"text"}`, the reply as it is produced), then `done` (the stored reply) or `error`
/// (a problem; what had arrived is kept as a `failed` reply). Closing the stream stops the
/// reply and keeps what had arrived as `cancelled`.
#[utoipa::path(
    post, path = "/api/v1/chat/sessions/{id}/messages", tag = "chat",
    params(("id" = String, Path, description = "Chat session id"), InProject),
    request_body = ChatMessageBody,
    responses(
        (status = 200, description = "Server-sent events: `message` (the stored message, a `ChatMessageView`), `delta` (`{text}`, the reply as it is produced), then `done` (the stored reply) or `error` (a `Problem`)", content_type = "text/event-stream", body = String),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A reply of this session is under way", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: the message is empty or too long; `no_chat_agent`: the session's agent is gone or its API key is not set", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn send(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ChatMessageBody>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let content = body.content.trim().to_owned();
    if content.is_empty() || content.len() > MAX_CHAT_MESSAGE_BYTES {
        return Err(ApiError::validation(vec![FieldError {
            field: "content".to_owned(),
            message: format!("must be 1 to {MAX_CHAT_MESSAGE_BYTES} bytes of text"),
        }]));
    }
    let id = session_id(&id)?;
    let session = state.chat().chat_session(&caller.project, &caller.user, &id).await?;
    let (_, spec) = chat_agent(&state, Some(session.agent.as_str()))?;
    let guard = state.inner.replying.begin(id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ChatReplyInProgress,
            format!("chat session {id} is still replying to the previous message"),
        )
    })?;
    let secrets = project_secrets(&state, &caller, &session).await?;
    let key = api_key(&spec, &secrets)?;
    let context = environment_context(&state, &caller, &session).await;

    let said = NewChatMessage {
        role: ChatRole::User,
        content,
        status: ChatMessageStatus::Complete,
        input_tokens: None,
        output_tokens: None,
    };
    let said =
        state.chat().append_chat_message(&caller.project, &caller.user, &id, said, now()).await?;
    let history =
        state.chat().chat_messages(&caller.project, &caller.user, &id, HISTORY_MESSAGES).await?;

    let (sender, receiver) = mpsc::channel(PIECES_BUFFER);
    let _ = sender.try_send(Ok(json_event("message", &ChatMessageView::from(&said))));
    let runner = LlmAgentRunner::new(session.agent.clone(), spec);
    let reply = Reply {
        state: state.clone(),
        caller,
        session,
        runner,
        key,
        redactor: Redactor::new(&secrets),
        context,
        history,
        sender,
        _guard: guard,
    };
    tokio::spawn(reply.run());
    Ok(Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(state.inner.sse_keep_alive)))
}

/// The project's secrets, opened for this chat (audited) when the server has a vault.
async fn project_secrets(
    state: &AppState,
    caller: &Caller,
    session: &ChatSession,
) -> Result<SecretValues, ApiError> {
    let Some(vault) = state.engine().vault() else { return Ok(SecretValues::default()) };
    let reveal = drover_secrets::Reveal {
        project: caller.project.clone(),
        purpose: format!("chat session {}", session.id),
    };
    let mut opened = vault.reveal_as(&caller.user, &[reveal]).await.map_err(|err| {
        tracing::error!(error = %err, "cannot open the project's secrets for a chat");
        ApiError::new(ErrorCode::Internal, "cannot open the project's secrets")
    })?;
    Ok(opened.remove(&caller.project).unwrap_or_default())
}

/// The agent's API key: the project secret named by `api_key_env`, else that variable of
/// the server's environment.
fn api_key(spec: &LlmAgent, secrets: &SecretValues) -> Result<Option<String>, ApiError> {
    let Some(var) = &spec.api_key_env else { return Ok(None) };
    let key = secrets.get(var).map(str::to_owned).or_else(|| std::env::var(var).ok());
    key.map(Some).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoChatAgent,
            format!(
                "the agent's API key variable `{var}` is not set (neither a project secret nor \
                 in the server's environment)"
            ),
        )
    })
}

/// What the model is told about the session's environment, if it has one still there.
async fn environment_context(
    state: &AppState,
    caller: &Caller,
    session: &ChatSession,
) -> Option<String> {
    let name = session.environment.as_deref()?;
    let env = state.envs().find(&caller.project, name).await.ok()?;
    let mut context = format!(
        "You are helping with drover environment `{}` (status {}, workspace {}).",
        env.name, env.status, env.workspace
    );
    let variables = state.envs().variables(&env);
    if !variables.is_empty() {
        context.push_str(" Its variables:");
        for (name, value) in variables {
            context.push_str(&format!("\n{name}={value}"));
        }
    }
    Some(context)
}

/// The messages sent to the model: the session's last ones, oldest first, without empty
/// ones, turns of the same speaker joined (Anthropic wants them to alternate), starting
/// with the person.
fn conversation(history: &[ChatMessage]) -> Vec<(ChatRole, String)> {
    let mut turns: Vec<(ChatRole, String)> = Vec::with_capacity(history.len());
    for message in history.iter().filter(|m| !m.content.trim().is_empty()) {
        match turns.last_mut() {
            Some((role, text)) if *role == message.role => {
                text.push_str("\n\n");
                text.push_str(&message.content);
            }
            None if message.role == ChatRole::Assistant => {}
            _ => turns.push((message.role, message.content.clone())),
        }
    }
    turns
}

fn json_event(kind: &str, value: &impl Serialize) -> SseEvent {
    SseEvent::default().event(kind).data(serde_json::to_string(value).unwrap_or_default())
}

/// One reply under way.
struct Reply {
    state: AppState,
    caller: Caller,
    session: ChatSession,
    runner: LlmAgentRunner,
    key: Option<String>,
    redactor: Redactor,
    context: Option<String>,
    history: Vec<ChatMessage>,
    sender: mpsc::Sender<Result<SseEvent, Infallible>>,
    _guard: ReplyingGuard,
}

/// How a reply ended.
enum Ending {
    Done(ChatReply),
    Failed(String),
    Cancelled,
}

impl Reply {
    async fn run(self) {
        let (text, ending) = self.stream().await;
        self.finish(text, ending).await;
    }

    /// Streams the reply to the reader; the text that reached them and how it ended.
    async fn stream(&self) -> (String, Ending) {
        let turns = conversation(&self.history);
        let borrowed: Vec<(ChatRole, &str)> =
            turns.iter().map(|(role, text)| (*role, text.as_str())).collect();
        let (pieces, mut arriving) = mpsc::channel::<String>(PIECES_BUFFER);
        let reply = self.runner.reply(
            self.context.as_deref(),
            &borrowed,
            self.key.as_deref(),
            &self.redactor,
            pieces,
        );
        let reply = tokio::time::timeout(REPLY_TIMEOUT, reply);
        tokio::pin!(reply);
        let mut text = String::new();
        let ending = loop {
            tokio::select! {
                piece = arriving.recv() => {
                    let Some(piece) = piece else { continue };
                    if !self.forward(&mut text, piece).await {
                        break Ending::Cancelled;
                    }
                }
                result = &mut reply => {
                    // What the model sent before it finished is still in the channel.
                    let mut gone = false;
                    while let Ok(piece) = arriving.try_recv() {
                        gone |= !self.forward(&mut text, piece).await;
                    }
                    break match result {
                        _ if gone => Ending::Cancelled,
                        Ok(Ok(reply)) => Ending::Done(reply),
                        Ok(Err(failure)) => Ending::Failed(failure.message),
                        Err(_) => Ending::Failed(format!(
                            "the model did not finish its reply within {}s",
                            REPLY_TIMEOUT.as_secs()
                        )),
                    };
                }
                () = self.sender.closed() => break Ending::Cancelled,
            }
        };
        (text, ending)
    }

    /// Hands a piece to the reader; false when the reader has gone.
    async fn forward(&self, text: &mut String, piece: String) -> bool {
        if text.len() + piece.len() <= MAX_CHAT_REPLY_BYTES {
            text.push_str(&piece);
        }
        self.sender.send(Ok(json_event("delta", &ChatDelta { text: piece }))).await.is_ok()
    }

    /// Keeps the reply (whole, or what had arrived) and tells the reader how it ended.
    async fn finish(self, streamed: String, ending: Ending) {
        let (content, status, usage, failure) = match ending {
            Ending::Done(reply) => {
                let mut content = reply.text;
                if content.len() > MAX_CHAT_REPLY_BYTES {
                    let mut cut = MAX_CHAT_REPLY_BYTES;
                    while !content.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    content.truncate(cut);
                }
                let usage = (reply.input_tokens, reply.output_tokens);
                (content, ChatMessageStatus::Complete, usage, None)
            }
            Ending::Failed(message) => {
                (streamed, ChatMessageStatus::Failed, (None, None), Some(message))
            }
            Ending::Cancelled => (streamed, ChatMessageStatus::Cancelled, (None, None), None),
        };
        let message = NewChatMessage {
            role: ChatRole::Assistant,
            content,
            status,
            input_tokens: usage.0,
            output_tokens: usage.1,
        };
        let caller = &self.caller;
        let stored = self
            .state
            .chat()
            .append_chat_message(&caller.project, &caller.user, &self.session.id, message, now())
            .await;
        let event = match (stored, failure) {
            (Ok(stored), None) => json_event("done", &ChatMessageView::from(&stored)),
            (Ok(_), Some(message)) => {
                let problem = ApiError::new(ErrorCode::UpstreamUnavailable, message);
                json_event("error", &problem.to_problem())
            }
            (Err(err), _) => {
                tracing::error!(session = %self.session.id, error = %err, "cannot keep a chat reply");
                let problem = ApiError::new(ErrorCode::Internal, "the reply could not be kept");
                json_event("error", &problem.to_problem())
            }
        };
        if status == ChatMessageStatus::Cancelled {
            tracing::info!(session = %self.session.id, "chat reply cancelled by its reader");
        }
        let _ = self.sender.send(Ok(event)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, role: ChatRole, content: &str) -> ChatMessage {
        ChatMessage {
            seq,
            role,
            content: content.to_owned(),
            status: ChatMessageStatus::Complete,
            input_tokens: None,
            output_tokens: None,
            created_at: Timestamp::from_millis(0),
        }
    }

    #[test]
    fn the_conversation_alternates_and_starts_with_the_person() {
        let history = [
            message(3, ChatRole::Assistant, "tail of an older reply"),
            message(4, ChatRole::User, "first"),
            message(5, ChatRole::Assistant, ""),
            message(6, ChatRole::User, "second"),
            message(7, ChatRole::Assistant, "answer"),
            message(8, ChatRole::User, "third"),
        ];
        let turns = conversation(&history);
        assert_eq!(
            turns,
            [
                (ChatRole::User, "first\n\nsecond".to_owned()),
                (ChatRole::Assistant, "answer".to_owned()),
                (ChatRole::User, "third".to_owned()),
            ]
        );
    }
}
