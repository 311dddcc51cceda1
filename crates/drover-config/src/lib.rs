//! drover's configuration, loaded in layers: built-in defaults, then `drover.toml` (the
//! working directory's, or the file given with `--config`), then `DROVER_<SECTION>__<KEY>`
//! environment variables, then command-line flags (applied by the caller through
//! [`Config::apply`]). Everything is validated at load: an unknown key, a value of the wrong
//! type or out of range is an error that names the key, where it came from, and why.

mod pipelines;
mod secrets;
mod services;
mod webhooks;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_domain::{
    AgentDefinition, CustomRoute, PipelineCatalog, RouteTarget, ServiceSpec, Sharing,
    parse_hostname,
};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use pipelines::{AgentConfig, AgentKindConfig, PipelineConfig, PolicyConfig, StageConfig};
pub use secrets::SecretsConfig;
pub use services::{
    EnvironmentsConfig, ReadinessConfig, ServiceConfig, parse_bytes, service_specs,
};
pub use webhooks::WebhooksConfig;

/// The file looked for in the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "drover.toml";
/// The data directory when neither the config nor `--data-dir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = ".drover";
/// The API's default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// The routing proxy's default listen address.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:7080";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("invalid configuration: {key}: {message}")]
    InvalidService { key: String, message: String },
    /// A value was loaded but is invalid: says which file was read.
    #[error("{}: {source}", file.display())]
    InFile { file: PathBuf, source: Box<ConfigError> },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where drover keeps its database, workspaces and logs.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub proxy: ProxyConfig,
    pub store: StoreConfig,
    pub bus: BusConfig,
    pub engine: EngineConfig,
    pub workers: WorkersConfig,
    pub log: LogConfig,
    pub environments: EnvironmentsConfig,
    pub auth: AuthConfig,
    pub events: EventsConfig,
    pub secrets: SecretsConfig,
    pub webhooks: WebhooksConfig,
    /// Services every environment runs, by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Custom hostnames for the proxy: `"api.novu.loc" = "novu:api"` (a shared service and
    /// one of its ports) or `"mail.alice.loc" = "alice/mailpit"` (one environment's).
    pub routes: BTreeMap<String, String>,
    /// Agents as data: `[agents.NAME]` (a command, or the template scaffolder).
    pub agents: BTreeMap<String, AgentConfig>,
    /// Pipelines as data: `[pipelines.NAME]`, possibly extending `sdlc`.
    pub pipelines: BTreeMap<String, PipelineConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub body_limit_bytes: usize,
    /// How long `drover up` waits for running stages and children when stopping.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// `[events]`: the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Events older than this are deleted (streams resuming from before it start at the
    /// oldest kept event).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { retention: Duration::from_secs(30 * 24 * 3600) }
    }
}

/// `[auth]`: how callers are authenticated and throttled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The key that signs access and service tokens (at least 32 bytes); made on first use
    /// (mode 0600). Several servers behind one load balancer must share it. Default:
    /// `<data_dir>/auth/jwt.key`.
    pub signing_key_file: Option<PathBuf>,
    /// Requests per minute one credential (or, without one, one IP address) may make.
    pub rate_limit_per_minute: u32,
    /// Requests per minute one IP address may make, whatever credentials it uses.
    pub ip_rate_limit_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { signing_key_file: None, rate_limit_per_minute: 1200, ip_rate_limit_per_minute: 3000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Route `<service>.<env>.localhost` to deployed apps (`drover up` only).
    pub enabled: bool,
    /// Address of the routing proxy.
    pub listen: SocketAddr,
    /// Also serve HTTPS here, with certificates from a local CA kept in the data directory.
    pub tls_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH`, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for a
    /// PostgreSQL database several servers may share; defaults to
    /// `sqlite://<data_dir>/drover.db`.
    pub url: Option<String>,
    /// Pooled connections: SQLite's readers (its writes always go through one more
    /// connection), PostgreSQL's connections.
    pub max_connections: u32,
    /// PostgreSQL: how long an operation waits for a pooled connection before failing.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// SQLite: how long a statement waits on a locked database before failing.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// `embedded` (in-process), `redis://…` (Redis Streams) or `nats://…` (JetStream).
    pub url: String,
    /// Bound of each queue: the embedded bus refuses beyond it (attempts wait in the
    /// store), brokers trim or refuse beyond it.
    pub capacity: usize,
    /// Messages a consumer reads per broker round trip.
    pub batch_size: usize,
    /// How long a broker read waits on an empty queue.
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
    /// A delivered task neither acknowledged nor kept alive for this long goes to another
    /// consumer (`XAUTOCLAIM` idle time, JetStream `AckWait`).
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// Prefix of every broker name, to share one broker between installations.
    pub namespace: String,
    /// Tell external workers the broker's URL (only ever a URL without credentials).
    pub advertise: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// How often a worker heartbeats a running attempt. A lease lasts 1.5× this long and
    /// the reaper looks every quarter interval, so a lost worker's stage is retried within
    /// 2× the interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often the dispatcher looks for due attempts when nothing woke it.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most attempts handed to the bus in one dispatcher pass.
    pub dispatch_batch: u32,
    /// A dispatched attempt no worker started for this long is checked with the broker
    /// and published again if the broker lost it.
    #[serde(with = "humantime_serde")]
    pub redispatch_after: Duration,
    /// How long the leader lease lasts: the loops that run once across servers sharing a
    /// database (lease reaping, reconciliation, webhook sending, event retention) run on
    /// its holder, which renews it every third of this; when the holder dies, another
    /// server takes over within this long.
    #[serde(with = "humantime_serde")]
    pub leader_lease: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    /// Run the built-in agents' workers inside the server process (`drover up`).
    pub embedded: bool,
    /// Attempts one agent type runs at once inside this process.
    pub concurrency: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `drover_engine=debug,info`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            server: ServerConfig::default(),
            proxy: ProxyConfig::default(),
            store: StoreConfig::default(),
            bus: BusConfig::default(),
            engine: EngineConfig::default(),
            workers: WorkersConfig::default(),
            log: LogConfig::default(),
            environments: EnvironmentsConfig::default(),
            auth: AuthConfig::default(),
            events: EventsConfig::default(),
            secrets: SecretsConfig::default(),
            webhooks: WebhooksConfig::default(),
            services: BTreeMap::new(),
            routes: BTreeMap::new(),
            agents: BTreeMap::new(),
            pipelines: BTreeMap::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // The literal is a valid socket address.
            listen: DEFAULT_LISTEN.parse().expect("default listen address parses"),
            body_limit_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // The literal is a valid socket address.
            listen: DEFAULT_PROXY_LISTEN.parse().expect("default proxy address parses"),
            tls_listen: None,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "embedded".to_owned(),
            capacity: 1024,
            batch_size: 16,
            block_time: Duration::from_secs(2),
            claim_idle: Duration::from_secs(15),
            namespace: String::new(),
            advertise: true,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            poll_interval: Duration::from_millis(500),
            dispatch_batch: 100,
            redispatch_after: Duration::from_secs(15),
            leader_lease: Duration::from_secs(6),
        }
    }
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self { embedded: true, concurrency: 4 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".to_owned() }
    }
}

/// Values given on the command line; they win over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub proxy_listen: Option<SocketAddr>,
    pub proxy_tls_listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub embedded_workers: Option<bool>,
}

/// How a configuration is loaded — the file and the command-line values — kept so it can
/// be loaded again the same way (a reload: the file is read again, the process's
/// `DROVER_<SECTION>__<KEY>` variables and the flags apply as they did).
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file read: the one given, else `./drover.toml` if it existed; absolute, so a
    /// reload reads the same file whatever the working directory.
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

impl ConfigSource {
    /// The source [`Config::load`] reads with the same arguments now.
    pub fn new(file: Option<&Path>, overrides: Overrides) -> Self {
        let file = match file {
            Some(path) => Some(path.to_path_buf()),
            None => Path::new(DEFAULT_CONFIG_FILE).is_file().then(|| DEFAULT_CONFIG_FILE.into()),
        };
        let file = file.map(|path| std::path::absolute(&path).unwrap_or(path));
        Self { file, overrides }
    }

    /// Loads and validates the configuration from this source (blocking file IO).
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.file.as_deref(), &self.overrides)
    }
}

impl Config {
    /// Loads defaults, then `file` (or `./drover.toml` if it exists), then the process's
    /// `DROVER_<SECTION>__<KEY>` variables, then `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let read: Option<PathBuf> = match file {
            Some(path) if !path.is_file() => return Err(ConfigError::MissingFile(path.into())),
            Some(path) => Some(path.into()),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => Some(DEFAULT_CONFIG_FILE.into()),
            None => None,
        };
        if let Some(path) = &read {
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only variables with a section separator are config keys: `DROVER_SERVER` and
        // `DROVER_TOKEN` are CLI settings, not sections.
        figment = figment
            .merge(Env::prefixed("DROVER_").filter(|key| key.as_str().contains("__")).split("__"));
        let mut config: Config = figment.extract().map_err(|err| {
            let messages: Vec<String> = err.into_iter().map(describe_figment_error).collect();
            ConfigError::Parse(messages.join("; "))
        })?;
        config.apply(overrides);
        config.validate().map_err(|source| match read {
            Some(file) => ConfigError::InFile { file, source: Box::new(source) },
            None => source,
        })?;
        Ok(config)
    }

    /// Applies command-line values on top of what was loaded.
    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(dir) = &overrides.data_dir {
            self.data_dir.clone_from(dir);
        }
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(listen) = overrides.proxy_listen {
            self.proxy.listen = listen;
        }
        if let Some(listen) = overrides.proxy_tls_listen {
            self.proxy.tls_listen = Some(listen);
        }
        if let Some(format) = overrides.log_format {
            self.log.format = format;
        }
        if let Some(embedded) = overrides.embedded_workers {
            self.workers.embedded = embedded;
        }
    }

    /// Checks ranges and formats that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if let Some(url) = &self.store.url
            && let Err(message) = check_store_url(url)
        {
            return Err(ConfigError::Invalid { key: "store.url", message });
        }
        if self.store.max_connections == 0 {
            return invalid("store.max_connections", "must be at least 1");
        }
        if self.store.acquire_timeout.is_zero() {
            return invalid("store.acquire_timeout", "must be more than 0s");
        }
        let url = self.bus.url.as_str();
        let known = url == "embedded"
            || ["redis://", "rediss://", "nats://", "tls://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
        if !known {
            return Err(ConfigError::Invalid {
                key: "bus.url",
                message: format!(
                    "`{url}` is not supported; expected `embedded`, `redis://…` or `nats://…`"
                ),
            });
        }
        if !(1..=10_000).contains(&self.bus.batch_size) {
            return invalid("bus.batch_size", "must be between 1 and 10000");
        }
        if self.bus.block_time < Duration::from_millis(10)
            || self.bus.block_time > Duration::from_secs(60)
        {
            return invalid("bus.block_time", "must be between 10ms and 60s");
        }
        if self.bus.claim_idle < self.engine.heartbeat_interval * 2 {
            return invalid(
                "bus.claim_idle",
                "must be at least twice engine.heartbeat_interval, or running tasks would be taken over",
            );
        }
        if !self.bus.namespace.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return invalid("bus.namespace", "may only contain letters, digits, `-` and `_`");
        }
        if self.engine.leader_lease < Duration::from_millis(300) {
            return invalid("engine.leader_lease", "must be at least 300ms");
        }
        if self.engine.redispatch_after < Duration::from_millis(100) {
            return invalid("engine.redispatch_after", "must be at least 100ms");
        }
        if self.bus.capacity == 0 {
            return invalid("bus.capacity", "must be at least 1");
        }
        let heartbeat = self.engine.heartbeat_interval;
        if heartbeat < Duration::from_millis(100) || heartbeat > Duration::from_secs(3600) {
            return invalid("engine.heartbeat_interval", "must be between 100ms and 1h");
        }
        if self.engine.poll_interval < Duration::from_millis(10) {
            return invalid("engine.poll_interval", "must be at least 10ms");
        }
        if !(1..=10_000).contains(&self.engine.dispatch_batch) {
            return invalid("engine.dispatch_batch", "must be between 1 and 10000");
        }
        if self.events.retention < Duration::from_secs(3600) {
            return invalid("events.retention", "must be at least 1h");
        }
        self.webhooks.validate()?;
        if self.auth.rate_limit_per_minute == 0 || self.auth.ip_rate_limit_per_minute == 0 {
            return invalid("auth.rate_limit_per_minute", "must be at least 1");
        }
        if !(1..=1024).contains(&self.workers.concurrency) {
            return invalid("workers.concurrency", "must be between 1 and 1024");
        }
        let envs = &self.environments;
        if envs.block_size == 0 || envs.block_size > 1000 {
            return invalid("environments.block_size", "must be between 1 and 1000");
        }
        if envs.port_range_start < 1024
            || envs.port_range_end < envs.port_range_start + envs.block_size - 1
        {
            return invalid(
                "environments.port_range_start",
                "the range must start at 1024 or above and hold at least one block",
            );
        }
        if envs.max_per_project == 0 {
            return invalid("environments.max_per_project", "must be at least 1");
        }
        self.custom_routes()?;
        self.pipeline_catalog()?;
        if self.server.body_limit_bytes < 1024 {
            return invalid("server.body_limit_bytes", "must be at least 1024");
        }
        Ok(())
    }

    /// The store URL, derived from the data directory unless set explicitly.
    pub fn store_url(&self) -> String {
        match &self.store.url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("drover.db").display()),
        }
    }

    /// The validated services of `[services.NAME]`.
    pub fn service_specs(&self) -> Result<Vec<ServiceSpec>, ConfigError> {
        service_specs(&self.services)
    }

    /// The validated `[routes]`: each hostname well-formed, each target a configured
    /// service (shared ones without an environment, per-environment ones with one) and,
    /// if named, one of its ports.
    pub fn custom_routes(&self) -> Result<Vec<CustomRoute>, ConfigError> {
        let specs = self.service_specs()?;
        let mut routes = Vec::with_capacity(self.routes.len());
        for (host, target) in &self.routes {
            let key = format!("routes.\"{host}\"");
            let invalid =
                |message: String| ConfigError::InvalidService { key: key.clone(), message };
            let host = parse_hostname(host).map_err(|e| invalid(e.message))?;
            let target = RouteTarget::parse(target).map_err(|e| invalid(e.message))?;
            let Some(spec) = specs.iter().find(|s| s.name == target.service) else {
                return Err(invalid(format!("no service `{}` in [services]", target.service)));
            };
            match (spec.sharing, &target.environment) {
                (Sharing::Shared, Some(_)) => {
                    return Err(invalid(format!(
                        "`{}` is shared: name it without an environment",
                        target.service
                    )));
                }
                (Sharing::PerEnv, None) => {
                    return Err(invalid(format!(
                        "`{}` runs per environment: name one, as [PROJECT/]ENV/{}",
                        target.service, target.service
                    )));
                }
                _ => {}
            }
            if let Some(port) = &target.port {
                let reachable: &[String] = match spec.sharing {
                    // A shared service has one address: its first port.
                    Sharing::Shared => spec.ports.get(..1).unwrap_or_default(),
                    Sharing::PerEnv => &spec.ports,
                };
                if !reachable.contains(port) {
                    return Err(invalid(format!(
                        "`{}` has no routable port `{port}` (it has: {})",
                        target.service,
                        reachable.join(", ")
                    )));
                }
            }
            routes.push(CustomRoute { host, target });
        }
        Ok(routes)
    }

    /// Every agent: the built-in ones, then `[agents]`.
    pub fn agent_definitions(&self) -> Result<Vec<AgentDefinition>, ConfigError> {
        pipelines::agent_definitions(&self.agents)
    }

    /// Every pipeline: `sdlc`, then `[pipelines]`.
    pub fn pipeline_catalog(&self) -> Result<PipelineCatalog, ConfigError> {
        pipelines::pipeline_catalog(&self.pipelines, &self.agent_definitions()?)
    }

    /// A worker silent for this long is marked lost.
    pub fn worker_liveness(&self) -> Duration {
        self.engine.heartbeat_interval * 3
    }

    /// How long a lease lasts without a heartbeat.
    pub fn lease_duration(&self) -> Duration {
        self.engine.heartbeat_interval.mul_f64(1.5)
    }
}

/// Renders one figment error as `key: problem (from source)`, naming the exact
/// environment variable or file the bad value came from.
fn describe_figment_error(err: figment::Error) -> String {
    let path: Vec<String> = err.path.iter().map(|p| p.to_lowercase()).collect();
    let key = if path.is_empty() { "config".to_owned() } else { path.join(".") };
    let source = match &err.metadata {
        Some(meta) if meta.name.contains("environment") => {
            format!("environment variable DROVER_{}", path.join("__").to_uppercase())
        }
        Some(meta) => match &meta.source {
            Some(source) => source.to_string(),
            None => meta.name.to_string(),
        },
        None => "defaults".to_owned(),
    };
    format!("{key}: {} (from {source})", err.kind)
}

/// The part after the scheme of a `postgres://` or `postgresql://` URL.
fn postgres_url(url: &str) -> Option<&str> {
    url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://"))
}

/// Why `store.url` names no store drover can open (the message never repeats a password).
fn check_store_url(url: &str) -> Result<(), String> {
    if let Some(rest) = postgres_url(url) {
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host = authority.rsplit('@').next().unwrap_or_default();
        let database = rest.split_once('/').map(|(_, path)| path.split('?').next().unwrap_or(""));
        return match (host.is_empty(), database) {
            (true, _) => Err("a PostgreSQL URL needs a host: postgres://USER@HOST/DATABASE".into()),
            (false, None | Some("")) => {
                Err("a PostgreSQL URL needs a database: postgres://USER@HOST/DATABASE".into())
            }
            (false, Some(_)) => Ok(()),
        };
    }
    match url.strip_prefix("sqlite://") {
        Some(path) if !path.is_empty() => Ok(()),
        _ => Err(format!(
            "`{url}` is not supported; expected sqlite://PATH or postgres://USER@HOST/DATABASE"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err, reason = "figment's Jail closures return figment::Error")]
mod tests {
    use drover_domain::AgentRunner;
    use figment::Jail;

    use super::*;

    fn load_in(jail: &Jail) -> Result<Config, ConfigError> {
        let _ = jail;
        Config::load(None, &Overrides::default())
    }

    #[test]
    fn defaults_apply_with_no_file_and_no_variables() {
        Jail::expect_with(|jail| {
            let config = load_in(jail).expect("defaults are valid");
            assert_eq!(config, Config::default());
            assert_eq!(config.store_url(), "sqlite://.drover/drover.db");
            assert_eq!(config.lease_duration(), Duration::from_millis(7500));
            Ok(())
        });
    }

    #[test]
    fn the_file_then_the_environment_then_flags_win() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "drover.toml",
                "data_dir = \"from-file\"\n[engine]\nheartbeat_interval = \"2s\"\n[server]\nlisten = \"127.0.0.1:9000\"\n",
            )?;
            jail.set_env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "750ms");
            jail.set_env("DROVER_SERVER", "http://ignored:1");
            let overrides =
                Overrides { data_dir: Some("from-flag".into()), ..Overrides::default() };
            let config = Config::load(None, &overrides).expect("valid");
            assert_eq!(config.data_dir, PathBuf::from("from-flag"));
            assert_eq!(config.engine.heartbeat_interval, Duration::from_millis(750));
            assert_eq!(config.server.listen.port(), 9000);
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.create_file("drover.toml", "[engine]\nheartbeat = \"2s\"\n")?;
            let message = load_in(jail).unwrap_err().to_string();
            assert!(message.contains("engine.heartbeat: unknown field"), "{message}");
            assert!(message.contains("engine"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn a_wrong_type_names_the_key_and_its_source() {
        Jail::expect_with(|jail| {
            jail.set_env("DROVER_ENGINE__DISPATCH_BATCH", "lots");
            let message = load_in(jail).unwrap_err().to_string();
            assert!(message.contains("engine.dispatch_batch"), "{message}");
            assert!(message.contains("DROVER_ENGINE__DISPATCH_BATCH"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn an_out_of_range_value_names_the_key_and_the_rule() {
        Jail::expect_with(|jail| {
            jail.set_env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "1ms");
            let message = load_in(jail).unwrap_err().to_string();
            assert_eq!(
                message,
                "invalid configuration: engine.heartbeat_interval: must be between 100ms and 1h"
            );
            Ok(())
        });
    }

    #[test]
    fn an_unsupported_bus_is_rejected() {
        Jail::expect_with(|jail| {
            jail.set_env("DROVER_BUS__URL", "kafka://x");
            let message = load_in(jail).unwrap_err().to_string();
            assert!(message.contains("bus.url"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn store_urls_name_a_sqlite_file_or_a_postgres_database() {
        for (url, ok) in [
            ("sqlite://data/drover.db", true),
            ("postgres://drover@db.internal:5432/drover", true),
            ("postgresql://drover:secret@127.0.0.1/drover?sslmode=require", true),
            ("sqlite://", false),
            ("mysql://db/drover", false),
            ("postgres://drover:secret@db.internal", false),
            ("postgres:///drover", false),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env("DROVER_STORE__URL", url);
                match load_in(jail) {
                    Ok(config) => assert!(ok && config.store_url() == url, "{url} accepted"),
                    Err(err) => {
                        let message = err.to_string();
                        assert!(!ok, "{url} refused: {message}");
                        assert!(message.contains("store.url"), "{message}");
                        assert!(!message.contains("secret"), "{message}");
                    }
                }
                Ok(())
            });
        }
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        Jail::expect_with(|_jail| {
            let err = Config::load(Some(Path::new("nope.toml")), &Overrides::default());
            assert!(matches!(err, Err(ConfigError::MissingFile(_))));
            Ok(())
        });
    }

    #[test]
    fn custom_routes_name_a_configured_service_and_port() {
        Jail::expect_with(|jail| {
            let services = "[services.novu]\ncommand = \"novu\"\nports = [\"api\"]\nsharing = \"shared\"\naddress = \"127.0.0.1:3002\"\n\
                [services.mailpit]\ncommand = \"mailpit\"\nports = [\"smtp\", \"web\"]\n";
            jail.create_file(
                "drover.toml",
                &format!("{services}[routes]\n\"API.novu.loc\" = \"novu:api\"\n\"mail.alice.loc\" = \"alice/mailpit:web\"\n\"mail.b.loc\" = \"team-b/alice/mailpit\"\n"),
            )?;
            let routes = load_in(jail).expect("valid").custom_routes().unwrap();
            assert_eq!(routes[0].host, "api.novu.loc");
            assert_eq!(routes[0].target.to_string(), "novu:api");
            assert_eq!(routes[1].target.to_string(), "alice/mailpit:web");
            assert_eq!(routes[2].target.to_string(), "team-b/alice/mailpit");
            assert_eq!(routes[2].target.project().unwrap().as_str(), "team-b");

            for (route, expected) in [
                ("\"api.novu.loc\" = \"nope\"", "no service `nope`"),
                ("\"api.novu.loc\" = \"bob/novu\"", "`novu` is shared"),
                ("\"mail.loc\" = \"mailpit\"", "name one, as [PROJECT/]ENV/mailpit"),
                (
                    "\"mail.loc\" = \"a/mailpit:imap\"",
                    "no routable port `imap` (it has: smtp, web)",
                ),
                ("\"bad_host.loc\" = \"novu\"", "may only hold letters"),
            ] {
                jail.create_file("drover.toml", &format!("{services}[routes]\n{route}\n"))?;
                let message = load_in(jail).unwrap_err().to_string();
                assert!(message.contains("routes."), "{message}");
                assert!(message.contains(expected), "{route}: {message}");
            }
            Ok(())
        });
    }

    #[test]
    fn a_pipeline_extends_sdlc_and_swaps_its_scaffold_agent_for_a_command() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "drover.toml",
                r#"
[agents.coder]
command = "python3"
args = ["coder.py", "{prompt}"]
env = { MODEL = "small", TEMPERATURE = "0" }

[agents.careful-coder]
extends = "coder"
env = { MODEL = "large" }

[agents.planner]
kind = "llm"
model = "qwen2.5-coder"
api_key_env = "OLLAMA_KEY"

[pipelines.mine]
extends = "sdlc"
[[pipelines.mine.stages]]
name = "scaffold"
agent = "careful-coder"
timeout = "20m"
[[pipelines.mine.stages]]
name = "review"
agent = "coder"

[pipelines.spec-first]
extends = "sdlc"
[[pipelines.spec-first.stages]]
name = "scaffold"
contract = false
[[pipelines.spec-first.stages]]
name = "code"
agent = "coder"
contract = true
"#,
            )?;
            let config = load_in(jail).expect("valid");
            let agents = config.agent_definitions().unwrap();
            let careful = agents.iter().find(|a| a.name.as_str() == "careful-coder").unwrap();
            let AgentRunner::Command(command) = &careful.runner else { panic!("{careful:?}") };
            // Inherited program and args, one variable overridden, the other kept.
            assert_eq!((command.program.as_str(), command.args.len()), ("python3", 2));
            assert_eq!(command.env["MODEL"], "large");
            assert_eq!(command.env["TEMPERATURE"], "0");

            let planner = agents.iter().find(|a| a.name.as_str() == "planner").unwrap();
            let AgentRunner::Llm(llm) = &planner.runner else { panic!("{planner:?}") };
            assert_eq!(llm.base_url, "http://127.0.0.1:11434/v1", "Ollama's by default");
            assert_eq!((llm.prompt.as_str(), llm.max_tokens), ("{prompt}", 4096));

            let catalog = config.pipeline_catalog().unwrap();
            let mine = catalog.get("mine").unwrap();
            let sdlc = catalog.get("sdlc").unwrap();
            let names: Vec<&str> = mine.stages.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["scaffold", "validate", "e2e", "integration", "deploy", "review"]);
            assert_eq!(mine.stages[0].agent.as_str(), "careful-coder");
            assert_eq!(mine.stages[0].timeout, Duration::from_secs(1200));
            assert_eq!(mine.stages[0].max_attempts, sdlc.stages[0].max_attempts, "inherited");
            assert_eq!(mine.stages[1], sdlc.stages[1], "untouched stages are the base's");
            // The stage that writes the project keeps the contract with another agent.
            assert!(mine.stages[0].contract && !mine.stages[5].contract);
            let spec_first = catalog.get("spec-first").unwrap();
            let authors: Vec<&str> =
                spec_first.stages.iter().filter(|s| s.contract).map(|s| s.name.as_str()).collect();
            assert_eq!(authors, ["code"]);
            Ok(())
        });
    }

    #[test]
    fn a_bad_agent_or_pipeline_is_refused_naming_the_file_and_key() {
        Jail::expect_with(|jail| {
            for (text, expected) in [
                (
                    "[pipelines.mine]\nextends = \"sdlc\"\n[[pipelines.mine.stages]]\nname = \"scaffold\"\nagent = \"ghost\"\n",
                    "drover.toml: invalid configuration: pipelines.mine.stages[0].agent: no agent `ghost`",
                ),
                (
                    "[agents.a]\nextends = \"b\"\n[agents.b]\nextends = \"a\"\n",
                    "goes round in a circle",
                ),
                (
                    "[agents.x]\nkind = \"command\"\n",
                    "agents.x.command: a command agent must name a program",
                ),
                (
                    "[agents.deploy]\ncommand = \"x\"\n",
                    "agents.deploy: is the name of a built-in agent",
                ),
                ("[pipelines.p]\nextends = \"nope\"\n", "pipelines.p.extends: no pipeline `nope`"),
                ("[pipelines.p]\n", "pipelines.p.stages: a pipeline needs at least one stage"),
                (
                    "[[pipelines.p.stages]]\nname = \"a\"\nagent = \"scaffold\"\n[[pipelines.p.stages]]\nname = \"a\"\nagent = \"deploy\"\n",
                    "pipelines.p.stages[1].name: stage `a` is listed twice",
                ),
                (
                    "[[pipelines.p.stages]]\nname = \"a\"\nagent = \"scaffold\"\nneeds = [\"b\"]\n[[pipelines.p.stages]]\nname = \"b\"\nagent = \"deploy\"\n",
                    "drover.toml: invalid configuration: pipelines.p.stages: `needs` form a cycle",
                ),
                (
                    "[[pipelines.p.stages]]\nname = \"a\"\nagent = \"scaffold\"\nneeds = [\"ghost\"]\n",
                    "pipelines.p.stages[0].needs: no stage `ghost` (stages: a) (stage `a`)",
                ),
                (
                    "[[pipelines.p.stages]]\nname = \"a\"\nagent = \"scaffold\"\n[[pipelines.p.stages]]\nname = \"b\"\nagent = \"deploy\"\nneeds = []\nwhen = \"a.output.ok\"\n",
                    "pipelines.p.stages[1].when: `a.output.ok` reads stage `a`, which `b` does not need",
                ),
                (
                    "[[pipelines.p.stages]]\nname = \"a\"\nagent = \"scaffold\"\nwhen = \"a.result\"\n",
                    "pipelines.p.stages[0].when: `a.result`: `result` is neither `status` nor `output`",
                ),
                (
                    "[[pipelines.p.stages]]\nname = \"a\"\nagent = \"scaffold\"\npolicy = { protected_paths = [\"../etc\"] }\n",
                    "pipelines.p.stages[0].policy.protected_paths: `../etc` must be a path inside the workspace",
                ),
            ] {
                jail.create_file("drover.toml", text)?;
                let message = load_in(jail).unwrap_err().to_string();
                assert!(message.contains(expected), "{text}: {message}");
                assert!(message.starts_with("drover.toml: "), "{message}");
            }
            Ok(())
        });
    }
}
