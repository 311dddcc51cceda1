//! The store: drover's source of truth.
//!
//! Every state change of a run or a stage attempt goes through [`Store`], which checks it
//! against the domain's state machines and appends the matching [`Event`] in the same
//! transaction. Queries that serve users take the caller's [`ProjectId`]; the few that
//! serve the engine's internal loops (dispatch, lease reaping) span all projects and say so
//! in their names' documentation. After each commit the new events are published to
//! in-process subscribers ([`Store::subscribe`]), so live streams never race the database.

mod chat;
mod environments;
mod identities;
mod open;
mod postgres;
mod secrets;
mod sql;
mod sqlite;
mod webhooks;

use async_trait::async_trait;
use drover_domain::{
    AttemptId, CorrelationId, EnvStatus, EnvironmentId, Event, EventSeq, FencingToken, Outcome,
    PipelineCatalog, PipelineSpec, ProjectId, Run, RunId, RunRequest, RunStatus, StageAttempt,
    StageName, StageStatus, Timestamp, TransitionError, Worker, WorkerId, WorkerProfile,
};
use tokio::sync::broadcast;

pub use chat::{ChatStore, NewChatMessage, NewChatSession};
pub use environments::{EnvironmentQuery, EnvironmentStore, NewEnvironment};
pub use identities::{
    ApiTokenRecord, GLOBAL_AUDIT_PROJECT, IdentityStore, KeptResponse, NewApiToken, NewAudit,
    Project,
};
pub use open::{StoreOptions, create_scratch_database, drop_scratch_database, open};
pub use postgres::PostgresStoreOptions;
pub use secrets::{
    Reseal, ResealWebhook, Resealed, SealPlaintext, SealedSecret, SealedValue, SealedWebhookSecret,
    SecretMeta, SecretRead, SecretStore,
};
pub use sql::{
    AnyBackend, AnyStore, Backend, PoolStats, PostgresBackend, PostgresStore, SqlStore,
    SqliteBackend, SqliteStore, counting_statements,
};
pub use sqlite::SqliteStoreOptions;
pub use webhooks::{
    AttemptRecorded, AttemptResult, DeliveryQuery, DueDelivery, FailurePolicy,
    MAX_DELIVERIES_PER_WEBHOOK, MAX_WEBHOOKS_PER_PROJECT, NewDelivery, NewWebhook, Webhook,
    WebhookDelivery, WebhookStore,
};

pub type StoreResult<T> = Result<T, StoreError>;

/// What can go wrong in the store. Business-rule errors (not found, already finished,
/// illegal transition) are distinct from infrastructure failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("run {0} not found")]
    RunNotFound(RunId),
    #[error("stage attempt {0} not found")]
    AttemptNotFound(AttemptId),
    #[error("environment {0} not found")]
    EnvironmentNotFound(String),
    #[error("an environment named `{0}` already exists")]
    EnvironmentNameTaken(String),
    #[error("the project already has {limit} live environments, its quota; delete one first")]
    EnvironmentQuotaExceeded { limit: u32 },
    /// Another live environment holds the port block (a creation racing this one, maybe
    /// on another server): the caller picks the next free block.
    #[error("port block {base} is already taken by another environment")]
    PortBlockTaken { base: u16 },
    #[error("environment {id} is {status}; {action} is not possible")]
    EnvironmentBusy { id: EnvironmentId, status: EnvStatus, action: &'static str },
    #[error("stage attempt {id} is not waiting in the dead-letter queue ({state})")]
    NotDeadLettered { id: AttemptId, state: String },
    #[error("stage `{stage}` of run {run} is not waiting for approval ({state})")]
    NotWaitingApproval { run: RunId, stage: String, state: String },
    #[error("a user named `{0}` already exists")]
    UserExists(String),
    #[error("no user `{0}`")]
    UserNotFound(String),
    #[error("a project `{0}` already exists")]
    ProjectExists(String),
    #[error("no project `{0}`")]
    ProjectNotFound(String),
    #[error("`{user}` is already a member of project `{project}`")]
    AlreadyMember { project: String, user: String },
    #[error("`{user}` is not a member of project `{project}`")]
    NotAMember { project: String, user: String },
    #[error("no token `{0}`")]
    TokenNotFound(String),
    #[error("no webhook {0}")]
    WebhookNotFound(String),
    #[error("webhook {webhook} has no delivery {delivery}")]
    WebhookDeliveryNotFound { webhook: String, delivery: String },
    #[error("the project already has {limit} webhooks, its limit; delete one first")]
    WebhookQuotaExceeded { limit: u32 },
    #[error("no chat session {0}")]
    ChatSessionNotFound(String),
    #[error("webhook {0} is disabled; enable it first")]
    WebhookDisabled(String),
    #[error("run {id} already finished ({status})")]
    RunAlreadyFinished { id: RunId, status: RunStatus },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("cannot open the store at {url}: {message}")]
    Open { url: String, message: String },
    #[error(
        "the database schema is at migration {database}, newer than this drover binary \
         knows (up to {binary}); upgrade drover"
    )]
    SchemaTooNew { database: i64, binary: i64 },
    #[error("migrating the store failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A run to create, with the pipeline it follows.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// The id to give it (chosen before, e.g. to name its environment), or a new one.
    pub id: Option<RunId>,
    pub project_id: ProjectId,
    pub pipeline: PipelineSpec,
    pub request: RunRequest,
    pub correlation_id: CorrelationId,
    /// Run in this environment (its workspace), instead of a workspace of its own.
    pub environment_id: Option<EnvironmentId>,
    pub workspace: Option<String>,
    /// The environment's variables, for its agents.
    pub variables: std::collections::BTreeMap<String, String>,
    /// What its stages may spend together.
    pub budget: Option<drover_domain::Budget>,
    /// Who submitted it.
    pub submitted_by: Option<String>,
}

/// A person's answer to a gated stage.
#[derive(Debug, Clone)]
pub struct ApprovalDecision {
    pub approve: bool,
    /// Who answered.
    pub by: String,
    /// Why (shown in the run's error when rejected).
    pub reason: Option<String>,
}

/// What an approval changed.
#[derive(Debug, Clone)]
pub struct ApprovalOutcome {
    pub run: Run,
    /// The gated attempt: `pending` when approved, `failed` when rejected.
    pub attempt: StageAttempt,
    /// Attempts of the run a rejection stopped.
    pub stopped: Vec<StageAttempt>,
}

/// Reported usage, summed three ways. Rows are sorted by their key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageReport {
    pub total: drover_domain::Usage,
    pub by_stage: Vec<(String, drover_domain::Usage)>,
    pub by_run: Vec<(RunId, drover_domain::Usage)>,
    pub by_user: Vec<(String, drover_domain::Usage)>,
}

/// Which runs to list: newest first, strictly older than `before` when paginating.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub status: Option<RunStatus>,
    pub before: Option<RunId>,
    pub limit: u32,
}

/// Which events to list: oldest first, strictly after `after`.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub run_id: Option<RunId>,
    /// Only events about this environment.
    pub environment_id: Option<EnvironmentId>,
    pub after: Option<EventSeq>,
    pub limit: u32,
}

/// Which dead letters to list: newest first, strictly older than `before`.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub before: Option<AttemptId>,
    pub limit: u32,
}

/// A worker's claim on an attempt it received from the bus.
#[derive(Debug, Clone)]
pub struct StartAttempt {
    pub attempt_id: AttemptId,
    pub token: FencingToken,
    pub worker_id: WorkerId,
    pub lease_until: Timestamp,
    pub now: Timestamp,
}

#[derive(Debug, Clone)]
#[expect(clippy::large_enum_variant, reason = "returned once per call, never stored in bulk")]
pub enum StartOutcome {
    Started(StageAttempt),
    /// The attempt is no longer the worker's to run (cancelled, reclaimed, already taken).
    Rejected {
        reason: String,
    },
}

/// The end of an attempt as reported by its worker or decided by the reaper.
#[derive(Debug, Clone)]
pub struct Completion {
    pub attempt_id: AttemptId,
    pub token: FencingToken,
    pub outcome: Outcome,
    /// A uniform sample from `[0, 1)` for retry backoff jitter.
    pub jitter: f64,
    pub now: Timestamp,
}

#[derive(Debug, Clone)]
#[expect(clippy::large_enum_variant, reason = "returned once per call, never stored in bulk")]
pub enum CompletionOutcome {
    /// The result was committed: the attempt's new state, its run, the attempts created
    /// next (stages that became due, or a retry), and the run's other attempts it stopped
    /// (when it failed the run; their workers are to be told).
    Applied { attempt: StageAttempt, run: Run, next: Vec<StageAttempt>, stopped: Vec<StageAttempt> },
    /// The token is not current or the attempt is no longer running: nothing was written.
    Stale { reason: String },
}

/// One of the writes workers cause, for [`Store::apply`].
#[derive(Debug, Clone)]
pub enum WorkerCommand {
    Start(StartAttempt),
    Renew { attempt: AttemptId, token: FencingToken, lease_until: Timestamp, now: Timestamp },
    Complete(Completion),
    Release { attempt: AttemptId, token: FencingToken, now: Timestamp },
    Seen { worker: WorkerId, profile: WorkerProfile, now: Timestamp },
    Gone { worker: WorkerId, now: Timestamp },
}

/// What a [`WorkerCommand`] did, in the order the commands were given.
#[derive(Debug, Clone)]
#[expect(clippy::large_enum_variant, reason = "short-lived, one per command of a batch")]
pub enum CommandOutcome {
    Started(StartOutcome),
    /// `false`: the lease was not extended (stale token, attempt no longer running).
    Renewed(bool),
    Completed(CompletionOutcome),
    /// `false`: nothing was handed back.
    Released(bool),
    Recorded,
}

/// The result of cancelling a run: the run and the attempts that were stopped.
#[derive(Debug, Clone)]
pub struct CancelledRun {
    pub run: Run,
    pub stopped_attempts: Vec<StageAttempt>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a `queued` run and the pending first attempt of its first stage.
    async fn create_run(&self, new: NewRun, now: Timestamp) -> StoreResult<Run>;

    async fn get_run(&self, project: &ProjectId, id: RunId) -> StoreResult<Option<Run>>;

    /// The runs placed in these environments that have not ended, as (environment, run).
    async fn unfinished_runs_in(
        &self,
        environments: &[EnvironmentId],
    ) -> StoreResult<Vec<(EnvironmentId, RunId)>>;

    async fn list_runs(&self, project: &ProjectId, query: &RunQuery) -> StoreResult<Vec<Run>>;

    /// The run's attempts in pipeline order, then attempt order.
    async fn list_attempts(
        &self,
        project: &ProjectId,
        run: RunId,
    ) -> StoreResult<Vec<StageAttempt>>;

    /// Cancels a run that has not finished, and every attempt of it still active.
    async fn cancel_run(
        &self,
        project: &ProjectId,
        run: RunId,
        reason: &str,
        now: Timestamp,
    ) -> StoreResult<CancelledRun>;

    /// Approves or rejects the gated `stage` of a run waiting for it. Approval makes the
    /// stage due; rejection fails the stage and the run with the reason, and stops the
    /// run's other attempts.
    async fn decide_approval(
        &self,
        project: &ProjectId,
        run: RunId,
        stage: &StageName,
        decision: &ApprovalDecision,
        now: Timestamp,
    ) -> StoreResult<ApprovalOutcome>;

    /// Token and cost figures the agents reported (`usage` in stage outputs), summed per
    /// stage, per run and per submitter, over the project's runs created in `[since, ∞)`.
    async fn usage_report(&self, project: &ProjectId, since: Timestamp)
    -> StoreResult<UsageReport>;

    /// The sequence number of the project's newest event, if it has any.
    async fn latest_event_seq(&self, project: &ProjectId) -> StoreResult<EventSeq>;

    /// Deletes events created before `before` (retention); how many.
    async fn prune_events(&self, before: Timestamp) -> StoreResult<u64>;

    async fn list_events(&self, project: &ProjectId, query: &EventQuery)
    -> StoreResult<Vec<Event>>;

    /// All projects: committed events after `after`, in sequence order, at most `limit`
    /// (for the live feed to fill a gap between two events it saw).
    async fn events_after(&self, after: EventSeq, limit: u32) -> StoreResult<Vec<Event>>;

    /// Takes the lease `name` for `holder` until `until`, or renews it: whether `holder`
    /// holds it now. It is taken only when free, lapsed (`expires_at` before `now`) or
    /// already `holder`'s — one statement, so two servers racing for it cannot both win.
    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> StoreResult<bool>;

    /// Gives the lease up if `holder` has it (a clean shutdown), so another takes it at once.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()>;

    /// All projects: one attempt by id (for the worker-facing endpoints, which are not
    /// scoped by project).
    async fn attempt_by_id(&self, id: AttemptId) -> StoreResult<Option<StageAttempt>>;

    /// All projects: pending attempts whose backoff has passed, oldest first.
    async fn due_attempts(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>>;

    /// All projects: claims up to `limit` due pending attempts for dispatch, oldest first,
    /// as [`Store::due_attempts`] finds them, and holds them back from other claims until
    /// `hold_until` (their due time moves there): servers sharing the database never claim
    /// one attempt twice. One claimed but not marked dispatched by then (its server died,
    /// the bus refused it) is due again.
    async fn claim_due_attempts(
        &self,
        now: Timestamp,
        limit: u32,
        hold_until: Timestamp,
    ) -> StoreResult<Vec<StageAttempt>>;

    /// All projects: makes claimed attempts that were not dispatched (the bus refused them)
    /// due again at `now`, for the next claim.
    async fn release_claims(&self, attempts: &[AttemptId], now: Timestamp) -> StoreResult<()>;

    /// All projects: the runs with these ids (for building task envelopes in batches).
    async fn runs_by_ids(&self, ids: &[RunId]) -> StoreResult<Vec<Run>>;

    /// All projects: the outputs of the succeeded attempts of these runs.
    async fn succeeded_outputs(
        &self,
        runs: &[RunId],
    ) -> StoreResult<Vec<(RunId, StageName, serde_json::Value)>>;

    /// All projects: marks these pending attempts as handed to the bus, each with the
    /// broker's id of its message.
    async fn mark_dispatched(
        &self,
        attempts: &[(AttemptId, String)],
        now: Timestamp,
    ) -> StoreResult<()>;

    /// All projects: attempts dispatched before `dispatched_before` that no worker has
    /// started, oldest first (candidates for reconciliation).
    async fn stale_dispatched(
        &self,
        dispatched_before: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<StageAttempt>>;

    /// All projects: records that a still-dispatched attempt was published again.
    async fn record_redispatch(
        &self,
        attempt: AttemptId,
        message_id: &str,
        now: Timestamp,
    ) -> StoreResult<bool>;

    /// The project's dead letters still waiting for a decision, newest first.
    async fn list_dead_letters(
        &self,
        project: &ProjectId,
        query: &DeadLetterQuery,
    ) -> StoreResult<Vec<StageAttempt>>;

    /// Runs a dead-lettered attempt's stage again: its failed run reopens and a new
    /// attempt is queued. Returns the new attempt.
    async fn redrive_dead_letter(
        &self,
        project: &ProjectId,
        attempt: AttemptId,
        pipelines: &PipelineCatalog,
        now: Timestamp,
    ) -> StoreResult<StageAttempt>;

    /// Dismisses a dead letter; its run stays failed.
    async fn discard_dead_letter(
        &self,
        project: &ProjectId,
        attempt: AttemptId,
        now: Timestamp,
    ) -> StoreResult<StageAttempt>;

    /// Records a worker's heartbeat (registering it, or bringing it back to `live`).
    async fn worker_seen(
        &self,
        worker: &WorkerId,
        profile: &WorkerProfile,
        now: Timestamp,
    ) -> StoreResult<()>;

    /// Records that a worker left for good.
    async fn worker_gone(&self, worker: &WorkerId, now: Timestamp) -> StoreResult<()>;

    /// Marks live workers not seen since `silent_since` as lost. Returns how many.
    async fn mark_lost_workers(&self, silent_since: Timestamp, now: Timestamp) -> StoreResult<u64>;

    /// Every worker ever registered, live first.
    async fn list_workers(&self) -> StoreResult<Vec<Worker>>;

    /// All projects: puts every `dispatched` attempt back to `pending`, for a bus that lost
    /// its messages (the embedded bus after a restart). Returns how many were requeued.
    async fn requeue_dispatched(&self, now: Timestamp) -> StoreResult<u64>;

    /// Starts an attempt for a worker, if its token is current and it is still waiting;
    /// its deadline comes from the stage's timeout in `pipelines`.
    async fn start_attempt(
        &self,
        start: StartAttempt,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<StartOutcome>;

    /// Extends the lease of a running attempt. `false` when the token is stale.
    async fn renew_lease(
        &self,
        attempt: AttemptId,
        token: FencingToken,
        lease_until: Timestamp,
    ) -> StoreResult<bool>;

    /// Hands a running attempt back (graceful shutdown): it becomes `pending` again with a
    /// new fencing token, so the old worker's late result is rejected.
    async fn release_attempt(
        &self,
        attempt: AttemptId,
        token: FencingToken,
        now: Timestamp,
    ) -> StoreResult<bool>;

    /// Commits the end of an attempt, fenced by its token, and everything it causes (next
    /// stage, retry, end of the run), decided by [`drover_domain::decide`], in one
    /// transaction.
    async fn complete_attempt(
        &self,
        completion: Completion,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<CompletionOutcome>;

    /// Applies a batch of worker-caused writes in one transaction, in order (group commit:
    /// one commit for many messages). Each command behaves as its single-write method.
    /// On a database error nothing of the batch is written.
    async fn apply(
        &self,
        commands: Vec<WorkerCommand>,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<Vec<CommandOutcome>>;

    /// All projects: running attempts whose lease ran out before `now`.
    async fn expired_leases(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>>;

    /// All projects: running attempts past their stage timeout.
    async fn overdue_attempts(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>>;

    /// Counts attempts by status (for metrics and `readyz`).
    async fn count_attempts_by_status(&self) -> StoreResult<Vec<(StageStatus, u64)>>;

    /// Committed events, as they commit. A subscriber that falls behind gets
    /// `RecvError::Lagged` and must catch up from [`Store::list_events`].
    fn subscribe(&self) -> broadcast::Receiver<Event>;

    /// Checks that the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// How full the connection pool is (for `readyz`).
    fn pool(&self) -> PoolStats;
}
