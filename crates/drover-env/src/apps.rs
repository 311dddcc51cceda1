//! Where a run's deploy stage puts its app: the [`AppHost`] trait, with two homes.
//!
//! On a drover server the app becomes a supervised service of the project's long-lived
//! `deployments` environment ([`EnvManager`]): readiness-probed, restarted on failure,
//! routed by the proxy, recorded in the store and brought back after a restart. A
//! standalone `drover worker` has no environments; it keeps the app as a child of its own
//! ([`Deployments`]), as long as it runs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use drover_domain::{AppSpec, ProjectId, RunId, Timestamp};

use crate::manager::{DeployPin, EnvManager};
use crate::{CommandSpec, Deployments, app_hostname};

/// An app to deploy for a run.
#[derive(Debug, Clone)]
pub struct AppLaunch {
    pub project: ProjectId,
    pub run: RunId,
    pub command: CommandSpec,
    pub port: u16,
    /// The path that answers 2xx once the app is ready.
    pub health_path: String,
}

/// A deployed app, as its host reports it.
#[derive(Debug)]
pub struct AppStarted {
    pub pid: Option<u32>,
    pub log_path: PathBuf,
    /// `deployments` environment, or none for a worker-owned app.
    pub environment: Option<String>,
    /// While held, the host treats the deploy as under way: the app is not undeployed to
    /// make room for another. Keep it until the app is verified (or the deploy failed).
    pub pin: Option<DeployPin>,
}

/// Keeps deployed apps running.
#[async_trait]
pub trait AppHost: Send + Sync + 'static {
    /// Starts the app of `launch.run`, replacing an earlier one of the same run.
    async fn deploy(&self, launch: AppLaunch) -> Result<AppStarted, String>;
    /// Whether the run's app is up: starting or serving, not exited or given up on.
    async fn is_up(&self, run: RunId) -> bool;
    /// Stops and forgets the run's app, if any.
    async fn undeploy(&self, project: &ProjectId, run: RunId);
}

#[async_trait]
impl AppHost for Deployments {
    async fn deploy(&self, launch: AppLaunch) -> Result<AppStarted, String> {
        let url = format!("http://127.0.0.1:{}/", launch.port);
        let now = Timestamp::from_system_time(SystemTime::now());
        let deployment =
            Deployments::deploy(self, launch.run, &launch.command, launch.port, url, now)
                .await
                .map_err(|err| err.to_string())?;
        Ok(AppStarted {
            pid: Some(deployment.pid),
            log_path: deployment.log_path,
            environment: None,
            pin: None,
        })
    }

    async fn is_up(&self, run: RunId) -> bool {
        self.get(run).is_some()
    }

    async fn undeploy(&self, _project: &ProjectId, run: RunId) {
        self.stop(run, Duration::from_secs(3)).await;
    }
}

#[async_trait]
impl AppHost for EnvManager {
    async fn deploy(&self, launch: AppLaunch) -> Result<AppStarted, String> {
        let command = launch.command;
        let app = AppSpec {
            name: AppSpec::name_for(launch.run),
            run_id: launch.run,
            program: command.program,
            args: command.args,
            env: command.env,
            cwd: command.cwd.display().to_string(),
            port: launch.port,
            health_path: launch.health_path,
            log_path: command.log_path.display().to_string(),
            hostname: app_hostname(launch.run),
        };
        let log_path = PathBuf::from(&app.log_path);
        let (state, pin) =
            self.deploy_app(&launch.project, app).await.map_err(|err| err.to_string())?;
        Ok(AppStarted {
            pid: state.pid,
            log_path,
            environment: Some(drover_domain::DEPLOYMENTS_ENV.to_owned()),
            pin: Some(pin),
        })
    }

    async fn is_up(&self, run: RunId) -> bool {
        self.app_state(run).await.is_some_and(|state| crate::manager::app_is_up(&state))
    }

    async fn undeploy(&self, project: &ProjectId, run: RunId) {
        if let Err(err) = self.undeploy_app(project, run).await {
            tracing::warn!(run_id = %run, error = %err, "cannot undeploy an app");
        }
    }
}
