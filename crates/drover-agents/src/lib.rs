//! Agents and the worker runtime.
//!
//! An [`Agent`] does one stage's work in a run's workspace and reports an
//! [`AgentResult`]. The [`WorkerPool`] takes tasks for its agent types from the bus, tells
//! the engine it started, heartbeats while the agent works (so an agent may run for hours),
//! honours cancellation by stopping the agent's process group, and publishes the result.
//! Tasks name their project's secrets; the pool fetches the values from its
//! [`TaskSecrets`] when it runs one (the vault in a server, the API in `drover worker`).
//! The built-in agents ([`builtin`]) work offline: they scaffold a project from a template
//! catalog, validate it, run it end to end, run its tests and deploy it, whoever wrote it:
//! what its `drover.json` says, completed by detection of the project (`project`) where it
//! says nothing. Agents defined in the config run a command ([`CommandAgentRunner`]), a
//! model (`llm`) or the template scaffolder; a stage that writes the project (`contract`)
//! gives its agent the project [`CONTRACT`] in its prompt.

mod artifacts;
pub mod builtin;
mod changes;
mod command;
mod llm;
mod manifest;
pub mod policy;
mod project;
mod stage_log;
mod summary;
pub mod templates;
mod walk;
mod worker;

use std::path::PathBuf;

use async_trait::async_trait;
use drover_bus::{AgentResult, TaskEnvelope};
use drover_domain::{AgentType, SecretValues, WorkerId};
use tokio_util::sync::CancellationToken;

pub use command::CommandAgentRunner;
pub use llm::{ChatReply, KeySource, LlmAgentRunner};
pub use manifest::{CONTRACT, Check, MANIFEST_FILE, Manifest, ManifestError, ManifestFile};
pub use stage_log::StageLog;
pub use worker::{WorkerPool, WorkerPoolConfig};

/// Where a worker gets the values of the secrets a task names, when it runs it: the vault
/// (a server's own workers) or the server's API (`drover worker`). The broker never
/// carries them.
#[async_trait]
pub trait TaskSecrets: Send + Sync + 'static {
    /// The project secrets `envelope`'s attempt runs with, for `worker`, which holds it.
    async fn secrets_for(
        &self,
        envelope: &TaskEnvelope,
        worker: &WorkerId,
    ) -> Result<SecretValues, SecretsUnavailable>;
}

/// Why a task's secrets could not be had; says nothing of their values.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SecretsUnavailable(pub String);

/// One stage attempt as an agent sees it.
pub struct AgentTask {
    pub envelope: TaskEnvelope,
    /// The values of the project's secrets the envelope names, fetched by the worker: what
    /// the agent hands to the processes it starts. Redacted from everything it leaves.
    pub secrets: SecretValues,
    pub workspace: PathBuf,
    /// The attempt's log; whatever the agent runs writes here.
    pub log: StageLog,
    /// Fires when the attempt must stop (run cancelled, timed out, server stopping).
    pub cancel: CancellationToken,
}

/// Something that can execute stages of one agent type.
#[async_trait]
pub trait Agent: Send + Sync + 'static {
    fn agent_type(&self) -> &AgentType;

    /// Does the stage's work. Failures are results, not errors: they carry whether a retry
    /// could help.
    async fn run(&self, task: &AgentTask) -> AgentResult;
}

/// A failure inside an agent, before it becomes an [`AgentResult::Failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFailure {
    pub message: String,
    /// Whether the same attempt could succeed if tried again (a port clash, a flaky
    /// probe), as opposed to a deterministic failure (a syntax error, a failing test).
    pub retryable: bool,
}

impl AgentFailure {
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: false }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true }
    }
}

impl From<AgentFailure> for AgentResult {
    fn from(failure: AgentFailure) -> Self {
        AgentResult::Failed { error: failure.message, retryable: failure.retryable }
    }
}

/// Turns an agent body's `Result` into the result reported to the engine.
pub fn into_result(result: Result<serde_json::Value, AgentFailure>) -> AgentResult {
    match result {
        Ok(output) => AgentResult::Succeeded { output },
        Err(failure) => failure.into(),
    }
}
