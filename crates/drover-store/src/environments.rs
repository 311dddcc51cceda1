//! The store's environment side: environments with their port blocks and desired state,
//! the observed state of service instances, and the audit log. Kept apart from [`Store`]
//! (runs and attempts) because different parts of drover use each.
//!
//! [`Store`]: crate::Store

use async_trait::async_trait;
use drover_domain::{
    AppSpec, AuditEntry, DesiredState, EnvName, EnvStatus, Environment, EnvironmentId, PortBlock,
    ProjectId, ServiceName, ServiceRecord, Timestamp,
};

use crate::StoreResult;

/// An environment to create (in `creating`, desired `running`).
#[derive(Debug, Clone)]
pub struct NewEnvironment {
    /// Chosen by the caller, who may already have made the workspace under it.
    pub id: EnvironmentId,
    pub project_id: ProjectId,
    pub name: EnvName,
    pub workspace: String,
    pub ports: PortBlock,
    pub repo: Option<String>,
    pub branch: Option<String>,
    /// Most live environments the project may have; creation beyond it fails.
    pub quota: u32,
    pub actor: String,
    pub reason: Option<String>,
}

/// Which environments to list: newest first, strictly older than `before`.
#[derive(Debug, Clone, Default)]
pub struct EnvironmentQuery {
    pub before: Option<EnvironmentId>,
    pub limit: u32,
    pub include_deleted: bool,
}

#[async_trait]
pub trait EnvironmentStore: Send + Sync + 'static {
    /// Creates an environment if the project is under its quota and the name is free;
    /// audits it.
    async fn create_environment(
        &self,
        new: NewEnvironment,
        now: Timestamp,
    ) -> StoreResult<Environment>;

    async fn get_environment(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
    ) -> StoreResult<Option<Environment>>;

    /// A live (not deleted) environment by name.
    async fn find_environment(
        &self,
        project: &ProjectId,
        name: &EnvName,
    ) -> StoreResult<Option<Environment>>;

    /// How many of the project's environments are not deleted (what the quota counts).
    async fn count_live_environments(&self, project: &ProjectId) -> StoreResult<u32>;

    async fn list_environments(
        &self,
        project: &ProjectId,
        query: &EnvironmentQuery,
    ) -> StoreResult<Vec<Environment>>;

    /// Records what the user wants the environment to be (start, stop, delete), audited
    /// with actor and reason. Asking for what it already is changes nothing.
    async fn set_desired(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
        desired: DesiredState,
        actor: &str,
        reason: Option<&str>,
        now: Timestamp,
    ) -> StoreResult<Environment>;

    /// All projects: moves an environment to `to` (checked) and appends the event.
    async fn transition_environment(
        &self,
        id: EnvironmentId,
        to: EnvStatus,
        error: Option<String>,
        now: Timestamp,
    ) -> StoreResult<Environment>;

    /// All projects: notes activity (agent work, proxied requests) for idle auto-stop.
    async fn touch_environment(&self, id: EnvironmentId, now: Timestamp) -> StoreResult<()>;

    /// All projects: the port blocks of every live environment.
    async fn used_port_blocks(&self) -> StoreResult<Vec<PortBlock>>;

    /// All projects: every environment not deleted, for the reconciler.
    async fn live_environments(&self) -> StoreResult<Vec<Environment>>;

    /// All projects: running environments meant to run, idle since before `idle_before`.
    async fn idle_environments(&self, idle_before: Timestamp) -> StoreResult<Vec<Environment>>;

    /// All projects: environments stopped (and meant to be) since before `stopped_before`.
    async fn stopped_environments(
        &self,
        stopped_before: Timestamp,
    ) -> StoreResult<Vec<Environment>>;

    /// Records a service instance's observed state; a change of status is an event.
    async fn record_service(&self, record: ServiceRecord) -> StoreResult<()>;

    /// The service instances of an environment (`None`: the shared ones).
    async fn service_records(&self, env: Option<EnvironmentId>) -> StoreResult<Vec<ServiceRecord>>;

    /// All projects: every recorded instance with a process group, for the orphan sweep.
    async fn running_service_records(&self) -> StoreResult<Vec<ServiceRecord>>;

    /// Forgets the instances of an environment (deleted).
    async fn forget_services(&self, env: Option<EnvironmentId>) -> StoreResult<()>;

    /// Adds (or replaces) an app of an environment: a run-time service (a deployed app).
    async fn put_app(&self, env: EnvironmentId, app: &AppSpec, now: Timestamp) -> StoreResult<()>;

    /// Removes an app; whether there was one.
    async fn remove_app(&self, env: EnvironmentId, name: &ServiceName) -> StoreResult<bool>;

    /// The apps of an environment, oldest first.
    async fn apps(&self, env: EnvironmentId) -> StoreResult<Vec<AppSpec>>;

    /// Forgets the apps of an environment (deleted).
    async fn forget_apps(&self, env: EnvironmentId) -> StoreResult<()>;

    async fn list_audit(&self, project: &ProjectId, limit: u32) -> StoreResult<Vec<AuditEntry>>;
}
