//! Reloading `[agents]` and `[pipelines]` while the server runs, without dropping work.
//!
//! Triggers: SIGHUP, and a change of the config file (its modification time and length,
//! looked at every two seconds) when the server was started from one. The configuration is
//! loaded again the way it was at start ([`ConfigSource`]: the same file, the process's
//! `DROVER_<SECTION>__<KEY>` variables, the same flags). If that fails, the error (which
//! names the file, the key and why) is logged and the running configuration stays. If it
//! succeeds, the engine gets the new pipeline catalog (runs under way keep the pipeline
//! stored with them) and the embedded workers the new agents (running stages finish with
//! the agent they started with). Nothing else is applied: a change to another section
//! (listen addresses, store, bus, services, ...) is reported as needing a restart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use drover_agents::{WorkerPool, builtin};
use drover_config::{Config, ConfigError, ConfigSource};
use drover_domain::{AgentDefinition, PipelineCatalog};
use drover_engine::Engine;
use drover_env::manager::EnvManager;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// How often the config file is looked at, by default.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Where a running server reloads its configuration from, and how it notices a change.
#[derive(Debug, Clone)]
pub struct ConfigReload {
    source: ConfigSource,
    watch: Option<Duration>,
}

impl ConfigReload {
    /// Reloads from `source` on SIGHUP and, when it names a file, whenever that file
    /// changes (looked at every [`WATCH_INTERVAL`]).
    pub fn new(source: ConfigSource) -> Self {
        let watch = source.file.is_some().then_some(WATCH_INTERVAL);
        Self { source, watch }
    }

    /// Looks at the file this often instead; `None` reloads on SIGHUP only.
    #[must_use]
    pub fn watch_every(mut self, interval: Option<Duration>) -> Self {
        self.watch = interval.filter(|_| self.source.file.is_some());
        self
    }

    pub fn source(&self) -> &ConfigSource {
        &self.source
    }
}

/// What a reload changes in the running server.
pub(crate) struct Live {
    pub(crate) engine: Arc<Engine>,
    /// The embedded workers, when the server runs them.
    pub(crate) workers: Option<Arc<WorkerPool>>,
    /// Where the deploy agent puts apps.
    pub(crate) envs: Arc<EnvManager>,
    /// The configuration the server runs with (its agents and pipelines follow reloads).
    pub(crate) running: Config,
}

/// Starts the reload task; it ends when `stop` fires. SIGHUP is handled from the moment
/// this returns.
pub(crate) fn spawn(
    reload: ConfigReload,
    live: Live,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let hangup = match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot handle SIGHUP; the configuration reloads only when its file changes");
            None
        }
    };
    tokio::spawn(Reloader { reload, live }.run(hangup, stop))
}

struct Reloader {
    reload: ConfigReload,
    live: Live,
}

/// What is compared to notice a change of the file: modification time and length.
type Fingerprint = Option<(Option<SystemTime>, u64)>;

async fn fingerprint(file: &Path) -> Fingerprint {
    let meta = tokio::fs::metadata(file).await.ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// The next SIGHUP; never, without a handler.
async fn hangup(signal: &mut Option<Signal>) {
    if let Some(signal) = signal
        && signal.recv().await.is_some()
    {
        return;
    }
    std::future::pending::<()>().await;
}

/// The next look at the file; never, when it is not watched.
async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A configuration loaded again, with what the server takes from it.
struct Loaded {
    config: Config,
    pipelines: PipelineCatalog,
    agents: Vec<AgentDefinition>,
}

impl Reloader {
    async fn run(mut self, mut signal: Option<Signal>, stop: CancellationToken) {
        let file = self.reload.source.file.clone();
        let watched = file.as_ref().filter(|_| self.reload.watch.is_some());
        let mut seen = match watched {
            Some(file) => fingerprint(file).await,
            None => None,
        };
        let mut ticker = self.reload.watch.filter(|_| watched.is_some()).map(|every| {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        loop {
            let trigger = tokio::select! {
                () = stop.cancelled() => return,
                () = hangup(&mut signal) => "SIGHUP",
                () = tick(&mut ticker) => {
                    let Some(file) = watched else { continue };
                    let now = fingerprint(file).await;
                    if now == seen {
                        continue;
                    }
                    "file changed"
                }
            };
            // Whatever triggered it, this reload reads the file as it is now.
            if let Some(file) = watched {
                seen = fingerprint(file).await;
            }
            self.reload_now(trigger).await;
        }
    }

    async fn reload_now(&mut self, trigger: &'static str) {
        let source = self.reload.source.clone();
        let file = describe(source.file.as_deref());
        let loaded = tokio::task::spawn_blocking(move || -> Result<Loaded, ConfigError> {
            let mut config = source.load()?;
            // The server runs with an absolute data directory.
            if let Ok(dir) = std::path::absolute(&config.data_dir) {
                config.data_dir = dir;
            }
            let pipelines = config.pipeline_catalog()?;
            let agents = config.agent_definitions()?;
            Ok(Loaded { config, pipelines, agents })
        })
        .await;
        let loaded = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(err)) => {
                tracing::error!(
                    %file, trigger, error = %err,
                    "configuration not reloaded; the running one stays"
                );
                return;
            }
            Err(err) => {
                tracing::error!(
                    %file, trigger, error = %err,
                    "loading the configuration failed; the running one stays"
                );
                return;
            }
        };
        let restart = needs_restart(&self.live.running, &loaded.config);
        if !restart.is_empty() {
            let sections = restart.join(", ");
            tracing::warn!(
                %file, sections = %sections,
                "changes to {sections} need a restart; only [agents] and [pipelines] are reloaded"
            );
        }
        let running = &mut self.live.running;
        if running.agents == loaded.config.agents && running.pipelines == loaded.config.pipelines {
            tracing::info!(%file, trigger, "configuration read again; agents and pipelines unchanged");
            return;
        }
        self.live.engine.replace_pipelines(Arc::new(loaded.pipelines.clone()));
        self.live.engine.replace_agents(loaded.agents.clone());
        if let Some(workers) = &self.live.workers {
            workers.replace_agents(builtin::configured_agents(
                &loaded.agents,
                self.live.envs.clone(),
                &running.data_dir,
            ));
        }
        running.agents = loaded.config.agents;
        running.pipelines = loaded.config.pipelines;
        let pipelines: Vec<&str> = loaded.pipelines.names().collect();
        let agents: Vec<&str> = loaded.agents.iter().map(|a| a.name.as_str()).collect();
        tracing::info!(
            %file, trigger,
            pipelines = %pipelines.join(", "),
            agents = %agents.join(", "),
            "configuration reloaded"
        );
    }
}

fn describe(file: Option<&Path>) -> String {
    file.map_or_else(|| "(no config file)".to_owned(), |file| file.display().to_string())
}

/// The sections of `new` that differ from what runs and are not reloaded.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let Config {
        data_dir,
        server,
        proxy,
        store,
        bus,
        engine,
        workers,
        log,
        environments,
        auth,
        events,
        secrets,
        webhooks,
        services,
        routes,
        // Reloaded.
        agents: _,
        pipelines: _,
    } = new;
    [
        ("data_dir", *data_dir != running.data_dir),
        ("[server]", *server != running.server),
        ("[proxy]", *proxy != running.proxy),
        ("[store]", *store != running.store),
        ("[bus]", *bus != running.bus),
        ("[engine]", *engine != running.engine),
        ("[workers]", *workers != running.workers),
        ("[log]", *log != running.log),
        ("[environments]", *environments != running.environments),
        ("[auth]", *auth != running.auth),
        ("[events]", *events != running.events),
        ("[secrets]", *secrets != running.secrets),
        ("[webhooks]", *webhooks != running.webhooks),
        ("[services]", *services != running.services),
        ("[routes]", *routes != running.routes),
    ]
    .into_iter()
    .filter_map(|(section, differs)| differs.then_some(section))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sections_that_are_not_reloaded_need_a_restart() {
        let running = Config::default();
        let mut new = Config::default();
        new.pipelines.insert("p".to_owned(), drover_config::PipelineConfig::default());
        assert!(needs_restart(&running, &new).is_empty());
        new.server.body_limit_bytes += 1;
        new.routes.insert("a.loc".to_owned(), "s".to_owned());
        assert_eq!(needs_restart(&running, &new), ["[server]", "[routes]"]);
    }
}
