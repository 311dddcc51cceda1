//! Project secrets in the server: the master key is loaded (or made, on first start) from
//! `DROVER_MASTER_KEY` or the key file before anything is served, and the vault built on
//! the store is handed to the engine, which opens secrets for dispatched tasks and lets
//! the API set them, and to the environment manager as a [`VaultSecrets`] source, through
//! which per-environment services get their project's secrets each time they start. Kept
//! here so the composition root only calls [`open_vault`].

use std::sync::Arc;

use async_trait::async_trait;
use drover_config::Config;
use drover_domain::{ProjectId, SecretValues};
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
    Ok(Arc::new(Vault::new(Arc::new(store.clone()), keys)))
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
