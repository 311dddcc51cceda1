//! The Redis Streams bus, with the seeds' names: tasks on the stream `agent:{type}:tasks`
//! read through the consumer group `agent-{type}-group` (one consumer name per worker),
//! results on `orchestrator:results` (group `orchestrator-group`), control and live events
//! on pub/sub.
//!
//! An entry stays in its stream until it is acknowledged (then it is deleted), so "the
//! broker still holds it" is simply "the entry exists". A consumer keeps the entries it
//! works on alive with `XCLAIM … JUSTID` (resetting their idle time); entries idle longer
//! than `claim_idle` — their consumer died — are taken over with `XAUTOCLAIM`. Every read
//! loop survives a Redis restart: it reconnects and recreates its group (`NOGROUP`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::AgentType;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, RedisError};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Bus, BusError, BusOptions, Control, Delivery, DeliveryHandle, LiveMessage, MessageId,
    RESULTS_GROUP, RESULTS_TOPIC, ResultDelivery, TaskEnvelope, WorkerMessage, consumer_group,
    task_topic,
};

const CONTROL_CHANNEL: &str = "drover:control";
const LIVE_CHANNEL: &str = "drover:live";
/// The field of a stream entry that holds the JSON message.
const FIELD: &str = "m";
const RETRY_DELAY: Duration = Duration::from_millis(500);

fn broker(err: RedisError) -> BusError {
    BusError::Broker(err.to_string())
}

/// `name` inside the configured namespace (`ns:name`, or `name` without one).
fn scoped(options: &BusOptions, name: &str) -> String {
    if options.namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{}:{name}", options.namespace)
    }
}

/// The Redis Streams [`Bus`].
pub struct RedisBus {
    client: Client,
    commands: ConnectionManager,
    options: BusOptions,
}

impl RedisBus {
    pub async fn connect(url: &str, options: BusOptions) -> Result<Self, BusError> {
        let client = Client::open(url).map_err(broker)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        let commands = client.get_connection_manager_with_config(config).await.map_err(broker)?;
        Ok(Self { client, commands, options })
    }

    async fn xadd(&self, key: &str, payload: String) -> Result<String, BusError> {
        let mut conn = self.commands.clone();
        redis::cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.options.capacity)
            .arg("*")
            .arg(FIELD)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(broker)
    }

    /// Reads `key` through `group` as `consumer`, forever, into a bounded channel.
    fn consume<T, F>(
        &self,
        key: String,
        group: String,
        consumer: String,
        wrap: F,
    ) -> BoxStream<'static, T>
    where
        T: Send + 'static,
        F: Fn(StreamId, Arc<dyn DeliveryHandle>) -> Option<T> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(self.options.batch_size.max(1));
        let reader = GroupReader {
            client: self.client.clone(),
            commands: self.commands.clone(),
            key,
            group,
            consumer,
            options: self.options.clone(),
        };
        tokio::spawn(reader.run(sender, wrap));
        ReceiverStream::new(receiver).boxed()
    }

    async fn publish_channel(&self, channel: &str, payload: String) -> Result<(), BusError> {
        let mut conn = self.commands.clone();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(broker)?;
        Ok(())
    }

    fn subscribe<T: DeserializeOwned + Send + 'static>(
        &self,
        channel: String,
    ) -> BoxStream<'static, T> {
        let (sender, receiver) = mpsc::channel(1024);
        let client = self.client.clone();
        tokio::spawn(async move {
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => {
                        if let Err(err) = pubsub.subscribe(&channel).await {
                            tracing::warn!(%channel, error = %err, "cannot subscribe; retrying");
                        } else {
                            let mut messages = pubsub.into_on_message();
                            while let Some(message) = messages.next().await {
                                let Ok(item) =
                                    serde_json::from_slice::<T>(message.get_payload_bytes())
                                else {
                                    tracing::warn!(%channel, "undecodable pub/sub message skipped");
                                    continue;
                                };
                                if sender.send(item).await.is_err() {
                                    return;
                                }
                            }
                            tracing::warn!(%channel, "pub/sub connection lost; resubscribing");
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%channel, error = %err, "cannot connect for pub/sub; retrying");
                    }
                }
                if sender.is_closed() {
                    return;
                }
                tokio::time::sleep(RETRY_DELAY).await;
            }
        });
        ReceiverStream::new(receiver).boxed()
    }
}

/// One group consumer's read loop.
struct GroupReader {
    client: Client,
    commands: ConnectionManager,
    key: String,
    group: String,
    consumer: String,
    options: BusOptions,
}

impl GroupReader {
    async fn run<T, F>(self, sender: mpsc::Sender<T>, wrap: F)
    where
        F: Fn(StreamId, Arc<dyn DeliveryHandle>) -> Option<T>,
    {
        let mut connection: Option<MultiplexedConnection> = None;
        let mut last_claim = Instant::now();
        let mut backlog: VecDeque<StreamId> = VecDeque::new();
        while !sender.is_closed() {
            let conn = match &mut connection {
                Some(conn) => conn,
                None => match self.connect().await {
                    Ok(conn) => connection.insert(conn),
                    Err(err) => {
                        tracing::warn!(key = %self.key, error = %err, "cannot reach Redis; retrying");
                        tokio::time::sleep(RETRY_DELAY).await;
                        continue;
                    }
                },
            };
            if backlog.is_empty() {
                let fetched = if last_claim.elapsed() >= self.options.claim_idle / 2 {
                    last_claim = Instant::now();
                    self.reclaim(conn).await
                } else {
                    Ok(Vec::new())
                };
                let fetched = match fetched {
                    Ok(claimed) if !claimed.is_empty() => Ok(claimed),
                    Ok(_) => self.read(conn).await,
                    Err(err) => Err(err),
                };
                match fetched {
                    Ok(entries) => backlog.extend(entries),
                    Err(err) if err.code() == Some("NOGROUP") => {
                        tracing::warn!(key = %self.key, "consumer group missing (Redis lost its data?); recreating");
                        if let Err(err) = ensure_group(conn, &self.key, &self.group).await {
                            tracing::warn!(key = %self.key, error = %err, "cannot recreate the group");
                            tokio::time::sleep(RETRY_DELAY).await;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(key = %self.key, error = %err, "reading the stream failed; reconnecting");
                        connection = None;
                        tokio::time::sleep(RETRY_DELAY).await;
                    }
                }
                continue;
            }
            let Some(entry) = backlog.pop_front() else { continue };
            let handle: Arc<dyn DeliveryHandle> = Arc::new(RedisHandle {
                commands: self.commands.clone(),
                key: self.key.clone(),
                group: self.group.clone(),
                consumer: self.consumer.clone(),
                id: entry.id.clone(),
                claim_idle: self.options.claim_idle,
            });
            match wrap(entry, handle.clone()) {
                Some(item) => {
                    if sender.send(item).await.is_err() {
                        return;
                    }
                }
                None => handle.ack().await,
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let block = self.options.block_time;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
        ensure_group(&mut conn, &self.key, &self.group).await?;
        Ok(conn)
    }

    async fn read(&self, conn: &mut MultiplexedConnection) -> Result<Vec<StreamId>, RedisError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.options.batch_size.max(1))
            .arg("BLOCK")
            .arg(u64::try_from(self.options.block_time.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(conn)
            .await?;
        Ok(reply
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default())
    }

    /// Takes over entries another consumer left idle too long.
    async fn reclaim(&self, conn: &mut MultiplexedConnection) -> Result<Vec<StreamId>, RedisError> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(u64::try_from(self.options.claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(self.options.batch_size.max(1))
            .query_async(conn)
            .await?;
        if !reply.claimed.is_empty() {
            tracing::info!(key = %self.key, count = reply.claimed.len(), "reclaimed entries idle past their claim time");
        }
        Ok(reply.claimed)
    }
}

async fn ensure_group(
    conn: &mut MultiplexedConnection,
    key: &str,
    group: &str,
) -> Result<(), RedisError> {
    let created: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(err) if err.code() != Some("BUSYGROUP") => Err(err),
        _ => Ok(()),
    }
}

/// One delivered entry.
struct RedisHandle {
    commands: ConnectionManager,
    key: String,
    group: String,
    consumer: String,
    id: String,
    claim_idle: Duration,
}

impl RedisHandle {
    async fn claim_with_idle(&self, idle: Duration) {
        let mut conn = self.commands.clone();
        let claimed: Result<redis::Value, RedisError> = redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(&self.id)
            .arg("IDLE")
            .arg(u64::try_from(idle.as_millis()).unwrap_or(0))
            .arg("JUSTID")
            .query_async(&mut conn)
            .await;
        if let Err(err) = claimed {
            tracing::debug!(key = %self.key, id = %self.id, error = %err, "XCLAIM failed");
        }
    }
}

#[async_trait]
impl DeliveryHandle for RedisHandle {
    async fn ack(&self) {
        let mut conn = self.commands.clone();
        let done: Result<(i64, i64), RedisError> = redis::pipe()
            .cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.id)
            .cmd("XDEL")
            .arg(&self.key)
            .arg(&self.id)
            .query_async(&mut conn)
            .await;
        if let Err(err) = done {
            tracing::warn!(key = %self.key, id = %self.id, error = %err, "acknowledging failed; it may be delivered again");
        }
    }

    async fn in_progress(&self) {
        self.claim_with_idle(Duration::ZERO).await;
    }

    async fn nak(&self, delay: Duration) {
        // Make it look idle for almost its claim time, so another consumer takes it over
        // after `delay`.
        self.claim_with_idle(self.claim_idle.saturating_sub(delay)).await;
    }
}

fn decode<T: DeserializeOwned>(entry: &StreamId) -> Option<T> {
    let payload: Vec<u8> = entry.get(FIELD)?;
    match serde_json::from_slice(&payload) {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(id = %entry.id, error = %err, "undecodable stream entry dropped");
            None
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_durable(&self) -> bool {
        true
    }

    async fn publish_task(&self, envelope: &TaskEnvelope) -> Result<MessageId, BusError> {
        let payload = serde_json::to_string(envelope)?;
        self.xadd(&scoped(&self.options, &task_topic(&envelope.agent)), payload)
            .await
            .map(MessageId)
    }

    async fn task_pending(&self, agent: &AgentType, id: &MessageId) -> Result<bool, BusError> {
        let mut conn = self.commands.clone();
        let entries: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(scoped(&self.options, &task_topic(agent)))
            .arg(&id.0)
            .arg(&id.0)
            .query_async(&mut conn)
            .await
            .map_err(broker)?;
        Ok(!entries.is_empty())
    }

    async fn consume_tasks(
        &self,
        agent: &AgentType,
        consumer: &str,
    ) -> Result<BoxStream<'static, Delivery>, BusError> {
        let key = scoped(&self.options, &task_topic(agent));
        let group = scoped(&self.options, &consumer_group(agent));
        Ok(self.consume(key, group, consumer.to_owned(), |entry, handle| {
            decode::<TaskEnvelope>(&entry).map(|envelope| Delivery { envelope, handle })
        }))
    }

    async fn publish_result(&self, message: &WorkerMessage) -> Result<(), BusError> {
        let payload = serde_json::to_string(message)?;
        self.xadd(&scoped(&self.options, RESULTS_TOPIC), payload).await.map(|_| ())
    }

    async fn consume_results(
        &self,
        consumer: &str,
    ) -> Result<BoxStream<'static, ResultDelivery>, BusError> {
        let key = scoped(&self.options, RESULTS_TOPIC);
        let group = scoped(&self.options, RESULTS_GROUP);
        Ok(self.consume(key, group, consumer.to_owned(), |entry, handle| {
            decode::<WorkerMessage>(&entry).map(|message| ResultDelivery { message, handle })
        }))
    }

    async fn publish_control(&self, control: &Control) -> Result<(), BusError> {
        self.publish_channel(
            &scoped(&self.options, CONTROL_CHANNEL),
            serde_json::to_string(control)?,
        )
        .await
    }

    async fn subscribe_control(&self) -> Result<BoxStream<'static, Control>, BusError> {
        Ok(self.subscribe(scoped(&self.options, CONTROL_CHANNEL)))
    }

    async fn publish_live(&self, message: &LiveMessage) -> Result<(), BusError> {
        self.publish_channel(&scoped(&self.options, LIVE_CHANNEL), serde_json::to_string(message)?)
            .await
    }

    async fn subscribe_live(&self) -> Result<BoxStream<'static, LiveMessage>, BusError> {
        Ok(self.subscribe(scoped(&self.options, LIVE_CHANNEL)))
    }

    async fn queue_depth(&self, agent: &AgentType) -> Option<u64> {
        let mut conn = self.commands.clone();
        let key = scoped(&self.options, &task_topic(agent));
        let wanted = scoped(&self.options, &consumer_group(agent));
        let groups: Option<redis::streams::StreamInfoGroupsReply> =
            redis::cmd("XINFO").arg("GROUPS").arg(&key).query_async(&mut conn).await.ok();
        match groups.and_then(|groups| groups.groups.into_iter().find(|g| g.name == wanted)) {
            // Entries not yet delivered to any consumer.
            Some(group) => group.lag.map(|lag| lag as u64),
            // No consumer ever read: every entry waits.
            None => redis::cmd("XLEN").arg(&key).query_async::<u64>(&mut conn).await.ok(),
        }
    }
}
