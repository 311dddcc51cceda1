//! An attempt's project secrets, for the worker running it. Task envelopes carry secret
//! names only (the broker sees them in clear); the worker asks here when it runs the
//! attempt, in-process or over the API. The values go only to the holder of the attempt:
//! it must be dispatched or running under exactly the fencing token the worker has, in
//! the project the worker names, of an agent type the worker may run. Every read is in
//! the audit log (`secret.read`, by the worker, for the attempt) before a value leaves.

use drover_domain::{AgentType, AttemptId, FencingToken, ProjectId, SecretValues, StageStatus};
use drover_secrets::Reveal;

use crate::{Engine, EngineError};

/// A worker's request for the secrets of the attempt it holds.
#[derive(Debug, Clone)]
pub struct SecretsRequest<'a> {
    pub attempt: AttemptId,
    /// The project the worker's envelope names; another project's attempt is not found.
    pub project: &'a ProjectId,
    /// The fencing token the worker's envelope carries.
    pub token: FencingToken,
    /// Who reads, as the audit log records it (`worker w1`).
    pub reader: &'a str,
}

impl Engine {
    /// The current secrets of the project of `request.attempt`, opened for the worker that
    /// holds it, audited. `may_run` says whether the worker may run the attempt's agent
    /// type.
    #[tracing::instrument(skip_all, fields(attempt = %request.attempt, reader = request.reader))]
    pub async fn attempt_secrets(
        &self,
        request: &SecretsRequest<'_>,
        may_run: impl FnOnce(&AgentType) -> bool,
    ) -> Result<SecretValues, EngineError> {
        let attempt = self
            .store
            .attempt_by_id(request.attempt)
            .await?
            .filter(|attempt| &attempt.project_id == request.project)
            .ok_or(EngineError::AttemptNotFound(request.attempt))?;
        if !may_run(&attempt.agent) {
            return Err(EngineError::AgentNotAllowed(attempt.agent));
        }
        // The dispatcher publishes before it marks an attempt dispatched (the outbox relay),
        // so a fast worker may ask while the store still says pending: the exact fencing
        // token is what proves the task is the current one.
        let held = matches!(
            attempt.status,
            StageStatus::Pending | StageStatus::Dispatched | StageStatus::Running
        );
        if !held || attempt.fencing_token != request.token {
            return Err(EngineError::StaleAttempt {
                attempt: attempt.id,
                token: request.token,
                current: attempt.fencing_token,
                status: attempt.status,
            });
        }
        let vault = self.vault.as_ref().ok_or_else(|| {
            EngineError::SecretsUnavailable("this server keeps no secrets".to_owned())
        })?;
        let reveal = Reveal {
            project: attempt.project_id.clone(),
            purpose: format!(
                "run {} stage {} attempt {}",
                attempt.run_id, attempt.stage, attempt.attempt
            ),
        };
        let mut opened = vault
            .reveal_as(request.reader, std::slice::from_ref(&reveal))
            .await
            .map_err(|err| EngineError::SecretsUnavailable(err.to_string()))?;
        let values = opened.remove(&attempt.project_id).unwrap_or_default();
        tracing::debug!(count = values.len(), "attempt secrets handed out");
        Ok(values)
    }
}
