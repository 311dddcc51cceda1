//! The worker side of the bus over the server's HTTP API, for a server whose bus is the
//! embedded one: tasks are leased by long-poll, worker messages are posted, and a
//! heartbeat's answer says when to stop. A worker then never needs database or broker
//! credentials, only the server's URL (and token).
//!
//! Also where every `drover worker` (whatever bus brings it tasks) gets the values of the
//! secrets a task names: [`ApiSecrets`] asks the server for the attempt it holds, with its
//! service token. Neither the lease answer nor a broker carries a value.

use std::time::Duration;

use async_trait::async_trait;
use drover_agents::{SecretsUnavailable, TaskSecrets};
use drover_bus::{
    Bus, BusError, Control, Delivery, DeliveryHandle, LiveMessage, MessageId, ResultDelivery,
    TaskEnvelope, WorkerMessage,
};
use drover_domain::{AgentType, SecretValues, WorkerId};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use crate::client::Client;

/// How long one lease request waits on the server.
const LEASE_WAIT: Duration = Duration::from_secs(20);
const RETRY_DELAY: Duration = Duration::from_secs(1);

pub(crate) struct HttpBus {
    client: Client,
    /// Cancels learned from heartbeat answers, for the worker pool's control loop.
    control: broadcast::Sender<Control>,
}

impl HttpBus {
    pub(crate) fn new(client: Client) -> Self {
        Self { client, control: broadcast::channel(256).0 }
    }
}

/// Leased tasks are handed over by the server; there is nothing to acknowledge here.
struct Leased;

#[async_trait]
impl DeliveryHandle for Leased {
    async fn ack(&self) {}
    async fn in_progress(&self) {}
    async fn nak(&self, _delay: Duration) {}
}

fn unsupported(what: &str) -> BusError {
    BusError::Broker(format!("{what} is not available to a worker over HTTP"))
}

#[async_trait]
impl Bus for HttpBus {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn is_durable(&self) -> bool {
        true
    }

    async fn publish_task(&self, _envelope: &TaskEnvelope) -> Result<MessageId, BusError> {
        Err(unsupported("publishing tasks"))
    }

    async fn task_pending(&self, _agent: &AgentType, _id: &MessageId) -> Result<bool, BusError> {
        Err(unsupported("asking for tasks"))
    }

    async fn consume_tasks(
        &self,
        agent: &AgentType,
        _consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError> {
        let client = self.client.clone();
        let agents = vec![agent.to_string()];
        // Lazy: a lease is requested only when the worker pool has room for a task.
        Ok(futures::stream::unfold((client, agents), |(client, agents)| async move {
            loop {
                match client.lease(&agents, LEASE_WAIT).await {
                    Ok(Some(envelope)) => {
                        let delivery = Delivery { envelope, handle: std::sync::Arc::new(Leased) };
                        return Some((delivery, (client, agents)));
                    }
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "leasing failed; retrying");
                        tokio::time::sleep(RETRY_DELAY).await;
                    }
                }
            }
        })
        .boxed())
    }

    async fn publish_result(&self, message: &WorkerMessage) -> Result<(), BusError> {
        let answer = self
            .client
            .worker_message(message)
            .await
            .map_err(|err| BusError::Broker(err.to_string()))?;
        if answer.cancel
            && let Some(attempt_id) = message.attempt_id()
        {
            let reason = "the server says the attempt is no longer this worker's".to_owned();
            let _ = self.control.send(Control::Cancel { attempt_id, reason });
        }
        Ok(())
    }

    async fn consume_results(
        &self,
        _consumer: &str,
    ) -> Result<BoxStream<'static, ResultDelivery>, BusError> {
        Err(unsupported("reading results"))
    }

    async fn publish_control(&self, _control: &Control) -> Result<(), BusError> {
        Err(unsupported("publishing control messages"))
    }

    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError> {
        Ok(BroadcastStream::new(self.control.subscribe())
            .filter_map(|c| async move { c.ok() })
            .boxed())
    }

    async fn publish_live(&self, _message: &LiveMessage) -> Result<(), BusError> {
        Ok(())
    }

    async fn subscribe_live(&self) -> Result<BoxStream<'static, LiveMessage>, BusError> {
        Err(unsupported("following the live channel"))
    }

    async fn queue_depth(&self, _agent: &AgentType) -> Option<u64> {
        None
    }
}

/// The server's API as a worker's secret source: `POST /api/v1/tasks/{id}/secrets` with the
/// envelope's project and fencing token.
pub(crate) struct ApiSecrets(pub(crate) Client);

#[async_trait]
impl TaskSecrets for ApiSecrets {
    async fn secrets_for(
        &self,
        envelope: &TaskEnvelope,
        _worker: &WorkerId,
    ) -> Result<SecretValues, SecretsUnavailable> {
        self.0.task_secrets(envelope).await.map_err(|err| SecretsUnavailable(err.to_string()))
    }
}
