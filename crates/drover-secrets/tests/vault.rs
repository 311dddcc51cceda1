//! The vault over a real SQLite store: values are stored sealed, listed without values,
//! validated, audited when read, and re-sealed by key rotation (also one that was
//! interrupted, and with keys from the environment) together with webhook endpoints'
//! signing secrets, which open for their endpoint only.

use std::sync::Arc;
use std::time::Duration;

use drover_domain::WebhookId;
use drover_domain::{ProjectId, SecretName};
use drover_secrets::{
    KeyError, KeyOrigin, KeySource, MasterKey, Reveal, Vault, VaultError, rotate,
};
use drover_store::{
    EnvironmentStore, NewDelivery, NewWebhook, SealedValue, SecretStore, SqliteStore,
    SqliteStoreOptions, WebhookStore,
};

const VALUE: &str = "tok-0123456789abcdef";

async fn store(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&SqliteStoreOptions {
        url: format!("sqlite://{}", dir.path().join("drover.db").display()),
        read_connections: 2,
        busy_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap()
}

fn source(dir: &tempfile::TempDir) -> KeySource {
    KeySource::file(dir.path().join("secrets/master.key"))
}

fn vault(store: &SqliteStore, source: &KeySource) -> Vault {
    Vault::new(Arc::new(store.clone()), source.load_or_create().unwrap())
}

fn project() -> ProjectId {
    ProjectId::default_project()
}

/// The project's secrets opened (as a worker running an attempt gets them).
async fn opened(vault: &Vault) -> Vec<(String, String)> {
    let reveal = Reveal { project: project(), purpose: "test".to_owned() };
    let mut values = vault.reveal_as("worker w1", &[reveal]).await.unwrap();
    let values = values.remove(&project()).unwrap_or_default();
    values.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

#[tokio::test]
async fn a_secret_is_stored_sealed_listed_without_its_value_and_read_with_an_audit_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let vault = vault(&store, &source(&dir));

    let (meta, created) = vault.set(&project(), "MY_TOKEN", VALUE, "alice").await.unwrap();
    assert!(created);
    assert_eq!(meta.name.as_str(), "MY_TOKEN");
    assert_eq!(&meta.key_id, vault.key_id().as_str());
    let (_, created) =
        vault.set(&project(), "MY_TOKEN", "tok-replaced-value", "alice").await.unwrap();
    assert!(!created, "a second set replaces");

    let db = std::fs::read(dir.path().join("drover.db")).unwrap();
    let wal = std::fs::read(dir.path().join("drover.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(12).any(|w| w == b"tok-replaced"), "a value is stored in clear");
    }

    let listed = vault.list(&project()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(opened(&vault).await, [("MY_TOKEN".to_owned(), "tok-replaced-value".to_owned())]);
    // Another project sees nothing.
    let other = Reveal { project: ProjectId::parse("other").unwrap(), purpose: "x".to_owned() };
    assert!(vault.reveal_as("worker w1", &[other]).await.unwrap().is_empty());
    let names = vault.names(&[project(), ProjectId::parse("other").unwrap()]).await.unwrap();
    assert_eq!(names.len(), 1, "a project without secrets has no names");
    assert_eq!(names[&project()], ["MY_TOKEN"]);

    let audit = store.list_audit(&project(), 10).await.unwrap();
    let actions: Vec<(&str, &str, &str)> =
        audit.iter().map(|a| (a.actor.as_str(), a.action.as_str(), a.target.as_str())).collect();
    assert_eq!(
        actions,
        [
            ("worker w1", "secret.read", "MY_TOKEN"),
            ("alice", "secret.set", "MY_TOKEN"),
            ("alice", "secret.set", "MY_TOKEN"),
        ]
    );
    assert!(!format!("{audit:?}").contains("tok-"), "the audit log holds a value");

    // A read on behalf of someone else (an environment's service) is audited as theirs.
    let reveal = Reveal { project: project(), purpose: "service web".to_owned() };
    let values = vault.reveal_as("environment dev", &[reveal]).await.unwrap();
    assert_eq!(values[&project()].get("MY_TOKEN"), Some("tok-replaced-value"));
    let audit = store.list_audit(&project(), 1).await.unwrap();
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].action.as_str(), audit[0].reason.as_deref()),
        ("environment dev", "secret.read", Some("service web"))
    );

    vault.delete(&project(), "MY_TOKEN", "bob").await.unwrap();
    assert!(vault.list(&project()).await.unwrap().is_empty());
    assert!(matches!(
        vault.delete(&project(), "MY_TOKEN", "bob").await,
        Err(VaultError::NotFound(name)) if name == "MY_TOKEN"
    ));
    let audit = store.list_audit(&project(), 1).await.unwrap();
    assert_eq!((audit[0].actor.as_str(), audit[0].action.as_str()), ("bob", "secret.delete"));
}

#[tokio::test]
async fn bad_names_and_values_are_refused_with_field_errors_that_never_quote_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let vault = vault(&store, &source(&dir));
    let Err(VaultError::Invalid(errors)) = vault.set(&project(), "my-token", "tiny", "a").await
    else {
        panic!("accepted")
    };
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["name", "value"]);
    assert!(!format!("{errors:?}").contains("tiny"));
    let too_big = "x".repeat(64 * 1024 + 1);
    assert!(matches!(
        vault.set(&project(), "BIG", &too_big, "a").await,
        Err(VaultError::Invalid(errors)) if errors[0].field == "value"
    ));
    assert!(vault.list(&project()).await.unwrap().is_empty());
}

#[tokio::test]
async fn rotation_reseals_every_secret_under_a_new_key_and_the_old_key_no_longer_opens_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let source = source(&dir);
    let before = vault(&store, &source);
    let elsewhere = ProjectId::parse("elsewhere").unwrap();
    sqlx_insert_project(&dir, &elsewhere).await;
    before.set(&project(), "MY_TOKEN", VALUE, "a").await.unwrap();
    before.set(&elsewhere, "OTHER_TOKEN", "other-0123456789", "a").await.unwrap();
    let webhook = create_webhook(&store, &before, SIGNING).await;
    let old_key = MasterKey::parse(&std::fs::read_to_string(source.key_file()).unwrap()).unwrap();

    let rotation = rotate(Arc::new(store.clone()), &source, "cli").await.unwrap();
    assert_eq!((rotation.resealed, rotation.resealed_webhook_secrets), (2, 1));
    let audit = store.list_audit(&project(), 2).await.unwrap();
    let actions: Vec<(&str, &str)> =
        audit.iter().map(|a| (a.actor.as_str(), a.action.as_str())).collect();
    assert_eq!(actions, [("cli", "webhook.rotate"), ("cli", "secret.rotate")]);
    assert_eq!(rotation.old_keys, [old_key.id().clone()]);
    assert_ne!(&rotation.new_key, old_key.id());
    assert_eq!(rotation.origin, KeyOrigin::File(source.key_file().to_path_buf()));
    assert!(!source.old_key_file().exists(), "the old key file is removed when done");
    let mode = std::fs::metadata(source.key_file()).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);

    let sealed = store.sealed_secrets(&[project(), elsewhere.clone()]).await.unwrap();
    assert!(sealed.iter().all(|s| s.key_id == rotation.new_key.as_str()), "{sealed:?}");
    let after = vault(&store, &source);
    assert_eq!(after.key_id(), &rotation.new_key);
    assert_eq!(opened(&after).await, [("MY_TOKEN".to_owned(), VALUE.to_owned())]);
    let signing = webhook_secret(&store).await;
    assert_eq!(signing.key_id, rotation.new_key.as_str());
    assert_eq!(after.open_webhook_secret(&project(), webhook, &signing).unwrap().as_str(), SIGNING);
    // The old key alone opens nothing any more.
    let old_only = Vault::new(Arc::new(store.clone()), drover_secrets::Keyring::new(old_key));
    assert!(opened(&old_only).await.is_empty());
    assert!(old_only.open_webhook_secret(&project(), webhook, &signing).is_err());
}

const SIGNING: &str = "whsec_c2lnbmluZy1zZWNyZXQtMDEyMzQ1Njc4OWFiY2RlZg==";

/// Makes an endpoint whose signing secret `vault` sealed, as the API does.
async fn create_webhook(store: &SqliteStore, vault: &Vault, secret: &str) -> WebhookId {
    let id = WebhookId::new();
    let new = NewWebhook {
        id,
        project_id: project(),
        url: "https://example.com/hook".to_owned(),
        origin: "https://example.com".to_owned(),
        kinds: Vec::new(),
        description: None,
        secret: vault.seal_webhook_secret(&project(), id, secret).unwrap(),
    };
    store.create_webhook(new, "alice", drover_domain::Timestamp::from_millis(1)).await.unwrap();
    id
}

/// The only endpoint's sealed signing secret, as the delivery loop reads it.
async fn webhook_secret(store: &SqliteStore) -> SealedValue {
    let now = drover_domain::Timestamp::from_millis(2);
    let webhook = store.list_webhooks(&project()).await.unwrap().remove(0);
    if store.due_deliveries(now, 10).await.unwrap().is_empty() {
        let test = NewDelivery {
            webhook_id: webhook.id,
            project_id: project(),
            event_seq: None,
            kind: "webhook.test".to_owned(),
            body: "{}".to_owned(),
        };
        store.enqueue_delivery(&project(), test, now).await.unwrap();
    }
    store.due_deliveries(now, 10).await.unwrap().remove(0).secret.expect("sealed")
}

#[tokio::test]
async fn a_signing_secret_is_stored_sealed_and_opens_for_its_endpoint_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let vault = vault(&store, &source(&dir));
    let webhook = create_webhook(&store, &vault, SIGNING).await;
    let sealed = webhook_secret(&store).await;
    assert_eq!(sealed.key_id, vault.key_id().as_str());
    assert_eq!(vault.open_webhook_secret(&project(), webhook, &sealed).unwrap().as_str(), SIGNING);
    assert!(vault.open_webhook_secret(&project(), WebhookId::new(), &sealed).is_err());
    let elsewhere = ProjectId::parse("elsewhere").unwrap();
    assert!(vault.open_webhook_secret(&elsewhere, webhook, &sealed).is_err());
    for file in ["drover.db", "drover.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        assert!(!bytes.windows(12).any(|w| w == &SIGNING.as_bytes()[..12]), "{file} holds it");
    }
}

#[tokio::test]
async fn a_rotation_interrupted_after_writing_the_new_key_is_finished_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let source = source(&dir);
    vault(&store, &source).set(&project(), "MY_TOKEN", VALUE, "a").await.unwrap();
    // The state a crash between writing the new key and re-sealing leaves: the new key in
    // master.key, the old one in master.key.old, the database still under the old one.
    let old = std::fs::read_to_string(source.key_file()).unwrap();
    std::fs::write(source.old_key_file(), &old).unwrap();
    std::fs::set_permissions(
        source.old_key_file(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(source.key_file(), MasterKey::generate().encode().as_bytes()).unwrap();

    // A server started meanwhile still opens everything.
    assert_eq!(opened(&vault(&store, &source)).await.len(), 1);
    let rotation = rotate(Arc::new(store.clone()), &source, "cli").await.unwrap();
    assert_eq!(rotation.finished_interrupted, Some(1));
    assert_eq!(rotation.resealed, 1);
    assert!(!source.old_key_file().exists());
    let only_new = Vault::new(
        Arc::new(store.clone()),
        drover_secrets::Keyring::new(
            MasterKey::parse(&std::fs::read_to_string(source.key_file()).unwrap()).unwrap(),
        ),
    );
    assert_eq!(opened(&only_new).await, [("MY_TOKEN".to_owned(), VALUE.to_owned())]);
}

#[tokio::test]
async fn with_keys_from_the_environment_rotation_reseals_under_the_new_variable() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (old, new) = (MasterKey::generate(), MasterKey::generate());
    let env = |key: &MasterKey, old: Option<&MasterKey>| {
        KeySource::file(dir.path().join("master.key"))
            .with_env_keys(Some(key.encode().to_string()), old.map(|k| k.encode().to_string()))
    };
    vault(&store, &env(&old, None)).set(&project(), "MY_TOKEN", VALUE, "a").await.unwrap();
    assert!(matches!(
        rotate(Arc::new(store.clone()), &env(&old, None), "cli").await,
        Err(VaultError::Key(KeyError::EnvKeyUnchanged))
    ));
    let rotation = rotate(Arc::new(store.clone()), &env(&new, Some(&old)), "cli").await.unwrap();
    assert_eq!((rotation.origin, rotation.resealed), (KeyOrigin::Env, 1));
    assert_eq!(opened(&vault(&store, &env(&new, None))).await.len(), 1);
    assert!(!dir.path().join("master.key").exists(), "no key file with keys from the environment");
    let sealed = store.sealed_secrets(&[project()]).await.unwrap();
    assert_eq!(sealed[0].key_id, new.id().as_str());
    assert_eq!(sealed[0].name, SecretName::parse("MY_TOKEN").unwrap());
}

/// A second project, for secrets that must stay apart (projects are made elsewhere; a row
/// is all secrets need).
async fn sqlx_insert_project(dir: &tempfile::TempDir, project: &ProjectId) {
    use sqlx::Connection;
    let url = format!("sqlite://{}", dir.path().join("drover.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("INSERT INTO projects (id, name, created_at) VALUES (?, ?, 0)")
        .bind(project.as_str())
        .bind(project.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
}
