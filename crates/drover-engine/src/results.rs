//! The results loop: commits what workers report. Every write is fenced by the attempt's
//! token inside the store, so a duplicate or late message changes nothing; such messages
//! are counted and, when a worker still holds an attempt it should not, it is told to stop.
//!
//! Messages that are already waiting are taken together and committed in one transaction
//! (group commit), which is what lets one store keep up with many workers.

use std::sync::Arc;
use std::time::Duration;

use drover_bus::{AgentResult, ResultDelivery, WorkerMessage};
use drover_domain::Outcome;
use drover_store::{
    CommandOutcome, Completion, CompletionOutcome, StartAttempt, StartOutcome, StoreError,
    WorkerCommand,
};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{Engine, now};

/// Attempts at a store write before a message is given up (its attempt is then reclaimed
/// by the reaper when the lease runs out).
const STORE_ATTEMPTS: u32 = 3;
/// Most messages committed in one transaction.
const MAX_BATCH: usize = 64;

pub(crate) async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut messages = match engine.bus.consume_results(&engine.settings.instance).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::error!(error = %err, "cannot consume worker results");
            return;
        }
    };
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            delivery = messages.next() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match messages.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery),
                _ => break,
            }
        }
        handle_batch(&engine, &batch).await;
        // Handled (or given up on: their attempts are then reclaimed when leases lapse).
        for delivery in batch {
            delivery.handle.ack().await;
        }
    }
}

async fn handle_batch(engine: &Engine, batch: &[ResultDelivery]) {
    let commands: Vec<WorkerCommand> =
        batch.iter().map(|d| command_for(engine, &d.message)).collect();
    match engine.store.apply(commands, &engine.pipelines()).await {
        Ok(outcomes) => {
            for (delivery, outcome) in batch.iter().zip(outcomes) {
                after(engine, &delivery.message, outcome).await;
            }
        }
        // One bad message must not hold up the others: retry them one by one.
        Err(err) if batch.len() > 1 => {
            tracing::warn!(error = %err, size = batch.len(), "batch commit failed; applying one by one");
            for delivery in batch {
                handle_one(engine, &delivery.message).await;
            }
        }
        Err(_) => handle_one(engine, &batch[0].message).await,
    }
}

async fn handle_one(engine: &Engine, message: &WorkerMessage) {
    let mut tries = 0;
    loop {
        tries += 1;
        match engine.store.apply(vec![command_for(engine, message)], &engine.pipelines()).await {
            Ok(outcomes) => {
                if let Some(outcome) = outcomes.into_iter().next() {
                    after(engine, message, outcome).await;
                }
                return;
            }
            Err(err) if tries < STORE_ATTEMPTS => {
                tracing::warn!(error = %err, tries, "handling a worker message failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(tries))).await;
            }
            Err(err) => {
                tracing::error!(error = %err, attempt_id = ?message.attempt_id(), "worker message dropped");
                return;
            }
        }
    }
}

/// The store write a worker message asks for.
fn command_for(engine: &Engine, message: &WorkerMessage) -> WorkerCommand {
    let now = now();
    match message {
        WorkerMessage::Started { attempt_id, token, worker_id } => {
            WorkerCommand::Start(StartAttempt {
                attempt_id: *attempt_id,
                token: *token,
                worker_id: worker_id.clone(),
                lease_until: now.plus(engine.settings.lease_duration),
                now,
            })
        }
        WorkerMessage::Heartbeat { attempt_id, token, .. } => WorkerCommand::Renew {
            attempt: *attempt_id,
            token: *token,
            lease_until: now.plus(engine.settings.lease_duration),
            now,
        },
        WorkerMessage::Finished { attempt_id, token, result, .. } => {
            let outcome = match result {
                AgentResult::Succeeded { output } => Outcome::Succeeded { output: output.clone() },
                AgentResult::Failed { error, retryable } => {
                    Outcome::Failed { error: error.clone(), retryable: *retryable }
                }
            };
            WorkerCommand::Complete(Completion {
                attempt_id: *attempt_id,
                token: *token,
                outcome,
                jitter: rand::random::<f64>(),
                now,
            })
        }
        WorkerMessage::Released { attempt_id, token, .. } => {
            WorkerCommand::Release { attempt: *attempt_id, token: *token, now }
        }
        WorkerMessage::Alive { worker_id, profile } => {
            WorkerCommand::Seen { worker: worker_id.clone(), profile: profile.clone(), now }
        }
        WorkerMessage::Gone { worker_id } => WorkerCommand::Gone { worker: worker_id.clone(), now },
    }
}

/// What follows a committed (or refused) worker message: stop workers that hold what is
/// no longer theirs, wake the dispatcher for new attempts, count and log.
async fn after(engine: &Engine, message: &WorkerMessage, outcome: CommandOutcome) {
    match (message, outcome) {
        (
            WorkerMessage::Started { worker_id, .. },
            CommandOutcome::Started(StartOutcome::Started(attempt)),
        ) => {
            tracing::info!(run_id = %attempt.run_id, stage = %attempt.stage, attempt = attempt.attempt, %worker_id, "stage running");
        }
        (
            WorkerMessage::Started { attempt_id, .. },
            CommandOutcome::Started(StartOutcome::Rejected { reason }),
        ) => {
            tracing::info!(%attempt_id, %reason, "start rejected; telling the worker to stop");
            engine.stop_attempt(*attempt_id, reason).await;
        }
        (WorkerMessage::Heartbeat { attempt_id, .. }, CommandOutcome::Renewed(false)) => {
            engine.stop_attempt(*attempt_id, "the attempt is no longer yours".into()).await;
        }
        (_, CommandOutcome::Completed(outcome)) => report_completion(engine, outcome).await,
        (WorkerMessage::Released { attempt_id, .. }, CommandOutcome::Released(true)) => {
            tracing::info!(%attempt_id, "attempt handed back");
            engine.dispatch_wanted.notify_one();
        }
        (WorkerMessage::Gone { worker_id }, _) => tracing::info!(%worker_id, "worker left"),
        _ => {}
    }
}

/// Commits an attempt's end decided by the engine itself (the reaper) and reports it.
pub(crate) async fn commit(engine: &Engine, completion: Completion) -> Result<bool, StoreError> {
    let outcome = engine.store.complete_attempt(completion, &engine.pipelines()).await?;
    let applied = matches!(outcome, CompletionOutcome::Applied { .. });
    report_completion(engine, outcome).await;
    Ok(applied)
}

async fn report_completion(engine: &Engine, outcome: CompletionOutcome) {
    match outcome {
        CompletionOutcome::Applied { attempt, run, next, stopped } => {
            let labels =
                [("stage", attempt.stage.to_string()), ("status", attempt.status.to_string())];
            metrics::counter!("drover_engine_attempts_finished_total", &labels).increment(1);
            if let (Some(started), Some(finished)) = (attempt.started_at, attempt.finished_at) {
                metrics::histogram!("drover_engine_stage_duration_seconds", "stage" => attempt.stage.to_string())
                    .record(finished.since(started).as_secs_f64());
            }
            tracing::info!(
                run_id = %run.id, stage = %attempt.stage, attempt = attempt.attempt,
                status = %attempt.status, error = attempt.error.as_deref().unwrap_or(""),
                "stage finished"
            );
            for next in &next {
                if next.attempt > 1 {
                    metrics::counter!("drover_engine_retries_total", "stage" => next.stage.to_string()).increment(1);
                }
            }
            if !next.is_empty() {
                engine.dispatch_wanted.notify_one();
            }
            for sibling in stopped {
                let reason = sibling.error.clone().unwrap_or_else(|| "run failed".to_owned());
                engine.stop_attempt(sibling.id, reason).await;
            }
            if run.status.is_terminal() {
                metrics::counter!("drover_engine_runs_finished_total", "status" => run.status.to_string()).increment(1);
                tracing::info!(run_id = %run.id, status = %run.status, "run finished");
            }
        }
        CompletionOutcome::Stale { reason } => {
            metrics::counter!("drover_engine_stale_results_total").increment(1);
            tracing::warn!(%reason, "stale result rejected");
        }
    }
}
