//! The SQLite [`EnvironmentStore`].

use async_trait::async_trait;
use drover_domain::{
    AppSpec, AuditEntry, DesiredState, EnvName, EnvStatus, Environment, EnvironmentId, EventKind,
    NewEvent, PortBlock, ProjectId, ServiceName, ServiceRecord, Timestamp,
};
use serde_json::json;
use sqlx::FromRow;

use super::{Backend, Db, SqlStore, corrupt, sql};
use crate::{EnvironmentQuery, EnvironmentStore, NewEnvironment, StoreError, StoreResult};

macro_rules! env_columns {
    () => {
        "id, project_id, name, status, desired, workspace, port_base, port_count, repo, branch, \
         error, created_at, updated_at, last_active_at"
    };
}

const SHARED: &str = "";

fn env_event(env: &Environment, payload: serde_json::Value) -> NewEvent {
    NewEvent {
        project_id: env.project_id.clone(),
        run_id: None,
        attempt_id: None,
        environment_id: Some(env.id),
        kind: EventKind::Env(env.status),
        payload,
        correlation_id: None,
    }
}

async fn audit(
    conn: &mut Db<'_>,
    project: &ProjectId,
    actor: &str,
    action: &str,
    target: &str,
    reason: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    let entry = crate::NewAudit { project: project.as_str(), actor, action, target, reason };
    super::identities::audit_in(conn, &entry, now).await
}

async fn fetch_env(conn: &mut Db<'_>, id: EnvironmentId) -> StoreResult<Option<Environment>> {
    let row: Option<EnvRow> =
        sql(concat!("SELECT ", env_columns!(), " FROM environments WHERE id = ?"))
            .bind(id.to_string())
            .for_update(conn)
            .fetch_optional(conn)
            .await?;
    row.map(Environment::try_from).transpose()
}

async fn save_env(conn: &mut Db<'_>, env: &Environment) -> StoreResult<()> {
    sql("UPDATE environments SET status = ?, desired = ?, error = ?, updated_at = ?, \
         last_active_at = ? WHERE id = ?")
    .bind(env.status.as_str())
    .bind(env.desired.as_str())
    .bind(env.error.as_deref())
    .bind(env.updated_at.as_millis())
    .bind(env.last_active_at.as_millis())
    .bind(env.id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

impl<B: Backend> SqlStore<B> {
    async fn envs_where(&self, text: &'static str, at: Timestamp) -> StoreResult<Vec<Environment>> {
        let rows: Vec<EnvRow> = sql(text).bind(at.as_millis()).fetch_all(&mut self.read()).await?;
        rows.into_iter().map(Environment::try_from).collect()
    }
}

#[async_trait]
impl<B: Backend> EnvironmentStore for SqlStore<B> {
    async fn create_environment(
        &self,
        new: NewEnvironment,
        now: Timestamp,
    ) -> StoreResult<Environment> {
        let env = Environment {
            id: new.id,
            project_id: new.project_id.clone(),
            name: new.name.clone(),
            status: EnvStatus::Creating,
            desired: DesiredState::Running,
            workspace: new.workspace.clone(),
            ports: new.ports,
            repo: new.repo.clone(),
            branch: new.branch.clone(),
            error: None,
            created_at: now,
            updated_at: now,
            last_active_at: now,
        };
        self.transaction(now, async |tx, events| {
            // On PostgreSQL the project's row is locked first, so concurrent creations in
            // one project count their quota in turn.
            sql("SELECT id FROM projects WHERE id = ?")
                .bind(new.project_id.as_str())
                .for_update(tx)
                .fetch_optional::<(String,)>(tx)
                .await?;
            let (live,): (i64,) = sql(
                "SELECT COUNT(*) FROM environments WHERE project_id = ? AND status <> 'deleted' \
                 AND name <> 'deployments' AND name NOT LIKE 'run-%'",
            )
            .bind(new.project_id.as_str())
            .fetch_one(tx)
            .await?;
            if live >= i64::from(new.quota) {
                return Err(StoreError::EnvironmentQuotaExceeded { limit: new.quota });
            }
            let inserted = sql(concat!(
                "INSERT INTO environments (",
                env_columns!(),
                ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(env.id.to_string())
            .bind(env.project_id.as_str())
            .bind(env.name.as_str())
            .bind(env.status.as_str())
            .bind(env.desired.as_str())
            .bind(&env.workspace)
            .bind(i64::from(env.ports.base))
            .bind(i64::from(env.ports.size))
            .bind(env.repo.as_deref())
            .bind(env.branch.as_deref())
            .bind(None::<String>)
            .bind(now.as_millis())
            .bind(now.as_millis())
            .bind(now.as_millis())
            .execute(tx)
            .await;
            if let Err(StoreError::Database(sqlx::Error::Database(err))) = &inserted
                && err.is_unique_violation()
            {
                // SQLite names the columns, PostgreSQL the index.
                let on_ports = err.message().contains("port_base")
                    || err.constraint().is_some_and(|index| index.contains("port_base"));
                return Err(if on_ports {
                    StoreError::PortBlockTaken { base: env.ports.base }
                } else {
                    StoreError::EnvironmentNameTaken(new.name.to_string())
                });
            }
            inserted?;
            audit(
                tx,
                &env.project_id,
                &new.actor,
                "environment.create",
                &env.id.to_string(),
                new.reason.as_deref(),
                now,
            )
            .await?;
            let event = env_event(
                &env,
                json!({ "name": env.name, "ports": env.ports, "workspace": env.workspace }),
            );
            events.extend(vec![event]);
            Ok(env)
        })
        .await
    }

    async fn get_environment(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
    ) -> StoreResult<Option<Environment>> {
        let row: Option<EnvRow> = sql(concat!(
            "SELECT ",
            env_columns!(),
            " FROM environments WHERE project_id = ? AND id = ?"
        ))
        .bind(project.as_str())
        .bind(id.to_string())
        .fetch_optional(&mut self.read())
        .await?;
        row.map(Environment::try_from).transpose()
    }

    async fn find_environment(
        &self,
        project: &ProjectId,
        name: &EnvName,
    ) -> StoreResult<Option<Environment>> {
        let row: Option<EnvRow> = sql(concat!(
            "SELECT ",
            env_columns!(),
            " FROM environments WHERE project_id = ? AND name = ? AND status <> 'deleted'"
        ))
        .bind(project.as_str())
        .bind(name.as_str())
        .fetch_optional(&mut self.read())
        .await?;
        row.map(Environment::try_from).transpose()
    }

    async fn count_live_environments(&self, project: &ProjectId) -> StoreResult<u32> {
        let (live,): (i64,) =
            sql("SELECT COUNT(*) FROM environments WHERE project_id = ? AND status <> 'deleted' \
             AND name <> 'deployments' AND name NOT LIKE 'run-%'")
            .bind(project.as_str())
            .fetch_one(&mut self.read())
            .await?;
        Ok(u32::try_from(live).unwrap_or(u32::MAX))
    }

    async fn list_environments(
        &self,
        project: &ProjectId,
        query: &EnvironmentQuery,
    ) -> StoreResult<Vec<Environment>> {
        let mut statement =
            sql(concat!("SELECT ", env_columns!(), " FROM environments WHERE project_id = ?"))
                .bind(project.as_str());
        if !query.include_deleted {
            statement.push(" AND status <> 'deleted'");
        }
        if let Some(before) = query.before {
            statement.push(" AND id < ").push_bind(before.to_string());
        }
        statement.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<EnvRow> = statement.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(Environment::try_from).collect()
    }

    async fn set_desired(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
        desired: DesiredState,
        actor: &str,
        reason: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<Environment> {
        self.with_tx(async |tx| {
            let mut env = fetch_env(tx, id)
                .await?
                .filter(|env| &env.project_id == project)
                .ok_or_else(|| StoreError::EnvironmentNotFound(id.to_string()))?;
            let action = match desired {
                DesiredState::Running => "start",
                DesiredState::Stopped => "stop",
                DesiredState::Deleted => "delete",
            };
            if env.desired == DesiredState::Deleted && desired != DesiredState::Deleted {
                return Err(StoreError::EnvironmentBusy { id, status: env.status, action });
            }
            if env.desired != desired {
                env.desired = desired;
                env.updated_at = now;
                if desired == DesiredState::Running {
                    // Starting counts as activity: idle time starts over.
                    env.last_active_at = now;
                }
                save_env(tx, &env).await?;
            }
            audit(
                tx,
                project,
                actor,
                &format!("environment.{action}"),
                &id.to_string(),
                reason,
                now,
            )
            .await?;
            Ok(env)
        })
        .await
    }

    async fn transition_environment(
        &self,
        id: EnvironmentId,
        to: EnvStatus,
        error: Option<String>,
        now: Timestamp,
    ) -> StoreResult<Environment> {
        self.transaction(now, async |tx, events| {
            let mut env = fetch_env(tx, id)
                .await?
                .ok_or_else(|| StoreError::EnvironmentNotFound(id.to_string()))?;
            if env.status == to && env.error == error {
                return Ok(env);
            }
            if env.status != to {
                env.status = env.status.become_(to)?;
            }
            env.error.clone_from(&error);
            env.updated_at = now;
            save_env(tx, &env).await?;
            events.extend(vec![env_event(&env, json!({ "error": error }))]);
            Ok(env)
        })
        .await
    }

    async fn touch_environment(&self, id: EnvironmentId, now: Timestamp) -> StoreResult<()> {
        sql("UPDATE environments SET last_active_at = ? WHERE id = ? AND last_active_at < ?")
            .bind(now.as_millis())
            .bind(id.to_string())
            .bind(now.as_millis())
            .execute(&mut self.writer().await.db())
            .await?;
        Ok(())
    }

    async fn used_port_blocks(&self) -> StoreResult<Vec<PortBlock>> {
        let rows: Vec<(i64, i64)> =
            sql("SELECT port_base, port_count FROM environments WHERE status <> 'deleted'")
                .fetch_all(&mut self.read())
                .await?;
        rows.into_iter()
            .map(|(base, size)| {
                Ok(PortBlock {
                    base: u16::try_from(base).map_err(|e| corrupt("environments.port_base", e))?,
                    size: u16::try_from(size).map_err(|e| corrupt("environments.port_count", e))?,
                })
            })
            .collect()
    }

    async fn live_environments(&self) -> StoreResult<Vec<Environment>> {
        let rows: Vec<EnvRow> = sql(concat!(
            "SELECT ",
            env_columns!(),
            " FROM environments WHERE status <> 'deleted' ORDER BY id"
        ))
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(Environment::try_from).collect()
    }

    async fn idle_environments(&self, idle_before: Timestamp) -> StoreResult<Vec<Environment>> {
        self.envs_where(
            concat!(
                "SELECT ",
                env_columns!(),
                " FROM environments WHERE status = 'running' AND desired = 'running' AND last_active_at < ? AND name <> 'deployments' AND name NOT LIKE 'run-%'"
            ),
            idle_before,
        )
        .await
    }

    async fn stopped_environments(
        &self,
        stopped_before: Timestamp,
    ) -> StoreResult<Vec<Environment>> {
        self.envs_where(
            concat!(
                "SELECT ",
                env_columns!(),
                " FROM environments WHERE status = 'stopped' AND desired = 'stopped' AND updated_at < ? AND name <> 'deployments' AND name NOT LIKE 'run-%'"
            ),
            stopped_before,
        )
        .await
    }

    async fn record_service(&self, record: ServiceRecord) -> StoreResult<()> {
        let env_key = record.environment_id.map_or_else(|| SHARED.to_owned(), |id| id.to_string());
        self.transaction(record.updated_at, async |tx, events| {
            let query = sql(
                "SELECT status FROM service_instances WHERE environment_id = ? AND service = ?",
            )
            .bind(&env_key)
            .bind(record.service.as_str())
            .for_update(tx);
            let previous: Option<(String,)> = query.fetch_optional(tx).await?;
            sql("INSERT INTO service_instances (environment_id, service, status, pid, restarts, \
                 reason, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (environment_id, service) DO UPDATE SET \
                 status = excluded.status, pid = excluded.pid, restarts = excluded.restarts, \
                 reason = excluded.reason, updated_at = excluded.updated_at")
            .bind(&env_key)
            .bind(record.service.as_str())
            .bind(record.status.as_str())
            .bind(record.pid.map(i64::from))
            .bind(i64::from(record.restarts))
            .bind(record.reason.as_deref())
            .bind(record.updated_at.as_millis())
            .execute(tx)
            .await?;
            let changed = previous.is_none_or(|(status,)| status != record.status.as_str());
            if changed {
                let project = match record.environment_id {
                    Some(id) => fetch_env(tx, id).await?.map(|env| env.project_id),
                    None => None,
                }
                .unwrap_or_else(ProjectId::default_project);
                let event = NewEvent {
                    project_id: project,
                    run_id: None,
                    attempt_id: None,
                    environment_id: record.environment_id,
                    kind: EventKind::Service(record.status),
                    payload: json!({
                        "service": record.service,
                        "pid": record.pid,
                        "restarts": record.restarts,
                        "reason": record.reason,
                        "shared": record.environment_id.is_none(),
                    }),
                    correlation_id: None,
                };
                events.push(event);
            }
            Ok(())
        })
        .await
    }

    async fn service_records(&self, env: Option<EnvironmentId>) -> StoreResult<Vec<ServiceRecord>> {
        let key = env.map_or_else(|| SHARED.to_owned(), |id| id.to_string());
        let rows: Vec<ServiceRow> =
            sql("SELECT environment_id, service, status, pid, restarts, reason, updated_at \
             FROM service_instances WHERE environment_id = ? ORDER BY service")
            .bind(key)
            .fetch_all(&mut self.read())
            .await?;
        rows.into_iter().map(ServiceRecord::try_from).collect()
    }

    async fn running_service_records(&self) -> StoreResult<Vec<ServiceRecord>> {
        let rows: Vec<ServiceRow> =
            sql("SELECT environment_id, service, status, pid, restarts, reason, updated_at \
             FROM service_instances WHERE pid IS NOT NULL")
            .fetch_all(&mut self.read())
            .await?;
        rows.into_iter().map(ServiceRecord::try_from).collect()
    }

    async fn forget_services(&self, env: Option<EnvironmentId>) -> StoreResult<()> {
        let key = env.map_or_else(|| SHARED.to_owned(), |id| id.to_string());
        sql("DELETE FROM service_instances WHERE environment_id = ?")
            .bind(key)
            .execute(&mut self.writer().await.db())
            .await?;
        Ok(())
    }

    async fn put_app(&self, env: EnvironmentId, app: &AppSpec, now: Timestamp) -> StoreResult<()> {
        let spec = serde_json::to_string(app).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sql("INSERT INTO environment_apps (environment_id, name, run_id, spec, created_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (environment_id, name) DO UPDATE SET \
             spec = excluded.spec, created_at = excluded.created_at")
        .bind(env.to_string())
        .bind(app.name.as_str())
        .bind(app.run_id.to_string())
        .bind(spec)
        .bind(now.as_millis())
        .execute(&mut self.writer().await.db())
        .await?;
        Ok(())
    }

    async fn remove_app(&self, env: EnvironmentId, name: &ServiceName) -> StoreResult<bool> {
        let removed = sql("DELETE FROM environment_apps WHERE environment_id = ? AND name = ?")
            .bind(env.to_string())
            .bind(name.as_str())
            .execute(&mut self.writer().await.db())
            .await?;
        Ok(removed > 0)
    }

    async fn apps(&self, env: EnvironmentId) -> StoreResult<Vec<AppSpec>> {
        let rows: Vec<(String,)> = sql(
            "SELECT spec FROM environment_apps WHERE environment_id = ? ORDER BY created_at, name",
        )
        .bind(env.to_string())
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter()
            .map(|(spec,)| {
                serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt(format!("app: {e}")))
            })
            .collect()
    }

    async fn forget_apps(&self, env: EnvironmentId) -> StoreResult<()> {
        sql("DELETE FROM environment_apps WHERE environment_id = ?")
            .bind(env.to_string())
            .execute(&mut self.writer().await.db())
            .await?;
        Ok(())
    }

    async fn list_audit(&self, project: &ProjectId, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        crate::IdentityStore::list_audit_entries(self, Some(project.as_str()), None, limit).await
    }
}

#[derive(FromRow)]
struct EnvRow {
    id: String,
    project_id: String,
    name: String,
    status: String,
    desired: String,
    workspace: String,
    port_base: i64,
    port_count: i64,
    repo: Option<String>,
    branch: Option<String>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    last_active_at: i64,
}

impl TryFrom<EnvRow> for Environment {
    type Error = StoreError;

    fn try_from(row: EnvRow) -> Result<Self, Self::Error> {
        Ok(Environment {
            id: row.id.parse().map_err(|e| corrupt("environments.id", e))?,
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("environments.project_id", e))?,
            name: EnvName::parse(row.name).map_err(|e| corrupt("environments.name", e))?,
            status: row.status.parse().map_err(|e| corrupt("environments.status", e))?,
            desired: row.desired.parse().map_err(|e| corrupt("environments.desired", e))?,
            workspace: row.workspace,
            ports: PortBlock {
                base: u16::try_from(row.port_base)
                    .map_err(|e| corrupt("environments.port_base", e))?,
                size: u16::try_from(row.port_count)
                    .map_err(|e| corrupt("environments.port_count", e))?,
            },
            repo: row.repo,
            branch: row.branch,
            error: row.error,
            created_at: Timestamp::from_millis(row.created_at),
            updated_at: Timestamp::from_millis(row.updated_at),
            last_active_at: Timestamp::from_millis(row.last_active_at),
        })
    }
}

#[derive(FromRow)]
struct ServiceRow {
    environment_id: String,
    service: String,
    status: String,
    pid: Option<i64>,
    restarts: i64,
    reason: Option<String>,
    updated_at: i64,
}

impl TryFrom<ServiceRow> for ServiceRecord {
    type Error = StoreError;

    fn try_from(row: ServiceRow) -> Result<Self, Self::Error> {
        Ok(ServiceRecord {
            environment_id: if row.environment_id.is_empty() {
                None
            } else {
                Some(
                    row.environment_id
                        .parse()
                        .map_err(|e| corrupt("service_instances.environment_id", e))?,
                )
            },
            service: ServiceName::parse(row.service)
                .map_err(|e| corrupt("service_instances.service", e))?,
            status: row.status.parse().map_err(|e| corrupt("service_instances.status", e))?,
            pid: row
                .pid
                .map(|pid| u32::try_from(pid).map_err(|e| corrupt("service_instances.pid", e)))
                .transpose()?,
            restarts: u32::try_from(row.restarts)
                .map_err(|e| corrupt("service_instances.restarts", e))?,
            reason: row.reason,
            updated_at: Timestamp::from_millis(row.updated_at),
        })
    }
}
