//! The SQLite store: one file under the data directory, WAL journal, migrations applied on
//! open.
//!
//! SQLite allows one writer at a time, so writes go through a pool of exactly one
//! connection (no `SQLITE_BUSY` upgrades inside transactions, no lock convoys), while reads
//! use a separate pool that WAL lets run alongside the writer.

mod chat;
mod environments;
mod identities;
mod secrets;
mod webhooks;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_domain::{
    AgentType, AttemptId, CorrelationId, EnvironmentId, Event, EventKind, EventSeq, FencingToken,
    LatestAttempt, NewEvent, NextStep, Outcome, PipelineCatalog, PipelineName, PipelineSpec,
    ProjectId, Run, RunId, RunProgress, RunRequest, RunStatus, StageAttempt, StageName, StageSpec,
    StageStart, StageStatus, Timestamp, Usage, Worker, WorkerId, WorkerProfile, advance, decide,
};
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Executor, FromRow, QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::{Mutex, broadcast};

use crate::{
    ApprovalDecision, ApprovalOutcome, CancelledRun, CommandOutcome, Completion, CompletionOutcome,
    DeadLetterQuery, EventQuery, NewRun, RunQuery, StartAttempt, StartOutcome, Store, StoreError,
    StoreResult, UsageReport, WorkerCommand,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How many committed events a live subscriber may fall behind before it must catch up
/// from the database.
const EVENT_FEED_CAPACITY: usize = 4096;

/// Connection settings for [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteStoreOptions {
    /// `sqlite://PATH`.
    pub url: String,
    pub read_connections: u32,
    pub busy_timeout: Duration,
}

/// The SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one connection that writes. Held from a write transaction's start until its
    /// events are published, so subscribers receive events in sequence order; holding it
    /// (rather than taking it from a pool each time) saves a round trip per transaction.
    pub(super) writer: Arc<Mutex<SqliteConnection>>,
    pub(super) reader: SqlitePool,
    events: broadcast::Sender<Event>,
}

macro_rules! run_columns {
    () => {
        "id, project_id, pipeline, request, status, correlation_id, error, created_at, \
         updated_at, started_at, finished_at, environment_id, workspace, variables, budget, \
         pipeline_spec, submitted_by"
    };
}

macro_rules! attempt_columns {
    () => {
        "id, project_id, run_id, stage, stage_index, agent, attempt, fencing_token, status, \
         worker_id, available_at, lease_expires_at, deadline_at, output, error, created_at, \
         started_at, finished_at, bus_message_id"
    };
}

macro_rules! event_columns {
    () => {
        "seq, project_id, run_id, attempt_id, environment_id, kind, payload, correlation_id, \
         created_at"
    };
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub async fn open(options: &SqliteStoreOptions) -> StoreResult<Self> {
        let open_error = |message: String| StoreError::Open { url: options.url.clone(), message };
        let path = options
            .url
            .strip_prefix("sqlite://")
            .ok_or_else(|| open_error("expected a sqlite:// URL".to_owned()))?;
        if let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|err| open_error(format!("cannot create {}: {err}", parent.display())))?;
        }
        let connect = SqliteConnectOptions::from_str(&options.url)
            .map_err(|err| open_error(err.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let mut writer = SqliteConnection::connect_with(&connect)
            .await
            .map_err(|err| open_error(err.to_string()))?;
        migrate(&mut writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .connect_with(connect.read_only(true))
            .await
            .map_err(|err| open_error(err.to_string()))?;
        let (events, _) = broadcast::channel(EVENT_FEED_CAPACITY);
        Ok(Self { writer: Arc::new(Mutex::new(writer)), reader, events })
    }

    /// Closes the read pool and checkpoints the journal; the writer closes when the last
    /// clone of the store is dropped.
    pub async fn close(&self) {
        self.reader.close().await;
        let mut writer = self.writer.lock().await;
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut *writer).await
        {
            tracing::debug!(error = %err, "checkpoint on close failed");
        }
    }

    /// Runs one write in its own transaction on the writer, appends the events it
    /// produced, commits, then publishes them.
    async fn write_one<T>(
        &self,
        now: Timestamp,
        write: impl AsyncFnOnce(&mut SqliteConnection, &mut Vec<NewEvent>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let mut events = Vec::new();
        let value = write(&mut tx, &mut events).await?;
        let stored = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(stored);
        Ok(value)
    }

    pub(super) fn publish(&self, events: Vec<Event>) {
        for event in events {
            // No subscribers is fine: the events are in the database.
            let _ = self.events.send(event);
        }
    }
}

async fn migrate(conn: &mut SqliteConnection) -> StoreResult<()> {
    match MIGRATOR.run(conn).await {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::VersionMissing(version)) => Err(StoreError::SchemaTooNew(
            format!("database has migration {version} this binary lacks"),
        )),
        Err(err) => Err(err.into()),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_run(&self, new: NewRun, now: Timestamp) -> StoreResult<Run> {
        new.pipeline.validate().map_err(|err| {
            StoreError::Corrupt(format!("pipeline `{}`: {err}", new.pipeline.name))
        })?;
        let first = advance(&new.pipeline, &RunProgress::new());
        if first.start.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "pipeline `{}` has no stage that can start",
                new.pipeline.name
            )));
        }
        let all_gated = first.start.iter().all(|start| start.gated);
        let mut run = Run {
            id: new.id.unwrap_or_else(RunId::new),
            project_id: new.project_id,
            pipeline: new.pipeline.name.clone(),
            request: new.request,
            status: RunStatus::Queued,
            correlation_id: new.correlation_id,
            error: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            environment_id: new.environment_id,
            workspace: new.workspace,
            variables: new.variables,
            budget: new.budget,
            spec: Some(new.pipeline.clone()),
            submitted_by: new.submitted_by,
        };
        if all_gated {
            run.status = run.status.become_(RunStatus::WaitingApproval)?;
        }
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        sqlx::query(concat!(
            "INSERT INTO runs (",
            run_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(run.id.to_string())
        .bind(run.project_id.as_str())
        .bind(run.pipeline.as_str())
        .bind(run.request.as_str())
        .bind(run.status.as_str())
        .bind(run.correlation_id.to_string())
        .bind(None::<String>)
        .bind(now.as_millis())
        .bind(now.as_millis())
        .bind(None::<i64>)
        .bind(None::<i64>)
        .bind(run.environment_id.map(|id| id.to_string()))
        .bind(run.workspace.as_deref())
        .bind(if run.variables.is_empty() {
            None
        } else {
            serde_json::to_string(&run.variables).ok()
        })
        .bind(run.budget.and_then(|budget| serde_json::to_string(&budget).ok()))
        .bind(run.spec.as_ref().and_then(|spec| serde_json::to_string(spec).ok()))
        .bind(run.submitted_by.as_deref())
        .execute(&mut *tx)
        .await?;
        let mut events =
            vec![run_event(&run, json!({ "request": run.request, "pipeline": run.pipeline }))];
        let spec = &new.pipeline;
        for start in &first.start {
            let stage = spec.stage(start.index).ok_or_else(|| missing_stage(spec, start.index))?;
            let attempt = insert_stage(&mut tx, &run, start, stage, now).await?;
            events.push(attempt_event(&attempt, &run.correlation_id, json!({})));
        }
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(run)
    }

    async fn get_run(&self, project: &ProjectId, id: RunId) -> StoreResult<Option<Run>> {
        fetch_run(&self.reader, project, id).await
    }

    async fn unfinished_runs_in(
        &self,
        environments: &[EnvironmentId],
    ) -> StoreResult<Vec<(EnvironmentId, RunId)>> {
        if environments.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = QueryBuilder::<Sqlite>::new(
            "SELECT environment_id, id FROM runs WHERE status IN ('queued', 'running', 'waiting_approval') AND environment_id IN (",
        );
        let mut ids = sql.separated(", ");
        for env in environments {
            ids.push_bind(env.to_string());
        }
        sql.push(")");
        let rows: Vec<(String, String)> = sql.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter()
            .map(|(env, run)| {
                Ok((
                    env.parse().map_err(|_| corrupt("runs.environment_id", &env))?,
                    run.parse().map_err(|_| corrupt("runs.id", &run))?,
                ))
            })
            .collect()
    }

    async fn list_runs(&self, project: &ProjectId, query: &RunQuery) -> StoreResult<Vec<Run>> {
        let mut sql = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE project_id = "
        ));
        sql.push_bind(project.as_str().to_owned());
        if let Some(status) = query.status {
            sql.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before) = query.before {
            sql.push(" AND id < ").push_bind(before.to_string());
        }
        sql.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<RunRow> = sql.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter().map(Run::try_from).collect()
    }

    async fn list_attempts(
        &self,
        project: &ProjectId,
        run: RunId,
    ) -> StoreResult<Vec<StageAttempt>> {
        let rows: Vec<AttemptRow> = sqlx::query_as(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM stage_attempts WHERE project_id = ? AND run_id = ? ",
            "ORDER BY stage_index, attempt"
        ))
        .bind(project.as_str())
        .bind(run.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(StageAttempt::try_from).collect()
    }

    async fn cancel_run(
        &self,
        project: &ProjectId,
        run_id: RunId,
        reason: &str,
        now: Timestamp,
    ) -> StoreResult<CancelledRun> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let mut run =
            fetch_run(&mut *tx, project, run_id).await?.ok_or(StoreError::RunNotFound(run_id))?;
        if run.status.is_terminal() {
            return Err(StoreError::RunAlreadyFinished { id: run.id, status: run.status });
        }
        run.status = run.status.become_(RunStatus::Cancelled)?;
        run.error = Some(reason.to_owned());
        run.updated_at = now;
        run.finished_at = Some(now);
        update_run(&mut tx, &run).await?;
        let mut events = vec![run_event(&run, json!({ "reason": reason }))];
        let stopped = stop_active(&mut tx, &run, reason, now, &mut events).await?;
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(CancelledRun { run, stopped_attempts: stopped })
    }

    async fn decide_approval(
        &self,
        project: &ProjectId,
        run_id: RunId,
        stage: &StageName,
        decision: &ApprovalDecision,
        now: Timestamp,
    ) -> StoreResult<ApprovalOutcome> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let mut run =
            fetch_run(&mut *tx, project, run_id).await?.ok_or(StoreError::RunNotFound(run_id))?;
        if run.status.is_terminal() {
            return Err(StoreError::RunAlreadyFinished { id: run.id, status: run.status });
        }
        let latest: Option<AttemptRow> = sqlx::query_as(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM stage_attempts WHERE run_id = ? AND stage = ? ORDER BY attempt DESC LIMIT 1"
        ))
        .bind(run.id.to_string())
        .bind(stage.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let mut attempt = match latest.map(StageAttempt::try_from).transpose()? {
            Some(attempt) if attempt.status == StageStatus::WaitingApproval => attempt,
            other => {
                let state = match other {
                    Some(attempt) => format!("it is {}", attempt.status),
                    None if run.spec.as_ref().is_none_or(|p| p.index_of(stage).is_some()) => {
                        "it has not been reached".to_owned()
                    }
                    None => "the run's pipeline has no such stage".to_owned(),
                };
                return Err(StoreError::NotWaitingApproval {
                    run: run.id,
                    stage: stage.to_string(),
                    state,
                });
            }
        };
        let mut events = Vec::new();
        let mut stopped = Vec::new();
        let why = decision.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
        if decision.approve {
            attempt.status = attempt.status.become_(StageStatus::Pending)?;
            attempt.available_at = now;
            update_attempt(&mut tx, &attempt).await?;
            events.push(attempt_event(
                &attempt,
                &run.correlation_id,
                json!({ "approved_by": decision.by, "reason": decision.reason }),
            ));
            settle_run_status(&mut tx, &mut run, now, &mut events).await?;
        } else {
            let error = format!("rejected by {}{why}", decision.by);
            attempt.status = attempt.status.become_(StageStatus::Failed)?;
            attempt.error = Some(error.clone());
            attempt.finished_at = Some(now);
            update_attempt(&mut tx, &attempt).await?;
            events.push(attempt_event(
                &attempt,
                &run.correlation_id,
                json!({ "rejected_by": decision.by, "error": error }),
            ));
            let run_error = format!("stage `{stage}` was {error}");
            run.status = run.status.become_(RunStatus::Failed)?;
            run.error = Some(run_error.clone());
            run.updated_at = now;
            run.finished_at = Some(now);
            update_run(&mut tx, &run).await?;
            events.push(run_event(&run, json!({ "error": run_error })));
            stopped = stop_active(&mut tx, &run, &run_error, now, &mut events).await?;
        }
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(ApprovalOutcome { run, attempt, stopped })
    }

    async fn usage_report(
        &self,
        project: &ProjectId,
        since: Timestamp,
    ) -> StoreResult<UsageReport> {
        let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT a.run_id, a.stage, r.submitted_by, a.output FROM stage_attempts a \
             JOIN runs r ON r.id = a.run_id \
             WHERE r.project_id = ? AND r.created_at >= ? AND a.output IS NOT NULL",
        )
        .bind(project.as_str())
        .bind(since.as_millis())
        .fetch_all(&self.reader)
        .await?;
        let mut by_stage = std::collections::BTreeMap::<String, Usage>::new();
        let mut by_run = std::collections::BTreeMap::<RunId, Usage>::new();
        let mut by_user = std::collections::BTreeMap::<String, Usage>::new();
        let mut total = Usage::default();
        for (run, stage, user, output) in rows {
            let Ok(output) = serde_json::from_str::<serde_json::Value>(&output) else { continue };
            let usage = Usage::reported_in(&output);
            if usage == Usage::default() {
                continue;
            }
            let run: RunId = run.parse().map_err(|_| corrupt("stage_attempts.run_id", &run))?;
            let user = user.unwrap_or_else(|| "local".to_owned());
            total = total.plus(usage);
            let add = |slot: &mut Usage| *slot = slot.plus(usage);
            add(by_stage.entry(stage).or_default());
            add(by_run.entry(run).or_default());
            add(by_user.entry(user).or_default());
        }
        Ok(UsageReport {
            total,
            by_stage: by_stage.into_iter().collect(),
            by_run: by_run.into_iter().collect(),
            by_user: by_user.into_iter().collect(),
        })
    }

    async fn list_events(
        &self,
        project: &ProjectId,
        query: &EventQuery,
    ) -> StoreResult<Vec<Event>> {
        let mut sql = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE project_id = "
        ));
        sql.push_bind(project.as_str().to_owned());
        if let Some(run) = query.run_id {
            sql.push(" AND run_id = ").push_bind(run.to_string());
        }
        if let Some(environment) = query.environment_id {
            sql.push(" AND environment_id = ").push_bind(environment.to_string());
        }
        if let Some(after) = query.after {
            sql.push(" AND seq > ").push_bind(after.0);
        }
        sql.push(" ORDER BY seq LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<EventRow> = sql.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter().map(Event::try_from).collect()
    }

    async fn events_after(&self, after: EventSeq, limit: u32) -> StoreResult<Vec<Event>> {
        let rows: Vec<EventRow> = sqlx::query_as(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(after.0)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(Event::try_from).collect()
    }

    async fn latest_event_seq(&self, project: &ProjectId) -> StoreResult<EventSeq> {
        let (seq,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(seq) FROM events WHERE project_id = ?")
                .bind(project.as_str())
                .fetch_one(&self.reader)
                .await?;
        Ok(EventSeq(seq.unwrap_or(0)))
    }

    async fn prune_events(&self, before: Timestamp) -> StoreResult<u64> {
        let mut conn = self.writer.lock().await;
        let deleted = sqlx::query("DELETE FROM events WHERE created_at < ?")
            .bind(before.as_millis())
            .execute(&mut *conn)
            .await?;
        Ok(deleted.rows_affected())
    }

    async fn attempt_by_id(&self, id: AttemptId) -> StoreResult<Option<StageAttempt>> {
        fetch_attempt(&self.reader, id).await
    }

    async fn due_attempts(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &self.reader,
            concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM stage_attempts WHERE status = 'pending' AND available_at <= ? ORDER BY available_at LIMIT ?"
            ),
            now,
            limit,
        )
        .await
    }

    async fn runs_by_ids(&self, ids: &[RunId]) -> StoreResult<Vec<Run>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE id IN ("
        ));
        let mut list = sql.separated(", ");
        for id in ids {
            list.push_bind(id.to_string());
        }
        sql.push(")");
        let rows: Vec<RunRow> = sql.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter().map(Run::try_from).collect()
    }

    async fn succeeded_outputs(
        &self,
        runs: &[RunId],
    ) -> StoreResult<Vec<(RunId, StageName, serde_json::Value)>> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = QueryBuilder::<Sqlite>::new(
            "SELECT run_id, stage, output FROM stage_attempts \
             WHERE status = 'succeeded' AND output IS NOT NULL AND run_id IN (",
        );
        let mut list = sql.separated(", ");
        for id in runs {
            list.push_bind(id.to_string());
        }
        sql.push(") ORDER BY stage_index");
        let rows: Vec<(String, String, String)> =
            sql.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter()
            .map(|(run, stage, output)| {
                Ok((
                    run.parse().map_err(|e| corrupt("stage_attempts.run_id", e))?,
                    StageName::parse(stage).map_err(|e| corrupt("stage_attempts.stage", e))?,
                    serde_json::from_str(&output)
                        .map_err(|e| corrupt("stage_attempts.output", e))?,
                ))
            })
            .collect()
    }

    async fn mark_dispatched(
        &self,
        attempts: &[(AttemptId, String)],
        now: Timestamp,
    ) -> StoreResult<()> {
        if attempts.is_empty() {
            return Ok(());
        }
        // One statement for the batch: each attempt gets its own message id via CASE.
        let mut sql = QueryBuilder::<Sqlite>::new(
            "UPDATE stage_attempts SET status = 'dispatched', dispatched_at = ",
        );
        sql.push_bind(now.as_millis()).push(", bus_message_id = CASE id");
        for (id, message_id) in attempts {
            sql.push(" WHEN ")
                .push_bind(id.to_string())
                .push(" THEN ")
                .push_bind(message_id.clone());
        }
        sql.push(" END WHERE status = 'pending' AND id IN (");
        let mut ids = sql.separated(", ");
        for (id, _) in attempts {
            ids.push_bind(id.to_string());
        }
        sql.push(") RETURNING ").push(attempt_columns!());
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        // Already started (the worker was quicker than this commit) or cancelled ones
        // are left alone by the WHERE clause.
        let rows: Vec<AttemptRow> = sql.build_query_as().fetch_all(&mut *tx).await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let attempt = StageAttempt::try_from(row)?;
            events.push(NewEvent {
                project_id: attempt.project_id.clone(),
                run_id: Some(attempt.run_id),
                attempt_id: Some(attempt.id),
                environment_id: None,
                kind: EventKind::Stage(StageStatus::Dispatched),
                payload: attempt_payload(&attempt, json!({})),
                correlation_id: None,
            });
        }
        // RETURNING gives no order; keep the events in dispatch order.
        let order: std::collections::HashMap<AttemptId, usize> =
            attempts.iter().enumerate().map(|(n, (id, _))| (*id, n)).collect();
        events.sort_by_key(|event| event.attempt_id.and_then(|id| order.get(&id).copied()));
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(())
    }

    async fn stale_dispatched(
        &self,
        dispatched_before: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &self.reader,
            concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM stage_attempts WHERE status = 'dispatched' AND dispatched_at < ? ",
                "ORDER BY dispatched_at LIMIT ?"
            ),
            dispatched_before,
            limit,
        )
        .await
    }

    async fn record_redispatch(
        &self,
        attempt: AttemptId,
        message_id: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE stage_attempts SET bus_message_id = ?, dispatched_at = ? \
             WHERE id = ? AND status = 'dispatched'",
        )
        .bind(message_id)
        .bind(now.as_millis())
        .bind(attempt.to_string())
        .execute(&mut *self.writer.lock().await)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_dead_letters(
        &self,
        project: &ProjectId,
        query: &DeadLetterQuery,
    ) -> StoreResult<Vec<StageAttempt>> {
        let mut sql = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM stage_attempts WHERE status = 'dead_lettered' AND dlq_resolution IS NULL ",
            "AND project_id = "
        ));
        sql.push_bind(project.as_str().to_owned());
        if let Some(before) = query.before {
            sql.push(" AND id < ").push_bind(before.to_string());
        }
        sql.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<AttemptRow> = sql.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter().map(StageAttempt::try_from).collect()
    }

    async fn redrive_dead_letter(
        &self,
        project: &ProjectId,
        attempt_id: AttemptId,
        pipelines: &PipelineCatalog,
        now: Timestamp,
    ) -> StoreResult<StageAttempt> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let letter = dead_letter(&mut tx, project, attempt_id).await?;
        let mut run = fetch_run(&mut *tx, project, letter.run_id)
            .await?
            .ok_or(StoreError::RunNotFound(letter.run_id))?;
        let pipeline = pipeline_of(&run, pipelines)?.into_owned();
        let spec = pipeline
            .stage(letter.stage_index)
            .ok_or_else(|| missing_stage(&pipeline, letter.stage_index))?;
        run.status = run.status.redrive()?;
        run.error = None;
        run.finished_at = None;
        run.updated_at = now;
        update_run(&mut tx, &run).await?;
        set_dlq_resolution(&mut tx, attempt_id, "redriven").await?;
        let retry =
            insert_attempt(&mut tx, &run, letter.stage_index, spec, letter.attempt + 1, now, now)
                .await?;
        let events = vec![
            dlq_event(&letter, EventKind::DlqRedriven, json!({ "new_attempt_id": retry.id })),
            run_event(&run, json!({ "reason": "dead letter redriven" })),
            attempt_event(&retry, &run.correlation_id, json!({ "redrive_of": letter.id })),
        ];
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(retry)
    }

    async fn discard_dead_letter(
        &self,
        project: &ProjectId,
        attempt_id: AttemptId,
        now: Timestamp,
    ) -> StoreResult<StageAttempt> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let letter = dead_letter(&mut tx, project, attempt_id).await?;
        set_dlq_resolution(&mut tx, attempt_id, "discarded").await?;
        let events = vec![dlq_event(&letter, EventKind::DlqDiscarded, json!({}))];
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(letter)
    }

    async fn worker_seen(
        &self,
        worker: &WorkerId,
        profile: &WorkerProfile,
        now: Timestamp,
    ) -> StoreResult<()> {
        self.write_one(now, async |tx, events| seen_in(tx, worker, profile, now, events).await)
            .await
    }

    async fn worker_gone(&self, worker: &WorkerId, now: Timestamp) -> StoreResult<()> {
        self.write_one(now, async |tx, events| gone_in(tx, worker, now, events).await).await
    }

    async fn mark_lost_workers(&self, silent_since: Timestamp, now: Timestamp) -> StoreResult<u64> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let lost: Vec<(String,)> = sqlx::query_as(
            "UPDATE workers SET status = 'lost' WHERE status = 'live' AND last_seen_at < ? \
             RETURNING id",
        )
        .bind(silent_since.as_millis())
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<NewEvent> = lost
            .iter()
            .map(|(id,)| worker_event(&WorkerId::new(id.clone()), EventKind::WorkerLost, json!({})))
            .collect();
        let count = events.len() as u64;
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(count)
    }

    async fn list_workers(&self) -> StoreResult<Vec<Worker>> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT id, agents, version, hostname, concurrency, kind, status, registered_at, \
             last_seen_at FROM workers \
             ORDER BY CASE status WHEN 'live' THEN 0 ELSE 1 END, last_seen_at DESC",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(Worker::try_from).collect()
    }

    async fn requeue_dispatched(&self, now: Timestamp) -> StoreResult<u64> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let rows: Vec<AttemptRow> = sqlx::query_as(concat!(
            "UPDATE stage_attempts SET status = 'pending', dispatched_at = NULL ",
            "WHERE status = 'dispatched' RETURNING ",
            attempt_columns!()
        ))
        .fetch_all(&mut *tx)
        .await?;
        let count = rows.len() as u64;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let attempt = StageAttempt::try_from(row)?;
            events.push(NewEvent {
                project_id: attempt.project_id.clone(),
                run_id: Some(attempt.run_id),
                attempt_id: Some(attempt.id),
                environment_id: None,
                kind: EventKind::Stage(StageStatus::Pending),
                payload: attempt_payload(
                    &attempt,
                    json!({ "reason": "requeued: the bus lost it" }),
                ),
                correlation_id: None,
            });
        }
        let events = append_events(&mut tx, events, now).await?;
        tx.commit().await?;
        self.publish(events);
        Ok(count)
    }

    async fn start_attempt(
        &self,
        start: StartAttempt,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<StartOutcome> {
        let now = start.now;
        self.write_one(now, async |tx, events| start_in(tx, &start, pipelines, events).await).await
    }

    async fn renew_lease(
        &self,
        attempt: AttemptId,
        token: FencingToken,
        lease_until: Timestamp,
    ) -> StoreResult<bool> {
        renew_in(&mut *self.writer.lock().await, attempt, token, lease_until).await
    }

    async fn release_attempt(
        &self,
        attempt_id: AttemptId,
        token: FencingToken,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.write_one(now, async |tx, events| release_in(tx, attempt_id, token, now, events).await)
            .await
    }

    async fn complete_attempt(
        &self,
        completion: Completion,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<CompletionOutcome> {
        let now = completion.now;
        self.write_one(now, async |tx, events| {
            complete_in(tx, &completion, pipelines, events).await
        })
        .await
    }

    async fn apply(
        &self,
        commands: Vec<WorkerCommand>,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<Vec<CommandOutcome>> {
        let mut conn = self.writer.lock().await;
        let mut tx = conn.begin().await?;
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut events = Vec::new();
        let mut latest = Timestamp::from_millis(0);
        for command in commands {
            let (outcome, now) = match command {
                WorkerCommand::Start(start) => {
                    let outcome = start_in(&mut tx, &start, pipelines, &mut events).await?;
                    (CommandOutcome::Started(outcome), start.now)
                }
                WorkerCommand::Renew { attempt, token, lease_until, now } => (
                    CommandOutcome::Renewed(renew_in(&mut tx, attempt, token, lease_until).await?),
                    now,
                ),
                WorkerCommand::Complete(completion) => {
                    let outcome = complete_in(&mut tx, &completion, pipelines, &mut events).await?;
                    (CommandOutcome::Completed(outcome), completion.now)
                }
                WorkerCommand::Release { attempt, token, now } => (
                    CommandOutcome::Released(
                        release_in(&mut tx, attempt, token, now, &mut events).await?,
                    ),
                    now,
                ),
                WorkerCommand::Seen { worker, profile, now } => {
                    seen_in(&mut tx, &worker, &profile, now, &mut events).await?;
                    (CommandOutcome::Recorded, now)
                }
                WorkerCommand::Gone { worker, now } => {
                    gone_in(&mut tx, &worker, now, &mut events).await?;
                    (CommandOutcome::Recorded, now)
                }
            };
            latest = latest.max(now);
            outcomes.push(outcome);
        }
        // One insert for the whole batch's events, in command order.
        let stored = append_events(&mut tx, events, latest).await?;
        tx.commit().await?;
        self.publish(stored);
        Ok(outcomes)
    }

    async fn expired_leases(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &self.reader,
            concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM stage_attempts WHERE status = 'running' AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT ?"
            ),
            now,
            limit,
        )
        .await
    }

    async fn overdue_attempts(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &self.reader,
            concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM stage_attempts WHERE status = 'running' AND deadline_at < ? ORDER BY deadline_at LIMIT ?"
            ),
            now,
            limit,
        )
        .await
    }

    async fn count_attempts_by_status(&self) -> StoreResult<Vec<(StageStatus, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM stage_attempts GROUP BY status")
                .fetch_all(&self.reader)
                .await?;
        rows.into_iter()
            .map(|(status, count)| {
                let status = status.parse().map_err(|e| corrupt("stage_attempts.status", e))?;
                Ok((status, u64::try_from(count).unwrap_or(0)))
            })
            .collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// Starts an attempt for a worker if its token is current and it is still waiting.
async fn start_in(
    tx: &mut SqliteConnection,
    start: &StartAttempt,
    pipelines: &PipelineCatalog,
    events: &mut Vec<NewEvent>,
) -> StoreResult<StartOutcome> {
    let Some(mut attempt) = fetch_attempt(&mut *tx, start.attempt_id).await? else {
        return Ok(StartOutcome::Rejected { reason: "no such attempt".to_owned() });
    };
    if attempt.fencing_token != start.token {
        return Ok(StartOutcome::Rejected {
            reason: format!(
                "stale fencing token {} (current {})",
                start.token, attempt.fencing_token
            ),
        });
    }
    if !matches!(attempt.status, StageStatus::Pending | StageStatus::Dispatched) {
        return Ok(StartOutcome::Rejected { reason: format!("attempt is {}", attempt.status) });
    }
    let mut run = fetch_run(&mut *tx, &attempt.project_id, attempt.run_id)
        .await?
        .ok_or(StoreError::RunNotFound(attempt.run_id))?;
    let timeout = pipeline_of(&run, pipelines)
        .ok()
        .and_then(|p| p.stage(attempt.stage_index).map(|spec| spec.timeout))
        .unwrap_or(Duration::from_secs(3600));

    attempt.status = attempt.status.become_(StageStatus::Running)?;
    attempt.worker_id = Some(start.worker_id.clone());
    attempt.started_at = Some(start.now);
    attempt.lease_expires_at = Some(start.lease_until);
    attempt.deadline_at = Some(start.now.plus(timeout));
    update_attempt(tx, &attempt).await?;
    if run.status == RunStatus::Queued {
        run.status = run.status.become_(RunStatus::Running)?;
        run.started_at = Some(start.now);
        run.updated_at = start.now;
        update_run(tx, &run).await?;
        events.push(run_event(&run, json!({})));
    }
    events.push(attempt_event_in(
        &attempt,
        &run.correlation_id,
        run.environment_id,
        json!({ "worker_id": start.worker_id }),
    ));
    Ok(StartOutcome::Started(attempt))
}

/// Extends a running attempt's lease if the token is current.
async fn renew_in(
    tx: &mut SqliteConnection,
    attempt: AttemptId,
    token: FencingToken,
    lease_until: Timestamp,
) -> StoreResult<bool> {
    let result = sqlx::query(
        "UPDATE stage_attempts SET lease_expires_at = ? \
         WHERE id = ? AND fencing_token = ? AND status = 'running'",
    )
    .bind(lease_until.as_millis())
    .bind(attempt.to_string())
    .bind(token.0)
    .execute(tx)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Hands a running attempt back: pending again, with a new fencing token.
async fn release_in(
    tx: &mut SqliteConnection,
    attempt_id: AttemptId,
    token: FencingToken,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<bool> {
    let Some(mut attempt) = fetch_attempt(&mut *tx, attempt_id).await? else {
        return Ok(false);
    };
    if attempt.fencing_token != token || attempt.status != StageStatus::Running {
        return Ok(false);
    }
    attempt.status = attempt.status.become_(StageStatus::Pending)?;
    attempt.fencing_token = attempt.fencing_token.next();
    attempt.worker_id = None;
    attempt.lease_expires_at = None;
    attempt.deadline_at = None;
    attempt.started_at = None;
    attempt.available_at = now;
    update_attempt(tx, &attempt).await?;
    events.push(NewEvent {
        project_id: attempt.project_id.clone(),
        run_id: Some(attempt.run_id),
        attempt_id: Some(attempt.id),
        environment_id: None,
        kind: EventKind::Stage(StageStatus::Pending),
        payload: attempt_payload(&attempt, json!({ "reason": "handed back by its worker" })),
        correlation_id: None,
    });
    Ok(true)
}

/// Commits the end of an attempt, fenced by its token, and everything it causes.
async fn complete_in(
    tx: &mut SqliteConnection,
    completion: &Completion,
    pipelines: &PipelineCatalog,
    events: &mut Vec<NewEvent>,
) -> StoreResult<CompletionOutcome> {
    let now = completion.now;
    let Some(mut attempt) = fetch_attempt(&mut *tx, completion.attempt_id).await? else {
        return Ok(CompletionOutcome::Stale { reason: "no such attempt".to_owned() });
    };
    if attempt.fencing_token != completion.token {
        return Ok(CompletionOutcome::Stale {
            reason: format!(
                "stale fencing token {} (current {})",
                completion.token, attempt.fencing_token
            ),
        });
    }
    if attempt.status != StageStatus::Running {
        return Ok(CompletionOutcome::Stale { reason: format!("attempt is {}", attempt.status) });
    }
    let mut run = fetch_run(&mut *tx, &attempt.project_id, attempt.run_id)
        .await?
        .ok_or(StoreError::RunNotFound(attempt.run_id))?;
    let pipeline = pipeline_of(&run, pipelines)?;
    let progress = progress_of(&mut *tx, run.id).await?;
    let mut decision =
        decide(&pipeline, &attempt, &completion.outcome, &progress, completion.jitter, now);
    // A run with a budget stops once its stages together spent past it (the attempt that
    // crossed it still counts as done).
    if let (Some(budget), Outcome::Succeeded { output }) = (run.budget, &completion.outcome)
        && !matches!(decision.next, NextStep::FinishRun { status: RunStatus::Failed, .. })
    {
        let earlier: Vec<(String,)> = sqlx::query_as(
            "SELECT output FROM stage_attempts WHERE run_id = ? AND id != ? AND output IS NOT NULL",
        )
        .bind(run.id.to_string())
        .bind(attempt.id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let spent = earlier
            .iter()
            .filter_map(|(json,)| serde_json::from_str(json).ok())
            .map(|output| Usage::reported_in(&output))
            .fold(Usage::reported_in(output), Usage::plus);
        if let Some(reason) = budget.exceeded_by(&spent) {
            decision.skip.clear();
            decision.next = NextStep::FinishRun { status: RunStatus::Failed, error: Some(reason) };
        }
    }

    attempt.status = attempt.status.become_(decision.attempt_status)?;
    attempt.error = decision.attempt_error.clone();
    attempt.finished_at = Some(now);
    attempt.lease_expires_at = None;
    if let Outcome::Succeeded { output } = &completion.outcome {
        attempt.output = Some(output.clone());
    }
    update_attempt(tx, &attempt).await?;
    let detail = match &completion.outcome {
        Outcome::Succeeded { output } => json!({ "output": output }),
        _ => json!({ "error": attempt.error }),
    };
    events.push(attempt_event_in(&attempt, &run.correlation_id, run.environment_id, detail));

    for skipped in &decision.skip {
        let spec =
            pipeline.stage(skipped.index).ok_or_else(|| missing_stage(&pipeline, skipped.index))?;
        let mut record = insert_attempt(tx, &run, skipped.index, spec, 1, now, now).await?;
        record.status = record.status.become_(StageStatus::Skipped)?;
        record.output = Some(json!({ "skipped": skipped.reason }));
        record.finished_at = Some(now);
        update_attempt(tx, &record).await?;
        events.push(attempt_event(
            &record,
            &run.correlation_id,
            json!({ "reason": skipped.reason }),
        ));
    }

    let mut next = Vec::new();
    let mut stopped = Vec::new();
    match decision.next {
        NextStep::Stages { start } => {
            for start in &start {
                let spec = pipeline
                    .stage(start.index)
                    .ok_or_else(|| missing_stage(&pipeline, start.index))?;
                let created = insert_stage(tx, &run, start, spec, now).await?;
                events.push(attempt_event(&created, &run.correlation_id, json!({})));
                next.push(created);
            }
            settle_run_status(tx, &mut run, now, events).await?;
        }
        NextStep::Retry { attempt: number, available_at } => {
            let index = attempt.stage_index;
            let spec = pipeline.stage(index).ok_or_else(|| missing_stage(&pipeline, index))?;
            let created = insert_attempt(tx, &run, index, spec, number, available_at, now).await?;
            events.push(attempt_event(
                &created,
                &run.correlation_id,
                json!({ "retry_of": attempt.id, "available_at": available_at }),
            ));
            next.push(created);
        }
        NextStep::FinishRun { status, error } => {
            run.status = run.status.become_(status)?;
            run.error.clone_from(&error);
            run.updated_at = now;
            run.finished_at = Some(now);
            update_run(tx, &run).await?;
            events.push(run_event(&run, json!({ "error": error })));
            if status == RunStatus::Failed {
                let reason =
                    format!("run failed: {}", error.as_deref().unwrap_or("a stage failed"));
                stopped = stop_active(tx, &run, &reason, now, events).await?;
            }
        }
    }
    Ok(CompletionOutcome::Applied { attempt, run, next, stopped })
}

/// The pipeline a run follows: its snapshot, or (for runs stored before snapshots) the
/// server's pipeline of that name.
fn pipeline_of<'a>(
    run: &'a Run,
    pipelines: &'a PipelineCatalog,
) -> StoreResult<std::borrow::Cow<'a, PipelineSpec>> {
    match &run.spec {
        Some(spec) => Ok(std::borrow::Cow::Borrowed(spec)),
        None => {
            pipelines.get(run.pipeline.as_str()).map(std::borrow::Cow::Borrowed).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "run {} follows pipeline `{}`, which this server does not know",
                    run.id, run.pipeline
                ))
            })
        }
    }
}

fn missing_stage(pipeline: &PipelineSpec, index: u32) -> StoreError {
    StoreError::Corrupt(format!("pipeline `{}` has no stage {index}", pipeline.name))
}

/// The latest attempt of each stage of a run.
async fn progress_of(conn: &mut SqliteConnection, run: RunId) -> StoreResult<RunProgress> {
    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT stage_index, status, output FROM stage_attempts WHERE run_id = ? \
         ORDER BY stage_index, attempt, created_at",
    )
    .bind(run.to_string())
    .fetch_all(conn)
    .await?;
    let mut progress = RunProgress::new();
    for (index, status, output) in rows {
        let index = u32::try_from(index).map_err(|e| corrupt("stage_attempts.stage_index", e))?;
        let status = status.parse().map_err(|e| corrupt("stage_attempts.status", e))?;
        let output = output.and_then(|json| serde_json::from_str(&json).ok());
        progress.insert(index, LatestAttempt { status, output });
    }
    Ok(progress)
}

/// Creates the first attempt of a stage that became due: `pending`, or
/// `waiting_approval` when it is gated.
async fn insert_stage(
    conn: &mut SqliteConnection,
    run: &Run,
    start: &StageStart,
    spec: &StageSpec,
    now: Timestamp,
) -> StoreResult<StageAttempt> {
    let mut attempt = insert_attempt(conn, run, start.index, spec, 1, now, now).await?;
    if start.gated {
        attempt.status = StageStatus::WaitingApproval;
        update_attempt(conn, &attempt).await?;
    }
    Ok(attempt)
}

/// A run with work in flight is `running`; one whose only open stages wait for approval
/// is `waiting_approval`.
async fn settle_run_status(
    conn: &mut SqliteConnection,
    run: &mut Run,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let (active, gated): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(status IN ('pending', 'dispatched', 'running')), 0), \
                COALESCE(SUM(status = 'waiting_approval'), 0) \
         FROM stage_attempts WHERE run_id = ?",
    )
    .bind(run.id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    let wanted = if active == 0 && gated > 0 {
        RunStatus::WaitingApproval
    } else if run.status == RunStatus::WaitingApproval && active > 0 {
        RunStatus::Running
    } else {
        return Ok(());
    };
    if run.status != wanted {
        run.status = run.status.become_(wanted)?;
        run.updated_at = now;
        update_run(conn, run).await?;
        events.push(run_event(run, json!({})));
    }
    Ok(())
}

/// Cancels every attempt of `run` still active or waiting for approval.
async fn stop_active(
    conn: &mut SqliteConnection,
    run: &Run,
    reason: &str,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<Vec<StageAttempt>> {
    let active: Vec<AttemptRow> = sqlx::query_as(concat!(
        "SELECT ",
        attempt_columns!(),
        " FROM stage_attempts WHERE run_id = ? ",
        "AND status IN ('pending', 'dispatched', 'running', 'waiting_approval')"
    ))
    .bind(run.id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let mut stopped = Vec::with_capacity(active.len());
    for row in active {
        let mut attempt = StageAttempt::try_from(row)?;
        attempt.status = attempt.status.become_(StageStatus::Cancelled)?;
        attempt.error = Some(reason.to_owned());
        attempt.finished_at = Some(now);
        attempt.lease_expires_at = None;
        update_attempt(conn, &attempt).await?;
        events.push(attempt_event(&attempt, &run.correlation_id, json!({ "reason": reason })));
        stopped.push(attempt);
    }
    Ok(stopped)
}

/// Records a worker's heartbeat, registering it or bringing it back to `live`.
async fn seen_in(
    tx: &mut SqliteConnection,
    worker: &WorkerId,
    profile: &WorkerProfile,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let agents = serde_json::to_string(&profile.agents).unwrap_or_else(|_| "[]".to_owned());
    // The common case, a heartbeat of a live worker, is one statement and no event.
    let refreshed = sqlx::query(
        "UPDATE workers SET last_seen_at = ?, agents = ?, version = ?, hostname = ?, \
         concurrency = ?, kind = ? WHERE id = ? AND status = 'live'",
    )
    .bind(now.as_millis())
    .bind(&agents)
    .bind(&profile.version)
    .bind(&profile.hostname)
    .bind(i64::from(profile.concurrency))
    .bind(&profile.kind)
    .bind(worker.as_str())
    .execute(&mut *tx)
    .await?;
    if refreshed.rows_affected() == 1 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO workers (id, agents, version, hostname, concurrency, kind, status, \
         registered_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, 'live', ?, ?) \
         ON CONFLICT (id) DO UPDATE SET agents = excluded.agents, version = excluded.version, \
         hostname = excluded.hostname, concurrency = excluded.concurrency, \
         kind = excluded.kind, status = 'live', last_seen_at = excluded.last_seen_at",
    )
    .bind(worker.as_str())
    .bind(&agents)
    .bind(&profile.version)
    .bind(&profile.hostname)
    .bind(i64::from(profile.concurrency))
    .bind(&profile.kind)
    .bind(now.as_millis())
    .bind(now.as_millis())
    .execute(&mut *tx)
    .await?;
    events.push(worker_event(worker, EventKind::WorkerJoined, json!({ "profile": profile })));
    Ok(())
}

/// Records that a worker left for good.
async fn gone_in(
    tx: &mut SqliteConnection,
    worker: &WorkerId,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let updated = sqlx::query(
        "UPDATE workers SET status = 'gone', last_seen_at = ? WHERE id = ? AND status <> 'gone'",
    )
    .bind(now.as_millis())
    .bind(worker.as_str())
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 1 {
        events.push(worker_event(worker, EventKind::WorkerLeft, json!({})));
    }
    Ok(())
}

async fn fetch_run<'c>(
    executor: impl Executor<'c, Database = Sqlite>,
    project: &ProjectId,
    id: RunId,
) -> StoreResult<Option<Run>> {
    let row: Option<RunRow> = sqlx::query_as(concat!(
        "SELECT ",
        run_columns!(),
        " FROM runs WHERE project_id = ? AND id = ?"
    ))
    .bind(project.as_str())
    .bind(id.to_string())
    .fetch_optional(executor)
    .await?;
    row.map(Run::try_from).transpose()
}

/// The engine's scans: attempts whose time (`?` #1) has come, oldest first, at most `?` #2.
/// They read through the writer so they see the engine's own latest writes.
async fn scan_attempts(
    pool: &SqlitePool,
    sql: &'static str,
    now: Timestamp,
    limit: u32,
) -> StoreResult<Vec<StageAttempt>> {
    let rows: Vec<AttemptRow> =
        sqlx::query_as(sql).bind(now.as_millis()).bind(i64::from(limit)).fetch_all(pool).await?;
    rows.into_iter().map(StageAttempt::try_from).collect()
}

async fn fetch_attempt<'c>(
    executor: impl Executor<'c, Database = Sqlite>,
    id: AttemptId,
) -> StoreResult<Option<StageAttempt>> {
    let row: Option<AttemptRow> =
        sqlx::query_as(concat!("SELECT ", attempt_columns!(), " FROM stage_attempts WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(executor)
            .await?;
    row.map(StageAttempt::try_from).transpose()
}

async fn update_run(conn: &mut SqliteConnection, run: &Run) -> StoreResult<()> {
    sqlx::query(
        "UPDATE runs SET status = ?, error = ?, updated_at = ?, started_at = ?, finished_at = ? \
         WHERE id = ?",
    )
    .bind(run.status.as_str())
    .bind(run.error.as_deref())
    .bind(run.updated_at.as_millis())
    .bind(run.started_at.map(Timestamp::as_millis))
    .bind(run.finished_at.map(Timestamp::as_millis))
    .bind(run.id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

async fn update_attempt(conn: &mut SqliteConnection, attempt: &StageAttempt) -> StoreResult<()> {
    sqlx::query(
        "UPDATE stage_attempts SET status = ?, fencing_token = ?, worker_id = ?, \
         available_at = ?, lease_expires_at = ?, deadline_at = ?, output = ?, error = ?, \
         started_at = ?, finished_at = ? WHERE id = ?",
    )
    .bind(attempt.status.as_str())
    .bind(attempt.fencing_token.0)
    .bind(attempt.worker_id.as_ref().map(WorkerId::as_str))
    .bind(attempt.available_at.as_millis())
    .bind(attempt.lease_expires_at.map(Timestamp::as_millis))
    .bind(attempt.deadline_at.map(Timestamp::as_millis))
    .bind(attempt.output.as_ref().map(serde_json::Value::to_string))
    .bind(attempt.error.as_deref())
    .bind(attempt.started_at.map(Timestamp::as_millis))
    .bind(attempt.finished_at.map(Timestamp::as_millis))
    .bind(attempt.id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_attempt(
    conn: &mut SqliteConnection,
    run: &Run,
    stage_index: u32,
    spec: &StageSpec,
    number: u32,
    available_at: Timestamp,
    now: Timestamp,
) -> StoreResult<StageAttempt> {
    let attempt = StageAttempt {
        id: AttemptId::new(),
        project_id: run.project_id.clone(),
        run_id: run.id,
        stage: spec.name.clone(),
        stage_index,
        agent: spec.agent.clone(),
        attempt: number,
        fencing_token: FencingToken::FIRST,
        status: StageStatus::Pending,
        worker_id: None,
        bus_message_id: None,
        available_at,
        lease_expires_at: None,
        deadline_at: None,
        output: None,
        error: None,
        created_at: now,
        started_at: None,
        finished_at: None,
    };
    sqlx::query(
        "INSERT INTO stage_attempts (id, project_id, run_id, stage, stage_index, agent, attempt, \
         fencing_token, status, available_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(attempt.id.to_string())
    .bind(attempt.project_id.as_str())
    .bind(attempt.run_id.to_string())
    .bind(attempt.stage.as_str())
    .bind(i64::from(stage_index))
    .bind(attempt.agent.as_str())
    .bind(i64::from(number))
    .bind(attempt.fencing_token.0)
    .bind(attempt.status.as_str())
    .bind(available_at.as_millis())
    .bind(now.as_millis())
    .execute(conn)
    .await?;
    Ok(attempt)
}

/// Appends events in one statement; sequence numbers follow their order in `events`.
pub(super) async fn append_events(
    conn: &mut SqliteConnection,
    events: Vec<NewEvent>,
    now: Timestamp,
) -> StoreResult<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = QueryBuilder::<Sqlite>::new(
        "INSERT INTO events (project_id, run_id, attempt_id, environment_id, kind, payload, \
         correlation_id, created_at) ",
    );
    sql.push_values(&events, |mut row, event| {
        row.push_bind(event.project_id.as_str().to_owned())
            .push_bind(event.run_id.map(|id| id.to_string()))
            .push_bind(event.attempt_id.map(|id| id.to_string()))
            .push_bind(event.environment_id.map(|id| id.to_string()))
            .push_bind(event.kind.as_str())
            .push_bind(event.payload.to_string())
            .push_bind(event.correlation_id.map(|id| id.to_string()))
            .push_bind(now.as_millis());
    });
    sql.push(" RETURNING seq");
    let mut seqs: Vec<(i64,)> = sql.build_query_as().fetch_all(&mut *conn).await?;
    // Rows are inserted in order, so their sequence numbers ascend with it; RETURNING
    // itself promises no order.
    seqs.sort_unstable();
    Ok(events
        .into_iter()
        .zip(seqs)
        .map(|(event, (seq,))| Event {
            seq: EventSeq(seq),
            project_id: event.project_id,
            run_id: event.run_id,
            attempt_id: event.attempt_id,
            environment_id: event.environment_id,
            kind: event.kind,
            payload: event.payload,
            correlation_id: event.correlation_id,
            created_at: now,
        })
        .collect())
}

/// The attempt, if it is an unresolved dead letter of `project`.
async fn dead_letter(
    conn: &mut SqliteConnection,
    project: &ProjectId,
    id: AttemptId,
) -> StoreResult<StageAttempt> {
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT status, dlq_resolution FROM stage_attempts WHERE id = ? AND project_id = ?",
    )
    .bind(id.to_string())
    .bind(project.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Err(StoreError::AttemptNotFound(id)),
        Some((status, _)) if status != "dead_lettered" => {
            Err(StoreError::NotDeadLettered { id, state: format!("it is {status}") })
        }
        Some((_, Some(resolution))) => {
            Err(StoreError::NotDeadLettered { id, state: format!("already {resolution}") })
        }
        Some((_, None)) => {
            fetch_attempt(&mut *conn, id).await?.ok_or(StoreError::AttemptNotFound(id))
        }
    }
}

async fn set_dlq_resolution(
    conn: &mut SqliteConnection,
    id: AttemptId,
    resolution: &str,
) -> StoreResult<()> {
    sqlx::query("UPDATE stage_attempts SET dlq_resolution = ? WHERE id = ?")
        .bind(resolution)
        .bind(id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

fn dlq_event(letter: &StageAttempt, kind: EventKind, detail: serde_json::Value) -> NewEvent {
    NewEvent {
        project_id: letter.project_id.clone(),
        run_id: Some(letter.run_id),
        attempt_id: Some(letter.id),
        environment_id: None,
        kind,
        payload: attempt_payload(letter, detail),
        correlation_id: None,
    }
}

/// Workers serve every project; their events are filed under the default one.
fn worker_event(worker: &WorkerId, kind: EventKind, detail: serde_json::Value) -> NewEvent {
    let mut payload = json!({ "worker_id": worker });
    if let (Some(payload), serde_json::Value::Object(detail)) = (payload.as_object_mut(), detail) {
        payload.extend(detail);
    }
    NewEvent {
        project_id: ProjectId::default_project(),
        run_id: None,
        attempt_id: None,
        environment_id: None,
        kind,
        payload,
        correlation_id: None,
    }
}

fn run_event(run: &Run, payload: serde_json::Value) -> NewEvent {
    NewEvent {
        project_id: run.project_id.clone(),
        run_id: Some(run.id),
        attempt_id: None,
        environment_id: run.environment_id,
        kind: EventKind::Run(run.status),
        payload,
        correlation_id: Some(run.correlation_id),
    }
}

fn attempt_event(
    attempt: &StageAttempt,
    correlation_id: &CorrelationId,
    detail: serde_json::Value,
) -> NewEvent {
    attempt_event_in(attempt, correlation_id, None, detail)
}

/// A stage event, filed under the run's environment when it has one (agent work is the
/// environment's activity).
fn attempt_event_in(
    attempt: &StageAttempt,
    correlation_id: &CorrelationId,
    environment_id: Option<drover_domain::EnvironmentId>,
    detail: serde_json::Value,
) -> NewEvent {
    NewEvent {
        project_id: attempt.project_id.clone(),
        run_id: Some(attempt.run_id),
        attempt_id: Some(attempt.id),
        environment_id,
        kind: EventKind::Stage(attempt.status),
        payload: attempt_payload(attempt, detail),
        correlation_id: Some(*correlation_id),
    }
}

/// Every stage event names its stage and attempt, plus event-specific details.
fn attempt_payload(attempt: &StageAttempt, detail: serde_json::Value) -> serde_json::Value {
    let mut payload = json!({
        "stage": attempt.stage,
        "stage_index": attempt.stage_index,
        "attempt": attempt.attempt,
        "agent": attempt.agent,
    });
    if let (Some(payload), serde_json::Value::Object(detail)) = (payload.as_object_mut(), detail) {
        payload.extend(detail);
    }
    payload
}

pub(super) fn corrupt(column: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column}: {err}"))
}

#[derive(FromRow)]
struct RunRow {
    environment_id: Option<String>,
    workspace: Option<String>,
    variables: Option<String>,
    budget: Option<String>,
    pipeline_spec: Option<String>,
    submitted_by: Option<String>,
    id: String,
    project_id: String,
    pipeline: String,
    request: String,
    status: String,
    correlation_id: String,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

impl TryFrom<RunRow> for Run {
    type Error = StoreError;

    fn try_from(row: RunRow) -> Result<Self, Self::Error> {
        Ok(Run {
            id: row.id.parse().map_err(|e| corrupt("runs.id", e))?,
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("runs.project_id", e))?,
            pipeline: PipelineName::parse(row.pipeline).map_err(|e| corrupt("runs.pipeline", e))?,
            request: RunRequest::parse(row.request).map_err(|e| corrupt("runs.request", e))?,
            status: row.status.parse().map_err(|e| corrupt("runs.status", e))?,
            correlation_id: row
                .correlation_id
                .parse()
                .map_err(|e| corrupt("runs.correlation_id", e))?,
            error: row.error,
            created_at: Timestamp::from_millis(row.created_at),
            updated_at: Timestamp::from_millis(row.updated_at),
            started_at: row.started_at.map(Timestamp::from_millis),
            finished_at: row.finished_at.map(Timestamp::from_millis),
            environment_id: row
                .environment_id
                .map(|id| id.parse())
                .transpose()
                .map_err(|e| corrupt("runs.environment_id", e))?,
            workspace: row.workspace,
            variables: row
                .variables
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| corrupt("runs.variables", e))?
                .unwrap_or_default(),
            budget: row
                .budget
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| corrupt("runs.budget", e))?,
            spec: row
                .pipeline_spec
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| corrupt("runs.pipeline_spec", e))?,
            submitted_by: row.submitted_by,
        })
    }
}

#[derive(FromRow)]
struct AttemptRow {
    id: String,
    project_id: String,
    run_id: String,
    stage: String,
    stage_index: i64,
    agent: String,
    attempt: i64,
    fencing_token: i64,
    status: String,
    worker_id: Option<String>,
    available_at: i64,
    lease_expires_at: Option<i64>,
    deadline_at: Option<i64>,
    output: Option<String>,
    error: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    bus_message_id: Option<String>,
}

impl TryFrom<AttemptRow> for StageAttempt {
    type Error = StoreError;

    fn try_from(row: AttemptRow) -> Result<Self, Self::Error> {
        let output = row
            .output
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| corrupt("stage_attempts.output", e))?;
        Ok(StageAttempt {
            id: row.id.parse().map_err(|e| corrupt("stage_attempts.id", e))?,
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("stage_attempts.project_id", e))?,
            run_id: row.run_id.parse().map_err(|e| corrupt("stage_attempts.run_id", e))?,
            stage: StageName::parse(row.stage).map_err(|e| corrupt("stage_attempts.stage", e))?,
            stage_index: u32::try_from(row.stage_index)
                .map_err(|e| corrupt("stage_attempts.stage_index", e))?,
            agent: AgentType::parse(row.agent).map_err(|e| corrupt("stage_attempts.agent", e))?,
            attempt: u32::try_from(row.attempt)
                .map_err(|e| corrupt("stage_attempts.attempt", e))?,
            fencing_token: FencingToken(row.fencing_token),
            status: row.status.parse().map_err(|e| corrupt("stage_attempts.status", e))?,
            worker_id: row.worker_id.map(WorkerId::new),
            bus_message_id: row.bus_message_id,
            available_at: Timestamp::from_millis(row.available_at),
            lease_expires_at: row.lease_expires_at.map(Timestamp::from_millis),
            deadline_at: row.deadline_at.map(Timestamp::from_millis),
            output,
            error: row.error,
            created_at: Timestamp::from_millis(row.created_at),
            started_at: row.started_at.map(Timestamp::from_millis),
            finished_at: row.finished_at.map(Timestamp::from_millis),
        })
    }
}

#[derive(FromRow)]
struct WorkerRow {
    id: String,
    agents: String,
    version: String,
    hostname: String,
    concurrency: i64,
    kind: String,
    status: String,
    registered_at: i64,
    last_seen_at: i64,
}

impl TryFrom<WorkerRow> for Worker {
    type Error = StoreError;

    fn try_from(row: WorkerRow) -> Result<Self, Self::Error> {
        Ok(Worker {
            id: WorkerId::new(row.id),
            agents: serde_json::from_str(&row.agents).map_err(|e| corrupt("workers.agents", e))?,
            version: row.version,
            hostname: row.hostname,
            concurrency: u32::try_from(row.concurrency)
                .map_err(|e| corrupt("workers.concurrency", e))?,
            kind: row.kind,
            status: row.status.parse().map_err(|e| corrupt("workers.status", e))?,
            registered_at: Timestamp::from_millis(row.registered_at),
            last_seen_at: Timestamp::from_millis(row.last_seen_at),
        })
    }
}

#[derive(FromRow)]
struct EventRow {
    seq: i64,
    project_id: String,
    run_id: Option<String>,
    attempt_id: Option<String>,
    environment_id: Option<String>,
    kind: String,
    payload: String,
    correlation_id: Option<String>,
    created_at: i64,
}

impl TryFrom<EventRow> for Event {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, Self::Error> {
        Ok(Event {
            seq: EventSeq(row.seq),
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("events.project_id", e))?,
            run_id: row
                .run_id
                .map(|id| id.parse())
                .transpose()
                .map_err(|e| corrupt("events.run_id", e))?,
            attempt_id: row
                .attempt_id
                .map(|id| id.parse())
                .transpose()
                .map_err(|e| corrupt("events.attempt_id", e))?,
            environment_id: row
                .environment_id
                .map(|id| id.parse())
                .transpose()
                .map_err(|e| corrupt("events.environment_id", e))?,
            kind: row.kind.parse().map_err(|e| corrupt("events.kind", e))?,
            payload: serde_json::from_str(&row.payload)
                .map_err(|e| corrupt("events.payload", e))?,
            correlation_id: row
                .correlation_id
                .map(|id| id.parse())
                .transpose()
                .map_err(|e| corrupt("events.correlation_id", e))?,
            created_at: Timestamp::from_millis(row.created_at),
        })
    }
}
