//! The one place errors become HTTP responses: RFC 9457 `application/problem+json` with a
//! stable `code`, the request id, and field-level `errors[]` for validation. Every error
//! of every lower layer is mapped here, and nowhere else; and [`problems_only`] makes sure
//! no error answer leaves the router in any other format.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_domain::{ErrorCode, ValidationError};
use drover_engine::EngineError;
use drover_store::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::request_id::current_request_id;

pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// The HTTP status of each error code. Codes are the contract; this table is the mapping.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::MalformedJson
        | ErrorCode::EmptyBody
        | ErrorCode::InvalidQuery
        | ErrorCode::InvalidPath => StatusCode::BAD_REQUEST,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::UnknownField
        | ErrorCode::InvalidBody
        | ErrorCode::ValidationFailed
        | ErrorCode::UnknownPipeline => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RunNotFound | ErrorCode::RouteNotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::InvalidTransition | ErrorCode::RunAlreadyFinished => StatusCode::CONFLICT,
        ErrorCode::ServiceUnavailable | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::DeadLetterNotFound => StatusCode::NOT_FOUND,
        ErrorCode::NotDeadLettered
        | ErrorCode::LeaseUnavailable
        | ErrorCode::NotWaitingApproval => StatusCode::CONFLICT,
        ErrorCode::EnvironmentNotFound
        | ErrorCode::ServiceNotFound
        | ErrorCode::ArtifactNotFound
        | ErrorCode::SecretNotFound => StatusCode::NOT_FOUND,
        ErrorCode::EnvironmentQuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::EnvironmentNameTaken | ErrorCode::UnmergedWork => StatusCode::CONFLICT,
        ErrorCode::NoFreePorts => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::WorkspaceFailed => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::UnknownHost => StatusCode::NOT_FOUND,
        ErrorCode::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
        ErrorCode::ProxyLoop => StatusCode::LOOP_DETECTED,
        ErrorCode::InvalidRequest | ErrorCode::InvalidHost => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated | ErrorCode::InvalidCredentials => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::ProjectNotFound
        | ErrorCode::UserNotFound
        | ErrorCode::NotAMember
        | ErrorCode::TokenNotFound => StatusCode::NOT_FOUND,
        ErrorCode::ProjectExists
        | ErrorCode::UserExists
        | ErrorCode::AlreadyMember
        | ErrorCode::IdempotencyKeyInUse => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::WebhookNotFound | ErrorCode::WebhookDeliveryNotFound => StatusCode::NOT_FOUND,
        ErrorCode::WebhookQuotaExceeded | ErrorCode::WebhookDisabled => StatusCode::CONFLICT,
        ErrorCode::WebhookTargetNotAllowed => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::AttemptNotFound => StatusCode::NOT_FOUND,
        ErrorCode::StaleAttempt => StatusCode::CONFLICT,
        ErrorCode::ChatSessionNotFound => StatusCode::NOT_FOUND,
        ErrorCode::ChatReplyInProgress => StatusCode::CONFLICT,
        ErrorCode::NoChatAgent => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The code of an error answer that was not made from an [`ApiError`] (see
/// [`problems_only`]): the generic one of its status.
fn code_of_status(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthenticated,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::InvalidBody,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::ServiceUnavailable,
        status if status.is_client_error() => ErrorCode::InvalidRequest,
        _ => ErrorCode::Internal,
    }
}

fn title_of(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::MalformedJson => "Malformed JSON",
        ErrorCode::EmptyBody => "Empty request body",
        ErrorCode::UnsupportedMediaType => "Unsupported media type",
        ErrorCode::UnknownField => "Unknown field",
        ErrorCode::InvalidBody => "Invalid request body",
        ErrorCode::ValidationFailed => "Validation failed",
        ErrorCode::InvalidQuery => "Invalid query string",
        ErrorCode::InvalidPath => "Invalid path parameter",
        ErrorCode::PayloadTooLarge => "Payload too large",
        ErrorCode::UnknownPipeline => "Unknown pipeline",
        ErrorCode::RunNotFound => "Run not found",
        ErrorCode::RouteNotFound => "Not found",
        ErrorCode::MethodNotAllowed => "Method not allowed",
        ErrorCode::InvalidTransition => "Invalid state transition",
        ErrorCode::RunAlreadyFinished => "Run already finished",
        ErrorCode::ServiceUnavailable => "Service unavailable",
        ErrorCode::ShuttingDown => "Shutting down",
        ErrorCode::DeadLetterNotFound => "Dead letter not found",
        ErrorCode::NotDeadLettered => "Not in the dead-letter queue",
        ErrorCode::NotWaitingApproval => "Stage not waiting for approval",
        ErrorCode::LeaseUnavailable => "Leasing unavailable",
        ErrorCode::EnvironmentNotFound => "Environment not found",
        ErrorCode::EnvironmentQuotaExceeded => "Environment quota exceeded",
        ErrorCode::EnvironmentNameTaken => "Environment name taken",
        ErrorCode::UnmergedWork => "Unmerged work",
        ErrorCode::ServiceNotFound => "Service not found",
        ErrorCode::ArtifactNotFound => "Artifact not found",
        ErrorCode::SecretNotFound => "Secret not found",
        ErrorCode::NoFreePorts => "No free ports",
        ErrorCode::WorkspaceFailed => "Workspace failed",
        ErrorCode::UnknownHost => "Unknown host",
        ErrorCode::UpstreamUnavailable => "Upstream unavailable",
        ErrorCode::ProxyLoop => "Proxy loop",
        ErrorCode::InvalidRequest => "Invalid request",
        ErrorCode::InvalidHost => "Invalid host",
        ErrorCode::Unauthenticated => "Authentication required",
        ErrorCode::InvalidCredentials => "Invalid credentials",
        ErrorCode::Forbidden => "Forbidden",
        ErrorCode::ProjectNotFound => "Project not found",
        ErrorCode::ProjectExists => "Project exists",
        ErrorCode::UserNotFound => "User not found",
        ErrorCode::UserExists => "User exists",
        ErrorCode::AlreadyMember => "Already a member",
        ErrorCode::NotAMember => "Not a member",
        ErrorCode::TokenNotFound => "Token not found",
        ErrorCode::RateLimited => "Too many requests",
        ErrorCode::WebhookNotFound => "Webhook not found",
        ErrorCode::WebhookDeliveryNotFound => "Webhook delivery not found",
        ErrorCode::WebhookQuotaExceeded => "Webhook quota exceeded",
        ErrorCode::WebhookDisabled => "Webhook disabled",
        ErrorCode::WebhookTargetNotAllowed => "Webhook target not allowed",
        ErrorCode::AttemptNotFound => "Attempt not found",
        ErrorCode::StaleAttempt => "Stale attempt",
        ErrorCode::ChatSessionNotFound => "Chat session not found",
        ErrorCode::NoChatAgent => "No chat agent",
        ErrorCode::ChatReplyInProgress => "Chat reply in progress",
        ErrorCode::IdempotencyKeyReused => "Idempotency key reused",
        ErrorCode::IdempotencyKeyInUse => "Idempotency key in use",
        ErrorCode::Internal => "Internal error",
    }
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl From<ValidationError> for FieldError {
    fn from(err: ValidationError) -> Self {
        Self { field: err.field, message: err.message }
    }
}

/// The RFC 9457 body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable snake_case code to match on.
    pub code: String,
    /// The request's id, also in the `X-Request-Id` header and the server's logs.
    pub request_id: String,
    /// Field-level problems, for validation errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: String,
    pub errors: Vec<FieldError>,
    /// Seconds to wait before trying again (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into(), errors: Vec::new(), retry_after: None }
    }

    pub fn validation(errors: Vec<FieldError>) -> Self {
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        let detail = format!("invalid fields: {}", fields.join(", "));
        Self { code: ErrorCode::ValidationFailed, detail, errors, retry_after: None }
    }

    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code)
    }

    /// The problem document the client gets.
    pub fn to_problem(&self) -> Problem {
        Problem {
            type_uri: format!("https://drover.dev/problems/{}", self.code),
            title: title_of(self.code).to_owned(),
            status: self.status().as_u16(),
            detail: self.detail.clone(),
            code: self.code.as_str().to_owned(),
            request_id: current_request_id(),
            errors: self.errors.clone(),
        }
    }

    pub(crate) fn internal(err: &dyn std::fmt::Display) -> Self {
        // The cause goes to the log, under this request's id; the client gets the id.
        tracing::error!(error = %err, "internal error");
        Self::new(
            ErrorCode::Internal,
            "an unexpected error occurred; see the server log for this request id",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let problem = self.to_problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"drover\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The longest plain-text error body kept as a converted problem's detail.
const MAX_PLAIN_ERROR_BYTES: usize = 4096;

/// The router's last resort: an error answer that is not problem+json (a rejection an
/// axum extractor or layer made in plain text, which handlers' own extractors in
/// `extract.rs` never let through) becomes one, with the generic code of its status, its
/// text as the detail, and its other headers kept.
pub(crate) async fn problems_only(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes() == PROBLEM_JSON.as_bytes());
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_ERROR_BYTES)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let code = code_of_status(status);
    tracing::warn!(status = status.as_u16(), %code, "an error answer was not a problem; converted");
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut problem = ApiError::new(code, detail).into_response();
    let own: std::collections::HashSet<header::HeaderName> =
        problem.headers().keys().cloned().collect();
    for (name, value) in &parts.headers {
        if !own.contains(name) && *name != header::CONTENT_LENGTH {
            problem.headers_mut().append(name.clone(), value.clone());
        }
    }
    problem
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::RunNotFound(id) => {
                Self::new(ErrorCode::RunNotFound, format!("no run with id {id}"))
            }
            StoreError::RunAlreadyFinished { id, status } => Self::new(
                ErrorCode::RunAlreadyFinished,
                format!("run {id} already finished ({status}); only an unfinished run can change"),
            ),
            StoreError::Transition(err) => Self::new(ErrorCode::InvalidTransition, err.to_string()),
            StoreError::AttemptNotFound(id) => {
                Self::new(ErrorCode::DeadLetterNotFound, format!("no dead letter with id {id}"))
            }
            StoreError::EnvironmentNotFound(id) => {
                Self::new(ErrorCode::EnvironmentNotFound, format!("no environment {id}"))
            }
            err @ StoreError::EnvironmentQuotaExceeded { .. } => {
                Self::new(ErrorCode::EnvironmentQuotaExceeded, err.to_string())
            }
            err @ StoreError::EnvironmentNameTaken(_) => {
                Self::new(ErrorCode::EnvironmentNameTaken, err.to_string())
            }
            err @ StoreError::EnvironmentBusy { .. } => {
                Self::new(ErrorCode::InvalidTransition, err.to_string())
            }
            err @ StoreError::NotDeadLettered { .. } => {
                Self::new(ErrorCode::NotDeadLettered, err.to_string())
            }
            err @ StoreError::UserExists(_) => Self::new(ErrorCode::UserExists, err.to_string()),
            err @ StoreError::UserNotFound(_) => {
                Self::new(ErrorCode::UserNotFound, err.to_string())
            }
            err @ StoreError::ProjectExists(_) => {
                Self::new(ErrorCode::ProjectExists, err.to_string())
            }
            err @ StoreError::ProjectNotFound(_) => {
                Self::new(ErrorCode::ProjectNotFound, err.to_string())
            }
            err @ StoreError::AlreadyMember { .. } => {
                Self::new(ErrorCode::AlreadyMember, err.to_string())
            }
            err @ StoreError::NotAMember { .. } => {
                Self::new(ErrorCode::NotAMember, err.to_string())
            }
            err @ StoreError::TokenNotFound(_) => {
                Self::new(ErrorCode::TokenNotFound, err.to_string())
            }
            err @ StoreError::NotWaitingApproval { .. } => {
                Self::new(ErrorCode::NotWaitingApproval, err.to_string())
            }
            err @ StoreError::WebhookNotFound(_) => {
                Self::new(ErrorCode::WebhookNotFound, err.to_string())
            }
            err @ StoreError::WebhookDeliveryNotFound { .. } => {
                Self::new(ErrorCode::WebhookDeliveryNotFound, err.to_string())
            }
            err @ StoreError::WebhookQuotaExceeded { .. } => {
                Self::new(ErrorCode::WebhookQuotaExceeded, err.to_string())
            }
            err @ StoreError::WebhookDisabled(_) => {
                Self::new(ErrorCode::WebhookDisabled, err.to_string())
            }
            err @ StoreError::ChatSessionNotFound(_) => {
                Self::new(ErrorCode::ChatSessionNotFound, err.to_string())
            }
            err @ StoreError::PortBlockTaken { .. } => {
                Self::new(ErrorCode::NoFreePorts, err.to_string())
            }
            other => Self::internal(&other),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::UnknownPipeline { .. } => {
                Self::new(ErrorCode::UnknownPipeline, err.to_string()).with_errors(vec![
                    FieldError { field: "pipeline".to_owned(), message: err.to_string() },
                ])
            }
            err @ EngineError::AttemptNotFound(_) => {
                Self::new(ErrorCode::AttemptNotFound, err.to_string())
            }
            err @ EngineError::AgentNotAllowed(_) => {
                Self::new(ErrorCode::Forbidden, err.to_string())
            }
            err @ EngineError::StaleAttempt { .. } => {
                Self::new(ErrorCode::StaleAttempt, err.to_string())
            }
            EngineError::SecretsUnavailable(why) => {
                // Why goes to the log; the worker learns that it may try again.
                tracing::error!(error = %why, "cannot open an attempt's secrets");
                Self::new(
                    ErrorCode::ServiceUnavailable,
                    "the project's secrets cannot be opened now",
                )
            }
            EngineError::Store(err) => err.into(),
        }
    }
}

impl From<drover_env::manager::EnvError> for ApiError {
    fn from(err: drover_env::manager::EnvError) -> Self {
        use drover_env::manager::EnvError;
        match err {
            EnvError::Store(err) => err.into(),
            // Blocks come free as runs end.
            err @ EnvError::NoFreePorts { .. } => {
                Self { retry_after: Some(5), ..Self::new(ErrorCode::NoFreePorts, err.to_string()) }
            }
            err @ EnvError::Workspace(_) => Self::new(ErrorCode::WorkspaceFailed, err.to_string()),
            err @ EnvError::UnmergedWork(_) => Self::new(ErrorCode::UnmergedWork, err.to_string()),
            EnvError::NotFound(id) => {
                Self::new(ErrorCode::EnvironmentNotFound, format!("no environment {id}"))
            }
            err @ EnvError::ServiceNotFound { .. } => {
                Self::new(ErrorCode::ServiceNotFound, err.to_string())
            }
            err @ EnvError::ReservedName(_) => Self::validation(vec![FieldError {
                field: "name".to_owned(),
                message: err.to_string(),
            }]),
        }
    }
}

impl From<drover_secrets::VaultError> for ApiError {
    fn from(err: drover_secrets::VaultError) -> Self {
        use drover_secrets::VaultError;
        match err {
            VaultError::Invalid(errors) => {
                Self::validation(errors.into_iter().map(FieldError::from).collect())
            }
            VaultError::NotFound(name) => {
                Self::new(ErrorCode::SecretNotFound, format!("the project has no secret `{name}`"))
            }
            VaultError::Store(err) => err.into(),
            // Names keys and secrets by id and name only, never a value or key material.
            other => Self::internal(&other),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    async fn answer(
        router: axum::Router,
        request: axum::http::Request<Body>,
    ) -> (Response, Problem) {
        let response =
            router.layer(axum::middleware::from_fn(problems_only)).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 16).await.unwrap();
        let problem = serde_json::from_slice(&bytes).unwrap();
        (Response::from_parts(parts, Body::empty()), problem)
    }

    #[tokio::test]
    async fn a_plain_text_rejection_leaves_as_a_problem_with_its_status_code_and_headers() {
        // axum's own extractor, whose rejection is plain text.
        let router = axum::Router::new().route(
            "/{n}",
            axum::routing::post(
                |_: axum::extract::Path<u32>, _: axum::Json<serde_json::Value>| async {},
            ),
        );
        let request = axum::http::Request::post("/7").body(Body::from("{}")).unwrap();
        let (response, problem) = answer(router.clone(), request).await;
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!((problem.code.as_str(), problem.status), ("unsupported_media_type", 415));
        assert!(problem.detail.contains("Content-Type"), "{}", problem.detail);

        let request = axum::http::Request::post("/seven").body(Body::empty()).unwrap();
        let (response, problem) = answer(router, request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!((problem.code.as_str(), problem.status), ("invalid_request", 400));

        let refusal = axum::Router::new().route(
            "/",
            axum::routing::get(|| async {
                (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")], "only POST")
            }),
        );
        let (response, problem) =
            answer(refusal, axum::http::Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(response.headers()[header::ALLOW], "POST", "its headers are kept");
        assert_eq!(
            (problem.code.as_str(), problem.detail.as_str()),
            ("method_not_allowed", "only POST")
        );
    }

    #[tokio::test]
    async fn answers_that_are_problems_or_not_errors_pass_untouched() {
        let router =
            axum::Router::new().route("/ok", axum::routing::get(|| async { "fine" })).route(
                "/run",
                axum::routing::get(|| async { ApiError::new(ErrorCode::RunNotFound, "no run") }),
            );
        let ok = router
            .clone()
            .layer(axum::middleware::from_fn(problems_only))
            .oneshot(axum::http::Request::get("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(ok.into_body(), 1024).await.unwrap();
        assert_eq!(&bytes[..], b"fine");
        let request = axum::http::Request::get("/run").body(Body::empty()).unwrap();
        let (response, problem) = answer(router, request).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!((problem.code.as_str(), problem.detail.as_str()), ("run_not_found", "no run"));
    }

    #[test]
    fn every_code_maps_to_a_client_or_server_error_status() {
        let codes = [
            ErrorCode::MalformedJson,
            ErrorCode::EmptyBody,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::UnknownField,
            ErrorCode::InvalidBody,
            ErrorCode::ValidationFailed,
            ErrorCode::InvalidQuery,
            ErrorCode::InvalidPath,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnknownPipeline,
            ErrorCode::RunNotFound,
            ErrorCode::RouteNotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::InvalidTransition,
            ErrorCode::RunAlreadyFinished,
            ErrorCode::ServiceUnavailable,
            ErrorCode::ShuttingDown,
            ErrorCode::DeadLetterNotFound,
            ErrorCode::NotDeadLettered,
            ErrorCode::NotWaitingApproval,
            ErrorCode::LeaseUnavailable,
            ErrorCode::EnvironmentNotFound,
            ErrorCode::EnvironmentQuotaExceeded,
            ErrorCode::EnvironmentNameTaken,
            ErrorCode::UnmergedWork,
            ErrorCode::ServiceNotFound,
            ErrorCode::SecretNotFound,
            ErrorCode::NoFreePorts,
            ErrorCode::WorkspaceFailed,
            ErrorCode::UnknownHost,
            ErrorCode::UpstreamUnavailable,
            ErrorCode::ProxyLoop,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidHost,
            ErrorCode::Unauthenticated,
            ErrorCode::InvalidCredentials,
            ErrorCode::Forbidden,
            ErrorCode::ProjectNotFound,
            ErrorCode::ProjectExists,
            ErrorCode::UserNotFound,
            ErrorCode::UserExists,
            ErrorCode::AlreadyMember,
            ErrorCode::NotAMember,
            ErrorCode::TokenNotFound,
            ErrorCode::RateLimited,
            ErrorCode::WebhookNotFound,
            ErrorCode::WebhookDeliveryNotFound,
            ErrorCode::WebhookQuotaExceeded,
            ErrorCode::WebhookDisabled,
            ErrorCode::IdempotencyKeyReused,
            ErrorCode::IdempotencyKeyInUse,
            ErrorCode::Internal,
        ];
        for code in codes {
            let status = status_of(code);
            assert!(status.is_client_error() || status.is_server_error(), "{code}");
            assert!(!title_of(code).is_empty());
        }
    }
}
