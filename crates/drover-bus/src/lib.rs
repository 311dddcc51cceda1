//! The bus: how attempts travel from the engine to workers and results travel back.
//!
//! The bus only *carries*; the store decides. Every message here can be lost or delivered
//! twice without harm: the engine re-publishes what the store says is pending, and every
//! result is fenced by its attempt's token when it is committed. Topic names follow the
//! seeds: tasks on `agent:{type}:tasks` (consumer group `agent-{type}-group`), results on
//! `orchestrator:results`.

mod embedded;
mod message;

use async_trait::async_trait;
use drover_domain::AgentType;
use futures::stream::BoxStream;

pub use embedded::EmbeddedBus;
pub use message::{AgentResult, Control, TaskEnvelope, WorkerMessage, WorkflowContext};

/// The stream a task is published on for an agent type.
pub fn task_topic(agent: &AgentType) -> String {
    format!("agent:{agent}:tasks")
}

/// The consumer group workers of an agent type share.
pub fn consumer_group(agent: &AgentType) -> String {
    format!("agent-{agent}-group")
}

/// The stream results and heartbeats are published on.
pub const RESULTS_TOPIC: &str = "orchestrator:results";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The queue for this agent type is at capacity; try again later.
    #[error("the {topic} queue is full")]
    Full { topic: String },
    #[error("the bus is closed")]
    Closed,
    #[error("bus message could not be encoded or decoded: {0}")]
    Codec(#[from] serde_json::Error),
}

/// A task taken from the bus, to acknowledge once handled.
pub struct Delivery {
    pub envelope: TaskEnvelope,
    acknowledger: Option<Box<dyn Acknowledge>>,
}

impl Delivery {
    pub fn new(envelope: TaskEnvelope, acknowledger: Option<Box<dyn Acknowledge>>) -> Self {
        Self { envelope, acknowledger }
    }

    /// Tells the bus the task was handled (its result, if any, is published), so it is not
    /// delivered again.
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acknowledger {
            Some(acknowledger) => acknowledger.ack().await,
            None => Ok(()),
        }
    }
}

/// Backend-specific acknowledgement of one delivery.
#[async_trait]
pub trait Acknowledge: Send {
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Whether published tasks survive a restart of this process. When they do not, the
    /// engine requeues every `dispatched` attempt on start.
    fn is_durable(&self) -> bool;

    /// Publishes a task on its agent type's topic. Fails with [`BusError::Full`] rather
    /// than waiting when the queue is at capacity.
    async fn publish_task(&self, envelope: TaskEnvelope) -> Result<(), BusError>;

    /// Competing consumption of an agent type's tasks: each task goes to one consumer.
    async fn consume_tasks(
        &self,
        agent: &AgentType,
        consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError>;

    /// Publishes a worker's message to the engine; waits while the results queue is full.
    async fn publish_result(&self, message: WorkerMessage) -> Result<(), BusError>;

    /// The engine's side of [`Bus::publish_result`].
    async fn consume_results(&self) -> Result<BoxStream<'static, WorkerMessage>, BusError>;

    /// Broadcasts a control message to every worker.
    async fn publish_control(&self, control: Control) -> Result<(), BusError>;

    /// Every control message published from now on.
    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError>;

    /// How many tasks wait for an agent type, when the backend can tell.
    async fn queue_depth(&self, agent: &AgentType) -> Option<u64>;
}
