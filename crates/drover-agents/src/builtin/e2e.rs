//! The e2e agent: starts the app on a free port, waits for its health probe, runs the
//! project's checks against it (its manifest's, or those detection planned), and stops it
//! (its whole process group).

use std::time::Duration;

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use drover_env::{CommandSpec, ProcessError, free_port, spawn_logged};
use serde_json::json;

use super::probe;
use crate::project::require_program;
use crate::{Agent, AgentFailure, AgentTask, into_result};

pub struct E2eAgent {
    agent_type: AgentType,
    client: reqwest::Client,
}

impl E2eAgent {
    pub fn new() -> Self {
        Self { agent_type: super::agent_type("e2e"), client: probe::client() }
    }
}

impl Default for E2eAgent {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Agent for E2eAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(self.e2e(task).await)
    }
}

impl E2eAgent {
    async fn e2e(&self, task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
        let project = super::project(task).await?;
        let start = project.start()?;
        require_program(start, "start the app")?;
        let port =
            free_port().map_err(|err| AgentFailure::transient(format!("no free port: {err}")))?;
        let spec = app_command(start, task, port);
        task.log.line(format!("starting `{}` on port {port}", spec.display())).await;
        // The app gets no secrets, but may print one an earlier stage wrote into the
        // workspace: its output is redacted like any other.
        let mut app = spawn_logged(&spec, task.log.redactor()).await.map_err(|err| match err {
            ProcessError::Log { .. } => AgentFailure::transient(err.to_string()),
            other => AgentFailure::permanent(other.to_string()),
        })?;

        let base = format!("http://127.0.0.1:{port}");
        let health_url = format!("{base}{}", project.health_path);
        let outcome = async {
            let ready_in = probe::wait_healthy(&self.client, &health_url, &task.cancel, || {
                std::future::ready(match app.try_exited() {
                    Some(status) => Err(format!("the app exited during startup ({status})")),
                    None => Ok(()),
                })
            })
            .await?;
            task.log.line(format!("healthy after {} ms", ready_in.as_millis())).await;
            let results = probe::run_checks(&self.client, &base, &project.checks, &task.log).await;
            match probe::failed_checks(&results) {
                Some(failure) => Err(failure),
                None => Ok(json!({
                    "port": port,
                    "ready_ms": u64::try_from(ready_in.as_millis()).unwrap_or(u64::MAX),
                    "checks": results,
                    "project": project.to_json(),
                })),
            }
        }
        .await;
        let _ = app.terminate(Duration::from_secs(3)).await;
        task.log.line("app stopped").await;
        outcome
    }
}

/// The command `start` that starts the app on `port`, writing to the attempt's log: the
/// run environment's variables (service addresses and the like), then what the app itself
/// needs (its own `PORT` wins over the environment's). An argument that is exactly `$PORT`
/// becomes the port, for programs that take it as an argument (nothing goes through a
/// shell).
pub(super) fn app_command(start: &[String], task: &AgentTask, port: u16) -> CommandSpec {
    let mut env = super::environment_variables(task);
    env.extend([
        ("PORT".to_owned(), port.to_string()),
        ("HOST".to_owned(), "127.0.0.1".to_owned()),
        ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
        ("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()),
        ("DROVER_RUN_ID".to_owned(), task.envelope.run_id.to_string()),
        // npm would look for a newer npm on the network at each start.
        ("NPM_CONFIG_UPDATE_NOTIFIER".to_owned(), "false".to_owned()),
    ]);
    let port = port.to_string();
    let mut argv = start.iter().map(|arg| if arg == "$PORT" { port.clone() } else { arg.clone() });
    CommandSpec {
        program: argv.next().unwrap_or_default(),
        args: argv.collect(),
        cwd: task.workspace.clone(),
        env,
        log_path: task.log.path().to_path_buf(),
    }
}
