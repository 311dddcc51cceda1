//! `drover worker`, the real binary, gets a project's secret for the attempt it runs over
//! the server's API with its service token, whether it leases tasks over HTTP or reads
//! them from Redis: its agent receives the value (it writes its SHA-256 to a file), the
//! attempt's log shows it redacted, and the read is audited as the worker's. A worker
//! whose token does not allow the task's agent type cannot fetch them: the attempt fails,
//! saying so, and the agent never runs without its secrets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use sha2::Digest;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");
const SECRET: &str = "tok-worker-5ecret-0123456789";

/// A pipeline `tell` whose agent prints the secret and writes its SHA-256 to `SEEN`.
const CONFIG: &str = r#"
[agents.telling]
command = "sh"
args = ["-c", "echo \"token=$MY_TOKEN\"; printf %s \"$MY_TOKEN\" | sha256sum | cut -d' ' -f1 > SEEN"]
retry_on_failure = false

[pipelines.tell]
[[pipelines.tell.stages]]
name = "work"
agent = "telling"
max_attempts = 1
"#;

fn drover(dir: &Path, bus: &[(&str, String)]) -> Command {
    let mut command = Command::new(DROVER);
    command
        .current_dir(dir)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_DATA_DIR")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_BUS__URL")
        .env_remove("RUST_LOG")
        .env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "500ms")
        .env("DROVER_BUS__BLOCK_TIME", "200ms")
        .env("NO_COLOR", "1")
        .envs(bus.iter().map(|(key, value)| (*key, value.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// A `drover serve` (no workers of its own) with an administrator, in its own directory.
struct Served {
    dir: tempfile::TempDir,
    server: Child,
    workers: Vec<Child>,
    url: String,
    root: String,
    http: reqwest::blocking::Client,
}

impl Served {
    /// Serves on the bus `bus` names (`DROVER_BUS__*` variables; none: the embedded bus).
    fn start(bus: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen.sha256");
        let config = CONFIG.replace("SEEN", &seen.display().to_string());
        std::fs::write(dir.path().join("drover.toml"), config).unwrap();
        let server = drover(dir.path(), bus)
            .args(["serve", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0"])
            .spawn()
            .unwrap();
        let info = dir.path().join(".drover/server.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&info)
                && let Ok(info) = serde_json::from_str::<Value>(&text)
            {
                break info["url"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "drover serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut served = Self { dir, server, workers: Vec::new(), url, root: String::new(), http };
        let password = "correct horse battery";
        served.call(
            "POST",
            "/users",
            json!({ "name": "root", "role": "admin", "password": password }),
        );
        let session =
            served.call("POST", "/auth/login", json!({ "user": "root", "password": password }));
        served.root = session["access_token"].as_str().unwrap().to_owned();
        served.call("PUT", "/secrets/MY_TOKEN", json!({ "value": SECRET }));
        served
    }

    /// An administrator's call; it must succeed.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method.clone(), format!("{}/api/v1{path}", self.url));
        if !self.root.is_empty() {
            request = request.bearer_auth(&self.root);
        }
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().unwrap();
        let status = response.status();
        let text = response.text().unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// `drover worker --agent telling` with a service token for `allowed`.
    fn worker(&mut self, name: &str, allowed: &str) {
        let token =
            self.call("POST", "/workers/tokens", json!({ "worker": name, "agents": [allowed] }));
        let token = token["token"].as_str().unwrap();
        let worker = drover(self.dir.path(), &[])
            .args(["worker", "--agent", "telling", "--server", &self.url, "--token", token])
            .spawn()
            .unwrap();
        self.workers.push(worker);
    }

    /// Submits a run of `tell` and waits for its end.
    fn run_to_end(&self) -> Value {
        let run = self.call("POST", "/runs", json!({ "request": "tell", "pipeline": "tell" }));
        let id = run["id"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = self.call("GET", &format!("/runs/{id}"), Value::Null);
            if run["status"] == "succeeded" || run["status"] == "failed" {
                return run;
            }
            assert!(Instant::now() < deadline, "the run did not end: {run}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn seen(&self) -> PathBuf {
        self.dir.path().join("seen.sha256")
    }

    fn secret_reads(&self) -> Vec<Value> {
        let audit = self.call("GET", "/audit?project=default&limit=200", Value::Null);
        let items = audit["items"].as_array().unwrap().iter();
        items.filter(|entry| entry["action"] == "secret.read").cloned().collect()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        for child in self.workers.iter_mut().chain(std::iter::once(&mut self.server)) {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn redis_bus() -> Option<Vec<(&'static str, String)>> {
    let url = drover_testkit::redis_url()?;
    Some(vec![
        ("DROVER_BUS__URL", url),
        ("DROVER_BUS__NAMESPACE", drover_testkit::unique_name("workersecrets")),
    ])
}

/// The run succeeded with the value in the agent's hands and nowhere in what it left.
fn assert_the_worker_got_the_secret(served: &Served, run: &Value) {
    assert_eq!(run["status"], "succeeded", "{run}");
    let hashed = std::fs::read_to_string(served.seen()).expect("the agent ran");
    let expected: String =
        sha2::Sha256::digest(SECRET.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hashed.trim(), expected, "the agent did not get the value");
    let id = run["id"].as_str().unwrap();
    let logs =
        served.http.get(format!("{}/api/v1/runs/{id}/logs", served.url)).bearer_auth(&served.root);
    let logs = logs.send().unwrap().text().unwrap();
    assert!(logs.contains("token=[redacted:MY_TOKEN]") && !logs.contains(SECRET), "{logs}");
    let reads = served.secret_reads();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0]["actor"], "worker w1", "{reads:?}");
}

#[test]
fn a_worker_leasing_over_http_gets_the_secret_from_the_api() {
    let mut served = Served::start(&[]);
    served.worker("w1", "telling");
    let run = served.run_to_end();
    assert_the_worker_got_the_secret(&served, &run);
}

#[test]
fn a_worker_reading_redis_gets_the_secret_from_the_api() {
    let Some(bus) = redis_bus() else { return };
    let mut served = Served::start(&bus);
    served.worker("w1", "telling");
    let run = served.run_to_end();
    assert_the_worker_got_the_secret(&served, &run);
}

#[test]
fn a_worker_that_cannot_fetch_the_secrets_fails_the_attempt_without_running_the_agent() {
    let Some(bus) = redis_bus() else { return };
    let mut served = Served::start(&bus);
    // It reads the broker directly, which takes any task; the API checks its token.
    served.worker("w1", "scaffold");
    let run = served.run_to_end();
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["attempts"][0]["error"].as_str().unwrap();
    assert!(error.contains("cannot fetch the project's secrets (MY_TOKEN)"), "{error}");
    assert!(error.contains("may not run agent type `telling`"), "{error}");
    assert!(error.contains("the agent did not run"), "{error}");
    assert!(!served.seen().exists(), "the agent ran without its secrets");
    assert!(served.secret_reads().is_empty(), "a refused fetch read a secret");
}
