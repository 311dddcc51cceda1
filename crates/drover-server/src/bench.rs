//! `drover bench bus`: no-op tasks end to end through the real engine, the real SQLite
//! store and the chosen bus, measuring what drover itself adds.
//!
//! Each run follows a pipeline of `stages` no-op stages. Instants are taken in-process with
//! a monotonic clock: *enqueue* when the store publishes an attempt's `stage.pending`
//! event (right after its commit), *start* when the no-op agent begins, *commit* when the
//! store publishes `stage.succeeded`. Dispatch latency is start − enqueue; per-stage
//! overhead is commit − enqueue (the agent itself does nothing).
//!
//! `drover bench env` is below; `drover bench proxy` ([`proxy`]), `drover bench events`
//! ([`events`]) and `drover bench soak` ([`soak`]) are in their own modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_agents::{Agent, AgentTask, WorkerPool, WorkerPoolConfig};
use drover_bus::{AgentResult, BusOptions};
use drover_domain::{
    AgentType, AttemptId, CorrelationId, EventKind, PipelineCatalog, PipelineName, PipelineSpec,
    ProjectId, RunRequest, StageName, StageSpec, StageStatus, WorkerId,
};
use drover_engine::{Engine, EngineSettings};
use drover_env::Layout;
use drover_store::{SqliteStore, SqliteStoreOptions, Store};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::ServerError;

mod events;
mod proxy;
mod soak;

pub use events::{EventsBenchOptions, EventsBenchReport, bench_events};
pub use proxy::{
    BENCH_HOST, BenchServer, ProxyBenchError, ProxyBenchOptions, ProxyBenchReport, TargetFigures,
    bench_proxy, cancel_when_stdin_closes, find_nginx, guard,
};
pub use soak::{
    GLIBC_DEFAULT_MALLOC_VAR, SoakOptions, SoakReport, SoakRound, SoakSeries, bench_soak,
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BusBenchOptions {
    /// `embedded`, or a `redis://` / `nats://` URL.
    pub bus_url: String,
    pub tasks: usize,
    pub workers: u32,
    pub payload_bytes: usize,
    pub stages: u32,
    /// Runs submitted at once, like that many concurrent API clients.
    pub submitters: usize,
    /// A PostgreSQL server (`postgres://…`) to measure on, in a scratch database made
    /// for the run and dropped after; SQLite in a temporary file when `None`.
    pub postgres: Option<String>,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BusBenchReport {
    pub backend: String,
    /// `sqlite` or `postgres`.
    pub store: String,
    pub runs: usize,
    pub stages_per_run: u32,
    pub workers: u32,
    pub payload_bytes: usize,
    pub submitters: usize,
    pub wall_seconds: f64,
    /// Of which submitting the runs.
    pub submit_seconds: f64,
    pub runs_per_second: f64,
    pub stages_per_second: f64,
    pub dispatch_p50_ms: f64,
    pub dispatch_p99_ms: f64,
    pub stage_overhead_p50_ms: f64,
    pub stage_overhead_p99_ms: f64,
    /// Stages whose instants were not all observed (a lagging event feed).
    pub unmeasured_stages: usize,
}

#[derive(Default)]
struct Instants {
    enqueued: HashMap<AttemptId, Instant>,
    started: HashMap<AttemptId, Instant>,
    committed: HashMap<AttemptId, Instant>,
}

type SharedInstants = Arc<Mutex<Instants>>;

fn lock(instants: &SharedInstants) -> std::sync::MutexGuard<'_, Instants> {
    instants.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Does nothing but note when it started.
struct NoopAgent {
    agent: AgentType,
    instants: SharedInstants,
}

#[async_trait]
impl Agent for NoopAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        lock(&self.instants).started.insert(task.envelope.task_id, Instant::now());
        AgentResult::Succeeded { output: serde_json::Value::Null }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the benchmark and reports.
pub async fn bench_bus(options: BusBenchOptions) -> Result<BusBenchReport, ServerError> {
    let dir = tempfile::tempdir().map_err(|err| ServerError::DataDir {
        path: "temporary directory".to_owned(),
        message: err.to_string(),
    })?;
    let scratch = format!("drover_bench_{}", std::process::id());
    let store_url = match &options.postgres {
        Some(server) => drover_store::create_scratch_database(server, &scratch).await?,
        None => format!("sqlite://{}", dir.path().join("bench.db").display()),
    };
    let store = drover_store::open(&drover_store::StoreOptions {
        url: store_url,
        max_connections: 8,
        acquire_timeout: Duration::from_secs(30),
        busy_timeout: Duration::from_secs(5),
    })
    .await?;
    let store_kind = store.pool_stats().backend.to_owned();
    let measured = measure(options.clone(), store, dir.path()).await;
    if let Some(server) = &options.postgres
        && let Err(err) = drover_store::drop_scratch_database(server, &scratch).await
    {
        tracing::warn!(error = %err, database = %scratch, "cannot drop the benchmark's database");
    }
    measured.map(|report| BusBenchReport { store: store_kind, ..report })
}

async fn measure(
    options: BusBenchOptions,
    store: drover_store::AnyStore,
    dir: &std::path::Path,
) -> Result<BusBenchReport, ServerError> {
    let bus_options = BusOptions {
        capacity: (options.tasks * 2).max(1024),
        batch_size: 64,
        block_time: Duration::from_millis(500),
        claim_idle: Duration::from_secs(30),
        namespace: format!("bench{}", std::process::id()),
    };
    let bus = drover_bus::connect(&options.bus_url, bus_options).await?;
    let backend = bus.kind().to_owned();

    let agent = AgentType::parse("noop").expect("literal agent type");
    let stages = (1..=options.stages.max(1))
        .map(|n| StageSpec {
            max_attempts: 1,
            ..StageSpec::new(
                StageName::parse(format!("noop{n}")).expect("literal stage name"),
                agent.clone(),
                Duration::from_secs(300),
            )
        })
        .collect();
    let pipeline = PipelineSpec {
        name: PipelineName::parse("bench").expect("literal pipeline name"),
        description: "no-op stages".to_owned(),
        stages,
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let engine = Arc::new(Engine::new(
        store.clone(),
        bus.clone(),
        Arc::new(PipelineCatalog::from_specs([pipeline])),
        Layout::new(dir),
        EngineSettings {
            heartbeat_interval: Duration::from_secs(5),
            lease_duration: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
            dispatch_batch: 256,
            redispatch_after: Duration::from_secs(60),
            leader_lease: Duration::from_secs(6),
            worker_liveness: Duration::from_secs(30),
            instance: "bench".to_owned(),
        },
    ));

    let instants = SharedInstants::default();
    let mut feed = store.subscribe();
    let stop = CancellationToken::new();
    let total_stages = options.tasks * options.stages.max(1) as usize;
    let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<usize>();
    let recorder = {
        let instants = instants.clone();
        let expected_runs = options.tasks;
        tokio::spawn(async move {
            let mut finished_runs = 0;
            let mut lagged = 0;
            loop {
                match feed.recv().await {
                    Ok(event) => {
                        let now = Instant::now();
                        match (event.kind, event.attempt_id) {
                            (EventKind::Stage(StageStatus::Pending), Some(id)) => {
                                lock(&instants).enqueued.insert(id, now);
                            }
                            (EventKind::Stage(StageStatus::Succeeded), Some(id)) => {
                                lock(&instants).committed.insert(id, now);
                            }
                            (EventKind::Run(status), _) if status.is_terminal() => {
                                finished_runs += 1;
                                if finished_runs == expected_runs {
                                    let _ = finished_tx.send(lagged);
                                    return;
                                }
                            }
                            _ => {}
                        }
                    }
                    Err(RecvError::Lagged(skipped)) => lagged += skipped as usize,
                    Err(RecvError::Closed) => return,
                }
            }
        })
    };

    let tasks = engine.spawn(stop.clone());
    let pool = WorkerPool::start(
        bus.clone(),
        vec![Arc::new(NoopAgent { agent, instants: instants.clone() })],
        WorkerPoolConfig {
            worker_id: WorkerId::new("bench-worker"),
            concurrency: options.workers.max(1),
            heartbeat_interval: Duration::from_secs(5),
            kind: "embedded".to_owned(),
            secrets: None,
        },
    );

    let payload = "x".repeat(options.payload_bytes);
    let started = Instant::now();
    for n in 0..options.tasks {
        let request = RunRequest::parse(format!("bench {n} {payload}")).unwrap_or_else(|_| {
            RunRequest::parse(format!("bench {n}")).expect("short request is valid")
        });
        engine
            .submit(&ProjectId::default_project(), request, "bench", CorrelationId::new(), None)
            .await
            .map_err(|err| ServerError::DataDir {
                path: "bench".to_owned(),
                message: err.to_string(),
            })?;
    }
    let submitted_in = started.elapsed();
    let lagged = finished_rx.await.unwrap_or(0);
    let wall = started.elapsed();
    let _ = recorder.await;

    pool.shutdown(Duration::from_secs(5)).await;
    stop.cancel();
    tasks.wait().await;

    let instants = lock(&instants);
    let mut dispatch = Vec::with_capacity(total_stages);
    let mut overhead = Vec::with_capacity(total_stages);
    for (id, enqueued) in &instants.enqueued {
        if let Some(start) = instants.started.get(id) {
            dispatch.push(start.saturating_duration_since(*enqueued).as_secs_f64() * 1000.0);
        }
        if let Some(commit) = instants.committed.get(id) {
            overhead.push(commit.saturating_duration_since(*enqueued).as_secs_f64() * 1000.0);
        }
    }
    dispatch.sort_by(f64::total_cmp);
    overhead.sort_by(f64::total_cmp);
    let seconds = wall.as_secs_f64();
    Ok(BusBenchReport {
        backend,
        store: String::new(),
        runs: options.tasks,
        stages_per_run: options.stages.max(1),
        workers: options.workers.max(1),
        payload_bytes: options.payload_bytes,
        submitters: options.submitters.max(1),
        wall_seconds: seconds,
        submit_seconds: submitted_in.as_secs_f64(),
        runs_per_second: options.tasks as f64 / seconds,
        stages_per_second: total_stages as f64 / seconds,
        dispatch_p50_ms: percentile(&dispatch, 0.50),
        dispatch_p99_ms: percentile(&dispatch, 0.99),
        stage_overhead_p50_ms: percentile(&overhead, 0.50),
        stage_overhead_p99_ms: percentile(&overhead, 0.99),
        unmeasured_stages: total_stages.saturating_sub(overhead.len()) + lagged.min(total_stages),
    })
}

/// What `drover bench env` measures.
#[derive(Debug, Clone)]
pub struct EnvBenchOptions {
    /// The repository environments are worktrees of (a generated one when `None`).
    pub repo: Option<std::path::PathBuf>,
    pub iterations: usize,
}

/// Create→ready times, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct EnvBenchReport {
    pub iterations: usize,
    pub repo_files: usize,
    pub git_worktree_add_p50_ms: f64,
    pub git_worktree_add_p95_ms: f64,
    pub env_no_services_p50_ms: f64,
    pub env_no_services_p95_ms: f64,
    pub env_two_services_p50_ms: f64,
    pub env_two_services_p95_ms: f64,
}

async fn git(dir: &std::path::Path, args: &[&str]) -> Result<(), ServerError> {
    let output = tokio::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()
        .await
        .map_err(|err| bench_error(err.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(bench_error(String::from_utf8_lossy(&output.stderr).into_owned()))
    }
}

fn bench_error(message: String) -> ServerError {
    ServerError::DataDir { path: "bench".to_owned(), message }
}

/// Environment creation until every service is ready, beside a bare `git worktree add`.
pub async fn bench_env(options: EnvBenchOptions) -> Result<EnvBenchReport, ServerError> {
    use drover_domain::{
        EnvName, EnvStatus, ProbeKind, Readiness, RestartRules, ServiceName, ServiceSpec,
        ServiceStatus, Sharing,
    };
    use drover_env::manager::{CreateEnvironment, EnvManager, EnvSettings};

    let dir = tempfile::tempdir().map_err(|err| bench_error(err.to_string()))?;
    let (repo, repo_files) = match options.repo {
        Some(repo) => {
            let files = walk_count(&repo);
            (repo, files)
        }
        None => {
            let repo = dir.path().join("repo");
            std::fs::create_dir_all(repo.join("src"))
                .map_err(|err| bench_error(err.to_string()))?;
            for n in 0..200 {
                std::fs::write(
                    repo.join("src").join(format!("module_{n}.py")),
                    format!("def f{n}():\n    return {n}\n"),
                )
                .map_err(|err| bench_error(err.to_string()))?;
            }
            git(&repo, &["init", "-q", "-b", "main"]).await?;
            git(&repo, &["add", "."]).await?;
            git(&repo, &["commit", "-q", "-m", "bench"]).await?;
            (repo, 200)
        }
    };
    let store = Arc::new(
        SqliteStore::open(&SqliteStoreOptions {
            url: format!("sqlite://{}", dir.path().join("bench.db").display()),
            read_connections: 2,
            busy_timeout: Duration::from_secs(5),
        })
        .await?,
    );
    let web = |name: &str| ServiceSpec {
        name: ServiceName::parse(name).expect("literal service name"),
        image: None,
        command: "python3".into(),
        args: vec![
            "-m".into(),
            "http.server".into(),
            "{port}".into(),
            "--bind".into(),
            "127.0.0.1".into(),
        ],
        env: Default::default(),
        ports: vec!["http".into()],
        readiness: Some(Readiness {
            kind: ProbeKind::Http { path: "/".into() },
            port: None,
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(30),
            threshold: 1,
        }),
        depends_on: Default::default(),
        restart: RestartRules::default(),
        stop_grace: Duration::from_secs(2),
        memory_limit_bytes: None,
        sharing: Sharing::PerEnv,
        address: None,
        log_max_bytes: 1 << 20,
        log_keep: 1,
    };
    let settings = |sub: &str| EnvSettings {
        data_dir: dir.path().join(sub),
        port_range: (44_000, 44_999),
        block_size: 10,
        quota: 1000,
        idle_timeout: Duration::ZERO,
        delete_after: Duration::ZERO,
        setup_command: String::new(),
        copy_files: Vec::new(),
        max_apps: 5,
        reconcile_interval: Duration::from_millis(20),
    };
    // The bare baseline first, so it does not profit from caches warmed by the others.
    let mut bare_git = Vec::with_capacity(options.iterations);
    for n in 0..options.iterations {
        let path = dir.path().join(format!("plain{n}"));
        let path_text = path.display().to_string();
        let branch = format!("plain{n}");
        let started = Instant::now();
        git(&repo, &["worktree", "add", "-q", "-b", &branch, &path_text]).await?;
        bare_git.push(started.elapsed().as_secs_f64() * 1000.0);
        git(&repo, &["worktree", "remove", "--force", &path_text]).await?;
        git(&repo, &["branch", "-D", &branch]).await?;
    }
    bare_git.sort_by(f64::total_cmp);
    let project = ProjectId::default_project();
    let mut timings: Vec<Vec<f64>> = Vec::new();
    for (sub, services) in [("bare", Vec::new()), ("two", vec![web("web"), web("api")])] {
        let expected = services.len();
        let manager = Arc::new(EnvManager::new(
            store.clone(),
            settings(sub),
            services,
            Arc::new(drover_env::provider::LocalProvider::default()),
        ));
        let stop = CancellationToken::new();
        let loops = manager.spawn(stop.clone());
        let mut samples = Vec::with_capacity(options.iterations);
        for n in 0..options.iterations {
            let name = EnvName::parse(format!("{sub}{n}")).expect("generated name is a valid slug");
            let started = Instant::now();
            let env = manager
                .create(
                    &project,
                    CreateEnvironment {
                        name: Some(name),
                        repo: Some(repo.clone()),
                        base: None,
                        workspace: None,
                        actor: "bench".into(),
                        reason: None,
                    },
                )
                .await
                .map_err(|err| bench_error(err.to_string()))?;
            loop {
                let current = manager
                    .find(&project, &env.id.to_string())
                    .await
                    .map_err(|err| bench_error(err.to_string()))?;
                let services = manager
                    .services(Some(env.id))
                    .await
                    .map_err(|err| bench_error(err.to_string()))?;
                let ready =
                    services.iter().filter(|s| s.state.status == ServiceStatus::Ready).count();
                if current.status == EnvStatus::Running && ready == expected {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(bench_error(format!("environment {} never got ready", env.name)));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            manager
                .delete(&project, env.id, true, "bench", None)
                .await
                .map_err(|err| bench_error(err.to_string()))?;
        }
        stop.cancel();
        loops.wait().await;
        manager.reconcile().await.map_err(|err| bench_error(err.to_string()))?;
        manager.shutdown().await;
        samples.sort_by(f64::total_cmp);
        timings.push(samples);
    }
    Ok(EnvBenchReport {
        iterations: options.iterations,
        repo_files,
        git_worktree_add_p50_ms: percentile(&bare_git, 0.5),
        git_worktree_add_p95_ms: percentile(&bare_git, 0.95),
        env_no_services_p50_ms: percentile(&timings[0], 0.5),
        env_no_services_p95_ms: percentile(&timings[0], 0.95),
        env_two_services_p50_ms: percentile(&timings[1], 0.5),
        env_two_services_p95_ms: percentile(&timings[1], 0.95),
    })
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| {
                    let path = entry.path();
                    if path.file_name().is_some_and(|n| n == ".git") {
                        0
                    } else if path.is_dir() {
                        walk_count(&path)
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
