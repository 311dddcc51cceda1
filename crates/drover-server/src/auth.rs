//! Authentication at start: the signing key (made on first use, kept 0600, shared by every
//! server of a cluster), and the rule that a server listening beyond loopback refuses to
//! start until an administrator exists.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_auth::Signer;
use drover_config::Config;
use drover_store::IdentityStore;

use crate::ServerError;

/// Where the signing key lives unless `auth.signing_key_file` says otherwise.
pub fn signing_key_path(config: &Config) -> PathBuf {
    config.auth.signing_key_file.clone().unwrap_or_else(|| config.data_dir.join("auth/jwt.key"))
}

/// The server's token signer, from its key file (made, with a new random key, if missing).
pub(crate) async fn load_signer(config: &Config) -> Result<Signer, ServerError> {
    let path = signing_key_path(config);
    let key = tokio::task::spawn_blocking(move || read_or_create_key(&path))
        .await
        .map_err(|err| ServerError::Config(format!("loading the signing key: {err}")))??;
    Signer::new(&key).map_err(|err| ServerError::Config(format!("the signing key: {err}")))
}

fn read_or_create_key(path: &Path) -> Result<Vec<u8>, ServerError> {
    let failed = |err: std::io::Error| {
        ServerError::Config(format!("the signing key {}: {err}", path.display()))
    };
    match std::fs::read(path) {
        Ok(key) => Ok(key),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(failed)?;
            }
            let key = Signer::generate_key();
            // Created with its final mode, so the key is never readable by others.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(failed)?;
            file.write_all(&key).map_err(failed)?;
            Ok(key)
        }
        Err(err) => Err(failed(err)),
    }
}

/// Whether a credential is required, and whether the server may start at all: beyond
/// loopback, only once a user exists.
pub(crate) async fn check_mode(
    addr: SocketAddr,
    identities: &Arc<dyn IdentityStore>,
) -> Result<(bool, bool), ServerError> {
    let network = !addr.ip().is_loopback();
    let users_exist = identities.count_users().await? > 0;
    if network && !users_exist {
        return Err(ServerError::AuthRequired { addr });
    }
    Ok((network, users_exist))
}
