//! Request ids and per-request telemetry.
//!
//! Every request gets an id: the client's `X-Request-Id` if it is sane, a new UUIDv7
//! otherwise. The id is echoed in the response, carried in a task-local so error bodies can
//! name it, and set on the request's tracing span, so every log line of the request carries
//! it. The same middleware records the request metrics by route and status, and answers
//! with `Server-Timing` (W3C): the request's time and how many store statements it ran.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";
const MAX_REQUEST_ID_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled, or `"none"` outside a request.
pub(crate) fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_else(|_| "none".to_owned())
}

fn acceptable(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

pub(crate) async fn middleware(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| acceptable(id))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().to_string();
    let span = tracing::info_span!("http", request_id = %id, %method, %route);
    let started = Instant::now();

    let (mut response, statements) = drover_store::counting_statements(
        REQUEST_ID.scope(id.clone(), next.run(request)).instrument(span.clone()),
    )
    .await;

    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            status,
            statements,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request handled"
        );
    });
    metrics::counter!(
        "drover_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("drover_http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    // How much the request cost (W3C Server Timing): its time and its store statements.
    let timing = format!(
        "app;dur={:.1}, store;desc=\"{statements} statements\"",
        elapsed.as_secs_f64() * 1000.0
    );
    if let Ok(value) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::acceptable;

    #[test]
    fn client_request_ids_are_accepted_only_when_short_and_plain() {
        assert!(acceptable("abc-123_x.y:z"));
        assert!(!acceptable(""));
        assert!(!acceptable("has space"));
        assert!(!acceptable(&"x".repeat(129)));
    }
}
