//! Two servers on one PostgreSQL and one Redis (the test's own database and
//! `redis-server`), as replicas behind a load balancer would be: a WebSocket watcher on one
//! sees who watches the same run through the other (joined, left) and
//! `GET /runs/{id}/presence` answers the same on both; an SSE follower on one gets the
//! events of a run submitted through the other; local mode ends on both when the first
//! user is made on one.

use std::time::{Duration, Instant};

use drover_testkit::{PrivateDatabase, PrivateRedis};
use futures::StreamExt;
use serde_json::{Value, json};

mod common;
use common::{Running, start, ws_connect, ws_next_of, ws_send};

async fn replica(dir: &std::path::Path, database: &str, redis: &str) -> Running {
    let mut config = common::config(dir);
    config.workers.embedded = false;
    config.store.url = Some(database.to_owned());
    config.bus.url = redis.to_owned();
    start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_live_events_reach_clients_of_either_replica() {
    let Some(database) = PrivateDatabase::create() else { return };
    let Some(redis) = PrivateRedis::start() else { return };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = replica(dirs[0].path(), &database.url(), &redis.url()).await;
    let b = replica(dirs[1].path(), &database.url(), &redis.url()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let call =
        |base: &str, method: reqwest::Method, path: &str, token: Option<&str>, body: Value| {
            let mut request = http.request(method, format!("{base}/api/v1{path}")).json(&body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            async move {
                let response = request.send().await.unwrap();
                let status = response.status();
                (status.as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
            }
        };

    // The first user, made through A, ends local mode on B too.
    let (status, _) = call(
        &a.url,
        reqwest::Method::POST,
        "/users",
        None,
        json!({ "name": "root", "role": "admin", "password": "correct horse battery" }),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = call(&b.url, reqwest::Method::GET, "/runs", None, Value::Null).await;
    assert_eq!(status, 401, "B still in local mode after A made a user");

    // API tokens live in the shared database: valid on both.
    let (_, login) = call(
        &a.url,
        reqwest::Method::POST,
        "/auth/login",
        None,
        json!({ "user": "root", "password": "correct horse battery" }),
    )
    .await;
    let root = login["access_token"].as_str().unwrap().to_owned();
    let mut tokens = Vec::new();
    for user in ["alice", "bob"] {
        call(&a.url, reqwest::Method::POST, "/users", Some(&root), json!({ "name": user })).await;
        call(
            &a.url,
            reqwest::Method::POST,
            "/projects/default/members",
            Some(&root),
            json!({ "user": user, "role": "member" }),
        )
        .await;
        let (_, token) = call(
            &a.url,
            reqwest::Method::POST,
            "/tokens",
            Some(&root),
            json!({ "name": "t", "user": user }),
        )
        .await;
        tokens.push(token["token"].as_str().unwrap().to_owned());
    }
    let (alice, bob) = (tokens[0].clone(), tokens[1].clone());
    // A login's token is signed with A's key, which B does not have.
    let (status, _) = call(&b.url, reqwest::Method::GET, "/runs", Some(&root), Value::Null).await;
    assert_eq!(status, 401);

    // An SSE follower of B, before a run is submitted through A.
    let follower = http
        .get(format!("{}/api/v1/events?kinds=run", b.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(follower.status(), 200);
    let (status, run) =
        call(&a.url, reqwest::Method::POST, "/runs", Some(&alice), json!({ "request": "shared" }))
            .await;
    assert_eq!(status, 201);
    let run_id = run["id"].as_str().unwrap().to_owned();
    let mut body = follower.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(&run_id) {
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
            .await
            .expect("B streams the run A committed")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("run.queued"), "{seen}");

    // Alice watches the run through A, Bob through B.
    let mut watcher = ws_connect(&a.url, Some(&alice)).await;
    ws_send(&mut watcher, json!({ "type": "subscribe", "id": "w", "run": run_id })).await;
    ws_next_of(&mut watcher, "subscribed").await;
    let presence = |base: String| {
        // An API token: it lives in the shared database (a login's JWT is signed with the
        // key of the server that made it, unless the servers share their key).
        let request = http.get(format!("{base}/api/v1/runs/{run_id}/presence")).bearer_auth(&bob);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap()["users"].clone() }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let users = presence(b.url.clone()).await;
        if users == json!(["alice"]) {
            break;
        }
        assert!(Instant::now() < deadline, "B never learned that alice watches through A: {users}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut other = ws_connect(&b.url, Some(&bob)).await;
    ws_send(&mut other, json!({ "type": "subscribe", "id": "w", "run": run_id })).await;
    ws_next_of(&mut other, "subscribed").await;
    let joined = ws_next_of(&mut watcher, "presence").await;
    assert_eq!((joined["user"].as_str(), joined["action"].as_str()), (Some("bob"), Some("joined")));
    assert_eq!(presence(a.url.clone()).await, json!(["alice", "bob"]));
    assert_eq!(presence(b.url.clone()).await, json!(["alice", "bob"]));

    other.close(None).await.unwrap();
    let left = ws_next_of(&mut watcher, "presence").await;
    assert_eq!((left["user"].as_str(), left["action"].as_str()), (Some("bob"), Some("left")));

    for replica in [a, b] {
        replica.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), replica.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
