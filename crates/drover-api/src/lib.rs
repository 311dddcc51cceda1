//! drover's HTTP API, `/api/v1`, plus `/healthz`, `/readyz` and `/metrics`.
//!
//! **API boundary**: this crate is the only one that knows HTTP status codes, headers and
//! JSON wire types ([`wire`]). Handlers translate requests into engine and store calls and
//! results into wire types; every error, from any layer, becomes problem+json in
//! [`error`]. Every query is scoped to the caller's project ([`Caller`]).

mod approvals;
pub mod artifacts;
mod dlq;
pub mod environments;
mod error;
mod extract;
mod logs;
mod openapi;
mod request_id;
pub mod routes;
mod runs;
mod system;
mod usage;
pub mod wire;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
use drover_domain::ProjectId;
use drover_engine::Engine;
use drover_env::manager::EnvManager;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;

pub use error::{ApiError, FieldError, Problem};
pub use openapi::openapi_document;

/// Everything handlers need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    envs: Arc<EnvManager>,
    metrics: Option<PrometheusHandle>,
    /// Fires when the server starts draining: no new runs, `readyz` says so.
    draining: CancellationToken,
    sse_keep_alive: Duration,
    /// Where the routing proxy listens, when one runs.
    proxy: routes::ProxyAddrs,
    /// What external workers are told when they join.
    bootstrap: wire::WorkerBootstrap,
}

impl AppState {
    pub fn new(
        engine: Arc<Engine>,
        envs: Arc<EnvManager>,
        metrics: Option<PrometheusHandle>,
        draining: CancellationToken,
        proxy: routes::ProxyAddrs,
        bootstrap: wire::WorkerBootstrap,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                envs,
                metrics,
                draining,
                sse_keep_alive: Duration::from_secs(15),
                proxy,
                bootstrap,
            }),
        }
    }

    fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    fn envs(&self) -> &EnvManager {
        &self.inner.envs
    }
}

/// Who is calling. In local mode every caller is the implicit local admin working in the
/// `default` project; authentication will fill this in from a verified token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project: ProjectId,
    /// Who is calling: `local` (the implicit local admin) until identities exist.
    pub user: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller { project: ProjectId::default_project(), user: "local".to_owned() })
    }
}

/// The whole HTTP surface, ready to serve.
pub fn router(state: AppState, body_limit_bytes: usize) -> Router {
    let api = Router::new()
        .route("/runs", post(runs::create_run).get(runs::list_runs))
        .route("/runs/{id}", get(runs::get_run))
        .route("/runs/{id}/cancel", post(runs::cancel_run))
        .route("/runs/{id}/events", get(runs::run_events))
        .route("/runs/{id}/logs", get(logs::run_logs))
        .route("/runs/{id}/artifacts", get(artifacts::list))
        .route("/runs/{id}/artifacts/{*name}", get(artifacts::download))
        .route("/runs/{id}/stages/{stage}/approve", post(approvals::approve))
        .route("/runs/{id}/stages/{stage}/reject", post(approvals::reject))
        .route("/usage", get(usage::report))
        .route("/pipelines", get(system::pipelines))
        .route("/agents", get(system::agents))
        .route("/workers", get(workers::list_workers))
        .route("/workers/config", get(workers::bootstrap))
        .route("/tasks/lease", post(workers::lease))
        .route("/worker-messages", post(workers::worker_message))
        .route("/environments", post(environments::create).get(environments::list))
        .route("/environments/{id}", get(environments::show).delete(environments::delete))
        .route("/environments/{id}/start", post(environments::start))
        .route("/environments/{id}/stop", post(environments::stop))
        .route("/environments/{id}/services", get(environments::services))
        .route("/environments/{id}/services/{name}/restart", post(environments::restart_service))
        .route("/environments/{id}/services/{name}/logs", get(environments::service_logs))
        .route("/services", get(environments::overview))
        .route("/services/shared", get(environments::shared))
        .route("/routes", get(routes::list))
        .route("/dlq", get(dlq::list))
        .route("/dlq/{id}/redrive", post(dlq::redrive))
        .route("/dlq/{id}/discard", post(dlq::discard))
        .route("/openapi.json", get(system::openapi));
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .nest("/api/v1", api)
        .fallback(system::route_not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(CatchPanicLayer::custom(system::panic_response))
        .layer(axum::middleware::from_fn(request_id::middleware))
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .with_state(state)
}
