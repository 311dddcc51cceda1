//! Providers: how a service instance's process is started. The local-process provider
//! (the default) runs it as a child in its own process group; the Docker provider
//! ([`crate::docker`]) runs it in a container; [`Providers`] picks one per service (a
//! service with an `image` goes to Docker).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncRead;

use crate::cgroup::{LimitedGroup, MemoryCgroups};
use crate::{CommandSpec, GroupChild, ProcessError};

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub success: bool,
    /// `exited with code 3`, `killed by SIGKILL`, ...
    pub description: String,
}

pub(crate) type Output = Box<dyn AsyncRead + Send + Unpin>;

/// What to start for one service instance.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The instance (`service@env` or `shared/service`), for container names and labels.
    pub instance: &'a str,
    pub command: &'a CommandSpec,
    /// Run it in a container of this image.
    pub image: Option<&'a str>,
    pub memory_limit_bytes: Option<u64>,
}

/// A started process.
#[async_trait]
pub trait SpawnedProcess: Send {
    fn pid(&self) -> Option<u32>;
    /// Whether the memory limit is enforced by the provider itself (a container's cgroup);
    /// when not, the supervisor watches resident memory.
    fn limits_memory(&self) -> bool {
        false
    }
    /// Its stdout and stderr, once.
    fn take_output(&mut self) -> Option<(Output, Output)>;
    async fn wait(&mut self) -> ExitInfo;
    /// Graceful stop of everything it started: SIGTERM, `grace`, SIGKILL.
    async fn terminate(&mut self, grace: Duration);
    /// Kills whatever of it is left, at once.
    fn kill_group(&mut self);
}

/// Starts processes for service instances.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn spawn(&self, launch: &Launch<'_>) -> Result<Box<dyn SpawnedProcess>, ProcessError>;
    /// Removes what a previous server of this data directory left running and the store
    /// does not know how to find (containers); returns how many. Local processes are swept
    /// by their recorded process groups instead.
    async fn sweep_orphans(&self) -> usize {
        0
    }
}

/// The providers a server has: local processes always, Docker when configured. A launch
/// with an image goes to Docker; one without, to local processes.
pub struct Providers {
    local: LocalProvider,
    docker: Option<Box<dyn Provider>>,
}

impl Providers {
    pub fn new(local: LocalProvider, docker: Option<Box<dyn Provider>>) -> Self {
        Self { local, docker }
    }

    /// Local processes without kernel memory limits, and no Docker.
    pub fn local_only() -> Self {
        Self::new(LocalProvider::default(), None)
    }
}

#[async_trait]
impl Provider for Providers {
    fn name(&self) -> &'static str {
        if self.docker.is_some() { "local+docker" } else { "local" }
    }

    async fn spawn(&self, launch: &Launch<'_>) -> Result<Box<dyn SpawnedProcess>, ProcessError> {
        match (launch.image, &self.docker) {
            (None, _) => self.local.spawn(launch).await,
            (Some(_), Some(docker)) => docker.spawn(launch).await,
            (Some(image), None) => Err(ProcessError::Provider(format!(
                "image {image} needs the Docker provider, which is not configured"
            ))),
        }
    }

    async fn sweep_orphans(&self) -> usize {
        match &self.docker {
            Some(docker) => docker.sweep_orphans().await,
            None => 0,
        }
    }
}

/// Local processes, each the leader of its own process group; with memory cgroups, a
/// limited instance runs in a cgroup of its own so the kernel enforces its limit.
#[derive(Debug, Clone, Default)]
pub struct LocalProvider {
    memory: Option<Arc<MemoryCgroups>>,
}

impl LocalProvider {
    /// Limits enforced by the kernel through `cgroups`.
    pub fn with_memory_cgroups(cgroups: Arc<MemoryCgroups>) -> Self {
        Self { memory: Some(cgroups) }
    }

    /// Whether memory limits are enforced by the kernel (else by an RSS watch).
    pub fn memory_cgroups(&self) -> Option<&MemoryCgroups> {
        self.memory.as_deref()
    }
}

struct LocalProcess {
    child: GroupChild,
    cgroup: Option<LimitedGroup>,
}

#[async_trait]
impl SpawnedProcess for LocalProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    fn limits_memory(&self) -> bool {
        self.cgroup.is_some()
    }

    fn take_output(&mut self) -> Option<(Output, Output)> {
        let (out, err) = self.child.take_output()?;
        Some((Box::new(out), Box::new(err)))
    }

    async fn wait(&mut self) -> ExitInfo {
        match self.child.wait().await {
            Ok(status) => match &self.cgroup {
                Some(cgroup) if !status.success() && cgroup.oom_killed() => ExitInfo {
                    success: false,
                    description: format!(
                        "memory limit: killed by the kernel over {} bytes ({})",
                        cgroup.limit(),
                        describe(status)
                    ),
                },
                _ => ExitInfo { success: status.success(), description: describe(status) },
            },
            Err(err) => ExitInfo { success: false, description: err.to_string() },
        }
    }

    async fn terminate(&mut self, grace: Duration) {
        let _ = self.child.terminate(grace).await;
    }

    fn kill_group(&mut self) {
        self.child.signal_group(nix::sys::signal::Signal::SIGKILL);
        if let Some(cgroup) = self.cgroup.take() {
            // The cgroup can go once the killed processes are reaped: retry briefly.
            tokio::spawn(async move {
                for _ in 0..40 {
                    if cgroup.remove() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tracing::warn!(cgroup = %cgroup.dir().display(), "cannot remove a service's cgroup");
            });
        }
    }
}

pub(crate) fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        _ => "exited".to_owned(),
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn spawn(&self, launch: &Launch<'_>) -> Result<Box<dyn SpawnedProcess>, ProcessError> {
        let cgroup = match (&self.memory, launch.memory_limit_bytes) {
            (Some(cgroups), Some(limit)) => match cgroups.create(launch.instance, limit) {
                Ok(cgroup) => Some(cgroup),
                Err(err) => {
                    tracing::warn!(instance = launch.instance, error = %err, "cannot make a memory cgroup; watching resident memory instead");
                    None
                }
            },
            _ => None,
        };
        let procs = cgroup.as_ref().map(LimitedGroup::procs).transpose();
        let spawned = match &procs {
            Ok(procs) => {
                GroupChild::spawn_in(launch.command, Stdio::piped(), Stdio::piped(), procs.as_ref())
            }
            Err(err) => Err(ProcessError::Provider(err.to_string())),
        };
        let (child, cgroup) = match (spawned, cgroup) {
            (Ok(child), cgroup) => (child, cgroup),
            (Err(err), None) => return Err(err),
            // The cgroup could not be joined: run unlimited by the kernel (the supervisor
            // then watches resident memory) rather than not at all.
            (Err(err), Some(cgroup)) => {
                tracing::warn!(instance = launch.instance, error = %err, "cannot start a service in its memory cgroup; watching resident memory instead");
                cgroup.remove();
                (GroupChild::spawn(launch.command, Stdio::piped(), Stdio::piped())?, None)
            }
        };
        Ok(Box::new(LocalProcess { child, cgroup }))
    }
}
