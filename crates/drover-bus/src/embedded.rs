//! The embedded bus: bounded in-process queues, for the zero-setup single binary.
//!
//! Nothing here survives a restart ([`Bus::is_durable`] is `false`), which is safe because
//! the store is the outbox: on start the engine requeues what was dispatched and never
//! finished. Every queue is bounded; a full task queue makes the dispatcher leave attempts
//! in the store until there is room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use drover_domain::AgentType;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc};
use tokio_stream::wrappers::BroadcastStream;

use crate::{Bus, BusError, Control, Delivery, TaskEnvelope, WorkerMessage, task_topic};

const CONTROL_CAPACITY: usize = 1024;

/// One agent type's queue. Consumers share the receiver, so each task reaches one of them.
struct TaskQueue {
    sender: mpsc::Sender<TaskEnvelope>,
    receiver: Arc<AsyncMutex<mpsc::Receiver<TaskEnvelope>>>,
}

/// The in-process [`Bus`].
pub struct EmbeddedBus {
    capacity: usize,
    // A std mutex: held only to look up or insert a queue, never across an await.
    tasks: Mutex<HashMap<AgentType, TaskQueue>>,
    results_tx: mpsc::Sender<WorkerMessage>,
    results_rx: Arc<AsyncMutex<mpsc::Receiver<WorkerMessage>>>,
    control: broadcast::Sender<Control>,
}

impl EmbeddedBus {
    /// A bus whose task queues and results queue each hold at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (results_tx, results_rx) = mpsc::channel(capacity);
        let (control, _) = broadcast::channel(CONTROL_CAPACITY);
        Self {
            capacity,
            tasks: Mutex::new(HashMap::new()),
            results_tx,
            results_rx: Arc::new(AsyncMutex::new(results_rx)),
            control,
        }
    }

    fn with_queue<T>(&self, agent: &AgentType, f: impl FnOnce(&TaskQueue) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-insert of a queue; the map
        // itself is still consistent, so keep using it.
        let mut tasks = self.tasks.lock().unwrap_or_else(|poison| poison.into_inner());
        let queue = tasks.entry(agent.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(self.capacity);
            TaskQueue { sender, receiver: Arc::new(AsyncMutex::new(receiver)) }
        });
        f(queue)
    }
}

/// Takes the next message from a receiver shared by several consumers.
fn shared_stream<T: Send + 'static>(
    receiver: Arc<AsyncMutex<mpsc::Receiver<T>>>,
) -> BoxStream<'static, T> {
    futures::stream::unfold(receiver, |receiver| async move {
        let next = receiver.lock().await.recv().await;
        next.map(|item| (item, receiver))
    })
    .boxed()
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn is_durable(&self) -> bool {
        false
    }

    async fn publish_task(&self, envelope: TaskEnvelope) -> Result<(), BusError> {
        let agent = envelope.agent.clone();
        self.with_queue(&agent, |queue| match queue.sender.try_send(envelope) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(BusError::Full { topic: task_topic(&agent) })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BusError::Closed),
        })
    }

    async fn consume_tasks(
        &self,
        agent: &AgentType,
        _consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError> {
        let receiver = self.with_queue(agent, |queue| queue.receiver.clone());
        Ok(shared_stream(receiver).map(|envelope| Delivery::new(envelope, None)).boxed())
    }

    async fn publish_result(&self, message: WorkerMessage) -> Result<(), BusError> {
        self.results_tx.send(message).await.map_err(|_| BusError::Closed)
    }

    async fn consume_results(&self) -> Result<BoxStream<'static, WorkerMessage>, BusError> {
        Ok(shared_stream(self.results_rx.clone()))
    }

    async fn publish_control(&self, control: Control) -> Result<(), BusError> {
        // No subscriber means no worker holds anything to stop.
        let _ = self.control.send(control);
        Ok(())
    }

    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError> {
        let stream = BroadcastStream::new(self.control.subscribe()).filter_map(|item| async move {
            match item {
                Ok(control) => Some(control),
                Err(lagged) => {
                    // The engine repeats a cancel on the next heartbeat of a stopped
                    // attempt, so a skipped message is recovered.
                    tracing::warn!(error = %lagged, "control subscriber fell behind");
                    None
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn queue_depth(&self, agent: &AgentType) -> Option<u64> {
        let depth =
            self.with_queue(agent, |queue| queue.sender.max_capacity() - queue.sender.capacity());
        Some(depth as u64)
    }
}

#[cfg(test)]
mod tests {
    use drover_domain::{
        AttemptId, CorrelationId, FencingToken, PipelineName, ProjectId, RunId, StageName, WorkerId,
    };

    use super::*;
    use crate::{AgentResult, WorkflowContext};

    fn envelope(agent: &str) -> TaskEnvelope {
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

    #[tokio::test]
    async fn each_task_reaches_exactly_one_of_the_competing_consumers() {
        let bus = EmbeddedBus::new(16);
        let agent = AgentType::parse("scaffold").unwrap();
        let mut a = bus.consume_tasks(&agent, "a").await.unwrap();
        let mut b = bus.consume_tasks(&agent, "b").await.unwrap();
        let sent: Vec<_> = (0..4).map(|_| envelope("scaffold")).collect();
        for task in &sent {
            bus.publish_task(task.clone()).await.unwrap();
        }
        let mut received = Vec::new();
        for _ in 0..2 {
            received.push(a.next().await.unwrap().envelope.task_id);
            received.push(b.next().await.unwrap().envelope.task_id);
        }
        received.sort();
        let mut expected: Vec<_> = sent.iter().map(|t| t.task_id).collect();
        expected.sort();
        assert_eq!(received, expected);
        assert_eq!(bus.queue_depth(&agent).await, Some(0));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_instead_of_growing() {
        let bus = EmbeddedBus::new(2);
        bus.publish_task(envelope("deploy")).await.unwrap();
        bus.publish_task(envelope("deploy")).await.unwrap();
        let err = bus.publish_task(envelope("deploy")).await.unwrap_err();
        assert!(matches!(err, BusError::Full { ref topic } if topic == "agent:deploy:tasks"));
        // Other agent types have their own room.
        bus.publish_task(envelope("e2e")).await.unwrap();
    }

    #[tokio::test]
    async fn results_and_controls_reach_their_consumers() {
        let bus = EmbeddedBus::new(4);
        let mut results = bus.consume_results().await.unwrap();
        let mut controls = bus.subscribe_control().await.unwrap();
        let message = WorkerMessage::Finished {
            attempt_id: AttemptId::new(),
            token: FencingToken::FIRST,
            worker_id: WorkerId::new("w"),
            result: AgentResult::Failed { error: "x".into(), retryable: true },
        };
        bus.publish_result(message.clone()).await.unwrap();
        assert_eq!(results.next().await.unwrap(), message);

        let cancel = Control::Cancel { attempt_id: message.attempt_id(), reason: "user".into() };
        bus.publish_control(cancel.clone()).await.unwrap();
        assert_eq!(controls.next().await.unwrap(), cancel);
    }

    #[test]
    fn envelopes_round_trip_through_json() {
        let task = envelope("validate");
        let text = serde_json::to_string(&task).unwrap();
        assert_eq!(serde_json::from_str::<TaskEnvelope>(&text).unwrap(), task);
    }
}
