//! The engine end to end on a real SQLite store and the embedded bus, with workers running
//! small agents written for these tests (echo, flaky, sleepy), so that retries, leases,
//! timeouts and cancellation can be driven on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use drover_agents::{Agent, AgentTask, WorkerPool, WorkerPoolConfig};
use drover_bus::{AgentResult, Bus, EmbeddedBus, WorkerMessage};
use drover_domain::{
    AgentType, Backoff, CorrelationId, FencingToken, PipelineCatalog, PipelineName, PipelineSpec,
    ProjectId, Run, RunId, RunRequest, RunStatus, StageAttempt, StageName, StageSpec, StageStatus,
    WorkerId,
};
use drover_engine::{Engine, EngineError, EngineSettings};
use drover_env::{CommandSpec, Layout, run_command};
use drover_store::{SqliteStore, SqliteStoreOptions};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const HEARTBEAT: Duration = Duration::from_millis(200);

/// Succeeds at once, echoing which earlier stages it saw.
struct Echo(AgentType);

#[async_trait]
impl Agent for Echo {
    fn agent_type(&self) -> &AgentType {
        &self.0
    }
    async fn run(&self, task: &AgentTask) -> AgentResult {
        let seen: Vec<&String> = task.envelope.context.outputs.keys().collect();
        AgentResult::Succeeded {
            output: json!({
                "stage": task.envelope.stage,
                "saw": seen,
                "workspace": task.envelope.context.workspace,
                "variables": task.envelope.context.variables,
            }),
        }
    }
}

/// Fails (retryably) the first `failures` times, then succeeds.
struct Flaky {
    agent: AgentType,
    failures: u32,
    calls: AtomicU32,
}

#[async_trait]
impl Agent for Flaky {
    fn agent_type(&self) -> &AgentType {
        &self.agent
    }
    async fn run(&self, _task: &AgentTask) -> AgentResult {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            AgentResult::Failed { error: "flaky".into(), retryable: true }
        } else {
            AgentResult::Succeeded { output: json!({}) }
        }
    }
}

/// Runs `sleep 600` in its own process group until cancelled, recording the pid.
struct Sleepy {
    agent: AgentType,
    pid_file: std::path::PathBuf,
}

#[async_trait]
impl Agent for Sleepy {
    fn agent_type(&self) -> &AgentType {
        &self.agent
    }
    async fn run(&self, task: &AgentTask) -> AgentResult {
        let spec = CommandSpec {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                format!("echo $$ > {}; exec sleep 600", self.pid_file.display()),
            ],
            cwd: std::env::temp_dir(),
            env: vec![],
            log_path: task.log.path().to_path_buf(),
        };
        match run_command(&spec, &task.cancel, None).await {
            Ok(_) => AgentResult::Succeeded { output: json!({}) },
            Err(err) => AgentResult::Failed { error: err.to_string(), retryable: true },
        }
    }
}

fn agent(name: &str) -> AgentType {
    AgentType::parse(name).unwrap()
}

fn stage(name: &str, agent_name: &str, max_attempts: u32, timeout: Duration) -> StageSpec {
    StageSpec {
        max_attempts,
        backoff: Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(50) },
        ..StageSpec::new(StageName::parse(name).unwrap(), agent(agent_name), timeout)
    }
}

fn pipeline(name: &str, stages: Vec<StageSpec>) -> PipelineSpec {
    PipelineSpec { name: PipelineName::parse(name).unwrap(), description: String::new(), stages }
}

struct Harness {
    engine: Arc<Engine>,
    bus: Arc<EmbeddedBus>,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start(pipelines: Vec<PipelineSpec>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&SqliteStoreOptions {
            url: format!("sqlite://{}", dir.path().join("drover.db").display()),
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
        let bus = Arc::new(EmbeddedBus::new(64));
        let engine = Arc::new(Engine::new(
            Arc::new(store),
            bus.clone(),
            Arc::new(PipelineCatalog::from_specs(pipelines)),
            Layout::new(dir.path()),
            EngineSettings {
                heartbeat_interval: HEARTBEAT,
                lease_duration: HEARTBEAT.mul_f64(1.5),
                poll_interval: Duration::from_millis(50),
                dispatch_batch: 10,
                redispatch_after: Duration::from_millis(500),
                leader_lease: Duration::from_secs(3),
                worker_liveness: HEARTBEAT * 3,
                instance: "test-server".into(),
            },
        ));
        let shutdown = CancellationToken::new();
        engine.spawn(shutdown.clone());
        Self { engine, bus, shutdown, dir }
    }

    fn workers(&self, agents: Vec<Arc<dyn Agent>>) -> WorkerPool {
        WorkerPool::start(
            self.bus.clone(),
            agents,
            WorkerPoolConfig {
                worker_id: WorkerId::new("test-worker"),
                concurrency: 2,
                heartbeat_interval: HEARTBEAT,
                kind: "embedded".into(),
                secrets: None,
            },
        )
    }

    async fn submit(&self, pipeline: &str) -> Run {
        self.engine
            .submit(
                &ProjectId::default_project(),
                RunRequest::parse("test").unwrap(),
                pipeline,
                CorrelationId::new(),
                None,
            )
            .await
            .unwrap()
    }

    async fn wait_for(&self, run: RunId, done: impl Fn(&Run) -> bool) -> Run {
        for _ in 0..300 {
            let current = self
                .engine
                .store()
                .get_run(&ProjectId::default_project(), run)
                .await
                .unwrap()
                .unwrap();
            if done(&current) {
                return current;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("run {run} did not reach the expected state in time");
    }

    async fn attempts(&self, run: RunId) -> Vec<StageAttempt> {
        self.engine.store().list_attempts(&ProjectId::default_project(), run).await.unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn a_run_moves_through_every_stage_once_and_each_stage_sees_the_earlier_outputs() {
    let stages = ["one", "two", "three"].map(|n| stage(n, "echo", 3, Duration::from_secs(30)));
    let h = Harness::start(vec![pipeline("p", stages.to_vec())]).await;
    let workers = h.workers(vec![Arc::new(Echo(agent("echo")))]);

    let run = h.submit("p").await;
    let done = h.wait_for(run.id, |r| r.status.is_terminal()).await;
    assert_eq!(done.status, RunStatus::Succeeded);

    let attempts = h.attempts(run.id).await;
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.status == StageStatus::Succeeded && a.attempt == 1));
    assert_eq!(attempts[2].output.as_ref().unwrap()["saw"], json!(["one", "two"]));
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_run_placed_in_an_environment_hands_its_workspace_and_variables_to_every_task() {
    let stages = ["one", "two"].map(|n| stage(n, "echo", 3, Duration::from_secs(30)));
    let h = Harness::start(vec![pipeline("p", stages.to_vec())]).await;
    let workers = h.workers(vec![Arc::new(Echo(agent("echo")))]);
    let environment = drover_domain::EnvironmentId::new();
    let placement = drover_engine::RunPlacement {
        environment_id: environment,
        workspace: "/envs/feature/workspace".into(),
        variables: [("DROVER_SERVICE_DB_URL".to_owned(), "http://127.0.0.1:20001".to_owned())]
            .into(),
    };
    let run = h
        .engine
        .submit(
            &ProjectId::default_project(),
            RunRequest::parse("test").unwrap(),
            "p",
            CorrelationId::new(),
            Some(placement),
        )
        .await
        .unwrap();
    assert_eq!(run.environment_id, Some(environment));
    let done = h.wait_for(run.id, |r| r.status.is_terminal()).await;
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(done.variables["DROVER_SERVICE_DB_URL"], "http://127.0.0.1:20001", "stored");
    for attempt in h.attempts(run.id).await {
        let output = attempt.output.unwrap();
        assert_eq!(output["workspace"], "/envs/feature/workspace");
        assert_eq!(output["variables"]["DROVER_SERVICE_DB_URL"], "http://127.0.0.1:20001");
    }
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_retryable_failure_is_retried_with_backoff_until_it_succeeds() {
    let h = Harness::start(vec![pipeline(
        "p",
        vec![stage("only", "flaky", 3, Duration::from_secs(30))],
    )])
    .await;
    let flaky = Flaky { agent: agent("flaky"), failures: 2, calls: AtomicU32::new(0) };
    let workers = h.workers(vec![Arc::new(flaky)]);

    let run = h.submit("p").await;
    let done = h.wait_for(run.id, |r| r.status.is_terminal()).await;
    assert_eq!(done.status, RunStatus::Succeeded);
    let statuses: Vec<_> = h.attempts(run.id).await.iter().map(|a| (a.attempt, a.status)).collect();
    assert_eq!(
        statuses,
        [(1, StageStatus::Failed), (2, StageStatus::Failed), (3, StageStatus::Succeeded)]
    );
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn exhausted_attempts_are_dead_lettered_and_fail_the_run() {
    let h = Harness::start(vec![pipeline(
        "p",
        vec![stage("only", "flaky", 2, Duration::from_secs(30))],
    )])
    .await;
    let flaky = Flaky { agent: agent("flaky"), failures: 10, calls: AtomicU32::new(0) };
    let workers = h.workers(vec![Arc::new(flaky)]);

    let run = h.submit("p").await;
    let done = h.wait_for(run.id, |r| r.status.is_terminal()).await;
    assert_eq!(done.status, RunStatus::Failed);
    assert!(done.error.unwrap().contains("after 2 attempts"));
    let last = h.attempts(run.id).await.pop().unwrap();
    assert_eq!((last.attempt, last.status), (2, StageStatus::DeadLettered));
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_loses_its_lease_and_its_late_result_is_rejected() {
    let h = Harness::start(vec![pipeline(
        "p",
        vec![stage("only", "echo", 3, Duration::from_secs(30))],
    )])
    .await;
    let run = h.submit("p").await;

    // A worker takes the task, says it started, and then goes silent.
    let mut tasks = h.bus.consume_tasks(&agent("echo"), "silent").await.unwrap();
    let lost = tasks.next().await.unwrap().envelope;
    drop(tasks);
    let silent = WorkerId::new("silent");
    h.bus
        .publish_result(&WorkerMessage::Started {
            attempt_id: lost.task_id,
            token: lost.fencing_token,
            worker_id: silent.clone(),
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    h.wait_for(run.id, |r| r.status == RunStatus::Running).await;

    // A healthy worker picks up the retry once the lease is reclaimed.
    let workers = h.workers(vec![Arc::new(Echo(agent("echo")))]);
    let done = h.wait_for(run.id, |r| r.status.is_terminal()).await;
    assert_eq!(done.status, RunStatus::Succeeded);
    assert!(
        started.elapsed() < HEARTBEAT * 2 + Duration::from_millis(500),
        "reclaimed too late: {:?}",
        started.elapsed()
    );
    let attempts = h.attempts(run.id).await;
    assert_eq!(attempts[0].status, StageStatus::Failed);
    assert!(attempts[0].error.as_deref().unwrap().contains("lease expired"));
    assert_eq!(attempts[1].status, StageStatus::Succeeded);

    // The silent worker wakes up and reports: nothing changes.
    h.bus
        .publish_result(&WorkerMessage::Finished {
            attempt_id: lost.task_id,
            token: lost.fencing_token,
            worker_id: silent,
            result: AgentResult::Succeeded { output: json!({ "late": true }) },
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = h.attempts(run.id).await;
    assert_eq!(after, attempts, "a stale result changed the store");
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn cancelling_a_run_kills_its_running_agent_process_group() {
    let h = Harness::start(vec![pipeline(
        "p",
        vec![stage("only", "sleepy", 3, Duration::from_secs(60))],
    )])
    .await;
    let pid_file = h.dir.path().join("sleepy.pid");
    let workers =
        h.workers(vec![Arc::new(Sleepy { agent: agent("sleepy"), pid_file: pid_file.clone() })]);

    let run = h.submit("p").await;
    let pid = loop {
        if let Some(pid) =
            std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse::<i32>().ok())
        {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cancelled =
        h.engine.cancel(&ProjectId::default_project(), run.id, "changed my mind").await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);

    let killed_by = std::time::Instant::now() + Duration::from_secs(5);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !is_zombie(pid) {
        assert!(std::time::Instant::now() < killed_by, "agent process {pid} survived the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attempts = h.attempts(run.id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, StageStatus::Cancelled);

    let again = h.engine.cancel(&ProjectId::default_project(), run.id, "again").await;
    assert!(matches!(
        again,
        Err(EngineError::Store(drover_store::StoreError::RunAlreadyFinished { .. }))
    ));
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_stage_past_its_timeout_is_timed_out_and_its_agent_stopped() {
    let h = Harness::start(vec![pipeline(
        "p",
        vec![stage("only", "sleepy", 1, Duration::from_millis(300))],
    )])
    .await;
    let pid_file = h.dir.path().join("sleepy.pid");
    let workers = h.workers(vec![Arc::new(Sleepy { agent: agent("sleepy"), pid_file })]);

    let run = h.submit("p").await;
    let done = h.wait_for(run.id, |r| r.status.is_terminal()).await;
    assert_eq!(done.status, RunStatus::Failed);
    assert!(done.error.unwrap().contains("timed out"));
    let attempt = h.attempts(run.id).await.remove(0);
    assert_eq!(attempt.status, StageStatus::DeadLettered);
    tokio::time::timeout(Duration::from_secs(10), async {
        while workers.running() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the timed-out agent was not stopped");
    workers.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn an_unknown_pipeline_is_refused_and_names_the_known_ones() {
    let h =
        Harness::start(vec![pipeline("p", vec![stage("only", "echo", 1, Duration::from_secs(1))])])
            .await;
    let err = h
        .engine
        .submit(
            &ProjectId::default_project(),
            RunRequest::parse("x").unwrap(),
            "nope",
            CorrelationId::new(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "pipeline `nope` does not exist; known pipelines: p");
}

#[tokio::test]
async fn a_stopping_worker_hands_its_attempt_back_with_a_new_token() {
    let h = Harness::start(vec![pipeline(
        "p",
        vec![stage("only", "sleepy", 3, Duration::from_secs(60))],
    )])
    .await;
    let pid_file = h.dir.path().join("sleepy.pid");
    let workers =
        h.workers(vec![Arc::new(Sleepy { agent: agent("sleepy"), pid_file: pid_file.clone() })]);
    let run = h.submit("p").await;
    while !pid_file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers.shutdown(Duration::from_millis(100)).await;

    for _ in 0..100 {
        let attempt = h.attempts(run.id).await.remove(0);
        if attempt.fencing_token == FencingToken::FIRST.next() {
            assert!(matches!(attempt.status, StageStatus::Pending | StageStatus::Dispatched));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the attempt was not handed back");
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}
