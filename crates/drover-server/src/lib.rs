//! The composition root: builds a drover server from a [`Config`] (store, bus, engine,
//! in-process workers, deployed-app registry, HTTP API) and runs it until told to stop,
//! then drains in order: stop taking requests and runs, let running stages finish within
//! the grace period (or hand them back), stop the engine, stop deployed apps, close the
//! store.
//!
//! Given a [`ConfigReload`], the server reloads `[agents]` and `[pipelines]` on SIGHUP and
//! when its config file changes, without dropping running work (see [`reload`]).
//!
//! A data directory belongs to one server at a time: [`Server::build`] takes an exclusive
//! lock on it and records where the server listens in `server.json`, which is how the CLI
//! finds a running server for a data directory.

mod auth;
pub mod bench;
mod data_dir;
mod live;
pub mod reload;
mod secrets;
mod telemetry;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_agents::{WorkerPool, WorkerPoolConfig, builtin};
use drover_api::AppState;
use drover_api::wire::WorkerBootstrap;
use drover_bus::{Bus, BusOptions};
use drover_config::Config;
use drover_domain::{AgentDefinition, WorkerId};
use drover_engine::{Engine, EngineSettings};
use drover_env::Layout;
use drover_env::cgroup::MemoryCgroups;
use drover_env::docker::DockerProvider;
use drover_env::manager::{EnvManager, EnvSettings, ServiceRoute};
use drover_env::provider::{LocalProvider, Providers};
use drover_proxy::{Proxy, Route, RouteTable};
use drover_store::{AnyStore, IdentityStore, Store, StoreError, StoreOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::signing_key_path;
pub use data_dir::{DataDirLock, ServerInfo};
pub use reload::ConfigReload;
pub use secrets::key_source;
pub use telemetry::metrics_handle;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error(
        "data directory {path} is in use by another drover process{}",
        .server.as_ref().map(|s| format!(" (pid {}, serving {})", s.pid, s.url)).unwrap_or_default()
    )]
    DataDirInUse { path: String, server: Option<ServerInfo> },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Proxy(#[from] drover_proxy::ProxyError),
    #[error("cannot open the bus: {0}")]
    Bus(#[from] drover_bus::BusError),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("cannot load the secrets master key: {0}")]
    SecretsKey(#[from] drover_secrets::KeyError),
    #[error(
        "listening on {addr} (beyond loopback) requires authentication, and no user exists yet. \
         Create an administrator first, with the server stopped or on loopback: \
         `drover users add admin --role admin`, then `drover tokens create --user admin --name cli` \
         and give the token to clients with --token or DROVER_TOKEN"
    )]
    AuthRequired { addr: SocketAddr },
}

/// What the server runs besides the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Engine and, if configured, the built-in workers (`drover up`, embedded `drover run`).
    Full,
    /// The API over the store only: no engine loops, no workers. For reading history and
    /// cancelling when no server runs on the data directory.
    Inspect,
}

/// A built server, bound to its address, not yet serving.
pub struct Server {
    config: Config,
    mode: Mode,
    listener: TcpListener,
    addr: SocketAddr,
    store: AnyStore,
    bus: Arc<dyn Bus>,
    engine: Arc<Engine>,
    envs: Arc<EnvManager>,
    proxy: Option<Proxy>,
    lock: DataDirLock,
    reload: Option<ConfigReload>,
    auth: AuthParts,
}

/// What the API's authentication is built from.
struct AuthParts {
    identities: Arc<dyn IdentityStore>,
    signer: drover_auth::Signer,
    network: bool,
    users_exist: bool,
    /// A credential standing for the local admin (the CLI's, for its embedded instance).
    trusted: Option<String>,
}

impl Server {
    /// Prepares the data directory, opens the store and binds the listener.
    pub async fn build(mut config: Config, mode: Mode) -> Result<Self, ServerError> {
        let lock = DataDirLock::acquire(&config.data_dir)?;
        // From here on, paths handed to children are absolute.
        config.data_dir = lock.path().to_path_buf();
        let store = drover_store::open(&store_options(&config)).await?;
        let identities: Arc<dyn IdentityStore> = Arc::new(store.clone());
        let (network, users_exist) = auth::check_mode(config.server.listen, &identities).await?;
        let signer = auth::load_signer(&config).await?;
        let vault = secrets::open_vault(&config, &store).await?;
        let bus = drover_bus::connect(&config.bus.url, bus_options(&config)).await?;
        let engine = Engine::new(
            Arc::new(store.clone()),
            bus.clone(),
            Arc::new(
                config.pipeline_catalog().map_err(|err| ServerError::Config(err.to_string()))?,
            ),
            Layout::new(&config.data_dir),
            EngineSettings {
                heartbeat_interval: config.engine.heartbeat_interval,
                lease_duration: config.lease_duration(),
                poll_interval: config.engine.poll_interval,
                dispatch_batch: config.engine.dispatch_batch,
                redispatch_after: config.engine.redispatch_after,
                leader_lease: config.engine.leader_lease,
                worker_liveness: config.worker_liveness(),
                // Unique across hosts (containers all run as process 1).
                instance: format!(
                    "server-{}-{}",
                    std::process::id(),
                    &uuid::Uuid::now_v7().simple().to_string()[20..]
                ),
            },
        );
        let engine = Arc::new(engine.with_vault(vault.clone()));
        let services =
            config.service_specs().map_err(|err| ServerError::Config(err.to_string()))?;
        let providers = providers(&config, &services)?;
        let envs = Arc::new(
            EnvManager::new(
                Arc::new(store.clone()),
                env_settings(&config),
                services,
                Arc::new(providers),
            )
            .with_secrets(Arc::new(secrets::VaultSecrets(vault))),
        );
        let addr = config.server.listen;
        let listener =
            TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
        envs.set_custom_routes(
            config.custom_routes().map_err(|err| ServerError::Config(err.to_string()))?,
        )
        .await;
        let proxy = match mode == Mode::Full && config.proxy.enabled {
            true => Some(bind_proxy(&config).await?),
            false => None,
        };
        lock.publish(&ServerInfo {
            url: format!("http://{addr}"),
            pid: std::process::id(),
            proxy: proxy.as_ref().map(|p| p.local_addr().to_string()),
            proxy_tls: proxy.as_ref().and_then(Proxy::tls_addr).map(|a| a.to_string()),
        })?;
        Ok(Self {
            config,
            mode,
            listener,
            addr,
            store,
            bus,
            engine,
            envs,
            proxy,
            lock,
            reload: None,
            auth: AuthParts { identities, signer, network, users_exist, trusted: None },
        })
    }

    /// Accepts `token` as the local administrator: how a CLI command talks to the embedded
    /// instance it started, whatever users exist.
    #[must_use]
    pub fn trust_token(mut self, token: String) -> Self {
        self.auth.trusted = Some(token);
        self
    }

    /// Reloads `[agents]` and `[pipelines]` from `reload`'s source while serving (a full
    /// server only): on SIGHUP, and when its config file changes.
    #[must_use]
    pub fn reload_from(mut self, reload: ConfigReload) -> Self {
        self.reload = Some(reload);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's base URL, e.g. `http://127.0.0.1:7070`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the routing proxy listens, if it runs.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().map(Proxy::local_addr)
    }

    /// Where the routing proxy serves HTTPS, if it does.
    pub fn proxy_tls_addr(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().and_then(Proxy::tls_addr)
    }

    /// Serves until `shutdown` fires, then drains and stops everything it started.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let Self {
            config,
            mode,
            listener,
            addr,
            store,
            bus,
            engine,
            envs,
            proxy,
            lock,
            reload,
            auth,
        } = self;
        let draining = CancellationToken::new();
        let engine_stop = CancellationToken::new();
        let full = mode == Mode::Full;
        let engine_tasks = full.then(|| engine.spawn(engine_stop.clone()));
        let env_stop = CancellationToken::new();
        envs.follow_leadership(engine.leadership());
        let env_tasks = full.then(|| envs.spawn(env_stop.clone()));
        // Validated when the config was loaded.
        let agents = config.agent_definitions().unwrap_or_else(|_| AgentDefinition::builtins());
        engine.replace_agents(agents.clone());
        let workers = (full && config.workers.embedded).then(|| {
            WorkerPool::start(
                bus.clone(),
                builtin::configured_agents(&agents, envs.clone(), &config.data_dir),
                WorkerPoolConfig {
                    worker_id: WorkerId::new(format!("embedded-{}", std::process::id())),
                    concurrency: config.workers.concurrency,
                    heartbeat_interval: config.engine.heartbeat_interval,
                    kind: "embedded".to_owned(),
                    secrets: Some(Arc::new(secrets::EngineSecrets(engine.clone()))),
                },
            )
        });
        let workers = workers.map(Arc::new);
        let reload_task = reload.filter(|_| full).map(|reload| {
            let live = reload::Live {
                engine: engine.clone(),
                workers: workers.clone(),
                envs: envs.clone(),
                running: config.clone(),
            };
            reload::spawn(reload, live, draining.clone())
        });
        let upkeep = telemetry::spawn_upkeep(draining.clone());
        telemetry::spawn_queue_gauges(engine.clone(), draining.clone());
        if full {
            let events: Arc<dyn Store> = Arc::new(store.clone());
            tokio::spawn(prune_events(
                events,
                engine.leadership(),
                config.events.retention,
                draining.clone(),
            ));
        }
        // The cluster's events in order, and who watches what (see `live.rs`).
        let (feed, _) = tokio::sync::broadcast::channel(live::FEED_CAPACITY);
        let presence = Arc::new(drover_api::presence::Presence::default());
        let live_tasks = live::spawn(
            live::Live {
                store: Arc::new(store.clone()),
                bus: bus.clone(),
                presence: presence.clone(),
                feed: feed.clone(),
                origin: uuid::Uuid::now_v7().to_string(),
            },
            draining.clone(),
        );
        let auth = Arc::new(drover_api::AuthState::new(
            auth.identities,
            auth.signer,
            auth.network,
            auth.users_exist,
            auth.trusted.as_deref(),
        ));
        let webhook_task = full.then(|| {
            webhooks::start(
                &store,
                engine.vault().cloned(),
                feed.subscribe(),
                engine.leadership(),
                &config.webhooks,
                drover_api::webhook_targets::TargetPolicy::new(
                    config.webhooks.allow_private_targets,
                    auth.clone(),
                ),
                draining.clone(),
            )
        });
        let proxy_addrs = drover_api::routes::ProxyAddrs {
            http: proxy.as_ref().map(Proxy::local_addr),
            https: proxy.as_ref().and_then(Proxy::tls_addr),
        };
        let (activity, reports) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(record_activity(reports, envs.clone(), draining.clone()));
        tokio::spawn(agent_activity(feed.subscribe(), activity.clone(), draining.clone()));
        if mode == Mode::Full {
            tokio::spawn(release_run_environments(
                store.clone(),
                feed.subscribe(),
                envs.clone(),
                draining.clone(),
            ));
        }
        let proxy_task = proxy.map(|proxy| {
            let routes = RouteTable::new();
            tokio::spawn(sync_routes(envs.routes(), routes.clone(), draining.clone()));
            tracing::info!(addr = %proxy.local_addr(), tls = ?proxy.tls_addr(), "routing proxy serving");
            let states = Arc::new(ServiceStates(envs.clone()));
            // In local mode every caller is the same user: a 404 may name every host.
            let local = auth.clone();
            let proxy = proxy
                .on_activity(activity)
                .with_states(states)
                .naming_every_host_while(Arc::new(move || local.is_local()));
            tokio::spawn(proxy.run(routes, draining.clone()))
        });

        let state = AppState::new(drover_api::AppParts {
            engine: engine.clone(),
            envs: envs.clone(),
            metrics: Some(metrics_handle()),
            draining: draining.clone(),
            proxy: proxy_addrs,
            bootstrap: worker_bootstrap(&config),
            auth,
            limits: drover_api::limits::RateLimits::new(
                config.auth.rate_limit_per_minute,
                config.auth.ip_rate_limit_per_minute,
            ),
            body_limit: config.server.body_limit_bytes,
            webhooks: Arc::new(store.clone()),
            allow_private_webhook_targets: config.webhooks.allow_private_targets,
            chat: Arc::new(store.clone()),
            presence,
            live: feed,
        });
        let app = drover_api::router(state);
        tracing::info!(%addr, mode = ?mode, data_dir = %config.data_dir.display(), "drover serving");
        let http = tokio::spawn({
            let draining = draining.clone();
            async move {
                axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                    .with_graceful_shutdown(draining.cancelled_owned())
                    .await
            }
        });

        shutdown.cancelled().await;
        tracing::info!("shutting down");
        draining.cancel();
        let grace = config.server.shutdown_grace;
        match tokio::time::timeout(grace, http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "HTTP server failed"),
            Ok(Err(err)) => tracing::error!(error = %err, "HTTP server task failed"),
            Err(_) => tracing::warn!("open HTTP connections did not close in time"),
        }
        if let Some(task) = reload_task {
            let _ = task.await;
        }
        // The reload task, the pool's only other owner, has ended.
        if let Some(workers) = workers.and_then(Arc::into_inner) {
            workers.shutdown(grace).await;
        }
        // Let the results of the last stages (or their hand-backs) be committed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        engine_stop.cancel();
        if let Some(tasks) = engine_tasks {
            tasks.wait().await;
        }
        env_stop.cancel();
        if let Some(tasks) = env_tasks {
            tasks.wait().await;
        }
        envs.shutdown().await;
        if let Some(proxy) = proxy_task {
            let _ = proxy.await;
        }
        let _ = upkeep.await;
        for task in live_tasks {
            let _ = task.await;
        }
        if let Some(task) = webhook_task {
            let _ = task.await;
        }
        store.close().await;
        drop(lock);
        tracing::info!("stopped");
        Ok(())
    }

    /// The store, for tests and tools that inspect what the server wrote.
    #[must_use]
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
}

/// How to open the store `[store]` names: a SQLite file (by default under the data
/// directory) or a PostgreSQL database.
pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        url: config.store_url(),
        max_connections: config.store.max_connections,
        acquire_timeout: config.store.acquire_timeout,
        busy_timeout: config.store.busy_timeout,
    }
}

/// The broker settings of a configuration.
pub fn bus_options(config: &Config) -> BusOptions {
    BusOptions {
        capacity: config.bus.capacity,
        batch_size: config.bus.batch_size,
        block_time: config.bus.block_time,
        claim_idle: config.bus.claim_idle,
        namespace: config.bus.namespace.clone(),
    }
}

/// What external workers are told when they ask how to join.
fn worker_bootstrap(config: &Config) -> WorkerBootstrap {
    let kind = match config.bus.url.split("://").next() {
        Some("redis" | "rediss") => "redis",
        Some("nats" | "tls") => "nats",
        _ => "embedded",
    };
    // Never hand out credentials: a URL with a password is not advertised.
    let has_credentials = config.bus.url.split("://").nth(1).is_some_and(|rest| {
        rest.split('/').next().is_some_and(|authority| authority.contains('@'))
    });
    let bus_url = (kind != "embedded" && config.bus.advertise && !has_credentials)
        .then(|| config.bus.url.clone());
    WorkerBootstrap {
        bus: kind.to_owned(),
        bus_url,
        namespace: config.bus.namespace.clone(),
        heartbeat_interval_ms: u64::try_from(config.engine.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
        claim_idle_ms: u64::try_from(config.bus.claim_idle.as_millis()).unwrap_or(u64::MAX),
        block_time_ms: u64::try_from(config.bus.block_time.as_millis()).unwrap_or(u64::MAX),
        batch_size: config.bus.batch_size,
    }
}

/// The environment manager's settings from the configuration.
fn env_settings(config: &Config) -> EnvSettings {
    let envs = &config.environments;
    EnvSettings {
        data_dir: config.data_dir.clone(),
        port_range: (envs.port_range_start, envs.port_range_end),
        block_size: envs.block_size,
        quota: envs.max_per_project,
        idle_timeout: envs.idle_timeout,
        delete_after: envs.delete_after,
        setup_command: envs.setup_command.clone(),
        copy_files: envs.copy_files.clone(),
        max_apps: envs.max_deployed_apps as usize,
        reconcile_interval: Duration::from_secs(2),
    }
}

/// Tells the proxy what a service whose upstream does not answer is doing.
struct ServiceStates(Arc<EnvManager>);

#[async_trait::async_trait]
impl drover_proxy::UpstreamStates for ServiceStates {
    async fn describe(&self, route: &Route) -> Option<String> {
        let key = route.instance.as_deref()?.parse().ok()?;
        self.0.describe_instance(&key).await
    }
}

/// The routing proxy's listeners: HTTP, and HTTPS with the data directory's local CA
/// (made on first use) when `proxy.tls_listen` is set.
async fn bind_proxy(config: &Config) -> Result<Proxy, ServerError> {
    let proxy = Proxy::bind(config.proxy.listen).await?;
    let Some(tls_listen) = config.proxy.tls_listen else { return Ok(proxy) };
    let dir = proxy_ca_dir(&config.data_dir);
    let ca = tokio::task::spawn_blocking(move || drover_proxy::LocalCa::load_or_create(&dir))
        .await
        .map_err(|err| ServerError::Config(format!("loading the local CA: {err}")))?
        .map_err(drover_proxy::ProxyError::from)?;
    tracing::info!(ca = %ca.cert_path().display(), "HTTPS certificates are signed by the local CA");
    Ok(proxy.with_tls(tls_listen, ca).await?)
}

/// Deletes events older than the retention window, hourly (and once at start).
async fn prune_events(
    store: Arc<dyn Store>,
    leader: tokio::sync::watch::Receiver<bool>,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Once across the servers sharing the database.
        if !*leader.borrow() {
            continue;
        }
        let now = drover_domain::Timestamp::from_system_time(std::time::SystemTime::now());
        match store.prune_events(now.minus(retention)).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "events past their retention deleted"),
            Err(err) => tracing::warn!(error = %err, "pruning old events failed"),
        }
    }
}

/// Where the proxy's local CA is kept.
pub fn proxy_ca_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("proxy-ca")
}

/// Keeps the proxy's routes equal to what runs: each environment's services at
/// `<service>.<env>[.<project>].localhost`, shared ones at `<service>.localhost`, and the
/// apps of the `deployments` environment at `app.run-<id>.localhost`, each with its project.
async fn sync_routes(
    mut services: tokio::sync::watch::Receiver<Vec<ServiceRoute>>,
    routes: RouteTable,
    stop: CancellationToken,
) {
    loop {
        let current: Vec<Route> = services
            .borrow_and_update()
            .iter()
            .map(|route| Route {
                host: route.host.clone(),
                upstream: route.upstream,
                service: route.service.clone(),
                environment: route.environment_name.clone(),
                project: route.project.as_ref().map(ToString::to_string),
                activity: route.environment.map(|id| id.to_string()),
                instance: Some(route.instance.to_string()),
            })
            .collect();
        routes.replace_all(current);
        tokio::select! {
            () = stop.cancelled() => return,
            changed = services.changed() => if changed.is_err() { return },
        }
    }
}

/// Local processes always (memory limits by the kernel where a memory cgroup is writable,
/// else by an RSS watch); the Docker provider too when a service names an image or the
/// engine's socket exists (so containers a killed server left are swept either way).
fn providers(
    config: &Config,
    services: &[drover_domain::ServiceSpec],
) -> Result<Providers, ServerError> {
    let limited = services.iter().any(|s| s.memory_limit_bytes.is_some() && s.image.is_none());
    let local = match MemoryCgroups::detect() {
        Ok(cgroups) => {
            let swept = cgroups.sweep();
            if limited {
                tracing::info!(version = ?cgroups.version(), base = %cgroups.base().display(), swept, "memory limits enforced by cgroups");
            }
            LocalProvider::with_memory_cgroups(Arc::new(cgroups))
        }
        Err(reason) => {
            if limited {
                tracing::info!(%reason, "no writable memory cgroup; memory limits watch resident memory");
            }
            LocalProvider::default()
        }
    };
    let socket = &config.environments.docker_socket;
    let wanted = services.iter().any(|s| s.image.is_some());
    if !wanted && !socket.exists() {
        return Ok(Providers::new(local, None));
    }
    let docker = DockerProvider::new(socket, &config.data_dir)
        .map_err(|err| ServerError::Config(err.to_string()))?;
    Ok(Providers::new(local, Some(Box::new(docker))))
}

/// A run's own environment goes when the run ends (its workspace stays): on the run's
/// terminal event, and by a sweep (at start and every minute) for ends missed while the
/// server was down or the event feed lagged.
async fn release_run_environments(
    store: AnyStore,
    mut events: tokio::sync::broadcast::Receiver<drover_domain::Event>,
    envs: Arc<EnvManager>,
    stop: CancellationToken,
) {
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = sweep.tick() => sweep_finished_run_environments(&store, &envs).await,
            event = events.recv() => match event {
                Ok(event) => {
                    if let (true, Some(id)) = (event.kind.is_run_terminal(), event.environment_id)
                        && let Err(err) = envs.release_run_environment(id).await
                    {
                        tracing::warn!(error = %err, "cannot release a run's environment");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    sweep_finished_run_environments(&store, &envs).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn sweep_finished_run_environments(store: &AnyStore, envs: &EnvManager) {
    let swept = async {
        // A minute's grace: a run's environment is made just before the run itself.
        let settled = drover_domain::Timestamp::from_system_time(
            std::time::SystemTime::now() - Duration::from_secs(60),
        );
        let candidates: Vec<_> = envs
            .run_environments()
            .await?
            .into_iter()
            .filter(|env| env.created_at < settled)
            .collect();
        let ids: Vec<_> = candidates.iter().map(|env| env.id).collect();
        let unfinished: std::collections::HashSet<_> =
            store.unfinished_runs_in(&ids).await?.into_iter().map(|(env, _)| env).collect();
        for env in candidates.iter().filter(|env| !unfinished.contains(&env.id)) {
            envs.release_run_environment(env.id).await?;
        }
        Ok::<_, drover_env::manager::EnvError>(())
    };
    if let Err(err) = swept.await {
        tracing::warn!(error = %err, "sweeping the environments of ended runs failed");
    }
}

/// Agent work inside an environment is activity too: every stage event of a run placed
/// in an environment reports it, so a long agent stage never sees its environment idled.
async fn agent_activity(
    mut events: tokio::sync::broadcast::Receiver<drover_domain::Event>,
    reports: tokio::sync::mpsc::Sender<String>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(event) => {
                if let (Some(id), drover_domain::EventKind::Stage(_)) =
                    (event.environment_id, event.kind)
                {
                    // A full channel means activity is already queued: dropping is fine.
                    let _ = reports.try_send(id.to_string());
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Proxied requests are activity: the environment's idle clock starts over (recorded at
/// most once every few seconds per environment).
async fn record_activity(
    mut reports: tokio::sync::mpsc::Receiver<String>,
    envs: Arc<EnvManager>,
    stop: CancellationToken,
) {
    let mut last: std::collections::HashMap<String, std::time::Instant> =
        std::collections::HashMap::new();
    loop {
        let report = tokio::select! {
            () = stop.cancelled() => return,
            report = reports.recv() => match report {
                Some(report) => report,
                None => return,
            },
        };
        if last.get(&report).is_some_and(|at| at.elapsed() < Duration::from_secs(5)) {
            continue;
        }
        if let Ok(id) = report.parse() {
            envs.touch(id).await;
        }
        last.insert(report, std::time::Instant::now());
    }
}
