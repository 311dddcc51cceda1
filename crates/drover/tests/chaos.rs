//! Chaos tests: the real `drover serve` and `drover worker` processes on a broker of the
//! test's own (a private `redis-server` or `nats-server`), with something killed in the
//! middle of the runs. Whatever dies, every run must finish, and the event log must show
//! every stage committed exactly once.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_testkit::{PrivateNats, PrivateRedis};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const DROVER: &str = env!("CARGO_BIN_EXE_drover");
const STAGES: [&str; 5] = ["scaffold", "validate", "e2e", "integration", "deploy"];

enum Broker {
    Redis(PrivateRedis),
    Nats(PrivateNats),
}

impl Broker {
    fn start(kind: &str) -> Option<Self> {
        match kind {
            "redis" => PrivateRedis::start().map(Broker::Redis),
            _ => PrivateNats::start().map(Broker::Nats),
        }
    }

    fn url(&self) -> String {
        match self {
            Broker::Redis(redis) => redis.url(),
            Broker::Nats(nats) => nats.url(),
        }
    }

    fn restart_empty(&mut self) {
        match self {
            Broker::Redis(redis) => redis.restart_empty(),
            Broker::Nats(nats) => nats.restart_empty(),
        }
    }
}

/// A server and two workers on one broker, in one directory.
struct Cluster {
    dir: tempfile::TempDir,
    broker: Broker,
    server: Child,
    url: String,
    workers: Vec<Child>,
    http: reqwest::blocking::Client,
}

/// Sets the cluster's configuration and sends the process's stderr to `log`.
fn env(command: &mut Command, broker_url: &str, log: &Path) {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    command
        .env_remove("DROVER_SERVER")
        .env_remove("RUST_LOG")
        .env("DROVER_BUS__URL", broker_url)
        // Leases of 1.5 s: six clusters run at once on two cores, and a shorter lease
        // can lapse under that load alone, spending a stage's attempts on no failure.
        .env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "1s")
        .env("DROVER_BUS__CLAIM_IDLE", "2s")
        .env("DROVER_BUS__BLOCK_TIME", "200ms")
        .env("DROVER_ENGINE__REDISPATCH_AFTER", "1s")
        .env("DROVER_SERVER__SHUTDOWN_GRACE", "2s")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
}

impl Cluster {
    fn start(kind: &str) -> Option<Self> {
        let broker = Broker::start(kind)?;
        let dir = tempfile::tempdir().unwrap();
        let (server, url) = start_server(dir.path(), &broker.url());
        let mut cluster = Self {
            dir,
            broker,
            server,
            url,
            workers: Vec::new(),
            http: reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        for _ in 0..2 {
            cluster.add_worker();
        }
        cluster.wait_for_live_workers(2);
        Some(cluster)
    }

    fn add_worker(&mut self) {
        let mut command = Command::new(DROVER);
        command.current_dir(self.dir.path()).args([
            "worker",
            "--agent",
            "all",
            "--concurrency",
            "2",
            "--server",
            &self.url,
        ]);
        env(&mut command, &self.broker.url(), &self.dir.path().join("workers.log"));
        self.workers.push(command.spawn().unwrap());
    }

    fn wait_for_live_workers(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let workers: Value = self.get("/api/v1/workers");
            let live = workers["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["status"] == "live")
                .count();
            if live >= count {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not register: {workers}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.url)).send().unwrap().json().unwrap()
    }

    fn submit(&self, request: &str) -> String {
        let run: Value = self
            .http
            .post(format!("{}/api/v1/runs", self.url))
            .json(&json!({ "request": request }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        run["id"].as_str().unwrap().to_owned()
    }

    /// Blocks until an event matching `wanted` is committed (from any run).
    fn wait_for_event(&self, run: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let response =
            self.http.get(format!("{}/api/v1/runs/{run}/events", self.url)).send().unwrap();
        for line in std::io::BufReader::new(response).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:"))
            else {
                continue;
            };
            let event: Value = serde_json::from_str(data).unwrap();
            if wanted(&event) {
                return event;
            }
        }
        panic!("the run ended before the awaited event");
    }

    fn wait_all_finished(&self, runs: &[String]) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        runs.iter()
            .map(|id| {
                loop {
                    let run = self
                        .http
                        .get(format!("{}/api/v1/runs/{id}", self.url))
                        .send()
                        .and_then(|r| r.json::<Value>());
                    if let Ok(run) = run
                        && matches!(
                            run["status"].as_str(),
                            Some("succeeded" | "failed" | "cancelled")
                        )
                    {
                        break run;
                    }
                    assert!(Instant::now() < deadline, "run {id} did not finish");
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .collect()
    }

    /// The run's whole event log, replayed.
    fn events(&self, run: &str) -> Vec<Value> {
        let response =
            self.http.get(format!("{}/api/v1/runs/{run}/events", self.url)).send().unwrap();
        std::io::BufReader::new(response)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                line.strip_prefix("data: ").and_then(|d| serde_json::from_str(d).ok())
            })
            .collect()
    }

    /// Every run succeeded, and its event log commits each stage exactly once.
    fn assert_each_stage_committed_once(&self, runs: &[String]) {
        for run in self.wait_all_finished(runs) {
            let id = run["id"].as_str().unwrap();
            assert_eq!(run["status"], "succeeded", "{run}");
            let mut committed: HashMap<String, usize> = HashMap::new();
            for event in self.events(id) {
                if event["kind"] == "stage.succeeded" {
                    *committed
                        .entry(event["payload"]["stage"].as_str().unwrap().to_owned())
                        .or_default() += 1;
                }
            }
            for stage in STAGES {
                assert_eq!(
                    committed.get(stage),
                    Some(&1),
                    "run {id}: stage {stage} committed {:?} times",
                    committed.get(stage)
                );
            }
            let attempts = run["attempts"].as_array().unwrap();
            for stage in STAGES {
                let succeeded = attempts
                    .iter()
                    .filter(|a| a["stage"] == stage && a["status"] == "succeeded")
                    .count();
                assert_eq!(succeeded, 1, "run {id}: {stage}");
            }
        }
    }

    fn kill_server(&mut self) {
        kill(Pid::from_raw(self.server.id() as i32), Signal::SIGKILL).unwrap();
        self.server.wait().unwrap();
    }

    fn restart_server(&mut self) {
        let (server, url) = start_server(self.dir.path(), &self.broker.url());
        self.server = server;
        self.url = url;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["server.log", "workers.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- last lines of {log} ---");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        for worker in &mut self.workers {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn start_server(dir: &Path, broker_url: &str) -> (Child, String) {
    let data_dir = dir.join(".drover");
    let _ = std::fs::remove_file(data_dir.join("server.json"));
    let mut command = Command::new(DROVER);
    command.current_dir(dir).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
    ]);
    env(&mut command, broker_url, &dir.join("server.log"));
    let child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        if let Some(url) = std::fs::read_to_string(data_dir.join("server.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|info| info["url"].as_str().map(str::to_owned))
        {
            break url;
        }
        assert!(Instant::now() < deadline, "drover serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    (child, url)
}

fn submit_batch(cluster: &Cluster) -> Vec<String> {
    ["Hello World API", "Todo API", "Static Site", "Hello World API"]
        .iter()
        .map(|r| cluster.submit(r))
        .collect()
}

fn sigkill_a_worker_mid_stage(kind: &str) {
    let Some(mut cluster) = Cluster::start(kind) else { return };
    let runs = submit_batch(&cluster);
    // The worker that starts the first e2e stage dies in the middle of it.
    let running = cluster.wait_for_event(&runs[0], |e| {
        e["kind"] == "stage.running" && e["payload"]["stage"] == "e2e"
    });
    let victim = running["payload"]["worker_id"].as_str().unwrap().to_owned();
    let position = cluster
        .workers
        .iter()
        .position(|w| victim.ends_with(&format!("-{}", w.id())))
        .expect("the worker that runs the stage is one of ours");
    let mut doomed = cluster.workers.remove(position);
    kill(Pid::from_raw(doomed.id() as i32), Signal::SIGKILL).unwrap();
    doomed.wait().unwrap();
    cluster.add_worker();

    cluster.assert_each_stage_committed_once(&runs);
    let run: Value = cluster.get(&format!("/api/v1/runs/{}", runs[0]));
    let e2e: Vec<&Value> =
        run["attempts"].as_array().unwrap().iter().filter(|a| a["stage"] == "e2e").collect();
    assert!(e2e.len() >= 2, "the killed stage was retried: {run}");
    assert!(e2e[0]["error"].as_str().unwrap_or_default().contains("lease expired"), "{run}");
    assert_ne!(e2e.last().unwrap()["worker_id"], victim.as_str(), "retried on another worker");
}

fn sigkill_the_server_mid_run(kind: &str) {
    let Some(mut cluster) = Cluster::start(kind) else { return };
    let runs = submit_batch(&cluster);
    cluster.wait_for_event(&runs[0], |e| {
        e["kind"] == "stage.succeeded" && e["payload"]["stage"] == "validate"
    });
    cluster.kill_server();
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart_server();
    cluster.assert_each_stage_committed_once(&runs);
}

fn broker_loses_its_data_mid_run(kind: &str) {
    let Some(mut cluster) = Cluster::start(kind) else { return };
    let runs = submit_batch(&cluster);
    cluster.wait_for_event(&runs[0], |e| {
        e["kind"] == "stage.running" && e["payload"]["stage"] == "validate"
    });
    cluster.broker.restart_empty();
    // More work after the loss too.
    let mut runs = runs;
    runs.push(cluster.submit("Todo API"));
    cluster.assert_each_stage_committed_once(&runs);
}

#[test]
fn redis_sigkill_a_worker_mid_stage_and_the_stage_is_retried_on_another() {
    sigkill_a_worker_mid_stage("redis");
}

#[test]
fn nats_sigkill_a_worker_mid_stage_and_the_stage_is_retried_on_another() {
    sigkill_a_worker_mid_stage("nats");
}

#[test]
fn redis_sigkill_the_server_mid_run_and_every_run_finishes_after_restart() {
    sigkill_the_server_mid_run("redis");
}

#[test]
fn nats_sigkill_the_server_mid_run_and_every_run_finishes_after_restart() {
    sigkill_the_server_mid_run("nats");
}

#[test]
fn redis_restarted_without_its_data_mid_run_and_every_run_finishes() {
    broker_loses_its_data_mid_run("redis");
}

#[test]
fn nats_restarted_without_its_streams_mid_run_and_every_run_finishes() {
    broker_loses_its_data_mid_run("nats");
}
