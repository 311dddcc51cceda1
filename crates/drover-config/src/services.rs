//! `[environments]` and `[services.NAME]`: how environments are laid out and which
//! services they run, turned into validated domain [`ServiceSpec`]s at load.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_domain::{
    DependencyCondition, ProbeKind, Readiness, RestartPolicy, RestartRules, ServiceName,
    ServiceSpec, Sharing,
};
use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvironmentsConfig {
    /// First port environments' blocks are carved from.
    pub port_range_start: u16,
    /// Last port (inclusive) of the range.
    pub port_range_end: u16,
    /// Ports per environment.
    pub block_size: u16,
    /// Live environments a project may have.
    pub max_per_project: u32,
    /// Stop an environment after this long without agent work or proxied requests
    /// (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Delete an environment stopped for this long (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub delete_after: Duration,
    /// Shell command run in a new workspace (e.g. `npm ci`); empty for none.
    pub setup_command: String,
    /// Files copied from the repository into a new worktree (e.g. `.env`, untracked).
    pub copy_files: Vec<String>,
    /// The Docker Engine's Unix socket, for services with an `image`.
    pub docker_socket: std::path::PathBuf,
    /// Apps deployed by runs kept running per project (in its `deployments` environment);
    /// deploying one more undeploys the oldest.
    pub max_deployed_apps: u32,
}

impl Default for EnvironmentsConfig {
    fn default() -> Self {
        Self {
            port_range_start: 20_000,
            port_range_end: 29_999,
            block_size: 10,
            max_per_project: 5,
            idle_timeout: Duration::from_secs(2 * 3600),
            delete_after: Duration::ZERO,
            setup_command: String::new(),
            copy_files: Vec::new(),
            docker_socket: "/var/run/docker.sock".into(),
            max_deployed_apps: 5,
        }
    }
}

/// A readiness probe as written in the config: exactly one of `http`, `tcp`, `exec`, `log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadinessConfig {
    /// HTTP path that must answer 2xx.
    #[serde(default)]
    pub http: Option<String>,
    /// A TCP connection must succeed.
    #[serde(default)]
    pub tcp: bool,
    /// A command that must exit 0.
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    /// A regular expression a line of output must match.
    #[serde(default)]
    pub log: Option<String>,
    /// Which named port to probe (default: the first).
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

fn default_interval() -> Duration {
    Duration::from_millis(250)
}

fn default_probe_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_threshold() -> u32 {
    1
}

/// A service as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Run the service in a container of this image through the Docker Engine API
    /// (`[environments] docker_socket`) instead of as a local process.
    #[serde(default)]
    pub image: Option<String>,
    /// The program; with an `image`, optional (the image's own command).
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_ports")]
    pub ports: Vec<String>,
    #[serde(default)]
    pub readiness: Option<ReadinessConfig>,
    /// Other services and what to wait for: `started`, `ready` or `completed`.
    #[serde(default)]
    pub depends_on: BTreeMap<String, DependencyCondition>,
    #[serde(default = "default_restart")]
    pub restart: RestartPolicy,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub restart_backoff: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    #[serde(default = "default_reset_after", with = "humantime_serde")]
    pub restart_reset_after: Duration,
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_window", with = "humantime_serde")]
    pub restart_window: Duration,
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// e.g. `512MiB`, `2GB`, or a number of bytes.
    #[serde(default)]
    pub memory_limit: Option<String>,
    #[serde(default = "default_sharing")]
    pub sharing: Sharing,
    /// For a shared service: `host:port` where it listens.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default = "default_log_max")]
    pub log_max_bytes: u64,
    #[serde(default = "default_log_keep")]
    pub log_keep: u32,
}

fn default_ports() -> Vec<String> {
    vec!["http".to_owned()]
}
fn default_restart() -> RestartPolicy {
    RestartPolicy::OnFailure
}
fn default_backoff() -> Duration {
    RestartRules::default().backoff
}
fn default_backoff_max() -> Duration {
    RestartRules::default().backoff_max
}
fn default_reset_after() -> Duration {
    RestartRules::default().reset_after
}
fn default_max_restarts() -> u32 {
    RestartRules::default().max_restarts
}
fn default_window() -> Duration {
    RestartRules::default().window
}
fn default_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_sharing() -> Sharing {
    Sharing::PerEnv
}
fn default_log_max() -> u64 {
    10 * 1024 * 1024
}
fn default_log_keep() -> u32 {
    3
}

fn invalid(key: String, message: impl Into<String>) -> ConfigError {
    ConfigError::InvalidService { key, message: message.into() }
}

/// `postgres:16`, `ghcr.io/org/app@sha256:…`: no spaces or control characters, not empty,
/// not starting with a dash (it would read as an option).
fn valid_image(image: &str) -> bool {
    !image.is_empty()
        && image.len() <= 255
        && !image.starts_with('-')
        && image.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:@+".contains(c))
}

/// `512MiB`, `2GB`, `1024` → bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1024,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1024 * 1024,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// Validates every service and turns it into a [`ServiceSpec`]: names, ports, probes,
/// dependencies (known, acyclic, a shared service depending only on shared ones).
pub fn service_specs(
    services: &BTreeMap<String, ServiceConfig>,
) -> Result<Vec<ServiceSpec>, ConfigError> {
    let mut specs = Vec::with_capacity(services.len());
    for (name, service) in services {
        let key = |field: &str| format!("services.{name}.{field}");
        let service_name = ServiceName::parse(name.as_str())
            .map_err(|err| invalid(format!("services.{name}"), err.message))?;
        match &service.image {
            Some(image) if !valid_image(image) => {
                return Err(invalid(key("image"), format!("`{image}` is not an image reference")));
            }
            None if service.command.trim().is_empty() => {
                return Err(invalid(key("command"), "must name a program (or set an `image`)"));
            }
            _ => {}
        }
        if service.ports.is_empty() && service.sharing == Sharing::PerEnv {
            return Err(invalid(key("ports"), "name at least one port"));
        }
        let readiness = match &service.readiness {
            None => None,
            Some(probe) => {
                let kinds =
                    [probe.http.is_some(), probe.tcp, probe.exec.is_some(), probe.log.is_some()];
                if kinds.iter().filter(|k| **k).count() != 1 {
                    return Err(invalid(
                        key("readiness"),
                        "set exactly one of http, tcp, exec, log",
                    ));
                }
                let kind = if let Some(path) = &probe.http {
                    if !path.starts_with('/') {
                        return Err(invalid(key("readiness.http"), "must start with `/`"));
                    }
                    ProbeKind::Http { path: path.clone() }
                } else if probe.tcp {
                    ProbeKind::Tcp
                } else if let Some(command) = &probe.exec {
                    if command.is_empty() {
                        return Err(invalid(key("readiness.exec"), "must name a program"));
                    }
                    ProbeKind::Exec { command: command.clone() }
                } else {
                    ProbeKind::LogLine { pattern: probe.log.clone().unwrap_or_default() }
                };
                if let Some(port) = &probe.port
                    && !service.ports.contains(port)
                {
                    return Err(invalid(
                        key("readiness.port"),
                        format!("`{port}` is not one of the service's ports"),
                    ));
                }
                if probe.threshold == 0 {
                    return Err(invalid(key("readiness.threshold"), "must be at least 1"));
                }
                Some(Readiness {
                    kind,
                    port: probe.port.clone(),
                    interval: probe.interval.max(Duration::from_millis(10)),
                    timeout: probe.timeout,
                    threshold: probe.threshold,
                })
            }
        };
        let mut depends_on = BTreeMap::new();
        for (dependency, condition) in &service.depends_on {
            let Some(target) = services.get(dependency) else {
                return Err(invalid(key("depends_on"), format!("`{dependency}` is not a service")));
            };
            if dependency == name {
                return Err(invalid(key("depends_on"), "a service cannot depend on itself"));
            }
            if service.sharing == Sharing::Shared && target.sharing == Sharing::PerEnv {
                return Err(invalid(
                    key("depends_on"),
                    format!("a shared service cannot depend on the per-env service `{dependency}`"),
                ));
            }
            let dependency = ServiceName::parse(dependency.as_str())
                .map_err(|err| invalid(key("depends_on"), err.message))?;
            depends_on.insert(dependency, *condition);
        }
        if service.sharing == Sharing::Shared && service.address.is_none() {
            return Err(invalid(
                key("address"),
                "a shared service needs the `host:port` it listens on",
            ));
        }
        if let Some(address) = &service.address
            && address.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none()
        {
            return Err(invalid(key("address"), format!("`{address}` is not host:port")));
        }
        let memory_limit_bytes = match &service.memory_limit {
            None => None,
            Some(text) => Some(parse_bytes(text).ok_or_else(|| {
                invalid(key("memory_limit"), format!("`{text}` is not a size like 512MiB"))
            })?),
        };
        if service.max_restarts == 0 && service.restart != RestartPolicy::Never {
            return Err(invalid(
                key("max_restarts"),
                "must be at least 1 unless restart = \"never\"",
            ));
        }
        specs.push(ServiceSpec {
            name: service_name,
            image: service.image.clone(),
            command: service.command.clone(),
            args: service.args.clone(),
            env: service.env.clone(),
            ports: service.ports.clone(),
            readiness,
            depends_on,
            restart: RestartRules {
                policy: service.restart,
                backoff: service.restart_backoff,
                backoff_max: service.restart_backoff_max.max(service.restart_backoff),
                reset_after: service.restart_reset_after,
                max_restarts: service.max_restarts,
                window: service.restart_window,
            },
            stop_grace: service.stop_grace,
            memory_limit_bytes,
            sharing: service.sharing,
            address: service.address.clone(),
            log_max_bytes: service.log_max_bytes.max(4096),
            log_keep: service.log_keep,
        });
    }
    reject_cycles(&specs)?;
    Ok(specs)
}

fn reject_cycles(specs: &[ServiceSpec]) -> Result<(), ConfigError> {
    fn visit<'a>(
        name: &'a ServiceName,
        specs: &'a [ServiceSpec],
        path: &mut Vec<&'a ServiceName>,
        done: &mut Vec<&'a ServiceName>,
    ) -> Result<(), ConfigError> {
        if done.contains(&name) {
            return Ok(());
        }
        if let Some(start) = path.iter().position(|n| *n == name) {
            let cycle: Vec<String> =
                path[start..].iter().map(|n| n.to_string()).chain([name.to_string()]).collect();
            return Err(invalid(
                format!("services.{name}.depends_on"),
                format!("dependency cycle: {}", cycle.join(" → ")),
            ));
        }
        path.push(name);
        if let Some(spec) = specs.iter().find(|s| &s.name == name) {
            for dependency in spec.depends_on.keys() {
                visit(dependency, specs, path, done)?;
            }
        }
        path.pop();
        done.push(name);
        Ok(())
    }
    let mut done = Vec::new();
    for spec in specs {
        visit(&spec.name, specs, &mut Vec::new(), &mut done)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(toml_text: &str) -> BTreeMap<String, ServiceConfig> {
        #[derive(Deserialize)]
        struct Wrapper {
            services: BTreeMap<String, ServiceConfig>,
        }
        let wrapper: Wrapper = figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::string(toml_text),
        )
        .extract()
        .unwrap();
        wrapper.services
    }

    #[test]
    fn a_full_service_definition_becomes_a_spec() {
        let specs = service_specs(&service(
            r#"
            [services.db]
            command = "postgres"
            ports = ["pg"]
            readiness = { tcp = true }
            [services.web]
            command = "python3"
            args = ["app.py", "--port", "{port}"]
            ports = ["http", "admin"]
            readiness = { http = "/health", interval = "100ms", threshold = 2 }
            depends_on = { db = "ready" }
            restart = "always"
            memory_limit = "256MiB"
            "#,
        ))
        .unwrap();
        let web = specs.iter().find(|s| s.name.as_str() == "web").unwrap();
        assert_eq!(web.ports, ["http", "admin"]);
        assert_eq!(web.memory_limit_bytes, Some(256 * 1024 * 1024));
        assert_eq!(web.restart.policy, RestartPolicy::Always);
        assert_eq!(web.depends_on.values().next(), Some(&DependencyCondition::Ready));
        assert_eq!(web.readiness.as_ref().unwrap().threshold, 2);
    }

    #[test]
    fn unknown_dependencies_cycles_and_shared_without_address_are_refused() {
        let unknown = service_specs(&service(
            "[services.web]\ncommand = \"x\"\ndepends_on = { db = \"ready\" }\n",
        ))
        .unwrap_err();
        assert!(unknown.to_string().contains("services.web.depends_on"), "{unknown}");
        let cycle = service_specs(&service(
            "[services.a]\ncommand = \"x\"\ndepends_on = { b = \"started\" }\n[services.b]\ncommand = \"x\"\ndepends_on = { a = \"started\" }\n",
        ))
        .unwrap_err();
        assert!(cycle.to_string().contains("dependency cycle"), "{cycle}");
        let shared =
            service_specs(&service("[services.mail]\ncommand = \"x\"\nsharing = \"shared\"\n"))
                .unwrap_err();
        assert!(shared.to_string().contains("services.mail.address"), "{shared}");
        let probe = service_specs(&service(
            "[services.web]\ncommand = \"x\"\nreadiness = { tcp = true, http = \"/\" }\n",
        ))
        .unwrap_err();
        assert!(probe.to_string().contains("exactly one"), "{probe}");
    }

    #[test]
    fn an_image_makes_the_command_optional_and_must_be_a_reference() {
        let specs = service_specs(&service(
            "[services.mail]\nimage = \"axllent/mailpit:v1.20\"\nports = [\"smtp\", \"http\"]\n",
        ))
        .unwrap();
        assert_eq!(specs[0].image.as_deref(), Some("axllent/mailpit:v1.20"));
        assert_eq!(specs[0].command, "");
        let bad = service_specs(&service("[services.mail]\nimage = \"-v /:/host\"\n")).unwrap_err();
        assert!(bad.to_string().contains("services.mail.image"), "{bad}");
        let neither = service_specs(&service("[services.mail]\nports = [\"smtp\"]\n")).unwrap_err();
        assert!(neither.to_string().contains("services.mail.command"), "{neither}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512MiB"), Some(512 * 1024 * 1024));
        assert_eq!(parse_bytes("2GB"), Some(2_000_000_000));
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("lots"), None);
    }
}
