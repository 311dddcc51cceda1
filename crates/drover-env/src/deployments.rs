//! Deployed apps: long-running children owned by the server, one per run, stopped when
//! the run is redeployed or the server shuts down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_domain::{RunId, Timestamp};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::{CommandSpec, GroupChild, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("cannot open the app log {path}: {source}")]
    Log { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// A deployed app, as reported to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub run_id: RunId,
    pub pid: u32,
    pub port: u16,
    pub url: String,
    pub log_path: PathBuf,
    pub started_at: Timestamp,
}

struct Entry {
    deployment: Deployment,
    stop: oneshot::Sender<Duration>,
    supervisor: JoinHandle<()>,
}

/// The registry of deployed apps. Cloning shares it.
#[derive(Clone)]
pub struct Deployments {
    // A std mutex: held only to insert, look up or remove entries, never across an await.
    entries: Arc<Mutex<HashMap<RunId, Entry>>>,
    /// The current set of deployments, for whoever follows changes (the proxy's routes).
    current: Arc<watch::Sender<Vec<Deployment>>>,
}

impl Default for Deployments {
    fn default() -> Self {
        Self { entries: Arc::default(), current: Arc::new(watch::Sender::new(Vec::new())) }
    }
}

impl Deployments {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every change to the set of deployed apps, starting with the current set.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Deployment>> {
        self.current.subscribe()
    }

    fn announce(&self, entries: &HashMap<RunId, Entry>) {
        let mut list: Vec<Deployment> = entries.values().map(|e| e.deployment.clone()).collect();
        list.sort_by_key(|d| d.run_id);
        self.current.send_replace(list);
    }

    /// Starts `spec` as the app of `run`, replacing (and stopping) any earlier one.
    pub async fn deploy(
        &self,
        run: RunId,
        spec: &CommandSpec,
        port: u16,
        url: String,
        now: Timestamp,
    ) -> Result<Deployment, DeploymentError> {
        self.stop(run, Duration::from_secs(5)).await;
        let log_error = |source| DeploymentError::Log { path: spec.log_path.clone(), source };
        if let Some(parent) = spec.log_path.parent() {
            std::fs::create_dir_all(parent).map_err(log_error)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(log_error)?;
        let log_err = log.try_clone().map_err(log_error)?;
        let mut child = GroupChild::spawn(spec, Stdio::from(log), Stdio::from(log_err))?;
        let deployment = Deployment {
            run_id: run,
            pid: child.pid(),
            port,
            url,
            log_path: spec.log_path.clone(),
            started_at: now,
        };
        let (stop, stop_requested) = oneshot::channel::<Duration>();
        let registry = self.clone();
        let supervisor = tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    tracing::warn!(run_id = %run, status = ?status.ok(), "deployed app exited");
                    // Forget it unless it was already replaced.
                    let mut entries = registry.lock();
                    if entries.get(&run).is_some_and(|e| e.deployment.pid == child.pid()) {
                        entries.remove(&run);
                        registry.announce(&entries);
                    }
                }
                grace = stop_requested => {
                    let grace = grace.unwrap_or(Duration::from_secs(5));
                    let _ = child.terminate(grace).await;
                }
            }
        });
        let entry = Entry { deployment: deployment.clone(), stop, supervisor };
        {
            let mut entries = self.lock();
            entries.insert(run, entry);
            self.announce(&entries);
        }
        tracing::info!(run_id = %run, pid = deployment.pid, url = %deployment.url, "app deployed");
        Ok(deployment)
    }

    pub fn get(&self, run: RunId) -> Option<Deployment> {
        self.lock().get(&run).map(|entry| entry.deployment.clone())
    }

    pub fn list(&self) -> Vec<Deployment> {
        self.lock().values().map(|entry| entry.deployment.clone()).collect()
    }

    /// Stops the app of `run`, if any, and waits until its group is gone.
    pub async fn stop(&self, run: RunId, grace: Duration) -> bool {
        let removed = {
            let mut entries = self.lock();
            let removed = entries.remove(&run);
            self.announce(&entries);
            removed
        };
        let Some(entry) = removed else {
            return false;
        };
        let _ = entry.stop.send(grace);
        let _ = entry.supervisor.await;
        tracing::info!(run_id = %run, "app stopped");
        true
    }

    /// Stops every app, in parallel, each with `grace` to exit cleanly.
    pub async fn stop_all(&self, grace: Duration) {
        let entries: Vec<Entry> = {
            let mut entries = self.lock();
            let drained = entries.drain().map(|(_, entry)| entry).collect();
            self.announce(&entries);
            drained
        };
        let mut supervisors = Vec::with_capacity(entries.len());
        for entry in entries {
            let _ = entry.stop.send(grace);
            supervisors.push(entry.supervisor);
        }
        for supervisor in supervisors {
            let _ = supervisor.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Entry>> {
        // Entries stay consistent even if a holder panicked: each operation is one call.
        self.entries.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;

    use super::*;

    fn sleeper(dir: &tempfile::TempDir) -> CommandSpec {
        CommandSpec {
            program: "sh".into(),
            args: vec!["-c".into(), "echo up; exec sleep 600".into()],
            cwd: dir.path().to_path_buf(),
            env: vec![],
            log_path: dir.path().join("app.log"),
        }
    }

    async fn gone(pid: u32) -> bool {
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie =
                stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
            if kill(Pid::from_raw(pid as i32), None).is_err() || zombie {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_deployed_app_runs_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let deployments = Deployments::new();
        let run = RunId::new();
        let app = deployments
            .deploy(run, &sleeper(&dir), 1234, "http://x".into(), Timestamp::from_millis(0))
            .await
            .unwrap();
        assert_eq!(deployments.get(run), Some(app.clone()));
        assert!(kill(Pid::from_raw(app.pid as i32), None).is_ok());

        assert!(deployments.stop(run, Duration::from_secs(1)).await);
        assert!(gone(app.pid).await, "app still alive after stop");
        assert!(deployments.get(run).is_none());
        assert!(!deployments.stop(run, Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn redeploying_a_run_replaces_its_app_and_stop_all_stops_everything() {
        let dir = tempfile::tempdir().unwrap();
        let deployments = Deployments::new();
        let run = RunId::new();
        let now = Timestamp::from_millis(0);
        let first = deployments.deploy(run, &sleeper(&dir), 1, "a".into(), now).await.unwrap();
        let second = deployments.deploy(run, &sleeper(&dir), 2, "b".into(), now).await.unwrap();
        assert!(gone(first.pid).await);
        let other =
            deployments.deploy(RunId::new(), &sleeper(&dir), 3, "c".into(), now).await.unwrap();
        assert_eq!(deployments.list().len(), 2);

        let watched = deployments.subscribe();
        assert_eq!(watched.borrow().len(), 2);

        deployments.stop_all(Duration::from_secs(1)).await;
        assert!(gone(second.pid).await && gone(other.pid).await);
        assert!(deployments.list().is_empty());
        assert!(watched.borrow().is_empty(), "watchers see the apps go");
    }
}
