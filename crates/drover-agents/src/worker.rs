//! The worker runtime: consumes an agent type's tasks from the bus and runs them.
//!
//! Per task: publish `Started`, heartbeat every interval while the agent works, fetch the
//! values of the secrets the task names (from the pool's [`TaskSecrets`]; a fetch that
//! fails fails the attempt, retryably, and the agent does not run without them), publish
//! `Finished` with the agent's result, then acknowledge the delivery. A `Cancel` control
//! message stops the agent (its process group) and nothing is reported: the engine has
//! already decided. On shutdown the pool stops taking tasks, lets running ones finish
//! within the grace period, then stops the rest and hands them back (`Released`) so
//! another worker can take them at once.
//!
//! The set of agents can change while the pool runs ([`WorkerPool::replace_agents`], a
//! configuration reload): each consumed agent type has a slot holding the agent that new
//! tasks of the type get and an intake of its own, a child of the pool's. A consume loop
//! reads its slot per delivery, so a changed agent takes the next task while tasks already
//! running finish with the agent they started with; a new type gets a consume loop; a type
//! no longer present has its intake closed (its running tasks finish normally). The agent
//! types the presence loop announces follow the set.
//!
//! Around every attempt the worker records what the agent did to the workspace (its diff,
//! and the files and lines it changed) and adds the stage's summary to the result.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use drover_bus::{AgentResult, Bus, Control, Delivery, TaskEnvelope, WorkerMessage};
use drover_domain::{AgentType, AttemptId, Redactor, SecretValues, WorkerId, WorkerProfile};
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Agent, AgentTask, StageLog, TaskSecrets};

/// How long a cancelled agent gets to clean up before its future is dropped (which kills
/// whatever process group it still holds).
const CANCEL_CLEANUP: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct WorkerPoolConfig {
    pub worker_id: WorkerId,
    /// Tasks of one agent type run at once.
    pub concurrency: u32,
    pub heartbeat_interval: Duration,
    /// `embedded` (inside a server) or `external` (`drover worker`).
    pub kind: String,
    /// Where the values of the secrets a task names come from. `None`: a task naming
    /// secrets fails (retryably) without running.
    pub secrets: Option<Arc<dyn TaskSecrets>>,
}

impl std::fmt::Debug for WorkerPoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPoolConfig")
            .field("worker_id", &self.worker_id)
            .field("concurrency", &self.concurrency)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("kind", &self.kind)
            .field("secrets", &self.secrets.is_some())
            .finish()
    }
}

struct Shared {
    bus: Arc<dyn Bus>,
    config: WorkerPoolConfig,
    /// Cancellation handles of the attempts running now.
    running: Mutex<HashMap<AttemptId, CancellationToken>>,
    /// Fires to stop every running agent (shutdown after the grace period).
    hard_stop: CancellationToken,
    /// The agent types consumed now, in the order they were added.
    consumers: Mutex<Vec<Consumer>>,
    /// The agent types announced by the presence loop; changes are announced at once.
    announced: watch::Sender<Vec<AgentType>>,
}

/// One agent type the pool consumes.
struct Consumer {
    agent_type: AgentType,
    slot: Arc<AgentSlot>,
    /// Closing it stops this type's consume loop only.
    intake: CancellationToken,
}

/// The agent a consume loop hands its next task to; replaced when the agents change.
struct AgentSlot(RwLock<Arc<dyn Agent>>);

impl AgentSlot {
    fn current(&self) -> Arc<dyn Agent> {
        // Only ever a whole-value read or write: a poisoned lock still holds a valid agent.
        self.0.read().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    fn set(&self, agent: Arc<dyn Agent>) {
        *self.0.write().unwrap_or_else(|poison| poison.into_inner()) = agent;
    }
}

/// What one change of the agents did, for the log.
#[derive(Debug, Default)]
struct AgentChanges {
    added: Vec<AgentType>,
    kept: Vec<AgentType>,
    removed: Vec<AgentType>,
}

impl Shared {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptId, CancellationToken>> {
        // Every operation on the map is a single insert/remove/lookup; it stays consistent.
        self.running.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn consumers(&self) -> std::sync::MutexGuard<'_, Vec<Consumer>> {
        // Changed only by whole pushes and removals: consistent even after a panic.
        self.consumers.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    async fn publish(&self, message: WorkerMessage) {
        if let Err(err) = self.bus.publish_result(&message).await {
            tracing::warn!(error = %err, "cannot publish a worker message");
        }
    }
}

/// Workers for a set of agents, running inside this process.
pub struct WorkerPool {
    shared: Arc<Shared>,
    intake: CancellationToken,
    tracker: TaskTracker,
}

impl WorkerPool {
    /// Starts consuming tasks for every agent's type.
    pub fn start(bus: Arc<dyn Bus>, agents: Vec<Arc<dyn Agent>>, config: WorkerPoolConfig) -> Self {
        let shared = Arc::new(Shared {
            bus,
            config,
            running: Mutex::new(HashMap::new()),
            hard_stop: CancellationToken::new(),
            consumers: Mutex::new(Vec::new()),
            announced: watch::Sender::new(Vec::new()),
        });
        let pool = Self { shared, intake: CancellationToken::new(), tracker: TaskTracker::new() };
        pool.apply(agents);
        let profile = WorkerProfile {
            agents: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: hostname(),
            concurrency: pool.shared.config.concurrency,
            kind: pool.shared.config.kind.clone(),
        };
        pool.tracker.spawn(presence_loop(pool.shared.clone(), profile, pool.intake.clone()));
        pool.tracker.spawn(control_loop(pool.shared.clone()));
        pool
    }

    /// Makes `agents` the pool's agents without stopping running work: a type already
    /// consumed gives its new tasks to the new agent (running tasks keep the agent they
    /// started with), a new type is consumed from now on, and a type not in `agents` is no
    /// longer taken (its running tasks finish normally). Of several agents of one type,
    /// the last wins.
    pub fn replace_agents(&self, agents: Vec<Arc<dyn Agent>>) {
        let changes = self.apply(agents);
        tracing::info!(
            added = ?changes.added,
            removed = ?changes.removed,
            kept = changes.kept.len(),
            "worker agents replaced"
        );
    }

    /// The agent types the pool consumes now.
    pub fn agent_types(&self) -> Vec<AgentType> {
        self.shared.consumers().iter().map(|c| c.agent_type.clone()).collect()
    }

    fn apply(&self, agents: Vec<Arc<dyn Agent>>) -> AgentChanges {
        let mut changes = AgentChanges::default();
        let mut consumers = self.shared.consumers();
        let wanted: std::collections::HashSet<AgentType> =
            agents.iter().map(|agent| agent.agent_type().clone()).collect();
        consumers.retain(|consumer| {
            let keep = wanted.contains(&consumer.agent_type);
            if !keep {
                consumer.intake.cancel();
                changes.removed.push(consumer.agent_type.clone());
            }
            keep
        });
        for agent in agents {
            let agent_type = agent.agent_type().clone();
            if let Some(consumer) = consumers.iter().find(|c| c.agent_type == agent_type) {
                consumer.slot.set(agent);
                if !changes.kept.contains(&agent_type) && !changes.added.contains(&agent_type) {
                    changes.kept.push(agent_type);
                }
                continue;
            }
            let slot = Arc::new(AgentSlot(RwLock::new(agent)));
            let intake = self.intake.child_token();
            self.tracker.spawn(consume_loop(
                self.shared.clone(),
                agent_type.clone(),
                slot.clone(),
                intake.clone(),
                self.tracker.clone(),
            ));
            changes.added.push(agent_type.clone());
            consumers.push(Consumer { agent_type, slot, intake });
        }
        let types: Vec<AgentType> = consumers.iter().map(|c| c.agent_type.clone()).collect();
        drop(consumers);
        self.shared.announced.send_if_modified(|announced| {
            let changed = *announced != types;
            *announced = types;
            changed
        });
        changes
    }

    /// How many attempts are running now.
    pub fn running(&self) -> usize {
        self.shared.running().len()
    }

    /// Stops taking tasks, waits up to `grace` for running ones, stops and hands back the
    /// rest, and returns when every task of the pool has ended.
    pub async fn shutdown(self, grace: Duration) {
        self.intake.cancel();
        self.tracker.close();
        let drained = async {
            while self.running() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(running = self.running(), "grace period over; stopping running stages");
        }
        self.shared.hard_stop.cancel();
        self.tracker.wait().await;
    }
}

/// Registers the worker and keeps saying it is alive (with the agent types it consumes
/// now, at once when they change); says goodbye when it stops taking work.
async fn presence_loop(shared: Arc<Shared>, mut profile: WorkerProfile, intake: CancellationToken) {
    let worker_id = shared.config.worker_id.clone();
    let mut announced = shared.announced.subscribe();
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    loop {
        tokio::select! {
            () = intake.cancelled() => break,
            _ = ticker.tick() => {}
            changed = announced.changed() => if changed.is_err() { break },
        }
        profile.agents = announced.borrow_and_update().clone();
        shared
            .publish(WorkerMessage::Alive {
                worker_id: worker_id.clone(),
                profile: profile.clone(),
            })
            .await;
    }
    shared.publish(WorkerMessage::Gone { worker_id }).await;
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

async fn control_loop(shared: Arc<Shared>) {
    let mut controls = match shared.bus.subscribe_control().await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::error!(error = %err, "cannot subscribe to control messages");
            return;
        }
    };
    loop {
        let control = tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            control = controls.next() => match control {
                Some(control) => control,
                None => return,
            },
        };
        match control {
            Control::Cancel { attempt_id, reason } => {
                if let Some(token) = shared.running().get(&attempt_id) {
                    tracing::info!(%attempt_id, %reason, "cancelling running stage");
                    token.cancel();
                }
            }
        }
    }
}

/// Takes `agent_type`'s tasks until its intake closes, each run by the agent in `slot` at
/// the time it is taken.
async fn consume_loop(
    shared: Arc<Shared>,
    agent_type: AgentType,
    slot: Arc<AgentSlot>,
    intake: CancellationToken,
    tracker: TaskTracker,
) {
    let mut deliveries =
        match shared.bus.consume_tasks(&agent_type, shared.config.worker_id.as_str()).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::error!(agent = %agent_type, error = %err, "cannot consume tasks");
                return;
            }
        };
    let slots = Arc::new(Semaphore::new(shared.config.concurrency.max(1) as usize));
    loop {
        let permit = tokio::select! {
            () = intake.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        // Biased: once the intake closes, no further task is taken, even one already queued.
        let delivery = tokio::select! {
            biased;
            () = intake.cancelled() => return,
            delivery = deliveries.next() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        let shared = shared.clone();
        let agent = slot.current();
        tracker.spawn(async move {
            execute(&shared, agent.as_ref(), delivery).await;
            drop(permit);
        });
    }
}

#[tracing::instrument(
    name = "stage",
    skip_all,
    fields(
        run_id = %delivery.envelope.run_id,
        stage = %delivery.envelope.stage,
        attempt = delivery.envelope.attempt,
        correlation_id = %delivery.envelope.correlation_id,
    )
)]
async fn execute(shared: &Shared, agent: &dyn Agent, delivery: Delivery) {
    let envelope = delivery.envelope.clone();
    let attempt_id = envelope.task_id;
    let token = envelope.fencing_token;
    let worker_id = shared.config.worker_id.clone();
    let cancel = shared.hard_stop.child_token();
    shared.running().insert(attempt_id, cancel.clone());

    shared
        .publish(WorkerMessage::Started { attempt_id, token, worker_id: worker_id.clone() })
        .await;
    let heartbeat = {
        let bus = shared.bus.clone();
        let worker_id = worker_id.clone();
        let interval = shared.config.heartbeat_interval;
        let delivery = delivery.handle.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                // Keep the broker from handing the task to someone else, and the engine
                // from reclaiming the lease.
                delivery.in_progress().await;
                let beat =
                    WorkerMessage::Heartbeat { attempt_id, token, worker_id: worker_id.clone() };
                if let Err(err) = bus.publish_result(&beat).await {
                    tracing::warn!(error = %err, "heartbeat not published");
                }
            }
        })
    };

    let secrets = match fetch_secrets(shared, &envelope).await {
        Ok(secrets) => secrets,
        Err(error) => {
            // Never run the agent without the secrets it is meant to have: the attempt
            // fails and is retried like any transient failure.
            tracing::warn!(error = %error, "stage not run: its secrets could not be fetched");
            StageLog::new(&envelope.context.log_path).line(&error).await;
            heartbeat.abort();
            shared.running().remove(&attempt_id);
            let result = AgentResult::Failed { error, retryable: true };
            shared.publish(WorkerMessage::Finished { attempt_id, token, worker_id, result }).await;
            delivery.handle.ack().await;
            return;
        }
    };
    // The project's secret values never leave the attempt: not in its log, its artifacts,
    // nor the result (which becomes the stage's output, events and errors).
    let redactor = Redactor::new(&secrets);
    let task = AgentTask {
        workspace: PathBuf::from(&envelope.context.workspace),
        log: StageLog::new(&envelope.context.log_path).redacting(redactor.clone()),
        cancel: cancel.clone(),
        envelope,
        secrets,
    };
    tracing::info!("stage started");
    let before = crate::changes::Before::take(&task.workspace, task.log.path()).await;
    let protected =
        crate::policy::ProtectedFiles::take(&task.workspace, &task.envelope.context.policy).await;
    let deadline_after_cancel = async {
        cancel.cancelled().await;
        tokio::time::sleep(CANCEL_CLEANUP).await;
    };
    let mut result = tokio::select! {
        result = agent.run(&task) => Some(result),
        () = deadline_after_cancel => None,
    };
    if let (Some(watch), Some(_)) = (protected, &result)
        && let Some(violation) = watch.violation(task.envelope.stage.as_str()).await
    {
        task.log.line(&violation).await;
        result = Some(drover_bus::AgentResult::Failed { error: violation, retryable: false });
    }
    if let Some(drover_bus::AgentResult::Succeeded { .. }) = &result {
        let dest = task.log.path().with_extension("outputs");
        let kept = crate::policy::collect_outputs(
            &task.workspace,
            &task.envelope.context.output_files,
            dest,
            &redactor,
        )
        .await;
        if kept > 0 {
            tracing::info!(files = kept, "declared outputs kept");
        }
    }
    let changes = match before {
        Some(before) => before.finish(&task.log.path().with_extension("diff"), &redactor).await,
        None => None,
    };
    if let Some(result) = &mut result {
        summarize_into(&task.log, result, changes.as_ref()).await;
    }
    heartbeat.abort();
    shared.running().remove(&attempt_id);

    match result.map(|result| redact_result(&redactor, result)) {
        Some(result) if !cancel.is_cancelled() => {
            tracing::info!(
                ok = matches!(result, drover_bus::AgentResult::Succeeded { .. }),
                "stage finished"
            );
            shared.publish(WorkerMessage::Finished { attempt_id, token, worker_id, result }).await;
        }
        _ if shared.hard_stop.is_cancelled() => {
            tracing::info!("stage handed back: worker stopping");
            shared.publish(WorkerMessage::Released { attempt_id, token, worker_id }).await;
        }
        _ => tracing::info!("stage cancelled"),
    }
    delivery.handle.ack().await;
}

/// Says in the log what the attempt's agent did (files, lines, tools, tokens, cost) and,
/// for a success, adds it to the output as `summary`.
async fn summarize_into(
    log: &StageLog,
    result: &mut AgentResult,
    changes: Option<&crate::changes::Changes>,
) {
    let reported = match result {
        AgentResult::Succeeded { output } => output.clone(),
        AgentResult::Failed { .. } => serde_json::Value::Null,
    };
    let Some(summary) = crate::summary::summarize(&reported, changes) else { return };
    log.line(format!("summary: {}", summary.text)).await;
    if let AgentResult::Succeeded { output: serde_json::Value::Object(fields) } = result
        && let Ok(summary) = serde_json::to_value(&summary)
    {
        fields.insert("summary".to_owned(), summary);
    }
}

/// The values of the secrets `envelope` names, from the pool's source (nothing to fetch
/// when it names none). The error says why, naming the secrets, never a value.
async fn fetch_secrets(shared: &Shared, envelope: &TaskEnvelope) -> Result<SecretValues, String> {
    let names = &envelope.context.secret_names;
    if names.is_empty() {
        return Ok(SecretValues::default());
    }
    let failed = |why: &str| {
        format!(
            "cannot fetch the project's secrets ({}): {why}; the agent did not run",
            names.join(", ")
        )
    };
    let Some(source) = &shared.config.secrets else {
        return Err(failed("this worker has no way to fetch secrets"));
    };
    let secrets = source
        .secrets_for(envelope, &shared.config.worker_id)
        .await
        .map_err(|err| failed(&err.0))?;
    let missing: Vec<&str> =
        names.iter().map(String::as_str).filter(|name| secrets.get(name).is_none()).collect();
    if !missing.is_empty() {
        // Deleted since the task was dispatched, or unopenable (the server logs which).
        tracing::info!(?missing, "named secrets not received; the stage runs without them");
    }
    Ok(secrets)
}

/// The result with every secret value replaced, in the output's strings (and keys) or in
/// the error message.
fn redact_result(redactor: &Redactor, result: AgentResult) -> AgentResult {
    match result {
        AgentResult::Succeeded { mut output } => {
            redactor.redact_json(&mut output);
            AgentResult::Succeeded { output }
        }
        AgentResult::Failed { error, retryable } => {
            AgentResult::Failed { error: redactor.redact(&error).into_owned(), retryable }
        }
    }
}
