//! Project secrets: values sealed with XChaCha20-Poly1305 under a master key that never
//! enters the database ([`crypto`]), the key's source and its file ([`keys`]), and the
//! [`Vault`] the API and the engine go through: set, list and delete with validation and
//! audit, open a batch of projects' secrets for dispatch with every read audited, and
//! rotate the key ([`rotate`]). The store holds ciphertext only.

pub mod crypto;
pub mod keys;
mod vault;

pub use crypto::{CryptoError, KeyId, Keyring, MasterKey};
pub use keys::{
    KeyError, KeyOrigin, KeySource, MASTER_KEY_ENV, MASTER_KEY_FILE, OLD_MASTER_KEY_ENV,
};
pub use vault::{ENGINE_ACTOR, Reveal, Rotation, Vault, VaultError, rotate};
