//! `[secrets]`: where the master key that seals project secrets is kept when it does not
//! come from `DROVER_MASTER_KEY`. Its own section (and file) because the key's place is
//! the one setting secrets need, and it is read by the server and by
//! `drover secrets rotate-key` alike.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// The master key file (base64 of 32 bytes, mode 0600), made on first use. Default:
    /// `<data_dir>/secrets/master.key`. Ignored when `DROVER_MASTER_KEY` is set.
    pub master_key_file: Option<PathBuf>,
}

impl SecretsConfig {
    /// The key file: the configured one, else `<data_dir>/secrets/master.key`.
    pub fn master_key_file(&self, data_dir: &Path) -> PathBuf {
        self.master_key_file.clone().unwrap_or_else(|| data_dir.join("secrets").join("master.key"))
    }
}
