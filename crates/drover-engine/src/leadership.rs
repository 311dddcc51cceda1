//! The leader lease. Several servers may share one database; the loops that must run once
//! across them (the reaper, the reconciler, and in the server webhook sending and event
//! retention) run only on the holder of the store's `leader` lease. Every server asks for
//! it every third of `leader_lease`: the holder renews it, the others take it only once it
//! has lapsed. A holder counts itself leader only while a renewal period is left before
//! the lease would lapse, so it steps down before another can step up; a holder that
//! cannot reach the database stops leading by itself. A clean shutdown gives the lease up
//! so another server takes over at once; a SIGKILL leaves it to lapse.
//!
//! Everything else (dispatching, which claims attempts exclusively, and committing
//! results, which are fenced) runs on every server.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::{Engine, now};

/// The lease's name in the store.
pub const LEADER_LEASE: &str = "leader";

pub(crate) async fn run(engine: Arc<Engine>, shutdown: CancellationToken) {
    let lease = engine.settings.leader_lease;
    let renew_every = lease / 3;
    let holder = engine.settings.instance.clone();
    let mut held_until: Option<Instant> = None;
    loop {
        let asked_at = Instant::now();
        let at = now();
        match engine.store.hold_lease(LEADER_LEASE, &holder, at, at.plus(lease)).await {
            Ok(true) => held_until = Some(asked_at + lease),
            Ok(false) => held_until = None,
            // Not renewed: what was held lapses by itself.
            Err(err) => tracing::warn!(error = %err, "cannot renew the leader lease"),
        }
        let leading = held_until.is_some_and(|until| Instant::now() + renew_every < until);
        engine.leader.send_if_modified(|was| {
            if *was == leading {
                return false;
            }
            if leading {
                tracing::info!(%holder, "this server leads: it reaps, reconciles and sends webhooks");
            } else {
                tracing::warn!(%holder, "this server no longer leads");
            }
            *was = leading;
            true
        });
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(renew_every) => {}
        }
    }
    if engine.leader.send_replace(false)
        && let Err(err) = engine.store.release_lease(LEADER_LEASE, &holder).await
    {
        tracing::warn!(error = %err, "cannot give the leader lease up; it lapses by itself");
    }
}
