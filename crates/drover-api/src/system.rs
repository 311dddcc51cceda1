//! Health, readiness, metrics, pipelines, the OpenAPI document, and the fallbacks that
//! keep even unknown routes and panics in problem+json.

use std::any::Any;
use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use drover_domain::ErrorCode;

use crate::error::{ApiError, Problem};
use crate::openapi::InProject;
use crate::wire::{AgentList, AgentView, HealthView, PipelineList, PipelineView, StageView};
use crate::{AppState, Caller};

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = HealthView)))]
pub(crate) async fn healthz() -> Json<HealthView> {
    Json(HealthView { status: "ok".to_owned(), checks: BTreeMap::new() })
}

/// Readiness: the store answers and the server is not draining. The checks also say
/// whether this server holds the leader lease (`leader`: `yes`/`no`) and how full the
/// store's connection pool is (`store_pool`: `backend open/max, idle N`).
#[utoipa::path(
    get, path = "/readyz", tag = "system",
    responses(
        (status = 200, body = HealthView),
        (status = 503, description = "A dependency is down or the server is stopping", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<HealthView>, ApiError> {
    if state.inner.draining.is_cancelled() {
        return Err(ApiError::new(ErrorCode::ShuttingDown, "the server is shutting down"));
    }
    if let Err(err) = state.engine().store().ping().await {
        tracing::warn!(error = %err, "readiness: store unavailable");
        return Err(ApiError::new(ErrorCode::ServiceUnavailable, "the store does not answer"));
    }
    let pool = state.engine().store().pool();
    let leader = if state.engine().is_leader() { "yes" } else { "no" };
    let checks = BTreeMap::from([
        ("store".to_owned(), "ok".to_owned()),
        (
            "store_pool".to_owned(),
            format!(
                "{} {}/{} open, {} idle",
                pool.backend, pool.connections, pool.max_connections, pool.idle
            ),
        ),
        ("leader".to_owned(), leader.to_owned()),
    ]);
    Ok(Json(HealthView { status: "ready".to_owned(), checks }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get, path = "/metrics", tag = "system", security(()),
    responses(
        (status = 200, description = "The text exposition format", content_type = "text/plain", body = String),
        (status = 404, description = "`route_not_found`: metrics are not enabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    match &state.inner.metrics {
        Some(handle) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
                .into_response()
        }
        None => ApiError::new(ErrorCode::RouteNotFound, "metrics are not enabled").into_response(),
    }
}

/// The pipelines this server runs.
#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines", params(InProject), responses((status = 200, body = PipelineList)))]
pub(crate) async fn pipelines(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<PipelineList> {
    let catalog = state.engine().pipelines();
    let items = catalog
        .iter()
        .map(|pipeline| PipelineView {
            name: pipeline.name.to_string(),
            description: pipeline.description.clone(),
            stages: (0u32..)
                .zip(&pipeline.stages)
                .map(|(index, stage)| StageView {
                    name: stage.name.to_string(),
                    agent: stage.agent.to_string(),
                    max_attempts: stage.max_attempts,
                    timeout_secs: stage.timeout.as_secs(),
                    needs: pipeline
                        .needs_of(index)
                        .into_iter()
                        .filter_map(|need| pipeline.stage(need))
                        .map(|need| need.name.to_string())
                        .collect(),
                    approval: stage.approval,
                    when: stage.when.as_ref().map(ToString::to_string),
                    allowed_commands: stage.policy.allowed_commands.clone(),
                    protected_paths: stage.policy.protected_paths.clone(),
                    outputs: stage.outputs.clone(),
                    contract: stage.contract,
                })
                .collect(),
        })
        .collect();
    Json(PipelineList { items })
}

/// The agents stages can name: built-in ones and those of `[agents]`.
#[utoipa::path(get, path = "/api/v1/agents", tag = "pipelines", params(InProject), responses((status = 200, body = AgentList)))]
pub(crate) async fn agents(State(state): State<AppState>, _caller: Caller) -> Json<AgentList> {
    use drover_domain::AgentRunner;
    let agents = state.engine().agents();
    let items = agents
        .iter()
        .map(|agent| {
            let (kind, command, env) = match &agent.runner {
                AgentRunner::Builtin => ("builtin", None, Vec::new()),
                AgentRunner::Template => ("template", None, Vec::new()),
                AgentRunner::Llm(llm) => ("llm", None, llm.api_key_env.iter().cloned().collect()),
                AgentRunner::Command(command) => (
                    "command",
                    Some(std::iter::once(&command.program).chain(&command.args).cloned().collect()),
                    command.env.keys().cloned().collect(),
                ),
            };
            AgentView {
                name: agent.name.to_string(),
                kind: kind.to_owned(),
                description: agent.description.clone(),
                command,
                env,
            }
        })
        .collect();
    Json(AgentList { items })
}

/// This API's OpenAPI document.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "system", security(()),
    responses((status = 200, description = "This document", body = Object))
)]
pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi_document()).into_response()
}

pub(crate) async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, format!("no route for {}", uri.path()))
}

pub(crate) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path()))
}

pub(crate) fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = message, "handler panicked");
    ApiError::new(
        ErrorCode::Internal,
        "an unexpected error occurred; see the server log for this request id",
    )
    .into_response()
}
