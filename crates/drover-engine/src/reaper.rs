//! The reaper: reclaims running attempts whose lease lapsed (the worker died or lost its
//! way) or that ran past their stage's timeout, and tells any worker still holding them to
//! stop. It looks every quarter heartbeat, so with a lease of 1.5 heartbeats a lost stage
//! is retried within two heartbeat intervals.

use std::sync::Arc;

use drover_domain::{Outcome, StageAttempt};
use drover_store::{Completion, StoreError};
use tokio_util::sync::CancellationToken;

use crate::results::commit;
use crate::{Engine, now};

const REAP_BATCH: u32 = 100;

pub(crate) async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    let period = engine.settings.heartbeat_interval / 4;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        if !engine.is_leader() {
            continue;
        }
        if let Err(err) = reap(&engine).await {
            tracing::error!(error = %err, "reaper pass failed");
        }
    }
}

async fn reap(engine: &Engine) -> Result<(), StoreError> {
    let now = now();
    for attempt in engine.store.overdue_attempts(now, REAP_BATCH).await? {
        reclaim(engine, attempt, Outcome::TimedOut, "stage timed out").await?;
    }
    for attempt in engine.store.expired_leases(now, REAP_BATCH).await? {
        reclaim(engine, attempt, Outcome::LeaseExpired, "lease expired").await?;
    }
    Ok(())
}

async fn reclaim(
    engine: &Engine,
    attempt: StageAttempt,
    outcome: Outcome,
    why: &str,
) -> Result<(), StoreError> {
    let completion = Completion {
        attempt_id: attempt.id,
        token: attempt.fencing_token,
        outcome,
        jitter: rand::random::<f64>(),
        now: now(),
    };
    if commit(engine, completion).await? {
        tracing::warn!(run_id = %attempt.run_id, stage = %attempt.stage, attempt = attempt.attempt, worker = ?attempt.worker_id, "{why}; attempt reclaimed");
        metrics::counter!("drover_engine_reclaimed_total", "reason" => why.to_owned()).increment(1);
        engine.stop_attempt(attempt.id, why.to_owned()).await;
    }
    Ok(())
}
