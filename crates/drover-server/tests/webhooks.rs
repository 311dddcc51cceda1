//! Webhooks against the real server and real local receivers (axum on port 0). Each
//! receiver verifies the Standard Webhooks signature of every request with its own
//! HMAC-SHA256 (not drover's code) and records what came. A receiver answering 500 twice
//! sees the same `webhook-id` three times with later timestamps, and the delivery log says
//! succeeded after 3 attempts; a redelivery comes again under the same id; a receiver that
//! always fails gets its endpoint disabled after `disable_after_failures`, with a
//! `webhook.disabled` event in the event log; an endpoint for `run.succeeded` gets only
//! that; another project's user cannot see or touch an endpoint.
//!
//! Signing secrets are stored sealed (the database row and file hold no plaintext, an
//! older database's plaintext is sealed at start), deliveries verify with the secret shown
//! at creation before and after `rotate-key`; beyond local mode, targets on this machine
//! or a private network are refused when an endpoint is made and when a delivery is sent,
//! unless `[webhooks] allow_private_targets`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use drover_config::{Config, PipelineConfig, StageConfig};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};

mod common;
use common::{quick_agent, start};

/// A server with tiny retry delays (1.5 s then 2 s, so each attempt's whole-second
/// timestamp is later than the last), disabling after 3 failures in a row, and a
/// one-stage pipeline `one` whose agent just echoes.
fn config(data_dir: &Path, workers: bool) -> Config {
    let mut config = common::config(data_dir);
    config.workers.embedded = workers;
    let hooks = &mut config.webhooks;
    hooks.retry_initial = Duration::from_millis(1500);
    hooks.retry_max = Duration::from_secs(2);
    hooks.give_up_after = Duration::from_secs(120);
    hooks.disable_after_failures = 3;
    hooks.breaker_after_failures = 10;
    hooks.poll_interval = Duration::from_millis(100);
    hooks.request_timeout = Duration::from_secs(5);
    config.agents = BTreeMap::from([quick_agent()]);
    config.pipelines = BTreeMap::from([(
        "one".to_owned(),
        PipelineConfig {
            stages: vec![StageConfig {
                name: "only".into(),
                agent: Some("quick".into()),
                ..StageConfig::default()
            }],
            ..PipelineConfig::default()
        },
    )]);
    config
}

struct Http {
    http: reqwest::Client,
    url: String,
}

impl Http {
    fn new(url: &str) -> Self {
        Self { http: reqwest::Client::builder().no_proxy().build().unwrap(), url: url.to_owned() }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        project: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}/api/v1{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(project) = project {
            request = request.header("x-drover-project", project);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn ok(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Value {
        let (status, value) = self.call(method.clone(), path, token, None, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {value}");
        value
    }
}

/// What a receiver does with a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// 200.
    Accept,
    /// 500 to the first two attempts of each `webhook-id`, then 200.
    FailTwice,
    /// Always 500.
    Fail,
}

/// One request as a receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: i64,
    body: Value,
    raw: String,
    verified: bool,
}

#[derive(Clone)]
struct Receiver {
    behaviour: Behaviour,
    secret: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    fn set_secret(&self, secret: &str) {
        *self.secret.lock().unwrap() = secret.to_owned();
    }
}

/// Checks a Standard Webhooks signature from first principles: HMAC-SHA256 keyed with the
/// base64-decoded part of `whsec_…`, over `id.timestamp.body`, base64, after `v1,`.
fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(key) = secret.strip_prefix("whsec_").and_then(|k| STANDARD.decode(k).ok()) else {
        return false;
    };
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    header.split(' ').any(|candidate| candidate == expected)
}

async fn receive(State(rx): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (id, timestamp, signature) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let secret = rx.secret.lock().unwrap().clone();
    let verified = header("content-type") == "application/json"
        && verify(&secret, &id, &timestamp, &body, &signature);
    let raw = String::from_utf8_lossy(&body).into_owned();
    let received = Received {
        id: id.clone(),
        timestamp: timestamp.parse().unwrap_or(-1),
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
        verified,
    };
    let attempts = {
        let mut seen = rx.seen.lock().unwrap();
        seen.push(received);
        seen.iter().filter(|r| r.id == id).count()
    };
    if !verified {
        return StatusCode::UNAUTHORIZED;
    }
    match rx.behaviour {
        Behaviour::Accept => StatusCode::OK,
        Behaviour::FailTwice if attempts > 2 => StatusCode::OK,
        Behaviour::FailTwice | Behaviour::Fail => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A receiver on a free loopback port; its URL.
async fn receiver(behaviour: Behaviour) -> (Receiver, String) {
    let rx = Receiver {
        behaviour,
        secret: Arc::new(Mutex::new(String::new())),
        seen: Arc::new(Mutex::new(Vec::new())),
    };
    let app =
        axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (rx, format!("http://{addr}/hook?token=t0ps3cret"))
}

/// Polls `check` every 100 ms until it gives a value, for at most `seconds`.
async fn wait_for<T>(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates an endpoint; returns its id, after handing the receiver its secret.
async fn create(
    http: &Http,
    token: Option<&str>,
    rx: &Receiver,
    url: &str,
    kinds: Value,
) -> String {
    let created = http
        .ok(
            Method::POST,
            "/webhooks",
            token,
            Some(json!({ "url": url, "kinds": kinds, "description": "test receiver" })),
        )
        .await;
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{created}");
    rx.set_secret(secret);
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn deliveries_are_signed_retried_under_one_id_logged_and_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(&dir.path().join("data"), false)).await;
    let http = Http::new(&server.url);
    let (rx, url) = receiver(Behaviour::FailTwice).await;
    let id = create(&http, None, &rx, &url, json!(["run.queued"])).await;

    // The secret is shown once: never in a read, a list or the audit log.
    let shown = http.ok(Method::GET, &format!("/webhooks/{id}"), None, None).await;
    assert!(shown.get("secret").is_none(), "{shown}");
    assert_eq!(shown["kinds"], json!(["run.queued"]));
    assert_eq!(
        (shown["enabled"].as_bool(), shown["url"].as_str()),
        (Some(true), Some(url.as_str()))
    );
    let listed = http.ok(Method::GET, "/webhooks", None, None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(!listed.to_string().contains("whsec_"), "{listed}");

    // An event: the run is queued (no workers, so it stays so).
    let run = http.ok(Method::POST, "/runs", None, Some(json!({ "request": "hook me" }))).await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    let seen = wait_for(30, "three attempts", async || {
        let seen = rx.seen();
        (seen.len() >= 3).then_some(seen)
    })
    .await;
    assert!(seen.iter().all(|r| r.verified), "every request is signed right: {seen:?}");
    assert!(seen.iter().all(|r| r.id == seen[0].id), "one webhook-id for all attempts: {seen:?}");
    let stamps: Vec<i64> = seen.iter().map(|r| r.timestamp).collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "later timestamps: {stamps:?}");
    assert!(seen.iter().all(|r| r.raw == seen[0].raw), "the same body each time");
    let body = &seen[0].body;
    assert_eq!(body["type"], "run.queued");
    assert_eq!(body["data"]["run_id"], run_id.as_str());
    assert_eq!(body["data"]["kind"], "run.queued");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");

    // The log: succeeded after 3 attempts, with the answer and how long it took.
    let deliveries = format!("/webhooks/{id}/deliveries");
    let delivery = wait_for(10, "the delivery to be recorded", async || {
        let page = http.ok(Method::GET, &deliveries, None, None).await;
        let first = page["items"][0].clone();
        (first["status"] == "succeeded").then_some(first)
    })
    .await;
    assert_eq!(delivery["id"], seen[0].id.as_str());
    assert_eq!(delivery["attempts"], 3);
    assert_eq!(delivery["last_status_code"], 200);
    assert_eq!(delivery["kind"], "run.queued");
    assert!(delivery["latency_ms"].is_u64(), "{delivery}");
    assert!(delivery["event_seq"].is_i64(), "{delivery}");
    let page = http.ok(Method::GET, &deliveries, None, None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "stage.pending was not for it: {page}");
    let shown = http.ok(Method::GET, &format!("/webhooks/{id}"), None, None).await;
    assert_eq!(shown["consecutive_failures"], 0, "a success resets the count");

    // Sent again by hand: the same id once more, and the log counts the attempt.
    let delivery_id = delivery["id"].as_str().unwrap();
    let again =
        http.ok(Method::POST, &format!("{deliveries}/{delivery_id}/redeliver"), None, None).await;
    assert_eq!(again["status"], "pending");
    let seen = wait_for(10, "the redelivery", async || {
        let seen = rx.seen();
        (seen.len() >= 4).then_some(seen)
    })
    .await;
    assert_eq!(seen[3].id, seen[0].id);
    assert!(seen[3].verified && seen[3].raw == seen[0].raw);
    let one = format!("{deliveries}/{delivery_id}");
    wait_for(10, "the redelivery to be recorded", async || {
        let shown = http.ok(Method::GET, &one, None, None).await;
        (shown["status"] == "succeeded" && shown["attempts"] == 4).then_some(())
    })
    .await;

    // Unknown ids are 404s; creation and deletion are audited (without the URL's token).
    for path in [
        format!("/webhooks/{}", drover_domain::WebhookId::new()),
        "/webhooks/not-an-id".to_owned(),
        format!("{deliveries}/{}", drover_domain::DeliveryId::new()),
    ] {
        let (status, problem) = http.call(Method::GET, &path, None, None, None).await;
        assert_eq!(status, 404, "{path}: {problem}");
    }
    let (status, _) = http.call(Method::DELETE, &format!("/webhooks/{id}"), None, None, None).await;
    assert_eq!(status, 204);
    let (status, problem) =
        http.call(Method::GET, &format!("/webhooks/{id}"), None, None, None).await;
    assert_eq!((status, problem["code"].as_str()), (404, Some("webhook_not_found")));
    let audit = http.ok(Method::GET, "/audit?project=default", None, None).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["target"] == id.as_str())
        .filter_map(|entry| entry["action"].as_str())
        .collect();
    assert_eq!(actions, ["webhook.delete", "webhook.create"], "{audit}");
    assert!(!audit.to_string().contains("t0ps3cret"), "{audit}");
    server.stop().await;
}

/// Reads the project's `webhook` events over SSE until one arrives.
async fn first_webhook_event(http: &Http) -> Value {
    let response = http
        .http
        .get(format!("{}/api/v1/events?kinds=webhook&after=0", http.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("a webhook event within 30 s")
            .expect("the stream stays open")
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|line| line.strip_prefix("data:")) {
                return serde_json::from_str(data.trim()).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_disabled_with_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(&dir.path().join("data"), false)).await;
    let http = Http::new(&server.url);
    let (rx, url) = receiver(Behaviour::Fail).await;
    // One delivery, tried again and again (more would be sent side by side).
    let id = create(&http, None, &rx, &url, json!(["run.queued"])).await;
    http.ok(Method::POST, "/runs", None, Some(json!({ "request": "nobody listens" }))).await;

    let event = first_webhook_event(&http).await;
    assert_eq!(event["kind"], "webhook.disabled");
    assert_eq!(event["payload"]["webhook_id"], id.as_str());
    assert_eq!(event["payload"]["consecutive_failures"], 3);
    let shown = http.ok(Method::GET, &format!("/webhooks/{id}"), None, None).await;
    assert_eq!(shown["enabled"], false);
    assert_eq!(shown["consecutive_failures"], 3);
    let reason = shown["disabled_reason"].as_str().unwrap();
    assert!(reason.contains("3 failed attempts in a row (last: HTTP 500)"), "{reason}");

    // Exactly the configured number of attempts was made, all signed; nothing is pending.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|r| r.verified));
    let page = http.ok(Method::GET, &format!("/webhooks/{id}/deliveries"), None, None).await;
    let items = page["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|d| d["status"] == "dead"), "{page}");
    assert!(items.iter().map(|d| d["attempts"].as_u64().unwrap()).sum::<u64>() == 3, "{page}");

    // A disabled endpoint takes no test until it is enabled again, which resets it.
    let (status, problem) =
        http.call(Method::POST, &format!("/webhooks/{id}/test"), None, None, None).await;
    assert_eq!((status, problem["code"].as_str()), (409, Some("webhook_disabled")), "{problem}");
    let enabled = http.ok(Method::POST, &format!("/webhooks/{id}/enable"), None, None).await;
    assert_eq!(
        (enabled["enabled"].as_bool(), enabled["consecutive_failures"].as_u64()),
        (Some(true), Some(0))
    );
    assert!(enabled["disabled_reason"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn filters_hold_and_another_project_cannot_see_or_touch_an_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir.path().join("data"), true);
    // Users end local mode; the receivers are on loopback.
    config.webhooks.allow_private_targets = true;
    let server = start(config).await;
    let http = Http::new(&server.url);

    // Users: root (admin), alice in `default`, bob in `beta`.
    let root = make_admin(&http).await;
    let root = Some(root.as_str());
    http.ok(Method::POST, "/projects", root, Some(json!({ "id": "beta" }))).await;
    let mut tokens = BTreeMap::new();
    for (user, project) in [("alice", "default"), ("bob", "beta")] {
        http.ok(Method::POST, "/users", root, Some(json!({ "name": user, "role": "member" })))
            .await;
        http.ok(
            Method::POST,
            &format!("/projects/{project}/members"),
            root,
            Some(json!({ "user": user, "role": "member" })),
        )
        .await;
        let token = http
            .ok(
                Method::POST,
                "/tokens",
                root,
                Some(json!({ "name": "t", "user": user, "scope": "write" })),
            )
            .await;
        tokens.insert(user, token["token"].as_str().unwrap().to_owned());
    }
    let alice = Some(tokens["alice"].as_str());
    let bob = Some(tokens["bob"].as_str());

    // Field-level validation.
    let (status, problem) = http
        .call(
            Method::POST,
            "/webhooks",
            alice,
            None,
            Some(json!({ "url": "ftp://example.com", "kinds": ["run.exploded"] })),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    let fields: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().filter_map(|e| e["field"].as_str()).collect();
    assert_eq!(fields, ["url", "kinds"]);

    let (only_succeeded, succeeded_url) = receiver(Behaviour::Accept).await;
    let (everything, everything_url) = receiver(Behaviour::Accept).await;
    let succeeded_id =
        create(&http, alice, &only_succeeded, &succeeded_url, json!(["run.succeeded"])).await;
    let everything_id = create(&http, alice, &everything, &everything_url, json!([])).await;

    let run = http
        .ok(Method::POST, "/runs", alice, Some(json!({ "request": "filters", "pipeline": "one" })))
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    wait_for(60, "run.succeeded at both receivers", async || {
        let done = |rx: &Receiver| rx.seen().iter().any(|r| r.body["type"] == "run.succeeded");
        (done(&only_succeeded) && done(&everything)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got = only_succeeded.seen();
    assert_eq!(got.len(), 1, "only run.succeeded: {got:?}");
    assert!(got[0].verified);
    assert_eq!(got[0].body["data"]["run_id"], run_id.as_str());
    let all = everything.seen();
    assert!(all.iter().all(|r| r.verified));
    let kinds: Vec<&str> = all.iter().filter_map(|r| r.body["type"].as_str()).collect();
    for kind in ["run.queued", "stage.pending", "stage.running", "stage.succeeded", "run.succeeded"]
    {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let mut seqs: Vec<i64> = all.iter().filter_map(|r| r.body["data"]["seq"].as_i64()).collect();
    let sent = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), sent, "each event once: {kinds:?}");

    // A test delivery reaches an endpoint whatever its filter.
    http.ok(Method::POST, &format!("/webhooks/{succeeded_id}/test"), alice, None).await;
    wait_for(10, "the test delivery", async || {
        let seen = only_succeeded.seen();
        seen.iter().find(|r| r.body["type"] == "webhook.test").map(|r| assert!(r.verified))
    })
    .await;

    // Bob, in his project or claiming Alice's, sees nothing of hers and changes nothing.
    let delivery =
        http.ok(Method::GET, &format!("/webhooks/{everything_id}/deliveries"), alice, None).await;
    let delivery_id = delivery["items"][0]["id"].as_str().unwrap().to_owned();
    for project in [None, Some("beta"), Some("default")] {
        let (status, listed) = http.call(Method::GET, "/webhooks", bob, project, None).await;
        if status == 200 {
            assert_eq!(listed["items"], json!([]), "{project:?}");
        } else {
            assert_eq!(status, 404, "{project:?}: {listed}");
        }
        for (method, path) in [
            (Method::GET, format!("/webhooks/{everything_id}")),
            (Method::DELETE, format!("/webhooks/{everything_id}")),
            (Method::POST, format!("/webhooks/{everything_id}/enable")),
            (Method::POST, format!("/webhooks/{everything_id}/test")),
            (Method::GET, format!("/webhooks/{everything_id}/deliveries")),
            (Method::GET, format!("/webhooks/{everything_id}/deliveries/{delivery_id}")),
            (Method::POST, format!("/webhooks/{everything_id}/deliveries/{delivery_id}/redeliver")),
        ] {
            let (status, body) = http.call(method.clone(), &path, bob, project, None).await;
            assert_eq!(status, 404, "{method} {path} as bob in {project:?}: {body}");
            assert!(!body.to_string().contains(&everything_url), "{body}");
        }
    }
    let shown = http.ok(Method::GET, &format!("/webhooks/{everything_id}"), alice, None).await;
    assert_eq!(shown["enabled"], true);
    server.stop().await;
}

/// Makes the first user, an administrator (which ends local mode); returns an access token.
async fn make_admin(http: &Http) -> String {
    let password = "correct horse battery";
    let user = json!({ "name": "root", "role": "admin", "password": password });
    http.ok(Method::POST, "/users", None, Some(user)).await;
    let login = json!({ "user": "root", "password": password });
    let session = http.ok(Method::POST, "/auth/login", None, Some(login)).await;
    session["access_token"].as_str().unwrap().to_owned()
}

/// This machine's name, which the system resolves (through `/etc/hosts`, as on most
/// machines) to loopback or a private address: a real name that leads here.
async fn a_name_for_this_machine() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    let addresses: Vec<std::net::IpAddr> = tokio::net::lookup_host((name.as_str(), 80))
        .await
        .unwrap_or_else(|err| panic!("this test needs the host name {name} to resolve: {err}"))
        .map(|address| address.ip())
        .collect();
    assert!(
        !addresses.is_empty()
            && addresses.iter().all(|ip| drover_domain::non_public_range(*ip).is_some()),
        "this test needs the host name {name} to resolve to this machine: {addresses:?}"
    );
    name
}

#[tokio::test]
async fn beyond_local_mode_private_targets_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = start(config(&data_dir, false)).await;
    let http = Http::new(&server.url);
    let root = make_admin(&http).await;
    let (rx, url) = receiver(Behaviour::Accept).await;
    let port = url.split(':').nth(2).unwrap().split('/').next().unwrap().to_owned();
    let hostname = a_name_for_this_machine().await;

    for target in [
        url.clone(),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        "http://[::1]/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://localhost/hook".to_owned(),
        format!("http://{hostname}:{port}/hook"),
        "http://10.1.2.3/hook".to_owned(),
        "http://100.64.0.1/hook".to_owned(),
        "http://[fd00::1]/hook".to_owned(),
        "http://0.0.0.0/hook".to_owned(),
        "http://2130706433/hook".to_owned(),
    ] {
        let response = http
            .http
            .post(format!("{}/api/v1/webhooks", server.url))
            .bearer_auth(&root)
            .json(&json!({ "url": target }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        let problem: Value = response.json().await.unwrap();
        assert_eq!(status, 422, "{target}: {problem}");
        assert_eq!(content_type, "application/problem+json", "{target}");
        assert_eq!(problem["code"], "webhook_target_not_allowed", "{target}: {problem}");
        assert_eq!(problem["errors"][0]["field"], "url", "{target}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains("allow_private_targets"), "{problem}");
        assert!(!problem.to_string().contains("t0ps3cret"), "the URL's token is quoted: {problem}");
    }
    let listed = http.ok(Method::GET, "/webhooks", Some(root.as_str()), None).await;
    assert_eq!(listed["items"], json!([]), "a refused endpoint was made");
    server.stop().await;

    // With the flag, the same server sends there.
    let mut config = config(&data_dir, false);
    config.webhooks.allow_private_targets = true;
    let server = start(config).await;
    let http = Http::new(&server.url);
    let id = create(&http, Some(root.as_str()), &rx, &url, json!([])).await;
    http.ok(Method::POST, &format!("/webhooks/{id}/test"), Some(root.as_str()), None).await;
    let seen = wait_for(10, "the test delivery", async || {
        let seen = rx.seen();
        (!seen.is_empty()).then_some(seen)
    })
    .await;
    assert!(seen[0].verified && seen[0].body["type"] == "webhook.test", "{seen:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_delivery_to_a_private_address_is_refused_when_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(&dir.path().join("data"), false)).await;
    let http = Http::new(&server.url);
    // Made in local mode, where this machine is a fine target: one by address, one by a
    // name that resolves here.
    let (by_address, address_url) = receiver(Behaviour::Accept).await;
    let (by_name, name_url) = receiver(Behaviour::Accept).await;
    let name_url = name_url.replace("127.0.0.1", &a_name_for_this_machine().await);
    let address_id = create(&http, None, &by_address, &address_url, json!([])).await;
    let name_id = create(&http, None, &by_name, &name_url, json!([])).await;
    http.ok(Method::POST, &format!("/webhooks/{name_id}/test"), None, None).await;
    wait_for(10, "a delivery by name in local mode", async || {
        by_name.seen().first().map(|r| assert!(r.verified))
    })
    .await;

    // A user ends local mode: from now on what they resolve to is checked as they are sent.
    let root = make_admin(&http).await;
    for id in [&address_id, &name_id] {
        let queued =
            http.ok(Method::POST, &format!("/webhooks/{id}/test"), Some(root.as_str()), None).await;
        let delivery = format!("/webhooks/{id}/deliveries/{}", queued["id"].as_str().unwrap());
        let refused = wait_for(10, "the refused attempt to be recorded", async || {
            let shown = http.ok(Method::GET, &delivery, Some(root.as_str()), None).await;
            (shown["attempts"] == 1).then_some(shown)
        })
        .await;
        assert_eq!(refused["status"], "failed", "{refused}");
        assert!(refused["last_status_code"].is_null(), "{refused}");
        let error = refused["last_error"].as_str().unwrap();
        assert!(error.starts_with("refused: "), "{error}");
        assert!(error.contains("loopback") && error.contains("allow_private_targets"), "{error}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(by_address.seen().is_empty(), "a refused delivery reached the receiver");
    assert_eq!(by_name.seen().len(), 1, "a refused delivery reached the receiver");
    server.stop().await;
}

/// What the webhooks table holds, read with a connection of its own: the plaintext
/// column and the sealed secret's key id and ciphertext.
async fn webhook_rows(data_dir: &Path) -> Vec<(Option<String>, Option<String>, Option<Vec<u8>>)> {
    use sqlx::Connection;
    let url = format!("sqlite://{}", data_dir.join("drover.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let rows =
        sqlx::query_as("SELECT legacy_secret, secret_key_id, secret_ciphertext FROM webhooks")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    conn.close().await.unwrap();
    rows
}

/// Files under `dir` that hold `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        if path.is_dir() {
            todo.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if std::fs::read(&path)
            .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(path);
        }
    }
    found
}

/// Sends the endpoint a test delivery and waits until the receiver verified it.
async fn deliver_test(http: &Http, token: Option<&str>, rx: &Receiver, id: &str) {
    let before = rx.seen().len();
    http.ok(Method::POST, &format!("/webhooks/{id}/test"), token, None).await;
    let seen = wait_for(10, "the test delivery", async || {
        let seen = rx.seen();
        (seen.len() > before).then_some(seen)
    })
    .await;
    assert!(seen[before].verified, "the delivery does not verify: {seen:?}");
}

#[tokio::test]
async fn signing_secrets_are_stored_sealed_and_deliveries_verify_before_and_after_a_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = start(config(&data_dir, false)).await;
    let http = Http::new(&server.url);
    let (rx, url) = receiver(Behaviour::Accept).await;
    let id = create(&http, None, &rx, &url, json!([])).await;
    let secret = rx.secret.lock().unwrap().clone();
    let key = secret.trim_start_matches("whsec_").to_owned();

    let rows = webhook_rows(&data_dir).await;
    assert_eq!(rows.len(), 1);
    let (plaintext, key_id, ciphertext) = rows[0].clone();
    assert_eq!(plaintext, None);
    assert_eq!(key_id.as_deref().map(str::len), Some(16), "the key's id is recorded");
    let ciphertext = ciphertext.unwrap();
    assert!(!ciphertext.windows(8).any(|w| w == &key.as_bytes()[..8]), "stored in clear");
    deliver_test(&http, None, &rx, &id).await;
    server.stop().await;
    assert_eq!(files_holding(&data_dir, &key), Vec::<std::path::PathBuf>::new());

    // `drover secrets rotate-key` (the same function) with the server stopped.
    let config = config(&data_dir, false);
    let store = drover_store::open(&drover_server::store_options(&config)).await.unwrap();
    let source = drover_server::key_source(&config);
    let rotation = drover_secrets::rotate(Arc::new(store.clone()), &source, "cli").await.unwrap();
    store.close().await;
    assert_eq!(rotation.resealed_webhook_secrets, 1);
    let rows = webhook_rows(&data_dir).await;
    assert_eq!(rows[0].1.as_deref(), Some(rotation.new_key.as_str()));
    assert_ne!(rows[0].2.as_deref(), Some(ciphertext.as_slice()), "sealed anew");

    let server = start(config).await;
    let http = Http::new(&server.url);
    deliver_test(&http, None, &rx, &id).await;
    server.stop().await;
}

#[tokio::test]
async fn an_older_databases_plaintext_signing_secret_is_sealed_at_start_and_still_signs() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let (rx, url) = receiver(Behaviour::Accept).await;
    let secret = drover_auth::webhook::SigningSecret::generate().expose().to_owned();
    rx.set_secret(&secret);
    let id = drover_domain::WebhookId::new();

    // The database as drover left it before signing secrets were sealed (migration 16).
    let db_url = format!("sqlite://{}?mode=rwc", data_dir.join("drover.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db_url).await.unwrap();
    let migrations =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../drover-store/migrations/sqlite");
    let mut migrator = sqlx::migrate::Migrator::new(migrations).await.unwrap();
    let older: Vec<_> = migrator.iter().filter(|m| m.version < 16).cloned().collect();
    migrator.migrations = std::borrow::Cow::Owned(older);
    migrator.run(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO webhooks (id, project_id, url, kinds, description, secret, enabled, \
         consecutive_failures, created_by, created_at, updated_at) \
         VALUES (?, 'default', ?, '[]', NULL, ?, TRUE, 0, 'alice', 1, 1)",
    )
    .bind(id.to_string())
    .bind(&url)
    .bind(&secret)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let key = secret.trim_start_matches("whsec_").to_owned();
    assert!(!files_holding(&data_dir, &key).is_empty(), "the old database holds it");

    let server = start(config(&data_dir, false)).await;
    let rows = webhook_rows(&data_dir).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, None, "the plaintext is removed");
    assert!(rows[0].1.is_some() && rows[0].2.is_some(), "sealed: {:?}", rows[0].1);
    let http = Http::new(&server.url);
    deliver_test(&http, None, &rx, &id.to_string()).await;
    server.stop().await;
    assert_eq!(files_holding(&data_dir, &key), Vec::<std::path::PathBuf>::new());
}
