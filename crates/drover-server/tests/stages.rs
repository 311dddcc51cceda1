//! Stage features of config-defined pipelines in the real server: `needs` (independent
//! stages overlap in time, a join waits for both), `approval` (the run waits in
//! `waiting_approval` until approved or rejected over the API), `when` (a stage whose
//! condition does not hold is skipped), `policy` (touching a protected path or running a
//! command outside the allowed list fails the stage, naming the rule) and declared
//! `outputs` kept as artifacts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_config::{AgentConfig, Config, PipelineConfig, PolicyConfig, StageConfig};
use drover_server::{Mode, Server};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Writes `<dir>/<stage>.start`, sleeps, writes `<dir>/<stage>.end` (wall-clock seconds),
/// and reports `{"ok": <third argument>}` on its last line.
const STAMP: &str = "import sys, time\n\
dir, stage, ok = sys.argv[1], sys.argv[2], sys.argv[3]\n\
open(f'{dir}/{stage}.start', 'w').write(repr(time.time()))\n\
time.sleep(float(sys.argv[4]))\n\
open(f'{dir}/{stage}.end', 'w').write(repr(time.time()))\n\
print('{\"ok\": %s}' % ok)\n";

struct TestServer {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
}

impl TestServer {
    async fn start(
        data_dir: PathBuf,
        agents: BTreeMap<String, AgentConfig>,
        pipelines: BTreeMap<String, PipelineConfig>,
    ) -> Self {
        let mut config = Config { data_dir, ..Config::default() };
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.proxy.enabled = false;
        config.agents = agents;
        config.pipelines = pipelines;
        let server = Server::build(config, Mode::Full).await.unwrap();
        let url = server.url();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { url, http, shutdown, task }
    }

    async fn submit(&self, pipeline: &str) -> String {
        let response = self
            .http
            .post(format!("{}/api/v1/runs", self.url))
            .json(&json!({ "request": "stage features", "pipeline": pipeline }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let run: Value = response.json().await.unwrap();
        run["id"].as_str().unwrap().to_owned()
    }

    async fn run(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/api/v1/runs/{id}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the run until `done` says so (at most 30 s).
    async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut run = Value::Null;
        for _ in 0..300 {
            run = self.run(id).await;
            if done(&run) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {id} never reached the expected state: {run:#}");
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.post(format!("{}/api/v1{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

fn finished(run: &Value) -> bool {
    matches!(run["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// The `stamp` command agent: `STAMP` run with python3, stamps into `stamps`.
fn stamp_agent(script: &Path, stamps: &Path, ok: &str, seconds: &str) -> AgentConfig {
    AgentConfig {
        command: Some("python3".into()),
        args: Some(vec![
            script.display().to_string(),
            stamps.display().to_string(),
            "{stage}".into(),
            ok.into(),
            seconds.into(),
        ]),
        retry_on_failure: Some(false),
        ..AgentConfig::default()
    }
}

fn stage(name: &str, agent: &str, needs: Option<&[&str]>) -> StageConfig {
    StageConfig {
        name: name.into(),
        agent: Some(agent.into()),
        needs: needs.map(|n| n.iter().map(|s| (*s).to_owned()).collect()),
        max_attempts: Some(1),
        ..StageConfig::default()
    }
}

fn pipeline(stages: Vec<StageConfig>) -> PipelineConfig {
    PipelineConfig { stages, ..PipelineConfig::default() }
}

fn stamp(stamps: &Path, name: &str) -> f64 {
    std::fs::read_to_string(stamps.join(name)).unwrap().parse().unwrap()
}

fn attempts(run: &Value) -> Vec<(String, String)> {
    run["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (a["stage"].as_str().unwrap().to_owned(), a["status"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn independent_stages_overlap_and_a_join_waits_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let (script, stamps) = (dir.path().join("stamp.py"), dir.path().join("stamps"));
    std::fs::write(&script, STAMP).unwrap();
    std::fs::create_dir(&stamps).unwrap();
    let server = TestServer::start(
        dir.path().join("data"),
        BTreeMap::from([("stamp".to_owned(), stamp_agent(&script, &stamps, "true", "1.0"))]),
        BTreeMap::from([(
            "fan".to_owned(),
            pipeline(vec![
                stage("prepare", "stamp", None),
                stage("lint", "stamp", Some(&["prepare"])),
                stage("test", "stamp", Some(&["prepare"])),
                stage("ship", "stamp", Some(&["lint", "test"])),
            ]),
        )]),
    )
    .await;

    let pipelines: Value = server
        .http
        .get(format!("{}/api/v1/pipelines", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fan = pipelines["items"].as_array().unwrap().iter().find(|p| p["name"] == "fan").unwrap();
    assert_eq!(fan["stages"][3]["needs"], json!(["lint", "test"]), "{fan}");

    let id = server.submit("fan").await;
    let run = server.wait_for(&id, finished).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");

    let (lint, test) = (
        (stamp(&stamps, "lint.start"), stamp(&stamps, "lint.end")),
        (stamp(&stamps, "test.start"), stamp(&stamps, "test.end")),
    );
    assert!(lint.0 < test.1 && test.0 < lint.1, "lint {lint:?} and test {test:?} did not overlap");
    assert!(stamp(&stamps, "lint.start") >= stamp(&stamps, "prepare.end"));
    let ship = stamp(&stamps, "ship.start");
    assert!(ship >= lint.1 && ship >= test.1, "ship started before lint and test ended");
    server.stop().await;
}

#[tokio::test]
async fn a_gated_stage_waits_for_approval_and_a_rejection_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (script, stamps) = (dir.path().join("stamp.py"), dir.path().join("stamps"));
    std::fs::write(&script, STAMP).unwrap();
    std::fs::create_dir(&stamps).unwrap();
    let gated = StageConfig { approval: Some(true), ..stage("deploy", "stamp", None) };
    let server = TestServer::start(
        dir.path().join("data"),
        BTreeMap::from([("stamp".to_owned(), stamp_agent(&script, &stamps, "true", "0"))]),
        BTreeMap::from([(
            "gated".to_owned(),
            pipeline(vec![stage("build", "stamp", None), gated]),
        )]),
    )
    .await;

    // Approved: the run waits, the stage has not run, then it runs and the run succeeds.
    let id = server.submit("gated").await;
    let waiting = server.wait_for(&id, |r| r["status"] == "waiting_approval").await;
    assert_eq!(
        attempts(&waiting),
        [("build".into(), "succeeded".into()), ("deploy".into(), "waiting_approval".into())]
    );
    assert!(!stamps.join("deploy.start").exists(), "the gated stage ran before approval");
    let (status, problem) = server.post(&format!("/runs/{id}/stages/build/approve"), None).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("not_waiting_approval")),
        "{problem}"
    );
    let (status, approved) = server
        .post(&format!("/runs/{id}/stages/deploy/approve"), Some(json!({ "reason": "looks good" })))
        .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "running");
    let done = server.wait_for(&id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert!(stamps.join("deploy.end").exists());
    let (status, _) = server.post(&format!("/runs/{id}/stages/deploy/approve"), None).await;
    assert_eq!(status, 409, "a finished run cannot be approved again");

    // Rejected: the stage never runs, the run fails with the reason.
    std::fs::remove_file(stamps.join("deploy.start")).unwrap();
    let id = server.submit("gated").await;
    server.wait_for(&id, |r| r["status"] == "waiting_approval").await;
    let (status, problem) =
        server.post(&format!("/runs/{id}/stages/deploy/reject"), Some(json!({}))).await;
    assert_eq!((status, problem["code"].as_str()), (422, Some("validation_failed")), "{problem}");
    let (status, rejected) = server
        .post(&format!("/runs/{id}/stages/deploy/reject"), Some(json!({ "reason": "not today" })))
        .await;
    assert_eq!(status, 200, "{rejected}");
    assert_eq!(rejected["status"], "failed");
    let error = rejected["error"].as_str().unwrap();
    assert!(error.contains("deploy") && error.contains("rejected by local: not today"), "{error}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stamps.join("deploy.start").exists(), "a rejected stage ran");
    server.stop().await;
}

#[tokio::test]
async fn a_false_condition_skips_a_stage_and_policy_violations_fail_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let (script, stamps) = (dir.path().join("stamp.py"), dir.path().join("stamps"));
    std::fs::write(&script, STAMP).unwrap();
    std::fs::create_dir(&stamps).unwrap();
    let agents = BTreeMap::from([
        ("says-no".to_owned(), stamp_agent(&script, &stamps, "false", "0")),
        ("stamp".to_owned(), stamp_agent(&script, &stamps, "true", "0")),
        (
            "writer".to_owned(),
            AgentConfig {
                command: Some("sh".into()),
                args: Some(vec![
                    "-c".into(),
                    "mkdir -p reports migrations && echo '<ok/>' > reports/junit.xml \
                     && echo 'drop table users;' > migrations/001.sql"
                        .into(),
                ]),
                retry_on_failure: Some(false),
                ..AgentConfig::default()
            },
        ),
    ]);
    let conditional =
        StageConfig { when: Some("check.output.ok".into()), ..stage("deploy", "stamp", None) };
    let protected = StageConfig {
        policy: Some(PolicyConfig {
            protected_paths: Some(vec!["migrations/**".into()]),
            ..PolicyConfig::default()
        }),
        ..stage("write", "writer", None)
    };
    let restricted = StageConfig {
        policy: Some(PolicyConfig {
            allowed_commands: Some(vec!["cargo".into()]),
            ..PolicyConfig::default()
        }),
        ..stage("build", "stamp", None)
    };
    let kept = StageConfig {
        outputs: Some(vec!["reports/*.xml".into()]),
        ..stage("write", "writer", None)
    };
    let pipelines = BTreeMap::from([
        (
            "cond".to_owned(),
            pipeline(vec![
                stage("check", "says-no", None),
                conditional,
                stage("after", "stamp", None),
            ]),
        ),
        ("guarded".to_owned(), pipeline(vec![protected])),
        ("restricted".to_owned(), pipeline(vec![restricted])),
        ("outputs".to_owned(), pipeline(vec![kept])),
    ]);
    let server = TestServer::start(dir.path().join("data"), agents, pipelines).await;

    let id = server.submit("cond").await;
    let run = server.wait_for(&id, finished).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        attempts(&run),
        [
            ("check".into(), "succeeded".into()),
            ("deploy".into(), "skipped".into()),
            ("after".into(), "succeeded".into())
        ]
    );
    assert!(!stamps.join("deploy.start").exists(), "a skipped stage ran");

    let id = server.submit("guarded").await;
    let run = server.wait_for(&id, finished).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("`migrations/001.sql`") && error.contains("rule `migrations/**`"),
        "{error}"
    );
    assert_eq!(run["attempts"].as_array().unwrap().len(), 1, "a policy violation is not retried");

    let id = server.submit("restricted").await;
    let run = server.wait_for(&id, finished).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let error = run["error"].as_str().unwrap();
    assert!(error.contains("may not run `python3`") && error.contains("[cargo]"), "{error}");
    assert!(!stamps.join("build.start").exists(), "a refused command ran");

    let id = server.submit("outputs").await;
    let run = server.wait_for(&id, finished).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let artifacts: Value = server
        .http
        .get(format!("{}/api/v1/runs/{id}/artifacts?stage=write", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let output = artifacts["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "output")
        .unwrap_or_else(|| panic!("no output artifact: {artifacts}"));
    assert_eq!(output["name"], "write.1.outputs/reports/junit.xml");
    let download = server
        .http
        .get(format!("{}/api/v1/runs/{id}/artifacts/write.1.outputs/reports/junit.xml", server.url))
        .send()
        .await
        .unwrap();
    // A declared output may hold anything: it is bytes to save, under its own name.
    assert_eq!(download.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        download.headers()["content-disposition"],
        "attachment; filename=\"junit.xml\"; filename*=UTF-8''junit.xml"
    );
    assert_eq!(download.text().await.unwrap().trim(), "<ok/>");
    server.stop().await;
}
