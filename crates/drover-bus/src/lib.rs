//! The bus: how attempts travel from the engine to workers and results travel back.
//!
//! The bus only *carries*; the store decides. Every message here can be lost or delivered
//! twice without harm: the engine re-publishes what the store says is dispatched but the
//! broker no longer holds, and every result is fenced by its attempt's token when it is
//! committed. Topic names follow the seeds: tasks on `agent:{type}:tasks` (consumer group
//! `agent-{type}-group`), results on `orchestrator:results`.
//!
//! Three backends implement [`Bus`]: [`EmbeddedBus`] (in-process, the default),
//! [`RedisBus`] (Redis Streams with consumer groups) and [`NatsBus`] (NATS JetStream
//! work-queue streams). [`connect`] picks one from `bus.url`.

mod embedded;
mod message;
mod nats;
mod redis_streams;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_domain::AgentType;
use futures::stream::BoxStream;

pub use drover_domain::WorkerProfile;
pub use embedded::EmbeddedBus;
pub use message::{
    AgentResult, Control, LiveMessage, TaskEnvelope, Watching, WorkerMessage, WorkflowContext,
};
pub use nats::NatsBus;
pub use redis_streams::RedisBus;

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
/// The consumer group of the servers reading results.
pub const RESULTS_GROUP: &str = "orchestrator-group";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The queue for this agent type is at capacity; try again later.
    #[error("the {topic} queue is full")]
    Full { topic: String },
    #[error("the bus is closed")]
    Closed,
    #[error("bus message could not be encoded or decoded: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("unsupported bus URL `{0}`; expected `embedded`, `redis://…` or `nats://…`")]
    UnsupportedUrl(String),
    #[error("the broker failed: {0}")]
    Broker(String),
}

/// Tuning shared by the broker backends.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// Bound of each queue: the embedded bus refuses beyond it, brokers trim beyond it.
    pub capacity: usize,
    /// Messages read per broker round trip.
    pub batch_size: usize,
    /// How long a read waits on an empty queue before asking again.
    pub block_time: Duration,
    /// A delivered task not acknowledged nor kept alive (`in_progress`) for this long is
    /// handed to another consumer.
    pub claim_idle: Duration,
    /// Prefix of every broker name (streams, groups, channels), so several drover
    /// installations (or test runs) can share one broker. Empty: the seeds' names.
    pub namespace: String,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            batch_size: 32,
            block_time: Duration::from_secs(2),
            claim_idle: Duration::from_secs(15),
            namespace: String::new(),
        }
    }
}

/// Opens the bus `url` names: `embedded`, `redis://…` or `nats://…`.
pub async fn connect(url: &str, options: BusOptions) -> Result<Arc<dyn Bus>, BusError> {
    if url == "embedded" {
        return Ok(Arc::new(EmbeddedBus::new(options.capacity.min(1 << 20))));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(RedisBus::connect(url, options).await?));
    }
    if url.starts_with("nats://") || url.starts_with("tls://") {
        return Ok(Arc::new(NatsBus::connect(url, options).await?));
    }
    Err(BusError::UnsupportedUrl(url.to_owned()))
}

/// The broker's name for a published message, used to ask later whether it still holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId(pub String);

/// Backend-specific handling of one delivered message.
#[async_trait]
pub trait DeliveryHandle: Send + Sync {
    /// Done with it: never deliver it again.
    async fn ack(&self);
    /// Still working on it: do not hand it to another consumer yet.
    async fn in_progress(&self);
    /// Give it back, to be delivered again after `delay`.
    async fn nak(&self, delay: Duration);
}

/// A handle for backends where nothing needs acknowledging.
pub(crate) struct NoHandle;

#[async_trait]
impl DeliveryHandle for NoHandle {
    async fn ack(&self) {}
    async fn in_progress(&self) {}
    async fn nak(&self, _delay: Duration) {}
}

/// A task taken from the bus.
pub struct Delivery {
    pub envelope: TaskEnvelope,
    pub handle: Arc<dyn DeliveryHandle>,
}

/// A worker message taken from the bus by the engine.
pub struct ResultDelivery {
    pub message: WorkerMessage,
    pub handle: Arc<dyn DeliveryHandle>,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `embedded`, `redis` or `nats`.
    fn kind(&self) -> &'static str;

    /// Whether published tasks survive a restart of this process. When they do not, the
    /// engine requeues every `dispatched` attempt on start.
    fn is_durable(&self) -> bool;

    /// Publishes a task on its agent type's topic. The embedded bus fails with
    /// [`BusError::Full`] rather than waiting when the queue is at capacity.
    async fn publish_task(&self, envelope: &TaskEnvelope) -> Result<MessageId, BusError>;

    /// Whether the broker still holds the task (queued, or delivered and neither
    /// acknowledged nor dropped). `false` means it was lost or finished with.
    async fn task_pending(&self, agent: &AgentType, id: &MessageId) -> Result<bool, BusError>;

    /// Competing consumption of an agent type's tasks: each task goes to one consumer.
    /// The stream survives broker restarts (it reconnects) and ends only when dropped.
    async fn consume_tasks(
        &self,
        agent: &AgentType,
        consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError>;

    /// Publishes a worker's message to the engine.
    async fn publish_result(&self, message: &WorkerMessage) -> Result<(), BusError>;

    /// The engine's side of [`Bus::publish_result`]; `consumer` names this server.
    async fn consume_results(
        &self,
        consumer: &str,
    ) -> Result<BoxStream<'static, ResultDelivery>, BusError>;

    /// Broadcasts a control message to every worker (fire and forget).
    async fn publish_control(&self, control: &Control) -> Result<(), BusError>;

    /// Every control message published from now on.
    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError>;

    /// Tells the other servers something on the live channel (pub/sub, at most once).
    async fn publish_live(&self, message: &LiveMessage) -> Result<(), BusError>;

    /// What any server says on the live channel from now on (its own messages included).
    async fn subscribe_live(&self) -> Result<BoxStream<'static, LiveMessage>, BusError>;

    /// How many tasks wait for an agent type, when the backend can tell.
    async fn queue_depth(&self, agent: &AgentType) -> Option<u64>;
}

#[cfg(test)]
pub(crate) mod tests {
    use drover_domain::{
        AgentType, AttemptId, CorrelationId, FencingToken, PipelineName, ProjectId, RunId,
        StageName,
    };

    use crate::{TaskEnvelope, WorkflowContext};

    pub(crate) fn envelope(agent: &str) -> TaskEnvelope {
        TaskEnvelope {
            task_id: AttemptId::new(),
            project_id: ProjectId::default_project(),
            run_id: RunId::new(),
            pipeline: PipelineName::parse("sdlc").unwrap(),
            stage: StageName::parse(agent).unwrap(),
            agent: AgentType::parse(agent).unwrap(),
            attempt: 1,
            fencing_token: FencingToken::FIRST,
            payload: serde_json::json!({}),
            context: WorkflowContext::default(),
            deadline: None,
            correlation_id: CorrelationId::new(),
            traceparent: None,
        }
    }

    #[test]
    fn envelopes_round_trip_through_json() {
        let task = envelope("validate");
        let text = serde_json::to_string(&task).unwrap();
        assert_eq!(serde_json::from_str::<TaskEnvelope>(&text).unwrap(), task);
    }
}
