//! Services: long-running processes an environment needs (a web app, a database, a mail
//! catcher), how to tell they are ready, how they depend on each other, when to restart
//! them, and whether one instance serves every environment or each gets its own.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{RunId, ServiceName, ValidationError};

/// What a service instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStatus {
    Starting,
    Ready,
    Unhealthy,
    Crashed,
    /// Waiting out the restart delay after a crash.
    Backoff,
    Stopped,
}

impl ServiceStatus {
    pub const ALL: [ServiceStatus; 6] =
        [Self::Starting, Self::Ready, Self::Unhealthy, Self::Crashed, Self::Backoff, Self::Stopped];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Unhealthy => "unhealthy",
            Self::Crashed => "crashed",
            Self::Backoff => "backoff",
            Self::Stopped => "stopped",
        }
    }
}

impl fmt::Display for ServiceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| ValidationError::new("status", format!("`{s}` is not a service status")))
    }
}

/// The observed state of one service instance, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// `None` for a shared instance.
    pub environment_id: Option<crate::EnvironmentId>,
    pub service: ServiceName,
    pub status: ServiceStatus,
    /// The process group leader while it runs (how a restarted server finds it).
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Why it is in its status (exit code, probe failure, memory limit, ...).
    pub reason: Option<String>,
    pub updated_at: crate::Timestamp,
}

/// One instance per environment, or one for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    PerEnv,
    Shared,
}

/// When a service that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    OnFailure,
    Always,
    Never,
}

impl RestartPolicy {
    /// Whether an exit (successful or not) calls for a restart.
    pub fn restarts_after(self, success: bool) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => !success,
            Self::Never => false,
        }
    }
}

/// How restarts are paced and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRules {
    pub policy: RestartPolicy,
    /// Delay before the first restart; doubles each time.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Running this long without exiting resets the delay.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
    /// At most this many restarts within `window`; beyond, the service stays crashed.
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RestartRules {
    fn default() -> Self {
        Self {
            policy: RestartPolicy::OnFailure,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            max_restarts: 5,
            window: Duration::from_secs(300),
        }
    }
}

impl RestartRules {
    /// The delay before restart number `n` (1-based) in the current streak.
    pub fn delay(&self, n: u32) -> Duration {
        let exponent = n.saturating_sub(1).min(20);
        self.backoff.saturating_mul(1 << exponent).min(self.backoff_max)
    }
}

/// How readiness is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// `GET http://127.0.0.1:<port><path>` answers 2xx.
    Http { path: String },
    /// A TCP connection to the port succeeds.
    Tcp,
    /// The command exits 0.
    Exec { command: Vec<String> },
    /// A line of the service's output matches the regular expression.
    LogLine { pattern: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub kind: ProbeKind,
    /// The named port probed (default: the service's first port).
    pub port: Option<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes needed.
    pub threshold: u32,
}

/// What a dependant waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    Started,
    Ready,
    /// It ran and exited 0 (a migration, a seed).
    Completed,
}

/// A service definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: ServiceName,
    /// Run it in a container of this image (the Docker provider) instead of as a local
    /// process. `command` may then be empty: the image's own command.
    #[serde(default)]
    pub image: Option<String>,
    pub command: String,
    pub args: Vec<String>,
    /// Values may use placeholders, see [`crate::expand_placeholders`].
    pub env: BTreeMap<String, String>,
    /// Named ports; the first is also `PORT`.
    pub ports: Vec<String>,
    pub readiness: Option<Readiness>,
    pub depends_on: BTreeMap<ServiceName, DependencyCondition>,
    pub restart: RestartRules,
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    pub memory_limit_bytes: Option<u64>,
    pub sharing: Sharing,
    /// For a shared service: the address it listens on (`host:port`), so one already
    /// running outside drover is found and used.
    pub address: Option<String>,
    /// Rotate the log file beyond this size, keeping `log_keep` old files.
    pub log_max_bytes: u64,
    pub log_keep: u32,
}

/// The values placeholders in a service's command, args and env expand to.
#[derive(Debug, Clone, Default)]
pub struct PlaceholderValues {
    /// `{port}` (the first port) and `{port.NAME}`.
    pub ports: BTreeMap<String, u16>,
    pub first_port: Option<u16>,
    /// `{workspace}`
    pub workspace: String,
    /// `{env}`: the environment's name.
    pub env: String,
    /// `{host.SERVICE}`, `{addr.SERVICE}` (`host:port`), `{url.SERVICE}`.
    pub services: BTreeMap<String, (String, u16)>,
}

/// Expands `{port}`, `{port.NAME}`, `{workspace}`, `{env}`, `{host.SVC}`, `{addr.SVC}` and
/// `{url.SVC}` in `text`. An unknown placeholder is an error naming it.
pub fn expand_placeholders(
    text: &str,
    values: &PlaceholderValues,
) -> Result<String, ValidationError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return Ok(out);
        };
        let key = &after[..close];
        let value = match key.split_once('.') {
            None if key == "port" => values.first_port.map(|p| p.to_string()),
            None if key == "workspace" => Some(values.workspace.clone()),
            None if key == "env" => Some(values.env.clone()),
            Some(("port", name)) => values.ports.get(name).map(|p| p.to_string()),
            Some(("host", svc)) => values.services.get(svc).map(|(host, _)| host.clone()),
            Some(("addr", svc)) => {
                values.services.get(svc).map(|(host, port)| format!("{host}:{port}"))
            }
            Some(("url", svc)) => {
                values.services.get(svc).map(|(host, port)| format!("http://{host}:{port}"))
            }
            _ => None,
        };
        match value {
            Some(value) => out.push_str(&value),
            None => {
                return Err(ValidationError::new(
                    "placeholder",
                    format!("`{{{key}}}` is not a known placeholder here"),
                ));
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> PlaceholderValues {
        PlaceholderValues {
            ports: BTreeMap::from([("http".to_owned(), 20000), ("admin".to_owned(), 20001)]),
            first_port: Some(20000),
            workspace: "/w".into(),
            env: "dev".into(),
            services: BTreeMap::from([("db".to_owned(), ("127.0.0.1".to_owned(), 5432))]),
        }
    }

    #[test]
    fn placeholders_expand_to_ports_paths_and_service_addresses() {
        let expanded = expand_placeholders(
            "--port {port} --admin {port.admin} --root {workspace}/{env} --db {url.db} {addr.db}",
            &values(),
        )
        .unwrap();
        assert_eq!(
            expanded,
            "--port 20000 --admin 20001 --root /w/dev --db http://127.0.0.1:5432 127.0.0.1:5432"
        );
        assert_eq!(expand_placeholders("no braces", &values()).unwrap(), "no braces");
    }

    #[test]
    fn an_unknown_placeholder_is_named() {
        let err = expand_placeholders("{port.nope}", &values()).unwrap_err();
        assert!(err.message.contains("{port.nope}"), "{}", err.message);
    }

    #[test]
    fn restart_delays_double_up_to_the_cap() {
        let rules = RestartRules {
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            ..RestartRules::default()
        };
        assert_eq!(rules.delay(1), Duration::from_millis(100));
        assert_eq!(rules.delay(2), Duration::from_millis(200));
        assert_eq!(rules.delay(3), Duration::from_millis(350));
        assert!(RestartPolicy::OnFailure.restarts_after(false));
        assert!(!RestartPolicy::OnFailure.restarts_after(true));
        assert!(RestartPolicy::Always.restarts_after(true));
        assert!(!RestartPolicy::Never.restarts_after(false));
    }
}

/// The name of the long-lived environment deployed apps run in, one per project. Reserved:
/// users cannot create an environment of that name, and it counts towards no quota and is
/// never idled.
pub const DEPLOYMENTS_ENV: &str = "deployments";

/// The prefix of the environments drover creates for runs (`run-<12 hex of the run id>`),
/// reserved like [`DEPLOYMENTS_ENV`]; they live as long as their run.
pub const RUN_ENV_PREFIX: &str = "run-";

/// Whether an environment of this name is one drover made for itself (no quota, no idling,
/// not creatable by users).
pub fn is_system_environment(name: &str) -> bool {
    name == DEPLOYMENTS_ENV || name.starts_with(RUN_ENV_PREFIX)
}

/// An app a run deployed: a service of the project's `deployments` environment added at
/// run time (not from the config), supervised like any other and restored after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// `run-<run id>`.
    pub name: ServiceName,
    pub run_id: RunId,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where it runs: the run's workspace.
    pub cwd: String,
    /// The port it listens on (also `PORT`); its URL stays the same across restarts.
    pub port: u16,
    /// Readiness: this path answers 2xx.
    pub health_path: String,
    pub log_path: String,
    /// Where the routing proxy serves it (`app.run-<id>.localhost`).
    pub hostname: String,
}

impl AppSpec {
    /// The service name of `run`'s app.
    pub fn name_for(run: RunId) -> ServiceName {
        // A run id is a UUID: `run-` and 32 hex digits is always a valid name.
        ServiceName::parse(format!("run-{}", run.as_uuid().simple()))
            .unwrap_or_else(|_| unreachable!("run-<hex> is a valid service name"))
    }
}
