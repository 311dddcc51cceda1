//! drover's HTTP API, `/api/v1`, plus `/healthz`, `/readyz` and `/metrics`.
//!
//! **API boundary**: this crate is the only one that knows HTTP status codes, headers and
//! JSON wire types ([`wire`]). Handlers translate requests into engine and store calls and
//! results into wire types; every error, from any layer, becomes problem+json in
//! [`error`]. Every query is scoped to the caller's project ([`Caller`]).

mod accounts;
mod approvals;
pub mod artifacts;
pub mod auth;
pub mod chat;
pub mod deprecation;
mod dlq;
pub mod environments;
mod error;
mod events;
mod extract;
mod idempotency;
pub mod limits;
mod logs;
mod openapi;
pub mod presence;
mod request_id;
pub mod routes;
mod runs;
pub mod secrets;
mod system;
mod usage;
pub mod webhook_targets;
pub mod webhooks;
pub mod wire;
mod workers;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
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
    auth: Arc<AuthState>,
    limits: limits::RateLimits,
    in_flight: idempotency::InFlight,
    /// Largest accepted request body, in bytes.
    body_limit: usize,
    webhooks: Arc<dyn drover_store::WebhookStore>,
    /// Whether webhook endpoints may be private addresses beyond local mode.
    allow_private_webhook_targets: bool,
    /// Chat sessions and their messages.
    chat: Arc<dyn drover_store::ChatStore>,
    /// Chat sessions with a reply under way.
    replying: chat::Replying,
    /// Who watches what over WebSocket subscriptions.
    presence: Arc<presence::Presence>,
    /// Committed events of every server, in sequence order (see `AppParts::live`).
    live: tokio::sync::broadcast::Sender<drover_domain::Event>,
}

/// What the API is built from.
pub struct AppParts {
    pub engine: Arc<Engine>,
    pub envs: Arc<EnvManager>,
    pub metrics: Option<PrometheusHandle>,
    /// Fires when the server starts draining.
    pub draining: CancellationToken,
    pub proxy: routes::ProxyAddrs,
    pub bootstrap: wire::WorkerBootstrap,
    pub auth: Arc<AuthState>,
    pub limits: limits::RateLimits,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Webhook endpoints and their deliveries.
    pub webhooks: Arc<dyn drover_store::WebhookStore>,
    /// `[webhooks] allow_private_targets`: endpoints may be private addresses even beyond
    /// local mode.
    pub allow_private_webhook_targets: bool,
    /// Chat sessions and their messages.
    pub chat: Arc<dyn drover_store::ChatStore>,
    /// Who watches what, here and on the other servers.
    pub presence: Arc<presence::Presence>,
    /// The live feed every stream follows: the events committed by any server of the
    /// cluster, in sequence order, with no gap (the server's `live` loop fills them in).
    pub live: tokio::sync::broadcast::Sender<drover_domain::Event>,
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        let AppParts {
            engine,
            envs,
            metrics,
            draining,
            proxy,
            bootstrap,
            auth,
            limits,
            body_limit,
            webhooks,
            allow_private_webhook_targets,
            chat,
            presence,
            live,
        } = parts;
        Self {
            inner: Arc::new(Inner {
                engine,
                envs,
                metrics,
                draining,
                sse_keep_alive: Duration::from_secs(15),
                proxy,
                bootstrap,
                auth,
                limits,
                in_flight: idempotency::InFlight::default(),
                presence,
                live,
                body_limit,
                webhooks,
                allow_private_webhook_targets,
                chat,
                replying: chat::Replying::default(),
            }),
        }
    }

    fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    fn envs(&self) -> &EnvManager {
        &self.inner.envs
    }

    fn auth(&self) -> &AuthState {
        &self.inner.auth
    }

    fn webhooks(&self) -> &dyn drover_store::WebhookStore {
        self.inner.webhooks.as_ref()
    }

    /// Where webhook endpoints may be, now.
    fn webhook_targets(&self) -> webhook_targets::TargetPolicy {
        webhook_targets::TargetPolicy::new(
            self.inner.allow_private_webhook_targets,
            self.inner.auth.clone(),
        )
    }

    /// Follows the cluster's committed events from now on.
    fn live_events(&self) -> tokio::sync::broadcast::Receiver<drover_domain::Event> {
        self.inner.live.subscribe()
    }

    fn chat(&self) -> &dyn drover_store::ChatStore {
        self.inner.chat.as_ref()
    }
}

pub use auth::{Account, Admin, AuthState, Caller, WorkerCaller};

/// The whole HTTP surface, ready to serve.
pub fn router(state: AppState) -> Router {
    let body_limit_bytes = state.inner.body_limit;
    let idempotent =
        || axum::middleware::from_fn_with_state(state.clone(), idempotency::middleware);
    let api = Router::new()
        .route("/runs", post(runs::create_run).get(runs::list_runs).layer(idempotent()))
        .route("/runs/{id}", get(runs::get_run))
        .route("/runs/{id}/cancel", post(runs::cancel_run))
        .route("/runs/{id}/events", get(runs::run_events))
        .route("/runs/{id}/logs", get(logs::run_logs))
        .route("/runs/{id}/artifacts", get(artifacts::list))
        .route("/runs/{id}/artifacts/{*name}", get(artifacts::download))
        .route("/runs/{id}/stages/{stage}/approve", post(approvals::approve))
        .route("/runs/{id}/stages/{stage}/reject", post(approvals::reject))
        .route("/usage", get(usage::report))
        .route("/events", get(events::stream))
        .route("/ws", get(ws::upgrade))
        .route("/runs/{id}/presence", get(ws::run_presence))
        .route("/pipelines", get(system::pipelines))
        .route("/agents", get(system::agents))
        .route("/workers", get(workers::list_workers))
        .route("/workers/config", get(workers::bootstrap))
        .route("/tasks/lease", post(workers::lease))
        .route("/worker-messages", post(workers::worker_message))
        .route("/tasks/{id}/secrets", post(workers::task_secrets))
        .route(
            "/environments",
            post(environments::create).get(environments::list).layer(idempotent()),
        )
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
        .route("/auth/login", post(accounts::login))
        .route("/auth/refresh", post(accounts::refresh))
        .route("/me", get(accounts::me))
        .route("/tokens", post(accounts::create_token).get(accounts::list_tokens))
        .route("/tokens/{id}", axum::routing::delete(accounts::revoke_token))
        .route("/users", get(accounts::list_users).post(accounts::create_user))
        .route("/users/{name}", axum::routing::patch(accounts::set_user_role))
        .route("/projects", get(accounts::list_projects).post(accounts::create_project))
        .route("/projects/{id}/members", get(accounts::list_members).post(accounts::add_member))
        .route("/projects/{id}/members/{user}", axum::routing::delete(accounts::remove_member))
        .route("/workers/tokens", post(accounts::create_worker_token))
        .route("/audit", get(accounts::audit_log))
        .route("/webhooks", post(webhooks::create).get(webhooks::list))
        .route("/webhooks/{id}", get(webhooks::show).delete(webhooks::delete))
        .route("/webhooks/{id}/enable", post(webhooks::enable))
        .route("/webhooks/{id}/test", post(webhooks::test))
        .route("/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/webhooks/{id}/deliveries/{delivery}", get(webhooks::delivery))
        .route("/webhooks/{id}/deliveries/{delivery}/redeliver", post(webhooks::redeliver))
        .route("/chat/sessions", post(chat::create).get(chat::list))
        .route("/chat/sessions/{id}", get(chat::show).delete(chat::delete))
        .route("/chat/sessions/{id}/messages", post(chat::send))
        .route("/secrets", get(secrets::list))
        .route("/secrets/{name}", axum::routing::put(secrets::put).delete(secrets::delete))
        .route("/openapi.json", get(system::openapi));
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .nest("/api/v1", api)
        .fallback(system::route_not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::middleware))
        .layer(CatchPanicLayer::custom(system::panic_response))
        .layer(axum::middleware::from_fn(error::problems_only))
        .layer(axum::middleware::from_fn(request_id::middleware))
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .with_state(state)
}
