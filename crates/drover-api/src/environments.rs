//! `/api/v1/environments` and `/api/v1/services`: environment lifecycle (create, start,
//! stop, delete — all idempotent), their services, and service logs (followed over SSE).

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use drover_domain::{EnvName, Environment, ErrorCode, Sharing};
use drover_env::manager::{CreateEnvironment, ServiceView as ManagedService};
use drover_store::EnvironmentQuery;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::openapi::{Idempotent, InProject};
use crate::wire::time;
use crate::{AppState, Caller};

/// The actor of requests in local mode (there are no user accounts yet).
const LOCAL_ACTOR: &str = "local-admin";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironmentBody {
    /// Unique among live environments; generated when omitted. A slug: 1-63 lowercase
    /// letters, digits, `-` or `_`, starting with a letter or digit; not `deployments`.
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub name: Option<String>,
    /// Make the workspace a git worktree of this repository (a path on the server).
    #[serde(default)]
    pub repo: Option<String>,
    /// The branch or commit the worktree starts from (default: the repository's HEAD).
    #[serde(default)]
    pub base: Option<String>,
    /// Why, for the audit log.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortsView {
    pub base: u16,
    pub size: u16,
}

/// An environment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentView {
    pub id: String,
    pub name: String,
    /// `creating|running|stopping|stopped|error|deleting|deleted`
    pub status: String,
    /// `running|stopped|deleted`: what the reconciler works towards.
    pub desired: String,
    pub workspace: String,
    pub ports: PortsView,
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_active_at: String,
    /// With `GET /environments/{id}`: its services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceView>>,
    /// With `GET /environments/{id}`: what every process in it gets in its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variables: Option<BTreeMap<String, String>>,
}

impl From<&Environment> for EnvironmentView {
    fn from(env: &Environment) -> Self {
        Self {
            id: env.id.to_string(),
            name: env.name.to_string(),
            status: env.status.to_string(),
            desired: env.desired.to_string(),
            workspace: env.workspace.clone(),
            ports: PortsView { base: env.ports.base, size: env.ports.size },
            repo: env.repo.clone(),
            branch: env.branch.clone(),
            error: env.error.clone(),
            created_at: time(env.created_at),
            updated_at: time(env.updated_at),
            last_active_at: time(env.last_active_at),
            services: None,
            variables: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentPage {
    pub items: Vec<EnvironmentView>,
    pub next_cursor: Option<String>,
}

/// A service instance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceView {
    pub name: String,
    /// `None` for a shared instance.
    pub environment_id: Option<String>,
    /// `per_env` or `shared`.
    pub sharing: String,
    /// `starting|ready|unhealthy|crashed|backoff|stopped`
    pub status: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub reason: Option<String>,
    /// It runs outside drover, which only uses it.
    pub external: bool,
    pub ports: BTreeMap<String, u16>,
    pub hostname: String,
    pub rss_bytes: u64,
    pub log_path: String,
}

impl From<&ManagedService> for ServiceView {
    fn from(service: &ManagedService) -> Self {
        Self {
            name: service.name.to_string(),
            environment_id: service.environment.map(|id| id.to_string()),
            sharing: match service.sharing {
                Sharing::PerEnv => "per_env".to_owned(),
                Sharing::Shared => "shared".to_owned(),
            },
            status: service.state.status.to_string(),
            pid: service.state.pid,
            restarts: service.state.restarts,
            reason: service.state.reason.clone(),
            external: service.state.external,
            ports: service.ports.clone(),
            hostname: service.hostname.clone(),
            rss_bytes: service.rss_bytes,
            log_path: service.log_path.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    pub items: Vec<ServiceView>,
}

/// Every service instance, with what sharing saves.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServicesOverview {
    pub items: Vec<ServiceView>,
    /// Resident memory of every instance, in bytes.
    pub total_rss_bytes: u64,
    /// What per-environment copies of the shared services would add (each shared
    /// instance's memory times the number of other running environments).
    pub saved_by_sharing_bytes: u64,
}

async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Environment, ApiError> {
    Ok(state.envs().find(&caller.project, id).await?)
}

async fn detailed(state: &AppState, env: &Environment) -> Result<EnvironmentView, ApiError> {
    let mut view = EnvironmentView::from(env);
    let services = state.envs().services(Some(env.id)).await?;
    view.services = Some(services.iter().map(ServiceView::from).collect());
    view.variables = Some(state.envs().variables(env));
    Ok(view)
}

/// Create an environment: a workspace (directory or git worktree), a port block, and its
/// services, started by the reconciler.
#[utoipa::path(
    post, path = "/api/v1/environments", tag = "environments",
    params(InProject, Idempotent),
    request_body = CreateEnvironmentBody,
    responses(
        (status = 201, body = EnvironmentView),
        (status = 409, description = "`environment_name_taken`; `idempotency_key_in_use`: the first request with this key is still being handled", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: an invalid or reserved name; `workspace_failed`: the workspace could not be made; `idempotency_key_reused`: the key came with another body, or is not 1-255 visible ASCII characters", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`environment_quota_exceeded`: the project has as many live environments as allowed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`no_free_ports`: no block of ports is free", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateEnvironmentBody>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    let name = body
        .name
        .map(|name| {
            EnvName::parse(name)
                .map_err(|err| ApiError::validation(vec![FieldError::from(err.for_field("name"))]))
        })
        .transpose()?;
    let env = state
        .envs()
        .create(
            &caller.project,
            CreateEnvironment {
                name,
                repo: body.repo.map(Into::into),
                base: body.base,
                workspace: None,
                actor: LOCAL_ACTOR.to_owned(),
                reason: body.reason,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(EnvironmentView::from(&env))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
    /// Include deleted environments.
    #[serde(default)]
    all: bool,
}

/// List environments, newest first.
#[utoipa::path(get, path = "/api/v1/environments", tag = "environments", params(ListQuery, InProject), responses((status = 200, body = EnvironmentPage)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<EnvironmentPage>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "limit must be between 1 and 200"));
    }
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse()
                .map_err(|_| ApiError::new(ErrorCode::InvalidQuery, "cursor is not a valid cursor"))
        })
        .transpose()?;
    let mut envs = state
        .envs()
        .list(
            &caller.project,
            &EnvironmentQuery { before, limit: limit + 1, include_deleted: query.all },
        )
        .await?;
    let next_cursor = (envs.len() > limit as usize).then(|| {
        envs.truncate(limit as usize);
        envs.last().map(|e| e.id.to_string())
    });
    Ok(Json(EnvironmentPage {
        items: envs.iter().map(EnvironmentView::from).collect(),
        next_cursor: next_cursor.flatten(),
    }))
}

/// Show an environment (by id or name) with its services and variables.
#[utoipa::path(
    get, path = "/api/v1/environments/{id}", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), InProject),
    responses((status = 200, body = EnvironmentView), (status = 404, body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    let env = find(&state, &caller, &id).await?;
    Ok(Json(detailed(&state, &env).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteQuery {
    /// Delete even if the worktree holds work not merged anywhere.
    #[serde(default)]
    force: bool,
    /// Why, for the audit log.
    reason: Option<String>,
}

/// Delete an environment: services stopped, workspace removed, ports released.
#[utoipa::path(
    delete, path = "/api/v1/environments/{id}", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), DeleteQuery, InProject),
    responses(
        (status = 202, body = EnvironmentView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Unmerged work (pass force)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    let env = find(&state, &caller, &id).await?;
    let env = state
        .envs()
        .delete(&caller.project, env.id, query.force, LOCAL_ACTOR, query.reason.as_deref())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

/// Start an environment (idempotent).
#[utoipa::path(
    post, path = "/api/v1/environments/{id}/start", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), InProject),
    responses((status = 202, body = EnvironmentView), (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    let env = find(&state, &caller, &id).await?;
    let env = state.envs().start(&caller.project, env.id, LOCAL_ACTOR, None).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

/// Stop an environment (idempotent): its services stop, its workspace and ports stay.
#[utoipa::path(
    post, path = "/api/v1/environments/{id}/stop", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), InProject),
    responses((status = 202, body = EnvironmentView), (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<EnvironmentView>), ApiError> {
    let env = find(&state, &caller, &id).await?;
    let env = state.envs().stop(&caller.project, env.id, LOCAL_ACTOR, None).await?;
    Ok((StatusCode::ACCEPTED, Json(EnvironmentView::from(&env))))
}

/// The services of an environment.
#[utoipa::path(
    get, path = "/api/v1/environments/{id}/services", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), InProject),
    responses((status = 200, body = ServiceList), (status = 404, body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn services(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ServiceList>, ApiError> {
    let env = find(&state, &caller, &id).await?;
    let services = state.envs().services(Some(env.id)).await?;
    Ok(Json(ServiceList { items: services.iter().map(ServiceView::from).collect() }))
}

/// Restart one service now.
#[utoipa::path(
    post, path = "/api/v1/environments/{id}/services/{name}/restart", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), ("name" = String, Path, description = "Service"), InProject),
    responses((status = 202), (status = 404, body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn restart_service(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let env = find(&state, &caller, &id).await?;
    state.envs().restart_service(&env, &name).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    /// Follow new lines as server-sent events instead of returning the file.
    #[serde(default)]
    follow: bool,
}

/// How long a followed log waits without news before looking at the file anyway (the
/// service may have been restarted, with a new feed).
const SERVICE_LOG_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// A service's log followed: what the file holds (and the rest of its last rotation), then
/// each line as it is written. The file is the one source, read from where the follower
/// stopped, so nothing is sent twice or skipped across the switch from disk to live; the
/// instance's line feed only says when to read again. Works whether the service runs or
/// not (`tail -f`), until the client goes away or the server drains.
fn follow_service_log(
    draining: tokio_util::sync::CancellationToken,
    path: std::path::PathBuf,
    mut live: Option<tokio::sync::broadcast::Receiver<String>>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let (events, receiver) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let mut tail = crate::logs::FileTail::new(path);
        let follow = async {
            loop {
                if tail.send_new(&events).await.is_none() {
                    return;
                }
                let news = async {
                    match &mut live {
                        Some(feed) => match feed.recv().await {
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                // Read once for everything that is already there.
                                while feed.try_recv().is_ok() {}
                                true
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => false,
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    alive = news => if !alive { live = None },
                    () = tokio::time::sleep(SERVICE_LOG_POLL) => {}
                    () = events.closed() => return,
                }
            }
        };
        tokio::select! {
            () = draining.cancelled() => {}
            () = follow => {}
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(receiver).map(Ok))
        .keep_alive(KeepAlive::default())
}

/// A service's log: the file as text, or followed (`follow=true`, SSE: what is on disk,
/// then new lines live).
#[utoipa::path(
    get, path = "/api/v1/environments/{id}/services/{name}/logs", tag = "environments",
    params(("id" = String, Path, description = "Environment id or name"), ("name" = String, Path, description = "Service"), LogsQuery, InProject),
    responses(
        (status = 200, description = "The log file as text; with `follow`, server-sent events, a `line` event per line: what the file holds, then each line as it is written, until the client leaves",
         content((String = "text/plain"), (String = "text/event-stream"))),
        (status = 404, description = "`environment_not_found`, `service_not_found`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn service_logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let env = find(&state, &caller, &id).await?;
    let (path, live) = state.envs().service_log(Some(env.id), &name).await?;
    if query.follow {
        return Ok(follow_service_log(state.inner.draining.clone(), path, live).into_response());
    }
    let body = match tokio::fs::File::open(&path).await {
        Ok(file) => Body::from_stream(ReaderStream::new(file)),
        Err(_) => Body::from(""),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

/// The shared service instances.
#[utoipa::path(get, path = "/api/v1/services/shared", tag = "environments", params(InProject), responses((status = 200, body = ServiceList)))]
pub(crate) async fn shared(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<ServiceList>, ApiError> {
    let services = state.envs().services(None).await?;
    Ok(Json(ServiceList { items: services.iter().map(ServiceView::from).collect() }))
}

/// Every service instance of the project's environments and the shared ones, with their
/// memory and what sharing saves.
#[utoipa::path(get, path = "/api/v1/services", tag = "environments", params(InProject), responses((status = 200, body = ServicesOverview)))]
pub(crate) async fn overview(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ServicesOverview>, ApiError> {
    let envs = state
        .envs()
        .list(&caller.project, &EnvironmentQuery { limit: 10_000, ..Default::default() })
        .await?;
    let mut items = Vec::new();
    let mut running_envs = 0_u64;
    for env in &envs {
        let services = state.envs().services(Some(env.id)).await?;
        if env.status == drover_domain::EnvStatus::Running {
            running_envs += 1;
        }
        items.extend(services.iter().map(ServiceView::from));
    }
    let shared = state.envs().services(None).await?;
    let shared_rss: u64 = shared.iter().map(|s| s.rss_bytes).sum();
    items.extend(shared.iter().map(ServiceView::from));
    let total_rss_bytes = items.iter().map(|s| s.rss_bytes).sum();
    Ok(Json(ServicesOverview {
        items,
        total_rss_bytes,
        saved_by_sharing_bytes: shared_rss * running_envs.saturating_sub(1),
    }))
}
