//! The reconciler: the store is the source of truth, the broker only a carrier. Attempts
//! the store says are dispatched, that no worker started for a while, are checked with the
//! broker; those it no longer holds (Redis restarted without persistence, a stream purged,
//! a message dropped after too many deliveries) are published again. Nothing waits forever.
//! It also marks workers that stopped heartbeating as lost.

use std::sync::Arc;

use drover_store::StoreError;
use tokio_util::sync::CancellationToken;

use crate::dispatcher::envelopes;
use crate::{Engine, now};

const RECONCILE_BATCH: u32 = 200;

pub(crate) async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    let period = (engine.settings.redispatch_after / 4).max(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        if !engine.is_leader() {
            continue;
        }
        if let Err(err) = reconcile(&engine).await {
            tracing::error!(error = %err, "reconciliation pass failed");
        }
        let silent_since = now().minus(engine.settings.worker_liveness);
        match engine.store.mark_lost_workers(silent_since, now()).await {
            Ok(0) => {}
            Ok(lost) => tracing::warn!(lost, "workers stopped heartbeating"),
            Err(err) => tracing::error!(error = %err, "cannot mark lost workers"),
        }
    }
}

async fn reconcile(engine: &Engine) -> Result<(), StoreError> {
    let cutoff = now().minus(engine.settings.redispatch_after);
    let stale = engine.store.stale_dispatched(cutoff, RECONCILE_BATCH).await?;
    if stale.is_empty() {
        return Ok(());
    }
    let mut lost = Vec::new();
    for attempt in stale {
        let held = match &attempt.bus_message_id {
            Some(id) => {
                engine.bus.task_pending(&attempt.agent, &drover_bus::MessageId(id.clone())).await
            }
            None => Ok(false),
        };
        match held {
            // Still queued: it waits for a worker of its agent type.
            Ok(true) => {}
            Ok(false) => lost.push(attempt),
            Err(err) => {
                tracing::warn!(attempt_id = %attempt.id, error = %err, "cannot ask the broker; will retry");
            }
        }
    }
    if lost.is_empty() {
        return Ok(());
    }
    for (attempt, envelope) in lost.iter().zip(envelopes(engine, &lost).await?) {
        match engine.bus.publish_task(&envelope).await {
            Ok(message_id) => {
                if engine.store.record_redispatch(attempt.id, &message_id.0, now()).await? {
                    metrics::counter!("drover_engine_republished_total", "agent" => attempt.agent.to_string()).increment(1);
                    tracing::warn!(
                        run_id = %attempt.run_id, stage = %attempt.stage, attempt = attempt.attempt,
                        "the broker lost a dispatched task; published it again"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(attempt_id = %attempt.id, error = %err, "republishing failed; will retry");
            }
        }
    }
    Ok(())
}
