//! Project secrets on their way to workers, against the real server, the real Redis and
//! NATS, and real agent processes: the broker carries a task that names its secrets and
//! holds none of their values (read raw from the stream), while the agent still gets the
//! value (it writes its SHA-256 to a file) and the attempt's log shows it redacted; the
//! read is audited as the worker's. The worker API (`POST /tasks/{id}/secrets`) hands an
//! attempt's secrets to the worker holding it only: a lease answer holds no value, and a
//! user's credential, another agent type's token, another project, an unknown attempt and
//! a stale fencing token are refused, each with its problem+json.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use drover_config::{AgentConfig, Config, PipelineConfig, StageConfig};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Digest;

mod common;
use common::{http, start};

const SECRET: &str = "tok-wire-5ecret-0123456789";

/// Prints the secret (redacted in the log) and writes its SHA-256 to `seen`.
fn telling_agent(seen: &Path) -> AgentConfig {
    let script = format!(
        "echo \"token=$MY_TOKEN\"; printf %s \"$MY_TOKEN\" | sha256sum | cut -d' ' -f1 > {}",
        seen.display()
    );
    AgentConfig {
        command: Some("sh".into()),
        args: Some(vec!["-c".into(), script]),
        retry_on_failure: Some(false),
        ..AgentConfig::default()
    }
}

/// A server whose pipeline `tell` runs `telling` once, on `bus_url` under `namespace`.
fn config(data_dir: &Path, seen: &Path, bus_url: &str, namespace: &str, workers: bool) -> Config {
    let mut config = common::config(data_dir);
    config.bus.url = bus_url.to_owned();
    config.bus.namespace = namespace.to_owned();
    config.workers.embedded = workers;
    config.agents = BTreeMap::from([("telling".to_owned(), telling_agent(seen))]);
    config.pipelines = BTreeMap::from([(
        "tell".to_owned(),
        PipelineConfig {
            stages: vec![StageConfig {
                name: "work".into(),
                agent: Some("telling".into()),
                max_attempts: Some(1),
                ..StageConfig::default()
            }],
            ..PipelineConfig::default()
        },
    )]);
    config
}

struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut request = self.http.request(method, format!("{}/api/v1{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (status, headers, response.text().await.unwrap())
    }

    async fn ok(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Value {
        let (status, _, text) = self.call(method.clone(), path, token, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Waits until `check` holds for the run; returns it.
    async fn run_until(
        &self,
        id: &str,
        token: Option<&str>,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        for _ in 0..600 {
            let run = self.ok(Method::GET, &format!("/runs/{id}"), token, None).await;
            if check(&run) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {id} never got there");
    }
}

fn sha256(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// What a broker holds of the agent's task queue, as raw text.
enum Broker {
    Redis(String),
    Nats(String),
}

impl Broker {
    async fn raw_tasks(&self, namespace: &str) -> Vec<String> {
        match self {
            Self::Redis(url) => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let key = format!("{namespace}:agent:telling:tasks");
                let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap_or(());
                entries.into_iter().map(|(_, fields)| fields.join(" ")).collect()
            }
            Self::Nats(url) => {
                let client = async_nats::connect(url.as_str()).await.unwrap();
                let jetstream = async_nats::jetstream::new(client);
                let Ok(stream) = jetstream.get_stream(format!("{namespace}_DROVER_TASKS")).await
                else {
                    return Vec::new();
                };
                let subject = format!("{namespace}.agent.telling.tasks");
                match stream.get_first_raw_message_by_subject(&subject, 1).await {
                    Ok(message) => vec![String::from_utf8_lossy(&message.payload).into_owned()],
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    fn url(&self) -> &str {
        match self {
            Self::Redis(url) | Self::Nats(url) => url,
        }
    }
}

/// Submits a run while no worker serves, reads its task raw from the broker, then lets the
/// server's own workers (a restart with them on) run it.
async fn the_broker_carries_names_only_and_the_server_worker_gets_the_value(broker: Broker) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let seen = dir.path().join("seen.sha256");
    let namespace = drover_testkit::unique_name("secrets");
    let server = start(config(&data_dir, &seen, broker.url(), &namespace, false)).await;
    let api = Api { http: http(), url: server.url.clone() };
    api.ok(Method::PUT, "/secrets/MY_TOKEN", None, Some(json!({ "value": SECRET }))).await;
    let run = api
        .ok(Method::POST, "/runs", None, Some(json!({ "request": "tell", "pipeline": "tell" })))
        .await;
    let id = run["id"].as_str().unwrap().to_owned();

    let mut raw = Vec::new();
    for _ in 0..300 {
        raw = broker.raw_tasks(&namespace).await;
        if raw.iter().any(|entry| entry.contains(&id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let task = raw.iter().find(|entry| entry.contains(&id)).expect("the task is on the broker");
    assert!(task.contains("\"secret_names\":[\"MY_TOKEN\"]"), "{task}");
    assert!(!task.contains(SECRET), "the broker carries the value: {task}");
    server.stop().await;

    let server = start(config(&data_dir, &seen, broker.url(), &namespace, true)).await;
    let api = Api { http: http(), url: server.url.clone() };
    let run = api
        .run_until(&id, None, |run| {
            ["succeeded", "failed"].contains(&run["status"].as_str().unwrap())
        })
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let hashed = std::fs::read_to_string(&seen).expect("the agent ran");
    assert_eq!(hashed.trim(), sha256(SECRET), "the agent did not get the value");
    let (_, _, logs) = api.call(Method::GET, &format!("/runs/{id}/logs"), None, None).await;
    assert!(logs.contains("token=[redacted:MY_TOKEN]"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
    let audit = api.ok(Method::GET, "/audit?project=default&limit=200", None, None).await;
    let reads: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["action"] == "secret.read")
        .collect();
    assert_eq!(reads.len(), 1, "{audit}");
    assert!(reads[0]["actor"].as_str().unwrap().starts_with("worker embedded-"), "{audit}");
    assert_eq!(reads[0]["reason"], format!("run {id} stage work attempt 1"), "{audit}");
    server.stop().await;
}

#[tokio::test]
async fn on_redis_the_task_names_its_secrets_and_the_server_worker_gets_the_value() {
    let Some(url) = drover_testkit::redis_url() else { return };
    the_broker_carries_names_only_and_the_server_worker_gets_the_value(Broker::Redis(url)).await;
}

#[tokio::test]
async fn on_nats_the_task_names_its_secrets_and_the_server_worker_gets_the_value() {
    let Some(url) = drover_testkit::nats_url() else { return };
    the_broker_carries_names_only_and_the_server_worker_gets_the_value(Broker::Nats(url)).await;
}

/// Asserts a problem+json answer with `status` and `code`; returns its text.
fn problem(answer: (u16, reqwest::header::HeaderMap, String), status: u16, code: &str) -> String {
    let (got, headers, text) = answer;
    assert_eq!(got, status, "{text}");
    assert_eq!(headers["content-type"], "application/problem+json", "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], code, "{text}");
    text
}

#[tokio::test]
async fn the_worker_api_gives_an_attempts_secrets_to_the_worker_holding_it_only() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let seen = dir.path().join("seen.sha256");
    let server = start(config(&data_dir, &seen, "embedded", "", false)).await;
    let api = Api { http: http(), url: server.url.clone() };
    let password = "correct horse battery";
    let admin = json!({ "name": "root", "role": "admin", "password": password });
    api.ok(Method::POST, "/users", None, Some(admin)).await;
    let login = json!({ "user": "root", "password": password });
    let root = api.ok(Method::POST, "/auth/login", None, Some(login)).await;
    let root = root["access_token"].as_str().unwrap().to_owned();
    let root = Some(root.as_str());
    let worker_token = async |name: &str, agent: &str| {
        let body = json!({ "worker": name, "agents": [agent] });
        let made = api.ok(Method::POST, "/workers/tokens", root, Some(body)).await;
        made["token"].as_str().unwrap().to_owned()
    };
    let w1 = worker_token("w1", "telling").await;
    let w2 = worker_token("w2", "scaffold").await;
    api.ok(Method::PUT, "/secrets/MY_TOKEN", root, Some(json!({ "value": SECRET }))).await;
    let run = api
        .ok(Method::POST, "/runs", root, Some(json!({ "request": "tell", "pipeline": "tell" })))
        .await;
    let id = run["id"].as_str().unwrap().to_owned();

    // The lease answer is the envelope: names, no value.
    let lease = json!({ "agents": ["telling"], "wait_ms": 10_000 });
    let (status, _, leased) = api.call(Method::POST, "/tasks/lease", Some(&w1), Some(lease)).await;
    assert_eq!(status, 200, "{leased}");
    assert!(!leased.contains(SECRET), "the lease answer holds the value: {leased}");
    let envelope: Value = serde_json::from_str(&leased).unwrap();
    assert_eq!(envelope["run_id"], id.as_str());
    assert_eq!(envelope["context"]["secret_names"], json!(["MY_TOKEN"]));
    let task = envelope["task_id"].as_str().unwrap().to_owned();
    let token = envelope["fencing_token"].as_i64().unwrap();
    let path = format!("/tasks/{task}/secrets");
    let body =
        |project: &str, token: i64| Some(json!({ "project_id": project, "fencing_token": token }));

    let mut refusals = vec![
        problem(
            api.call(Method::POST, &path, root, body("default", token)).await,
            403,
            "forbidden",
        ),
        problem(
            api.call(Method::POST, &path, Some(&w2), body("default", token)).await,
            403,
            "forbidden",
        ),
        problem(
            api.call(Method::POST, &path, None, body("default", token)).await,
            401,
            "unauthenticated",
        ),
        problem(
            api.call(Method::POST, &path, Some(&w1), body("beta", token)).await,
            404,
            "attempt_not_found",
        ),
        problem(
            api.call(
                Method::POST,
                &format!("/tasks/{}/secrets", drover_domain::AttemptId::new()),
                Some(&w1),
                body("default", token),
            )
            .await,
            404,
            "attempt_not_found",
        ),
        problem(
            api.call(Method::POST, &path, Some(&w1), body("default", token + 1)).await,
            409,
            "stale_attempt",
        ),
    ];

    // The holder gets the value, uncached, and the read is audited as its own.
    let (status, headers, answer) =
        api.call(Method::POST, &path, Some(&w1), body("default", token)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(headers["cache-control"], "no-store");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["secrets"]["MY_TOKEN"], SECRET);
    let audit = api.ok(Method::GET, "/audit?project=default&limit=200", root, None).await;
    let reads: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "secret.read")
        .collect();
    assert_eq!(reads.len(), 1, "only the holder's read: {audit}");
    assert_eq!(reads[0]["actor"], "worker w1");
    assert_eq!(reads[0]["reason"], format!("run {id} stage work attempt 1"));

    // Handed back, the attempt gets a new token: the old one no longer opens anything.
    let started =
        json!({ "type": "started", "attempt_id": task, "token": token, "worker_id": "w1-1" });
    api.ok(Method::POST, "/worker-messages", Some(&w1), Some(started)).await;
    api.run_until(&id, root, |run| run["attempts"][0]["status"] == "running").await;
    let (status, _, _) = api.call(Method::POST, &path, Some(&w1), body("default", token)).await;
    assert_eq!(status, 200, "a running attempt's holder still gets them");
    let released =
        json!({ "type": "released", "attempt_id": task, "token": token, "worker_id": "w1-1" });
    api.ok(Method::POST, "/worker-messages", Some(&w1), Some(released)).await;
    api.run_until(&id, root, |run| run["attempts"][0]["status"] != "running").await;
    refusals.push(problem(
        api.call(Method::POST, &path, Some(&w1), body("default", token)).await,
        409,
        "stale_attempt",
    ));
    for refusal in &refusals {
        assert!(!refusal.contains(SECRET), "{refusal}");
    }
    server.stop().await;
}
