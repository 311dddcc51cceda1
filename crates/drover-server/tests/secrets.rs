//! Project secrets end to end in the real server: a secret set over the API reaches a
//! command agent as an environment variable, and its value appears in no response, event,
//! log, artifact or file of the data directory (the database included): everywhere it
//! would have been, `[redacted:NAME]` stands instead. The same holds for the services of
//! an environment: they run with the secrets as variables, and their logs (the file and
//! the live feed) show `[redacted:NAME]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_config::{
    AgentConfig, Config, PipelineConfig, ReadinessConfig, ServiceConfig, StageConfig,
};
use drover_domain::{RestartPolicy, Sharing};
use drover_server::{Mode, Server};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "tok-5ecret-0123456789";

/// Prints the secret every way an agent might: plain, to stderr, into a workspace file
/// (so the diff and a declared output hold it), and as its result's field and key.
const LEAKY: &str = r#"echo token=$MY_TOKEN
printf 'on stderr: %s\n' "$MY_TOKEN" >&2
printf 'TOKEN = "%s"\n' "$MY_TOKEN" > leaked.txt
echo "{\"seen\": \"$MY_TOKEN\", \"$MY_TOKEN\": 1}""#;

/// Fails with the secret in its output, so it reaches the failure's error message.
const FAILING: &str = r#"echo "cannot log in with $MY_TOKEN"; exit 3"#;

fn command_agent(script: &str) -> AgentConfig {
    AgentConfig {
        command: Some("sh".into()),
        args: Some(vec!["-c".into(), script.into()]),
        retry_on_failure: Some(false),
        ..AgentConfig::default()
    }
}

fn one_stage(agent: &str, outputs: Option<Vec<String>>) -> PipelineConfig {
    PipelineConfig {
        stages: vec![StageConfig {
            name: "work".into(),
            agent: Some(agent.into()),
            max_attempts: Some(1),
            outputs,
            ..StageConfig::default()
        }],
        ..PipelineConfig::default()
    }
}

struct SecretServer {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
}

impl SecretServer {
    async fn start(data_dir: PathBuf) -> Self {
        Self::start_with(data_dir, |_| {}).await
    }

    async fn start_with(data_dir: PathBuf, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config { data_dir, ..Config::default() };
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.proxy.enabled = false;
        (config.environments.port_range_start, config.environments.port_range_end) =
            drover_testkit::port_range(20);
        config.agents = BTreeMap::from([
            ("leaky".to_owned(), command_agent(LEAKY)),
            ("failing".to_owned(), command_agent(FAILING)),
        ]);
        config.pipelines = BTreeMap::from([
            ("leak".to_owned(), one_stage("leaky", Some(vec!["leaked.txt".into()]))),
            ("fail".to_owned(), one_stage("failing", None)),
        ]);
        tweak(&mut config);
        let server = Server::build(config, Mode::Full).await.unwrap();
        let url = server.url();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { url, http, shutdown, task }
    }

    fn at(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.url)
    }

    /// The body of a request, as text, with its status.
    async fn text(&self, request: reqwest::RequestBuilder) -> (u16, String) {
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> String {
        let (status, body) = self.text(self.http.get(self.at(path))).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn put_secret(&self, name: &str, body: Value) -> (u16, String) {
        self.text(self.http.put(self.at(&format!("/secrets/{name}"))).json(&body)).await
    }

    /// Submits a run and waits for its end; returns its id.
    async fn run_to_end(&self, pipeline: &str, environment: Option<&str>) -> String {
        let mut body = json!({ "request": "use the token", "pipeline": pipeline });
        if let Some(environment) = environment {
            body["environment"] = json!(environment);
        }
        let (status, created) = self.text(self.http.post(self.at("/runs")).json(&body)).await;
        assert_eq!(status, 201, "{created}");
        let id =
            serde_json::from_str::<Value>(&created).unwrap()["id"].as_str().unwrap().to_owned();
        for _ in 0..300 {
            let run: Value = serde_json::from_str(&self.get(&format!("/runs/{id}")).await).unwrap();
            if ["succeeded", "failed", "cancelled"].contains(&run["status"].as_str().unwrap()) {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {id} did not end");
    }

    /// Everything the API shows of a run: the run, its whole event stream (read until the
    /// run's end closes it), its logs, and every artifact.
    async fn everything_about(&self, id: &str) -> Vec<(String, String)> {
        let mut seen = vec![
            (format!("run {id}"), self.get(&format!("/runs/{id}")).await),
            ("logs".to_owned(), self.get(&format!("/runs/{id}/logs")).await),
        ];
        let events = self.http.get(self.at(&format!("/runs/{id}/events"))).send().await.unwrap();
        assert_eq!(events.headers()["content-type"], "text/event-stream");
        let mut stream = events.bytes_stream();
        let mut text = String::new();
        let read = async {
            while let Some(chunk) = stream.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read).await.expect("the stream ends");
        assert!(text.contains("run.succeeded") || text.contains("run.failed"), "{text}");
        seen.push(("events".to_owned(), text));
        let artifacts = self.get(&format!("/runs/{id}/artifacts")).await;
        let names: Vec<String> = serde_json::from_str::<Value>(&artifacts).unwrap()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect();
        seen.push(("artifacts".to_owned(), artifacts));
        for name in names {
            let body = self.get(&format!("/runs/{id}/artifacts/{name}")).await;
            seen.push((format!("artifact {name}"), body));
        }
        seen
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

fn git_repo(path: &Path) {
    std::fs::create_dir(path).unwrap();
    for args in
        [&["init", "-q", "-b", "main"][..], &["commit", "-q", "--allow-empty", "-m", "start"]]
    {
        let status = std::process::Command::new("git")
            .current_dir(path)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Every file under `dir` holding `needle`, except under `skip`.
fn files_holding(dir: &Path, needle: &[u8], skip: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        if path.starts_with(skip) {
            continue;
        }
        let Ok(metadata) = std::fs::symlink_metadata(&path) else { continue };
        if metadata.is_dir() {
            todo.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if metadata.is_file()
            && std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn a_secret_reaches_the_agent_and_its_value_appears_in_no_response_event_log_or_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    git_repo(&dir.path().join("repo"));
    let server = SecretServer::start(data_dir.clone()).await;

    let key_file = data_dir.join("secrets/master.key");
    let mode = std::fs::metadata(&key_file).expect("the master key is made on start");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);

    // Set it (twice: created, then replaced), and refuse bad names and values without ever
    // quoting the value.
    let mut responses = Vec::new();
    let (status, body) =
        server.put_secret("MY_TOKEN", json!({ "value": "tok-first-0123456789" })).await;
    assert_eq!(status, 201, "{body}");
    responses.push(body);
    let (status, body) = server.put_secret("MY_TOKEN", json!({ "value": SECRET })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["name"], "MY_TOKEN");
    responses.push(body);
    let (status, body) = server.put_secret("my-token", json!({ "value": SECRET })).await;
    assert_eq!(status, 422, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["code"], "validation_failed");
    assert_eq!(problem["errors"][0]["field"], "name");
    responses.push(body);
    let (status, body) = server.put_secret("SHORT", json!({ "value": "tok-5ec" })).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["errors"][0]["field"], "value");
    assert!(!body.contains("tok-5ec"), "{body}");
    let (status, body) = server.put_secret("MY_TOKEN", json!({ "value": SECRET, "x": 1 })).await;
    assert_eq!(status, 422, "{body}");
    responses.push(body);

    let created = server
        .http
        .post(server.at("/environments"))
        .json(&json!({ "name": "feature", "repo": dir.path().join("repo").display().to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let workspace =
        PathBuf::from(created.json::<Value>().await.unwrap()["workspace"].as_str().unwrap());

    // The agent sees it and prints it every way it can.
    let leak = server.run_to_end("leak", Some("feature")).await;
    let run: Value = serde_json::from_str(&server.get(&format!("/runs/{leak}")).await).unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        std::fs::read_to_string(workspace.join("leaked.txt")).unwrap(),
        format!("TOKEN = \"{SECRET}\"\n"),
        "the agent did not get the secret"
    );
    let output = &run["attempts"][0]["output"];
    assert_eq!(output["seen"], "[redacted:MY_TOKEN]", "{run}");
    assert_eq!(output["[redacted:MY_TOKEN]"], 1, "{run}");

    let mut seen = server.everything_about(&leak).await;
    let logs = &seen.iter().find(|(what, _)| what == "logs").unwrap().1;
    assert!(logs.contains("token=[redacted:MY_TOKEN]"), "{logs}");
    assert!(logs.contains("on stderr: [redacted:MY_TOKEN]"), "{logs}");
    let artifact = |name: &str| seen.iter().find(|(what, _)| what == name).map(|(_, body)| body);
    let diff = artifact("artifact work.1.diff").expect("a diff artifact");
    assert!(diff.contains("+TOKEN = \"[redacted:MY_TOKEN]\""), "{diff}");
    let kept = artifact("artifact work.1.outputs/leaked.txt").expect("the declared output");
    assert_eq!(kept, "TOKEN = \"[redacted:MY_TOKEN]\"\n");

    // A failure quoting it: the error of the attempt, the run and its events.
    let fail = server.run_to_end("fail", None).await;
    let failed: Value = serde_json::from_str(&server.get(&format!("/runs/{fail}")).await).unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["attempts"][0]["error"].as_str().unwrap();
    assert!(error.contains("cannot log in with [redacted:MY_TOKEN]"), "{error}");
    seen.extend(server.everything_about(&fail).await);

    let listed = server.get("/secrets").await;
    let items = serde_json::from_str::<Value>(&listed).unwrap()["items"].clone();
    assert_eq!(items.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(items[0]["name"], "MY_TOKEN");
    seen.push(("secrets".to_owned(), listed));
    seen.extend(responses.into_iter().map(|body| ("a PUT response".to_owned(), body)));
    seen.push(("openapi".to_owned(), server.get("/openapi.json").await));

    for (what, body) in &seen {
        assert!(!body.contains(SECRET), "the value is in {what}: {body}");
        assert!(!body.contains("tok-first"), "the first value is in {what}: {body}");
    }

    let (status, body) = server.text(server.http.delete(server.at("/secrets/MY_TOKEN"))).await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = server.text(server.http.delete(server.at("/secrets/MY_TOKEN"))).await;
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], "secret_not_found");
    server.stop().await;

    // Nothing the server keeps holds the value: not the database (events, outputs, errors,
    // the sealed secret), not a log, transcript or artifact. Only the agent's own work tree
    // does, where the agent wrote it.
    let holding = files_holding(&data_dir, SECRET.as_bytes(), &workspace);
    assert!(holding.is_empty(), "the value is stored in clear in {holding:?}");
    let everywhere = files_holding(&data_dir, SECRET.as_bytes(), Path::new("/nonexistent"));
    assert_eq!(everywhere, [workspace.join("leaked.txt")], "the scan looks everywhere");
}

/// A service of every environment that shows what it was given: it prints its token and
/// a declared variable, writes the token into its workspace, and serves that directory on
/// `$PORT` (its request log, on stderr, quotes what clients ask for).
fn telling_service() -> ServiceConfig {
    let script = r#"echo "token=$MY_TOKEN api=$API_URL"
printf '%s' "$MY_TOKEN" > seen.txt
exec python3 -m http.server "$PORT" --bind 127.0.0.1"#;
    ServiceConfig {
        image: None,
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::from([("API_URL".to_owned(), "declared-in-config".to_owned())]),
        ports: vec!["http".into()],
        readiness: Some(ReadinessConfig {
            http: Some("/".into()),
            tcp: false,
            exec: None,
            log: None,
            port: None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(20),
            threshold: 1,
        }),
        depends_on: BTreeMap::new(),
        restart: RestartPolicy::OnFailure,
        restart_backoff: Duration::from_millis(200),
        restart_backoff_max: Duration::from_secs(2),
        restart_reset_after: Duration::from_secs(60),
        max_restarts: 3,
        restart_window: Duration::from_secs(60),
        stop_grace: Duration::from_secs(2),
        memory_limit: None,
        sharing: Sharing::PerEnv,
        address: None,
        log_max_bytes: 1 << 20,
        log_keep: 1,
    }
}

impl SecretServer {
    /// Waits until the environment runs with its service ready; returns the service's port.
    async fn wait_ready(&self, env: &str, restarts: u64) -> u16 {
        for _ in 0..300 {
            let view: Value =
                serde_json::from_str(&self.get(&format!("/environments/{env}")).await).unwrap();
            let service = &view["services"][0];
            if view["status"] == "running"
                && service["status"] == "ready"
                && service["restarts"].as_u64() == Some(restarts)
            {
                return service["ports"]["http"].as_u64().unwrap().try_into().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{env} never had its service ready");
    }

    /// Reads the followed log (SSE) until a line holds `needle`; returns the text read.
    async fn follow_until(&self, follow: reqwest::Response, needle: &str) -> String {
        assert_eq!(follow.headers()["content-type"], "text/event-stream");
        let mut stream = follow.bytes_stream();
        let mut text = String::new();
        let read = async {
            while let Some(chunk) = stream.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                if text.contains(needle) {
                    return;
                }
            }
        };
        let found = tokio::time::timeout(Duration::from_secs(20), read).await;
        assert!(found.is_ok(), "no line with {needle} followed: {text}");
        text
    }
}

#[tokio::test]
async fn services_of_an_environment_get_the_secrets_and_their_logs_show_no_value() {
    const SECOND: &str = "tok-second-9876543210";
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = SecretServer::start_with(data_dir.clone(), |config| {
        config.services = BTreeMap::from([("web".to_owned(), telling_service())]);
    })
    .await;
    // Set before the environment exists. `API_URL` and `PORT` are shadowed: the service's
    // declared variable and drover's own win (were `PORT` the secret, nothing would answer).
    for (name, value) in
        [("MY_TOKEN", SECRET), ("API_URL", "tok-api-shadowed-0123"), ("PORT", "tok-port-0123456")]
    {
        let (status, body) = server.put_secret(name, json!({ "value": value })).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, created) = server
        .text(server.http.post(server.at("/environments")).json(&json!({ "name": "feature" })))
        .await;
    assert_eq!(status, 201, "{created}");
    let workspace = PathBuf::from(
        serde_json::from_str::<Value>(&created).unwrap()["workspace"].as_str().unwrap(),
    );
    let port = server.wait_ready("feature", 0).await;

    // The service saw the value: it serves what it wrote.
    let page = |query: &str| {
        let url = format!("http://127.0.0.1:{port}/seen.txt{query}");
        let http = server.http.clone();
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(page("").await, SECRET, "the service did not get the secret");

    // Live: a request quoting the value is logged, redacted, to followers.
    let follow = server
        .http
        .get(server.at("/environments/feature/services/web/logs?follow=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    let ask = tokio::spawn(page(&format!("?{SECRET}")));
    let followed = server.follow_until(follow, "GET /seen.txt?").await;
    assert_eq!(ask.await.unwrap(), SECRET);
    assert!(followed.contains("GET /seen.txt?[redacted:MY_TOKEN] HTTP/1.1"), "{followed}");

    // The file: what it printed on start, and the request, redacted.
    let log = server.get("/environments/feature/services/web/logs").await;
    assert!(log.contains("token=[redacted:MY_TOKEN] api=declared-in-config\n"), "{log}");
    assert!(log.contains("GET /seen.txt?[redacted:MY_TOKEN] HTTP/1.1"), "{log}");

    let mut seen = vec![
        ("followed log".to_owned(), followed),
        ("log".to_owned(), log),
        ("environment".to_owned(), server.get("/environments/feature").await),
        ("environments".to_owned(), server.get("/environments").await),
        ("services".to_owned(), server.get("/environments/feature/services").await),
        ("all services".to_owned(), server.get("/services").await),
    ];

    // A changed secret reaches the service when it restarts.
    let (status, body) = server.put_secret("MY_TOKEN", json!({ "value": SECOND })).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .text(server.http.post(server.at("/environments/feature/services/web/restart")))
        .await;
    assert_eq!(status, 202, "{body}");
    let port_after = server.wait_ready("feature", 1).await;
    assert_eq!(port_after, port);
    assert_eq!(page("").await, SECOND, "the restarted service did not get the new value");
    let log = server.get("/environments/feature/services/web/logs").await;
    assert_eq!(log.matches("token=[redacted:MY_TOKEN] api=declared-in-config").count(), 2, "{log}");
    seen.push(("log after the restart".to_owned(), log));
    seen.push(("environment after".to_owned(), server.get("/environments/feature").await));

    // Each start read the secrets once, audited as the environment's.
    let audit: Value = serde_json::from_str(&server.get("/audit?limit=200").await).unwrap();
    let reads: Vec<&Value> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "secret.read" && e["target"] == "MY_TOKEN")
        .collect();
    assert_eq!(reads.len(), 2, "{audit}");
    assert!(
        reads.iter().all(|e| e["actor"] == "environment feature" && e["reason"] == "service web"),
        "{audit}"
    );

    for (what, body) in &seen {
        for value in [SECRET, SECOND, "tok-api-shadowed", "tok-port-0123456"] {
            assert!(!body.contains(value), "{value} is in the {what}: {body}");
        }
    }
    server.stop().await;

    // Only the service's own work tree holds a value, where it wrote it.
    for value in [SECRET, SECOND] {
        let holding = files_holding(&data_dir, value.as_bytes(), &workspace);
        assert!(holding.is_empty(), "{value} is stored in clear in {holding:?}");
    }
    let everywhere = files_holding(&data_dir, SECOND.as_bytes(), Path::new("/nonexistent"));
    assert_eq!(everywhere, [workspace.join("seen.txt")], "the scan looks everywhere");
}
