//! The webhook side of the store, against a fresh SQLite file and a fresh PostgreSQL
//! database per test: endpoints scoped to their project and audited, deliveries due,
//! retried and given up, the breaker and the automatic disabling with its event in the same
//! transaction, redelivery, and the log trimmed to its bound.

#[macro_use]
mod common;

use std::time::Duration;

use drover_domain::{DeliveryStatus, EventKind, ProjectId, Timestamp, WebhookId};
use drover_store::{
    AttemptRecorded, AttemptResult, DeliveryQuery, EventQuery, FailurePolicy, IdentityStore,
    MAX_DELIVERIES_PER_WEBHOOK, NewDelivery, NewWebhook, SealedValue, Store, StoreError,
    WebhookStore,
};

use crate::common::TestDb;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

const POLICY: FailurePolicy =
    FailurePolicy { breaker_after: 2, breaker_open_for: Duration::from_secs(60), disable_after: 3 };

/// What the vault would have sealed; the store keeps it as given.
fn sealed_secret() -> SealedValue {
    SealedValue { key_id: "k1".to_owned(), nonce: vec![7; 24], ciphertext: vec![9; 48] }
}

fn new_webhook(project: &ProjectId) -> NewWebhook {
    NewWebhook {
        id: WebhookId::new(),
        project_id: project.clone(),
        url: "http://127.0.0.1:9/hook?token=t".to_owned(),
        origin: "http://127.0.0.1:9".to_owned(),
        kinds: vec!["run.succeeded".to_owned()],
        description: Some("ci".to_owned()),
        secret: sealed_secret(),
    }
}

fn delivery(webhook: WebhookId, project: &ProjectId) -> NewDelivery {
    NewDelivery {
        webhook_id: webhook,
        project_id: project.clone(),
        event_seq: None,
        kind: "webhook.test".to_owned(),
        body: "{}".to_owned(),
    }
}

fn failed(delivery: drover_domain::DeliveryId, retry_at: Option<Timestamp>) -> AttemptResult {
    AttemptResult {
        delivery,
        succeeded: false,
        status_code: Some(500),
        error: None,
        latency_ms: 3,
        retry_at,
    }
}

async fn endpoints_belong_to_their_project_and_changes_are_audited(db: TestDb) {
    let store = db.store.clone();
    let default = ProjectId::default_project();
    let other = ProjectId::parse("other").unwrap();
    store.create_project(&other, "Other", "root", T0).await.unwrap();
    let ghost = ProjectId::parse("ghost").unwrap();
    assert!(matches!(
        store.create_webhook(new_webhook(&ghost), "root", T0).await,
        Err(StoreError::ProjectNotFound(_))
    ));
    let webhook = store.create_webhook(new_webhook(&default), "alice", T0).await.unwrap();
    assert!(webhook.enabled);
    assert_eq!(store.list_webhooks(&default).await.unwrap(), std::slice::from_ref(&webhook));
    assert!(store.list_webhooks(&other).await.unwrap().is_empty());
    assert!(store.get_webhook(&other, webhook.id).await.unwrap().is_none());
    assert!(!store.delete_webhook(&other, webhook.id, "mallory", T0).await.unwrap());
    assert!(matches!(
        store.enable_webhook(&other, webhook.id, "mallory", T0).await,
        Err(StoreError::WebhookNotFound(_))
    ));
    assert!(matches!(
        store.enqueue_delivery(&other, delivery(webhook.id, &other), T0).await,
        Err(StoreError::WebhookNotFound(_))
    ));
    assert!(store.delete_webhook(&default, webhook.id, "alice", T0).await.unwrap());
    let audit = store.list_audit_entries(Some(default.as_str()), None, 10).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(actions, ["webhook.delete", "webhook.create"]);
    assert!(audit.iter().all(|a| !format!("{a:?}").contains("token=t")), "the URL's origin only");
}

async fn failures_retry_then_open_the_breaker_then_disable_with_an_event(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let webhook = store.create_webhook(new_webhook(&project), "alice", T0).await.unwrap();
    let first = store.enqueue_delivery(&project, delivery(webhook.id, &project), T0).await.unwrap();
    let second =
        store.enqueue_delivery(&project, delivery(webhook.id, &project), T0).await.unwrap();
    let due = store.due_deliveries(T0, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].url, webhook.url);
    assert_eq!(due[0].secret, Some(sealed_secret()), "the sealed secret, as stored");
    assert!(!format!("{:?}", due[0]).contains("[9, 9"), "Debug shows no ciphertext");

    let t1 = T0.plus(Duration::from_secs(1));
    let retry_at = t1.plus(Duration::from_secs(5));
    let recorded = store.record_attempt(&failed(first.id, Some(retry_at)), &POLICY, t1).await;
    assert_eq!(
        recorded.unwrap(),
        AttemptRecorded::Applied { status: DeliveryStatus::Failed, disabled: false }
    );
    let shown = store.get_delivery(&project, webhook.id, first.id).await.unwrap().unwrap();
    assert_eq!((shown.attempts, shown.last_status_code, shown.latency_ms), (1, Some(500), Some(3)));
    assert_eq!(shown.next_attempt_at, Some(retry_at));
    assert_eq!(store.due_deliveries(t1, 10).await.unwrap().len(), 1, "the retry waits");

    // The second failure in a row opens the breaker: nothing is due while it is open.
    store.record_attempt(&failed(second.id, Some(retry_at)), &POLICY, t1).await.unwrap();
    let later = retry_at.plus(Duration::from_secs(1));
    assert!(store.due_deliveries(later, 10).await.unwrap().is_empty(), "breaker open");
    let reopened = t1.plus(Duration::from_secs(61));
    let due = store.due_deliveries(reopened, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].consecutive_failures, 2);

    // The third disables the endpoint, gives up its deliveries and appends the event.
    let mut events = store.subscribe();
    let recorded = store
        .record_attempt(
            &failed(first.id, Some(reopened.plus(POLICY.breaker_open_for))),
            &POLICY,
            reopened,
        )
        .await
        .unwrap();
    assert_eq!(recorded, AttemptRecorded::Applied { status: DeliveryStatus::Dead, disabled: true });
    let shown = store.get_webhook(&project, webhook.id).await.unwrap().unwrap();
    assert!(!shown.enabled);
    assert!(shown.disabled_reason.unwrap().contains("3 failed attempts in a row (last: HTTP 500)"));
    let log = store
        .list_deliveries(&project, webhook.id, &DeliveryQuery { before: None, limit: 10 })
        .await
        .unwrap();
    assert!(log.iter().all(|d| d.status == DeliveryStatus::Dead), "{log:?}");
    let event = events.try_recv().unwrap();
    assert_eq!(event.kind, EventKind::WebhookDisabled);
    assert_eq!(event.payload["webhook_id"], webhook.id.to_string());
    let stored = store
        .list_events(&project, &EventQuery { after: None, limit: 100, ..EventQuery::default() })
        .await
        .unwrap();
    assert_eq!(stored.last().map(|e| e.kind), Some(EventKind::WebhookDisabled));
    assert_eq!(store.newest_event_seq().await.unwrap(), event.seq);
    assert!(
        store
            .due_deliveries(reopened.plus(Duration::from_secs(3600)), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A result for a delivery given up meanwhile changes nothing; nor can a disabled
    // endpoint be sent to; enabling resets it.
    let late = store.record_attempt(&failed(second.id, None), &POLICY, reopened).await.unwrap();
    assert_eq!(late, AttemptRecorded::Stale);
    assert!(matches!(
        store.redeliver(&project, webhook.id, first.id, reopened).await,
        Err(StoreError::WebhookDisabled(_))
    ));
    let enabled = store.enable_webhook(&project, webhook.id, "alice", reopened).await.unwrap();
    assert!(enabled.enabled && enabled.disabled_reason.is_none());
    assert_eq!((enabled.consecutive_failures, enabled.breaker_open_until), (0, None));
    let again = store.redeliver(&project, webhook.id, first.id, reopened).await.unwrap();
    assert_eq!((again.status, again.attempts), (DeliveryStatus::Pending, 2));
    assert_eq!(again.window_start, reopened);
    let ok = AttemptResult {
        succeeded: true,
        status_code: Some(204),
        retry_at: None,
        ..failed(first.id, None)
    };
    let recorded = store.record_attempt(&ok, &POLICY, reopened).await.unwrap();
    assert_eq!(
        recorded,
        AttemptRecorded::Applied { status: DeliveryStatus::Succeeded, disabled: false }
    );
    let shown = store.get_delivery(&project, webhook.id, first.id).await.unwrap().unwrap();
    assert_eq!((shown.attempts, shown.next_attempt_at), (3, None));
}

async fn an_endpoint_keeps_its_newest_deliveries_only_and_deleting_it_deletes_them(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let webhook = store.create_webhook(new_webhook(&project), "alice", T0).await.unwrap();
    let extra = 5;
    let batch: Vec<NewDelivery> =
        (0..MAX_DELIVERIES_PER_WEBHOOK + extra).map(|_| delivery(webhook.id, &project)).collect();
    store.enqueue_deliveries(batch, T0).await.unwrap();
    let all = store
        .list_deliveries(&project, webhook.id, &DeliveryQuery { before: None, limit: 5000 })
        .await
        .unwrap();
    assert_eq!(all.len(), MAX_DELIVERIES_PER_WEBHOOK as usize);
    let page = store
        .list_deliveries(&project, webhook.id, &DeliveryQuery { before: Some(all[9].id), limit: 3 })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|d| d.id).collect::<Vec<_>>(), [all[10].id, all[11].id, all[12].id]);
    assert!(store.delete_webhook(&project, webhook.id, "alice", T0).await.unwrap());
    assert!(store.due_deliveries(T0, 10).await.unwrap().is_empty());
    let gone = store.record_attempt(&failed(all[0].id, None), &POLICY, T0).await.unwrap();
    assert_eq!(gone, AttemptRecorded::Stale);
}

async fn an_event_fanned_out_by_two_servers_is_delivered_once(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let webhook = store.create_webhook(new_webhook(&project), "alice", T0).await.unwrap();
    let for_event = |seq: i64| NewDelivery {
        event_seq: Some(drover_domain::EventSeq(seq)),
        kind: "run.succeeded".to_owned(),
        ..delivery(webhook.id, &project)
    };
    // Two servers see events 7 and 8; the second's fan-out overlaps the first's.
    store.enqueue_deliveries(vec![for_event(7)], T0).await.unwrap();
    store.enqueue_deliveries(vec![for_event(7), for_event(8)], T0).await.unwrap();
    // Test deliveries carry no event: each is its own.
    store.enqueue_deliveries(vec![delivery(webhook.id, &project); 2], T0).await.unwrap();
    let all = store
        .list_deliveries(&project, webhook.id, &DeliveryQuery { before: None, limit: 100 })
        .await
        .unwrap();
    let mut seqs: Vec<Option<i64>> = all.iter().map(|d| d.event_seq.map(|s| s.0)).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [None, None, Some(7), Some(8)]);
}

backend_tests!(
    an_event_fanned_out_by_two_servers_is_delivered_once,
    endpoints_belong_to_their_project_and_changes_are_audited,
    failures_retry_then_open_the_breaker_then_disable_with_an_event,
    an_endpoint_keeps_its_newest_deliveries_only_and_deleting_it_deletes_them,
);
