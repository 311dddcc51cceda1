//! The embedded bus: bounded in-process queues, for the zero-setup single binary.
//!
//! Nothing here survives a restart ([`Bus::is_durable`] is `false`), which is safe because
//! the store is the outbox: on start the engine requeues what was dispatched and never
//! finished. Every queue is bounded; a full task queue makes the dispatcher leave attempts
//! in the store until there is room. The bus remembers which published tasks are not yet
//! acknowledged, so the engine can tell a waiting task from a lost one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use drover_domain::AgentType;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc};
use tokio_stream::wrappers::BroadcastStream;

use crate::{
    Bus, BusError, Control, Delivery, DeliveryHandle, LiveMessage, MessageId, NoHandle,
    ResultDelivery, TaskEnvelope, WorkerMessage, task_topic,
};

const BROADCAST_CAPACITY: usize = 1024;

struct Queued {
    id: u64,
    envelope: TaskEnvelope,
}

/// One agent type's queue. Consumers share the receiver, so each task reaches one of them.
struct TaskQueue {
    sender: mpsc::Sender<Queued>,
    receiver: Arc<AsyncMutex<mpsc::Receiver<Queued>>>,
}

type Outstanding = Arc<Mutex<HashSet<u64>>>;

/// The in-process [`Bus`].
pub struct EmbeddedBus {
    capacity: usize,
    next_id: AtomicU64,
    // std mutexes: held only for a map operation, never across an await.
    tasks: Mutex<HashMap<AgentType, TaskQueue>>,
    /// Published tasks not yet acknowledged (queued or being worked on).
    outstanding: Outstanding,
    results_tx: mpsc::Sender<WorkerMessage>,
    results_rx: Arc<AsyncMutex<mpsc::Receiver<WorkerMessage>>>,
    control: broadcast::Sender<Control>,
    live: broadcast::Sender<LiveMessage>,
}

impl EmbeddedBus {
    /// A bus whose task queues and results queue each hold at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (results_tx, results_rx) = mpsc::channel(capacity);
        Self {
            capacity,
            next_id: AtomicU64::new(1),
            tasks: Mutex::new(HashMap::new()),
            outstanding: Arc::default(),
            results_tx,
            results_rx: Arc::new(AsyncMutex::new(results_rx)),
            control: broadcast::channel(BROADCAST_CAPACITY).0,
            live: broadcast::channel(BROADCAST_CAPACITY).0,
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

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.outstanding.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// One delivered task: acknowledging forgets it; a nak puts it back after a delay.
struct EmbeddedHandle {
    id: u64,
    envelope: TaskEnvelope,
    requeue: mpsc::Sender<Queued>,
    outstanding: Outstanding,
}

#[async_trait]
impl DeliveryHandle for EmbeddedHandle {
    async fn ack(&self) {
        self.outstanding.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&self.id);
    }

    async fn in_progress(&self) {}

    async fn nak(&self, delay: Duration) {
        let id = self.id;
        let queued = Queued { id, envelope: self.envelope.clone() };
        let requeue = self.requeue.clone();
        let outstanding = self.outstanding.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if requeue.try_send(queued).is_err() {
                // No room: forget it; the engine's reconciliation publishes it again.
                outstanding.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&id);
            }
        });
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

fn broadcast_stream<T: Clone + Send + 'static>(
    receiver: broadcast::Receiver<T>,
    what: &'static str,
) -> BoxStream<'static, T> {
    BroadcastStream::new(receiver)
        .filter_map(move |item| async move {
            match item {
                Ok(item) => Some(item),
                Err(lagged) => {
                    tracing::warn!(error = %lagged, "{what} subscriber fell behind");
                    None
                }
            }
        })
        .boxed()
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn is_durable(&self) -> bool {
        false
    }

    async fn publish_task(&self, envelope: &TaskEnvelope) -> Result<MessageId, BusError> {
        let agent = envelope.agent.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.outstanding().insert(id);
        let queued = Queued { id, envelope: envelope.clone() };
        let sent = self.with_queue(&agent, |queue| match queue.sender.try_send(queued) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(BusError::Full { topic: task_topic(&agent) })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BusError::Closed),
        });
        if sent.is_err() {
            self.outstanding().remove(&id);
        }
        sent.map(|()| MessageId(id.to_string()))
    }

    async fn task_pending(&self, _agent: &AgentType, id: &MessageId) -> Result<bool, BusError> {
        Ok(id.0.parse::<u64>().is_ok_and(|id| self.outstanding().contains(&id)))
    }

    async fn consume_tasks(
        &self,
        agent: &AgentType,
        _consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError> {
        let (receiver, requeue) =
            self.with_queue(agent, |queue| (queue.receiver.clone(), queue.sender.clone()));
        let outstanding = self.outstanding.clone();
        Ok(shared_stream(receiver)
            .map(move |queued| Delivery {
                handle: Arc::new(EmbeddedHandle {
                    id: queued.id,
                    envelope: queued.envelope.clone(),
                    requeue: requeue.clone(),
                    outstanding: outstanding.clone(),
                }),
                envelope: queued.envelope,
            })
            .boxed())
    }

    async fn publish_result(&self, message: &WorkerMessage) -> Result<(), BusError> {
        self.results_tx.send(message.clone()).await.map_err(|_| BusError::Closed)
    }

    async fn consume_results(
        &self,
        _consumer: &str,
    ) -> Result<BoxStream<'static, ResultDelivery>, BusError> {
        Ok(shared_stream(self.results_rx.clone())
            .map(|message| ResultDelivery { message, handle: Arc::new(NoHandle) })
            .boxed())
    }

    async fn publish_control(&self, control: &Control) -> Result<(), BusError> {
        // No subscriber means no worker holds anything to stop.
        let _ = self.control.send(control.clone());
        Ok(())
    }

    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError> {
        // The engine repeats a cancel on the next heartbeat of a stopped attempt, so a
        // message skipped by a lagging subscriber is recovered.
        Ok(broadcast_stream(self.control.subscribe(), "control"))
    }

    async fn publish_live(&self, message: &LiveMessage) -> Result<(), BusError> {
        let _ = self.live.send(message.clone());
        Ok(())
    }

    async fn subscribe_live(&self) -> Result<BoxStream<'static, LiveMessage>, BusError> {
        Ok(broadcast_stream(self.live.subscribe(), "live message"))
    }

    async fn queue_depth(&self, agent: &AgentType) -> Option<u64> {
        let depth =
            self.with_queue(agent, |queue| queue.sender.max_capacity() - queue.sender.capacity());
        Some(depth as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::envelope;

    #[tokio::test]
    async fn a_full_queue_refuses_instead_of_growing() {
        let bus = EmbeddedBus::new(2);
        bus.publish_task(&envelope("deploy")).await.unwrap();
        bus.publish_task(&envelope("deploy")).await.unwrap();
        let err = bus.publish_task(&envelope("deploy")).await.unwrap_err();
        assert!(matches!(err, BusError::Full { ref topic } if topic == "agent:deploy:tasks"));
        // Other agent types have their own room.
        bus.publish_task(&envelope("e2e")).await.unwrap();
    }

    #[tokio::test]
    async fn nothing_survives_the_process() {
        assert!(!EmbeddedBus::new(1).is_durable());
    }
}
