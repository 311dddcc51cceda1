//! The worker runtime: consumes an agent type's tasks from the bus and runs them.
//!
//! Per task: publish `Started`, heartbeat every interval while the agent works, publish
//! `Finished` with the agent's result, then acknowledge the delivery. A `Cancel` control
//! message stops the agent (its process group) and nothing is reported: the engine has
//! already decided. On shutdown the pool stops taking tasks, lets running ones finish
//! within the grace period, then stops the rest and hands them back (`Released`) so
//! another worker can take them at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_bus::{Bus, Control, Delivery, WorkerMessage};
use drover_domain::{AttemptId, WorkerId, WorkerProfile};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Agent, AgentTask, StageLog};

/// How long a cancelled agent gets to clean up before its future is dropped (which kills
/// whatever process group it still holds).
const CANCEL_CLEANUP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    pub worker_id: WorkerId,
    /// Tasks of one agent type run at once.
    pub concurrency: u32,
    pub heartbeat_interval: Duration,
    /// `embedded` (inside a server) or `external` (`drover worker`).
    pub kind: String,
}

struct Shared {
    bus: Arc<dyn Bus>,
    config: WorkerPoolConfig,
    /// Cancellation handles of the attempts running now.
    running: Mutex<HashMap<AttemptId, CancellationToken>>,
    /// Fires to stop every running agent (shutdown after the grace period).
    hard_stop: CancellationToken,
}

impl Shared {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptId, CancellationToken>> {
        // Every operation on the map is a single insert/remove/lookup; it stays consistent.
        self.running.lock().unwrap_or_else(|poison| poison.into_inner())
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
        });
        let intake = CancellationToken::new();
        let tracker = TaskTracker::new();
        let profile = WorkerProfile {
            agents: agents.iter().map(|agent| agent.agent_type().clone()).collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: hostname(),
            concurrency: shared.config.concurrency,
            kind: shared.config.kind.clone(),
        };
        tracker.spawn(presence_loop(shared.clone(), profile, intake.clone()));
        tracker.spawn(control_loop(shared.clone()));
        for agent in agents {
            tracker.spawn(consume_loop(shared.clone(), agent, intake.clone(), tracker.clone()));
        }
        Self { shared, intake, tracker }
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

/// Registers the worker and keeps saying it is alive; says goodbye when it stops taking work.
async fn presence_loop(shared: Arc<Shared>, profile: WorkerProfile, intake: CancellationToken) {
    let worker_id = shared.config.worker_id.clone();
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    loop {
        tokio::select! {
            () = intake.cancelled() => break,
            _ = ticker.tick() => {
                shared.publish(WorkerMessage::Alive { worker_id: worker_id.clone(), profile: profile.clone() }).await;
            }
        }
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

async fn consume_loop(
    shared: Arc<Shared>,
    agent: Arc<dyn Agent>,
    intake: CancellationToken,
    tracker: TaskTracker,
) {
    let agent_type = agent.agent_type().clone();
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
        let delivery = tokio::select! {
            () = intake.cancelled() => return,
            delivery = deliveries.next() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        let shared = shared.clone();
        let agent = agent.clone();
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

    let task = AgentTask {
        workspace: PathBuf::from(&envelope.context.workspace),
        log: StageLog::new(&envelope.context.log_path),
        cancel: cancel.clone(),
        envelope,
    };
    tracing::info!("stage started");
    let snapshot = crate::artifacts::Snapshot::take(&task.workspace, task.log.path()).await;
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
        )
        .await;
        if kept > 0 {
            tracing::info!(files = kept, "declared outputs kept");
        }
    }
    if let Some(snapshot) = snapshot {
        snapshot.diff_into(&task.log.path().with_extension("diff")).await;
    }
    heartbeat.abort();
    shared.running().remove(&attempt_id);

    match result {
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
