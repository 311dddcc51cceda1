//! The store conformance suite: behaviour every [`Store`] implementation must have. Each
//! case runs against a fresh SQLite file; the PostgreSQL store will run the same cases.

use std::sync::Arc;
use std::time::Duration;

use drover_domain::{
    AttemptId, CorrelationId, EventKind, FencingToken, Outcome, PipelineCatalog, ProjectId, RunId,
    RunRequest, RunStatus, StageAttempt, StageStatus, Timestamp, WorkerId, sdlc,
};
use drover_store::{
    Completion, CompletionOutcome, EventQuery, NewRun, RunQuery, SqliteStore, SqliteStoreOptions,
    StartAttempt, StartOutcome, Store, StoreError,
};
use serde_json::json;

const T0: Timestamp = Timestamp::from_millis(1_700_000_000_000);

struct Fixture {
    store: Arc<dyn Store>,
    pipelines: PipelineCatalog,
    _dir: tempfile::TempDir,
}

async fn sqlite_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_sqlite(&dir).await;
    Fixture { store: Arc::new(store), pipelines: PipelineCatalog::builtin(), _dir: dir }
}

async fn open_sqlite(dir: &tempfile::TempDir) -> SqliteStore {
    let url = format!("sqlite://{}", dir.path().join("nested/drover.db").display());
    SqliteStore::open(&SqliteStoreOptions {
        url,
        read_connections: 4,
        busy_timeout: Duration::from_secs(5),
    })
    .await
    .expect("store opens")
}

fn default_project() -> ProjectId {
    ProjectId::default_project()
}

async fn new_run(fx: &Fixture, request: &str, now: Timestamp) -> drover_domain::Run {
    fx.store
        .create_run(
            NewRun {
                project_id: default_project(),
                pipeline: sdlc(),
                request: RunRequest::parse(request).unwrap(),
                correlation_id: CorrelationId::new(),
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

#[tokio::test]
async fn creating_a_run_writes_it_queued_with_a_pending_first_attempt_and_events() {
    let fx = sqlite_fixture().await;
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
            &EventQuery { run_id: Some(run.id), after: None, limit: 100 },
        )
        .await
        .unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["run.queued", "stage.pending"]);
    assert!(events[0].seq < events[1].seq);
}

#[tokio::test]
async fn another_projects_runs_are_invisible() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let other = ProjectId::parse("other").unwrap();

    assert!(fx.store.get_run(&other, run.id).await.unwrap().is_none());
    assert!(fx.store.list_attempts(&other, run.id).await.unwrap().is_empty());
    let listed = fx.store.list_runs(&other, &RunQuery { limit: 10, ..RunQuery::default() }).await;
    assert!(listed.unwrap().is_empty());
    let cancel = fx.store.cancel_run(&other, run.id, "no", T0).await;
    assert!(matches!(cancel, Err(StoreError::RunNotFound(_))));
}

#[tokio::test]
async fn starting_an_attempt_runs_it_and_its_run_with_a_deadline() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = &attempts(&fx, run.id).await[0];

    let started = start(&fx, first, T0).await;
    assert_eq!(started.status, StageStatus::Running);
    assert_eq!(started.deadline_at, Some(T0.plus(sdlc().stages[0].timeout)));
    let run = fx.store.get_run(&default_project(), run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.started_at, Some(T0));
}

#[tokio::test]
async fn a_start_with_a_stale_token_or_twice_is_rejected() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn success_commits_once_and_creates_the_next_stage() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;

    let CompletionOutcome::Applied { attempt, next, .. } =
        complete(&fx, &first, success(), T0).await
    else {
        panic!("not applied")
    };
    assert_eq!(attempt.status, StageStatus::Succeeded);
    assert_eq!(attempt.output, Some(json!({ "ok": true })));
    let next = next.expect("a next stage");
    assert_eq!(next.stage.as_str(), "validate");
    assert_eq!(next.status, StageStatus::Pending);

    // The same result delivered again changes nothing.
    let again = complete(&fx, &first, success(), T0).await;
    assert!(matches!(again, CompletionOutcome::Stale { .. }));
    assert_eq!(attempts(&fx, run.id).await.len(), 2);
}

#[tokio::test]
async fn a_result_with_a_stale_token_is_rejected_and_writes_nothing() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn concurrent_duplicate_results_commit_exactly_once() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn the_last_stage_succeeding_finishes_the_run() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn a_retryable_failure_schedules_a_retry_that_is_not_due_before_its_backoff() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let failure = Outcome::Failed { error: "flaky network".into(), retryable: true };

    let CompletionOutcome::Applied { attempt, next, run: after } =
        complete(&fx, &first, failure, T0).await
    else {
        panic!("not applied")
    };
    assert_eq!(attempt.status, StageStatus::Failed);
    assert_eq!(after.status, RunStatus::Running);
    let retry = next.expect("a retry");
    assert_eq!((retry.stage.as_str(), retry.attempt), ("scaffold", 2));
    assert!(retry.available_at > T0);

    assert!(fx.store.due_attempts(T0, 10).await.unwrap().is_empty());
    let due = fx.store.due_attempts(retry.available_at, 10).await.unwrap();
    assert_eq!(due.iter().map(|a| a.id).collect::<Vec<_>>(), [retry.id]);
}

#[tokio::test]
async fn a_deterministic_failure_fails_the_run_with_the_reason() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let first = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let failure = Outcome::Failed { error: "app.py:1: invalid syntax".into(), retryable: false };

    complete(&fx, &first, failure, T0).await;
    let run = fx.store.get_run(&default_project(), run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.unwrap().contains("invalid syntax"));
}

#[tokio::test]
async fn cancelling_stops_active_attempts_and_cannot_happen_twice() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn runs_list_newest_first_with_a_cursor_and_a_status_filter() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn leases_expire_unless_renewed_and_a_released_attempt_gets_a_new_token() {
    let fx = sqlite_fixture().await;
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

#[tokio::test]
async fn overdue_attempts_are_found_by_their_deadline() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let running = start(&fx, &attempts(&fx, run.id).await[0], T0).await;
    let deadline = running.deadline_at.unwrap();
    assert!(fx.store.overdue_attempts(deadline, 10).await.unwrap().is_empty());
    let overdue = fx.store.overdue_attempts(deadline.plus(Duration::from_millis(1)), 10).await;
    assert_eq!(overdue.unwrap()[0].id, running.id);
}

#[tokio::test]
async fn dispatch_marks_pending_attempts_and_a_requeue_puts_them_back() {
    let fx = sqlite_fixture().await;
    let run = new_run(&fx, "Hello World API", T0).await;
    let due = fx.store.due_attempts(T0, 10).await.unwrap();
    assert_eq!(due.len(), 1);

    fx.store.mark_dispatched(&[due[0].id, AttemptId::new()], T0).await.unwrap();
    assert_eq!(attempts(&fx, run.id).await[0].status, StageStatus::Dispatched);
    assert!(fx.store.due_attempts(T0, 10).await.unwrap().is_empty());

    assert_eq!(fx.store.requeue_dispatched(T0).await.unwrap(), 1);
    assert_eq!(attempts(&fx, run.id).await[0].status, StageStatus::Pending);
}

#[tokio::test]
async fn subscribers_see_committed_events_in_sequence_order() {
    let fx = sqlite_fixture().await;
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
            &EventQuery { run_id: Some(run.id), after: Some(first.seq), limit: 10 },
        )
        .await
        .unwrap();
    assert_eq!(after_first, vec![second]);
}

#[tokio::test]
async fn data_survives_reopening_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = {
        let store = open_sqlite(&dir).await;
        let run = store
            .create_run(
                NewRun {
                    project_id: default_project(),
                    pipeline: sdlc(),
                    request: RunRequest::parse("persist me").unwrap(),
                    correlation_id: CorrelationId::new(),
                },
                T0,
            )
            .await
            .unwrap();
        store.close().await;
        run.id
    };
    let reopened = open_sqlite(&dir).await;
    let run = reopened.get_run(&default_project(), run_id).await.unwrap().unwrap();
    assert_eq!(run.request.as_str(), "persist me");
    let counts = reopened.count_attempts_by_status().await.unwrap();
    assert_eq!(counts, vec![(StageStatus::Pending, 1)]);
}

#[tokio::test]
async fn dispatch_context_loads_runs_and_earlier_outputs_in_batches() {
    let fx = sqlite_fixture().await;
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
