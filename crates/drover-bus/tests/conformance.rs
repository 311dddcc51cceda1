//! The bus conformance suite: the behaviour every [`Bus`] must have, run unchanged against
//! the embedded bus, the machine's Redis and its NATS. Each test gets its own namespace on
//! the broker, so tests never see each other's messages.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use drover_bus::{
    AgentResult, Bus, BusOptions, Control, Delivery, LiveMessage, TaskEnvelope, WorkerMessage,
    WorkerProfile, WorkflowContext,
};
use drover_domain::{
    AgentType, AttemptId, CorrelationId, Event, EventKind, EventSeq, FencingToken, PipelineName,
    ProjectId, RunId, RunStatus, StageName, Timestamp, WorkerId,
};
use futures::StreamExt;
use futures::stream::BoxStream;

const AGENT: &str = "conformance";
const CLAIM_IDLE: Duration = Duration::from_secs(1);

async fn open(url: Option<String>) -> Option<(Arc<dyn Bus>, Cleanup)> {
    let url = url?;
    let namespace = drover_testkit::unique_name("conf");
    let options = BusOptions {
        capacity: 1000,
        batch_size: 4,
        block_time: Duration::from_millis(200),
        claim_idle: CLAIM_IDLE,
        namespace: namespace.clone(),
    };
    let bus = drover_bus::connect(&url, options).await.expect("bus connects");
    Some((bus, Cleanup { url, namespace }))
}

/// Removes what a test left on a shared broker.
struct Cleanup {
    url: String,
    namespace: String,
}

impl Cleanup {
    async fn run(self) {
        if self.url.starts_with("redis://") {
            let client = ::redis::Client::open(self.url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = ::redis::cmd("KEYS")
                .arg(format!("{}:*", self.namespace))
                .query_async(&mut conn)
                .await
                .unwrap();
            for key in keys {
                let _: () = ::redis::cmd("DEL").arg(key).query_async(&mut conn).await.unwrap();
            }
        } else if self.url.starts_with("nats://") {
            let client = async_nats::connect(self.url.as_str()).await.unwrap();
            let jetstream = async_nats::jetstream::new(client);
            for stream in ["DROVER_TASKS", "DROVER_RESULTS"] {
                let _ = jetstream.delete_stream(format!("{}_{stream}", self.namespace)).await;
            }
        }
    }
}

fn agent() -> AgentType {
    AgentType::parse(AGENT).unwrap()
}

fn envelope() -> TaskEnvelope {
    TaskEnvelope {
        task_id: AttemptId::new(),
        project_id: ProjectId::default_project(),
        run_id: RunId::new(),
        pipeline: PipelineName::parse("sdlc").unwrap(),
        stage: StageName::parse("scaffold").unwrap(),
        agent: agent(),
        attempt: 1,
        fencing_token: FencingToken::FIRST,
        payload: serde_json::json!({ "request": "Hello World API" }),
        context: WorkflowContext::default(),
        deadline: None,
        correlation_id: CorrelationId::new(),
        traceparent: None,
    }
}

async fn next(stream: &mut BoxStream<'static, Delivery>, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, stream.next()).await.ok().flatten()
}

async fn each_task_reaches_exactly_one_of_two_competing_consumers(bus: Arc<dyn Bus>) {
    let mut a = bus.consume_tasks(&agent(), "a").await.unwrap();
    let mut b = bus.consume_tasks(&agent(), "b").await.unwrap();
    let sent: Vec<TaskEnvelope> = (0..6).map(|_| envelope()).collect();
    for task in &sent {
        bus.publish_task(task).await.unwrap();
    }
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let delivery = tokio::select! {
            Some(delivery) = a.next() => delivery,
            Some(delivery) = b.next() => delivery,
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("only {} of 6 tasks arrived", received.len()),
        };
        received.push(delivery.envelope.clone());
        delivery.handle.ack().await;
    }
    let ids: HashSet<AttemptId> = received.iter().map(|t| t.task_id).collect();
    assert_eq!(ids, sent.iter().map(|t| t.task_id).collect::<HashSet<_>>());
    assert_eq!(received.len(), ids.len(), "a task was delivered twice");
    let original = sent.iter().find(|t| t.task_id == received[0].task_id).unwrap();
    assert_eq!(&received[0], original, "the envelope survives the trip intact");
    assert!(
        next(&mut a, Duration::from_millis(1500)).await.is_none(),
        "acknowledged tasks came back"
    );
}

async fn a_task_is_pending_until_acknowledged(bus: Arc<dyn Bus>) {
    let task = envelope();
    let id = bus.publish_task(&task).await.unwrap();
    assert!(bus.task_pending(&agent(), &id).await.unwrap(), "published");
    let mut consumer = bus.consume_tasks(&agent(), "a").await.unwrap();
    let delivery = next(&mut consumer, Duration::from_secs(10)).await.expect("delivered");
    assert!(bus.task_pending(&agent(), &id).await.unwrap(), "delivered but not acknowledged");
    delivery.handle.ack().await;
    assert!(!bus.task_pending(&agent(), &id).await.unwrap(), "acknowledged");
}

async fn a_nacked_task_is_delivered_again(bus: Arc<dyn Bus>) {
    let task = envelope();
    bus.publish_task(&task).await.unwrap();
    let mut consumer = bus.consume_tasks(&agent(), "a").await.unwrap();
    let first = next(&mut consumer, Duration::from_secs(10)).await.expect("delivered");
    first.handle.nak(Duration::from_millis(100)).await;
    let again = next(&mut consumer, Duration::from_secs(10)).await.expect("delivered again");
    assert_eq!(again.envelope.task_id, task.task_id);
    again.handle.ack().await;
}

async fn work_in_progress_is_not_handed_to_another_consumer(bus: Arc<dyn Bus>) {
    bus.publish_task(&envelope()).await.unwrap();
    let mut a = bus.consume_tasks(&agent(), "a").await.unwrap();
    let held = next(&mut a, Duration::from_secs(10)).await.expect("delivered");
    let mut b = bus.consume_tasks(&agent(), "b").await.unwrap();
    for _ in 0..8 {
        held.handle.in_progress().await;
        assert!(next(&mut b, CLAIM_IDLE / 3).await.is_none(), "a task in progress was handed over");
    }
    held.handle.ack().await;
}

async fn a_dead_consumers_unacknowledged_task_is_redelivered_by_a_durable_bus(bus: Arc<dyn Bus>) {
    let task = envelope();
    let id = bus.publish_task(&task).await.unwrap();
    {
        let mut doomed = bus.consume_tasks(&agent(), "doomed").await.unwrap();
        let delivery = next(&mut doomed, Duration::from_secs(10)).await.expect("delivered");
        assert_eq!(delivery.envelope.task_id, task.task_id);
        // The consumer dies holding it: no ack, no progress.
    }
    if !bus.is_durable() {
        // In-process: the consumer dies with the process and the engine republishes from
        // the store on restart. The bus must still report the task as held, not lost.
        assert!(bus.task_pending(&agent(), &id).await.unwrap());
        return;
    }
    let mut survivor = bus.consume_tasks(&agent(), "survivor").await.unwrap();
    let delivery = next(&mut survivor, CLAIM_IDLE * 10).await.expect("redelivered to the survivor");
    assert_eq!(delivery.envelope.task_id, task.task_id);
    delivery.handle.ack().await;
}

async fn results_reach_the_engine_and_are_not_redelivered_once_acknowledged(bus: Arc<dyn Bus>) {
    let message = WorkerMessage::Finished {
        attempt_id: AttemptId::new(),
        token: FencingToken(3),
        worker_id: WorkerId::new("w"),
        result: AgentResult::Succeeded { output: serde_json::json!({ "url": "http://x" }) },
    };
    let alive = WorkerMessage::Alive {
        worker_id: WorkerId::new("w"),
        profile: WorkerProfile {
            agents: vec![agent()],
            version: "1".into(),
            hostname: "h".into(),
            concurrency: 2,
            kind: "external".into(),
        },
    };
    let mut results = bus.consume_results("server-1").await.unwrap();
    bus.publish_result(&message).await.unwrap();
    bus.publish_result(&alive).await.unwrap();
    for expected in [message, alive] {
        let delivery =
            tokio::time::timeout(Duration::from_secs(10), results.next()).await.unwrap().unwrap();
        assert_eq!(delivery.message, expected);
        delivery.handle.ack().await;
    }
    drop(results);
    let mut again = bus.consume_results("server-1").await.unwrap();
    let redelivered = tokio::time::timeout(Duration::from_millis(1500), again.next()).await;
    assert!(redelivered.is_err(), "an acknowledged result came back");
}

/// Publishes until every subscriber got the message: pub/sub subscriptions settle
/// asynchronously, and a message sent before that is not for them.
async fn broadcast_reaches_all<T: Clone + PartialEq + std::fmt::Debug>(
    subscribers: Vec<BoxStream<'static, T>>,
    expected: T,
    publish: impl Fn() -> futures::future::BoxFuture<'static, ()>,
) {
    let mut pending: Vec<BoxStream<'static, T>> = subscribers;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "a subscriber never got the message");
        publish().await;
        let mut still = Vec::new();
        for mut subscriber in pending {
            match tokio::time::timeout(Duration::from_millis(200), subscriber.next()).await {
                Ok(Some(got)) => assert_eq!(got, expected),
                _ => still.push(subscriber),
            }
        }
        pending = still;
    }
}

async fn control_messages_reach_every_subscriber(bus: Arc<dyn Bus>) {
    let cancel = Control::Cancel { attempt_id: AttemptId::new(), reason: "user".into() };
    let subscribers =
        vec![bus.subscribe_control().await.unwrap(), bus.subscribe_control().await.unwrap()];
    let publisher = bus.clone();
    let message = cancel.clone();
    broadcast_reaches_all(subscribers, cancel, move || {
        let bus = publisher.clone();
        let message = message.clone();
        Box::pin(async move { bus.publish_control(&message).await.unwrap() })
    })
    .await;
}

async fn live_messages_reach_every_subscriber(bus: Arc<dyn Bus>) {
    let event = Event {
        seq: EventSeq(42),
        project_id: ProjectId::default_project(),
        run_id: Some(RunId::new()),
        attempt_id: None,
        environment_id: None,
        kind: EventKind::Run(RunStatus::Succeeded),
        payload: serde_json::json!({}),
        correlation_id: None,
        created_at: Timestamp::from_millis(1),
    };
    let subscribers = vec![bus.subscribe_live().await.unwrap()];
    let publisher = bus.clone();
    let message = LiveMessage::Event { origin: "server-a".to_owned(), event };
    let sent = message.clone();
    broadcast_reaches_all(subscribers, message, move || {
        let bus = publisher.clone();
        let message = sent.clone();
        Box::pin(async move { bus.publish_live(&message).await.unwrap() })
    })
    .await;
}

async fn queue_depth_counts_the_tasks_waiting_for_a_worker(bus: Arc<dyn Bus>) {
    for _ in 0..3 {
        bus.publish_task(&envelope()).await.unwrap();
    }
    assert_eq!(bus.queue_depth(&agent()).await, Some(3));
    let mut consumer = bus.consume_tasks(&agent(), "a").await.unwrap();
    for _ in 0..3 {
        next(&mut consumer, Duration::from_secs(10)).await.expect("delivered").handle.ack().await;
    }
    assert_eq!(bus.queue_depth(&agent()).await, Some(0));
}

macro_rules! conformance {
    ($backend:ident, $url:expr) => {
        mod $backend {
            use super::*;

            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test]
                    async fn $case() {
                        if let Some((bus, cleanup)) = open($url).await {
                            super::$case(bus).await;
                            cleanup.run().await;
                        }
                    }
                };
            }

            case!(each_task_reaches_exactly_one_of_two_competing_consumers);
            case!(a_task_is_pending_until_acknowledged);
            case!(a_nacked_task_is_delivered_again);
            case!(work_in_progress_is_not_handed_to_another_consumer);
            case!(a_dead_consumers_unacknowledged_task_is_redelivered_by_a_durable_bus);
            case!(results_reach_the_engine_and_are_not_redelivered_once_acknowledged);
            case!(control_messages_reach_every_subscriber);
            case!(live_messages_reach_every_subscriber);
            case!(queue_depth_counts_the_tasks_waiting_for_a_worker);
        }
    };
}

conformance!(embedded, Some("embedded".to_owned()));
conformance!(redis, drover_testkit::redis_url());
conformance!(nats, drover_testkit::nats_url());
