//! The deploy agent: hands the app to an [`AppHost`] (on a server: a supervised service of
//! the project's `deployments` environment), waits until it is healthy, and reports its
//! URL.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use drover_env::apps::{AppHost, AppLaunch};
use drover_env::free_port;
use serde_json::json;

use super::e2e::app_command;
use super::probe;
use crate::project::require_program;
use crate::{Agent, AgentFailure, AgentTask, into_result};

pub struct DeployAgent {
    agent_type: AgentType,
    apps: Arc<dyn AppHost>,
    client: reqwest::Client,
}

impl DeployAgent {
    pub fn new(apps: Arc<dyn AppHost>) -> Self {
        Self { agent_type: super::agent_type("deploy"), apps, client: probe::client() }
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
            self.apps.undeploy(&task.envelope.project_id, task.envelope.run_id).await;
        }
        into_result(result)
    }
}

impl DeployAgent {
    async fn deploy(&self, task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
        let run = task.envelope.run_id;
        let project = super::project(task).await?;
        let start = project.start()?;
        require_program(start, "start the app")?;
        let port =
            free_port().map_err(|err| AgentFailure::transient(format!("no free port: {err}")))?;
        let mut spec = app_command(start, task, port);
        // The app outlives this attempt: it writes to the run's app log.
        spec.log_path = task.log.path().parent().unwrap_or(Path::new(".")).join("app.log");
        let base = format!("http://127.0.0.1:{port}");
        let url = format!("{base}/");
        task.log.line(format!("deploying `{}` on port {port}", spec.display())).await;
        let launch = AppLaunch {
            project: task.envelope.project_id.clone(),
            run,
            command: spec,
            port,
            health_path: project.health_path.clone(),
        };
        let deployment = self.apps.deploy(launch).await.map_err(AgentFailure::permanent)?;
        if let Some(environment) = &deployment.environment {
            task.log.line(format!("the app is a service of environment `{environment}`")).await;
        }

        let health_url = format!("{base}{}", project.health_path);
        let log_path = deployment.log_path.display().to_string();
        let apps = self.apps.clone();
        let ready_in = probe::wait_healthy(&self.client, &health_url, &task.cancel, || {
            let apps = apps.clone();
            let log_path = log_path.clone();
            async move {
                if apps.is_up(run).await {
                    Ok(())
                } else {
                    Err(format!("the app exited during startup; see {log_path}"))
                }
            }
        })
        .await?;
        let root = [crate::Check { path: "/".to_owned(), status: 200, contains: None }];
        let results = probe::run_checks(&self.client, &base, &root, &task.log).await;
        if let Some(failure) = probe::failed_checks(&results) {
            return Err(failure);
        }
        let pid = deployment.pid.map_or_else(|| "unknown".to_owned(), |pid| pid.to_string());
        task.log.line(format!("deployed at {url} (pid {pid})")).await;
        Ok(json!({
            "url": url,
            "port": port,
            "pid": deployment.pid,
            "ready_ms": u64::try_from(ready_in.as_millis()).unwrap_or(u64::MAX),
            "log_path": deployment.log_path.display().to_string(),
            "project": project.to_json(),
        }))
    }
}
