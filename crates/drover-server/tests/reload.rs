//! Reloading `[agents]` and `[pipelines]` in a running server: a pipeline added to
//! drover.toml (with a new command agent) is served and runs once the file watch or a
//! SIGHUP picks it up, and a broken file changes nothing.
//!
//! The server runs in this process, so the SIGHUP test raises the signal here: the other
//! test's server reloads too, which is harmless (it reads its own file).

use std::path::Path;
use std::time::{Duration, Instant};

use drover_config::{ConfigSource, Overrides};
use drover_server::{ConfigReload, Mode, Server};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A drover.toml on `data_dir` whose agent `hi` runs `/bin/sh -c "echo hi"`, with
/// `pipelines` after it.
fn config_text(data_dir: &Path, pipelines: &str) -> String {
    format!(
        "data_dir = \"{}\"\n\
         [server]\nlisten = \"127.0.0.1:0\"\n\
         [proxy]\nenabled = false\n\
         [engine]\nheartbeat_interval = \"500ms\"\n\
         [agents.hi]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"echo hi\"]\n\
         {pipelines}",
        data_dir.display()
    )
}

const P1: &str = "[[pipelines.p1.stages]]\nname = \"work\"\nagent = \"hi\"\n";

/// `p2`'s stage is done by `hi2`, an agent the server did not have at start.
const P2: &str = "[agents.hi2]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"echo hi again\"]\n\
                  [[pipelines.p2.stages]]\nname = \"greet\"\nagent = \"hi2\"\n";

/// Replaces the file in one step, so no reload reads it half written.
fn write(file: &Path, text: &str) {
    let partial = file.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, file).unwrap();
}

struct TestServer {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
}

impl TestServer {
    /// A full server loaded from `file` the way `drover up` loads it, reloading per
    /// `watch` (see [`ConfigReload::watch_every`]).
    async fn start(file: &Path, watch: Option<Duration>) -> Self {
        let source = ConfigSource::new(Some(file), Overrides::default());
        let config = source.load().expect("the first file is valid");
        let reload = ConfigReload::new(source).watch_every(watch);
        let server = Server::build(config, Mode::Full).await.unwrap().reload_from(reload);
        let url = server.url();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let server = Self { url, http, shutdown, task };
        assert_eq!(server.pipelines().await, ["p1", "sdlc"]);
        server
    }

    async fn pipelines(&self) -> Vec<String> {
        let list: Value = self
            .http
            .get(format!("{}/api/v1/pipelines", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut names: Vec<String> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    }

    /// Waits (up to 10 s) until `pipeline` is served.
    async fn wait_for_pipeline(&self, pipeline: &str) {
        let started = Instant::now();
        while !self.pipelines().await.iter().any(|name| name == pipeline) {
            assert!(started.elapsed() < Duration::from_secs(10), "{pipeline} never appeared");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `pipeline` to its end and returns the finished run.
    async fn run(&self, pipeline: &str) -> Value {
        let response = self
            .http
            .post(format!("{}/api/v1/runs", self.url))
            .json(&json!({ "request": "say hi", "pipeline": pipeline }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let run: Value = response.json().await.unwrap();
        let id = run["id"].as_str().unwrap().to_owned();
        let started = Instant::now();
        loop {
            let run: Value = self
                .http
                .get(format!("{}/api/v1/runs/{id}", self.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if matches!(run["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return run;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "run {id} did not finish: {run}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_changed_file_is_reloaded_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("drover.toml");
    write(&file, &config_text(&data, P1));
    // The default: the file is looked at every two seconds.
    let server = TestServer::start(&file, Some(drover_server::reload::WATCH_INTERVAL)).await;

    write(&file, &config_text(&data, &format!("{P1}{P2}")));
    server.wait_for_pipeline("p2").await;
    let run = server.run("p2").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let agents: Value = server
        .http
        .get(format!("{}/api/v1/agents", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        agents["items"].as_array().unwrap().iter().any(|a| a["name"] == "hi2"),
        "the agents list did not follow the reload: {agents}"
    );

    // A file that does not load (were it applied, p2 would be gone) is refused as a whole.
    write(&file, &config_text(&data, &format!("{P1}[pipelines.p3]\nextends = \"nope\"\n")));
    tokio::time::sleep(drover_server::reload::WATCH_INTERVAL * 2 + Duration::from_millis(500))
        .await;
    assert_eq!(server.pipelines().await, ["p1", "p2", "sdlc"]);
    let run = server.run("p2").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let run = server.run("p1").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    server.stop().await;
}

#[tokio::test]
async fn sighup_reloads_a_file_that_is_not_watched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("drover.toml");
    write(&file, &config_text(&data, P1));
    // SIGHUP only: the server is serving, so its handler is in place.
    let server = TestServer::start(&file, None).await;

    write(&file, &config_text(&data, &format!("{P1}{P2}")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.pipelines().await, ["p1", "sdlc"], "reloaded without a SIGHUP");
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    server.wait_for_pipeline("p2").await;
    let run = server.run("p2").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    server.stop().await;
}
