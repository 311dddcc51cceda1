//! The secrets side of the store, against a fresh SQLite file and a fresh PostgreSQL
//! database per test: sealed values by project and name, changes audited with them,
//! re-sealing (secrets and webhook signing secrets together) all or nothing, and the
//! upgrade of a database whose webhook signing secrets an older drover kept in plaintext.

#[macro_use]
mod common;

use drover_domain::{ProjectId, SecretName, Timestamp, WebhookId};
use drover_store::{
    EnvironmentStore, NewWebhook, Resealed, SealedSecret, SealedValue, SealedWebhookSecret,
    SecretRead, SecretStore, WebhookStore,
};

use crate::common::{Backend, TestDb};

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn sealed(name: &str, key_id: &str) -> SealedSecret {
    SealedSecret {
        project_id: ProjectId::default_project(),
        name: SecretName::parse(name).unwrap(),
        key_id: key_id.to_owned(),
        nonce: vec![1; 24],
        ciphertext: vec![2; 40],
    }
}

async fn a_put_creates_then_replaces_and_keeps_its_creation_time(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let (meta, created) = store.put_secret(sealed("B_TOKEN", "k1"), "alice", T0).await.unwrap();
    assert!(created);
    assert_eq!((meta.created_at, meta.updated_at), (T0, T0));
    store.put_secret(sealed("A_TOKEN", "k1"), "alice", T0).await.unwrap();
    let later = Timestamp::from_millis(T0.as_millis() + 5);
    let (meta, created) = store.put_secret(sealed("B_TOKEN", "k2"), "bob", later).await.unwrap();
    assert!(!created);
    assert_eq!((meta.created_at, meta.updated_at, meta.key_id.as_str()), (T0, later, "k2"));

    let names: Vec<String> =
        store.list_secrets(&project).await.unwrap().iter().map(|m| m.name.to_string()).collect();
    assert_eq!(names, ["A_TOKEN", "B_TOKEN"]);
    let other = ProjectId::parse("other").unwrap();
    assert!(store.list_secrets(&other).await.unwrap().is_empty());
    assert_eq!(store.sealed_secrets(&[project.clone(), other]).await.unwrap().len(), 2);
    assert!(store.sealed_secrets(&[]).await.unwrap().is_empty());

    let name = SecretName::parse("A_TOKEN").unwrap();
    assert!(store.delete_secret(&project, &name, "carol", later).await.unwrap());
    assert!(!store.delete_secret(&project, &name, "carol", later).await.unwrap());
    let audit = store.list_audit(&project, 10).await.unwrap();
    let actions: Vec<(&str, &str, &str)> =
        audit.iter().map(|a| (a.actor.as_str(), a.action.as_str(), a.target.as_str())).collect();
    assert_eq!(
        actions,
        [
            ("carol", "secret.delete", "A_TOKEN"),
            ("bob", "secret.set", "B_TOKEN"),
            ("alice", "secret.set", "A_TOKEN"),
            ("alice", "secret.set", "B_TOKEN"),
        ]
    );
}

async fn reads_are_audited_in_one_batch(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let reads: Vec<SecretRead> = (0..1500)
        .map(|n| SecretRead {
            project_id: project.clone(),
            name: SecretName::parse("MY_TOKEN").unwrap(),
            actor: "engine".into(),
            purpose: format!("attempt {n}"),
        })
        .collect();
    store.record_secret_reads(&reads, T0).await.unwrap();
    let audit = store.list_audit(&project, 2000).await.unwrap();
    assert_eq!(audit.len(), 1500);
    assert!(audit.iter().all(|a| a.action == "secret.read" && a.actor == "engine"));
    assert_eq!(audit[0].reason.as_deref(), Some("attempt 1499"));
}

fn sealed_value(key_id: &str) -> SealedValue {
    SealedValue { key_id: key_id.to_owned(), nonce: vec![3; 24], ciphertext: vec![4; 48] }
}

/// The key ids of every webhook's signing secret as the delivery loop gets them (one test
/// delivery each, queued the first time); empty for a secret not sealed.
async fn webhook_keys(store: &drover_store::AnyStore) -> Vec<String> {
    let mut due = Vec::new();
    let queued = !store.due_deliveries(T0, 100).await.unwrap().is_empty();
    for webhook in store.list_webhooks(&ProjectId::default_project()).await.unwrap() {
        if queued {
            break;
        }
        let delivery = drover_store::NewDelivery {
            webhook_id: webhook.id,
            project_id: webhook.project_id.clone(),
            event_seq: None,
            kind: "webhook.test".to_owned(),
            body: "{}".to_owned(),
        };
        store.enqueue_delivery(&webhook.project_id, delivery, T0).await.unwrap();
    }
    for delivery in store.due_deliveries(T0, 100).await.unwrap() {
        due.push(delivery.secret.map(|s| s.key_id).unwrap_or_default());
    }
    due
}

async fn resealing_is_all_or_nothing(db: TestDb) {
    let store = db.store.clone();
    for name in ["A_TOKEN", "B_TOKEN", "C_TOKEN"] {
        store.put_secret(sealed(name, "old"), "alice", T0).await.unwrap();
    }
    let project = ProjectId::default_project();
    let webhook = NewWebhook {
        id: WebhookId::new(),
        project_id: project.clone(),
        url: "https://example.com/hook".to_owned(),
        origin: "https://example.com".to_owned(),
        kinds: Vec::new(),
        description: None,
        secret: sealed_value("old"),
    };
    store.create_webhook(webhook, "alice", T0).await.unwrap();
    let webhook_resealed =
        |_: &SealedWebhookSecret| -> Result<SealedValue, String> { Ok(sealed_value("new")) };
    let failing = |secret: &SealedSecret| -> Result<SealedSecret, String> {
        if secret.name.as_str() == "B_TOKEN" {
            return Err("does not open".into());
        }
        Ok(SealedSecret { key_id: "new".into(), ..secret.clone() })
    };
    let err = store.reseal_secrets(&failing, &webhook_resealed, "cli", T0).await.unwrap_err();
    assert!(err.to_string().contains("B_TOKEN") && err.to_string().contains("does not open"));
    let keys: Vec<String> =
        store.list_secrets(&project).await.unwrap().into_iter().map(|m| m.key_id).collect();
    assert_eq!(keys, ["old", "old", "old"], "a failed rotation changed something");

    let renaming = |secret: &SealedSecret| -> Result<SealedSecret, String> {
        Ok(SealedSecret { name: SecretName::parse("ELSEWHERE").unwrap(), ..secret.clone() })
    };
    assert!(store.reseal_secrets(&renaming, &webhook_resealed, "cli", T0).await.is_err());

    // A signing secret that does not open undoes the secrets resealed before it.
    let working = |secret: &SealedSecret| -> Result<SealedSecret, String> {
        Ok(SealedSecret { key_id: "new".into(), ..secret.clone() })
    };
    let webhook_failing =
        |_: &SealedWebhookSecret| -> Result<SealedValue, String> { Err("tampered".into()) };
    let err = store.reseal_secrets(&working, &webhook_failing, "cli", T0).await.unwrap_err();
    assert!(err.to_string().contains("tampered"), "{err}");
    let keys: Vec<String> =
        store.list_secrets(&project).await.unwrap().into_iter().map(|m| m.key_id).collect();
    assert_eq!(keys, ["old", "old", "old"], "a failed rotation changed some secrets");

    let resealed = store.reseal_secrets(&working, &webhook_resealed, "cli", T0).await.unwrap();
    assert_eq!(resealed, Resealed { secrets: 3, webhook_secrets: 1 });
    let keys: Vec<String> =
        store.list_secrets(&project).await.unwrap().into_iter().map(|m| m.key_id).collect();
    assert_eq!(keys, ["new", "new", "new"]);
    assert_eq!(webhook_keys(&store).await, ["new"]);
    let audit = store.list_audit(&project, 2).await.unwrap();
    assert_eq!(audit[0].action, "webhook.rotate");
    assert_eq!(audit[1].action, "secret.rotate");
    assert_eq!(audit[1].reason.as_deref(), Some("key old -> new"));
}

const PLAINTEXT: &str = "whsec_cGxhaW50ZXh0LXNpZ25pbmctc2VjcmV0LTAxMjM0NQ==";

/// An endpoint as drover wrote it before its signing secrets were sealed.
fn legacy_webhook(id: WebhookId) -> String {
    format!(
        "INSERT INTO webhooks (id, project_id, url, kinds, description, secret, enabled, \
         disabled_reason, consecutive_failures, breaker_open_until, created_by, created_at, \
         updated_at) VALUES ('{id}', 'default', 'https://example.com/hook', '[]', NULL, \
         '{PLAINTEXT}', TRUE, NULL, 0, NULL, 'alice', 1, 1)"
    )
}

/// The migration that seals webhook signing secrets, per backend.
fn sealing_migration(backend: Backend) -> i64 {
    match backend {
        Backend::Sqlite => 16,
        Backend::Postgres => 5,
    }
}

async fn plaintext_signing_secrets_of_an_older_drover_are_sealed_and_removed(backend: Backend) {
    let id = WebhookId::new();
    let setup = legacy_webhook(id);
    let until = sealing_migration(backend);
    let Some(db) = TestDb::open_upgraded(backend, until, &[setup.as_str()]).await else { return };
    let store = db.store.clone();
    // Until it is sealed, the endpoint has no secret to sign with.
    assert_eq!(webhook_keys(&store).await, [""]);

    let seen = std::sync::Mutex::new(Vec::new());
    let seal = |project: &ProjectId, webhook: WebhookId, plaintext: &str| {
        seen.lock().unwrap().push((project.to_string(), webhook, plaintext.to_owned()));
        Ok(sealed_value("k1"))
    };
    assert_eq!(store.seal_plaintext_webhook_secrets(&seal).await.unwrap(), 1);
    assert_eq!(*seen.lock().unwrap(), [("default".to_owned(), id, PLAINTEXT.to_owned())]);
    assert_eq!(webhook_keys(&store).await, ["k1"]);
    assert_eq!(store.seal_plaintext_webhook_secrets(&seal).await.unwrap(), 0, "once only");

    let rows = db.query_strings("SELECT COALESCE(legacy_secret, '') FROM webhooks").await;
    assert_eq!(rows, [""], "the plaintext is gone from the row");
    if backend == Backend::Sqlite {
        db.store.close().await;
        let dir = std::path::Path::new(db.url().trim_start_matches("sqlite://")).parent().unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let found = bytes.windows(PLAINTEXT.len()).any(|w| w == PLAINTEXT.as_bytes());
            assert!(!found, "the plaintext is still in {}", path.display());
        }
    }
}

#[tokio::test]
async fn sqlite_plaintext_signing_secrets_of_an_older_drover_are_sealed_and_removed() {
    plaintext_signing_secrets_of_an_older_drover_are_sealed_and_removed(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_plaintext_signing_secrets_of_an_older_drover_are_sealed_and_removed() {
    plaintext_signing_secrets_of_an_older_drover_are_sealed_and_removed(Backend::Postgres).await;
}

backend_tests!(
    a_put_creates_then_replaces_and_keeps_its_creation_time,
    reads_are_audited_in_one_batch,
    resealing_is_all_or_nothing,
);
