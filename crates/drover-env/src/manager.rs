//! The environment manager: creates environments (workspace, port block, setup hook),
//! records what users want (start, stop, delete) and runs the reconcile loop that makes
//! the running services match it — also after a crash, when it first sweeps away what a
//! killed server left running. It also stops idle environments and deletes long-stopped
//! ones.
//!
//! Given a [`SecretSource`] ([`EnvManager::with_secrets`]), the per-environment services it
//! starts get their environment's project's secrets as environment variables, read at each
//! start of their process and redacted from their output (see [`crate::secrets`]). Shared
//! services serve every project and get none; nor do the apps of the `deployments`
//! environment, which are deployed with the variables the deploy stage gave them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use drover_domain::{
    AppSpec, CustomRoute, DEPLOYMENTS_ENV, DesiredState, EnvName, EnvStatus, Environment,
    EnvironmentId, PlaceholderValues, PortBlock, ProbeKind, ProjectId, RUN_ENV_PREFIX, Readiness,
    RestartPolicy, RestartRules, RunId, ServiceName, ServiceRecord, ServiceSpec, ServiceStatus,
    Sharing, Timestamp, expand_placeholders, is_system_environment,
};
use drover_store::{EnvironmentQuery, EnvironmentStore, NewEnvironment, StoreError};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{Mutex, Notify, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::provider::Provider;
use crate::secrets::{InstanceSecrets, SecretSource};
use crate::supervisor::{
    Instance, InstanceKey, InstancePlan, InstanceState, Reporter, start_instance,
};
use crate::{CommandSpec, Layout, resources, workspace};

/// The env var every service process carries, naming its instance: how a restarted
/// server recognises processes a killed one left behind.
pub const INSTANCE_VAR: &str = "DROVER_INSTANCE";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no free block of {size} ports in {start}-{end}: live environments (or other programs) \
         hold them all; wait for runs to end, delete environments, or widen \
         [environments] port_range_start/port_range_end"
    )]
    NoFreePorts { size: u16, start: u16, end: u16 },
    #[error("the workspace could not be prepared: {0}")]
    Workspace(String),
    #[error("refusing to delete: {0}; pass --force to delete anyway")]
    UnmergedWork(String),
    #[error("environment {0} not found")]
    NotFound(String),
    #[error("service `{service}` is not running in environment {environment}")]
    ServiceNotFound { environment: String, service: String },
    #[error("`{0}` is reserved for the environment deployed apps run in")]
    ReservedName(String),
}

/// How environments are laid out and looked after.
#[derive(Debug, Clone)]
pub struct EnvSettings {
    pub data_dir: PathBuf,
    pub port_range: (u16, u16),
    pub block_size: u16,
    pub quota: u32,
    /// Zero: never.
    pub idle_timeout: Duration,
    /// Zero: never.
    pub delete_after: Duration,
    pub setup_command: String,
    pub copy_files: Vec<String>,
    /// Deployed apps kept running per project; deploying one more undeploys the oldest.
    pub max_apps: usize,
    /// How often the reconciler looks when nothing woke it.
    pub reconcile_interval: Duration,
}

/// A request to create an environment.
#[derive(Debug, Clone, Default)]
pub struct CreateEnvironment {
    pub name: Option<EnvName>,
    /// Make the workspace a git worktree of this repository...
    pub repo: Option<PathBuf>,
    /// ...branched from this (default: its current HEAD).
    pub base: Option<String>,
    /// A workspace directory of drover's choosing outside the environment's own directory
    /// (a run's), which deleting the environment leaves in place.
    pub workspace: Option<PathBuf>,
    pub actor: String,
    pub reason: Option<String>,
}

/// A service instance as reported to users.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub name: ServiceName,
    pub environment: Option<EnvironmentId>,
    pub sharing: Sharing,
    pub state: InstanceState,
    pub ports: BTreeMap<String, u16>,
    pub hostname: String,
    pub rss_bytes: u64,
    pub log_path: PathBuf,
}

/// A hostname the proxy should route, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    pub host: String,
    pub upstream: SocketAddr,
    pub service: String,
    /// The project of the environment it leads to: only its members are shown the route.
    /// None for a shared service, which serves every project.
    pub project: Option<ProjectId>,
    pub environment: Option<EnvironmentId>,
    pub environment_name: Option<String>,
    pub kind: RouteKind,
    /// The instance behind it.
    pub instance: InstanceKey,
}

/// Why a hostname is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// `<service>.<env>[.<project>].localhost` or, shared, `<service>.localhost`.
    Service,
    /// A deployed app: `app.run-<id>.localhost`.
    App,
    /// A name from `[routes]`.
    Custom,
}

/// How many times a creation passes over a block another server took meanwhile before it
/// gives up (each time it also re-reads the blocks in use).
const MAX_PORT_RETRIES: usize = 64;

/// A port block chosen for an environment being created; released when dropped (the
/// environment is in the store by then, or its creation failed).
struct PortReservation<'a> {
    manager: &'a EnvManager,
    block: PortBlock,
}

impl Drop for PortReservation<'_> {
    fn drop(&mut self) {
        let mut reserved =
            self.manager.reserved_blocks.lock().unwrap_or_else(|poison| poison.into_inner());
        reserved.remove(&self.block.base);
    }
}

struct Running {
    instance: Instance,
    ports: BTreeMap<String, u16>,
    hostname: String,
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// The environment manager. Share it behind an `Arc`.
pub struct EnvManager {
    store: Arc<dyn EnvironmentStore>,
    settings: EnvSettings,
    services: Vec<ServiceSpec>,
    provider: Arc<dyn Provider>,
    instances: Mutex<HashMap<InstanceKey, Running>>,
    wake: Notify,
    routes: watch::Sender<Vec<ServiceRoute>>,
    /// `[routes]`: resolved against running instances whenever routes are published.
    custom_routes: std::sync::RwLock<Vec<CustomRoute>>,
    /// Its loops run (`spawn`): environments it creates will be brought up.
    active: std::sync::atomic::AtomicBool,
    /// Whether this server holds the leader lease, when servers share the store: the
    /// idle/expiry sweep then runs on the leader only.
    leader: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
    /// Where per-environment services get their project's secrets (none without).
    secrets: Option<Arc<dyn SecretSource>>,
    /// Port blocks chosen for environments whose creation is under way (workspace, setup
    /// hook) and not yet in the store: creations at once never choose the same block.
    reserved_blocks: std::sync::Mutex<BTreeSet<u16>>,
    /// Held while the deployments environments' apps change (deploy, undeploy, reconcile,
    /// stop): a change sees the store and the running instances agree.
    deploy_lock: Mutex<()>,
    /// Per project, `max_apps` slots for deploys under way.
    deploy_slots: std::sync::Mutex<HashMap<ProjectId, Arc<Semaphore>>>,
    /// Runs whose deploy is under way: their apps are never undeployed to make room.
    pins: Arc<std::sync::Mutex<HashSet<RunId>>>,
}

/// A deploy under way: while held, the run's app is not undeployed to make room for
/// another, and it holds one of its project's `max_apps` deploy slots.
pub struct DeployPin {
    run: RunId,
    pins: Arc<std::sync::Mutex<HashSet<RunId>>>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl std::fmt::Debug for DeployPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployPin").field("run", &self.run).finish_non_exhaustive()
    }
}

impl Drop for DeployPin {
    fn drop(&mut self) {
        self.pins.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&self.run);
    }
}

/// Records every service state change in the store.
struct StoreReporter {
    store: Arc<dyn EnvironmentStore>,
}

#[async_trait]
impl Reporter for StoreReporter {
    async fn report(&self, key: &InstanceKey, state: &InstanceState) {
        let record = ServiceRecord {
            environment_id: key.environment,
            service: key.service.clone(),
            status: state.status,
            pid: state.pid,
            restarts: state.restarts,
            reason: state.reason.clone(),
            updated_at: now(),
        };
        if let Err(err) = self.store.record_service(record).await {
            tracing::warn!(instance = %key, error = %err, "cannot record a service state");
        }
        metrics::counter!("drover_env_service_states_total", "status" => state.status.to_string())
            .increment(1);
    }
}

impl EnvManager {
    pub fn new(
        store: Arc<dyn EnvironmentStore>,
        settings: EnvSettings,
        services: Vec<ServiceSpec>,
        provider: Arc<dyn Provider>,
    ) -> Self {
        Self {
            store,
            settings,
            services: dependencies_first(services),
            provider,
            instances: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            routes: watch::Sender::new(Vec::new()),
            custom_routes: std::sync::RwLock::new(Vec::new()),
            active: std::sync::atomic::AtomicBool::new(false),
            leader: std::sync::OnceLock::new(),
            secrets: None,
            reserved_blocks: std::sync::Mutex::new(BTreeSet::new()),
            deploy_lock: Mutex::new(()),
            deploy_slots: std::sync::Mutex::new(HashMap::new()),
            pins: Arc::new(std::sync::Mutex::new(HashSet::new())),
        }
    }

    /// Gives per-environment services their project's secrets from `source`, read at every
    /// start of a service's process (so restarting it picks up a changed secret) and
    /// redacted from its log and live output.
    #[must_use]
    pub fn with_secrets(mut self, source: Arc<dyn SecretSource>) -> Self {
        self.secrets = Some(source);
        self
    }

    /// Whether the reconcile loop runs here (a server in full mode), so that environments
    /// created now come up.
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn store(&self) -> &Arc<dyn EnvironmentStore> {
        &self.store
    }

    /// Routes for the proxy, updated as instances start and stop.
    pub fn routes(&self) -> watch::Receiver<Vec<ServiceRoute>> {
        self.routes.subscribe()
    }

    /// Sets the custom hostnames (`[routes]`); each is routed while its service runs.
    pub async fn set_custom_routes(&self, routes: Vec<CustomRoute>) {
        *self.custom_routes.write().unwrap_or_else(|poison| poison.into_inner()) = routes;
        self.publish_routes().await;
    }

    /// What an instance is doing, in a few words (`backoff: exited with status 1, 2
    /// restarts`), for error messages about it.
    pub async fn describe_instance(&self, key: &InstanceKey) -> Option<String> {
        let state = self.instances.lock().await.get(key)?.instance.state();
        let mut text = state.status.to_string();
        if let Some(reason) = &state.reason {
            text.push_str(": ");
            text.push_str(reason);
        }
        if state.restarts > 0 {
            text.push_str(&format!(", {} restarts", state.restarts));
        }
        Some(text)
    }

    /// The custom hostnames, routed or not.
    pub fn custom_routes(&self) -> Vec<CustomRoute> {
        self.custom_routes.read().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    fn env_dir(&self, id: EnvironmentId) -> PathBuf {
        self.settings.data_dir.join("envs").join(id.to_string())
    }

    fn shared_log(&self, service: &ServiceName) -> PathBuf {
        self.settings.data_dir.join("shared").join(format!("{service}.log"))
    }

    /// Creates an environment: port block, workspace (directory or git worktree), setup
    /// hook, then the reconciler starts its services.
    pub async fn create(
        &self,
        project: &ProjectId,
        request: CreateEnvironment,
    ) -> Result<Environment, EnvError> {
        if let Some(name) = &request.name
            && is_system_environment(name.as_str())
        {
            return Err(EnvError::ReservedName(name.to_string()));
        }
        if request.workspace.is_some() {
            return Err(EnvError::Workspace("only drover places workspaces elsewhere".to_owned()));
        }
        self.create_as(project, request, false).await
    }

    /// The environment a run executes in when it names none: `run-<12 hex of its id>`, its
    /// workspace the run's own directory (kept when the environment goes), its own port
    /// block and per-environment services. Outside the quota; deleted when the run ends.
    pub async fn create_for_run(
        &self,
        project: &ProjectId,
        run: RunId,
    ) -> Result<Environment, EnvError> {
        let simple = run.as_uuid().simple().to_string();
        let name = EnvName::parse(format!("{RUN_ENV_PREFIX}{}", &simple[simple.len() - 12..]))
            .map_err(|e| EnvError::Workspace(e.message))?;
        let request = CreateEnvironment {
            name: Some(name),
            workspace: Some(Layout::new(&self.settings.data_dir).workspace(run)),
            actor: "drover".to_owned(),
            reason: Some(format!("run {run}")),
            ..CreateEnvironment::default()
        };
        self.create_as(project, request, true).await
    }

    /// Deletes a run's environment once its run has ended (its workspace stays: the run's
    /// files and the deployed app live there).
    pub async fn release_run_environment(&self, id: EnvironmentId) -> Result<(), EnvError> {
        let Some(env) = self.store.live_environments().await?.into_iter().find(|e| e.id == id)
        else {
            return Ok(());
        };
        if !env.name.as_str().starts_with(RUN_ENV_PREFIX) || env.desired == DesiredState::Deleted {
            return Ok(());
        }
        self.store
            .set_desired(
                &env.project_id,
                env.id,
                DesiredState::Deleted,
                "drover",
                Some("its run ended"),
                now(),
            )
            .await?;
        self.wake.notify_one();
        Ok(())
    }

    /// The live environments drover made for runs.
    pub async fn run_environments(&self) -> Result<Vec<Environment>, EnvError> {
        let mut envs = self.store.live_environments().await?;
        envs.retain(|env| {
            env.name.as_str().starts_with(RUN_ENV_PREFIX) && env.desired != DesiredState::Deleted
        });
        Ok(envs)
    }

    /// Creates an environment; a `system` one (the deployments environment) counts towards
    /// no quota.
    async fn create_as(
        &self,
        project: &ProjectId,
        request: CreateEnvironment,
        system: bool,
    ) -> Result<Environment, EnvError> {
        let id = EnvironmentId::new();
        let name = match request.name {
            Some(name) => name,
            None => {
                let simple = id.as_uuid().simple().to_string();
                EnvName::parse(format!("env-{}", &simple[simple.len() - 6..]))
                    .map_err(|e| EnvError::Workspace(e.message))?
            }
        };
        if self.store.find_environment(project, &name).await?.is_some() {
            return Err(StoreError::EnvironmentNameTaken(name.to_string()).into());
        }
        // Checked here so a project over its quota costs no ports or workspace; the store
        // checks again, atomically with the insert, for creations racing this one.
        if !system && self.store.count_live_environments(project).await? >= self.settings.quota {
            return Err(StoreError::EnvironmentQuotaExceeded { limit: self.settings.quota }.into());
        }
        let mut ports = self.reserve_ports(&BTreeSet::new()).await?;
        let dir = self.env_dir(id);
        let workspace_path = request.workspace.clone().unwrap_or_else(|| dir.join("workspace"));
        let mut branch = None;
        let prepared = async {
            match &request.repo {
                Some(repo) => {
                    let new_branch = format!("drover/{name}");
                    workspace::add_worktree(
                        repo,
                        &workspace_path,
                        &new_branch,
                        request.base.as_deref(),
                    )
                    .await?;
                    workspace::copy_files(repo, &workspace_path, &self.settings.copy_files).await?;
                    branch = Some(new_branch);
                }
                None => {
                    tokio::fs::create_dir_all(&workspace_path).await.map_err(|e| e.to_string())?;
                }
            }
            workspace::run_setup(
                &workspace_path,
                &self.settings.setup_command,
                &dir.join("setup.log"),
            )
            .await
        }
        .await;
        if let Err(message) = prepared {
            let _ = self.remove_workspace(request.repo.as_deref(), &workspace_path, true).await;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(EnvError::Workspace(message));
        }
        let mut new = NewEnvironment {
            id,
            project_id: project.clone(),
            name,
            workspace: workspace_path.display().to_string(),
            ports: ports.block,
            repo: request.repo.as_ref().map(|r| r.display().to_string()),
            branch,
            quota: if system { u32::MAX } else { self.settings.quota },
            actor: request.actor,
            reason: request.reason,
        };
        // The store's unique index on live blocks is the arbiter: a block another server
        // took since it was chosen is passed over for the next free one.
        let mut taken = BTreeSet::new();
        let created = loop {
            match self.store.create_environment(new.clone(), now()).await {
                Err(StoreError::PortBlockTaken { base }) if taken.len() < MAX_PORT_RETRIES => {
                    tracing::debug!(base, "port block taken meanwhile; choosing the next");
                    taken.insert(base);
                    match self.reserve_ports(&taken).await {
                        Ok(next) => {
                            new.ports = next.block;
                            ports = next;
                        }
                        Err(err) => break Err(err),
                    }
                }
                other => break other.map_err(EnvError::from),
            }
        };
        drop(ports);
        match created {
            Ok(env) => {
                self.wake.notify_one();
                Ok(env)
            }
            Err(err) => {
                let _ = self.remove_workspace(request.repo.as_deref(), &workspace_path, true).await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
                Err(err)
            }
        }
    }

    /// Reserves the first aligned block in the range that overlaps no live environment's,
    /// none this manager has reserved for a creation still under way, none in `taken`, and
    /// whose ports are all free right now. The reservation lasts until the guard drops,
    /// by when the environment is in the store (or its creation failed).
    async fn reserve_ports(&self, taken: &BTreeSet<u16>) -> Result<PortReservation<'_>, EnvError> {
        let (start, end) = self.settings.port_range;
        let size = self.settings.block_size;
        let used = self.store.used_port_blocks().await?;
        let mut reserved = self.reserved_blocks.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut base = start;
        while u32::from(base) + u32::from(size) - 1 <= u32::from(end) {
            let candidate = PortBlock { base, size };
            let free = !taken.contains(&base)
                && !reserved.contains(&base)
                && !used.iter().any(|block| block.overlaps(candidate))
                && candidate
                    .ports()
                    .all(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
            if free {
                reserved.insert(base);
                return Ok(PortReservation { manager: self, block: candidate });
            }
            base = match base.checked_add(size) {
                Some(next) => next,
                None => break,
            };
        }
        Err(EnvError::NoFreePorts { size, start, end })
    }

    pub async fn find(
        &self,
        project: &ProjectId,
        id_or_name: &str,
    ) -> Result<Environment, EnvError> {
        let found = match id_or_name.parse::<EnvironmentId>() {
            Ok(id) => self.store.get_environment(project, id).await?,
            Err(_) => match EnvName::parse(id_or_name) {
                Ok(name) => self.store.find_environment(project, &name).await?,
                Err(_) => None,
            },
        };
        found.ok_or_else(|| EnvError::NotFound(id_or_name.to_owned()))
    }

    pub async fn list(
        &self,
        project: &ProjectId,
        query: &EnvironmentQuery,
    ) -> Result<Vec<Environment>, EnvError> {
        Ok(self.store.list_environments(project, query).await?)
    }

    /// Asks for the environment to run (idempotent).
    pub async fn start(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<Environment, EnvError> {
        let env = self
            .store
            .set_desired(project, id, DesiredState::Running, actor, reason, now())
            .await?;
        self.wake.notify_one();
        Ok(env)
    }

    /// Asks for the environment to stop (idempotent).
    pub async fn stop(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<Environment, EnvError> {
        let env = self
            .store
            .set_desired(project, id, DesiredState::Stopped, actor, reason, now())
            .await?;
        self.wake.notify_one();
        Ok(env)
    }

    /// Asks for the environment to be deleted. A worktree with work not merged anywhere
    /// is kept unless `force`.
    pub async fn delete(
        &self,
        project: &ProjectId,
        id: EnvironmentId,
        force: bool,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<Environment, EnvError> {
        let env = self
            .store
            .get_environment(project, id)
            .await?
            .ok_or_else(|| EnvError::NotFound(id.to_string()))?;
        if !force
            && env.status != EnvStatus::Deleted
            && let (Some(repo), Some(branch)) = (&env.repo, &env.branch)
            && let Some(why) = workspace::unmerged_work(
                Path::new(repo),
                Path::new(&env.workspace),
                branch,
                &self.settings.copy_files,
            )
            .await
        {
            return Err(EnvError::UnmergedWork(why));
        }
        let env = self
            .store
            .set_desired(project, id, DesiredState::Deleted, actor, reason, now())
            .await?;
        self.wake.notify_one();
        Ok(env)
    }

    /// Notes activity in an environment (agent work, a proxied request).
    pub async fn touch(&self, id: EnvironmentId) {
        if let Err(err) = self.store.touch_environment(id, now()).await {
            tracing::debug!(error = %err, "cannot record activity");
        }
    }

    /// The services of an environment (`None`: the shared ones), live state first, the
    /// store's record for those not running here.
    pub async fn services(&self, env: Option<EnvironmentId>) -> Result<Vec<ServiceView>, EnvError> {
        let instances = self.instances.lock().await;
        let mut views: Vec<ServiceView> = instances
            .iter()
            .filter(|(key, _)| key.environment == env)
            .map(|(key, running)| {
                let state = running.instance.state();
                let rss_bytes = state.pid.map_or(0, resources::group_rss_bytes);
                ServiceView {
                    name: key.service.clone(),
                    environment: key.environment,
                    sharing: if env.is_some() { Sharing::PerEnv } else { Sharing::Shared },
                    state,
                    ports: running.ports.clone(),
                    hostname: running.hostname.clone(),
                    rss_bytes,
                    log_path: running.instance.log_path.clone(),
                }
            })
            .collect();
        // Read with the instances held, so an instance starting meanwhile (whose first
        // record may land at once) is seen in one of the two, never in both or as a ghost.
        let records = self.store.service_records(env).await?;
        drop(instances);
        for record in records {
            if views.iter().any(|v| v.name == record.service) {
                continue;
            }
            // Recorded as up but not running here (a previous server's, not yet brought
            // back by the reconciler): not ready until an instance of this server says so.
            let (status, reason) = match record.status {
                ServiceStatus::Starting | ServiceStatus::Ready | ServiceStatus::Unhealthy => (
                    ServiceStatus::Starting,
                    Some("recorded as running; waiting for this server to start it".to_owned()),
                ),
                other => (other, record.reason),
            };
            views.push(ServiceView {
                name: record.service.clone(),
                environment: record.environment_id,
                sharing: if env.is_some() { Sharing::PerEnv } else { Sharing::Shared },
                state: InstanceState {
                    status,
                    pid: None,
                    restarts: record.restarts,
                    reason,
                    completed: false,
                    external: false,
                },
                ports: BTreeMap::new(),
                hostname: String::new(),
                rss_bytes: 0,
                log_path: match env {
                    Some(id) => {
                        self.env_dir(id).join("logs").join(format!("{}.log", record.service))
                    }
                    None => self.shared_log(&record.service),
                },
            });
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }

    /// Restarts one service of an environment now.
    pub async fn restart_service(&self, env: &Environment, service: &str) -> Result<(), EnvError> {
        let instances = self.instances.lock().await;
        let running = instances
            .iter()
            .find(|(key, _)| key.environment == Some(env.id) && key.service.as_str() == service)
            .map(|(_, running)| running)
            .ok_or_else(|| EnvError::ServiceNotFound {
                environment: env.name.to_string(),
                service: service.to_owned(),
            })?;
        running.instance.restart();
        Ok(())
    }

    /// The log file of a service and, if it runs, a live feed of its new lines.
    pub async fn service_log(
        &self,
        env: Option<EnvironmentId>,
        service: &str,
    ) -> Result<(PathBuf, Option<broadcast::Receiver<String>>), EnvError> {
        let instances = self.instances.lock().await;
        if let Some(running) = instances
            .iter()
            .find(|(k, _)| k.environment == env && k.service.as_str() == service)
            .map(|(_, r)| r)
        {
            return Ok((running.instance.log_path.clone(), Some(running.instance.follow())));
        }
        let known = self.services.iter().any(|s| s.name.as_str() == service);
        let name = ServiceName::parse(service).ok().filter(|_| known).ok_or_else(|| {
            EnvError::ServiceNotFound {
                environment: env.map_or_else(|| "shared".to_owned(), |id| id.to_string()),
                service: service.to_owned(),
            }
        })?;
        let path = match env {
            Some(id) => self.env_dir(id).join("logs").join(format!("{name}.log")),
            None => self.shared_log(&name),
        };
        Ok((path, None))
    }

    /// The variables every process of the environment gets (ports, names, addresses).
    pub fn variables(&self, env: &Environment) -> BTreeMap<String, String> {
        let plan = self.port_plan(env);
        let mut vars = BTreeMap::new();
        vars.insert("DROVER_ENV".to_owned(), env.name.to_string());
        vars.insert("DROVER_ENV_ID".to_owned(), env.id.to_string());
        vars.insert("DROVER_WORKSPACE".to_owned(), env.workspace.clone());
        vars.insert("DROVER_PORT_BASE".to_owned(), env.ports.base.to_string());
        if let Ok(plan) = &plan {
            for (service, ports) in plan {
                for (port_name, port) in ports {
                    vars.insert(
                        format!("DROVER_PORT_{}_{}", upper(service.as_str()), upper(port_name)),
                        port.to_string(),
                    );
                }
                if let Some(first) = ports.values().next() {
                    vars.insert(
                        format!("DROVER_HOST_{}", upper(service.as_str())),
                        hostname(service, Some(env)),
                    );
                    vars.insert(
                        format!("DROVER_SERVICE_{}_URL", upper(service.as_str())),
                        format!("http://127.0.0.1:{first}"),
                    );
                }
            }
        }
        for spec in self.services.iter().filter(|s| s.sharing == Sharing::Shared) {
            if let Some(address) = &spec.address {
                let upper_name = upper(spec.name.as_str());
                vars.insert(format!("DROVER_SERVICE_{upper_name}_ADDR"), address.clone());
                vars.insert(
                    format!("DROVER_SERVICE_{upper_name}_URL"),
                    format!("http://{address}"),
                );
                vars.insert(format!("DROVER_HOST_{upper_name}"), hostname(&spec.name, None));
            }
        }
        vars
    }

    /// Which port of the block each per-env service's named ports get, in config order.
    fn port_plan(
        &self,
        env: &Environment,
    ) -> Result<BTreeMap<ServiceName, BTreeMap<String, u16>>, String> {
        let mut next = 0_u16;
        let mut plan = BTreeMap::new();
        for spec in self.services.iter().filter(|s| s.sharing == Sharing::PerEnv) {
            let mut ports = BTreeMap::new();
            for name in &spec.ports {
                let port = env.ports.port(next).ok_or_else(|| {
                    format!(
                        "the block of {} ports is too small for the services' named ports",
                        env.ports.size
                    )
                })?;
                ports.insert(name.clone(), port);
                next += 1;
            }
            plan.insert(spec.name.clone(), ports);
        }
        Ok(plan)
    }

    /// The project's `deployments` environment, created (outside the quota) on first use
    /// and asked to run if someone stopped it.
    async fn deployments_env(&self, project: &ProjectId) -> Result<Environment, EnvError> {
        let name = EnvName::parse(DEPLOYMENTS_ENV).map_err(|e| EnvError::Workspace(e.message))?;
        let env = match self.store.find_environment(project, &name).await? {
            Some(env) => env,
            None => {
                let request = CreateEnvironment {
                    name: Some(name.clone()),
                    actor: "drover".to_owned(),
                    reason: Some("the first app was deployed".to_owned()),
                    ..CreateEnvironment::default()
                };
                match self.create_as(project, request, true).await {
                    Ok(env) => env,
                    // Created by a deploy running at the same time.
                    Err(EnvError::Store(StoreError::EnvironmentNameTaken(_))) => self
                        .store
                        .find_environment(project, &name)
                        .await?
                        .ok_or_else(|| EnvError::NotFound(DEPLOYMENTS_ENV.to_owned()))?,
                    Err(err) => return Err(err),
                }
            }
        };
        if env.desired != DesiredState::Running {
            return self.start(project, env.id, "drover", Some("an app was deployed")).await;
        }
        Ok(env)
    }

    /// Deploys `app` into the project's `deployments` environment (replacing an earlier app
    /// of the same run) and returns its state once its process has started, or failed to,
    /// with the [`DeployPin`] that keeps it from being undeployed to make room for another
    /// until the caller drops it (when its deploy is over: verified or failed).
    ///
    /// At most `max_apps` deploys of a project are under way at once (a deploy waits for a
    /// slot); the oldest apps whose deploy is over are undeployed, and their processes
    /// stopped, before the new one starts, so no more than `max_apps` run at any instant.
    pub async fn deploy_app(
        &self,
        project: &ProjectId,
        app: AppSpec,
    ) -> Result<(InstanceState, DeployPin), EnvError> {
        let pin = self.pin_deploy(project, app.run_id).await;
        let mut state = {
            let _deploying = self.deploy_lock.lock().await;
            let env = self.deployments_env(project).await?;
            self.store.put_app(env.id, &app, now()).await?;
            let apps = self.store.apps(env.id).await?;
            let others: Vec<&AppSpec> = apps.iter().filter(|old| old.name != app.name).collect();
            let room = self.settings.max_apps.max(1) - 1;
            let surplus = others.len().saturating_sub(room);
            let in_progress = self.pins.lock().unwrap_or_else(|poison| poison.into_inner()).clone();
            // Oldest first; never one whose deploy is under way (there are at most
            // `max_apps - 1` of those besides this one, so enough others are over).
            let evicted =
                others.iter().filter(|old| !in_progress.contains(&old.run_id)).take(surplus);
            for old in evicted {
                tracing::info!(run_id = %old.run_id, "undeploying the oldest app: more than {} deployed", self.settings.max_apps);
                self.remove_app(&env, old.run_id).await?;
            }
            let key = InstanceKey { environment: Some(env.id), service: app.name.clone() };
            // Under the deploy lock nothing else starts this app meanwhile.
            self.stop_instances(std::slice::from_ref(&key)).await;
            let reporter: Arc<dyn Reporter> = Arc::new(StoreReporter { store: self.store.clone() });
            // Started and listed at once (its first record may be written at once).
            let mut instances = self.instances.lock().await;
            let running = start_app(&env, &app, self.provider.clone(), reporter);
            let state = running.instance.watch();
            instances.insert(key, running);
            state
        };
        self.publish_routes().await;
        self.wake.notify_one();
        tracing::info!(run_id = %app.run_id, port = app.port, "app deployed in the deployments environment");
        // Until the process is up (it has a pid) or its start failed.
        let current = match tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| s.pid.is_some() || s.status != ServiceStatus::Starting),
        )
        .await
        {
            Ok(Ok(current)) => Some(current.clone()),
            _ => None,
        };
        Ok((current.unwrap_or_else(|| state.borrow().clone()), pin))
    }

    /// Takes one of the project's deploy slots for `run` (waiting for one) and marks its app
    /// as being deployed until the pin drops.
    async fn pin_deploy(&self, project: &ProjectId, run: RunId) -> DeployPin {
        let slots = {
            let mut slots = self.deploy_slots.lock().unwrap_or_else(|poison| poison.into_inner());
            slots
                .entry(project.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_apps.max(1))))
                .clone()
        };
        // The semaphore is never closed.
        let permit = slots.acquire_owned().await.ok();
        self.pins.lock().unwrap_or_else(|poison| poison.into_inner()).insert(run);
        DeployPin { run, pins: self.pins.clone(), _permit: permit }
    }

    /// Stops and forgets `run`'s app.
    pub async fn undeploy_app(&self, project: &ProjectId, run: RunId) -> Result<(), EnvError> {
        let Ok(dname) = EnvName::parse(DEPLOYMENTS_ENV) else { return Ok(()) };
        let _deploying = self.deploy_lock.lock().await;
        let Some(env) = self.store.find_environment(project, &dname).await? else {
            return Ok(());
        };
        self.remove_app(&env, run).await?;
        self.publish_routes().await;
        Ok(())
    }

    /// Forgets `run`'s app and stops its process (the caller holds the deploy lock).
    async fn remove_app(&self, env: &Environment, run: RunId) -> Result<(), EnvError> {
        let name = AppSpec::name_for(run);
        self.store.remove_app(env.id, &name).await?;
        let key = InstanceKey { environment: Some(env.id), service: name };
        if self.stop_instances(std::slice::from_ref(&key)).await > 0 {
            tracing::info!(run_id = %run, "app undeployed");
        }
        Ok(())
    }

    /// Stops the instances of `keys` that run here and forgets them once they are down
    /// (meanwhile they are still listed, stopping). Returns how many there were.
    async fn stop_instances(&self, keys: &[InstanceKey]) -> usize {
        let stopping: Vec<_> = {
            let instances = self.instances.lock().await;
            keys.iter()
                .filter_map(|key| instances.get(key))
                .map(|r| r.instance.stopping())
                .collect()
        };
        let count = stopping.len();
        futures::future::join_all(stopping).await;
        let mut instances = self.instances.lock().await;
        for key in keys {
            if instances.get(key).is_some_and(|running| running.instance.has_ended()) {
                instances.remove(key);
            }
        }
        count
    }

    /// The names of the deployed apps that are up (starting or serving), for listing many
    /// runs with one look.
    pub async fn apps_up(&self) -> std::collections::HashSet<ServiceName> {
        let instances = self.instances.lock().await;
        instances
            .iter()
            .filter(|(key, running)| {
                key.environment.is_some()
                    && key.service.as_str().starts_with("run-")
                    && app_is_up(&running.instance.state())
            })
            .map(|(key, _)| key.service.clone())
            .collect()
    }

    /// The state of `run`'s deployed app, if it has one here.
    pub async fn app_state(&self, run: RunId) -> Option<InstanceState> {
        let name = AppSpec::name_for(run);
        let instances = self.instances.lock().await;
        instances
            .iter()
            .find(|(key, _)| key.service == name && key.environment.is_some())
            .map(|(_, running)| running.instance.state())
    }

    /// Runs the idle/expiry sweep only while `leader` says this server leads (servers
    /// sharing a store sweep once between them). Without it, this server always sweeps.
    pub fn follow_leadership(&self, leader: tokio::sync::watch::Receiver<bool>) {
        let _ = self.leader.set(leader);
    }

    /// Starts the loops: the orphan sweep first, then reconciliation and the idle/expiry
    /// sweep, until `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> TaskTracker {
        self.active.store(true, std::sync::atomic::Ordering::Relaxed);
        let tracker = TaskTracker::new();
        let manager = self.clone();
        tracker.spawn(async move {
            manager.sweep_orphans().await;
            loop {
                if let Err(err) = manager.reconcile().await {
                    tracing::error!(error = %err, "environment reconciliation failed");
                }
                if let Err(err) = manager.expire().await {
                    tracing::error!(error = %err, "idle/expiry sweep failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = manager.wake.notified() => {}
                    () = tokio::time::sleep(manager.settings.reconcile_interval) => {}
                }
            }
        });
        tracker.close();
        tracker
    }

    /// Stops every instance (server shutdown). Environments keep their desired state and
    /// come back when the server starts again.
    pub async fn shutdown(&self) {
        let all: Vec<(InstanceKey, Running)> = self.instances.lock().await.drain().collect();
        let stops = all.into_iter().map(|(_, running)| running.instance.stop());
        futures::future::join_all(stops).await;
        self.publish_routes().await;
    }

    /// What a killed server left behind is stopped: containers, found by the provider's
    /// labels, and processes, found by their recorded process groups and recognised by
    /// their `DROVER_INSTANCE` variable; reconciliation then starts what should run.
    pub async fn sweep_orphans(&self) {
        let containers = self.provider.sweep_orphans().await;
        if containers > 0 {
            tracing::warn!(containers, "removed containers a previous server left behind");
        }
        let records = match self.store.running_service_records().await {
            Ok(records) => records,
            Err(err) => {
                tracing::error!(error = %err, "cannot read recorded services for the orphan sweep");
                return;
            }
        };
        for record in records {
            let Some(pgid) = record.pid else { continue };
            let key =
                InstanceKey { environment: record.environment_id, service: record.service.clone() };
            let members = resources::group_members(pgid);
            let ours: Vec<u32> = members
                .into_iter()
                .filter(|pid| resources::has_env(*pid, INSTANCE_VAR, &key.to_string()))
                .collect();
            if !ours.is_empty() {
                tracing::warn!(instance = %key, pgid, processes = ours.len(), "stopping processes a previous server left behind");
                let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGTERM);
                for _ in 0..50 {
                    if resources::group_members(pgid).is_empty() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
            }
            let stopped = ServiceRecord {
                status: ServiceStatus::Stopped,
                pid: None,
                reason: Some(if ours.is_empty() {
                    "gone with the previous server".to_owned()
                } else {
                    "orphan of a previous server; stopped".to_owned()
                }),
                updated_at: now(),
                ..record
            };
            if let Err(err) = self.store.record_service(stopped).await {
                tracing::warn!(error = %err, "cannot record an orphan's stop");
            }
        }
    }

    /// One pass: every live environment is moved towards its desired state.
    pub async fn reconcile(&self) -> Result<(), EnvError> {
        for env in self.store.live_environments().await? {
            if let Err(err) = self.reconcile_one(&env).await {
                tracing::error!(environment = %env.name, error = %err, "reconciling an environment failed");
                if env.status != EnvStatus::Deleting {
                    let _ = self
                        .store
                        .transition_environment(
                            env.id,
                            EnvStatus::Error,
                            Some(err.to_string()),
                            now(),
                        )
                        .await;
                }
            }
        }
        self.publish_routes().await;
        Ok(())
    }

    async fn reconcile_one(&self, env: &Environment) -> Result<(), EnvError> {
        use EnvStatus::*;
        match (env.desired, env.status) {
            (DesiredState::Running, Creating | Stopped | Error) => {
                self.start_services(env).await?;
                self.store.transition_environment(env.id, Running, None, now()).await?;
                tracing::info!(environment = %env.name, "environment running");
            }
            (DesiredState::Running, Running) => self.start_services(env).await?,
            (DesiredState::Running | DesiredState::Stopped, Stopping) => {
                self.stop_services(env.id).await;
                self.store.transition_environment(env.id, Stopped, None, now()).await?;
            }
            (DesiredState::Stopped, Running | Error) => {
                self.store.transition_environment(env.id, Stopping, None, now()).await?;
                self.stop_services(env.id).await;
                self.store.transition_environment(env.id, Stopped, None, now()).await?;
                tracing::info!(environment = %env.name, "environment stopped");
            }
            (DesiredState::Stopped, Creating) => {
                self.store.transition_environment(env.id, Stopped, None, now()).await?;
            }
            (DesiredState::Stopped, Stopped) => self.stop_services(env.id).await,
            (DesiredState::Deleted, Creating | Running | Stopped | Error | Stopping) => {
                if env.status == Stopping {
                    self.stop_services(env.id).await;
                    self.store.transition_environment(env.id, Stopped, None, now()).await?;
                }
                self.store.transition_environment(env.id, Deleting, None, now()).await?;
                self.finish_delete(env).await?;
            }
            (DesiredState::Deleted, Deleting) => self.finish_delete(env).await?,
            (_, Deleted)
            | (DesiredState::Running, Deleting)
            | (DesiredState::Stopped, Deleting) => {}
        }
        Ok(())
    }

    async fn finish_delete(&self, env: &Environment) -> Result<(), EnvError> {
        self.stop_services(env.id).await;
        let repo = env.repo.as_deref().map(Path::new);
        let workspace = Path::new(&env.workspace);
        // A workspace elsewhere (a run's) belongs to its owner, not to the environment.
        let ours = repo.is_some() || workspace.starts_with(self.env_dir(env.id));
        if ours && let Err(message) = self.remove_workspace(repo, workspace, true).await {
            tracing::warn!(environment = %env.name, %message, "workspace cleanup incomplete");
        }
        let _ = tokio::fs::remove_dir_all(self.env_dir(env.id)).await;
        self.store.forget_services(Some(env.id)).await?;
        self.store.forget_apps(env.id).await?;
        self.store.transition_environment(env.id, EnvStatus::Deleted, None, now()).await?;
        tracing::info!(environment = %env.name, "environment deleted");
        Ok(())
    }

    async fn remove_workspace(
        &self,
        repo: Option<&Path>,
        workspace: &Path,
        force: bool,
    ) -> Result<(), String> {
        match repo {
            Some(repo) => workspace::remove_worktree(repo, workspace, force).await,
            None => match tokio::fs::remove_dir_all(workspace).await {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(err.to_string()),
            },
        }
    }

    /// Stops idle environments and deletes ones stopped for too long.
    async fn expire(&self) -> Result<(), EnvError> {
        if self.leader.get().is_some_and(|leader| !*leader.borrow()) {
            return Ok(());
        }
        let settings = &self.settings;
        if !settings.idle_timeout.is_zero() {
            for env in self.store.idle_environments(now().minus(settings.idle_timeout)).await? {
                let reason =
                    format!("idle for {}", humantime::format_duration(settings.idle_timeout));
                tracing::info!(environment = %env.name, %reason, "stopping an idle environment");
                self.store
                    .set_desired(
                        &env.project_id,
                        env.id,
                        DesiredState::Stopped,
                        "drover",
                        Some(&reason),
                        now(),
                    )
                    .await?;
                self.wake.notify_one();
            }
        }
        if !settings.delete_after.is_zero() {
            for env in self.store.stopped_environments(now().minus(settings.delete_after)).await? {
                let reason =
                    format!("stopped for {}", humantime::format_duration(settings.delete_after));
                let repo = env.repo.as_deref().map(Path::new);
                if let (Some(repo), Some(branch)) = (repo, &env.branch)
                    && let Some(why) = workspace::unmerged_work(
                        repo,
                        Path::new(&env.workspace),
                        branch,
                        &settings.copy_files,
                    )
                    .await
                {
                    tracing::info!(environment = %env.name, %why, "not auto-deleting: unmerged work");
                    continue;
                }
                self.store
                    .set_desired(
                        &env.project_id,
                        env.id,
                        DesiredState::Deleted,
                        "drover",
                        Some(&reason),
                        now(),
                    )
                    .await?;
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// Makes sure every service of `env` (and every shared service) has an instance.
    async fn start_services(&self, env: &Environment) -> Result<(), EnvError> {
        let deployments = env.name.as_str() == DEPLOYMENTS_ENV;
        let _deploying = if deployments { Some(self.deploy_lock.lock().await) } else { None };
        let plan = self.port_plan(env).map_err(EnvError::Workspace)?;
        let variables = self.variables(env);
        let reporter: Arc<dyn Reporter> = Arc::new(StoreReporter { store: self.store.clone() });
        let shared_dir = self.settings.data_dir.join("shared");
        tokio::fs::create_dir_all(&shared_dir)
            .await
            .map_err(|err| EnvError::Workspace(err.to_string()))?;
        let mut instances = self.instances.lock().await;
        // Shared services first: started on first need, one instance for everyone (hence
        // without any project's secrets).
        for spec in self.services.iter().filter(|s| s.sharing == Sharing::Shared) {
            let key = InstanceKey { environment: None, service: spec.name.clone() };
            if instances.contains_key(&key) {
                continue;
            }
            let address: Option<SocketAddr> = spec.address.as_deref().and_then(|a| a.parse().ok());
            let port = address.map(|a| a.port());
            let ports: BTreeMap<String, u16> =
                spec.ports.iter().take(1).filter_map(|name| Some((name.clone(), port?))).collect();
            let values = PlaceholderValues {
                ports: ports.clone(),
                first_port: port,
                workspace: self.settings.data_dir.join("shared").display().to_string(),
                env: "shared".to_owned(),
                services: BTreeMap::new(),
            };
            let mut env_vars = vec![(INSTANCE_VAR.to_owned(), key.to_string())];
            if let Some(port) = port {
                env_vars.push(("PORT".to_owned(), port.to_string()));
            }
            let plan = build_plan(
                &key,
                spec,
                &values,
                env_vars,
                self.settings.data_dir.join("shared"),
                self.shared_log(&spec.name),
                address,
                &instances,
            )
            .map_err(EnvError::Workspace)?;
            let instance = start_instance(
                InstancePlan { external_addr: address, ..plan },
                self.provider.clone(),
                reporter.clone(),
            );
            instances.insert(
                key.clone(),
                Running { instance, ports, hostname: hostname(&spec.name, None) },
            );
        }
        let service_addresses: BTreeMap<String, (String, u16)> = self
            .services
            .iter()
            .filter_map(|spec| match spec.sharing {
                Sharing::Shared => {
                    let addr: SocketAddr = spec.address.as_deref()?.parse().ok()?;
                    Some((spec.name.to_string(), (addr.ip().to_string(), addr.port())))
                }
                Sharing::PerEnv => {
                    let port = *plan.get(&spec.name)?.values().next()?;
                    Some((spec.name.to_string(), ("127.0.0.1".to_owned(), port)))
                }
            })
            .collect();
        // The deployments environment runs deployed apps only, without project secrets:
        // exactly the apps the store holds.
        if deployments {
            let apps = self.store.apps(env.id).await?;
            let forgotten: Vec<InstanceKey> = instances
                .keys()
                .filter(|key| key.environment == Some(env.id))
                .filter(|key| !apps.iter().any(|app| app.name == key.service))
                .cloned()
                .collect();
            for app in apps {
                let key = InstanceKey { environment: Some(env.id), service: app.name.clone() };
                if let std::collections::hash_map::Entry::Vacant(slot) = instances.entry(key) {
                    slot.insert(start_app(env, &app, self.provider.clone(), reporter.clone()));
                }
            }
            drop(instances);
            if !forgotten.is_empty() {
                tracing::warn!(apps = forgotten.len(), "stopping apps the store no longer holds");
                self.stop_instances(&forgotten).await;
            }
            return Ok(());
        }
        for spec in self.services.iter().filter(|s| s.sharing == Sharing::PerEnv) {
            let key = InstanceKey { environment: Some(env.id), service: spec.name.clone() };
            if instances.contains_key(&key) {
                continue;
            }
            let ports = plan.get(&spec.name).cloned().unwrap_or_default();
            let first_port = spec.ports.first().and_then(|name| ports.get(name)).copied();
            let values = PlaceholderValues {
                ports: ports.clone(),
                first_port,
                workspace: env.workspace.clone(),
                env: env.name.to_string(),
                services: service_addresses.clone(),
            };
            let mut env_vars: Vec<(String, String)> =
                variables.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            env_vars.push((INSTANCE_VAR.to_owned(), key.to_string()));
            if let Some(port) = first_port {
                env_vars.push(("PORT".to_owned(), port.to_string()));
            }
            for (name, port) in &ports {
                env_vars.push((format!("DROVER_PORT_{}", upper(name)), port.to_string()));
            }
            let log = self.env_dir(env.id).join("logs").join(format!("{}.log", spec.name));
            let plan = build_plan(
                &key,
                spec,
                &values,
                env_vars,
                PathBuf::from(&env.workspace),
                log,
                None,
                &instances,
            )
            .map_err(EnvError::Workspace)?;
            // Read by the instance at each start of its process, audited as this
            // environment's; never part of what is recorded of the service.
            let secrets = self.secrets.as_ref().map(|source| InstanceSecrets {
                source: source.clone(),
                project: env.project_id.clone(),
                actor: format!("environment {}", env.name),
                purpose: format!("service {}", spec.name),
            });
            let instance = start_instance(
                InstancePlan { secrets, ..plan },
                self.provider.clone(),
                reporter.clone(),
            );
            instances.insert(
                key,
                Running { instance, ports, hostname: hostname(&spec.name, Some(env)) },
            );
        }
        Ok(())
    }

    async fn stop_services(&self, env: EnvironmentId) {
        let _deploying = self.deploy_lock.lock().await;
        let keys: Vec<InstanceKey> = self
            .instances
            .lock()
            .await
            .keys()
            .filter(|k| k.environment == Some(env))
            .cloned()
            .collect();
        self.stop_instances(&keys).await;
    }

    async fn publish_routes(&self) {
        let live: HashMap<EnvironmentId, Environment> = match self.store.live_environments().await {
            Ok(envs) => envs.into_iter().map(|env| (env.id, env)).collect(),
            Err(_) => HashMap::new(),
        };
        let custom = self.custom_routes();
        let instances = self.instances.lock().await;
        let mut routes: Vec<ServiceRoute> = instances
            .iter()
            .filter_map(|(key, running)| {
                let env = key.environment.and_then(|id| live.get(&id));
                let kind = match env.map(|env| env.name.as_str()) {
                    Some(DEPLOYMENTS_ENV) => RouteKind::App,
                    _ => RouteKind::Service,
                };
                Some(ServiceRoute {
                    host: running.hostname.clone(),
                    upstream: self.upstream(key, running, None)?,
                    service: key.service.to_string(),
                    project: env.map(|env| env.project_id.clone()),
                    environment: key.environment,
                    environment_name: env.map(|env| env.name.to_string()),
                    kind,
                    instance: key.clone(),
                })
            })
            .collect();
        // Custom names win over generated ones they collide with. One naming an
        // environment leads to that environment of its own project, never another's.
        for route in custom {
            let project = route.target.project();
            let environment = match (&route.target.environment, &project) {
                (Some(name), Some(project)) => {
                    let Some(env) =
                        live.values().find(|env| env.name == *name && env.project_id == *project)
                    else {
                        continue;
                    };
                    Some(env.id)
                }
                _ => None,
            };
            let key = InstanceKey { environment, service: route.target.service.clone() };
            let Some(running) = instances.get(&key) else { continue };
            let Some(upstream) = self.upstream(&key, running, route.target.port.as_deref()) else {
                continue;
            };
            routes.retain(|r| r.host != route.host);
            routes.push(ServiceRoute {
                host: route.host,
                upstream,
                service: route.target.to_string(),
                project,
                environment,
                environment_name: route.target.environment.map(|e| e.to_string()),
                kind: RouteKind::Custom,
                instance: key,
            });
        }
        routes.sort_by(|a, b| a.host.cmp(&b.host));
        self.routes.send_if_modified(|current| {
            let changed = *current != routes;
            if changed {
                *current = routes;
            }
            changed
        });
    }

    /// Where an instance answers on `port` (default: its first declared port); a shared
    /// service at its configured address.
    fn upstream(
        &self,
        key: &InstanceKey,
        running: &Running,
        port: Option<&str>,
    ) -> Option<SocketAddr> {
        let spec = self.services.iter().find(|spec| spec.name == key.service);
        if key.environment.is_none()
            && let Some(address) = spec.and_then(|s| s.address.as_deref()?.parse().ok())
        {
            return Some(address);
        }
        let name = port.or_else(|| spec.and_then(|s| s.ports.first()).map(String::as_str));
        let port = match name {
            Some(name) => *running.ports.get(name)?,
            None => *running.ports.values().next()?,
        };
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }
}

/// Whether a deployed app counts as up: starting or serving, not exited or given up on.
pub fn app_is_up(state: &InstanceState) -> bool {
    matches!(
        state.status,
        ServiceStatus::Starting | ServiceStatus::Ready | ServiceStatus::Unhealthy
    )
}

/// Starts a deployed app as a supervised service of the deployments environment: probed
/// on its health path, restarted on failure (5 times in 5 minutes, then given up on),
/// routed at its own hostname.
fn start_app(
    env: &Environment,
    app: &AppSpec,
    provider: Arc<dyn Provider>,
    reporter: Arc<dyn Reporter>,
) -> Running {
    let key = InstanceKey { environment: Some(env.id), service: app.name.clone() };
    let spec = ServiceSpec {
        name: app.name.clone(),
        image: None,
        command: app.program.clone(),
        args: app.args.clone(),
        env: BTreeMap::new(),
        ports: vec!["http".to_owned()],
        readiness: Some(Readiness {
            kind: ProbeKind::Http { path: app.health_path.clone() },
            port: None,
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(60),
            threshold: 1,
        }),
        depends_on: BTreeMap::new(),
        restart: RestartRules {
            policy: RestartPolicy::OnFailure,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            max_restarts: 5,
            window: Duration::from_secs(300),
        },
        stop_grace: Duration::from_secs(3),
        memory_limit_bytes: None,
        sharing: Sharing::PerEnv,
        address: None,
        log_max_bytes: 10 * 1024 * 1024,
        log_keep: 2,
    };
    let mut env_vars = app.env.clone();
    env_vars.retain(|(name, _)| name != "PORT" && name != INSTANCE_VAR);
    env_vars.push(("PORT".to_owned(), app.port.to_string()));
    env_vars.push((INSTANCE_VAR.to_owned(), key.to_string()));
    let plan = InstancePlan {
        key,
        spec,
        command: CommandSpec {
            program: app.program.clone(),
            args: app.args.clone(),
            cwd: PathBuf::from(&app.cwd),
            env: env_vars,
            log_path: PathBuf::from(&app.log_path),
        },
        probe_addr: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, app.port))),
        dependencies: Vec::new(),
        external_addr: None,
        // A deployed app runs with what its deploy gave it; project secrets are not added.
        secrets: None,
    };
    let instance = start_instance(plan, provider, reporter);
    Running {
        instance,
        ports: BTreeMap::from([("http".to_owned(), app.port)]),
        hostname: app.hostname.clone(),
    }
}

/// `<service>.<env>.localhost` for a service of an environment of the `default` project,
/// `<service>.<env>.<project>.localhost` for one of another project (environment names are
/// unique within a project only, and one project's name must never lead to another's
/// service), or `<service>.localhost` for a shared one.
pub fn hostname(service: &ServiceName, env: Option<&Environment>) -> String {
    match env {
        Some(env) if env.project_id == ProjectId::default_project() => {
            format!("{service}.{}.localhost", env.name)
        }
        Some(env) => format!("{service}.{}.{}.localhost", env.name, env.project_id),
        None => format!("{service}.localhost"),
    }
}

fn upper(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

#[expect(clippy::too_many_arguments, reason = "one call site per sharing kind")]
fn build_plan(
    key: &InstanceKey,
    spec: &ServiceSpec,
    values: &PlaceholderValues,
    mut env_vars: Vec<(String, String)>,
    cwd: PathBuf,
    log_path: PathBuf,
    probe_addr: Option<SocketAddr>,
    instances: &HashMap<InstanceKey, Running>,
) -> Result<InstancePlan, String> {
    let expand = |text: &str| {
        expand_placeholders(text, values)
            .map_err(|err| format!("service `{}`: {}", spec.name, err.message))
    };
    let program = expand(&spec.command)?;
    let args = spec.args.iter().map(|arg| expand(arg)).collect::<Result<Vec<_>, _>>()?;
    for (name, value) in &spec.env {
        env_vars.push((name.clone(), expand(value)?));
    }
    let probe_port = spec
        .readiness
        .as_ref()
        .and_then(|r| r.port.as_ref())
        .and_then(|name| values.ports.get(name))
        .copied()
        .or(values.first_port);
    let probe_addr =
        probe_addr.or_else(|| probe_port.map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
    let mut dependencies = Vec::new();
    for (dependency, condition) in &spec.depends_on {
        let dep_key = instances
            .keys()
            .find(|k| {
                &k.service == dependency
                    && (k.environment == key.environment || k.environment.is_none())
            })
            .cloned();
        if let Some(dep_key) = dep_key {
            let watch: watch::Receiver<InstanceState> = instances[&dep_key].instance.watch();
            dependencies.push((dep_key, watch, *condition));
        }
    }
    Ok(InstancePlan {
        key: key.clone(),
        spec: spec.clone(),
        command: CommandSpec { program, args, cwd, env: env_vars, log_path },
        probe_addr,
        dependencies,
        external_addr: None,
        secrets: None,
    })
}

/// Orders services so each comes after what it depends on (the config is acyclic).
fn dependencies_first(services: Vec<ServiceSpec>) -> Vec<ServiceSpec> {
    let mut ordered: Vec<ServiceSpec> = Vec::with_capacity(services.len());
    let mut pending = services;
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::new();
        for spec in pending {
            if spec.depends_on.keys().all(|dep| ordered.iter().any(|s| &s.name == dep)) {
                ordered.push(spec);
            } else {
                rest.push(spec);
            }
        }
        if rest.len() == before {
            // A cycle (rejected at config load): keep the rest in their given order.
            ordered.extend(rest);
            break;
        }
        pending = rest;
    }
    ordered
}
