//! Workers: the registry (`GET /workers`) and what external workers use: bootstrap, the
//! secrets of the attempt a worker holds (whatever bus brought it the task), and, for a
//! server whose bus is the embedded one, long-poll leasing and their messages (started,
//! heartbeat, finished, ...) relayed onto the server's bus. Task envelopes, leased or
//! read from a broker, carry secret names only; values come from `POST
//! /tasks/{id}/secrets`, to the holder of the attempt alone.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_bus::{TaskEnvelope, WorkerMessage};
use drover_domain::{AgentType, AttemptId, ErrorCode, FencingToken, ProjectId};
use drover_engine::SecretsRequest;
use futures::StreamExt;

use crate::auth::WorkerCaller;
use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::openapi::InProject;
use crate::wire::{
    LeaseRequest, TaskSecretsRequest, TaskSecretsView, WorkerBootstrap, WorkerList,
    WorkerMessageAck, WorkerView,
};
use crate::{AppState, Caller};

/// The longest a lease request may wait.
const MAX_LEASE_WAIT: Duration = Duration::from_secs(30);

/// The registered workers, live first.
#[utoipa::path(get, path = "/api/v1/workers", tag = "workers", params(InProject), responses((status = 200, body = WorkerList)))]
pub(crate) async fn list_workers(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<WorkerList>, ApiError> {
    let workers = state.engine().store().list_workers().await?;
    Ok(Json(WorkerList { items: workers.iter().map(WorkerView::from).collect() }))
}

/// How an external worker joins this server.
#[utoipa::path(get, path = "/api/v1/workers/config", tag = "workers", responses((status = 200, body = WorkerBootstrap)))]
pub(crate) async fn bootstrap(
    State(state): State<AppState>,
    _worker: WorkerCaller,
) -> Json<WorkerBootstrap> {
    Json(state.inner.bootstrap.clone())
}

/// Waits for a task of one of the given agent types (embedded bus only). `204` when none
/// came within `wait_ms`.
#[utoipa::path(
    post, path = "/api/v1/tasks/lease", tag = "workers",
    request_body = LeaseRequest,
    responses(
        (status = 200, description = "A task envelope (JSON)", body = serde_json::Value),
        (status = 204, description = "No task within the wait"),
        (status = 409, description = "The server uses a broker; read it directly", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: no agent type, or one this server does not know", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`service_unavailable`: the bus failed", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn lease(
    State(state): State<AppState>,
    WorkerCaller(worker): WorkerCaller,
    ApiJson(request): ApiJson<LeaseRequest>,
) -> Result<Response, ApiError> {
    let bus = state.engine().bus().clone();
    if bus.kind() != "embedded" {
        return Err(ApiError::new(
            ErrorCode::LeaseUnavailable,
            format!("this server uses {}; workers read tasks from the broker directly", bus.kind()),
        ));
    }
    let known = state.engine().agents();
    let mut agents = Vec::with_capacity(request.agents.len());
    for raw in &request.agents {
        let agent = AgentType::parse(raw.as_str())
            .map_err(|err| ApiError::validation(vec![FieldError::from(err.for_field("agents"))]))?;
        // Only agent types the server knows ever get tasks; a queue is not made for others.
        if !known.iter().any(|definition| definition.name == agent) {
            return Err(ApiError::validation(vec![FieldError {
                field: "agents".to_owned(),
                message: format!(
                    "`{agent}` is not an agent type of this server (see GET /api/v1/agents)"
                ),
            }]));
        }
        agents.push(agent);
    }
    if agents.is_empty() {
        return Err(ApiError::validation(vec![FieldError {
            field: "agents".to_owned(),
            message: "name at least one agent type".to_owned(),
        }]));
    }
    if let Some(refused) = agents.iter().find(|agent| !worker.may_run(agent)) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "worker `{}`'s service token does not allow agent type `{refused}`",
                worker.worker
            ),
        ));
    }
    let wait = Duration::from_millis(request.wait_ms.unwrap_or(20_000)).min(MAX_LEASE_WAIT);
    let mut streams = Vec::with_capacity(agents.len());
    for agent in &agents {
        streams.push(bus.consume_tasks(agent, "http").await.map_err(|err| {
            ApiError::new(ErrorCode::ServiceUnavailable, format!("the bus failed: {err}"))
        })?);
    }
    let mut any = futures::stream::select_all(streams);
    let draining = state.inner.draining.clone();
    let delivery = tokio::select! {
        delivery = tokio::time::timeout(wait, any.next()) => delivery.ok().flatten(),
        () = draining.cancelled() => None,
    };
    let Some(delivery) = delivery else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    // Handed over: from here on the worker's `Started` (or, if it dies first, the
    // engine's reconciliation) owns the task.
    delivery.handle.ack().await;
    let envelope: TaskEnvelope = delivery.envelope;
    Ok(Json(envelope).into_response())
}

/// Relays a worker's message (started, heartbeat, finished, released, alive, gone) to the
/// engine. The answer tells a heartbeating worker whether to stop.
#[utoipa::path(
    post, path = "/api/v1/worker-messages", tag = "workers",
    request_body = serde_json::Value,
    responses(
        (status = 202, body = WorkerMessageAck),
        (status = 503, description = "`service_unavailable`: the bus failed", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn worker_message(
    State(state): State<AppState>,
    WorkerCaller(worker): WorkerCaller,
    ApiJson(message): ApiJson<WorkerMessage>,
) -> Result<(StatusCode, Json<WorkerMessageAck>), ApiError> {
    let engine = state.engine();
    // A worker reports only on tasks of agent types its token allows.
    if let Some(attempt_id) = message.attempt_id()
        && let Some(attempt) = engine.store().attempt_by_id(attempt_id).await?
        && !worker.may_run(&attempt.agent)
    {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "worker `{}`'s service token does not allow agent type `{}`",
                worker.worker, attempt.agent
            ),
        ));
    }
    engine.bus().publish_result(&message).await.map_err(|err| {
        ApiError::new(ErrorCode::ServiceUnavailable, format!("the bus failed: {err}"))
    })?;
    let cancel = match &message {
        WorkerMessage::Heartbeat { attempt_id, token, .. } => {
            match engine.store().attempt_by_id(*attempt_id).await? {
                // Still active under this token (its `Started` may not be committed yet).
                Some(attempt) => attempt.fencing_token != *token || attempt.status.is_terminal(),
                None => true,
            }
        }
        _ => false,
    };
    Ok((StatusCode::ACCEPTED, Json(WorkerMessageAck { cancel })))
}

/// The values of the project's secrets, for the worker holding the attempt `{id}`: it must
/// be dispatched or running under exactly `fencing_token`, in `project_id`, of an agent
/// type the worker's service token allows. Every read is audited (`secret.read`, by
/// `worker NAME`); the answer is never cached.
#[utoipa::path(
    post, path = "/api/v1/tasks/{id}/secrets", tag = "workers",
    params(("id" = String, Path, description = "The task (attempt) id")),
    request_body = TaskSecretsRequest,
    responses(
        (status = 200, description = "The values, by name (`Cache-Control: no-store`)", body = TaskSecretsView),
        (status = 403, description = "A user's credential, or a worker token that does not allow the attempt's agent type", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such attempt in that project", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The attempt is no longer held under that fencing token (`stale_attempt`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn task_secrets(
    State(state): State<AppState>,
    WorkerCaller(worker): WorkerCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<TaskSecretsRequest>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(ErrorCode::AttemptNotFound, format!("no attempt {id}"));
    let attempt: AttemptId = id.parse().map_err(|_| not_found())?;
    let project = ProjectId::parse(request.project_id.as_str()).map_err(|_| not_found())?;
    let reader = format!("worker {}", worker.worker);
    let secrets = state
        .engine()
        .attempt_secrets(
            &SecretsRequest {
                attempt,
                project: &project,
                token: FencingToken(request.fencing_token),
                reader: &reader,
            },
            |agent| worker.may_run(agent),
        )
        .await?;
    tracing::info!(%attempt, worker = %worker.worker, count = secrets.len(), "attempt secrets read");
    let mut response = Json(TaskSecretsView { secrets }).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
