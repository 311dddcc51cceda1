//! The served OpenAPI document checked against the server that serves it by a schema
//! conformance fuzzer: schemathesis (pinned by `conformance/requirements.txt`, installed
//! by `.ci/run`) calls every operation with requests generated from the document, valid
//! and invalid, and checks that no answer is a 5xx; that every answer's status code,
//! content type, headers and body are ones the document declares for that operation; that
//! a request the schemas forbid is refused and one they allow is not refused as invalid.
//! Twice: on a server in local mode (no credential), and on a network server with users,
//! as an administrator (and, on the worker endpoints, as a worker with its service token).
//!
//! The servers are real, on port 0 with their own data directory, and seeded through
//! their own API and workers (a finished run with a log and an output file, a run waiting
//! for approval, a dead letter, an environment, a webhook and a delivery, a secret, a chat
//! session with an `llm` agent played by the model double, a spare user and token), so
//! that generated requests reach real things too: `conformance/hooks.py` puts their ids
//! into path parameters. Reproducible: a fixed seed, deterministic generation, a bounded
//! number of examples per operation (`conformance/schemathesis.toml` has the rest).
//!
//! Schemathesis is `DROVER_TEST_SCHEMATHESIS` (its executable), else `schemathesis` on
//! `PATH`; without it the test skips (a failure with `DROVER_TEST_REQUIRE_BACKENDS=1`).
//! `DROVER_TEST_CONFORMANCE_REPORTS=DIR` keeps every request and answer there (HAR, JUnit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_config::{AgentConfig, AgentKindConfig, Config, PipelineConfig, StageConfig};
use drover_testkit::model::ModelDouble;
use reqwest::Method;
use serde_json::{Value, json};

mod common;

/// Generated requests per operation and phase.
const EXAMPLES: &str = "12";
const SEED: &str = "15";

/// The schemathesis executable, if there is one.
fn schemathesis() -> Option<PathBuf> {
    const VAR: &str = "DROVER_TEST_SCHEMATHESIS";
    if let Some(path) = std::env::var_os(VAR).filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Some(path);
        }
        return drover_testkit::skip(&format!(
            "OpenAPI conformance: {VAR}={} is not a file",
            path.display()
        ));
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("schemathesis"))
                .find(|candidate| candidate.is_file())
        })
        .or_else(|| {
            drover_testkit::skip(&format!(
                "OpenAPI conformance: schemathesis is not installed (`.ci/run` installs it; \
                 point {VAR} at it)"
            ))
        })
}

/// A test server: `workers` runs the seeding pipelines' agents inside it.
fn config(data_dir: &Path, listen: &str, workers: bool, model: &str) -> Config {
    let mut config = common::config(data_dir);
    config.server.listen = listen.parse().unwrap();
    config.workers.embedded = workers;
    // The fuzzer sends thousands of requests a minute.
    config.auth.rate_limit_per_minute = 1_000_000;
    config.auth.ip_rate_limit_per_minute = 1_000_000;
    // Deliveries are made but not sent during the test: the fuzzer's endpoints have
    // generated URLs.
    config.webhooks.poll_interval = Duration::from_secs(3600);
    // The seeded webhook points at this machine (nothing is ever sent: the poll is hours).
    config.webhooks.allow_private_targets = true;
    let command = |script: &str| AgentConfig {
        command: Some("sh".into()),
        args: Some(vec!["-c".into(), script.into()]),
        ..AgentConfig::default()
    };
    config.agents = BTreeMap::from([
        (
            "quick".to_owned(),
            command("echo working; mkdir -p reports; echo '<ok/>' > reports/junit.xml"),
        ),
        ("fails".to_owned(), command("echo broken; exit 1")),
        (
            "assistant".to_owned(),
            AgentConfig {
                kind: Some(AgentKindConfig::Llm),
                base_url: Some(model.to_owned()),
                model: Some("double".to_owned()),
                ..AgentConfig::default()
            },
        ),
    ]);
    // A shared service, so service routes have one to name: it says it is up and waits.
    let service = json!({
        "command": "sh",
        "args": ["-c", "echo up; exec sleep 600"],
        "sharing": "shared",
        "address": format!("127.0.0.1:{}", drover_testkit::free_port()),
        "restart": "never",
    });
    config.services =
        BTreeMap::from([("echo".to_owned(), serde_json::from_value(service).unwrap())]);
    let stage = |name: &str, agent: &str| StageConfig {
        name: name.to_owned(),
        agent: Some(agent.to_owned()),
        max_attempts: Some(1),
        ..StageConfig::default()
    };
    let pipeline = |stages| PipelineConfig { stages, ..PipelineConfig::default() };
    config.pipelines = BTreeMap::from([
        (
            "quick".to_owned(),
            pipeline(vec![StageConfig {
                outputs: Some(vec!["reports/*.xml".into()]),
                ..stage("work", "quick")
            }]),
        ),
        (
            "gated".to_owned(),
            pipeline(vec![
                stage("work", "quick"),
                StageConfig { approval: Some(true), ..stage("ship", "quick") },
            ]),
        ),
        ("fragile".to_owned(), pipeline(vec![stage("work", "fails")])),
    ]);
    config
}

/// The API as the test's own client.
struct Api {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Api {
    fn new(url: &str, token: Option<&str>) -> Self {
        Self { http: common::http(), url: url.to_owned(), token: token.map(str::to_owned) }
    }

    /// Calls `path` and wants a 2xx; its JSON body (`null` when there is none).
    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn get(&self, path: &str) -> Value {
        self.ok(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.ok(Method::POST, path, Some(body)).await
    }

    /// Submits a run of `pipeline`; its id.
    async fn submit(&self, pipeline: &str) -> String {
        let run = self
            .post("/api/v1/runs", json!({ "request": "conformance", "pipeline": pipeline }))
            .await;
        run["id"].as_str().unwrap().to_owned()
    }

    /// Polls run `id` until it is `status` (at most 60 s).
    async fn wait_for(&self, id: &str, status: &str) {
        let mut run = Value::Null;
        for _ in 0..600 {
            run = self.get(&format!("/api/v1/runs/{id}")).await;
            if run["status"] == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {id} never became {status}: {run:#}");
    }
}

/// What the server's own workers made, before the fuzzer runs.
struct Runs {
    finished: String,
    /// An output file of `finished`.
    artifact: String,
    waiting_approval: String,
    dead_letter: String,
}

async fn make_runs(api: &Api) -> Runs {
    let finished = api.submit("quick").await;
    let waiting_approval = api.submit("gated").await;
    let failing = api.submit("fragile").await;
    api.wait_for(&finished, "succeeded").await;
    api.wait_for(&waiting_approval, "waiting_approval").await;
    api.wait_for(&failing, "failed").await;
    let artifacts = api.get(&format!("/api/v1/runs/{finished}/artifacts")).await;
    let artifact = artifacts["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "output")
        .and_then(|a| a["name"].as_str())
        .unwrap_or_else(|| panic!("no output artifact: {artifacts}"))
        .to_owned();
    let letters = api.get("/api/v1/dlq").await;
    let dead_letter = letters["items"][0]["id"].as_str().unwrap().to_owned();
    Runs { finished, artifact, waiting_approval, dead_letter }
}

/// What the fuzzer may delete, made afresh for each of its runs.
struct Things {
    environment: String,
    webhook: String,
    delivery: String,
    secret: String,
    chat: String,
}

async fn make_things(api: &Api, tag: &str) -> Things {
    let environment = format!("seeded-{tag}");
    api.post("/api/v1/environments", json!({ "name": environment })).await;
    let webhook =
        api.post("/api/v1/webhooks", json!({ "url": "http://127.0.0.1:9/hook" })).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let delivery = api.post(&format!("/api/v1/webhooks/{webhook}/test"), json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = format!("SEEDED_{}", tag.to_uppercase());
    api.ok(
        Method::PUT,
        &format!("/api/v1/secrets/{secret}"),
        Some(json!({ "value": "s3cret-value" })),
    )
    .await;
    let chat = api.post("/api/v1/chat/sessions", json!({ "agent": "assistant" })).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    Things { environment, webhook, delivery, secret, chat }
}

/// Real values for the path parameters of every templated path: {template: {name: value}}.
fn seeds(runs: &Runs, things: &Things, user: &str, token: &str) -> Value {
    let run = &runs.finished;
    let environment = &things.environment;
    let webhook = &things.webhook;
    json!({
        "/api/v1/runs/{id}": { "id": run },
        "/api/v1/runs/{id}/cancel": { "id": runs.waiting_approval },
        "/api/v1/runs/{id}/events": { "id": run },
        "/api/v1/runs/{id}/logs": { "id": run },
        "/api/v1/runs/{id}/presence": { "id": run },
        "/api/v1/runs/{id}/artifacts": { "id": run },
        "/api/v1/runs/{id}/artifacts/{name}": { "id": run, "name": runs.artifact },
        "/api/v1/runs/{id}/stages/{stage}/approve": { "id": runs.waiting_approval, "stage": "ship" },
        "/api/v1/runs/{id}/stages/{stage}/reject": { "id": runs.waiting_approval, "stage": "ship" },
        "/api/v1/dlq/{id}/redrive": { "id": runs.dead_letter },
        "/api/v1/dlq/{id}/discard": { "id": runs.dead_letter },
        "/api/v1/environments/{id}": { "id": environment },
        "/api/v1/environments/{id}/start": { "id": environment },
        "/api/v1/environments/{id}/stop": { "id": environment },
        "/api/v1/environments/{id}/services": { "id": environment },
        "/api/v1/environments/{id}/services/{name}/restart": { "id": environment, "name": "echo" },
        "/api/v1/environments/{id}/services/{name}/logs": { "id": environment, "name": "echo" },
        "/api/v1/webhooks/{id}": { "id": webhook },
        "/api/v1/webhooks/{id}/enable": { "id": webhook },
        "/api/v1/webhooks/{id}/test": { "id": webhook },
        "/api/v1/webhooks/{id}/deliveries": { "id": webhook },
        "/api/v1/webhooks/{id}/deliveries/{delivery}": { "id": webhook, "delivery": things.delivery },
        "/api/v1/webhooks/{id}/deliveries/{delivery}/redeliver":
            { "id": webhook, "delivery": things.delivery },
        "/api/v1/secrets/{name}": { "name": things.secret },
        "/api/v1/chat/sessions/{id}": { "id": things.chat },
        "/api/v1/chat/sessions/{id}/messages": { "id": things.chat },
        "/api/v1/tokens/{id}": { "id": token },
        "/api/v1/users/{name}": { "name": user },
        "/api/v1/projects/{id}/members": { "id": "default" },
        "/api/v1/projects/{id}/members/{user}": { "id": "default", "user": user },
    })
}

/// How the fuzzer calls: no credential (local mode), or these.
struct Credentials {
    /// An administrator's API token, on every operation.
    token: String,
    /// A worker's service token, on the worker endpoints (`hooks.py` sends both).
    worker_token: String,
    /// What the fuzzer must not revoke or demote: `{"token": id, "user": name}`.
    own: Value,
}

/// Runs schemathesis against the server at `url`; its report when a check failed.
async fn fuzz(
    schemathesis: &Path,
    url: &str,
    seeds: &Value,
    credentials: Option<&Credentials>,
    excluded: &[&str],
) -> Result<(), String> {
    let conformance = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let work = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(schemathesis);
    command
        .arg("--no-color")
        .arg("--config-file")
        .arg(conformance.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{url}/api/v1/openapi.json"))
        .args(["--max-examples", EXAMPLES, "--seed", SEED, "--workers", "2"])
        .env("SCHEMATHESIS_HOOKS", conformance.join("hooks.py"))
        .env("DROVER_CONFORMANCE_SEEDS", seeds.to_string())
        .env_remove("DROVER_CONFORMANCE_TOKEN")
        .env_remove("DROVER_CONFORMANCE_SELF")
        .env_remove("DROVER_CONFORMANCE_WORKER_TOKEN")
        // Reports and caches stay out of the repository.
        .current_dir(work.path())
        .kill_on_drop(true);
    // Every request and answer, kept where asked (`DROVER_TEST_CONFORMANCE_REPORTS`).
    if let Some(reports) = std::env::var_os("DROVER_TEST_CONFORMANCE_REPORTS") {
        let run = if credentials.is_some() { "authenticated" } else { "local" };
        command.args(["--report", "har,junit", "--report-dir"]).arg(Path::new(&reports).join(run));
    }
    for name in excluded {
        command.args(["--exclude-name", name]);
    }
    if let Some(credentials) = credentials {
        command
            .env("DROVER_CONFORMANCE_TOKEN", &credentials.token)
            .env("DROVER_CONFORMANCE_SELF", credentials.own.to_string())
            .env("DROVER_CONFORMANCE_WORKER_TOKEN", &credentials.worker_token);
    }
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("schemathesis finishes within 10 minutes")
        .expect("schemathesis starts");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The summary says how much was tested, whatever the outcome.
    if let Some(summary) = report.find("SUMMARY") {
        eprintln!("schemathesis at {url}: {}", &report[summary..]);
    }
    if output.status.success() { Ok(()) } else { Err(report) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_the_openapi_document_says() {
    let Some(schemathesis) = schemathesis() else { return };
    let model = ModelDouble::start("glad to help", Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // What only workers make: the server runs the seeding pipelines' agents itself.
    let server = common::start(config(&data, "127.0.0.1:0", true, &model.base_url())).await;
    let runs = make_runs(&Api::new(&server.url, None)).await;
    server.stop().await;

    // Local mode: no user, no credential. Runs the fuzzer submits are queued, not worked.
    let server = common::start(config(&data, "127.0.0.1:0", false, &model.base_url())).await;
    let api = Api::new(&server.url, None);
    let things = make_things(&api, "local").await;
    let local = fuzz(
        &schemathesis,
        &server.url,
        &seeds(&runs, &things, "nobody", "none"),
        None,
        // The first user ends local mode and every later request would be a 401: users
        // are made in the authenticated run.
        &["POST /api/v1/users"],
    )
    .await;

    // A network server with users: the fuzzer is an administrator with an API token.
    let password = "a long enough password";
    api.post("/api/v1/users", json!({ "name": "fuzzer", "role": "admin", "password": password }))
        .await;
    server.stop().await;
    let server = common::start(config(&data, "0.0.0.0:0", false, &model.base_url())).await;
    let session = Api::new(&server.url, None)
        .post("/api/v1/auth/login", json!({ "user": "fuzzer", "password": password }))
        .await;
    let login = Api::new(&server.url, session["access_token"].as_str());
    let token = login.post("/api/v1/tokens", json!({ "name": "fuzzer" })).await;
    let api = Api::new(&server.url, token["token"].as_str());
    api.post("/api/v1/users", json!({ "name": "spare", "role": "member" })).await;
    api.post("/api/v1/projects/default/members", json!({ "user": "spare", "role": "viewer" }))
        .await;
    let spare = api.post("/api/v1/tokens", json!({ "name": "spare", "user": "spare" })).await;
    let worker = api
        .post("/api/v1/workers/tokens", json!({ "worker": "fuzz-worker", "agents": ["quick"] }))
        .await;
    let things = make_things(&api, "authenticated").await;
    let credentials = Credentials {
        token: token["token"].as_str().unwrap().to_owned(),
        worker_token: worker["token"].as_str().unwrap().to_owned(),
        own: json!({ "token": token["id"], "user": "fuzzer" }),
    };
    let authenticated = fuzz(
        &schemathesis,
        &server.url,
        &seeds(&runs, &things, "spare", spare["id"].as_str().unwrap()),
        Some(&credentials),
        &[],
    )
    .await;
    server.stop().await;

    if let Err(report) = &local {
        eprintln!("local mode:\n{report}");
    }
    if let Err(report) = &authenticated {
        eprintln!("authenticated:\n{report}");
    }
    assert!(local.is_ok() && authenticated.is_ok(), "the server and its OpenAPI document disagree");
}
