//! Project secrets in the server: the master key is loaded (or made, on first start) from
//! `DROVER_MASTER_KEY` or the key file before anything is served, webhook signing secrets
//! left in plaintext by an older drover are sealed, and the vault built on the store is
//! handed to the engine (tasks carry secret names; the engine opens the values for the
//! worker holding an attempt, and lets the API set them), to the server's own workers as
//! an [`EngineSecrets`] source (the same audited check the worker API makes, without the
//! network), and to the environment manager as a [`VaultSecrets`] source, through which
//! per-environment services get their project's secrets each time they start. Kept here
//! so the composition root only calls [`open_vault`].

use std::sync::Arc;

use async_trait::async_trait;
use drover_agents::TaskSecrets;
use drover_bus::TaskEnvelope;
use drover_config::Config;
use drover_domain::{ProjectId, SecretValues, WorkerId};
use drover_engine::{Engine, SecretsRequest};
use drover_env::{SecretSource, SecretsUnavailable};
use drover_secrets::{KeySource, Reveal, Vault};
use drover_store::AnyStore;

use crate::ServerError;

/// Where the master key comes from for `config`: `DROVER_MASTER_KEY` when set, else
/// `secrets.master_key_file` (default `<data_dir>/secrets/master.key`).
pub fn key_source(config: &Config) -> KeySource {
    KeySource::from_process_env(config.secrets.master_key_file(&config.data_dir))
}

/// The vault over `store`, with the master key loaded off the async threads.
pub(crate) async fn open_vault(
    config: &Config,
    store: &AnyStore,
) -> Result<Arc<Vault>, ServerError> {
    let source = key_source(config);
    let keys = tokio::task::spawn_blocking(move || source.load_or_create())
        .await
        .map_err(|err| ServerError::Config(format!("loading the secrets master key: {err}")))??;
    let previous = keys.previous_ids();
    if !previous.is_empty() {
        tracing::warn!(
            ?previous,
            "previous master keys are loaded: a key rotation is unfinished; run `drover secrets rotate-key`"
        );
    }
    let vault = Vault::new(Arc::new(store.clone()), keys);
    let sealed = vault
        .seal_plaintext_webhook_secrets()
        .await
        .map_err(|err| ServerError::Config(format!("sealing webhook signing secrets: {err}")))?;
    if sealed > 0 {
        tracing::info!(count = sealed, "sealed the plaintext signing secrets of older webhooks");
    }
    Ok(Arc::new(vault))
}

/// The engine as the secret source of the server's own workers: the attempt must be held
/// under the envelope's token, and each read is audited as `worker <id>`.
pub(crate) struct EngineSecrets(pub(crate) Arc<Engine>);

#[async_trait]
impl TaskSecrets for EngineSecrets {
    async fn secrets_for(
        &self,
        envelope: &TaskEnvelope,
        worker: &WorkerId,
    ) -> Result<SecretValues, drover_agents::SecretsUnavailable> {
        let reader = format!("worker {worker}");
        let request = SecretsRequest {
            attempt: envelope.task_id,
            project: &envelope.project_id,
            token: envelope.fencing_token,
            reader: &reader,
        };
        // The server's own workers run every agent type.
        self.0
            .attempt_secrets(&request, |_| true)
            .await
            .map_err(|err| drover_agents::SecretsUnavailable(err.to_string()))
    }
}

/// The vault as the environment manager's secret source: one audited read (one query) per
/// service start, recorded as `environment <name>` reading for `service <name>`.
pub(crate) struct VaultSecrets(pub(crate) Arc<Vault>);

#[async_trait]
impl SecretSource for VaultSecrets {
    async fn secrets_for(
        &self,
        project: &ProjectId,
        actor: &str,
        purpose: &str,
    ) -> Result<SecretValues, SecretsUnavailable> {
        let reveal = Reveal { project: project.clone(), purpose: purpose.to_owned() };
        let mut opened = self
            .0
            .reveal_as(actor, std::slice::from_ref(&reveal))
            .await
            .map_err(|err| SecretsUnavailable(err.to_string()))?;
        Ok(opened.remove(project).unwrap_or_default())
    }
}
