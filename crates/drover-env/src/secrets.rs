//! Project secrets for service instances. The environment manager may be given a
//! [`SecretSource`] (in a server, the vault); every per-environment service instance then
//! asks it for its project's secrets each time its process starts — one call per start,
//! so a secret changed since is picked up by the next restart — and runs with them as
//! environment variables, its output redacted (`[redacted:NAME]`) before it reaches the
//! log file or a follower. The values live only in the memory of the instance's
//! supervisor task for the life of that process: nothing is persisted.
//!
//! Shared services (one instance for every project) and the deployed apps of the
//! `deployments` environment get no secrets.

use std::sync::Arc;

use async_trait::async_trait;
use drover_domain::{ProjectId, SecretValues};

use crate::CommandSpec;

/// Why a project's secrets could not be had. The message never holds a value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the project's secrets cannot be read: {0}")]
pub struct SecretsUnavailable(pub String);

/// Where service instances get their project's secrets.
#[async_trait]
pub trait SecretSource: Send + Sync + 'static {
    /// `project`'s secrets, opened, for one process start. `actor` and `purpose` are what
    /// an audited source records of the read (`environment dev`, `service web`).
    async fn secrets_for(
        &self,
        project: &ProjectId,
        actor: &str,
        purpose: &str,
    ) -> Result<SecretValues, SecretsUnavailable>;
}

/// The secrets one instance asks for at every start of its process: whose, and who asks.
#[derive(Clone)]
pub struct InstanceSecrets {
    pub source: Arc<dyn SecretSource>,
    pub project: ProjectId,
    /// Who reads them, for the audit log: `environment <name>`.
    pub actor: String,
    /// What for: `service <name>`.
    pub purpose: String,
}

impl std::fmt::Debug for InstanceSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSecrets")
            .field("project", &self.project)
            .field("actor", &self.actor)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

impl InstanceSecrets {
    /// The project's secrets now (one call to the source).
    pub(crate) async fn fetch(&self) -> Result<SecretValues, SecretsUnavailable> {
        self.source.secrets_for(&self.project, &self.actor, &self.purpose).await
    }
}

/// `command` with `secrets` added to its environment.
///
/// Precedence: every variable the plan already sets wins over a secret of the same name,
/// and that secret is left out of the process's environment. The plan holds drover's own
/// variables (`PORT`, `DROVER_INSTANCE`, `DROVER_PORT_*`, the environment's `DROVER_*`
/// addresses — secrets may not be named `DROVER_*` anyway) and the service's declared
/// `env`: the former are how drover runs and finds the process, so a secret must never
/// move a service off its port or hide it from the orphan sweep; the latter is what the
/// config says this one service needs, more specific than a project-wide secret. The value
/// of a left-out secret is still redacted from the output, like every other.
pub(crate) fn with_secrets(command: &CommandSpec, secrets: &SecretValues) -> CommandSpec {
    let mut command = command.clone();
    let declared = command.env.len();
    for (name, value) in secrets.iter() {
        if command.env[..declared].iter().any(|(set, _)| set == name) {
            tracing::debug!(secret = name, "a variable of the service's plan shadows a secret");
            continue;
        }
        command.env.push((name.to_owned(), value.to_owned()));
    }
    command
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn planned_variables_win_over_secrets_of_the_same_name() {
        let command = CommandSpec {
            program: "true".into(),
            args: Vec::new(),
            cwd: PathBuf::from("/"),
            env: vec![("PORT".into(), "4000".into()), ("API_URL".into(), "declared".into())],
            log_path: PathBuf::from("/dev/null"),
        };
        let mut secrets = SecretValues::default();
        secrets.insert("PORT", "secret-port-1234");
        secrets.insert("API_URL", "secret-url-1234");
        secrets.insert("MY_TOKEN", "tok-12345678");
        let merged = with_secrets(&command, &secrets);
        assert_eq!(
            merged.env,
            [
                ("PORT".to_owned(), "4000".to_owned()),
                ("API_URL".to_owned(), "declared".to_owned()),
                ("MY_TOKEN".to_owned(), "tok-12345678".to_owned()),
            ]
        );
    }
}
