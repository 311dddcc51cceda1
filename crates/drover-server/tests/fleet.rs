//! A fleet at once, as users run one: 60 runs of the built-in `sdlc` pipeline submitted
//! through the API in parallel (SQLite with the embedded bus; PostgreSQL with Redis
//! Streams). Every run must succeed in an environment of its own (port blocks allocated
//! concurrently, never a silent fallback); at no sampled instant may more deployed apps be
//! live than `max_deployed_apps` (by the API and by the processes really listening); and
//! once the runs are over every process listening from under the data directory must be
//! one the store tracks (found through `/proc`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use drover_config::Config;
use drover_testkit::{PrivateDatabase, PrivateRedis};
use serde_json::{Value, json};

mod common;

const RUNS: usize = 60;
/// One fleet at a time: two at once on two cores would time out rather than race.
static ONE_FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MAX_APPS: u32 = 5;

fn fleet_config(dir: &Path) -> Config {
    let mut config = common::config(dir);
    // 100 blocks of 2 ports: room for 60 run environments and the deployments one.
    (config.environments.port_range_start, config.environments.port_range_end) =
        drover_testkit::port_range(200);
    config.environments.block_size = 2;
    config.environments.max_deployed_apps = MAX_APPS;
    config.workers.concurrency = 8;
    config
}

/// `(pid, pgid)` of every process listening on TCP whose working directory is under `root`.
fn listeners_under(root: &Path) -> Vec<(u32, u32)> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `st` 0A is LISTEN; the inode is the tenth field.
            if fields.get(3) == Some(&"0A")
                && let Some(inode) = fields.get(9)
            {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else { continue };
        if !cwd.starts_with(root) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let listening = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
        });
        if listening && let Some(pgid) = pgid(pid) {
            found.push((pid, pgid));
        }
    }
    found
}

fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command in parentheses: state, ppid, pgrp.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// The `DROVER_INSTANCE` a process was started with, if any.
fn instance_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|byte| *byte == 0).find_map(|entry| {
        let entry = String::from_utf8_lossy(entry);
        entry.strip_prefix("DROVER_INSTANCE=").map(str::to_owned)
    })
}

/// Deployed apps live right now: by the API (services of `deployments` that are starting,
/// ready or unhealthy) and by the processes listening (distinct app instances).
async fn live_apps(http: &reqwest::Client, url: &str, root: &Path) -> (usize, usize, Value) {
    let mut seen = Value::Null;
    let by_api =
        match http.get(format!("{url}/api/v1/environments/deployments/services")).send().await {
            Ok(response) if response.status() == 200 => {
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let live: Vec<Value> = body["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| {
                        matches!(s["status"].as_str(), Some("starting" | "ready" | "unhealthy"))
                    })
                    .cloned()
                    .collect();
                let count = live.len();
                seen = Value::Array(live);
                count
            }
            _ => 0,
        };
    let by_processes: BTreeSet<String> = listeners_under(root)
        .into_iter()
        .filter_map(|(pid, _)| instance_of(pid))
        .filter(|instance| instance.starts_with("run-"))
        .collect();
    (by_api, by_processes.len(), seen)
}

async fn sixty_runs_at_once(config: Config) {
    let _alone = ONE_FLEET.lock().await;
    let root = config.data_dir.canonicalize().unwrap();
    let server = common::start(config).await;
    let http = common::http();

    // Samples the live apps until the runs are over.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let sampler = {
        let (done, most, http, url, root) =
            (done.clone(), most.clone(), http.clone(), server.url.clone(), root.clone());
        tokio::spawn(async move {
            let mut samples = 0_u32;
            while !done.load(Ordering::Relaxed) {
                let (by_api, by_processes, seen) = live_apps(&http, &url, &root).await;
                if by_api as u32 > MAX_APPS {
                    eprintln!("over the cap: {seen:#}");
                }
                most.0.fetch_max(by_api, Ordering::Relaxed);
                most.1.fetch_max(by_processes, Ordering::Relaxed);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        })
    };

    let submissions = (0..RUNS).map(|_| {
        let http = http.clone();
        let url = server.url.clone();
        async move {
            let response = http
                .post(format!("{url}/api/v1/runs"))
                .json(&json!({ "request": "Hello World API" }))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert_eq!(status, 201, "a submission was refused: {body}");
            body["id"].as_str().unwrap().to_owned()
        }
    });
    let ids: Vec<String> = futures::future::join_all(submissions).await;

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut finished: BTreeMap<String, Value> = BTreeMap::new();
    while finished.len() < ids.len() {
        assert!(Instant::now() < deadline, "{} of {RUNS} runs ended in time", finished.len());
        let pending: Vec<&String> = ids.iter().filter(|id| !finished.contains_key(*id)).collect();
        for id in pending {
            let run: Value =
                common::get_json(&http, &format!("{}/api/v1/runs/{id}", server.url)).await;
            if matches!(run["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                finished.insert(id.clone(), run);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();

    let mut environments = HashSet::new();
    for (id, run) in &finished {
        let failures: Vec<String> = run["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["status"] == "failed")
            .map(|a| format!("{}: {}", a["stage"], a["error"]))
            .collect();
        assert_eq!(run["status"], "succeeded", "run {id} failed: {failures:?}");
        let environment = run["environment_id"]
            .as_str()
            .unwrap_or_else(|| panic!("run {id} ran without an environment of its own: {run}"));
        assert!(environments.insert(environment.to_owned()), "two runs shared {environment}");
    }
    let (by_api, by_processes) = (most.0.load(Ordering::Relaxed), most.1.load(Ordering::Relaxed));
    assert!(samples > 10, "the sampler looked only {samples} times");
    assert!(by_api as u32 <= MAX_APPS, "{by_api} apps were live at once by the API");
    assert!(by_processes as u32 <= MAX_APPS, "{by_processes} apps were listening at once");
    let page: Value =
        common::get_json(&http, &format!("{}/api/v1/runs?limit=100", server.url)).await;
    let live =
        page["items"].as_array().unwrap().iter().filter(|run| run["deployment"]["live"] == true);
    let live = live.count() as u32;
    if live != MAX_APPS {
        let services: Value = common::get_json(
            &http,
            &format!("{}/api/v1/environments/deployments/services", server.url),
        )
        .await;
        let up: Vec<&Value> = services["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] != "stopped")
            .collect();
        let retried: Vec<String> = finished
            .iter()
            .filter(|(_, run)| run["attempts"].as_array().unwrap().len() > 5)
            .map(|(id, run)| format!("{id}: {}", run["attempts"]))
            .collect();
        panic!(
            "{live} runs say their app is live once all are deployed; apps not stopped: {up:#?}; runs with retries: {retried:#?}"
        );
    }

    // Every process listening from under the data directory is one the store tracks: the
    // process group leader of a service recorded as up in a live environment.
    let mut tracked = HashSet::new();
    let envs: Value =
        common::get_json(&http, &format!("{}/api/v1/environments?limit=200", server.url)).await;
    for env in envs["items"].as_array().unwrap() {
        let services: Value = common::get_json(
            &http,
            &format!("{}/api/v1/environments/{}/services", server.url, env["id"].as_str().unwrap()),
        )
        .await;
        for service in services["items"].as_array().into_iter().flatten() {
            if let Some(pid) = service["pid"].as_u64() {
                tracked.insert(u32::try_from(pid).unwrap());
            }
        }
    }
    // Stopping processes may take a moment to close their sockets.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let untracked: Vec<(u32, u32)> = listeners_under(&root)
            .into_iter()
            .filter(|(_, pgid)| !tracked.contains(pgid))
            .collect();
        if untracked.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes listen from the data directory that no service record holds: {untracked:?} \
             (tracked process groups: {tracked:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_runs_at_once_on_sqlite_each_get_their_environment_and_the_app_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    sixty_runs_at_once(fleet_config(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_runs_at_once_on_postgres_and_redis_each_get_their_environment_and_the_app_cap_holds()
{
    let Some(database) = PrivateDatabase::create() else { return };
    let Some(redis) = PrivateRedis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = fleet_config(dir.path());
    config.store.url = Some(database.url());
    config.bus.url = redis.url();
    sixty_runs_at_once(config).await;
}
