//! Providers: how a service instance's process is started. The local-process provider
//! (the default) runs it as a child in its own process group; other providers (containers)
//! implement the same trait.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncRead;

use crate::{CommandSpec, GroupChild, ProcessError};

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub success: bool,
    /// `exited with code 3`, `killed by SIGKILL`, ...
    pub description: String,
}

type Output = Box<dyn AsyncRead + Send + Unpin>;

/// A started process.
#[async_trait]
pub trait SpawnedProcess: Send {
    fn pid(&self) -> Option<u32>;
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
    async fn spawn(&self, command: &CommandSpec) -> Result<Box<dyn SpawnedProcess>, ProcessError>;
}

/// Local processes, each the leader of its own process group.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalProvider;

struct LocalProcess {
    child: GroupChild,
}

#[async_trait]
impl SpawnedProcess for LocalProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.child.pid())
    }

    fn take_output(&mut self) -> Option<(Output, Output)> {
        let (out, err) = self.child.take_output()?;
        Some((Box::new(out), Box::new(err)))
    }

    async fn wait(&mut self) -> ExitInfo {
        match self.child.wait().await {
            Ok(status) => ExitInfo { success: status.success(), description: describe(status) },
            Err(err) => ExitInfo { success: false, description: err.to_string() },
        }
    }

    async fn terminate(&mut self, grace: Duration) {
        let _ = self.child.terminate(grace).await;
    }

    fn kill_group(&mut self) {
        self.child.signal_group(nix::sys::signal::Signal::SIGKILL);
    }
}

fn describe(status: std::process::ExitStatus) -> String {
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

    async fn spawn(&self, command: &CommandSpec) -> Result<Box<dyn SpawnedProcess>, ProcessError> {
        let child = GroupChild::spawn(command, Stdio::piped(), Stdio::piped())?;
        Ok(Box::new(LocalProcess { child }))
    }
}
