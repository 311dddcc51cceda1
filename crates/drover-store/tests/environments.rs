//! The environment side of the store, against a fresh SQLite file and a fresh PostgreSQL
//! database per test.

#[macro_use]
mod common;

use std::time::Duration;

use drover_domain::{
    DesiredState, EnvName, EnvStatus, EventKind, PortBlock, ProjectId, ServiceName, ServiceRecord,
    ServiceStatus, Timestamp,
};
use drover_store::{
    EnvironmentQuery, EnvironmentStore, EventQuery, NewEnvironment, Store, StoreError,
};

use crate::common::TestDb;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn new_env(name: &str, base: u16, quota: u32) -> NewEnvironment {
    NewEnvironment {
        id: drover_domain::EnvironmentId::new(),
        project_id: ProjectId::default_project(),
        name: EnvName::parse(name).unwrap(),
        workspace: format!("/tmp/{name}"),
        ports: PortBlock { base, size: 10 },
        repo: None,
        branch: None,
        quota,
        actor: "local-admin".into(),
        reason: Some("test".into()),
    }
}

async fn environments_are_created_within_quota_with_unique_names(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let first = store.create_environment(new_env("one", 20000, 2), T0).await.unwrap();
    assert_eq!((first.status, first.desired), (EnvStatus::Creating, DesiredState::Running));
    let taken = store.create_environment(new_env("one", 20010, 2), T0).await;
    assert!(matches!(taken, Err(StoreError::EnvironmentNameTaken(_))), "{taken:?}");
    store.create_environment(new_env("two", 20010, 2), T0).await.unwrap();
    let over = store.create_environment(new_env("three", 20020, 2), T0).await;
    assert!(matches!(over, Err(StoreError::EnvironmentQuotaExceeded { limit: 2 })), "{over:?}");

    let blocks = store.used_port_blocks().await.unwrap();
    assert_eq!(blocks.len(), 2);
    let found =
        store.find_environment(&project, &EnvName::parse("two").unwrap()).await.unwrap().unwrap();
    assert_eq!(found.ports.base, 20010);
    let listed = store
        .list_environments(&project, &EnvironmentQuery { limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    let other = ProjectId::parse("other").unwrap();
    assert!(store.get_environment(&other, first.id).await.unwrap().is_none());
}

async fn a_deleted_environment_frees_its_name_port_block_and_quota(db: TestDb) {
    let store = db.store.clone();
    let env = store.create_environment(new_env("one", 20000, 1), T0).await.unwrap();
    for status in [EnvStatus::Running, EnvStatus::Deleting, EnvStatus::Deleted] {
        store.transition_environment(env.id, status, None, T0).await.unwrap();
    }
    assert!(store.used_port_blocks().await.unwrap().is_empty());
    store
        .create_environment(new_env("one", 20000, 1), T0)
        .await
        .expect("name, block and quota are free again");
}

async fn transitions_are_checked_and_each_is_an_event(db: TestDb) {
    let store = db.store.clone();
    let env = store.create_environment(new_env("one", 20000, 5), T0).await.unwrap();
    store.transition_environment(env.id, EnvStatus::Running, None, T0).await.unwrap();
    let illegal = store.transition_environment(env.id, EnvStatus::Deleted, None, T0).await;
    assert!(matches!(illegal, Err(StoreError::Transition(_))));
    // The same status again is not a new transition.
    store.transition_environment(env.id, EnvStatus::Running, None, T0).await.unwrap();

    let events = store
        .list_events(
            &ProjectId::default_project(),
            &EventQuery { run_id: None, environment_id: None, after: None, limit: 10 },
        )
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["environment.creating", "environment.running"]);
    assert!(events.iter().all(|e| e.environment_id == Some(env.id)));
}

async fn desired_state_changes_are_idempotent_and_audited(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let env = store.create_environment(new_env("one", 20000, 5), T0).await.unwrap();
    store
        .set_desired(&project, env.id, DesiredState::Stopped, "alice", Some("lunch"), T0)
        .await
        .unwrap();
    let again = store
        .set_desired(&project, env.id, DesiredState::Stopped, "alice", None, T0)
        .await
        .unwrap();
    assert_eq!(again.desired, DesiredState::Stopped);
    store.set_desired(&project, env.id, DesiredState::Deleted, "bob", None, T0).await.unwrap();
    let revive = store.set_desired(&project, env.id, DesiredState::Running, "bob", None, T0).await;
    assert!(matches!(revive, Err(StoreError::EnvironmentBusy { .. })));

    let audit = store.list_audit(&project, 10).await.unwrap();
    let actions: Vec<(&str, &str)> =
        audit.iter().rev().map(|a| (a.actor.as_str(), a.action.as_str())).collect();
    assert_eq!(
        actions,
        [
            ("local-admin", "environment.create"),
            ("alice", "environment.stop"),
            ("alice", "environment.stop"),
            ("bob", "environment.delete"),
        ]
    );
    assert_eq!(
        audit.iter().find(|a| a.reason.as_deref() == Some("lunch")).map(|a| a.actor.as_str()),
        Some("alice")
    );
}

async fn idle_and_long_stopped_environments_are_found(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let env = store.create_environment(new_env("one", 20000, 5), T0).await.unwrap();
    store.transition_environment(env.id, EnvStatus::Running, None, T0).await.unwrap();
    let later = T0.plus(Duration::from_secs(600));
    assert_eq!(store.idle_environments(later).await.unwrap().len(), 1);
    store.touch_environment(env.id, later).await.unwrap();
    assert!(store.idle_environments(later).await.unwrap().is_empty());

    store.set_desired(&project, env.id, DesiredState::Stopped, "me", None, later).await.unwrap();
    store.transition_environment(env.id, EnvStatus::Stopping, None, later).await.unwrap();
    store.transition_environment(env.id, EnvStatus::Stopped, None, later).await.unwrap();
    assert!(store.stopped_environments(later).await.unwrap().is_empty());
    let days_later = later.plus(Duration::from_secs(86_400 * 3));
    assert_eq!(store.stopped_environments(days_later).await.unwrap().len(), 1);
}

async fn service_records_keep_process_groups_and_status_changes_are_events(db: TestDb) {
    let store = db.store.clone();
    let env = store.create_environment(new_env("one", 20000, 5), T0).await.unwrap();
    let record = |status, pid| ServiceRecord {
        environment_id: Some(env.id),
        service: ServiceName::parse("web").unwrap(),
        status,
        pid,
        restarts: 0,
        reason: None,
        updated_at: T0,
    };
    store.record_service(record(ServiceStatus::Starting, Some(4242))).await.unwrap();
    store.record_service(record(ServiceStatus::Ready, Some(4242))).await.unwrap();
    store.record_service(record(ServiceStatus::Ready, Some(4242))).await.unwrap();
    assert_eq!(store.running_service_records().await.unwrap()[0].pid, Some(4242));
    store.record_service(record(ServiceStatus::Stopped, None)).await.unwrap();
    assert!(store.running_service_records().await.unwrap().is_empty());
    assert_eq!(
        store.service_records(Some(env.id)).await.unwrap()[0].status,
        ServiceStatus::Stopped
    );

    let events = store
        .list_events(
            &ProjectId::default_project(),
            &EventQuery { run_id: None, environment_id: None, after: None, limit: 20 },
        )
        .await
        .unwrap();
    let services: Vec<EventKind> =
        events.iter().map(|e| e.kind).filter(|k| matches!(k, EventKind::Service(_))).collect();
    assert_eq!(
        services,
        [
            EventKind::Service(ServiceStatus::Starting),
            EventKind::Service(ServiceStatus::Ready),
            EventKind::Service(ServiceStatus::Stopped)
        ]
    );
    store.forget_services(Some(env.id)).await.unwrap();
    assert!(store.service_records(Some(env.id)).await.unwrap().is_empty());
}

backend_tests!(
    environments_are_created_within_quota_with_unique_names,
    a_deleted_environment_frees_its_name_port_block_and_quota,
    transitions_are_checked_and_each_is_an_event,
    desired_state_changes_are_idempotent_and_audited,
    idle_and_long_stopped_environments_are_found,
    service_records_keep_process_groups_and_status_changes_are_events,
);
