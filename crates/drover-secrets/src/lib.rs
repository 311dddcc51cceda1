//! Project secrets: values sealed with XChaCha20-Poly1305 under a master key that never
//! enters the database ([`crypto`]), the key's source and its file ([`keys`]), and the
//! [`Vault`] the API, the engine and workers go through: set, list and delete with
//! validation and audit, list names for dispatch, open a project's secrets for the worker
//! running an attempt with every read audited, seal and open webhook signing secrets, and
//! rotate the key ([`rotate`]). The store holds ciphertext only.

pub mod crypto;
pub mod keys;
mod vault;

pub use crypto::{CryptoError, KeyId, Keyring, MasterKey, Place};
pub use keys::{
    KeyError, KeyOrigin, KeySource, MASTER_KEY_ENV, MASTER_KEY_FILE, OLD_MASTER_KEY_ENV,
};
pub use vault::{Reveal, Rotation, Vault, VaultError, rotate};
