//! The deploy agent: starts the app as a long-running child owned by the server (through
//! the [`Deployments`] registry), waits until it is healthy, and reports its URL.

use std::path::Path;

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::{AgentType, Timestamp};
use drover_env::{Deployments, free_port};
use serde_json::json;

use super::e2e::app_command;
use super::probe;
use crate::{Agent, AgentFailure, AgentTask, Manifest, into_result};

pub struct DeployAgent {
    agent_type: AgentType,
    deployments: Deployments,
    client: reqwest::Client,
}

impl DeployAgent {
    pub fn new(deployments: Deployments) -> Self {
        Self { agent_type: super::agent_type("deploy"), deployments, client: probe::client() }
    }
}

#[async_trait]
impl Agent for DeployAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        let result = self.deploy(task).await;
        if result.is_err() {
            self.deployments.stop(task.envelope.run_id, std::time::Duration::from_secs(3)).await;
        }
        into_result(result)
    }
}

impl DeployAgent {
    async fn deploy(&self, task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
        let run = task.envelope.run_id;
        let manifest = Manifest::load(&task.workspace)
            .await
            .map_err(|err| AgentFailure::permanent(err.to_string()))?;
        let port =
            free_port().map_err(|err| AgentFailure::transient(format!("no free port: {err}")))?;
        let mut spec = app_command(&manifest, task, port);
        // The app outlives this attempt: it writes to the run's app log.
        spec.log_path = task.log.path().parent().unwrap_or(Path::new(".")).join("app.log");
        let base = format!("http://127.0.0.1:{port}");
        let url = format!("{base}/");
        task.log.line(format!("deploying `{}` on port {port}", spec.display())).await;
        let now = Timestamp::from_system_time(std::time::SystemTime::now());
        let deployment = self
            .deployments
            .deploy(run, &spec, port, url.clone(), now)
            .await
            .map_err(|err| AgentFailure::permanent(err.to_string()))?;

        let health_url = format!("{base}{}", manifest.health_path);
        let ready_in = probe::wait_healthy(&self.client, &health_url, &task.cancel, || match self
            .deployments
            .get(run)
        {
            Some(_) => Ok(()),
            None => {
                Err(format!("the app exited during startup; see {}", deployment.log_path.display()))
            }
        })
        .await?;
        let root = [crate::Check { path: "/".to_owned(), status: 200, contains: None }];
        let results = probe::run_checks(&self.client, &base, &root, &task.log).await;
        if let Some(failure) = probe::failed_checks(&results) {
            return Err(failure);
        }
        task.log.line(format!("deployed at {url} (pid {})", deployment.pid)).await;
        Ok(json!({
            "url": url,
            "port": port,
            "pid": deployment.pid,
            "ready_ms": u64::try_from(ready_in.as_millis()).unwrap_or(u64::MAX),
            "log_path": deployment.log_path.display().to_string(),
        }))
    }
}
