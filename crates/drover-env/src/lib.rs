//! Where agents do their work: the on-disk layout of runs (workspace and logs), free ports,
//! child processes run in their own process group so they can be stopped whole, and the
//! registry of deployed apps that live as long as the server. Environments (`manager`) run
//! services under a `supervisor`; per-environment services get their project's secrets
//! from a [`SecretSource`] as environment variables, redacted from their output
//! (`secrets`).
//!
//! Every process started here is a group leader that also receives `SIGKILL` if drover
//! itself dies, and every way of stopping it signals the whole group: no orphans.

pub mod apps;
pub mod cgroup;
mod deployments;
pub mod docker;
mod layout;
pub mod manager;
mod ports;
mod process;
pub mod provider;
pub mod resources;
pub mod secrets;
pub mod supervisor;
pub mod workspace;

pub use deployments::{Deployment, DeploymentError, Deployments};
pub use layout::{Layout, app_hostname};
pub use ports::free_port;
pub use process::{
    CommandOutput, CommandSpec, GroupChild, ProcessError, run_command, run_command_redacting,
    spawn_logged,
};
pub use secrets::{InstanceSecrets, SecretSource, SecretsUnavailable};
