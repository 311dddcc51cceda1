//! Several servers at once: two real `drover serve` processes share one PostgreSQL and
//! one Redis (the test's own database and `redis-server`), with two real workers. 200 runs
//! are submitted through both; halfway, the server holding the leader lease is SIGKILLed.
//! The other takes the lease over within seconds, and every run succeeds with every stage
//! committed exactly once — nothing dispatched twice, nothing lost. A client following the
//! event stream on one server sees the runs submitted through the other.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_testkit::{PrivateDatabase, PrivateRedis};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const DROVER: &str = env!("CARGO_BIN_EXE_drover");
const RUNS: usize = 200;
const STAGES: [&str; 3] = ["plan", "build", "check"];

const CONFIG: &str = r#"
[agents.quick]
command = "sh"
args = ["-c", "echo working on {stage}"]

[pipelines.light]
[[pipelines.light.stages]]
name = "plan"
agent = "quick"
[[pipelines.light.stages]]
name = "build"
agent = "quick"
[[pipelines.light.stages]]
name = "check"
agent = "quick"
"#;

struct Cluster {
    dir: tempfile::TempDir,
    database: PrivateDatabase,
    redis: PrivateRedis,
    servers: Vec<(Child, String)>,
    workers: Vec<Child>,
    http: reqwest::blocking::Client,
}

fn drover(cluster_dir: &Path, database: &str, redis: &str, log: &str) -> Command {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(cluster_dir.join(log)).unwrap();
    let mut command = Command::new(DROVER);
    command
        .current_dir(cluster_dir)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_DATA_DIR")
        .env_remove("RUST_LOG")
        .env("DROVER_STORE__URL", database)
        .env("DROVER_BUS__URL", redis)
        .env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "300ms")
        .env("DROVER_ENGINE__LEADER_LEASE", "3s")
        .env("DROVER_BUS__CLAIM_IDLE", "1s")
        .env("DROVER_BUS__BLOCK_TIME", "200ms")
        .env("DROVER_ENGINE__REDISPATCH_AFTER", "1s")
        .env("DROVER_SERVER__SHUTDOWN_GRACE", "2s")
        .env("DROVER_AUTH__RATE_LIMIT_PER_MINUTE", "100000")
        .arg("--config")
        .arg(cluster_dir.join("drover.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    command
}

impl Cluster {
    fn start() -> Option<Self> {
        let database = PrivateDatabase::create()?;
        let redis = PrivateRedis::start()?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("drover.toml"), CONFIG).unwrap();
        let mut cluster = Self {
            dir,
            database,
            redis,
            servers: Vec::new(),
            workers: Vec::new(),
            http: reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        for n in 0..2 {
            let server = cluster.start_server(n);
            cluster.servers.push(server);
        }
        for _ in 0..2 {
            let mut command = drover(
                cluster.dir.path(),
                &cluster.database.url(),
                &cluster.redis.url(),
                "workers.log",
            );
            command.args([
                "worker",
                "--agent",
                "quick",
                "--concurrency",
                "4",
                "--server",
                &cluster.servers[0].1,
            ]);
            cluster.workers.push(command.spawn().unwrap());
        }
        Some(cluster)
    }

    fn start_server(&self, n: usize) -> (Child, String) {
        let data_dir = self.dir.path().join(format!("server-{n}"));
        let mut command = drover(
            self.dir.path(),
            &self.database.url(),
            &self.redis.url(),
            &format!("server-{n}.log"),
        );
        command.arg("--data-dir").arg(&data_dir).args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
        ]);
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Some(url) = std::fs::read_to_string(data_dir.join("server.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .and_then(|info| info["url"].as_str().map(str::to_owned))
            {
                break url;
            }
            assert!(Instant::now() < deadline, "drover serve {n} did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        (child, url)
    }

    fn ready(&self, url: &str) -> Option<Value> {
        self.http.get(format!("{url}/readyz")).send().ok()?.json().ok()
    }

    /// The server holding the leader lease, once exactly one does.
    fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leaders: Vec<usize> = (0..self.servers.len())
                .filter(|&n| {
                    self.ready(&self.servers[n].1).is_some_and(|r| r["checks"]["leader"] == "yes")
                })
                .collect();
            if let [leader] = leaders.as_slice() {
                return *leader;
            }
            assert!(Instant::now() < deadline, "no single leader: {leaders:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn submit(&self, server: usize, n: usize) -> String {
        let response = self
            .http
            .post(format!("{}/api/v1/runs", self.servers[server].1))
            .json(&json!({ "request": format!("run {n}"), "pipeline": "light" }))
            .send()
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().unwrap());
        response.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned()
    }

    fn get(&self, server: usize, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.servers[server].1)).send().unwrap().json().unwrap()
    }

    /// The run's whole event log, replayed by `server`.
    fn events(&self, server: usize, run: &str) -> Vec<Value> {
        let url = format!("{}/api/v1/runs/{run}/events", self.servers[server].1);
        let response = self.http.get(url).send().unwrap();
        std::io::BufReader::new(response)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                line.strip_prefix("data: ").and_then(|d| serde_json::from_str(d).ok())
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["server-0.log", "server-1.log", "workers.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- last lines of {log} ---");
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        for child in self.workers.iter_mut().chain(self.servers.iter_mut().map(|(c, _)| c)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn two_servers_share_the_work_and_survive_the_leader_being_killed() {
    let Some(mut cluster) = Cluster::start() else { return };
    let leader = cluster.leader();
    let survivor = 1 - leader;

    // A client of the survivor follows the whole project's events.
    let follower = {
        let url = format!("{}/api/v1/events?kinds=run", cluster.servers[survivor].1);
        let response = cluster.http.get(url).timeout(Duration::from_secs(300)).send().unwrap();
        std::thread::spawn(move || {
            let mut succeeded = std::collections::HashSet::new();
            for line in std::io::BufReader::new(response).lines().map_while(Result::ok) {
                let Some(data) = line.strip_prefix("data: ") else { continue };
                let event: Value = serde_json::from_str(data).unwrap();
                if event["kind"] == "run.succeeded" {
                    succeeded.insert(event["run_id"].as_str().unwrap().to_owned());
                    if succeeded.len() == RUNS {
                        break;
                    }
                }
            }
            succeeded
        })
    };

    let mut runs = Vec::with_capacity(RUNS);
    for n in 0..RUNS / 2 {
        runs.push(cluster.submit(n % 2, n));
    }
    // Halfway: the leader dies without a word.
    let doomed = &mut cluster.servers[leader].0;
    kill(Pid::from_raw(doomed.id() as i32), Signal::SIGKILL).unwrap();
    doomed.wait().unwrap();
    let killed_at = Instant::now();
    for n in RUNS / 2..RUNS {
        runs.push(cluster.submit(survivor, n));
    }
    // The survivor takes the lease over.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.ready(&cluster.servers[survivor].1).is_none_or(|r| r["checks"]["leader"] != "yes")
    {
        assert!(Instant::now() < deadline, "the survivor never became the leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("leadership moved {:?} after the kill", killed_at.elapsed());

    // Every run succeeds, each stage committed exactly once.
    let deadline = Instant::now() + Duration::from_secs(240);
    for id in &runs {
        let run = loop {
            let run = cluster.get(survivor, &format!("/api/v1/runs/{id}"));
            if matches!(run["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                break run;
            }
            assert!(Instant::now() < deadline, "run {id} did not finish: {run}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(run["status"], "succeeded", "{run}");
        let mut committed: HashMap<String, usize> = HashMap::new();
        for event in cluster.events(survivor, id) {
            if event["kind"] == "stage.succeeded" {
                *committed
                    .entry(event["payload"]["stage"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
        for stage in STAGES {
            assert_eq!(committed.get(stage), Some(&1), "run {id}: {stage} committed {committed:?}");
        }
    }
    // The survivor's event stream carried every run's end, those submitted through the
    // server that died included.
    let seen = follower.join().unwrap();
    assert_eq!(seen.len(), RUNS);
    assert!(runs.iter().all(|id| seen.contains(id)));
}
