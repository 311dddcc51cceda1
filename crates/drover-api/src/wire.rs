//! JSON wire types of `/api/v1`. They are the contract with clients (the `drover` CLI
//! among them), kept apart from domain types so the two can evolve separately.

use std::collections::BTreeMap;

use drover_domain::{Event, Run, StageAttempt, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /api/v1/runs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// What to build, in the user's words, e.g. "Hello World API".
    pub request: String,
    /// The pipeline to run; `sdlc` when omitted.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Run in this environment (id or name): its workspace, its services. Without it the
    /// run gets a workspace of its own.
    #[serde(default)]
    pub environment: Option<String>,
    /// What its stages may spend together; past it the run stops with the reason.
    #[serde(default)]
    pub budget: Option<BudgetBody>,
}

/// A run's budget: `tokens`, `cost_usd`, or both.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

/// What a run's stages spent (from the `usage` their agents reported).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    pub tokens: u64,
    pub cost_usd: f64,
}

/// A run, with its stage attempts when fetched alone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    pub id: String,
    pub project_id: String,
    pub pipeline: String,
    pub request: String,
    /// `queued|running|waiting_approval|succeeded|failed|cancelled`
    pub status: String,
    pub error: Option<String>,
    pub correlation_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The deployed app, once the deploy stage succeeded.
    pub deployment: Option<DeploymentView>,
    /// The environment it runs in, if any.
    #[serde(default)]
    pub environment_id: Option<String>,
    /// Every attempt of every stage, in pipeline order (only on `GET /runs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
    /// Its budget, if it has one.
    #[serde(default)]
    pub budget: Option<BudgetBody>,
    /// What its stages spent so far (only on `GET /runs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
    /// Who submitted it.
    #[serde(default)]
    pub submitted_by: Option<String>,
}

/// Where a run's app was deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentView {
    pub url: String,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// Whether this server is still running the app.
    pub live: bool,
    /// The app's stable hostname behind the routing proxy.
    pub hostname: Option<String>,
    /// The app's URL through the routing proxy, while it is live and the proxy runs.
    pub routed_url: Option<String>,
}

/// One attempt at one stage.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub id: String,
    pub stage: String,
    pub stage_index: u32,
    pub agent: String,
    pub attempt: u32,
    /// `pending|dispatched|running|succeeded|failed|timed_out|cancelled|dead_lettered`
    pub status: String,
    pub fencing_token: i64,
    pub worker_id: Option<String>,
    pub error: Option<String>,
    pub output: Option<serde_json::Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub lease_expires_at: Option<String>,
    pub deadline_at: Option<String>,
    /// For an attempt not yet started: no live worker serves its agent type, so it waits
    /// for one to register.
    #[serde(default)]
    pub waiting_for_worker: bool,
}

/// A page of runs, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    pub items: Vec<RunView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One event of the event log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub seq: i64,
    /// `run.<status>` or `stage.<status>`.
    pub kind: String,
    pub project_id: String,
    pub run_id: Option<String>,
    pub attempt_id: Option<String>,
    pub payload: serde_json::Value,
    pub correlation_id: Option<String>,
    pub created_at: String,
}

/// A pipeline and its stages.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PipelineView {
    pub name: String,
    pub description: String,
    pub stages: Vec<StageView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageView {
    pub name: String,
    pub agent: String,
    pub max_attempts: u32,
    pub timeout_secs: u64,
    /// The stages that must be done before it starts.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Whether it waits for approval.
    #[serde(default)]
    pub approval: bool,
    /// Its `when` condition, if any.
    #[serde(default)]
    pub when: Option<String>,
    /// Programs it may run (empty: no restriction beyond its agent).
    #[serde(default)]
    pub allowed_commands: Vec<String>,
    /// Workspace globs its agent must not touch.
    #[serde(default)]
    pub protected_paths: Vec<String>,
    /// Files it declares as outputs.
    #[serde(default)]
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PipelineList {
    pub items: Vec<PipelineView>,
}

/// An agent a stage can name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub name: String,
    /// `builtin`, `template` or `command`.
    pub kind: String,
    pub description: String,
    /// For a command agent: the program and its argument templates.
    pub command: Option<Vec<String>>,
    /// For a command agent: the names of its extra variables (never their values).
    pub env: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<AgentView>,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthView {
    pub status: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, String>,
}

pub(crate) fn time(at: Timestamp) -> String {
    humantime::format_rfc3339_millis(at.to_system_time()).to_string()
}

impl RunView {
    pub(crate) fn new(run: &Run, deployment: Option<DeploymentView>) -> Self {
        Self {
            id: run.id.to_string(),
            project_id: run.project_id.to_string(),
            pipeline: run.pipeline.to_string(),
            request: run.request.to_string(),
            status: run.status.to_string(),
            error: run.error.clone(),
            correlation_id: run.correlation_id.to_string(),
            created_at: time(run.created_at),
            updated_at: time(run.updated_at),
            started_at: run.started_at.map(time),
            finished_at: run.finished_at.map(time),
            deployment,
            environment_id: run.environment_id.map(|id| id.to_string()),
            attempts: None,
            budget: run.budget.map(|b| BudgetBody { tokens: b.tokens, cost_usd: b.cost_usd }),
            usage: None,
            submitted_by: run.submitted_by.clone(),
        }
    }
}

impl From<&StageAttempt> for AttemptView {
    fn from(attempt: &StageAttempt) -> Self {
        Self {
            id: attempt.id.to_string(),
            stage: attempt.stage.to_string(),
            stage_index: attempt.stage_index,
            agent: attempt.agent.to_string(),
            attempt: attempt.attempt,
            status: attempt.status.to_string(),
            fencing_token: attempt.fencing_token.0,
            worker_id: attempt.worker_id.as_ref().map(ToString::to_string),
            error: attempt.error.clone(),
            output: attempt.output.clone(),
            created_at: time(attempt.created_at),
            started_at: attempt.started_at.map(time),
            finished_at: attempt.finished_at.map(time),
            lease_expires_at: attempt.lease_expires_at.map(time),
            deadline_at: attempt.deadline_at.map(time),
            waiting_for_worker: false,
        }
    }
}

impl From<&Event> for EventView {
    fn from(event: &Event) -> Self {
        Self {
            seq: event.seq.0,
            kind: event.kind.to_string(),
            project_id: event.project_id.to_string(),
            run_id: event.run_id.map(|id| id.to_string()),
            attempt_id: event.attempt_id.map(|id| id.to_string()),
            payload: event.payload.clone(),
            correlation_id: event.correlation_id.map(|id| id.to_string()),
            created_at: time(event.created_at),
        }
    }
}

/// A registered worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub agents: Vec<String>,
    pub version: String,
    pub hostname: String,
    pub concurrency: u32,
    /// `embedded` or `external`.
    pub kind: String,
    /// `live|lost|gone`
    pub status: String,
    pub registered_at: String,
    pub last_seen_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    pub items: Vec<WorkerView>,
}

impl From<&drover_domain::Worker> for WorkerView {
    fn from(worker: &drover_domain::Worker) -> Self {
        Self {
            id: worker.id.to_string(),
            agents: worker.agents.iter().map(ToString::to_string).collect(),
            version: worker.version.clone(),
            hostname: worker.hostname.clone(),
            concurrency: worker.concurrency,
            kind: worker.kind.clone(),
            status: worker.status.to_string(),
            registered_at: time(worker.registered_at),
            last_seen_at: time(worker.last_seen_at),
        }
    }
}

/// A stage attempt that used every allowed try and waits for a decision.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// The dead-lettered attempt's id; redrive or discard by it.
    pub id: String,
    pub run_id: String,
    pub stage: String,
    pub agent: String,
    pub attempt: u32,
    pub error: Option<String>,
    pub dead_lettered_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterView>,
    pub next_cursor: Option<String>,
}

impl From<&StageAttempt> for DeadLetterView {
    fn from(attempt: &StageAttempt) -> Self {
        Self {
            id: attempt.id.to_string(),
            run_id: attempt.run_id.to_string(),
            stage: attempt.stage.to_string(),
            agent: attempt.agent.to_string(),
            attempt: attempt.attempt,
            error: attempt.error.clone(),
            dead_lettered_at: attempt.finished_at.map(time),
        }
    }
}

/// What an external worker needs to know to join: which bus to use, and how often to
/// heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerBootstrap {
    /// `embedded` (lease tasks over this API), `redis` or `nats`.
    pub bus: String,
    /// The broker to connect to, when the server advertises it.
    pub bus_url: Option<String>,
    pub namespace: String,
    pub heartbeat_interval_ms: u64,
    pub claim_idle_ms: u64,
    pub block_time_ms: u64,
    pub batch_size: usize,
}

/// `POST /api/v1/tasks/lease`: wait up to `wait_ms` for a task of one of `agents`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub agents: Vec<String>,
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// `POST /api/v1/tasks/{task_id}/secrets`: what the worker's envelope says of the attempt
/// it holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSecretsRequest {
    /// The envelope's `project_id`.
    pub project_id: String,
    /// The envelope's `fencing_token`: the attempt must still be held under it.
    pub fencing_token: i64,
}

/// The values of the project's secrets, for the worker holding the attempt. Never cached
/// (`Cache-Control: no-store`); `Debug` shows names only.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskSecretsView {
    /// Values by name (environment variable names).
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub secrets: drover_domain::SecretValues,
}

/// The answer to a worker message sent over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerMessageAck {
    /// Stop the attempt now: it is no longer this worker's (cancelled, reclaimed).
    pub cancel: bool,
}

/// Why the stage is approved or rejected (required to reject).
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalBody {
    pub reason: Option<String>,
}

/// One row of a usage breakdown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    /// A stage name, a run id or a submitter.
    pub key: String,
    pub tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageReportView {
    pub hours: u64,
    pub total: UsageView,
    pub by_stage: Vec<UsageRow>,
    pub by_run: Vec<UsageRow>,
    pub by_user: Vec<UsageRow>,
}

/// `POST /auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub user: String,
    pub password: String,
}

/// `POST /auth/refresh`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    pub refresh_token: String,
}

/// A login session: a short-lived access token (a JWT) and a single-use refresh token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds the access token lives.
    pub expires_in: u64,
    pub refresh_token: String,
}

/// A user's role in a project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembershipView {
    pub project: String,
    pub user: String,
    /// `viewer|member|admin`
    pub role: String,
}

/// Who a credential belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MeView {
    pub user: String,
    /// The global role: `viewer|member|admin`.
    pub role: String,
    /// The credential's scope: `read|write`.
    pub scope: String,
    /// The one project the credential reaches, if it is bound to one.
    pub project_limit: Option<String>,
    pub memberships: Vec<MembershipView>,
    /// The server needs no credential (loopback, no users yet).
    pub local_mode: bool,
}

/// `POST /tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    /// What it is for (shown in listings).
    pub name: String,
    /// `read` or `write` (default).
    pub scope: Option<String>,
    /// Bind it to one project.
    pub project: Option<String>,
    /// Days until it expires (1-365, default 90).
    pub expires_in_days: Option<u32>,
    /// Whose token (administrators only; default: the caller).
    pub user: Option<String>,
}

/// An API token, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub user: String,
    pub name: String,
    pub scope: String,
    pub project: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
}

/// A new API token: the secret appears here once and is never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedTokenView {
    pub token: String,
    #[serde(flatten)]
    pub details: TokenView,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub disabled: bool,
}

/// `POST /users`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    pub name: String,
    /// `viewer|member|admin` (default `member`).
    pub role: Option<String>,
    /// For `POST /auth/login` (at least 12 characters); without one the user works with
    /// API tokens only.
    pub password: Option<String>,
}

/// `PATCH /users/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRoleBody {
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    pub created_at: String,
    /// The caller's role in it.
    pub role: String,
}

/// `POST /projects`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectBody {
    pub id: String,
    pub name: Option<String>,
}

/// `POST /projects/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    pub user: String,
    pub role: String,
}

/// `POST /workers/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerTokenBody {
    /// The worker's name.
    pub worker: String,
    /// Agent types it may take tasks for (empty: any).
    #[serde(default)]
    pub agents: Vec<String>,
    /// Hours until it expires (default 720).
    pub expires_in_hours: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerTokenView {
    pub token: String,
    pub worker: String,
    pub agents: Vec<String>,
    pub expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub id: i64,
    pub project: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntryView>,
    pub next_cursor: Option<i64>,
}
