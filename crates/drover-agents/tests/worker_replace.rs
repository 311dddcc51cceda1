//! `WorkerPool::replace_agents` on a live pool over the embedded bus: a changed agent takes
//! new tasks while a task already running finishes with the old agent, a new type is
//! consumed and announced, and a removed type is no longer taken.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_agents::{Agent, AgentTask, WorkerPool, WorkerPoolConfig};
use drover_bus::{AgentResult, Bus, EmbeddedBus, TaskEnvelope, WorkerMessage, WorkflowContext};
use drover_domain::{
    AgentType, AttemptId, CorrelationId, FencingToken, PipelineName, ProjectId, RunId, StageName,
    WorkerId,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Answers `{"by": label}`; when gated, only after the gate lets it through, and it says
/// when it started.
struct Labelled {
    agent_type: AgentType,
    label: &'static str,
    gate: Option<Arc<Semaphore>>,
    started: Option<Arc<tokio::sync::Notify>>,
}

impl Labelled {
    fn new(agent_type: &str, label: &'static str) -> Self {
        Self { agent_type: AgentType::parse(agent_type).unwrap(), label, gate: None, started: None }
    }
}

#[async_trait]
impl Agent for Labelled {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, _task: &AgentTask) -> AgentResult {
        if let Some(started) = &self.started {
            started.notify_one();
        }
        if let Some(gate) = &self.gate {
            let _pass = gate.acquire().await;
        }
        AgentResult::Succeeded { output: json!({ "by": self.label }) }
    }
}

fn envelope(dir: &Path, agent: &str) -> TaskEnvelope {
    let task_id = AttemptId::new();
    let workspace = dir.join(format!("ws-{task_id}"));
    std::fs::create_dir_all(&workspace).unwrap();
    TaskEnvelope {
        task_id,
        project_id: ProjectId::default_project(),
        run_id: RunId::new(),
        pipeline: PipelineName::parse("p").unwrap(),
        stage: StageName::parse("work").unwrap(),
        agent: AgentType::parse(agent).unwrap(),
        attempt: 1,
        fencing_token: FencingToken::FIRST,
        payload: json!({ "request": "anything" }),
        context: WorkflowContext {
            workspace: workspace.display().to_string(),
            log_path: dir.join(format!("{task_id}.log")).display().to_string(),
            ..Default::default()
        },
        deadline: None,
        correlation_id: CorrelationId::new(),
        traceparent: None,
    }
}

/// Reads worker messages until the one that finishes `attempt`, returning its output;
/// remembers the agent types of every `Alive` seen on the way.
async fn finished(
    results: &mut BoxStream<'static, drover_bus::ResultDelivery>,
    attempt: AttemptId,
    announced: &mut Vec<Vec<AgentType>>,
) -> Value {
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("no result in time")
            .expect("results ended");
        match delivery.message {
            WorkerMessage::Finished { attempt_id, result, .. } if attempt_id == attempt => {
                match result {
                    AgentResult::Succeeded { output } => return output,
                    AgentResult::Failed { error, .. } => panic!("failed: {error}"),
                }
            }
            WorkerMessage::Alive { profile, .. } => announced.push(profile.agents),
            _ => {}
        }
    }
}

#[tokio::test]
async fn replaced_agents_take_new_tasks_while_running_ones_finish_with_the_old_agent() {
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new(64));
    let mut results = bus.consume_results("test").await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let old = Labelled {
        gate: Some(gate.clone()),
        started: Some(started.clone()),
        ..Labelled::new("echo", "old")
    };
    let pool = WorkerPool::start(
        bus.clone(),
        vec![Arc::new(old)],
        WorkerPoolConfig {
            worker_id: WorkerId::new("test-worker".to_owned()),
            concurrency: 2,
            heartbeat_interval: Duration::from_millis(200),
            kind: "embedded".to_owned(),
            secrets: None,
        },
    );
    let mut announced = Vec::new();

    // A task starts under the old agent and waits at its gate.
    let running = envelope(dir.path(), "echo");
    bus.publish_task(&running).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the first task never started");

    pool.replace_agents(vec![
        Arc::new(Labelled::new("echo", "new")),
        Arc::new(Labelled::new("other", "other")),
    ]);
    let types: Vec<String> = pool.agent_types().iter().map(ToString::to_string).collect();
    assert_eq!(types, ["echo", "other"]);

    // New tasks of the kept type go to the new agent, the new type is consumed.
    let next = envelope(dir.path(), "echo");
    bus.publish_task(&next).await.unwrap();
    assert_eq!(finished(&mut results, next.task_id, &mut announced).await["by"], "new");
    let other = envelope(dir.path(), "other");
    bus.publish_task(&other).await.unwrap();
    assert_eq!(finished(&mut results, other.task_id, &mut announced).await["by"], "other");

    // The task that was running all along finishes with the old agent's result.
    assert_eq!(pool.running(), 1);
    gate.add_permits(1);
    assert_eq!(finished(&mut results, running.task_id, &mut announced).await["by"], "old");
    let other_type = AgentType::parse("other").unwrap();
    assert!(
        announced.iter().any(|agents| agents.contains(&other_type)),
        "the new type was never announced: {announced:?}"
    );

    // A type no longer listed is not taken any more; the others still are.
    pool.replace_agents(vec![Arc::new(Labelled::new("other", "other-2"))]);
    let orphan = envelope(dir.path(), "echo");
    bus.publish_task(&orphan).await.unwrap();
    let again = envelope(dir.path(), "other");
    bus.publish_task(&again).await.unwrap();
    assert_eq!(finished(&mut results, again.task_id, &mut announced).await["by"], "other-2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bus.queue_depth(&AgentType::parse("echo").unwrap()).await, Some(1));

    pool.shutdown(Duration::from_secs(5)).await;
}
