//! `drover bench events`: delivery latency of the event log to many live subscribers.
//!
//! A server runs in-process on a temporary data directory (no workers: runs only queue).
//! `subscribers` clients follow `GET /api/v1/events?kinds=run.queued` over real HTTP
//! connections; then `runs` runs are submitted one every `interval`. Each run's request
//! names it, and the bench notes the instant just before submitting it; a subscriber that
//! receives the run's `run.queued` event records now − that instant. So a figure covers the
//! submit request, the commit, the fan-out and the SSE write: what a watcher waits for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_config::Config;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{Mode, Server, ServerError};

#[derive(Debug, Clone)]
pub struct EventsBenchOptions {
    pub subscribers: usize,
    pub runs: usize,
    pub interval: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventsBenchReport {
    pub subscribers: usize,
    pub runs: usize,
    /// Deliveries expected (subscribers × runs) and made.
    pub expected: usize,
    pub delivered: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

type Submitted = Arc<Mutex<HashMap<String, Instant>>>;

pub async fn bench_events(options: EventsBenchOptions) -> Result<EventsBenchReport, ServerError> {
    let dir = tempfile_dir()?;
    let mut config = Config { data_dir: dir.clone(), ..Config::default() };
    config.server.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.proxy.enabled = false;
    config.workers.embedded = false;
    config.auth.rate_limit_per_minute = u32::MAX / 2;
    config.auth.ip_rate_limit_per_minute = u32::MAX / 2;
    let server = Server::build(config, Mode::Full).await?;
    let url = server.url();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(options.subscribers + 8)
        .build()
        .map_err(|err| ServerError::Config(format!("HTTP client: {err}")))?;

    let submitted: Submitted = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> =
        Arc::new(Mutex::new(Vec::with_capacity(options.subscribers * options.runs)));
    let mut readers = Vec::with_capacity(options.subscribers);
    for _ in 0..options.subscribers {
        let response = http
            .get(format!("{url}/api/v1/events?kinds=run.queued"))
            .send()
            .await
            .map_err(|err| ServerError::Config(format!("subscribing: {err}")))?;
        readers.push(tokio::spawn(follow(
            response,
            options.runs,
            submitted.clone(),
            latencies.clone(),
        )));
    }
    for n in 0..options.runs {
        let request = format!("bench events {n}");
        submitted.lock().unwrap_or_else(|p| p.into_inner()).insert(request.clone(), Instant::now());
        let created = http
            .post(format!("{url}/api/v1/runs"))
            .json(&serde_json::json!({ "request": request }))
            .send()
            .await
            .map_err(|err| ServerError::Config(format!("submitting: {err}")))?;
        if !created.status().is_success() {
            return Err(ServerError::Config(format!("submitting answered {}", created.status())));
        }
        tokio::time::sleep(options.interval).await;
    }
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    let _ = std::fs::remove_dir_all(&dir);

    let mut all = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    all.sort_by(f64::total_cmp);
    Ok(EventsBenchReport {
        subscribers: options.subscribers,
        runs: options.runs,
        expected: options.subscribers * options.runs,
        delivered: all.len(),
        p50_ms: super::percentile(&all, 0.50),
        p99_ms: super::percentile(&all, 0.99),
        max_ms: all.last().copied().unwrap_or(0.0),
    })
}

/// Reads one subscriber's stream until it saw `runs` events.
async fn follow(
    response: reqwest::Response,
    runs: usize,
    submitted: Submitted,
    latencies: Arc<Mutex<Vec<f64>>>,
) {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut seen = 0;
    while seen < runs {
        let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(30), body.next()).await
        else {
            return;
        };
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|line| line.strip_prefix("data:")) else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(data.trim()) else {
                continue;
            };
            let Some(request) = event.pointer("/payload/request").and_then(|r| r.as_str()) else {
                continue;
            };
            let started = submitted.lock().unwrap_or_else(|p| p.into_inner()).get(request).copied();
            if let Some(started) = started {
                let ms = now.duration_since(started).as_secs_f64() * 1000.0;
                latencies.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                seen += 1;
            }
        }
    }
}

fn tempfile_dir() -> Result<std::path::PathBuf, ServerError> {
    let dir = std::env::temp_dir().join(format!("drover-bench-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| ServerError::DataDir {
        path: dir.display().to_string(),
        message: err.to_string(),
    })?;
    Ok(dir)
}
