//! The NATS JetStream bus. Tasks go to the work-queue stream `DROVER_TASKS` on subjects
//! `agent.{type}.tasks`, each read through a durable pull consumer `agent-{type}-group`
//! shared by that type's workers; results go to the work-queue stream `DROVER_RESULTS`
//! (consumer `orchestrator-group`). A message stays in its stream until acknowledged, so
//! "the broker still holds it" is "the stream still has its sequence number".
//!
//! `AckWait` is the claim time: a worker keeps its message with `InProgress` on every
//! heartbeat; a message not acknowledged in time is redelivered to another consumer, up
//! to `MaxDeliver` times (after which the engine's reconciliation takes over). Control and
//! live events travel on core NATS subjects.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_trait::async_trait;
use drover_domain::AgentType;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Bus, BusError, BusOptions, Control, Delivery, DeliveryHandle, LiveMessage, MessageId,
    RESULTS_GROUP, ResultDelivery, TaskEnvelope, WorkerMessage, consumer_group,
};

const TASKS_STREAM: &str = "DROVER_TASKS";
const RESULTS_STREAM: &str = "DROVER_RESULTS";
const RESULTS_SUBJECT: &str = "orchestrator.results";
const CONTROL_SUBJECT: &str = "drover.control";
const LIVE_SUBJECT: &str = "drover.live";
/// Deliveries of one message before JetStream gives up on it.
const MAX_DELIVER: i64 = 20;
const RETRY_DELAY: Duration = Duration::from_millis(500);

fn broker(err: impl std::fmt::Display) -> BusError {
    BusError::Broker(err.to_string())
}

/// Broker names inside the configured namespace: streams `<ns>_DROVER_TASKS`, subjects
/// `<ns>.agent.{type}.tasks`, and so on; without a namespace, the plain names.
#[derive(Debug, Clone)]
struct Names {
    tasks_stream: String,
    results_stream: String,
    prefix: String,
}

impl Names {
    fn new(namespace: &str) -> Self {
        if namespace.is_empty() {
            return Self {
                tasks_stream: TASKS_STREAM.to_owned(),
                results_stream: RESULTS_STREAM.to_owned(),
                prefix: String::new(),
            };
        }
        Self {
            tasks_stream: format!("{namespace}_{TASKS_STREAM}"),
            results_stream: format!("{namespace}_{RESULTS_STREAM}"),
            prefix: format!("{namespace}."),
        }
    }

    fn task_subject(&self, agent: &AgentType) -> String {
        format!("{}agent.{agent}.tasks", self.prefix)
    }

    fn task_subjects(&self) -> String {
        format!("{}agent.*.tasks", self.prefix)
    }

    fn subject(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// The NATS JetStream [`Bus`].
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    options: BusOptions,
    names: Names,
}

impl NatsBus {
    pub async fn connect(url: &str, options: BusOptions) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(broker)?;
        let jetstream = jetstream::new(client.clone());
        let names = Names::new(&options.namespace);
        let bus = Self { client, jetstream, options, names };
        bus.tasks_stream().await?;
        bus.results_stream().await?;
        Ok(bus)
    }

    fn stream_config(&self, name: &str, subjects: Vec<String>) -> stream::Config {
        stream::Config {
            name: name.to_owned(),
            subjects,
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: i64::try_from(self.options.capacity).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    fn tasks_config(&self) -> stream::Config {
        self.stream_config(&self.names.tasks_stream, vec![self.names.task_subjects()])
    }

    fn results_config(&self) -> stream::Config {
        self.stream_config(&self.names.results_stream, vec![self.names.subject(RESULTS_SUBJECT)])
    }

    async fn tasks_stream(&self) -> Result<stream::Stream, BusError> {
        self.jetstream.get_or_create_stream(self.tasks_config()).await.map_err(broker)
    }

    async fn results_stream(&self) -> Result<stream::Stream, BusError> {
        self.jetstream.get_or_create_stream(self.results_config()).await.map_err(broker)
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<u64, BusError> {
        match self.publish_once(subject.clone(), payload.clone()).await {
            // The stream is gone (the server lost its storage, or someone deleted it):
            // create it again and retry once.
            Err(BusError::Broker(message)) if message.contains("no stream") => {
                tracing::warn!(%subject, "JetStream stream missing; recreating it");
                self.tasks_stream().await?;
                self.results_stream().await?;
                self.publish_once(subject, payload).await
            }
            other => other,
        }
    }

    async fn publish_once(&self, subject: String, payload: Vec<u8>) -> Result<u64, BusError> {
        let ack = self.jetstream.publish(subject, payload.into()).await.map_err(broker)?;
        let ack = ack.await.map_err(|err| {
            if err.to_string().contains("maximum messages exceeded") {
                BusError::Full { topic: "nats".to_owned() }
            } else {
                broker(err)
            }
        })?;
        Ok(ack.sequence)
    }

    /// Pulls from the durable consumer `name` forever, recreating stream and consumer if
    /// they disappear, into a bounded channel.
    fn consume<T, F>(
        &self,
        stream_config: stream::Config,
        name: String,
        subject: String,
        wrap: F,
    ) -> BoxStream<'static, T>
    where
        T: Send + 'static,
        F: Fn(jetstream::Message) -> Result<T, Box<jetstream::Message>> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(self.options.batch_size.max(1));
        let jetstream = self.jetstream.clone();
        let options = self.options.clone();
        tokio::spawn(async move {
            while !sender.is_closed() {
                let messages = async {
                    let stream = jetstream
                        .get_or_create_stream(stream_config.clone())
                        .await
                        .map_err(broker)?;
                    let config = consumer_config(name.clone(), subject.clone(), &options);
                    let consumer: consumer::PullConsumer =
                        stream.get_or_create_consumer(&name, config).await.map_err(broker)?;
                    consumer
                        .stream()
                        .max_messages_per_batch(options.batch_size.max(1))
                        .expires(options.block_time)
                        // Idle heartbeats from the server reveal a lost consumer (the
                        // server restarted without its storage) within a few blocks.
                        .heartbeat((options.block_time / 4).max(Duration::from_millis(50)))
                        .messages()
                        .await
                        .map_err(broker)
                }
                .await;
                let mut messages = match messages {
                    Ok(messages) => messages,
                    Err(err) => {
                        tracing::warn!(consumer = %name, error = %err, "cannot pull from JetStream; retrying");
                        tokio::time::sleep(RETRY_DELAY).await;
                        continue;
                    }
                };
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(message) => match wrap(message) {
                            Ok(item) => {
                                if sender.send(item).await.is_err() {
                                    return;
                                }
                            }
                            Err(undecodable) => {
                                tracing::warn!(consumer = %name, "undecodable message dropped");
                                let _ = undecodable.ack().await;
                            }
                        },
                        Err(err) => {
                            tracing::warn!(consumer = %name, error = %err, "pulling failed; re-subscribing");
                            break;
                        }
                    }
                }
                tokio::time::sleep(RETRY_DELAY).await;
            }
        });
        ReceiverStream::new(receiver).boxed()
    }

    async fn subscribe<T: DeserializeOwned + Send + 'static>(
        &self,
        subject: String,
    ) -> Result<BoxStream<'static, T>, BusError> {
        let subscriber = self.client.subscribe(subject).await.map_err(broker)?;
        Ok(subscriber
            .filter_map(|message| async move {
                let decoded = serde_json::from_slice(&message.payload);
                if decoded.is_err() {
                    tracing::warn!(subject = %message.subject, "undecodable message skipped");
                }
                decoded.ok()
            })
            .boxed())
    }
}

/// The durable pull consumer every worker of an agent type (or every server) shares.
fn consumer_config(name: String, subject: String, options: &BusOptions) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name),
        filter_subject: subject,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: options.claim_idle,
        max_deliver: MAX_DELIVER,
        ..Default::default()
    }
}

/// One delivered JetStream message.
struct NatsHandle {
    message: jetstream::Message,
}

impl NatsHandle {
    async fn reply(&self, kind: AckKind) {
        if let Err(err) = self.message.ack_with(kind).await {
            tracing::debug!(error = %err, "acknowledgement not sent");
        }
    }
}

#[async_trait]
impl DeliveryHandle for NatsHandle {
    async fn ack(&self) {
        // Double ack waits for the server's confirmation, so a finished task is not
        // redelivered after a reconnect.
        if let Err(err) = self.message.double_ack().await {
            tracing::warn!(error = %err, "acknowledging failed; it may be delivered again");
        }
    }

    async fn in_progress(&self) {
        self.reply(AckKind::Progress).await;
    }

    async fn nak(&self, delay: Duration) {
        self.reply(AckKind::Nak(Some(delay))).await;
    }
}

fn decode<T: DeserializeOwned>(message: &jetstream::Message) -> Option<T> {
    serde_json::from_slice(&message.payload).ok()
}

#[async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn is_durable(&self) -> bool {
        true
    }

    async fn publish_task(&self, envelope: &TaskEnvelope) -> Result<MessageId, BusError> {
        let payload = serde_json::to_vec(envelope)?;
        let subject = self.names.task_subject(&envelope.agent);
        let sequence = self.publish(subject.clone(), payload).await.map_err(|err| match err {
            BusError::Full { .. } => BusError::Full { topic: subject },
            other => other,
        })?;
        Ok(MessageId(sequence.to_string()))
    }

    async fn task_pending(&self, _agent: &AgentType, id: &MessageId) -> Result<bool, BusError> {
        let Ok(sequence) = id.0.parse::<u64>() else { return Ok(false) };
        let stream = match self.jetstream.get_stream(&self.names.tasks_stream).await {
            Ok(stream) => stream,
            Err(err) if err.to_string().contains("not found") => return Ok(false),
            Err(err) => return Err(broker(err)),
        };
        match stream.get_raw_message(sequence).await {
            Ok(_) => Ok(true),
            Err(err) if matches!(err.kind(), stream::RawMessageErrorKind::NoMessageFound) => {
                Ok(false)
            }
            Err(err) if err.to_string().contains("no message found") => Ok(false),
            Err(err) => Err(broker(err)),
        }
    }

    async fn consume_tasks(
        &self,
        agent: &AgentType,
        _consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError> {
        Ok(self.consume(
            self.tasks_config(),
            consumer_group(agent),
            self.names.task_subject(agent),
            |message| match decode::<TaskEnvelope>(&message) {
                Some(envelope) => {
                    Ok(Delivery { envelope, handle: Arc::new(NatsHandle { message }) })
                }
                None => Err(Box::new(message)),
            },
        ))
    }

    async fn publish_result(&self, message: &WorkerMessage) -> Result<(), BusError> {
        self.publish(self.names.subject(RESULTS_SUBJECT), serde_json::to_vec(message)?)
            .await
            .map(|_| ())
    }

    async fn consume_results(
        &self,
        _consumer: &str,
    ) -> Result<BoxStream<'static, ResultDelivery>, BusError> {
        Ok(self.consume(
            self.results_config(),
            RESULTS_GROUP.to_owned(),
            self.names.subject(RESULTS_SUBJECT),
            |message| match decode::<WorkerMessage>(&message) {
                Some(decoded) => Ok(ResultDelivery {
                    message: decoded,
                    handle: Arc::new(NatsHandle { message }),
                }),
                None => Err(Box::new(message)),
            },
        ))
    }

    async fn publish_control(&self, control: &Control) -> Result<(), BusError> {
        self.client
            .publish(self.names.subject(CONTROL_SUBJECT), serde_json::to_vec(control)?.into())
            .await
            .map_err(broker)
    }

    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError> {
        self.subscribe(self.names.subject(CONTROL_SUBJECT)).await
    }

    async fn publish_live(&self, message: &LiveMessage) -> Result<(), BusError> {
        self.client
            .publish(self.names.subject(LIVE_SUBJECT), serde_json::to_vec(message)?.into())
            .await
            .map_err(broker)
    }

    async fn subscribe_live(&self) -> Result<BoxStream<'static, LiveMessage>, BusError> {
        self.subscribe(self.names.subject(LIVE_SUBJECT)).await
    }

    async fn queue_depth(&self, agent: &AgentType) -> Option<u64> {
        let stream = self.tasks_stream().await.ok()?;
        let config =
            consumer_config(consumer_group(agent), self.names.task_subject(agent), &self.options);
        let mut consumer: consumer::PullConsumer =
            stream.get_or_create_consumer(&consumer_group(agent), config).await.ok()?;
        consumer.info().await.ok().map(|info| info.num_pending)
    }
}
