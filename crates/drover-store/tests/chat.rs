//! The chat side of the store, against a fresh SQLite file and a fresh PostgreSQL database
//! per test: sessions private to their owner, messages numbered without gaps, the tail read
//! oldest first.

#[macro_use]
mod common;

use drover_domain::{AgentType, ChatMessageStatus, ChatRole, ChatSessionId, ProjectId, Timestamp};
use drover_store::{ChatStore, NewChatMessage, NewChatSession, StoreError};

use crate::common::TestDb;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn session(owner: &str) -> NewChatSession {
    NewChatSession {
        project_id: ProjectId::default_project(),
        owner: owner.to_owned(),
        agent: AgentType::parse("assistant").unwrap(),
        environment: Some("dev".to_owned()),
    }
}

fn said(role: ChatRole, content: &str, status: ChatMessageStatus) -> NewChatMessage {
    NewChatMessage {
        role,
        content: content.to_owned(),
        status,
        input_tokens: (role == ChatRole::Assistant).then_some(12),
        output_tokens: (role == ChatRole::Assistant).then_some(3),
    }
}

async fn messages_are_numbered_in_order_and_the_tail_reads_oldest_first(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let created = store.create_chat_session(session("alice"), T0).await.unwrap();
    assert_eq!(created.message_count, 0);
    assert_eq!(created.environment.as_deref(), Some("dev"));

    let contents = ["hello", "hi there", "run the tests", "(cut short)"];
    for (i, content) in contents.iter().enumerate() {
        let role = if i % 2 == 0 { ChatRole::User } else { ChatRole::Assistant };
        let status =
            if i == 3 { ChatMessageStatus::Cancelled } else { ChatMessageStatus::Complete };
        let at = Timestamp::from_millis(T0.as_millis() + i as i64 + 1);
        let message = store
            .append_chat_message(&project, "alice", &created.id, said(role, content, status), at)
            .await
            .unwrap();
        assert_eq!(message.seq, i as u64 + 1);
    }

    let all = store.chat_messages(&project, "alice", &created.id, 100).await.unwrap();
    let texts: Vec<&str> = all.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, contents);
    assert_eq!(all[1].role, ChatRole::Assistant);
    assert_eq!(all[1].output_tokens, Some(3));
    assert_eq!(all[3].status, ChatMessageStatus::Cancelled);

    let tail = store.chat_messages(&project, "alice", &created.id, 2).await.unwrap();
    assert_eq!(tail.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);

    let reread = store.chat_session(&project, "alice", &created.id).await.unwrap();
    assert_eq!(reread.message_count, 4);
    assert_eq!(reread.updated_at.as_millis(), T0.as_millis() + 4);
}

async fn a_session_is_invisible_to_other_users_and_projects(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let other_project = ProjectId::parse("other").unwrap();
    let alice = store.create_chat_session(session("alice"), T0).await.unwrap();

    let missing =
        |result: Result<_, StoreError>| matches!(result, Err(StoreError::ChatSessionNotFound(_)));
    assert!(missing(store.chat_session(&project, "bob", &alice.id).await.map(|_| ())));
    assert!(missing(store.chat_session(&other_project, "alice", &alice.id).await.map(|_| ())));
    assert!(missing(store.chat_messages(&project, "bob", &alice.id, 10).await.map(|_| ())));
    let append = store
        .append_chat_message(
            &project,
            "bob",
            &alice.id,
            said(ChatRole::User, "hi", ChatMessageStatus::Complete),
            T0,
        )
        .await;
    assert!(missing(append.map(|_| ())));
    assert!(!store.delete_chat_session(&project, "bob", &alice.id).await.unwrap());
    assert!(store.chat_sessions(&project, "bob", 10).await.unwrap().is_empty());
    // An empty session of its owner reads as empty, not missing.
    assert!(store.chat_messages(&project, "alice", &alice.id, 10).await.unwrap().is_empty());
    assert!(missing(
        store.chat_messages(&project, "alice", &ChatSessionId::new(), 10).await.map(|_| ())
    ));
}

async fn sessions_list_most_recent_first_and_delete_takes_their_messages(db: TestDb) {
    let store = db.store.clone();
    let project = ProjectId::default_project();
    let first = store.create_chat_session(session("alice"), T0).await.unwrap();
    let later = Timestamp::from_millis(T0.as_millis() + 10);
    let second = store.create_chat_session(session("alice"), later).await.unwrap();
    let listed = store.chat_sessions(&project, "alice", 10).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [second.id, first.id]);

    // Talking in the first makes it the most recent.
    let latest = Timestamp::from_millis(T0.as_millis() + 20);
    store
        .append_chat_message(
            &project,
            "alice",
            &first.id,
            said(ChatRole::User, "back again", ChatMessageStatus::Complete),
            latest,
        )
        .await
        .unwrap();
    let listed = store.chat_sessions(&project, "alice", 1).await.unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [first.id]);

    assert!(store.delete_chat_session(&project, "alice", &first.id).await.unwrap());
    assert!(matches!(
        store.chat_messages(&project, "alice", &first.id, 10).await,
        Err(StoreError::ChatSessionNotFound(_))
    ));
    assert_eq!(store.chat_sessions(&project, "alice", 10).await.unwrap().len(), 1);
}

backend_tests!(
    messages_are_numbered_in_order_and_the_tail_reads_oldest_first,
    a_session_is_invisible_to_other_users_and_projects,
    sessions_list_most_recent_first_and_delete_takes_their_messages,
);
