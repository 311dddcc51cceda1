//! `/api/v1/runs`: submit, list, show, cancel, and follow a run's events.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use drover_domain::{
    AppSpec, CorrelationId, ErrorCode, Event, EventSeq, ProjectId, Run, RunId, RunRequest,
    RunStatus, ServiceName, StageStatus,
};
use drover_store::{EventQuery, RunQuery, Store};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::openapi::{Idempotent, InProject};
use crate::wire::{AttemptView, CreateRun, DeploymentView, EventView, RunPage, RunView};
use crate::{AppState, Caller};

const DEFAULT_PIPELINE: &str = "sdlc";
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;
/// Events replayed per database read when catching up a stream.
const REPLAY_PAGE: u32 = 500;
/// Events buffered per SSE client; a slower client holds the replay, not memory.
const SSE_BUFFER: usize = 256;

pub(crate) fn parse_run_id(raw: &str) -> Result<RunId, ApiError> {
    raw.parse().map_err(|_| ApiError::new(ErrorCode::RunNotFound, format!("no run with id {raw}")))
}

pub(crate) async fn find_run(
    state: &AppState,
    project: &ProjectId,
    raw_id: &str,
) -> Result<Run, ApiError> {
    let id = parse_run_id(raw_id)?;
    state
        .engine()
        .store()
        .get_run(project, id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::RunNotFound, format!("no run with id {id}")))
}

/// The deployment recorded by a run's succeeded deploy stage, if any.
fn deployment_of(
    state: &AppState,
    apps_up: &HashSet<ServiceName>,
    run: RunId,
    output: Option<&serde_json::Value>,
) -> Option<DeploymentView> {
    let output = output?;
    let url = output.get("url")?.as_str()?.to_owned();
    let port =
        output.get("port").and_then(serde_json::Value::as_u64).and_then(|p| u16::try_from(p).ok());
    let pid =
        output.get("pid").and_then(serde_json::Value::as_u64).and_then(|p| u32::try_from(p).ok());
    let live = apps_up.contains(&AppSpec::name_for(run));
    let hostname = drover_env::app_hostname(run);
    let routed_url = state
        .inner
        .proxy
        .http
        .filter(|_| live)
        .map(|addr| format!("http://{hostname}:{}/", addr.port()));
    Some(DeploymentView { url, port, pid, live, hostname: Some(hostname), routed_url })
}

/// Submit a run.
#[utoipa::path(
    post, path = "/api/v1/runs", tag = "runs",
    params(InProject, Idempotent),
    request_body = CreateRun,
    responses(
        (status = 201, description = "The run was created and is durable", body = RunView,
         headers(("Location" = String, description = "URL of the new run (not on a replayed answer)"),
                 ("Idempotent-Replayed" = String, description = "`true` on the first answer to an `Idempotency-Key` given again"))),
        (status = 404, description = "`environment_not_found`: no such environment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_transition`: the environment is being deleted; `idempotency_key_in_use`: the first request with this key is still being handled", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: invalid request or budget; `unknown_pipeline`; `idempotency_key_reused`: the key came with another body, or is not 1-255 visible ASCII characters", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shutting_down`: the server is draining and takes no new runs; `no_free_ports`: no port block is free for the run's environment (with `Retry-After`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateRun>,
) -> Result<(StatusCode, HeaderMap, Json<RunView>), ApiError> {
    let request = RunRequest::parse(body.request)
        .map_err(|err| ApiError::validation(vec![FieldError::from(err)]))?;
    let budget = body
        .budget
        .map(|b| drover_domain::Budget::new(b.tokens, b.cost_usd))
        .transpose()
        .map_err(|err| ApiError::validation(vec![FieldError::from(err)]))?;
    if state.inner.draining.is_cancelled() {
        return Err(ApiError::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down and takes no new runs",
        ));
    }
    let pipeline = body.pipeline.as_deref().unwrap_or(DEFAULT_PIPELINE);
    let run_id = RunId::new();
    let mut own_environment = None;
    let placement = match &body.environment {
        // A run gets an environment of its own: its ports and per-environment services.
        // Without one (no free port block, say) it is refused with the reason, never run
        // somewhere else.
        None if state.envs().is_active() => {
            let env = state.envs().create_for_run(&caller.project, run_id).await.inspect_err(
                |err| tracing::warn!(run_id = %run_id, error = %err, "no environment for the run; refused"),
            )?;
            own_environment = Some(env.id);
            Some(drover_engine::RunPlacement {
                environment_id: env.id,
                variables: state.envs().variables(&env),
                workspace: env.workspace,
            })
        }
        None => None,
        Some(id_or_name) => {
            let env = state.envs().find(&caller.project, id_or_name).await?;
            if env.desired == drover_domain::DesiredState::Deleted {
                return Err(ApiError::new(
                    ErrorCode::InvalidTransition,
                    format!("environment {} is being deleted", env.name),
                ));
            }
            Some(drover_engine::RunPlacement {
                environment_id: env.id,
                variables: state.envs().variables(&env),
                workspace: env.workspace,
            })
        }
    };
    let submitted = state
        .engine()
        .submit_as(
            run_id,
            &caller.project,
            request,
            pipeline,
            CorrelationId::new(),
            drover_engine::RunOptions {
                placement,
                budget,
                submitted_by: Some(caller.user.clone()),
            },
        )
        .await;
    let run = match submitted {
        Ok(run) => run,
        Err(err) => {
            if let Some(env) = own_environment {
                let _ = state.envs().release_run_environment(env).await;
            }
            return Err(err.into());
        }
    };
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/runs/{}", run.id)) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(RunView::new(&run, None))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListRunsQuery {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
    /// Only runs with this status.
    #[param(schema_with = crate::wire::rules::run_status)]
    status: Option<String>,
}

/// List runs, newest first.
#[utoipa::path(
    get, path = "/api/v1/runs", tag = "runs",
    params(ListRunsQuery, InProject),
    responses(
        (status = 200, body = RunPage),
        (status = 400, description = "`invalid_query`: a limit out of range, a cursor that is not one, an unknown status", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListRunsQuery>,
) -> Result<Json<RunPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let before = query
        .cursor
        .as_deref()
        .map(|cursor| {
            cursor
                .parse::<RunId>()
                .map_err(|_| ApiError::new(ErrorCode::InvalidQuery, "cursor is not a valid cursor"))
        })
        .transpose()?;
    let status = query
        .status
        .as_deref()
        .map(|s| {
            s.parse::<RunStatus>()
                .map_err(|err| ApiError::new(ErrorCode::InvalidQuery, err.message))
        })
        .transpose()?;
    let store = state.engine().store();
    // One extra row tells whether another page exists.
    let mut runs =
        store.list_runs(&caller.project, &RunQuery { status, before, limit: limit + 1 }).await?;
    let next_cursor = (runs.len() > limit as usize).then(|| {
        runs.truncate(limit as usize);
        runs.last().map(|run| run.id.to_string())
    });
    // The page's deployments in one query, whatever the page size.
    let ids: Vec<RunId> = runs.iter().map(|run| run.id).collect();
    let mut deploy_outputs: HashMap<RunId, serde_json::Value> = HashMap::new();
    for (run, stage, output) in store.succeeded_outputs(&ids).await? {
        if stage.as_str() == "deploy" {
            deploy_outputs.insert(run, output);
        }
    }
    let apps_up = state.envs().apps_up().await;
    let items = runs
        .iter()
        .map(|run| {
            RunView::new(run, deployment_of(&state, &apps_up, run.id, deploy_outputs.get(&run.id)))
        })
        .collect();
    Ok(Json(RunPage { items, next_cursor: next_cursor.flatten() }))
}

/// Show a run with all its stage attempts.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "Run id"), InProject),
    responses(
        (status = 200, body = RunView),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunView>, ApiError> {
    let run = find_run(&state, &caller.project, &id).await?;
    let attempts = state.engine().store().list_attempts(&caller.project, run.id).await?;
    let deploy_output = attempts
        .iter()
        .rev()
        .find(|a| a.stage.as_str() == "deploy" && a.status == StageStatus::Succeeded)
        .and_then(|a| a.output.as_ref());
    let apps_up = state.envs().apps_up().await;
    let mut view = RunView::new(&run, deployment_of(&state, &apps_up, run.id, deploy_output));
    // An attempt not started while no live worker serves its agent type is waiting for
    // one, not stuck: say so.
    let waiting =
        attempts.iter().any(|a| matches!(a.status, StageStatus::Pending | StageStatus::Dispatched));
    let live_agents: std::collections::HashSet<String> = if waiting {
        let workers = state.engine().store().list_workers().await?;
        workers
            .iter()
            .filter(|w| w.status == drover_domain::WorkerStatus::Live)
            .flat_map(|w| w.agents.iter().map(ToString::to_string))
            .collect()
    } else {
        Default::default()
    };
    let spent = attempts
        .iter()
        .filter_map(|a| a.output.as_ref())
        .map(drover_domain::Usage::reported_in)
        .fold(drover_domain::Usage::default(), drover_domain::Usage::plus);
    view.usage = Some(crate::wire::UsageView { tokens: spent.tokens, cost_usd: spent.cost_usd });
    view.attempts = Some(
        attempts
            .iter()
            .map(|attempt| {
                let mut view = AttemptView::from(attempt);
                view.waiting_for_worker =
                    matches!(attempt.status, StageStatus::Pending | StageStatus::Dispatched)
                        && !live_agents.contains(attempt.agent.as_str());
                view
            })
            .collect(),
    );
    Ok(Json(view))
}

/// Cancel a run that has not finished; its running agent is stopped.
#[utoipa::path(
    post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "Run id"), InProject),
    responses(
        (status = 200, body = RunView),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run already finished", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunView>, ApiError> {
    let id = parse_run_id(&id)?;
    let run = state.engine().cancel(&caller.project, id, "cancelled by request").await?;
    Ok(Json(RunView::new(&run, None)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    /// Replay events after this sequence number (the `Last-Event-ID` header wins).
    after: Option<i64>,
}

/// Follow a run's events (SSE): replays past events, then streams new ones until the run
/// ends. Each event's `id` is its sequence number; reconnect with `Last-Event-ID`.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}/events", tag = "runs",
    params(("id" = String, Path, description = "Run id"), EventsQuery,
           ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event (wins over `after`)"),
           InProject),
    responses(
        (status = 200, description = "Server-sent events, one per event of the run (`event`: its kind, `id`: its sequence number, `data`: the `EventView` as JSON), until the run's last", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_query`: `Last-Event-ID` is not a sequence number", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let run = find_run(&state, &caller.project, &id).await?;
    let after = match headers.get("last-event-id") {
        Some(value) => Some(
            value.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidQuery,
                    "Last-Event-ID must be an event sequence number",
                )
            })?,
        ),
        None => query.after,
    };
    let store = state.engine().store().clone();
    // Subscribe before replaying, so nothing committed in between is missed.
    let live = state.live_events();
    let (sender, receiver) = mpsc::channel(SSE_BUFFER);
    tokio::spawn(feed_run_events(store, caller.project, run.id, after.map(EventSeq), live, sender));
    Ok(Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(state.inner.sse_keep_alive)))
}

type SseSender = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Replays then follows. Ends when the run ends, the client leaves, or the server stops.
async fn feed_run_events(
    store: std::sync::Arc<dyn Store>,
    project: ProjectId,
    run: RunId,
    after: Option<EventSeq>,
    mut live: broadcast::Receiver<Event>,
    sender: SseSender,
) {
    let mut last = after.unwrap_or(EventSeq(0));
    match replay(store.as_ref(), &project, run, &mut last, &sender).await {
        Ok(Flow::Continue) => {}
        Ok(Flow::Stop) | Err(()) => return,
    }
    // A run that already ended (the client resumed after its last event) has nothing more
    // to say; one more replay covers an end committed since the first.
    if let Ok(Some(current)) = store.get_run(&project, run).await
        && current.status.is_terminal()
    {
        let _ = replay(store.as_ref(), &project, run, &mut last, &sender).await;
        return;
    }
    loop {
        let received = tokio::select! {
            () = sender.closed() => return,
            received = live.recv() => received,
        };
        match received {
            Ok(event)
                if event.run_id == Some(run) && event.project_id == project && event.seq > last =>
            {
                match send(&sender, &event, &mut last).await {
                    Flow::Continue => {}
                    Flow::Stop => return,
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                tracing::debug!(skipped, "event stream fell behind; catching up from the store");
                match replay(store.as_ref(), &project, run, &mut last, &sender).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Stop) | Err(()) => return,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

async fn replay(
    store: &dyn Store,
    project: &ProjectId,
    run: RunId,
    last: &mut EventSeq,
    sender: &SseSender,
) -> Result<Flow, ()> {
    loop {
        let query = EventQuery {
            run_id: Some(run),
            environment_id: None,
            after: Some(*last),
            limit: REPLAY_PAGE,
        };
        let page = store.list_events(project, &query).await.map_err(|err| {
            tracing::warn!(error = %err, "cannot replay events");
        })?;
        for event in &page {
            if let Flow::Stop = send(sender, event, last).await {
                return Ok(Flow::Stop);
            }
        }
        if page.len() < REPLAY_PAGE as usize {
            return Ok(Flow::Continue);
        }
    }
}

async fn send(sender: &SseSender, event: &Event, last: &mut EventSeq) -> Flow {
    *last = event.seq;
    let data = serde_json::to_string(&EventView::from(event)).unwrap_or_default();
    let sse = SseEvent::default().id(event.seq.to_string()).event(event.kind.as_str()).data(data);
    if sender.send(Ok(sse)).await.is_err() || event.kind.is_run_terminal() {
        return Flow::Stop;
    }
    Flow::Continue
}
