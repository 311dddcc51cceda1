//! The domain of drover: what a run, a stage attempt, a pipeline and an event *are*, and
//! which changes between them are legal.
//!
//! This crate does no IO (no database, no network, no clock reads, no async runtime), so
//! every rule in it can be tested as a pure function and shared unchanged by the store,
//! the engine, the workers and the API. Illegal state transitions are rejected here with a
//! typed [`TransitionError`]; nothing downstream writes a status without asking.

mod address;
mod agent;
mod budget;
mod chat;
mod condition;
mod environment;
mod error;
mod event;
mod event_filter;
mod identity;
mod ids;
mod pipeline;
mod redact;
mod route;
mod run;
mod secret;
mod service;
mod stage;
mod time;
mod webhook;
mod worker;

pub use address::{is_loopback_name, non_public_range};
pub use agent::{
    AgentDefinition, AgentRunner, BUILTIN_AGENTS, CommandAgent, LlmAgent, LlmProvider,
};
pub use budget::{Budget, Usage};
pub use chat::{
    ChatMessage, ChatMessageStatus, ChatRole, ChatSession, MAX_CHAT_MESSAGE_BYTES,
    MAX_CHAT_REPLY_BYTES,
};
pub use condition::{Condition, StageOutcome};
pub use environment::{AuditEntry, DesiredState, EnvStatus, Environment, PortBlock};
pub use error::{ErrorCode, TransitionError, ValidationError};
pub use event::{Event, EventKind, NewEvent};
pub use event_filter::{EventFilter, MAX_FILTER_KINDS};
pub use identity::{Membership, Role, TokenScope, User, UserName, UserPrincipal, WorkerPrincipal};
pub use ids::{
    AgentType, AttemptId, ChatSessionId, CorrelationId, DeliveryId, EnvName, EnvironmentId,
    EventSeq, PipelineName, ProjectId, RunId, ServiceName, StageName, WebhookId, WorkerId,
};
pub use pipeline::{
    Advance, Backoff, Decision, LatestAttempt, NextStep, Outcome, PipelineCatalog, PipelineSpec,
    RunProgress, SkippedStage, StagePolicy, StageSpec, StageStart, advance, decide, sdlc,
};
pub use redact::{Redactor, StreamRedactor};
pub use route::{CustomRoute, RouteTarget, parse_hostname};
pub use run::{Run, RunRequest, RunStatus};
pub use secret::{
    MAX_SECRET_NAME_LEN, MAX_SECRET_VALUE_BYTES, MIN_SECRET_VALUE_CHARS, SecretName, SecretValues,
    validate_secret_value,
};
pub use service::{
    AppSpec, DEPLOYMENTS_ENV, DependencyCondition, PlaceholderValues, ProbeKind, RUN_ENV_PREFIX,
    Readiness, RestartPolicy, RestartRules, ServiceRecord, ServiceSpec, ServiceStatus, Sharing,
    expand_placeholders, is_system_environment,
};
pub use stage::{FencingToken, StageAttempt, StageStatus};
pub use time::Timestamp;
pub use webhook::{
    Breaker, DeliveryStatus, MAX_WEBHOOK_DESCRIPTION_LEN, MAX_WEBHOOK_URL_LEN, RetrySchedule,
    WEBHOOK_TEST_KIND, parse_webhook_url,
};
pub use worker::{Worker, WorkerProfile, WorkerStatus};
