//! The store over SQL, written once for SQLite and PostgreSQL.
//!
//! [`SqlStore`] holds the connections of either database ([`Pool`]) and implements every
//! store trait over [`Db`], which runs a statement on either. What differs between the two
//! is how writes take turns:
//!
//! - SQLite allows one writer at a time, so writes go through exactly one connection held
//!   under a mutex (no `SQLITE_BUSY` upgrades inside transactions, no lock convoys), while
//!   reads use a separate pool that WAL lets run alongside the writer.
//! - PostgreSQL writes run on pooled connections at once, from this process and from other
//!   servers sharing the database. A write that reads rows before changing them locks them
//!   (`FOR UPDATE`, see [`Db::for_update`]); the runs' and attempts' writes lock the run
//!   first, then its attempts, so they take turns per run in one order. Event inserts are
//!   serialized (see [`SqlStore::transaction`]).
//!
//! Either way, events are published to in-process subscribers after their commit, in
//! sequence order.

mod chat;
mod db;
mod environments;
mod identities;
mod secrets;
mod webhooks;

use std::marker::PhantomData;
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
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Connection, FromRow};
use tokio::sync::{Mutex, MutexGuard, broadcast};

pub use db::counting_statements;
pub(crate) use db::{Db, Sql, sql, unique_violation};

use crate::{
    ApprovalDecision, ApprovalOutcome, CancelledRun, CommandOutcome, Completion, CompletionOutcome,
    DeadLetterQuery, EventQuery, NewRun, RunQuery, StartAttempt, StartOutcome, Store, StoreError,
    StoreResult, UsageReport, WorkerCommand,
};

/// How many committed events a live subscriber may fall behind before it must catch up
/// from the database.
const EVENT_FEED_CAPACITY: usize = 4096;

/// The key of the PostgreSQL advisory lock that event inserts take (see
/// [`SqlStore::transaction`]): "drover" and 1.
const EVENT_LOCK: i64 = 0x6472_6f76_6572_0001;

/// Which database a [`SqlStore`] works on: [`SqliteBackend`], [`PostgresBackend`], or
/// [`AnyBackend`] (either, chosen by URL when it is opened).
pub trait Backend: sealed::Sealed + Send + Sync + 'static {}

mod sealed {
    pub trait Sealed {}
}

/// A [`SqlStore`] on SQLite.
#[derive(Debug)]
pub enum SqliteBackend {}
/// A [`SqlStore`] on PostgreSQL.
#[derive(Debug)]
pub enum PostgresBackend {}
/// A [`SqlStore`] on either database.
#[derive(Debug)]
pub enum AnyBackend {}

impl sealed::Sealed for SqliteBackend {}
impl sealed::Sealed for PostgresBackend {}
impl sealed::Sealed for AnyBackend {}
impl Backend for SqliteBackend {}
impl Backend for PostgresBackend {}
impl Backend for AnyBackend {}

/// The SQLite store: one file, WAL journal, migrations under `migrations/sqlite`.
pub type SqliteStore = SqlStore<SqliteBackend>;
/// The PostgreSQL store: a connection pool, migrations under `migrations/postgres`.
pub type PostgresStore = SqlStore<PostgresBackend>;
/// The store a URL names: SQLite or PostgreSQL ([`crate::open`]).
pub type AnyStore = SqlStore<AnyBackend>;

/// The implementation of every store trait over SQL. Cloning it is cheap: clones share
/// connections and the event feed.
pub struct SqlStore<B: Backend> {
    pool: Pool,
    events: broadcast::Sender<Event>,
    backend: PhantomData<fn() -> B>,
}

impl<B: Backend> Clone for SqlStore<B> {
    fn clone(&self) -> Self {
        Self { pool: self.pool.clone(), events: self.events.clone(), backend: PhantomData }
    }
}

impl<B: Backend> std::fmt::Debug for SqlStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore").field("pool", &self.pool).finish_non_exhaustive()
    }
}

impl From<SqliteStore> for AnyStore {
    fn from(store: SqliteStore) -> Self {
        store.retag()
    }
}

impl From<PostgresStore> for AnyStore {
    fn from(store: PostgresStore) -> Self {
        store.retag()
    }
}

/// The connections of a store.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite {
        /// The one connection that writes. Held from a write transaction's start until its
        /// events are published, so subscribers receive events in sequence order; holding
        /// it (rather than taking it from a pool each time) saves a round trip per
        /// transaction.
        writer: Arc<Mutex<SqliteConnection>>,
        reader: SqlitePool,
    },
    Postgres {
        pool: PgPool,
        /// Held from an event insert until its events are published, so this process's
        /// subscribers receive events in sequence order.
        publishing: Arc<Mutex<()>>,
    },
}

/// How full a store's connection pool is (for `readyz` and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Connections open (for SQLite, readers plus the writer).
    pub connections: u32,
    /// Of those, how many are idle.
    pub idle: u32,
    /// Most connections the pool opens.
    pub max_connections: u32,
}

/// A connection to write on outside a transaction: SQLite's writer, held; or the
/// PostgreSQL pool.
pub(crate) enum Writer<'a> {
    Sqlite(MutexGuard<'a, SqliteConnection>),
    Postgres(&'a PgPool),
}

impl Writer<'_> {
    pub(crate) fn db(&mut self) -> Db<'_> {
        match self {
            Writer::Sqlite(conn) => Db::Sqlite(conn),
            Writer::Postgres(pool) => Db::PostgresPool(pool),
        }
    }
}

impl<B: Backend> SqlStore<B> {
    pub(crate) fn new(pool: Pool) -> Self {
        let (events, _) = broadcast::channel(EVENT_FEED_CAPACITY);
        Self { pool, events, backend: PhantomData }
    }

    fn retag<C: Backend>(self) -> SqlStore<C> {
        SqlStore { pool: self.pool, events: self.events, backend: PhantomData }
    }

    /// Where reads go.
    pub(crate) fn read(&self) -> Db<'_> {
        match &self.pool {
            Pool::Sqlite { reader, .. } => Db::SqlitePool(reader),
            Pool::Postgres { pool, .. } => Db::PostgresPool(pool),
        }
    }

    /// Where a write outside a transaction goes.
    pub(crate) async fn writer(&self) -> Writer<'_> {
        match &self.pool {
            Pool::Sqlite { writer, .. } => Writer::Sqlite(writer.lock().await),
            Pool::Postgres { pool, .. } => Writer::Postgres(pool),
        }
    }

    /// How full the connection pool is.
    pub fn pool_stats(&self) -> PoolStats {
        let (backend, pool_size, idle, max, extra) = match &self.pool {
            Pool::Sqlite { reader, .. } => (
                "sqlite",
                reader.size(),
                reader.num_idle(),
                reader.options().get_max_connections(),
                1,
            ),
            Pool::Postgres { pool, .. } => {
                ("postgres", pool.size(), pool.num_idle(), pool.options().get_max_connections(), 0)
            }
        };
        PoolStats {
            backend,
            connections: pool_size + extra,
            idle: u32::try_from(idle).unwrap_or(u32::MAX),
            max_connections: max + extra,
        }
    }

    /// Closes the connections (for SQLite, after checkpointing the journal); the SQLite
    /// writer closes when the last clone of the store is dropped.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite { writer, reader } => {
                reader.close().await;
                let mut writer = writer.lock().await;
                if let Err(err) =
                    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut *writer).await
                {
                    tracing::debug!(error = %err, "checkpoint on close failed");
                }
            }
            Pool::Postgres { pool, .. } => pool.close().await,
        }
    }

    /// Overwrites what deleted or changed rows left behind, after a value that must not
    /// linger (a plaintext secret) was removed: on SQLite the journal is checkpointed and
    /// emptied, the file rebuilt without free pages (`VACUUM`), and the journal emptied
    /// again. PostgreSQL keeps old row versions until its own vacuum reuses them; there is
    /// nothing to do from here.
    pub(crate) async fn wipe_freed_pages(&self) -> StoreResult<()> {
        let Pool::Sqlite { writer, .. } = &self.pool else { return Ok(()) };
        let mut writer = writer.lock().await;
        for statement in
            ["PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"]
        {
            sqlx::query(statement).execute(&mut *writer).await?;
        }
        Ok(())
    }

    /// Runs `write` in one transaction, appends the events it produced (stamped `now`),
    /// commits, then publishes them.
    ///
    /// On PostgreSQL, sequence numbers come from a sequence, which hands them out when
    /// rows are inserted, not when they commit: two transactions could commit seq 11
    /// before seq 10, and a reader following "events after N" that saw 11 would never see
    /// 10. So the insert of events takes a transaction-level advisory lock first
    /// ([`EVENT_LOCK`], released by the commit): event inserts of all servers take turns in
    /// commit order, and a sequence number is only handed out once every smaller one is
    /// committed (or rolled back, a gap no reader waits for). Only the insert and the
    /// commit are serialized; the rest of the transaction runs alongside others.
    pub(crate) async fn transaction<T>(
        &self,
        now: Timestamp,
        write: impl AsyncFnOnce(&mut Db<'_>, &mut Vec<NewEvent>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut events = Vec::new();
        match &self.pool {
            Pool::Sqlite { writer, .. } => {
                let mut conn = writer.lock().await;
                let mut tx = conn.begin().await?;
                let value = write(&mut Db::Sqlite(&mut tx), &mut events).await?;
                let stored = append_events(&mut Db::Sqlite(&mut tx), events, now).await?;
                tx.commit().await?;
                self.publish(stored);
                Ok(value)
            }
            Pool::Postgres { pool, publishing } => {
                let mut tx = pool.begin().await?;
                let value = write(&mut Db::Postgres(&mut tx), &mut events).await?;
                if events.is_empty() {
                    tx.commit().await?;
                    return Ok(value);
                }
                // This process's turn first, then every server's: a task holding the
                // advisory lock never waits for the mutex.
                let _publishing = publishing.lock().await;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(EVENT_LOCK)
                    .execute(&mut *tx)
                    .await?;
                let stored = append_events(&mut Db::Postgres(&mut tx), events, now).await?;
                tx.commit().await?;
                self.publish(stored);
                Ok(value)
            }
        }
    }

    /// Runs `write` in one transaction that appends no events.
    pub(crate) async fn with_tx<T>(
        &self,
        write: impl AsyncFnOnce(&mut Db<'_>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        self.transaction(Timestamp::from_millis(0), async |tx, _| write(tx).await).await
    }

    fn publish(&self, events: Vec<Event>) {
        for event in events {
            // No subscribers is fine: the events are in the database.
            let _ = self.events.send(event);
        }
    }
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

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
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
        self.transaction(now, async |tx, events| {
            sql(concat!(
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
            .execute(tx)
            .await?;
            events
                .push(run_event(&run, json!({ "request": run.request, "pipeline": run.pipeline })));
            let spec = &new.pipeline;
            for start in &first.start {
                let stage =
                    spec.stage(start.index).ok_or_else(|| missing_stage(spec, start.index))?;
                let attempt = insert_stage(tx, &run, start, stage, now).await?;
                events.push(attempt_event(&attempt, &run.correlation_id, json!({})));
            }
            Ok(run)
        })
        .await
    }

    async fn get_run(&self, project: &ProjectId, id: RunId) -> StoreResult<Option<Run>> {
        fetch_run(&mut self.read(), project, id).await
    }

    async fn unfinished_runs_in(
        &self,
        environments: &[EnvironmentId],
    ) -> StoreResult<Vec<(EnvironmentId, RunId)>> {
        if environments.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sql(
            "SELECT environment_id, id FROM runs WHERE status IN ('queued', 'running', 'waiting_approval') AND environment_id IN (",
        );
        query.push_list(environments.iter().map(ToString::to_string)).push(")");
        let rows: Vec<(String, String)> = query.fetch_all(&mut self.read()).await?;
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
        let mut statement =
            sql(concat!("SELECT ", run_columns!(), " FROM runs WHERE project_id = ?"))
                .bind(project.as_str());
        if let Some(status) = query.status {
            statement.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before) = query.before {
            statement.push(" AND id < ").push_bind(before.to_string());
        }
        statement.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<RunRow> = statement.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(Run::try_from).collect()
    }

    async fn list_attempts(
        &self,
        project: &ProjectId,
        run: RunId,
    ) -> StoreResult<Vec<StageAttempt>> {
        let rows: Vec<AttemptRow> = sql(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM stage_attempts WHERE project_id = ? AND run_id = ? ",
            "ORDER BY stage_index, attempt"
        ))
        .bind(project.as_str())
        .bind(run.to_string())
        .fetch_all(&mut self.read())
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
        self.transaction(now, async |tx, events| {
            let mut run =
                fetch_run(tx, project, run_id).await?.ok_or(StoreError::RunNotFound(run_id))?;
            if run.status.is_terminal() {
                return Err(StoreError::RunAlreadyFinished { id: run.id, status: run.status });
            }
            run.status = run.status.become_(RunStatus::Cancelled)?;
            run.error = Some(reason.to_owned());
            run.updated_at = now;
            run.finished_at = Some(now);
            update_run(tx, &run).await?;
            events.push(run_event(&run, json!({ "reason": reason })));
            let stopped = stop_active(tx, &run, reason, now, events).await?;
            Ok(CancelledRun { run, stopped_attempts: stopped })
        })
        .await
    }

    async fn decide_approval(
        &self,
        project: &ProjectId,
        run_id: RunId,
        stage: &StageName,
        decision: &ApprovalDecision,
        now: Timestamp,
    ) -> StoreResult<ApprovalOutcome> {
        self.transaction(now, async |tx, events| {
            let mut run =
                fetch_run(tx, project, run_id).await?.ok_or(StoreError::RunNotFound(run_id))?;
            if run.status.is_terminal() {
                return Err(StoreError::RunAlreadyFinished { id: run.id, status: run.status });
            }
            let query = sql(concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM stage_attempts WHERE run_id = ? AND stage = ? ORDER BY attempt DESC LIMIT 1"
            ))
            .bind(run.id.to_string())
            .bind(stage.as_str())
            .for_update(tx);
            let latest: Option<AttemptRow> = query.fetch_optional(tx).await?;
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
            let mut stopped = Vec::new();
            let why = decision.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            if decision.approve {
                attempt.status = attempt.status.become_(StageStatus::Pending)?;
                attempt.available_at = now;
                update_attempt(tx, &attempt).await?;
                events.push(attempt_event(
                    &attempt,
                    &run.correlation_id,
                    json!({ "approved_by": decision.by, "reason": decision.reason }),
                ));
                settle_run_status(tx, &mut run, now, events).await?;
            } else {
                let error = format!("rejected by {}{why}", decision.by);
                attempt.status = attempt.status.become_(StageStatus::Failed)?;
                attempt.error = Some(error.clone());
                attempt.finished_at = Some(now);
                update_attempt(tx, &attempt).await?;
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
                update_run(tx, &run).await?;
                events.push(run_event(&run, json!({ "error": run_error })));
                stopped = stop_active(tx, &run, &run_error, now, events).await?;
            }
            Ok(ApprovalOutcome { run, attempt, stopped })
        })
        .await
    }

    async fn usage_report(
        &self,
        project: &ProjectId,
        since: Timestamp,
    ) -> StoreResult<UsageReport> {
        let rows: Vec<(String, String, Option<String>, String)> =
            sql("SELECT a.run_id, a.stage, r.submitted_by, a.output FROM stage_attempts a \
             JOIN runs r ON r.id = a.run_id \
             WHERE r.project_id = ? AND r.created_at >= ? AND a.output IS NOT NULL")
            .bind(project.as_str())
            .bind(since.as_millis())
            .fetch_all(&mut self.read())
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
        let mut statement =
            sql(concat!("SELECT ", event_columns!(), " FROM events WHERE project_id = ?"))
                .bind(project.as_str());
        if let Some(run) = query.run_id {
            statement.push(" AND run_id = ").push_bind(run.to_string());
        }
        if let Some(environment) = query.environment_id {
            statement.push(" AND environment_id = ").push_bind(environment.to_string());
        }
        if let Some(after) = query.after {
            statement.push(" AND seq > ").push_bind(after.0);
        }
        statement.push(" ORDER BY seq LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<EventRow> = statement.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(Event::try_from).collect()
    }

    async fn events_after(&self, after: EventSeq, limit: u32) -> StoreResult<Vec<Event>> {
        let rows: Vec<EventRow> = sql(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(after.0)
        .bind(i64::from(limit))
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(Event::try_from).collect()
    }

    async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> StoreResult<bool> {
        let held: Option<(String,)> =
            sql("INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < ? \
             RETURNING holder")
            .bind(name)
            .bind(holder)
            .bind(until.as_millis())
            .bind(now.as_millis())
            .fetch_optional(&mut self.writer().await.db())
            .await?;
        Ok(held.is_some_and(|(who,)| who == holder))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sql("DELETE FROM leases WHERE name = ? AND holder = ?")
            .bind(name)
            .bind(holder)
            .execute(&mut self.writer().await.db())
            .await?;
        Ok(())
    }

    async fn latest_event_seq(&self, project: &ProjectId) -> StoreResult<EventSeq> {
        let (seq,): (Option<i64>,) = sql("SELECT MAX(seq) FROM events WHERE project_id = ?")
            .bind(project.as_str())
            .fetch_one(&mut self.read())
            .await?;
        Ok(EventSeq(seq.unwrap_or(0)))
    }

    async fn prune_events(&self, before: Timestamp) -> StoreResult<u64> {
        sql("DELETE FROM events WHERE created_at < ?")
            .bind(before.as_millis())
            .execute(&mut self.writer().await.db())
            .await
    }

    async fn attempt_by_id(&self, id: AttemptId) -> StoreResult<Option<StageAttempt>> {
        fetch_attempt(&mut self.read(), id).await
    }

    async fn due_attempts(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &mut self.read(),
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

    async fn claim_due_attempts(
        &self,
        now: Timestamp,
        limit: u32,
        hold_until: Timestamp,
    ) -> StoreResult<Vec<StageAttempt>> {
        self.with_tx(async |tx| {
            // Rows another server is claiming are passed over, not waited for.
            let mut query = sql(concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM stage_attempts WHERE status = 'pending' AND available_at <= ? \
                 ORDER BY available_at LIMIT ?"
            ))
            .bind(now.as_millis())
            .bind(i64::from(limit));
            query.push(tx.skip_locked());
            let rows: Vec<AttemptRow> = query.fetch_all(tx).await?;
            let claimed: Vec<StageAttempt> =
                rows.into_iter().map(StageAttempt::try_from).collect::<StoreResult<_>>()?;
            if !claimed.is_empty() {
                let mut hold = sql("UPDATE stage_attempts SET available_at = ? WHERE id IN (")
                    .bind(hold_until.as_millis());
                hold.push_list(claimed.iter().map(|attempt| attempt.id.to_string())).push(")");
                hold.execute(tx).await?;
            }
            Ok(claimed)
        })
        .await
    }

    async fn release_claims(&self, attempts: &[AttemptId], now: Timestamp) -> StoreResult<()> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut query =
            sql("UPDATE stage_attempts SET available_at = ? WHERE status = 'pending' AND id IN (")
                .bind(now.as_millis());
        query.push_list(attempts.iter().map(ToString::to_string)).push(")");
        query.execute(&mut self.writer().await.db()).await?;
        Ok(())
    }

    async fn runs_by_ids(&self, ids: &[RunId]) -> StoreResult<Vec<Run>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sql(concat!("SELECT ", run_columns!(), " FROM runs WHERE id IN ("));
        query.push_list(ids.iter().map(ToString::to_string)).push(")");
        let rows: Vec<RunRow> = query.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(Run::try_from).collect()
    }

    async fn succeeded_outputs(
        &self,
        runs: &[RunId],
    ) -> StoreResult<Vec<(RunId, StageName, serde_json::Value)>> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sql("SELECT run_id, stage, output FROM stage_attempts \
             WHERE status = 'succeeded' AND output IS NOT NULL AND run_id IN (");
        query.push_list(runs.iter().map(ToString::to_string)).push(") ORDER BY stage_index");
        let rows: Vec<(String, String, String)> = query.fetch_all(&mut self.read()).await?;
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
        self.transaction(now, async |tx, events| {
            // One statement for the batch: each attempt gets its own message id via CASE.
            let mut query =
                sql("UPDATE stage_attempts SET status = 'dispatched', dispatched_at = ?")
                    .bind(now.as_millis());
            query.push(", bus_message_id = CASE id");
            for (id, message_id) in attempts {
                query.push(" WHEN ? THEN ?");
                query = query.bind(id.to_string()).bind(message_id.as_str());
            }
            // Rows another transaction holds are being started or cancelled: passed over
            // rather than waited for (waiting could deadlock with a run's writes, which
            // lock its attempts in another order).
            query
                .push(" END WHERE id IN (SELECT id FROM stage_attempts WHERE status = 'pending' AND id IN (")
                .push_list(attempts.iter().map(|(id, _)| id.to_string()))
                .push(")")
                .push(tx.skip_locked())
                .push(") RETURNING ")
                .push(attempt_columns!());
        // Already started (the worker was quicker than this commit) or cancelled ones
        // are left alone by the WHERE clause.
        let rows: Vec<AttemptRow> = query.fetch_all(tx).await?;
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
        Ok(())
        }).await
    }

    async fn stale_dispatched(
        &self,
        dispatched_before: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &mut self.read(),
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
        let done = sql("UPDATE stage_attempts SET bus_message_id = ?, dispatched_at = ? \
             WHERE id = ? AND status = 'dispatched'")
        .bind(message_id)
        .bind(now.as_millis())
        .bind(attempt.to_string())
        .execute(&mut self.writer().await.db())
        .await?;
        Ok(done == 1)
    }

    async fn list_dead_letters(
        &self,
        project: &ProjectId,
        query: &DeadLetterQuery,
    ) -> StoreResult<Vec<StageAttempt>> {
        let mut statement = sql(concat!(
            "SELECT ",
            attempt_columns!(),
            " FROM stage_attempts WHERE status = 'dead_lettered' AND dlq_resolution IS NULL ",
            "AND project_id = ?"
        ))
        .bind(project.as_str());
        if let Some(before) = query.before {
            statement.push(" AND id < ").push_bind(before.to_string());
        }
        statement.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<AttemptRow> = statement.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(StageAttempt::try_from).collect()
    }

    async fn redrive_dead_letter(
        &self,
        project: &ProjectId,
        attempt_id: AttemptId,
        pipelines: &PipelineCatalog,
        now: Timestamp,
    ) -> StoreResult<StageAttempt> {
        self.transaction(now, async |tx, events| {
            let (letter, mut run) = dead_letter(tx, project, attempt_id).await?;
            let pipeline = pipeline_of(&run, pipelines)?.into_owned();
            let spec = pipeline
                .stage(letter.stage_index)
                .ok_or_else(|| missing_stage(&pipeline, letter.stage_index))?;
            run.status = run.status.redrive()?;
            run.error = None;
            run.finished_at = None;
            run.updated_at = now;
            update_run(tx, &run).await?;
            set_dlq_resolution(tx, attempt_id, "redriven").await?;
            let retry =
                insert_attempt(tx, &run, letter.stage_index, spec, letter.attempt + 1, now, now)
                    .await?;
            events.extend([
                dlq_event(&letter, EventKind::DlqRedriven, json!({ "new_attempt_id": retry.id })),
                run_event(&run, json!({ "reason": "dead letter redriven" })),
                attempt_event(&retry, &run.correlation_id, json!({ "redrive_of": letter.id })),
            ]);
            Ok(retry)
        })
        .await
    }

    async fn discard_dead_letter(
        &self,
        project: &ProjectId,
        attempt_id: AttemptId,
        now: Timestamp,
    ) -> StoreResult<StageAttempt> {
        self.transaction(now, async |tx, events| {
            let (letter, _) = dead_letter(tx, project, attempt_id).await?;
            set_dlq_resolution(tx, attempt_id, "discarded").await?;
            events.extend([dlq_event(&letter, EventKind::DlqDiscarded, json!({}))]);
            Ok(letter)
        })
        .await
    }

    async fn worker_seen(
        &self,
        worker: &WorkerId,
        profile: &WorkerProfile,
        now: Timestamp,
    ) -> StoreResult<()> {
        self.transaction(now, async |tx, events| seen_in(tx, worker, profile, now, events).await)
            .await
    }

    async fn worker_gone(&self, worker: &WorkerId, now: Timestamp) -> StoreResult<()> {
        self.transaction(now, async |tx, events| gone_in(tx, worker, now, events).await).await
    }

    async fn mark_lost_workers(&self, silent_since: Timestamp, now: Timestamp) -> StoreResult<u64> {
        self.transaction(now, async |tx, events| {
            let lost: Vec<(String,)> = sql(
                "UPDATE workers SET status = 'lost' WHERE status = 'live' AND last_seen_at < ? \
             RETURNING id",
            )
            .bind(silent_since.as_millis())
            .fetch_all(tx)
            .await?;
            events.extend(lost.iter().map(|(id,)| {
                worker_event(&WorkerId::new(id.clone()), EventKind::WorkerLost, json!({}))
            }));
            Ok(lost.len() as u64)
        })
        .await
    }

    async fn list_workers(&self) -> StoreResult<Vec<Worker>> {
        let rows: Vec<WorkerRow> =
            sql("SELECT id, agents, version, hostname, concurrency, kind, status, registered_at, \
             last_seen_at FROM workers \
             ORDER BY CASE status WHEN 'live' THEN 0 ELSE 1 END, last_seen_at DESC")
            .fetch_all(&mut self.read())
            .await?;
        rows.into_iter().map(Worker::try_from).collect()
    }

    async fn requeue_dispatched(&self, now: Timestamp) -> StoreResult<u64> {
        self.transaction(now, async |tx, events| {
            let rows: Vec<AttemptRow> = sql(concat!(
                "UPDATE stage_attempts SET status = 'pending', dispatched_at = NULL ",
                "WHERE status = 'dispatched' RETURNING ",
                attempt_columns!()
            ))
            .fetch_all(tx)
            .await?;
            let count = rows.len() as u64;
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
            Ok(count)
        })
        .await
    }

    async fn start_attempt(
        &self,
        start: StartAttempt,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<StartOutcome> {
        let now = start.now;
        self.transaction(now, async |tx, events| start_in(tx, &start, pipelines, events).await)
            .await
    }

    async fn renew_lease(
        &self,
        attempt: AttemptId,
        token: FencingToken,
        lease_until: Timestamp,
    ) -> StoreResult<bool> {
        renew_in(&mut self.writer().await.db(), attempt, token, lease_until).await
    }

    async fn release_attempt(
        &self,
        attempt_id: AttemptId,
        token: FencingToken,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.transaction(now, async |tx, events| {
            release_in(tx, attempt_id, token, now, events).await
        })
        .await
    }

    async fn complete_attempt(
        &self,
        completion: Completion,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<CompletionOutcome> {
        let now = completion.now;
        self.transaction(now, async |tx, events| {
            complete_in(tx, &completion, pipelines, events).await
        })
        .await
    }

    async fn apply(
        &self,
        commands: Vec<WorkerCommand>,
        pipelines: &PipelineCatalog,
    ) -> StoreResult<Vec<CommandOutcome>> {
        // One insert for the whole batch's events, in command order, stamped with the
        // batch's latest time.
        let latest = commands
            .iter()
            .map(|command| match command {
                WorkerCommand::Start(start) => start.now,
                WorkerCommand::Complete(completion) => completion.now,
                WorkerCommand::Renew { now, .. }
                | WorkerCommand::Release { now, .. }
                | WorkerCommand::Seen { now, .. }
                | WorkerCommand::Gone { now, .. } => *now,
            })
            .max()
            .unwrap_or(Timestamp::from_millis(0));
        self.transaction(latest, async |tx, events| {
            lock_in_order(tx, &commands).await?;
            let mut outcomes = Vec::with_capacity(commands.len());
            for command in commands {
                let outcome = match command {
                    WorkerCommand::Start(start) => {
                        CommandOutcome::Started(start_in(tx, &start, pipelines, events).await?)
                    }
                    WorkerCommand::Renew { attempt, token, lease_until, .. } => {
                        CommandOutcome::Renewed(renew_in(tx, attempt, token, lease_until).await?)
                    }
                    WorkerCommand::Complete(completion) => CommandOutcome::Completed(
                        complete_in(tx, &completion, pipelines, events).await?,
                    ),
                    WorkerCommand::Release { attempt, token, now } => {
                        CommandOutcome::Released(release_in(tx, attempt, token, now, events).await?)
                    }
                    WorkerCommand::Seen { worker, profile, now } => {
                        seen_in(tx, &worker, &profile, now, events).await?;
                        CommandOutcome::Recorded
                    }
                    WorkerCommand::Gone { worker, now } => {
                        gone_in(tx, &worker, now, events).await?;
                        CommandOutcome::Recorded
                    }
                };
                outcomes.push(outcome);
            }
            Ok(outcomes)
        })
        .await
    }

    async fn expired_leases(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<StageAttempt>> {
        scan_attempts(
            &mut self.read(),
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
            &mut self.read(),
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
            sql("SELECT status, COUNT(*) FROM stage_attempts GROUP BY status")
                .fetch_all(&mut self.read())
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
        sql("SELECT 1").execute(&mut self.read()).await?;
        Ok(())
    }

    fn pool(&self) -> PoolStats {
        self.pool_stats()
    }
}

/// On PostgreSQL, locks the runs and workers a batch of worker commands will write, each
/// kind in id order, before any command runs. Two servers committing batches that touch
/// the same runs in different orders would otherwise each hold one and wait for the other
/// (a deadlock PostgreSQL breaks by aborting one); in id order, the second waits for the
/// first. Elsewhere (SQLite's single writer) there is nothing to order.
async fn lock_in_order(tx: &mut Db<'_>, commands: &[WorkerCommand]) -> StoreResult<()> {
    if tx.for_update().is_empty() || commands.len() < 2 {
        return Ok(());
    }
    let mut attempts = Vec::new();
    let mut workers = Vec::new();
    for command in commands {
        match command {
            WorkerCommand::Start(start) => {
                attempts.push(start.attempt_id.to_string());
                workers.push(start.worker_id.to_string());
            }
            WorkerCommand::Complete(completion) => attempts.push(completion.attempt_id.to_string()),
            WorkerCommand::Renew { attempt, .. } | WorkerCommand::Release { attempt, .. } => {
                attempts.push(attempt.to_string());
            }
            WorkerCommand::Seen { worker, .. } | WorkerCommand::Gone { worker, .. } => {
                workers.push(worker.to_string());
            }
        }
    }
    if !attempts.is_empty() {
        let mut runs =
            sql("SELECT id FROM runs WHERE id IN (SELECT run_id FROM stage_attempts WHERE id IN (");
        runs.push_list(attempts);
        runs.push(")) ORDER BY id");
        let _: Vec<(String,)> = runs.for_update(tx).fetch_all(tx).await?;
    }
    if !workers.is_empty() {
        let mut rows = sql("SELECT id FROM workers WHERE id IN (");
        rows.push_list(workers);
        rows.push(") ORDER BY id");
        let _: Vec<(String,)> = rows.for_update(tx).fetch_all(tx).await?;
    }
    Ok(())
}

/// Starts an attempt for a worker if its token is current and it is still waiting.
async fn start_in(
    tx: &mut Db<'_>,
    start: &StartAttempt,
    pipelines: &PipelineCatalog,
    events: &mut Vec<NewEvent>,
) -> StoreResult<StartOutcome> {
    let Some((mut attempt, mut run)) = attempt_for_update(tx, start.attempt_id).await? else {
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
    tx: &mut Db<'_>,
    attempt: AttemptId,
    token: FencingToken,
    lease_until: Timestamp,
) -> StoreResult<bool> {
    let result = sql("UPDATE stage_attempts SET lease_expires_at = ? \
         WHERE id = ? AND fencing_token = ? AND status = 'running'")
    .bind(lease_until.as_millis())
    .bind(attempt.to_string())
    .bind(token.0)
    .execute(tx)
    .await?;
    Ok(result == 1)
}

/// Hands a running attempt back: pending again, with a new fencing token.
async fn release_in(
    tx: &mut Db<'_>,
    attempt_id: AttemptId,
    token: FencingToken,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<bool> {
    let Some((mut attempt, _)) = attempt_for_update(tx, attempt_id).await? else {
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
    tx: &mut Db<'_>,
    completion: &Completion,
    pipelines: &PipelineCatalog,
    events: &mut Vec<NewEvent>,
) -> StoreResult<CompletionOutcome> {
    let now = completion.now;
    let Some((mut attempt, mut run)) = attempt_for_update(tx, completion.attempt_id).await? else {
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
    let pipeline = pipeline_of(&run, pipelines)?;
    let progress = progress_of(tx, run.id).await?;
    let mut decision =
        decide(&pipeline, &attempt, &completion.outcome, &progress, completion.jitter, now);
    // A run with a budget stops once its stages together spent past it (the attempt that
    // crossed it still counts as done).
    if let (Some(budget), Outcome::Succeeded { output }) = (run.budget, &completion.outcome)
        && !matches!(decision.next, NextStep::FinishRun { status: RunStatus::Failed, .. })
    {
        let earlier: Vec<(String,)> = sql(
            "SELECT output FROM stage_attempts WHERE run_id = ? AND id != ? AND output IS NOT NULL",
        )
        .bind(run.id.to_string())
        .bind(attempt.id.to_string())
        .fetch_all(tx)
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
    // The first write: fenced again in the statement itself, so whatever the reads above
    // saw, a result whose token is no longer current or whose attempt no longer runs
    // writes nothing.
    if !update_attempt_fenced(tx, &attempt, completion.token, StageStatus::Running).await? {
        return Ok(CompletionOutcome::Stale {
            reason: "the attempt changed while its result was applied".to_owned(),
        });
    }
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
async fn progress_of(conn: &mut Db<'_>, run: RunId) -> StoreResult<RunProgress> {
    let rows: Vec<(i64, String, Option<String>)> =
        sql("SELECT stage_index, status, output FROM stage_attempts WHERE run_id = ? \
         ORDER BY stage_index, attempt, created_at")
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
    conn: &mut Db<'_>,
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
    conn: &mut Db<'_>,
    run: &mut Run,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let (active, gated): (i64, i64) =
        sql("SELECT COUNT(*) FILTER (WHERE status IN ('pending', 'dispatched', 'running')), \
                COUNT(*) FILTER (WHERE status = 'waiting_approval') \
         FROM stage_attempts WHERE run_id = ?")
        .bind(run.id.to_string())
        .fetch_one(conn)
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
    conn: &mut Db<'_>,
    run: &Run,
    reason: &str,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<Vec<StageAttempt>> {
    let query = sql(concat!(
        "SELECT ",
        attempt_columns!(),
        " FROM stage_attempts WHERE run_id = ? ",
        "AND status IN ('pending', 'dispatched', 'running', 'waiting_approval') ORDER BY id"
    ))
    .bind(run.id.to_string())
    .for_update(conn);
    let active: Vec<AttemptRow> = query.fetch_all(conn).await?;
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
    tx: &mut Db<'_>,
    worker: &WorkerId,
    profile: &WorkerProfile,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let agents = serde_json::to_string(&profile.agents).unwrap_or_else(|_| "[]".to_owned());
    // The common case, a heartbeat of a live worker, is one statement and no event.
    let refreshed =
        sql("UPDATE workers SET last_seen_at = ?, agents = ?, version = ?, hostname = ?, \
         concurrency = ?, kind = ? WHERE id = ? AND status = 'live'")
        .bind(now.as_millis())
        .bind(&agents)
        .bind(&profile.version)
        .bind(&profile.hostname)
        .bind(i64::from(profile.concurrency))
        .bind(&profile.kind)
        .bind(worker.as_str())
        .execute(tx)
        .await?;
    if refreshed == 1 {
        return Ok(());
    }
    sql("INSERT INTO workers (id, agents, version, hostname, concurrency, kind, status, \
         registered_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, 'live', ?, ?) \
         ON CONFLICT (id) DO UPDATE SET agents = excluded.agents, version = excluded.version, \
         hostname = excluded.hostname, concurrency = excluded.concurrency, \
         kind = excluded.kind, status = 'live', last_seen_at = excluded.last_seen_at")
    .bind(worker.as_str())
    .bind(&agents)
    .bind(&profile.version)
    .bind(&profile.hostname)
    .bind(i64::from(profile.concurrency))
    .bind(&profile.kind)
    .bind(now.as_millis())
    .bind(now.as_millis())
    .execute(tx)
    .await?;
    events.push(worker_event(worker, EventKind::WorkerJoined, json!({ "profile": profile })));
    Ok(())
}

/// Records that a worker left for good.
async fn gone_in(
    tx: &mut Db<'_>,
    worker: &WorkerId,
    now: Timestamp,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let updated = sql(
        "UPDATE workers SET status = 'gone', last_seen_at = ? WHERE id = ? AND status <> 'gone'",
    )
    .bind(now.as_millis())
    .bind(worker.as_str())
    .execute(tx)
    .await?;
    if updated == 1 {
        events.push(worker_event(worker, EventKind::WorkerLeft, json!({})));
    }
    Ok(())
}

async fn fetch_run(db: &mut Db<'_>, project: &ProjectId, id: RunId) -> StoreResult<Option<Run>> {
    let query =
        sql(concat!("SELECT ", run_columns!(), " FROM runs WHERE project_id = ? AND id = ?"))
            .bind(project.as_str())
            .bind(id.to_string())
            .for_update(db);
    let row: Option<RunRow> = query.fetch_optional(db).await?;
    row.map(Run::try_from).transpose()
}

/// An attempt and its run, for a write to them. On PostgreSQL both rows are locked, the
/// run's first: every write to a run's attempts locks in that order, so writes to one run
/// take turns and never deadlock on each other.
async fn attempt_for_update(
    db: &mut Db<'_>,
    id: AttemptId,
) -> StoreResult<Option<(StageAttempt, Run)>> {
    let Some(attempt) = fetch_attempt(db, id).await? else { return Ok(None) };
    let run = fetch_run(db, &attempt.project_id, attempt.run_id)
        .await?
        .ok_or(StoreError::RunNotFound(attempt.run_id))?;
    if db.for_update().is_empty() {
        return Ok(Some((attempt, run)));
    }
    let query = sql(concat!("SELECT ", attempt_columns!(), " FROM stage_attempts WHERE id = ?"))
        .bind(id.to_string())
        .for_update(db);
    let row: Option<AttemptRow> = query.fetch_optional(db).await?;
    Ok(row.map(StageAttempt::try_from).transpose()?.map(|attempt| (attempt, run)))
}

/// The engine's scans: attempts whose time (`?` #1) has come, oldest first, at most `?` #2.
/// They read through the writer so they see the engine's own latest writes.
async fn scan_attempts(
    db: &mut Db<'_>,
    text: &'static str,
    now: Timestamp,
    limit: u32,
) -> StoreResult<Vec<StageAttempt>> {
    let rows: Vec<AttemptRow> =
        sql(text).bind(now.as_millis()).bind(i64::from(limit)).fetch_all(db).await?;
    rows.into_iter().map(StageAttempt::try_from).collect()
}

async fn fetch_attempt(db: &mut Db<'_>, id: AttemptId) -> StoreResult<Option<StageAttempt>> {
    let row: Option<AttemptRow> =
        sql(concat!("SELECT ", attempt_columns!(), " FROM stage_attempts WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(db)
            .await?;
    row.map(StageAttempt::try_from).transpose()
}

async fn update_run(conn: &mut Db<'_>, run: &Run) -> StoreResult<()> {
    sql("UPDATE runs SET status = ?, error = ?, updated_at = ?, started_at = ?, finished_at = ? \
         WHERE id = ?")
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

async fn update_attempt(conn: &mut Db<'_>, attempt: &StageAttempt) -> StoreResult<()> {
    attempt_update(attempt).execute(conn).await?;
    Ok(())
}

/// Writes an attempt only if its row still has the fencing token `token` and the status
/// `from`; whether it did.
async fn update_attempt_fenced(
    conn: &mut Db<'_>,
    attempt: &StageAttempt,
    token: FencingToken,
    from: StageStatus,
) -> StoreResult<bool> {
    let mut query = attempt_update(attempt);
    query.push(" AND fencing_token = ").push_bind(token.0);
    query.push(" AND status = ").push_bind(from.as_str());
    Ok(query.execute(conn).await? == 1)
}

/// `UPDATE` of every changing column of an attempt, by id.
fn attempt_update(attempt: &StageAttempt) -> Sql<'_> {
    sql("UPDATE stage_attempts SET status = ?, fencing_token = ?, worker_id = ?, \
         available_at = ?, lease_expires_at = ?, deadline_at = ?, output = ?, error = ?, \
         started_at = ?, finished_at = ? WHERE id = ?")
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
}

async fn insert_attempt(
    conn: &mut Db<'_>,
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
    sql("INSERT INTO stage_attempts (id, project_id, run_id, stage, stage_index, agent, attempt, \
         fencing_token, status, available_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
pub(crate) async fn append_events(
    conn: &mut Db<'_>,
    events: Vec<NewEvent>,
    now: Timestamp,
) -> StoreResult<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut query =
        sql("INSERT INTO events (project_id, run_id, attempt_id, environment_id, kind, payload, \
         correlation_id, created_at) ");
    query.push_values(&events, |event| {
        vec![
            event.project_id.as_str().into(),
            event.run_id.map(|id| id.to_string()).into(),
            event.attempt_id.map(|id| id.to_string()).into(),
            event.environment_id.map(|id| id.to_string()).into(),
            event.kind.as_str().into(),
            event.payload.to_string().into(),
            event.correlation_id.map(|id| id.to_string()).into(),
            now.as_millis().into(),
        ]
    });
    query.push(" RETURNING seq");
    let mut seqs: Vec<(i64,)> = query.fetch_all(conn).await?;
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

/// The attempt, if it is an unresolved dead letter of `project`, and its run (both locked
/// on PostgreSQL, so two decisions on one dead letter take turns).
async fn dead_letter(
    conn: &mut Db<'_>,
    project: &ProjectId,
    id: AttemptId,
) -> StoreResult<(StageAttempt, Run)> {
    let found =
        attempt_for_update(conn, id).await?.filter(|(attempt, _)| &attempt.project_id == project);
    let Some((letter, run)) = found else { return Err(StoreError::AttemptNotFound(id)) };
    if letter.status != StageStatus::DeadLettered {
        return Err(StoreError::NotDeadLettered { id, state: format!("it is {}", letter.status) });
    }
    let (resolution,): (Option<String>,) =
        sql("SELECT dlq_resolution FROM stage_attempts WHERE id = ?")
            .bind(id.to_string())
            .fetch_one(conn)
            .await?;
    match resolution {
        Some(resolution) => {
            Err(StoreError::NotDeadLettered { id, state: format!("already {resolution}") })
        }
        None => Ok((letter, run)),
    }
}

async fn set_dlq_resolution(conn: &mut Db<'_>, id: AttemptId, resolution: &str) -> StoreResult<()> {
    sql("UPDATE stage_attempts SET dlq_resolution = ? WHERE id = ?")
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
