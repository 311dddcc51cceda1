//! The store conformance suite: behaviour every [`Store`] implementation must have. Each
//! case runs against a fresh SQLite file and a fresh PostgreSQL database (`sqlite::…` and
//! `postgres::…`, see `common`).

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use drover_domain::{
    AgentType, AttemptId, CorrelationId, EventKind, EventSeq, FencingToken, Outcome,
    PipelineCatalog, ProjectId, RunId, RunRequest, RunStatus, StageAttempt, StageStatus, Timestamp,
    WorkerId, WorkerProfile, WorkerStatus, sdlc,
};
use drover_store::{
    CommandOutcome, Completion, CompletionOutcome, DeadLetterQuery, EventQuery, IdentityStore,
    NewRun, RunQuery, StartAttempt, StartOutcome, Store, StoreError, WorkerCommand,
};
use serde_json::json;

use crate::common::TestDb;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

struct Fixture {
    store: Arc<dyn Store>,
    pipelines: PipelineCatalog,
    _db: TestDb,
}

fn fixture(db: TestDb) -> Fixture {
    Fixture { store: Arc::new(db.store.clone()), pipelines: PipelineCatalog::builtin(), _db: db }
}

fn default_project() -> ProjectId {
    ProjectId::default_project()
}

async fn new_run(fx: &Fixture, request: &str, now: Timestamp) -> drover_domain::Run {
    new_run_in(fx, default_project(), request, now).await
}

async fn new_run_in(
    fx: &Fixture,
    project_id: ProjectId,
    request: &str,
    now: Timestamp,
) -> drover_domain::Run {
    fx.store
        .create_run(
            NewRun {
                id: None,
                project_id,
                pipeline: sdlc(),
                request: RunRequest::parse(request).unwrap(),
                correlation_id: CorrelationId::new(),
                environment_id: None,
                workspace: None,
                variables: Default::default(),
                budget: None,
                submitted_by: None,
            },
            now,
        )
        .await
        .expect("run created")
}

async fn attempts(fx: &Fixture, run: RunId) -> Vec<StageAttempt> {
    fx.store.list_attempts(&default_project(), run).await.unwrap()
}

async fn start(fx: &Fixture, attempt: &StageAttempt, now: Timestamp) -> StageAttempt {
    let outcome = fx
        .store
        .start_attempt(
            StartAttempt {
                attempt_id: attempt.id,
                token: attempt.fencing_token,
                worker_id: WorkerId::new("worker-1"),
                lease_until: now.plus(Duration::from_secs(10)),
                now,
            },
            &fx.pipelines,
        )
        .await
        .unwrap();
    match outcome {
        StartOutcome::Started(attempt) => attempt,
        StartOutcome::Rejected { reason } => panic!("start rejected: {reason}"),
    }
}

async fn complete(
    fx: &Fixture,
    attempt: &StageAttempt,
    outcome: Outcome,
    now: Timestamp,
) -> CompletionOutcome {
    fx.store
        .complete_attempt(
            Completion {
                attempt_id: attempt.id,
                token: attempt.fencing_token,
                outcome,
                jitter: 0.0,
                now,
            },
            &fx.pipelines,
        )
        .await
        .unwrap()
}

fn success() -> Outcome {
    Outcome::Succeeded { output: json!({ "ok": true }) }
}

async fn creating_a_run_writes_it_queued_with_a_pending_first_attempt_and_events(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;

    let stored = fx.store.get_run(&default_project(), run.id).await.unwrap().unwrap();
    assert_eq!(stored, run);
    assert_eq!(stored.status, RunStatus::Queued);

    let attempts = attempts(&fx, run.id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].stage.as_str(), "scaffold");
    assert_eq!(attempts[0].status, StageStatus::Pending);
    assert_eq!(attempts[0].fencing_token, FencingToken::FIRST);

    let events = fx
        .store
        .list_events(
            &default_project(),
            &EventQuery { run_id: Some(run.id), environment_id: None, after: None, limit: 100 },
        )
        .await
        .unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["run.queued", "stage.pending"]);
    assert!(events[0].seq < events[1].seq);
}

async fn another_projects_runs_are_invisible(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let other = ProjectId::parse("other").unwrap();

    assert!(fx.store.get_run(&other, run.id).await.unwrap().is_none());
    assert!(fx.store.list_attempts(&other, run.id).await.unwrap().is_empty());
    let listed = fx.store.list_runs(&other, &RunQuery { limit: 10, ..RunQuery::default() }).await;
    assert!(listed.unwrap().is_empty());
    let cancel = fx.store.cancel_run(&other, run.id, "no", T0).await;
    assert!(matches!(cancel, Err(StoreError::RunNotFound(_))));
}

async fn starting_an_attempt_runs_it_and_its_run_with_a_deadline(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = &attempts(&fx, run.id).await[0];

    let started = start(&fx, first, T0).await;
    assert_eq!(started.status, StageStatus::Running);
    assert_eq!(started.deadline_at, Some(T0.plus(sdlc().stages[0].timeout)));
    let run = fx.store.get_run(&default_project(), run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.started_at, Some(T0));
}

async fn a_start_with_a_stale_token_or_twice_is_rejected(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = attempts(&fx, run.id).await.remove(0);

    let stale = fx
        .store
        .start_attempt(
            StartAttempt {
                attempt_id: first.id,
                token: FencingToken(99),
                worker_id: WorkerId::new("w"),
                lease_until: T0,
                now: T0,
            },
            &fx.pipelines,
        )
        .await
        .unwrap();
    assert!(matches!(stale, StartOutcome::Rejected { .. }));

    start(&fx, &first, T0).await;
    let again = fx
        .store
        .start_attempt(
            StartAttempt {
                attempt_id: first.id,
                token: first.fencing_token,
                worker_id: WorkerId::new("w2"),
                lease_until: T0,
                now: T0,
            },
            &fx.pipelines,
        )
        .await
        .unwrap();
    let StartOutcome::Rejected { reason } = again else { panic!("second start accepted") };
    assert!(reason.contains("running"), "{reason}");
}

async fn success_commits_once_and_creates_the_next_stage(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;

    let CompletionOutcome::Applied { attempt, next, .. } =
        complete(&fx, &first, success(), T0).await
    else {
        panic!("not applied")
    };
    assert_eq!(attempt.status, StageStatus::Succeeded);
    assert_eq!(attempt.output, Some(json!({ "ok": true })));
    let next = next.into_iter().next().expect("a next stage");
    assert_eq!(next.stage.as_str(), "validate");
    assert_eq!(next.status, StageStatus::Pending);

    // The same result delivered again changes nothing.
    let again = complete(&fx, &first, success(), T0).await;
    assert!(matches!(again, CompletionOutcome::Stale { .. }));
    assert_eq!(attempts(&fx, run.id).await.len(), 2);
}

async fn a_result_with_a_stale_token_is_rejected_and_writes_nothing(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let mut first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    first.fencing_token = FencingToken(first.fencing_token.0 + 7);

    let outcome = complete(&fx, &first, success(), T0).await;
    let CompletionOutcome::Stale { reason } = outcome else { panic!("stale result applied") };
    assert!(reason.contains("stale fencing token"), "{reason}");
    let stored = attempts(&fx, run.id).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].status, StageStatus::Running);
}

async fn concurrent_duplicate_results_commit_exactly_once(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = fx.store.clone();
            let pipelines = fx.pipelines.clone();
            let attempt = first.clone();
            tokio::spawn(async move {
                store
                    .complete_attempt(
                        Completion {
                            attempt_id: attempt.id,
                            token: attempt.fencing_token,
                            outcome: success(),
                            jitter: 0.0,
                            now: T0,
                        },
                        &pipelines,
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), CompletionOutcome::Applied { .. }) {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(attempts(&fx, run.id).await.len(), 2);
}

async fn the_last_stage_succeeding_finishes_the_run(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let mut now = T0;
    for _ in 0..5 {
        let pending = attempts(&fx, run.id).await.into_iter().last().unwrap();
        let running = start(&fx, &pending, now).await;
        complete(&fx, &running, success(), now).await;
        now = now.plus(Duration::from_millis(10));
    }
    let run = fx.store.get_run(&default_project(), run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Succeeded);
    assert!(run.finished_at.is_some());
    let all = attempts(&fx, run.id).await;
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|a| a.status == StageStatus::Succeeded));
}

async fn a_retryable_failure_schedules_a_retry_that_is_not_due_before_its_backoff(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let failure = Outcome::Failed { error: "flaky network".into(), retryable: true };

    let CompletionOutcome::Applied { attempt, next, run: after, .. } =
        complete(&fx, &first, failure, T0).await
    else {
        panic!("not applied")
    };
    assert_eq!(attempt.status, StageStatus::Failed);
    assert_eq!(after.status, RunStatus::Running);
    let retry = next.into_iter().next().expect("a retry");
    assert_eq!((retry.stage.as_str(), retry.attempt), ("scaffold", 2));
    assert!(retry.available_at > T0);

    assert!(fx.store.due_attempts(T0, 10).await.unwrap().is_empty());
    let due = fx.store.due_attempts(retry.available_at, 10).await.unwrap();
    assert_eq!(due.iter().map(|a| a.id).collect::<Vec<_>>(), [retry.id]);
}

async fn a_deterministic_failure_fails_the_run_with_the_reason(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let failure = Outcome::Failed { error: "app.py:1: invalid syntax".into(), retryable: false };

    complete(&fx, &first, failure, T0).await;
    let run = fx.store.get_run(&default_project(), run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.unwrap().contains("invalid syntax"));
}

async fn cancelling_stops_active_attempts_and_cannot_happen_twice(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;

    let cancelled =
        fx.store.cancel_run(&default_project(), run.id, "user asked", T0).await.unwrap();
    assert_eq!(cancelled.run.status, RunStatus::Cancelled);
    assert_eq!(cancelled.stopped_attempts.len(), 1);
    assert_eq!(cancelled.stopped_attempts[0].status, StageStatus::Cancelled);

    let again = fx.store.cancel_run(&default_project(), run.id, "again", T0).await;
    assert!(matches!(
        again,
        Err(StoreError::RunAlreadyFinished { status: RunStatus::Cancelled, .. })
    ));
    // The worker's late result is not applied.
    assert!(matches!(complete(&fx, &first, success(), T0).await, CompletionOutcome::Stale { .. }));
    let missing = fx.store.cancel_run(&default_project(), RunId::new(), "x", T0).await;
    assert!(matches!(missing, Err(StoreError::RunNotFound(_))));
}

async fn runs_list_newest_first_with_a_cursor_and_a_status_filter(db: TestDb) {
    let fx = fixture(db);
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(new_run(&fx, &format!("request {n}"), T0).await.id);
    }
    let cancelled = ids[1];
    fx.store.cancel_run(&default_project(), cancelled, "x", T0).await.unwrap();

    let page = |before, limit| RunQuery { status: None, before, limit };
    let first = fx.store.list_runs(&default_project(), &page(None, 2)).await.unwrap();
    assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[4], ids[3]]);
    let second = fx.store.list_runs(&default_project(), &page(Some(ids[3]), 10)).await.unwrap();
    assert_eq!(second.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[2], ids[1], ids[0]]);

    let only_cancelled = RunQuery { status: Some(RunStatus::Cancelled), before: None, limit: 10 };
    let filtered = fx.store.list_runs(&default_project(), &only_cancelled).await.unwrap();
    assert_eq!(filtered.iter().map(|r| r.id).collect::<Vec<_>>(), [cancelled]);
}

async fn leases_expire_unless_renewed_and_a_released_attempt_gets_a_new_token(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let running = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let lease_end = T0.plus(Duration::from_secs(10));

    assert!(fx.store.expired_leases(lease_end, 10).await.unwrap().is_empty());
    let later = lease_end.plus(Duration::from_millis(1));
    assert_eq!(fx.store.expired_leases(later, 10).await.unwrap().len(), 1);

    let renewed = later.plus(Duration::from_secs(10));
    assert!(fx.store.renew_lease(running.id, running.fencing_token, renewed).await.unwrap());
    assert!(fx.store.expired_leases(later, 10).await.unwrap().is_empty());
    assert!(!fx.store.renew_lease(running.id, FencingToken(42), renewed).await.unwrap());

    assert!(fx.store.release_attempt(running.id, running.fencing_token, later).await.unwrap());
    let released = attempts(&fx, run.id).await.remove(0);
    assert_eq!(released.status, StageStatus::Pending);
    assert_eq!(released.fencing_token, running.fencing_token.next());
    // The old holder's result is now stale.
    assert!(matches!(
        complete(&fx, &running, success(), later).await,
        CompletionOutcome::Stale { .. }
    ));
}

async fn overdue_attempts_are_found_by_their_deadline(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let running = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let deadline = running.deadline_at.unwrap();
    assert!(fx.store.overdue_attempts(deadline, 10).await.unwrap().is_empty());
    let overdue = fx.store.overdue_attempts(deadline.plus(Duration::from_millis(1)), 10).await;
    assert_eq!(overdue.unwrap()[0].id, running.id);
}

async fn dispatch_marks_pending_attempts_and_a_requeue_puts_them_back(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let due = fx.store.due_attempts(T0, 10).await.unwrap();
    assert_eq!(due.len(), 1);

    let dispatched = [(due[0].id, "m-1".to_owned()), (AttemptId::new(), "m-2".to_owned())];
    fx.store.mark_dispatched(&dispatched, T0).await.unwrap();
    assert_eq!(attempts(&fx, run.id).await[0].bus_message_id.as_deref(), Some("m-1"));
    assert_eq!(attempts(&fx, run.id).await[0].status, StageStatus::Dispatched);
    assert!(fx.store.due_attempts(T0, 10).await.unwrap().is_empty());

    assert_eq!(fx.store.requeue_dispatched(T0).await.unwrap(), 1);
    assert_eq!(attempts(&fx, run.id).await[0].status, StageStatus::Pending);
}

async fn subscribers_see_committed_events_in_sequence_order(db: TestDb) {
    let fx = fixture(db);
    let mut feed = fx.store.subscribe();
    let run = new_run(&fx, "Hello World API", T0).await;

    let first = feed.recv().await.unwrap();
    let second = feed.recv().await.unwrap();
    assert_eq!(first.kind, EventKind::Run(RunStatus::Queued));
    assert_eq!(first.run_id, Some(run.id));
    assert_eq!(second.kind, EventKind::Stage(StageStatus::Pending));
    assert!(first.seq < second.seq);

    let after_first = fx
        .store
        .list_events(
            &default_project(),
            &EventQuery {
                run_id: Some(run.id),
                environment_id: None,
                after: Some(first.seq),
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(after_first, vec![second]);
}

async fn data_survives_reopening_the_same_file(mut db: TestDb) {
    let run_id = {
        let store = db.store.clone();
        let run = store
            .create_run(
                NewRun {
                    id: None,
                    project_id: default_project(),
                    pipeline: sdlc(),
                    request: RunRequest::parse("persist me").unwrap(),
                    correlation_id: CorrelationId::new(),
                    environment_id: None,
                    workspace: None,
                    variables: Default::default(),
                    budget: None,
                    submitted_by: None,
                },
                T0,
            )
            .await
            .unwrap();
        store.close().await;
        run.id
    };
    let reopened = db.reopen().await;
    let run = reopened.get_run(&default_project(), run_id).await.unwrap().unwrap();
    assert_eq!(run.request.as_str(), "persist me");
    let counts = reopened.count_attempts_by_status().await.unwrap();
    assert_eq!(counts, vec![(StageStatus::Pending, 1)]);
}

async fn dispatch_context_loads_runs_and_earlier_outputs_in_batches(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let other = new_run(&fx, "Todo API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    complete(&fx, &first, success(), T0).await;

    let runs = fx.store.runs_by_ids(&[run.id, other.id, RunId::new()]).await.unwrap();
    assert_eq!(runs.len(), 2);
    let outputs = fx.store.succeeded_outputs(&[run.id, other.id]).await.unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!((outputs[0].0, outputs[0].1.as_str()), (run.id, "scaffold"));
    assert_eq!(outputs[0].2, json!({ "ok": true }));
    assert!(fx.store.runs_by_ids(&[]).await.unwrap().is_empty());
}

async fn stale_dispatched_attempts_are_found_and_a_redispatch_is_recorded(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = attempts(&fx, run.id).await.remove(0);
    fx.store.mark_dispatched(&[(first.id, "m-1".to_owned())], T0).await.unwrap();

    assert!(fx.store.stale_dispatched(T0, 10).await.unwrap().is_empty());
    let later = T0.plus(Duration::from_secs(30));
    let stale = fx.store.stale_dispatched(later, 10).await.unwrap();
    assert_eq!(stale.iter().map(|a| a.id).collect::<Vec<_>>(), [first.id]);

    assert!(fx.store.record_redispatch(first.id, "m-2", later).await.unwrap());
    let now_dispatched = attempts(&fx, run.id).await.remove(0);
    assert_eq!(now_dispatched.bus_message_id.as_deref(), Some("m-2"));
    assert!(fx.store.stale_dispatched(later, 10).await.unwrap().is_empty(), "the clock restarted");

    start(&fx, &now_dispatched, later).await;
    assert!(
        !fx.store.record_redispatch(first.id, "m-3", later).await.unwrap(),
        "started ones are left alone"
    );
}

/// Drives the first stage to the dead-letter queue: every allowed attempt fails retryably.
async fn dead_letter_first_stage(fx: &Fixture) -> (RunId, StageAttempt) {
    let run = new_run(fx, "Hello World API", T0).await;
    let mut now = T0;
    loop {
        let pending = attempts(fx, run.id).await.into_iter().last().unwrap();
        let running = start(fx, &pending, now).await;
        let failure = Outcome::Failed { error: "always".into(), retryable: true };
        let CompletionOutcome::Applied { attempt, .. } = complete(fx, &running, failure, now).await
        else {
            panic!("not applied")
        };
        now = now.plus(Duration::from_secs(120));
        if attempt.status == StageStatus::DeadLettered {
            return (run.id, attempt);
        }
    }
}

async fn an_exhausted_stage_waits_in_the_dead_letter_queue_and_a_redrive_runs_it_again(db: TestDb) {
    let fx = fixture(db);
    let (run_id, letter) = dead_letter_first_stage(&fx).await;
    assert_eq!(letter.attempt, 3);
    let project = default_project();
    let query = DeadLetterQuery { before: None, limit: 10 };
    let letters = fx.store.list_dead_letters(&project, &query).await.unwrap();
    assert_eq!(letters.iter().map(|a| a.id).collect::<Vec<_>>(), [letter.id]);
    let other = ProjectId::parse("other").unwrap();
    assert!(fx.store.list_dead_letters(&other, &query).await.unwrap().is_empty());

    let retry = fx.store.redrive_dead_letter(&project, letter.id, &fx.pipelines, T0).await.unwrap();
    assert_eq!(
        (retry.stage.as_str(), retry.attempt, retry.status),
        ("scaffold", 4, StageStatus::Pending)
    );
    let run = fx.store.get_run(&project, run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.error, None);
    assert!(fx.store.list_dead_letters(&project, &query).await.unwrap().is_empty());

    let twice = fx.store.redrive_dead_letter(&project, letter.id, &fx.pipelines, T0).await;
    assert!(matches!(twice, Err(StoreError::NotDeadLettered { .. })), "{twice:?}");
    let running = start(&fx, &retry, T0).await;
    complete(&fx, &running, success(), T0).await;
    assert_eq!(attempts(&fx, run_id).await.last().unwrap().stage.as_str(), "validate");

    let events = fx
        .store
        .list_events(
            &project,
            &EventQuery { run_id: Some(run_id), environment_id: None, after: None, limit: 100 },
        )
        .await
        .unwrap();
    assert!(events.iter().any(|e| e.kind == EventKind::DlqRedriven));
}

async fn a_discarded_dead_letter_leaves_the_queue_and_its_run_failed(db: TestDb) {
    let fx = fixture(db);
    let (run_id, letter) = dead_letter_first_stage(&fx).await;
    let project = default_project();
    fx.store.discard_dead_letter(&project, letter.id, T0).await.unwrap();
    let query = DeadLetterQuery { before: None, limit: 10 };
    assert!(fx.store.list_dead_letters(&project, &query).await.unwrap().is_empty());
    assert_eq!(
        fx.store.get_run(&project, run_id).await.unwrap().unwrap().status,
        RunStatus::Failed
    );
    let again = fx.store.discard_dead_letter(&project, letter.id, T0).await;
    assert!(matches!(again, Err(StoreError::NotDeadLettered { .. })));
    let missing = fx.store.discard_dead_letter(&project, AttemptId::new(), T0).await;
    assert!(matches!(missing, Err(StoreError::AttemptNotFound(_))));
}

async fn a_succeeded_attempt_cannot_be_redriven(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let running = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    complete(&fx, &running, success(), T0).await;
    let err = fx.store.redrive_dead_letter(&default_project(), running.id, &fx.pipelines, T0).await;
    assert!(matches!(err, Err(StoreError::NotDeadLettered { .. })), "{err:?}");
}

async fn workers_register_heartbeat_get_lost_and_come_back(db: TestDb) {
    let fx = fixture(db);
    let worker = WorkerId::new("host-1-42");
    let profile = WorkerProfile {
        agents: vec![AgentType::parse("scaffold").unwrap(), AgentType::parse("deploy").unwrap()],
        version: "0.1.0".into(),
        hostname: "host-1".into(),
        concurrency: 4,
        kind: "external".into(),
    };
    fx.store.worker_seen(&worker, &profile, T0).await.unwrap();
    let later = T0.plus(Duration::from_secs(5));
    fx.store.worker_seen(&worker, &profile, later).await.unwrap();
    let listed = fx.store.list_workers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].status, listed[0].last_seen_at, listed[0].registered_at),
        (WorkerStatus::Live, later, T0)
    );
    assert_eq!(listed[0].agents, profile.agents);

    assert_eq!(fx.store.mark_lost_workers(later, later).await.unwrap(), 0);
    let much_later = later.plus(Duration::from_secs(60));
    assert_eq!(fx.store.mark_lost_workers(much_later, much_later).await.unwrap(), 1);
    assert_eq!(fx.store.list_workers().await.unwrap()[0].status, WorkerStatus::Lost);

    fx.store.worker_seen(&worker, &profile, much_later).await.unwrap();
    assert_eq!(fx.store.list_workers().await.unwrap()[0].status, WorkerStatus::Live);
    fx.store.worker_gone(&worker, much_later).await.unwrap();
    assert_eq!(fx.store.list_workers().await.unwrap()[0].status, WorkerStatus::Gone);

    let events = fx
        .store
        .list_events(
            &default_project(),
            &EventQuery { run_id: None, environment_id: None, after: None, limit: 100 },
        )
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["worker.joined", "worker.lost", "worker.joined", "worker.left"]);
}

async fn a_batch_of_worker_writes_applies_in_order_with_each_one_fenced(db: TestDb) {
    let fx = fixture(db);
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = attempts(&fx, run.id).await.remove(0);
    let worker = WorkerId::new("w");
    let start = StartAttempt {
        attempt_id: first.id,
        token: first.fencing_token,
        worker_id: worker.clone(),
        lease_until: T0.plus(Duration::from_secs(10)),
        now: T0,
    };
    let complete = Completion {
        attempt_id: first.id,
        token: first.fencing_token,
        outcome: success(),
        jitter: 0.0,
        now: T0,
    };
    let commands = vec![
        WorkerCommand::Start(start.clone()),
        WorkerCommand::Renew {
            attempt: first.id,
            token: first.fencing_token,
            lease_until: T0,
            now: T0,
        },
        WorkerCommand::Complete(complete.clone()),
        // The same result again, in the same batch: fenced out.
        WorkerCommand::Complete(complete),
        WorkerCommand::Start(start),
    ];
    let outcomes = fx.store.apply(commands, &fx.pipelines).await.unwrap();
    assert!(matches!(outcomes[0], CommandOutcome::Started(StartOutcome::Started(_))));
    assert!(matches!(outcomes[1], CommandOutcome::Renewed(true)));
    assert!(matches!(outcomes[2], CommandOutcome::Completed(CompletionOutcome::Applied { .. })));
    assert!(matches!(outcomes[3], CommandOutcome::Completed(CompletionOutcome::Stale { .. })));
    assert!(matches!(outcomes[4], CommandOutcome::Started(StartOutcome::Rejected { .. })));
    let all = attempts(&fx, run.id).await;
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].status, all[1].stage.as_str()), (StageStatus::Succeeded, "validate"));

    let events = fx
        .store
        .list_events(
            &default_project(),
            &EventQuery { run_id: Some(run.id), environment_id: None, after: None, limit: 100 },
        )
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run.queued",
            "stage.pending",
            "run.running",
            "stage.running",
            "stage.succeeded",
            "stage.pending"
        ]
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
}

/// `root → (left, right)`: two stages that run at once.
fn fork_pipeline() -> drover_domain::PipelineSpec {
    let stage = |name: &str, needs: &[&str]| drover_domain::StageSpec {
        needs: Some(needs.iter().map(|n| drover_domain::StageName::parse(*n).unwrap()).collect()),
        max_attempts: 1,
        ..drover_domain::StageSpec::new(
            drover_domain::StageName::parse(name).unwrap(),
            AgentType::parse("scaffold").unwrap(),
            Duration::from_secs(60),
        )
    };
    drover_domain::PipelineSpec {
        name: drover_domain::PipelineName::parse("fork").unwrap(),
        description: String::new(),
        stages: vec![stage("root", &[]), stage("left", &["root"]), stage("right", &["root"])],
    }
}

async fn a_fork_starts_both_branches_and_a_failed_branch_stops_the_other(db: TestDb) {
    let fx = fixture(db);
    let run = fx
        .store
        .create_run(
            NewRun {
                id: None,
                project_id: default_project(),
                pipeline: fork_pipeline(),
                request: RunRequest::parse("fork").unwrap(),
                correlation_id: CorrelationId::new(),
                environment_id: None,
                workspace: None,
                variables: Default::default(),
                budget: None,
                submitted_by: Some("alice".to_owned()),
            },
            T0,
        )
        .await
        .unwrap();
    // The run follows its own snapshot, not the catalog (which has no `fork`).
    assert!(fx.pipelines.get("fork").is_none());
    let root = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let output = json!({ "usage": { "tokens": 120, "cost_usd": 0.5 } });
    let CompletionOutcome::Applied { next, .. } =
        complete(&fx, &root, Outcome::Succeeded { output }, T0).await
    else {
        panic!("not applied")
    };
    let mut names: Vec<&str> = next.iter().map(|a| a.stage.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["left", "right"], "both branches are due at once");

    let left = start(&fx, &next[0], T0).await;
    let right = start(&fx, &next[1], T0).await;
    let failure = Outcome::Failed { error: "broken".into(), retryable: false };
    let CompletionOutcome::Applied { run: after, stopped, .. } =
        complete(&fx, &left, failure, T0).await
    else {
        panic!("not applied")
    };
    assert_eq!(after.status, RunStatus::Failed);
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0].id, right.id);
    assert_eq!(stopped[0].status, StageStatus::Cancelled);
    // The stopped branch's late result changes nothing.
    assert!(matches!(complete(&fx, &right, success(), T0).await, CompletionOutcome::Stale { .. }));

    let report = fx.store.usage_report(&default_project(), T0).await.unwrap();
    assert_eq!(report.total.tokens, 120);
    assert_eq!(report.by_user, [("alice".to_owned(), report.total)]);
    assert_eq!(report.by_stage, [("root".to_owned(), report.total)]);
    assert_eq!(report.by_run, [(run.id, report.total)]);
    let later = fx.store.usage_report(&default_project(), T0.plus(Duration::from_secs(1))).await;
    assert_eq!(later.unwrap().total.tokens, 0, "runs before the window are left out");
}

async fn claims_are_exclusive_and_held_until_their_time(db: TestDb) {
    let fx = fixture(db);
    let mut runs = Vec::new();
    for n in 0..6 {
        runs.push(new_run(&fx, "Hello World API", T0.plus(Duration::from_millis(n))).await.id);
    }
    let now = T0.plus(Duration::from_secs(1));
    let hold = now.plus(Duration::from_secs(30));

    let oldest = fx.store.claim_due_attempts(now, 1, hold).await.unwrap();
    assert_eq!(oldest.iter().map(|a| a.run_id).collect::<Vec<_>>(), runs[..1]);
    // Two servers claiming at once get disjoint batches.
    let (a, b) = tokio::join!(
        fx.store.claim_due_attempts(now, 3, hold),
        fx.store.claim_due_attempts(now, 3, hold)
    );
    let mut claimed: Vec<RunId> = a.unwrap().iter().chain(&b.unwrap()).map(|a| a.run_id).collect();
    claimed.sort();
    assert_eq!(claimed, runs[1..]);
    assert!(fx.store.claim_due_attempts(now, 10, hold).await.unwrap().is_empty(), "held");

    // A claim not dispatched in time is due again; a dispatched one is not.
    let again = fx.store.claim_due_attempts(hold, 10, hold.plus(Duration::from_secs(30))).await;
    let again = again.unwrap();
    assert_eq!(again.len(), 6);
    fx.store.mark_dispatched(&[(again[0].id, "m-1".to_owned())], hold).await.unwrap();
    let later = hold.plus(Duration::from_secs(60));
    let rest = fx.store.claim_due_attempts(later, 10, later.plus(Duration::from_secs(30))).await;
    let rest: Vec<AttemptId> = rest.unwrap().iter().map(|attempt| attempt.id).collect();
    assert_eq!(rest.len(), 5);
    // Released claims (the bus refused them) are due at once.
    fx.store.release_claims(&rest[..2], later).await.unwrap();
    let released = fx.store.claim_due_attempts(later, 10, later).await.unwrap();
    assert_eq!(released.iter().map(|attempt| attempt.id).collect::<Vec<_>>(), rest[..2]);
}

async fn readers_following_the_sequence_miss_no_event_of_concurrent_writers(db: TestDb) {
    let fx = fixture(db);
    let mut feed = fx.store.subscribe();
    let profile = WorkerProfile {
        agents: vec![AgentType::parse("scaffold").unwrap()],
        version: "0.1.0".into(),
        hostname: "host-1".into(),
        concurrency: 1,
        kind: "external".into(),
    };
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let (store, profile) = (fx.store.clone(), profile.clone());
            tokio::spawn(async move {
                for n in 0..10 {
                    let worker = WorkerId::new(format!("worker-{writer}-{n}"));
                    store.worker_seen(&worker, &profile, T0).await.unwrap();
                }
            })
        })
        .collect();
    let page = |after| EventQuery { run_id: None, environment_id: None, after, limit: 1000 };
    let mut followed = Vec::new();
    loop {
        let done = writers.iter().all(tokio::task::JoinHandle::is_finished);
        let after = followed.last().copied();
        let events = fx.store.list_events(&default_project(), &page(after)).await.unwrap();
        followed.extend(events.iter().map(|event| event.seq));
        if done {
            break;
        }
        tokio::task::yield_now().await;
    }
    let all: Vec<_> = fx
        .store
        .list_events(&default_project(), &page(None))
        .await
        .unwrap()
        .iter()
        .map(|event| event.seq)
        .collect();
    assert_eq!(all.len(), 80);
    assert_eq!(followed, all, "a reader following the sequence saw every event once");
    let mut live = Vec::new();
    while let Ok(event) = feed.try_recv() {
        live.push(event.seq);
    }
    assert_eq!(live, all, "subscribers got every event in sequence order");
}

async fn events_after_a_sequence_number_span_projects_in_order(db: TestDb) {
    let project = ProjectId::parse("other").unwrap();
    IdentityStore::create_project(&db.store, &project, "Other", "root", T0).await.unwrap();
    let fx = fixture(db);
    let first = new_run(&fx, "Hello World API", T0).await;
    let second = new_run_in(&fx, project, "elsewhere", T0).await;

    let all = fx.store.events_after(EventSeq(0), 100).await.unwrap();
    let runs: Vec<_> = all.iter().map(|event| event.run_id).collect();
    assert_eq!(runs, [Some(first.id), Some(first.id), Some(second.id), Some(second.id)]);
    assert!(all.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    let tail = fx.store.events_after(all[1].seq, 1).await.unwrap();
    assert_eq!(tail, all[2..3]);
}

async fn one_holder_at_a_time_has_a_lease_until_it_lapses_or_is_released(db: TestDb) {
    let fx = fixture(db);
    let store = &fx.store;
    let later = |ms: i64| Timestamp::from_millis(T0.as_millis() + ms);
    assert!(store.hold_lease("leader", "a", T0, later(3000)).await.unwrap());
    // Held: another cannot take it; its holder renews it.
    assert!(!store.hold_lease("leader", "b", later(1000), later(4000)).await.unwrap());
    assert!(store.hold_lease("leader", "a", later(2000), later(5000)).await.unwrap());
    assert!(!store.hold_lease("leader", "b", later(4000), later(7000)).await.unwrap());
    // Another name is another lease.
    assert!(store.hold_lease("sweeper", "b", later(4000), later(7000)).await.unwrap());
    // Lapsed: the next to ask takes it, and the old holder has lost it.
    assert!(store.hold_lease("leader", "b", later(5001), later(8000)).await.unwrap());
    assert!(!store.hold_lease("leader", "a", later(5002), later(8000)).await.unwrap());
    // Released by someone else: nothing; by its holder: free at once.
    store.release_lease("leader", "a").await.unwrap();
    assert!(!store.hold_lease("leader", "c", later(5003), later(8000)).await.unwrap());
    store.release_lease("leader", "b").await.unwrap();
    assert!(store.hold_lease("leader", "c", later(5004), later(8000)).await.unwrap());

    // Racing for a free lease: exactly one wins.
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store.hold_lease("race", &format!("s{n}"), T0, later(3000)).await.unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        winners += usize::from(racer.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn batches_touching_the_same_runs_in_opposite_orders_both_commit(db: TestDb) {
    let fx = fixture(db);
    let mut running = Vec::new();
    for n in 0..2 {
        let run = new_run(&fx, &format!("crossing {n}"), T0).await;
        running.push(start(&fx, &attempts(&fx, run.id).await[0], T0).await);
    }
    let renew = |attempt: &StageAttempt, n: i64| WorkerCommand::Renew {
        attempt: attempt.id,
        token: attempt.fencing_token,
        lease_until: T0.plus(Duration::from_secs(60)),
        now: Timestamp::from_millis(T0.as_millis() + n),
    };
    // Two servers renewing the same two leases, each batch in the other order, many times:
    // on PostgreSQL each would hold one row and wait for the other without an order.
    for n in 0..20 {
        let forward = vec![renew(&running[0], n), renew(&running[1], n)];
        let backward = vec![renew(&running[1], n), renew(&running[0], n)];
        let (a, b) = tokio::join!(
            fx.store.apply(forward, &fx.pipelines),
            fx.store.apply(backward, &fx.pipelines)
        );
        for outcomes in [a.unwrap(), b.unwrap()] {
            assert!(outcomes.iter().all(|o| matches!(o, CommandOutcome::Renewed(true))));
        }
    }
}

async fn a_database_migrated_by_a_newer_drover_is_refused(db: TestDb) {
    db.pretend_migrated(9999).await;
    let err = db.open_again().await.unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { database: 9999, .. }), "{err}");
    assert!(err.to_string().contains("upgrade drover"), "{err}");
}

async fn the_local_admin_is_made_once_and_is_not_a_user_that_ends_local_mode(db: TestDb) {
    use drover_domain::{Role, User, UserName};
    let store = &db.store;
    store.ensure_local_admin(T0).await.unwrap();
    store.ensure_local_admin(T0.plus(Duration::from_secs(1))).await.unwrap();
    let (local, password) = store.get_user(&UserName::local()).await.unwrap().unwrap();
    assert_eq!((local.role, local.created_at, password), (Role::Admin, T0, None));
    assert_eq!(store.count_users().await.unwrap(), 0, "the local admin ends no local mode");
    let alice = User {
        name: UserName::parse("alice").unwrap(),
        role: Role::Member,
        created_at: T0,
        disabled: false,
    };
    store.create_user(&alice, None, "local").await.unwrap();
    assert_eq!(store.count_users().await.unwrap(), 1);
    let audit = store.list_audit_entries(None, None, 100).await.unwrap();
    let made: Vec<&str> =
        audit.iter().filter(|e| e.action == "user.create").map(|e| e.target.as_str()).collect();
    assert_eq!(made.len(), 2, "made once, then alice: {made:?}");
}

backend_tests!(
    the_local_admin_is_made_once_and_is_not_a_user_that_ends_local_mode,
    creating_a_run_writes_it_queued_with_a_pending_first_attempt_and_events,
    another_projects_runs_are_invisible,
    starting_an_attempt_runs_it_and_its_run_with_a_deadline,
    a_start_with_a_stale_token_or_twice_is_rejected,
    success_commits_once_and_creates_the_next_stage,
    a_result_with_a_stale_token_is_rejected_and_writes_nothing,
    concurrent_duplicate_results_commit_exactly_once,
    the_last_stage_succeeding_finishes_the_run,
    a_retryable_failure_schedules_a_retry_that_is_not_due_before_its_backoff,
    a_deterministic_failure_fails_the_run_with_the_reason,
    cancelling_stops_active_attempts_and_cannot_happen_twice,
    runs_list_newest_first_with_a_cursor_and_a_status_filter,
    leases_expire_unless_renewed_and_a_released_attempt_gets_a_new_token,
    overdue_attempts_are_found_by_their_deadline,
    dispatch_marks_pending_attempts_and_a_requeue_puts_them_back,
    subscribers_see_committed_events_in_sequence_order,
    dispatch_context_loads_runs_and_earlier_outputs_in_batches,
    stale_dispatched_attempts_are_found_and_a_redispatch_is_recorded,
    an_exhausted_stage_waits_in_the_dead_letter_queue_and_a_redrive_runs_it_again,
    a_discarded_dead_letter_leaves_the_queue_and_its_run_failed,
    a_succeeded_attempt_cannot_be_redriven,
    workers_register_heartbeat_get_lost_and_come_back,
    a_batch_of_worker_writes_applies_in_order_with_each_one_fenced,
    a_fork_starts_both_branches_and_a_failed_branch_stops_the_other,
    data_survives_reopening_the_same_file,
    claims_are_exclusive_and_held_until_their_time,
    readers_following_the_sequence_miss_no_event_of_concurrent_writers,
    events_after_a_sequence_number_span_projects_in_order,
    a_database_migrated_by_a_newer_drover_is_refused,
    one_holder_at_a_time_has_a_lease_until_it_lapses_or_is_released,
    batches_touching_the_same_runs_in_opposite_orders_both_commit,
);
