//! The dispatcher: the outbox relay. It publishes due pending attempts to the bus, then
//! marks them dispatched. A crash between the two re-publishes on restart (at-least-once);
//! fencing makes the duplicate harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use drover_bus::{BusError, TaskEnvelope, WorkflowContext};
use drover_domain::{AttemptId, ProjectId, RunId, StageAttempt};
use drover_secrets::VaultError;
use drover_store::StoreError;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{Engine, now};

pub(crate) async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    if !engine.bus.is_durable() {
        // The bus forgot everything it carried; what the store says is dispatched and not
        // started is published again.
        match engine.store.requeue_dispatched(now()).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "requeued attempts the bus lost"),
            Err(err) => tracing::error!(error = %err, "cannot requeue dispatched attempts"),
        }
    }
    loop {
        if let Err(err) = dispatch_due(&engine).await {
            tracing::error!(error = %err, "dispatch pass failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = engine.dispatch_wanted.notified() => {}
            () = tokio::time::sleep(engine.settings.poll_interval) => {}
        }
    }
}

/// Publishes every due attempt, a batch at a time, until none is left or the bus is full.
/// Each batch is claimed first: servers sharing the store never publish one attempt twice,
/// and a claim this server does not see through (it died) is due again after
/// `redispatch_after`.
async fn dispatch_due(engine: &Engine) -> Result<(), StoreError> {
    loop {
        let claimed_at = now();
        let hold_until = claimed_at.plus(engine.settings.redispatch_after);
        let due = engine
            .store
            .claim_due_attempts(claimed_at, engine.settings.dispatch_batch, hold_until)
            .await?;
        if due.is_empty() {
            return Ok(());
        }
        let envelopes = match envelopes(engine, &due).await {
            Ok(envelopes) => envelopes,
            Err(err) => {
                release(engine, due.iter().map(|attempt| attempt.id).collect()).await;
                return Err(err);
            }
        };
        let mut published = Vec::with_capacity(envelopes.len());
        let mut refused = Vec::new();
        for (attempt, envelope) in due.iter().zip(envelopes) {
            match engine.bus.publish_task(&envelope).await {
                Ok(message_id) => {
                    published.push((attempt.id, message_id.0));
                    let waited = now().since(attempt.available_at);
                    metrics::histogram!("drover_engine_dispatch_latency_seconds", "agent" => attempt.agent.to_string())
                        .record(waited.as_secs_f64());
                }
                Err(BusError::Full { topic }) => {
                    tracing::debug!(%topic, "task queue full; the attempt waits in the store");
                    refused.push(attempt.id);
                }
                Err(err) => {
                    tracing::warn!(attempt_id = %attempt.id, error = %err, "publish failed");
                    refused.push(attempt.id);
                }
            }
        }
        engine.store.mark_dispatched(&published, now()).await?;
        release(engine, refused).await;
        metrics::counter!("drover_engine_attempts_dispatched_total")
            .increment(published.len() as u64);
        // A short batch means nothing else is due; an unpublishable one means wait.
        if published.is_empty() || due.len() < engine.settings.dispatch_batch as usize {
            return Ok(());
        }
    }
}

/// Makes claimed attempts that were not published due again at once.
async fn release(engine: &Engine, attempts: Vec<AttemptId>) {
    if let Err(err) = engine.store.release_claims(&attempts, now()).await {
        // They are due again when their claim runs out.
        tracing::warn!(error = %err, count = attempts.len(), "cannot release claims");
    }
}

/// Builds the envelopes of a batch with three queries, however large the batch (runs,
/// outputs, and the names of the batch's projects' secrets: never their values, which the
/// worker fetches when it runs the attempt).
pub(crate) async fn envelopes(
    engine: &Engine,
    due: &[StageAttempt],
) -> Result<Vec<TaskEnvelope>, StoreError> {
    let mut run_ids: Vec<RunId> = due.iter().map(|a| a.run_id).collect();
    run_ids.sort();
    run_ids.dedup();
    let runs: HashMap<RunId, _> =
        engine.store.runs_by_ids(&run_ids).await?.into_iter().map(|run| (run.id, run)).collect();
    let mut outputs: HashMap<RunId, BTreeMap<String, serde_json::Value>> = HashMap::new();
    for (run, stage, output) in engine.store.succeeded_outputs(&run_ids).await? {
        outputs.entry(run).or_default().insert(stage.to_string(), output);
    }
    let secret_names = secret_names(engine, due).await?;
    due.iter()
        .map(|attempt| {
            let run = runs.get(&attempt.run_id).ok_or_else(|| {
                StoreError::Corrupt(format!("attempt {} has no run {}", attempt.id, attempt.run_id))
            })?;
            let layout = &engine.layout;
            let catalog;
            let pipeline = match &run.spec {
                Some(spec) => Some(spec),
                None => {
                    catalog = engine.pipelines();
                    catalog.get(run.pipeline.as_str())
                }
            };
            let stage = pipeline.and_then(|p| p.stage(attempt.stage_index));
            Ok(TaskEnvelope {
                task_id: attempt.id,
                project_id: attempt.project_id.clone(),
                run_id: attempt.run_id,
                pipeline: run.pipeline.clone(),
                stage: attempt.stage.clone(),
                agent: attempt.agent.clone(),
                attempt: attempt.attempt,
                fencing_token: attempt.fencing_token,
                payload: json!({ "request": run.request }),
                context: WorkflowContext {
                    workspace: run
                        .workspace
                        .clone()
                        .unwrap_or_else(|| layout.workspace(run.id).display().to_string()),
                    log_path: layout
                        .attempt_log(run.id, &attempt.stage, attempt.attempt)
                        .display()
                        .to_string(),
                    outputs: outputs.get(&run.id).cloned().unwrap_or_default(),
                    variables: run.variables.clone(),
                    policy: stage.map(|s| s.policy.clone()).unwrap_or_default(),
                    output_files: stage.map(|s| s.outputs.clone()).unwrap_or_default(),
                    project_contract: stage.is_some_and(|s| s.contract),
                    secret_names: secret_names
                        .get(&attempt.project_id)
                        .cloned()
                        .unwrap_or_default(),
                },
                deadline: attempt.deadline_at,
                correlation_id: run.correlation_id,
                traceparent: None,
            })
        })
        .collect()
}

/// The names of the secrets of the projects of `due` (none without a vault).
async fn secret_names(
    engine: &Engine,
    due: &[StageAttempt],
) -> Result<HashMap<ProjectId, Vec<String>>, StoreError> {
    let Some(vault) = engine.vault() else { return Ok(HashMap::new()) };
    let mut projects: Vec<ProjectId> = due.iter().map(|a| a.project_id.clone()).collect();
    projects.sort();
    projects.dedup();
    vault.names(&projects).await.map_err(|err| match err {
        VaultError::Store(err) => err,
        other => StoreError::Corrupt(format!("listing project secrets: {other}")),
    })
}
