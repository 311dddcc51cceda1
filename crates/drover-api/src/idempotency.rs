//! `Idempotency-Key` on `POST /runs` and `POST /environments`: a client that retries a
//! request it is not sure went through gets the first answer again instead of a second
//! run. The same key with the same body replays the kept response (with
//! `Idempotent-Replayed: true`); with a different body it is refused (`422
//! idempotency_key_reused`); while the first request is still being handled, a second is
//! refused (`409 idempotency_key_in_use`). Keys are scoped to the credential and the
//! project, kept for a day, and only successful answers are kept (a failure may be retried
//! with the same key).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_domain::{ErrorCode, ProjectId, Timestamp};
use drover_store::KeptResponse;

use crate::AppState;
use crate::auth::PROJECT_HEADER;
use crate::error::{ApiError, FieldError};

/// The request header.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// How long a key is remembered.
pub(crate) const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);
/// The largest response kept (runs and environments are far smaller).
const MAX_KEPT_BYTES: usize = 256 * 1024;
/// Keys being handled at once, at most (beyond, new keyed requests wait their turn: 409).
const MAX_IN_FLIGHT: usize = 10_000;

/// Keys whose first request is still being handled.
#[derive(Default)]
pub(crate) struct InFlight(Mutex<HashSet<String>>);

impl InFlight {
    fn claim(&self, key: &str) -> bool {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        keys.len() < MAX_IN_FLIGHT && keys.insert(key.to_owned())
    }

    fn release(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

pub(crate) async fn middleware(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(IDEMPOTENCY_KEY) else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            key.to_owned()
        }
        _ => {
            return ApiError::validation(vec![FieldError {
                field: "Idempotency-Key".to_owned(),
                message: "1-255 visible ASCII characters".to_owned(),
            }])
            .into_response();
        }
    };
    let project = match request.headers().get(PROJECT_HEADER) {
        None => ProjectId::default_project(),
        Some(value) => match value.to_str().ok().and_then(|v| ProjectId::parse(v).ok()) {
            Some(project) => project,
            // The handler answers for a project that does not exist.
            None => return next.run(request).await,
        },
    };
    let credential = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "anonymous".to_owned(), |c| drover_auth::hash_token(c)[..24].to_owned());
    let scoped = format!("{credential}:{key}");
    let route = format!("POST {}", request.uri().path());

    let (parts, body) = request.into_parts();
    let limit = state.inner.body_limit;
    let bytes = match to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than {limit} bytes"),
            )
            .into_response();
        }
    };
    let body_hash = drover_auth::hash_token(&String::from_utf8_lossy(&bytes));
    let identities = &state.auth().identities;
    match identities.kept_response(&project, &route, &scoped).await {
        Ok(Some(kept)) if kept.body_hash == body_hash => return replay(&kept),
        Ok(Some(_)) => {
            return ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                format!("Idempotency-Key `{key}` was used for a different request"),
            )
            .into_response();
        }
        Ok(None) => {}
        Err(err) => return ApiError::from(err).into_response(),
    }
    let in_flight = &state.inner.in_flight;
    if !in_flight.claim(&scoped) {
        return ApiError::new(
            ErrorCode::IdempotencyKeyInUse,
            format!("a request with Idempotency-Key `{key}` is still being handled; retry shortly"),
        )
        .into_response();
    }
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let response = keep(&state, &project, &route, &scoped, body_hash, response).await;
    in_flight.release(&scoped);
    response
}

/// Keeps a successful response for the key, and hands it on.
async fn keep(
    state: &AppState,
    project: &ProjectId,
    route: &str,
    key: &str,
    body_hash: String,
    response: Response,
) -> Response {
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_KEPT_BYTES).await else {
        return ApiError::new(ErrorCode::Internal, "the response could not be kept")
            .into_response();
    };
    let kept = KeptResponse {
        body_hash,
        status: parts.status.as_u16(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    let identities = &state.auth().identities;
    if let Err(err) = identities.keep_response(project, route, key, &kept, now()).await {
        tracing::warn!(error = %err, "an idempotent response was not kept");
    }
    // Old keys go as new ones come.
    let _ = identities.forget_responses(now().minus(KEEP_FOR)).await;
    Response::from_parts(parts, Body::from(bytes))
}

fn replay(kept: &KeptResponse) -> Response {
    let status = StatusCode::from_u16(kept.status).unwrap_or(StatusCode::OK);
    let mut response = (status, kept.body.clone()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
