//! The engine: the orchestrator that moves runs forward.
//!
//! It never trusts the bus with state. A run and its first attempt are written to the store
//! in one transaction; the [dispatcher](dispatcher) then publishes due attempts and marks
//! them dispatched (a transactional outbox). The [results loop](results) commits what
//! workers report, fenced by each attempt's token, and the store decides the next step in
//! the same transaction. The [reaper](reaper) reclaims attempts whose worker stopped
//! heartbeating or that ran past their timeout. Any of these may crash at any point: what
//! was committed stays, what was not is redone, nothing is applied twice.

mod dispatcher;
pub mod leadership;
mod reaper;
mod reconciler;
mod results;
mod secrets;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use drover_bus::{Bus, Control};
use drover_domain::{
    AttemptId, CorrelationId, EnvironmentId, PipelineCatalog, ProjectId, Run, RunId, RunRequest,
    Timestamp,
};
use drover_env::Layout;
use drover_store::{NewRun, Store, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use secrets::SecretsRequest;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("pipeline `{name}` does not exist; known pipelines: {known}")]
    UnknownPipeline { name: String, known: String },
    #[error("no attempt {0}")]
    AttemptNotFound(AttemptId),
    #[error("this worker may not run agent type `{0}`")]
    AgentNotAllowed(drover_domain::AgentType),
    #[error(
        "attempt {attempt} is not held under fencing token {token} (it is {status} under token {current})"
    )]
    StaleAttempt {
        attempt: AttemptId,
        token: drover_domain::FencingToken,
        current: drover_domain::FencingToken,
        status: drover_domain::StageStatus,
    },
    #[error("the project's secrets cannot be opened: {0}")]
    SecretsUnavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a run executes: an environment and its workspace.
#[derive(Debug, Clone)]
pub struct RunPlacement {
    pub environment_id: EnvironmentId,
    pub workspace: String,
    /// The environment's variables, handed to the run's agents with every task.
    pub variables: std::collections::BTreeMap<String, String>,
}

/// How a run is to be executed, beyond its request and pipeline.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Its environment (else a workspace of its own).
    pub placement: Option<RunPlacement>,
    /// What its stages may spend together.
    pub budget: Option<drover_domain::Budget>,
    /// Who submitted it.
    pub submitted_by: Option<String>,
}

/// Timing and batching of the engine's loops.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub heartbeat_interval: Duration,
    /// How long a lease lasts without a heartbeat.
    pub lease_duration: Duration,
    /// How often the dispatcher looks for due attempts when nothing woke it.
    pub poll_interval: Duration,
    pub dispatch_batch: u32,
    /// A dispatched attempt no worker started for this long is checked with the broker,
    /// and published again if the broker lost it.
    pub redispatch_after: Duration,
    /// A worker not heard from for this long is marked lost.
    pub worker_liveness: Duration,
    /// This server's name on the bus (its consumer name for results) and as the holder
    /// of the leader lease.
    pub instance: String,
    /// How long the leader lease lasts (see [`leadership`]).
    pub leader_lease: Duration,
}

/// The orchestrator. Cheap to share behind an `Arc`.
pub struct Engine {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    /// Replaced as a whole when the configuration is reloaded; runs under way follow
    /// the snapshot they were created with.
    pipelines: std::sync::RwLock<Arc<PipelineCatalog>>,
    /// The agents stages can name (shown to users; the workers run them). Replaced with the
    /// pipelines on a reload.
    agents: std::sync::RwLock<Arc<Vec<drover_domain::AgentDefinition>>>,
    layout: Layout,
    settings: EngineSettings,
    /// Wakes the dispatcher when an attempt became due.
    dispatch_wanted: Notify,
    /// Project secrets: their names travel with each dispatched task, their values go to
    /// the worker holding it ([`Engine::attempt_secrets`]); none without a vault.
    vault: Option<Arc<drover_secrets::Vault>>,
    /// Whether this server holds the leader lease now.
    leader: tokio::sync::watch::Sender<bool>,
}

pub(crate) fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        pipelines: Arc<PipelineCatalog>,
        layout: Layout,
        settings: EngineSettings,
    ) -> Self {
        Self {
            store,
            bus,
            pipelines: std::sync::RwLock::new(pipelines),
            agents: std::sync::RwLock::new(Arc::new(drover_domain::AgentDefinition::builtins())),
            layout,
            settings,
            dispatch_wanted: Notify::new(),
            vault: None,
            leader: tokio::sync::watch::channel(false).0,
        }
    }

    /// Whether this server holds the leader lease: the loops that must run once across
    /// servers sharing a database run only while it does.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Changes whenever this server gains or loses the leader lease.
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Gives dispatched tasks the names of their project's secrets and their workers the
    /// values, through `vault` (which the API also uses to set them).
    #[must_use]
    pub fn with_vault(mut self, vault: Arc<drover_secrets::Vault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// The project secrets, when the engine has them.
    pub fn vault(&self) -> Option<&Arc<drover_secrets::Vault>> {
        self.vault.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The pipelines new runs can follow.
    pub fn pipelines(&self) -> Arc<PipelineCatalog> {
        // Readers only clone the Arc; a poisoned lock still holds a whole catalog.
        self.pipelines.read().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// The agents stages can name.
    pub fn agents(&self) -> Arc<Vec<drover_domain::AgentDefinition>> {
        self.agents.read().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// Makes `agents` the ones stages can name (at start, and on a reload).
    pub fn replace_agents(&self, agents: Vec<drover_domain::AgentDefinition>) {
        *self.agents.write().unwrap_or_else(|poison| poison.into_inner()) = Arc::new(agents);
    }

    /// Makes `pipelines` the catalog new runs follow (configuration reload). Runs under
    /// way keep the pipeline they were submitted with.
    pub fn replace_pipelines(&self, pipelines: Arc<PipelineCatalog>) {
        *self.pipelines.write().unwrap_or_else(|poison| poison.into_inner()) = pipelines;
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Creates a run of `pipeline` for `request`, in an environment's workspace when
    /// `placement` says so. It is durable when this returns.
    #[tracing::instrument(skip_all, fields(project = %project, pipeline = pipeline))]
    pub async fn submit(
        &self,
        project: &ProjectId,
        request: RunRequest,
        pipeline: &str,
        correlation_id: CorrelationId,
        placement: Option<RunPlacement>,
    ) -> Result<Run, EngineError> {
        let options = RunOptions { placement, ..RunOptions::default() };
        self.submit_as(RunId::new(), project, request, pipeline, correlation_id, options).await
    }

    /// [`Self::submit`] with the run's id chosen by the caller (who prepared something
    /// named after it, like its environment).
    pub async fn submit_as(
        &self,
        id: RunId,
        project: &ProjectId,
        request: RunRequest,
        pipeline: &str,
        correlation_id: CorrelationId,
        options: RunOptions,
    ) -> Result<Run, EngineError> {
        let RunOptions { placement, budget, submitted_by } = options;
        let pipelines = self.pipelines();
        let spec = pipelines.get(pipeline).ok_or_else(|| EngineError::UnknownPipeline {
            name: pipeline.to_owned(),
            known: pipelines.names().collect::<Vec<_>>().join(", "),
        })?;
        let run = self
            .store
            .create_run(
                NewRun {
                    id: Some(id),
                    project_id: project.clone(),
                    pipeline: spec.clone(),
                    request,
                    correlation_id,
                    environment_id: placement.as_ref().map(|p| p.environment_id),
                    workspace: placement.as_ref().map(|p| p.workspace.clone()),
                    variables: placement.map(|p| p.variables).unwrap_or_default(),
                    budget,
                    submitted_by,
                },
                now(),
            )
            .await?;
        metrics::counter!("drover_engine_runs_submitted_total", "pipeline" => pipeline.to_owned())
            .increment(1);
        tracing::info!(run_id = %run.id, "run submitted");
        self.dispatch_wanted.notify_one();
        Ok(run)
    }

    /// Cancels a run that has not finished and stops whatever of it is running.
    #[tracing::instrument(skip_all, fields(project = %project, run_id = %run_id))]
    pub async fn cancel(
        &self,
        project: &ProjectId,
        run_id: RunId,
        reason: &str,
    ) -> Result<Run, EngineError> {
        let cancelled = self.store.cancel_run(project, run_id, reason, now()).await?;
        for attempt in &cancelled.stopped_attempts {
            self.stop_attempt(attempt.id, format!("run cancelled: {reason}")).await;
        }
        tracing::info!("run cancelled");
        Ok(cancelled.run)
    }

    /// Approves or rejects a run's gated stage. A rejection stops the rest of the run.
    #[tracing::instrument(skip_all, fields(project = %project, run_id = %run_id, stage = %stage))]
    pub async fn decide_approval(
        &self,
        project: &ProjectId,
        run_id: RunId,
        stage: &drover_domain::StageName,
        decision: &drover_store::ApprovalDecision,
    ) -> Result<drover_store::ApprovalOutcome, EngineError> {
        let outcome = self.store.decide_approval(project, run_id, stage, decision, now()).await?;
        for attempt in &outcome.stopped {
            let reason = attempt.error.clone().unwrap_or_else(|| "stage rejected".to_owned());
            self.stop_attempt(attempt.id, reason).await;
        }
        if decision.approve {
            self.dispatch_wanted.notify_one();
        }
        tracing::info!(approve = decision.approve, by = %decision.by, "approval decided");
        Ok(outcome)
    }

    pub(crate) async fn stop_attempt(&self, attempt_id: AttemptId, reason: String) {
        if let Err(err) = self.bus.publish_control(&Control::Cancel { attempt_id, reason }).await {
            tracing::warn!(%attempt_id, error = %err, "cannot publish a cancel");
        }
    }

    /// The project's dead letters, newest first.
    pub async fn dead_letters(
        &self,
        project: &ProjectId,
        query: &drover_store::DeadLetterQuery,
    ) -> Result<Vec<drover_domain::StageAttempt>, EngineError> {
        Ok(self.store.list_dead_letters(project, query).await?)
    }

    /// Runs a dead letter's stage again; returns the new attempt.
    pub async fn redrive(
        &self,
        project: &ProjectId,
        attempt: AttemptId,
    ) -> Result<drover_domain::StageAttempt, EngineError> {
        let retry =
            self.store.redrive_dead_letter(project, attempt, &self.pipelines(), now()).await?;
        metrics::counter!("drover_engine_dlq_redriven_total").increment(1);
        tracing::info!(%attempt, new_attempt = %retry.id, run_id = %retry.run_id, "dead letter redriven");
        self.dispatch_wanted.notify_one();
        Ok(retry)
    }

    /// Dismisses a dead letter.
    pub async fn discard(
        &self,
        project: &ProjectId,
        attempt: AttemptId,
    ) -> Result<drover_domain::StageAttempt, EngineError> {
        let letter = self.store.discard_dead_letter(project, attempt, now()).await?;
        tracing::info!(%attempt, run_id = %letter.run_id, "dead letter discarded");
        Ok(letter)
    }

    /// The bus this engine dispatches on.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Starts the dispatcher, results and reaper loops. They stop when `shutdown` fires;
    /// wait for them with the returned tracker.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> TaskTracker {
        let tracker = TaskTracker::new();
        tracker.spawn(dispatcher::run(self.clone(), shutdown.clone()));
        tracker.spawn(results::run(self.clone(), shutdown.clone()));
        tracker.spawn(reaper::run(self.clone(), shutdown.clone()));
        tracker.spawn(reconciler::run(self.clone(), shutdown.clone()));
        tracker.spawn(leadership::run(self.clone(), shutdown));
        tracker.close();
        tracker
    }
}
