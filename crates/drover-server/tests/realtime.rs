//! The real-time promise at full size, all on one server at once: 500 SSE subscribers and
//! 200 WebSocket subscribers each receive every event of a run in order, exactly once — a
//! hundred of the SSE subscribers drop their connection halfway and come back with
//! `Last-Event-ID` — while a WebSocket client that reads nothing, subscribed sixty times to
//! everything, is flooded, dropped with close code 4008, and the server's memory stays
//! flat. Alone in its file so that the process's memory is this test's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drover_config::{Config, PipelineConfig, StageConfig};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{Socket, quick_agent, start, ws_connect, ws_next, ws_next_within, ws_send};

const SSE_SUBSCRIBERS: usize = 500;
const WS_SUBSCRIBERS: usize = 200;
/// SSE subscribers that reconnect halfway.
const RECONNECTING: usize = 100;
/// Events a reconnecting subscriber reads before it drops the connection.
const BEFORE_RECONNECT: usize = 8;
/// Gated runs submitted to flood the slow client.
const FLOOD_RUNS: usize = 250;
/// What the server's memory may grow by while the slow client is flooded: the flood
/// would put some 60 MB (250 runs × 60 copies × 4 KB) in an unbounded queue.
const FLAT_BYTES: u64 = 32 * 1024 * 1024;

/// (seq, kind) of one event.
type Seen = (i64, String);

fn config(data_dir: &std::path::Path) -> Config {
    let mut config = common::config(data_dir);
    common::room_for_many_runs(&mut config);
    config.auth.rate_limit_per_minute = 1_000_000;
    config.auth.ip_rate_limit_per_minute = 1_000_000;
    config.agents = BTreeMap::from([quick_agent()]);
    let stage = |name: &str, approval: bool| StageConfig {
        name: name.into(),
        agent: Some("quick".into()),
        approval: Some(approval),
        ..StageConfig::default()
    };
    config.pipelines = BTreeMap::from([
        (
            "four".to_owned(),
            PipelineConfig {
                stages: vec![
                    stage("a", false),
                    stage("b", false),
                    stage("c", false),
                    stage("d", false),
                ],
                ..PipelineConfig::default()
            },
        ),
        // Its runs wait for an approval: events without work.
        (
            "gated".to_owned(),
            PipelineConfig { stages: vec![stage("wait", true)], ..PipelineConfig::default() },
        ),
    ]);
    config
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn ends(kind: &str) -> bool {
    matches!(kind, "run.succeeded" | "run.failed" | "run.cancelled")
}

/// Reads SSE events until the run ends, or `limit` are read.
async fn read_sse(response: reqwest::Response, limit: usize) -> Vec<Seen> {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut seen = Vec::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), body.next())
            .await
            .expect("an event within 60 s")
            .expect("the stream stays open")
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                block.lines().find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            let (Some(id), Some(data)) = (field("id:"), field("data:")) else { continue };
            let event: Value = serde_json::from_str(&data).unwrap();
            let kind = event["kind"].as_str().unwrap().to_owned();
            let done = ends(&kind);
            seen.push((id.parse().unwrap(), kind));
            if done || seen.len() >= limit {
                return seen;
            }
        }
    }
}

async fn read_ws(mut socket: Socket) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let frame = ws_next_within(&mut socket, Duration::from_secs(60)).await;
        assert_eq!(frame["type"], "event", "{frame}");
        let kind = frame["event"]["kind"].as_str().unwrap().to_owned();
        seen.push((frame["event"]["seq"].as_i64().unwrap(), kind.clone()));
        if ends(&kind) {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_hundred_subscribers_see_every_event_once_in_order_and_a_slow_one_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let url = server.url.clone();
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();

    // The slow client: sixty subscriptions to everything, and it never reads again.
    let mut slow = ws_connect(&url, None).await;
    for n in 0..60 {
        ws_send(&mut slow, json!({ "type": "subscribe", "id": format!("s{n}") })).await;
    }

    // Everyone is connected (headers, or a `subscribed` answer) before the run starts.
    let mut sse = Vec::with_capacity(SSE_SUBSCRIBERS);
    for _ in 0..SSE_SUBSCRIBERS {
        let response =
            http.get(format!("{url}/api/v1/events?kinds=run,stage")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        sse.push(response);
    }
    let mut sockets = Vec::with_capacity(WS_SUBSCRIBERS);
    for _ in 0..WS_SUBSCRIBERS {
        let mut socket = ws_connect(&url, None).await;
        ws_send(
            &mut socket,
            json!({ "type": "subscribe", "id": "all", "kinds": ["run", "stage"] }),
        )
        .await;
        assert_eq!(ws_next(&mut socket).await, json!({ "type": "subscribed", "id": "all" }));
        sockets.push(socket);
    }
    let started = Instant::now();

    let run: Value = http
        .post(format!("{url}/api/v1/runs"))
        .json(&json!({ "request": "real time", "pipeline": "four" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = run["id"].as_str().unwrap().to_owned();

    let mut sse_readers = Vec::with_capacity(SSE_SUBSCRIBERS);
    for (n, response) in sse.into_iter().enumerate() {
        let (http, url) = (http.clone(), url.clone());
        sse_readers.push(tokio::spawn(async move {
            if n >= RECONNECTING {
                return read_sse(response, usize::MAX).await;
            }
            // Halfway, the connection drops; the subscriber comes back where it was.
            let mut first = read_sse(response, BEFORE_RECONNECT).await;
            let last = first.last().unwrap();
            if ends(&last.1) {
                return first;
            }
            let resumed = http
                .get(format!("{url}/api/v1/events?kinds=run,stage"))
                .header("last-event-id", last.0.to_string())
                .send()
                .await
                .unwrap();
            first.extend(read_sse(resumed, usize::MAX).await);
            first
        }));
    }
    let ws_readers: Vec<_> =
        sockets.into_iter().map(|socket| tokio::spawn(read_ws(socket))).collect();

    let mut all = Vec::with_capacity(SSE_SUBSCRIBERS + WS_SUBSCRIBERS);
    for reader in sse_readers.into_iter().chain(ws_readers) {
        all.push(reader.await.unwrap());
    }
    let delivered_in = started.elapsed();
    let reference = &all[0];
    assert_eq!(reference.last().unwrap().1, "run.succeeded", "{reference:?}");
    assert!(reference.windows(2).all(|w| w[0].0 < w[1].0), "in order, once each: {reference:?}");
    // Four stages, each pending → dispatched → running → succeeded, and the run's own.
    assert!(reference.len() >= 16, "{reference:?}");
    for (n, seen) in all.iter().enumerate() {
        let kind = if n < SSE_SUBSCRIBERS { "SSE" } else { "WebSocket" };
        assert_eq!(seen, reference, "{kind} subscriber {n} saw something else");
    }
    let run: Value =
        http.get(format!("{url}/api/v1/runs/{run_id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(run["status"], "succeeded");
    eprintln!(
        "{} events to {} subscribers in {delivered_in:?}",
        reference.len(),
        SSE_SUBSCRIBERS + WS_SUBSCRIBERS
    );

    // The flood: big events (a long request is in each run's first event), sixty copies of
    // each for the slow client. Memory is sampled throughout.
    let baseline = resident_bytes();
    let request = "x".repeat(3_900);
    let mut peak = baseline;
    for _ in 0..FLOOD_RUNS {
        let response = http
            .post(format!("{url}/api/v1/runs"))
            .json(&json!({ "request": request, "pipeline": "gated" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        peak = peak.max(resident_bytes());
    }
    // Still not reading, for longer than the server waits on a full queue.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(resident_bytes());
    }
    let mut closed = None;
    let mut frames = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                closed = frame;
                break;
            }
            Ok(Some(Ok(_))) => frames += 1,
            _ => break,
        }
    }
    let closed = closed.unwrap_or_else(|| panic!("the slow client is still connected"));
    assert_eq!(u16::from(closed.code), 4008, "{closed:?}");
    assert!(closed.reason.contains("too slow"), "{closed:?}");
    assert!(frames < FLOOD_RUNS * 60, "it got everything ({frames} frames): nothing was slow");
    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "resident memory: {} MiB before the flood, grew by at most {} KiB",
        baseline / (1024 * 1024),
        grew / 1024
    );
    assert!(grew < FLAT_BYTES, "memory grew by {grew} bytes while a client did not read");

    // And the server goes on serving.
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    server.stop().await;
}
