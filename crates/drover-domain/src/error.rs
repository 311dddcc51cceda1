//! The domain's errors and the stable error codes every layer reports.

use std::fmt;

use serde::Serialize;

/// A value that failed validation, naming the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error reported under another field name (e.g. `request` instead of `run`).
    pub fn for_field(mut self, field: impl Into<String>) -> Self {
        self.field = field.into();
        self
    }
}

/// A state change the state machine does not allow. Never written; always reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entity} cannot go from `{from}` to `{to}`")]
pub struct TransitionError {
    pub entity: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

/// Stable, snake_case error codes: part of the public contract. Clients match on these,
/// never on messages. The mapping to HTTP statuses lives in the API crate, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not syntactically valid JSON.
    MalformedJson,
    /// The body was empty where a JSON document was required.
    EmptyBody,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The body names a field the endpoint does not know.
    UnknownField,
    /// The body is JSON of the wrong shape (missing field, wrong type).
    InvalidBody,
    /// One or more fields failed validation; see `errors[]`.
    ValidationFailed,
    /// A query string parameter is invalid.
    InvalidQuery,
    /// A path parameter is invalid (not UTF-8 once percent-decoded).
    InvalidPath,
    /// The body exceeds the size limit.
    PayloadTooLarge,
    /// The requested pipeline does not exist.
    UnknownPipeline,
    /// No run with that id is visible to the caller.
    RunNotFound,
    /// No route matches the path.
    RouteNotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The resource is in a state that does not allow the operation.
    InvalidTransition,
    /// The run already finished; it cannot be cancelled.
    RunAlreadyFinished,
    /// A dependency (database, bus) is unavailable.
    ServiceUnavailable,
    /// The server is shutting down and takes no new work.
    ShuttingDown,
    /// No dead letter with that id is visible to the caller.
    DeadLetterNotFound,
    /// The attempt is not waiting in the dead-letter queue (never was, or already
    /// redriven or discarded).
    NotDeadLettered,
    /// Tasks are leased over HTTP only when the server uses the embedded bus; with a
    /// broker, workers read the broker directly.
    LeaseUnavailable,
    /// No environment with that id or name is visible to the caller.
    EnvironmentNotFound,
    /// The project already has as many live environments as its quota allows.
    EnvironmentQuotaExceeded,
    /// A live environment already has that name.
    EnvironmentNameTaken,
    /// Deleting would lose work that exists nowhere else (pass `force`).
    UnmergedWork,
    /// The environment has no such service.
    ServiceNotFound,
    /// The run has no artifact of that name.
    ArtifactNotFound,
    /// The project has no secret of that name.
    SecretNotFound,
    /// The stage is not waiting for approval (not reached yet, already decided, or no such
    /// stage).
    NotWaitingApproval,
    /// No block of free ports is left in the configured range.
    NoFreePorts,
    /// The workspace could not be prepared (git, setup hook).
    WorkspaceFailed,
    /// The proxy has no route for the request's `Host`.
    UnknownHost,
    /// The proxy's route leads to a service that does not answer.
    UpstreamUnavailable,
    /// The request already passed through a drover proxy.
    ProxyLoop,
    /// The request could not be forwarded as sent (its target or its body is malformed).
    InvalidRequest,
    /// The request's `Host` is missing, repeated or malformed, or disagrees with its HTTP/2
    /// `:authority`: the proxy cannot tell which host it is for.
    InvalidHost,
    /// No credential was given where one is required.
    Unauthenticated,
    /// The credential (token, password) is wrong, expired or revoked.
    InvalidCredentials,
    /// The caller is known but may not do this.
    Forbidden,
    /// No project of that id is visible to the caller.
    ProjectNotFound,
    /// A project with that id exists already.
    ProjectExists,
    /// No user of that name.
    UserNotFound,
    /// A user with that name exists already.
    UserExists,
    /// The user is already a member of the project.
    AlreadyMember,
    /// The user is not a member of the project.
    NotAMember,
    /// No API token with that id is visible to the caller.
    TokenNotFound,
    /// Too many requests; retry after the `Retry-After` header's seconds.
    RateLimited,
    /// No webhook endpoint with that id is visible to the caller.
    WebhookNotFound,
    /// The webhook endpoint has no delivery with that id.
    WebhookDeliveryNotFound,
    /// The project already has as many webhook endpoints as allowed.
    WebhookQuotaExceeded,
    /// The webhook endpoint is disabled; enable it first.
    WebhookDisabled,
    /// The webhook URL leads to this machine or a private network, which this server does
    /// not send to (`[webhooks] allow_private_targets`).
    WebhookTargetNotAllowed,
    /// No stage attempt with that id (in that project).
    AttemptNotFound,
    /// The attempt is no longer held under that fencing token (it was handed to another
    /// worker, retried or ended).
    StaleAttempt,
    /// No chat session with that id is visible to the caller.
    ChatSessionNotFound,
    /// The chat cannot start: no `llm` agent of that name (or none at all) is configured.
    NoChatAgent,
    /// The chat session is still replying to the previous message.
    ChatReplyInProgress,
    /// An idempotency key was used again with a different request.
    IdempotencyKeyReused,
    /// A request with the same idempotency key is still being processed.
    IdempotencyKeyInUse,
    /// An unexpected failure; details are in the server log under the request id.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::EmptyBody => "empty_body",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UnknownField => "unknown_field",
            Self::InvalidBody => "invalid_body",
            Self::ValidationFailed => "validation_failed",
            Self::InvalidQuery => "invalid_query",
            Self::InvalidPath => "invalid_path",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnknownPipeline => "unknown_pipeline",
            Self::RunNotFound => "run_not_found",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidTransition => "invalid_transition",
            Self::RunAlreadyFinished => "run_already_finished",
            Self::ServiceUnavailable => "service_unavailable",
            Self::ShuttingDown => "shutting_down",
            Self::DeadLetterNotFound => "dead_letter_not_found",
            Self::NotDeadLettered => "not_dead_lettered",
            Self::LeaseUnavailable => "lease_unavailable",
            Self::EnvironmentNotFound => "environment_not_found",
            Self::EnvironmentQuotaExceeded => "environment_quota_exceeded",
            Self::EnvironmentNameTaken => "environment_name_taken",
            Self::UnmergedWork => "unmerged_work",
            Self::ServiceNotFound => "service_not_found",
            Self::ArtifactNotFound => "artifact_not_found",
            Self::SecretNotFound => "secret_not_found",
            Self::NotWaitingApproval => "not_waiting_approval",
            Self::NoFreePorts => "no_free_ports",
            Self::WorkspaceFailed => "workspace_failed",
            Self::UnknownHost => "unknown_host",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::ProxyLoop => "proxy_loop",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidHost => "invalid_host",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCredentials => "invalid_credentials",
            Self::Forbidden => "forbidden",
            Self::ProjectNotFound => "project_not_found",
            Self::ProjectExists => "project_exists",
            Self::UserNotFound => "user_not_found",
            Self::UserExists => "user_exists",
            Self::AlreadyMember => "already_member",
            Self::NotAMember => "not_a_member",
            Self::TokenNotFound => "token_not_found",
            Self::RateLimited => "rate_limited",
            Self::WebhookNotFound => "webhook_not_found",
            Self::WebhookDeliveryNotFound => "webhook_delivery_not_found",
            Self::WebhookQuotaExceeded => "webhook_quota_exceeded",
            Self::WebhookDisabled => "webhook_disabled",
            Self::WebhookTargetNotAllowed => "webhook_target_not_allowed",
            Self::AttemptNotFound => "attempt_not_found",
            Self::StaleAttempt => "stale_attempt",
            Self::ChatSessionNotFound => "chat_session_not_found",
            Self::NoChatAgent => "no_chat_agent",
            Self::ChatReplyInProgress => "chat_reply_in_progress",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
