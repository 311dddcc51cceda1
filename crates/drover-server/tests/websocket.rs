//! `GET /api/v1/ws` against the real server: many WebSocket subscribers each receive every
//! event of a run in order exactly once; presence shows who watches a run, with joined and
//! left messages to the other watchers; a client that does not read is dropped with close
//! code 4008 instead of growing the server's memory.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_config::{Config, PipelineConfig, StageConfig};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

mod common;
use common::{quick_agent, start, ws_connect, ws_next, ws_send};

const SUBSCRIBERS: usize = 100;

fn server_config(data_dir: &std::path::Path) -> Config {
    let mut config = common::config(data_dir);
    common::room_for_many_runs(&mut config);
    config.auth.rate_limit_per_minute = 1_000_000;
    config.auth.ip_rate_limit_per_minute = 1_000_000;
    config.agents = BTreeMap::from([quick_agent()]);
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
    config
}

#[tokio::test]
async fn every_websocket_subscriber_gets_every_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(server_config(dir.path())).await;
    let url = server.url.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let mut sockets = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let mut socket = ws_connect(&url, None).await;
        ws_send(
            &mut socket,
            json!({ "type": "subscribe", "id": "all", "kinds": ["run", "stage"] }),
        )
        .await;
        assert_eq!(ws_next(&mut socket).await, json!({ "type": "subscribed", "id": "all" }));
        sockets.push(socket);
    }
    let mut bad = ws_connect(&url, None).await;
    ws_send(&mut bad, json!({ "type": "subscribe", "id": "x", "kinds": ["nonsense"] })).await;
    assert_eq!(ws_next(&mut bad).await["type"], "error");
    ws_send(&mut bad, json!({ "type": "shout" })).await;
    assert_eq!(
        ws_next(&mut bad).await["type"],
        "error",
        "an unknown message is answered, not fatal"
    );

    let run: Value = http
        .post(format!("{url}/api/v1/runs"))
        .json(&json!({ "request": "ws", "pipeline": "three" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = run["id"].as_str().unwrap().to_owned();
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let frame = ws_next(&mut socket).await;
                    assert_eq!(frame["type"], "event", "{frame}");
                    let event = &frame["event"];
                    seen.push((
                        event["seq"].as_i64().unwrap(),
                        event["kind"].as_str().unwrap().to_owned(),
                    ));
                    if event["kind"] == "run.succeeded" || event["kind"] == "run.failed" {
                        return (seen, event["run_id"].as_str().unwrap().to_owned());
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for reader in readers {
        let (seen, finished) = reader.await.unwrap();
        assert_eq!(finished, run_id);
        all.push(seen);
    }
    let reference = &all[0];
    assert_eq!(reference.last().unwrap().1, "run.succeeded");
    assert!(reference.windows(2).all(|w| w[0].0 < w[1].0), "in order, once each: {reference:?}");
    assert!(reference.len() >= 12);
    assert!(all.iter().all(|seen| seen == reference), "every subscriber saw the same events");

    server.stop().await;
}

#[tokio::test]
async fn presence_shows_who_watches_a_run_and_tells_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config(dir.path());
    config.workers.embedded = false;
    let server = start(config).await;
    let url = server.url.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = |method: reqwest::Method, path: &str, token: Option<&str>, body: Value| {
        let mut request = http.request(method, format!("{url}/api/v1{path}")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    call(
        reqwest::Method::POST,
        "/users",
        None,
        json!({ "name": "root", "role": "admin", "password": "correct horse battery" }),
    )
    .await;
    let root = call(
        reqwest::Method::POST,
        "/auth/login",
        None,
        json!({ "user": "root", "password": "correct horse battery" }),
    )
    .await;
    let root = root["access_token"].as_str().unwrap().to_owned();
    let mut tokens = Vec::new();
    for user in ["alice", "bob"] {
        call(reqwest::Method::POST, "/users", Some(&root), json!({ "name": user })).await;
        call(
            reqwest::Method::POST,
            "/projects/default/members",
            Some(&root),
            json!({ "user": user, "role": "member" }),
        )
        .await;
        let token = call(
            reqwest::Method::POST,
            "/tokens",
            Some(&root),
            json!({ "name": "t", "user": user }),
        )
        .await;
        tokens.push(token["token"].as_str().unwrap().to_owned());
    }
    let (alice, bob) = (tokens[0].clone(), tokens[1].clone());
    let run =
        call(reqwest::Method::POST, "/runs", Some(&alice), json!({ "request": "watched" })).await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    let presence = |token: String| {
        let request = http.get(format!("{url}/api/v1/runs/{run_id}/presence")).bearer_auth(token);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap()["users"].clone() }
    };

    let mut watcher = ws_connect(&url, Some(&alice)).await;
    ws_send(&mut watcher, json!({ "type": "subscribe", "id": "w", "run": run_id, "after": 0 }))
        .await;
    assert_eq!(ws_next(&mut watcher).await["type"], "subscribed");
    // Its history first (replayed from `after`).
    assert_eq!(ws_next(&mut watcher).await["event"]["kind"], "run.queued");
    assert_eq!(presence(alice.clone()).await, json!(["alice"]));

    let mut other = ws_connect(&url, Some(&bob)).await;
    ws_send(&mut other, json!({ "type": "subscribe", "id": "w", "run": run_id })).await;
    assert_eq!(ws_next(&mut other).await["type"], "subscribed");
    assert_eq!(presence(bob.clone()).await, json!(["alice", "bob"]));
    let joined = loop {
        let frame = ws_next(&mut watcher).await;
        if frame["type"] == "presence" {
            break frame;
        }
    };
    assert_eq!((joined["user"].as_str(), joined["action"].as_str()), (Some("bob"), Some("joined")));
    assert_eq!(joined["run"], run_id);

    other.close(None).await.unwrap();
    let left = loop {
        let frame = ws_next(&mut watcher).await;
        if frame["type"] == "presence" {
            break frame;
        }
    };
    assert_eq!((left["user"].as_str(), left["action"].as_str()), (Some("bob"), Some("left")));
    assert_eq!(presence(alice.clone()).await, json!(["alice"]));

    // Without a credential the upgrade is refused.
    let anonymous =
        format!("{}/api/v1/ws", url.replace("http://", "ws://")).into_client_request().unwrap();
    assert!(tokio_tungstenite::connect_async(anonymous).await.is_err());

    server.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_is_dropped_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config(dir.path());
    config.workers.embedded = false;
    let server = start(config).await;
    let url = server.url.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let mut slow = ws_connect(&url, None).await;
    // Sixty subscriptions to everything: each event is sent sixty times.
    for n in 0..60 {
        ws_send(&mut slow, json!({ "type": "subscribe", "id": format!("s{n}") })).await;
    }
    // Big events (a long request is in the run's first event), and the client reads none.
    let request = "x".repeat(3_900);
    for _ in 0..150 {
        let response = http
            .post(format!("{url}/api/v1/runs"))
            .json(&json!({ "request": request }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    // 150 runs × 60 × 4 KB is far more than the queue and the sockets hold.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut closed = None;
    let mut frames = 0usize;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match frame {
            Ok(Message::Close(frame)) => {
                closed = frame;
                break;
            }
            Ok(_) => frames += 1,
            Err(_) => break,
        }
    }
    let runs = 150;
    assert!(frames < runs * 60 * 2, "it got everything ({frames} frames): nothing was slow");
    let closed = closed.unwrap_or_else(|| panic!("still open after {runs} runs"));
    assert_eq!(u16::from(closed.code), 4008, "{closed:?}");
    assert!(closed.reason.contains("too slow"));
    // The server goes on serving others.
    let health = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    server.stop().await;
}
