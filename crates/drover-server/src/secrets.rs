//! Project secrets in the server: the master key is loaded (or made, on first start) from
//! `DROVER_MASTER_KEY` or the key file before anything is served, and the vault built on
//! the store is handed to the engine, which opens secrets for dispatched tasks and lets
//! the API set them. Kept here so the composition root only calls [`open_vault`].

use std::sync::Arc;

use drover_config::Config;
use drover_secrets::{KeySource, Vault};
use drover_store::SqliteStore;

use crate::ServerError;

/// Where the master key comes from for `config`: `DROVER_MASTER_KEY` when set, else
/// `secrets.master_key_file` (default `<data_dir>/secrets/master.key`).
pub fn key_source(config: &Config) -> KeySource {
    KeySource::from_process_env(config.secrets.master_key_file(&config.data_dir))
}

/// The vault over `store`, with the master key loaded off the async threads.
pub(crate) async fn open_vault(
    config: &Config,
    store: &SqliteStore,
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
