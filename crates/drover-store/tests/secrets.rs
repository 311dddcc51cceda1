//! The secrets side of the store, against a fresh SQLite file and a fresh PostgreSQL
//! database per test: sealed values by project and name, changes audited with them, and
//! re-sealing all or nothing.

#[macro_use]
mod common;

use drover_domain::{ProjectId, SecretName, Timestamp};
use drover_store::{EnvironmentStore, SealedSecret, SecretRead, SecretStore};

use crate::common::TestDb;

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

async fn resealing_is_all_or_nothing(db: TestDb) {
    let store = db.store.clone();
    for name in ["A_TOKEN", "B_TOKEN", "C_TOKEN"] {
        store.put_secret(sealed(name, "old"), "alice", T0).await.unwrap();
    }
    let project = ProjectId::default_project();
    let failing = |secret: &SealedSecret| -> Result<SealedSecret, String> {
        if secret.name.as_str() == "B_TOKEN" {
            return Err("does not open".into());
        }
        Ok(SealedSecret { key_id: "new".into(), ..secret.clone() })
    };
    let err = store.reseal_secrets(&failing, "cli", T0).await.unwrap_err();
    assert!(err.to_string().contains("B_TOKEN") && err.to_string().contains("does not open"));
    let keys: Vec<String> =
        store.list_secrets(&project).await.unwrap().into_iter().map(|m| m.key_id).collect();
    assert_eq!(keys, ["old", "old", "old"], "a failed rotation changed something");

    let renaming = |secret: &SealedSecret| -> Result<SealedSecret, String> {
        Ok(SealedSecret { name: SecretName::parse("ELSEWHERE").unwrap(), ..secret.clone() })
    };
    assert!(store.reseal_secrets(&renaming, "cli", T0).await.is_err());

    let working = |secret: &SealedSecret| -> Result<SealedSecret, String> {
        Ok(SealedSecret { key_id: "new".into(), ..secret.clone() })
    };
    assert_eq!(store.reseal_secrets(&working, "cli", T0).await.unwrap(), 3);
    let keys: Vec<String> =
        store.list_secrets(&project).await.unwrap().into_iter().map(|m| m.key_id).collect();
    assert_eq!(keys, ["new", "new", "new"]);
    let audit = store.list_audit(&project, 1).await.unwrap();
    assert_eq!(audit[0].action, "secret.rotate");
    assert_eq!(audit[0].reason.as_deref(), Some("key old -> new"));
}

backend_tests!(
    a_put_creates_then_replaces_and_keeps_its_creation_time,
    reads_are_audited_in_one_batch,
    resealing_is_all_or_nothing,
);
