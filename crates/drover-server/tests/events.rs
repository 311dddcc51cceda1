//! `GET /api/v1/events` against the real server: many subscribers each receive every event
//! of a run, in order, exactly once; a subscriber that reconnects with `Last-Event-ID`
//! continues where it stopped, with no gap and no duplicate; filters hold.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_config::{AgentConfig, Config, PipelineConfig, StageConfig};
use drover_server::{Mode, Server};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Subscribers at once.
const SUBSCRIBERS: usize = 200;

/// One SSE event: (id, kind, run id).
type Seen = (i64, String, Option<String>);

/// Reads events from `response` until `done` holds for the last one (or `limit` are read).
async fn read(
    response: reqwest::Response,
    limit: usize,
    done: impl Fn(&Seen) -> bool,
) -> Vec<Seen> {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut seen = Vec::new();
    while seen.len() < limit {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("an event within 30 s")
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
            let entry = (
                id.parse().unwrap(),
                event["kind"].as_str().unwrap().to_owned(),
                event["run_id"].as_str().map(str::to_owned),
            );
            let finished = done(&entry);
            seen.push(entry);
            if finished || seen.len() >= limit {
                return seen;
            }
        }
    }
    seen
}

#[tokio::test]
async fn every_subscriber_gets_every_event_once_in_order_and_resumes_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.enabled = false;
    config.agents = BTreeMap::from([(
        "quick".to_owned(),
        AgentConfig {
            command: Some("sh".into()),
            args: Some(vec!["-c".into(), "echo working".into()]),
            ..AgentConfig::default()
        },
    )]);
    let stage = |name: &str| StageConfig {
        name: name.into(),
        agent: Some("quick".into()),
        ..StageConfig::default()
    };
    config.pipelines = BTreeMap::from([(
        "three".to_owned(),
        PipelineConfig {
            stages: vec![stage("a"), stage("b"), stage("c")],
            ..PipelineConfig::default()
        },
    )]);
    let server = Server::build(config, Mode::Full).await.unwrap();
    let url = server.url();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let bad = http.get(format!("{url}/api/v1/events?kinds=nonsense")).send().await.unwrap();
    assert_eq!(bad.status(), 422);

    // Every subscriber is connected (its response headers arrived) before the run starts.
    let mut subscribers = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let response =
            http.get(format!("{url}/api/v1/events?kinds=run,stage")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        subscribers.push(response);
    }
    let run: Value = http
        .post(format!("{url}/api/v1/runs"))
        .json(&json!({ "request": "events", "pipeline": "three" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = run["id"].as_str().unwrap().to_owned();
    let ends = |seen: &Seen| seen.1 == "run.succeeded" || seen.1 == "run.failed";
    let readers: Vec<_> =
        subscribers.into_iter().map(|response| tokio::spawn(read(response, 1000, ends))).collect();
    let mut all = Vec::new();
    for reader in readers {
        all.push(reader.await.unwrap());
    }
    let reference = &all[0];
    assert_eq!(reference.last().unwrap().1, "run.succeeded", "{reference:?}");
    assert!(reference.iter().all(|(_, kind, run)| {
        (kind.starts_with("run.") || kind.starts_with("stage."))
            && run.as_deref() == Some(run_id.as_str())
    }));
    let ids: Vec<i64> = reference.iter().map(|e| e.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order, once each: {ids:?}");
    // a, b, c each pending → dispatched → running → succeeded, plus the run's own.
    assert!(ids.len() >= 12, "{reference:?}");
    for (n, seen) in all.iter().enumerate() {
        assert_eq!(seen, reference, "subscriber {n} saw something else");
    }

    // The same history, read in two halves across a reconnect.
    let full =
        http.get(format!("{url}/api/v1/events?kinds=run,stage&run={run_id}")).send().await.unwrap();
    let first = read(full, ids.len() / 2, |_| false).await;
    let resumed = http
        .get(format!("{url}/api/v1/events?kinds=run,stage&run={run_id}"))
        .header("last-event-id", first.last().unwrap().0.to_string())
        .send()
        .await
        .unwrap();
    let rest = read(resumed, 1000, ends).await;
    let joined: Vec<Seen> = first.into_iter().chain(rest).collect();
    assert_eq!(&joined, reference, "no gap, no duplicate across the reconnect");

    // Filters: one kind only; another run's id shows nothing of this one.
    let only =
        http.get(format!("{url}/api/v1/events?kinds=run.succeeded&after=0")).send().await.unwrap();
    let only = read(only, 1, |_| true).await;
    assert_eq!(only[0].1, "run.succeeded");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap().unwrap();
}
