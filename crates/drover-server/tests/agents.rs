//! Config-defined agents and pipelines in the real server: a command agent's output
//! followed live over `GET /runs/{id}/logs?follow=true`, and `GET /agents`.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_config::{AgentConfig, AgentKindConfig, Config, PipelineConfig, StageConfig};
use drover_server::{Mode, Server};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Says one line, waits for a gate file, says another: whoever reads the first line
/// before the gate opens is reading the log live.
const GATED: &str = "import os, sys, time\n\
print('before the gate', flush=True)\n\
while not os.path.exists(sys.argv[1]):\n\
\x20   time.sleep(0.02)\n\
print('after the gate', flush=True)\n";

/// A full server on `data_dir` whose one pipeline, `pipeline`, has one stage, `stage`,
/// done by the command agent `agent`.
struct OneStageServer {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
}

impl OneStageServer {
    async fn start(
        data_dir: std::path::PathBuf,
        (pipeline, stage): (&str, &str),
        (agent, config): (&str, AgentConfig),
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut server_config = Config { data_dir, ..Config::default() };
        server_config.server.listen = "127.0.0.1:0".parse().unwrap();
        server_config.proxy.enabled = false;
        server_config.agents = BTreeMap::from([(agent.to_owned(), config)]);
        server_config.pipelines = BTreeMap::from([(
            pipeline.to_owned(),
            PipelineConfig {
                stages: vec![StageConfig {
                    name: stage.into(),
                    agent: Some(agent.into()),
                    ..StageConfig::default()
                }],
                ..PipelineConfig::default()
            },
        )]);
        tweak(&mut server_config);
        let server = Server::build(server_config, Mode::Full).await.unwrap();
        let url = server.url();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { url, http, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

/// Reads `body` into `seen` until it holds `needle`.
async fn read_until(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    seen: &mut String,
    needle: &str,
) {
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
            .await
            .unwrap_or_else(|_| panic!("no `{needle}` in: {seen}"))
            .expect("the stream ended early")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn a_command_agents_log_streams_live_and_the_agents_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gated.py");
    std::fs::write(&script, GATED).unwrap();
    let gate = dir.path().join("gate");
    let server = OneStageServer::start(
        dir.path().join("data"),
        ("gated", "work"),
        (
            "gated",
            AgentConfig {
                kind: Some(AgentKindConfig::Command),
                command: Some("python3".into()),
                args: Some(vec![script.display().to_string(), gate.display().to_string()]),
                env: Some(BTreeMap::from([("API_KEY".to_owned(), "sk-never-shown".to_owned())])),
                ..AgentConfig::default()
            },
        ),
        |_| {},
    )
    .await;
    let (url, http) = (server.url.clone(), server.http.clone());

    let agents: Value =
        http.get(format!("{url}/api/v1/agents")).send().await.unwrap().json().await.unwrap();
    let gated = agents["items"].as_array().unwrap().iter().find(|a| a["name"] == "gated").unwrap();
    assert_eq!(gated["kind"], "command");
    assert_eq!(gated["env"], json!(["API_KEY"]));
    assert!(!agents.to_string().contains("sk-never-shown"), "a variable's value was shown");

    let run: Value = http
        .post(format!("{url}/api/v1/runs"))
        .json(&json!({ "request": "anything", "pipeline": "gated" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let response =
        http.get(format!("{url}/api/v1/runs/{id}/logs?follow=true")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    read_until(&mut body, &mut seen, "data: before the gate").await;
    assert!(seen.contains("event: attempt"), "{seen}");
    assert!(!seen.contains("after the gate"), "{seen}");
    std::fs::write(&gate, "").unwrap();
    read_until(&mut body, &mut seen, "event: end").await;
    assert!(seen.contains("data: after the gate"), "{seen}");

    let finished: Value =
        http.get(format!("{url}/api/v1/runs/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(finished["status"], "succeeded", "{finished}");
    server.stop().await;
}

#[tokio::test]
async fn an_attempt_in_a_git_workspace_leaves_its_diff_as_an_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    for args in
        [&["init", "-q", "-b", "main"][..], &["commit", "-q", "--allow-empty", "-m", "start"]]
    {
        let status = std::process::Command::new("git")
            .current_dir(&repo)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap();
        assert!(status.success());
    }
    let server = OneStageServer::start(
        dir.path().join("data"),
        ("write", "code"),
        (
            "writer",
            AgentConfig {
                command: Some("sh".into()),
                args: Some(vec!["-c".into(), "echo 'print(1)' > made_by_agent.py".into()]),
                ..AgentConfig::default()
            },
        ),
        |config| {
            (config.environments.port_range_start, config.environments.port_range_end) =
                drover_testkit::port_range(20);
        },
    )
    .await;
    let (url, http) = (server.url.clone(), server.http.clone());

    let created = http
        .post(format!("{url}/api/v1/environments"))
        .json(&json!({ "name": "feature", "repo": repo.display().to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let run: Value = http
        .post(format!("{url}/api/v1/runs"))
        .json(&json!({ "request": "add a file", "pipeline": "write", "environment": "feature" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let mut finished = Value::Null;
    for _ in 0..200 {
        finished =
            http.get(format!("{url}/api/v1/runs/{id}")).send().await.unwrap().json().await.unwrap();
        if finished["status"] == "succeeded" || finished["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let artifacts: Value = http
        .get(format!("{url}/api/v1/runs/{id}/artifacts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = artifacts["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["code.1.diff", "code.1.log"], "{artifacts}");
    let diff =
        http.get(format!("{url}/api/v1/runs/{id}/artifacts/code.1.diff")).send().await.unwrap();
    assert_eq!(diff.headers()["content-type"], "text/x-diff; charset=utf-8");
    let diff = diff.text().await.unwrap();
    assert!(diff.contains("made_by_agent.py") && diff.contains("+print(1)"), "{diff}");
    let missing =
        http.get(format!("{url}/api/v1/runs/{id}/artifacts/..%2Fdrover.db")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let problem: Value = missing.json().await.unwrap();
    assert_eq!(problem["code"], "artifact_not_found");
    server.stop().await;
}
