//! The process-wide Prometheus recorder every component's `metrics` calls feed.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// The handle of the global recorder, installed on first use. If another recorder was
/// installed first (a host application's), a detached one keeps `/metrics` working.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                // The suffix matcher above is valid, so this cannot fail.
                .expect("latency buckets are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows drover's only"
                );
            }
            handle
        })
        .clone()
}

/// Periodic maintenance the recorder needs (draining histogram buffers).
pub(crate) fn spawn_upkeep(stop: CancellationToken) -> JoinHandle<()> {
    let handle = metrics_handle();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            }
        }
    })
}

/// `drover_queue_depth{agent}`: the tasks waiting on the bus for each agent type the
/// server knows (what a worker autoscaler scales on), read every few seconds when the bus
/// can tell.
pub(crate) fn spawn_queue_gauges(
    engine: std::sync::Arc<drover_engine::Engine>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            for agent in engine.agents().iter() {
                if let Some(depth) = engine.bus().queue_depth(&agent.name).await {
                    #[allow(clippy::cast_precision_loss, reason = "a gauge is a float")]
                    metrics::gauge!("drover_queue_depth", "agent" => agent.name.to_string())
                        .set(depth as f64);
                }
            }
        }
    })
}
