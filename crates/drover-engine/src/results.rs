//! The results loop: commits what workers report. Every write is fenced by the attempt's
//! token inside the store, so a duplicate or late message changes nothing; such messages
//! are counted and, when a worker still holds an attempt it should not, it is told to stop.

use std::sync::Arc;
use std::time::Duration;

use drover_bus::{AgentResult, WorkerMessage};
use drover_domain::Outcome;
use drover_store::{Completion, CompletionOutcome, StartAttempt, StartOutcome, StoreError};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Engine, now};

/// Attempts at a store write before a message is given up (its attempt is then reclaimed
/// by the reaper when the lease runs out).
const STORE_ATTEMPTS: u32 = 3;

pub(crate) async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut messages = match engine.bus.consume_results(&engine.settings.instance).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::error!(error = %err, "cannot consume worker results");
            return;
        }
    };
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return,
            delivery = messages.next() => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        let message = &delivery.message;
        let mut tries = 0;
        loop {
            tries += 1;
            match handle(&engine, message).await {
                Ok(()) => break,
                Err(err) if tries < STORE_ATTEMPTS => {
                    tracing::warn!(error = %err, tries, "handling a worker message failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(tries))).await;
                }
                Err(err) => {
                    tracing::error!(error = %err, attempt_id = ?message.attempt_id(), "worker message dropped");
                    break;
                }
            }
        }
        // Handled (or given up on: its attempt is then reclaimed when the lease lapses).
        delivery.handle.ack().await;
    }
}

async fn handle(engine: &Engine, message: &WorkerMessage) -> Result<(), StoreError> {
    match message {
        WorkerMessage::Started { attempt_id, token, worker_id } => {
            let now = now();
            let start = StartAttempt {
                attempt_id: *attempt_id,
                token: *token,
                worker_id: worker_id.clone(),
                lease_until: now.plus(engine.settings.lease_duration),
                now,
            };
            match engine.store.start_attempt(start, &engine.pipelines).await? {
                StartOutcome::Started(attempt) => {
                    tracing::info!(run_id = %attempt.run_id, stage = %attempt.stage, attempt = attempt.attempt, %worker_id, "stage running");
                }
                StartOutcome::Rejected { reason } => {
                    tracing::info!(%attempt_id, %reason, "start rejected; telling the worker to stop");
                    engine.stop_attempt(*attempt_id, reason).await;
                }
            }
        }
        WorkerMessage::Heartbeat { attempt_id, token, .. } => {
            let lease_until = now().plus(engine.settings.lease_duration);
            if !engine.store.renew_lease(*attempt_id, *token, lease_until).await? {
                engine.stop_attempt(*attempt_id, "the attempt is no longer yours".into()).await;
            }
        }
        WorkerMessage::Finished { attempt_id, token, result, .. } => {
            let outcome = match result {
                AgentResult::Succeeded { output } => Outcome::Succeeded { output: output.clone() },
                AgentResult::Failed { error, retryable } => {
                    Outcome::Failed { error: error.clone(), retryable: *retryable }
                }
            };
            let completion = Completion {
                attempt_id: *attempt_id,
                token: *token,
                outcome,
                jitter: rand::random::<f64>(),
                now: now(),
            };
            commit(engine, completion).await?;
        }
        WorkerMessage::Released { attempt_id, token, .. } => {
            if engine.store.release_attempt(*attempt_id, *token, now()).await? {
                tracing::info!(%attempt_id, "attempt handed back");
                engine.dispatch_wanted.notify_one();
            }
        }
        WorkerMessage::Alive { worker_id, profile } => {
            engine.store.worker_seen(worker_id, profile, now()).await?;
        }
        WorkerMessage::Gone { worker_id } => {
            engine.store.worker_gone(worker_id, now()).await?;
            tracing::info!(%worker_id, "worker left");
        }
    }
    Ok(())
}

/// Commits an attempt's end and reports what happened. Shared with the reaper.
pub(crate) async fn commit(engine: &Engine, completion: Completion) -> Result<bool, StoreError> {
    let attempt_id = completion.attempt_id;
    match engine.store.complete_attempt(completion, &engine.pipelines).await? {
        CompletionOutcome::Applied { attempt, run, next } => {
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
            if let Some(next) = next {
                if next.attempt > 1 {
                    metrics::counter!("drover_engine_retries_total", "stage" => next.stage.to_string()).increment(1);
                }
                engine.dispatch_wanted.notify_one();
            }
            if run.status.is_terminal() {
                metrics::counter!("drover_engine_runs_finished_total", "status" => run.status.to_string()).increment(1);
                tracing::info!(run_id = %run.id, status = %run.status, "run finished");
            }
            Ok(true)
        }
        CompletionOutcome::Stale { reason } => {
            metrics::counter!("drover_engine_stale_results_total").increment(1);
            tracing::warn!(%attempt_id, %reason, "stale result rejected");
            Ok(false)
        }
    }
}
