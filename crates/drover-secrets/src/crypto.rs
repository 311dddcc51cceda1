//! Sealing and opening secret values: XChaCha20-Poly1305 (an AEAD with a 192-bit nonce,
//! so a random nonce per value is safe however many values are sealed) under a 256-bit
//! master key. Where the value belongs (a [`Place`]: a project secret by project and name,
//! or a webhook endpoint's signing secret by project and endpoint) is the associated data:
//! a sealed value copied to another place fails to open instead of leaking under a new
//! name.
//! Each sealed value records the id of its key, a fingerprint that names the key without
//! revealing it, so a [`Keyring`] holding the current and the previous key can open
//! everything during a rotation.

use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use drover_domain::{ProjectId, SecretName, WebhookId};
use rand::RngCore;
use sha2::Digest;
use zeroize::Zeroizing;

/// Bytes in a master key.
pub const KEY_BYTES: usize = 32;
/// Bytes in a nonce.
pub const NONCE_BYTES: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("{what} is sealed with key {key_id}, which is not loaded")]
    UnknownKey { what: String, key_id: String },
    /// Wrong key, a changed ciphertext, nonce, or place: the AEAD refuses all alike.
    #[error("{what} does not open: it was tampered with or sealed for another place")]
    Tampered { what: String },
    #[error("{what} opened to something that is not text")]
    NotText { what: String },
    #[error("sealing {what} failed")]
    Seal { what: String },
    #[error("not a master key: expected {KEY_BYTES} bytes as 64 hex digits or base64 ({reason})")]
    BadKey { reason: String },
}

/// What a sealed value belongs to. It is bound into the value (the associated data), so a
/// value moved to another place does not open.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// A project secret.
    Secret { project: &'a ProjectId, name: &'a SecretName },
    /// The signing secret of a webhook endpoint.
    WebhookSigning { project: &'a ProjectId, webhook: WebhookId },
}

impl Place<'_> {
    /// Binds a sealed value to its place. No part can hold a NUL, so the encoding is
    /// unambiguous; each kind of place has its own prefix.
    fn associated_data(&self) -> Vec<u8> {
        match self {
            Self::Secret { project, name } => {
                format!("drover-secret/v1\0{}\0{}", project.as_str(), name.as_str())
            }
            Self::WebhookSigning { project, webhook } => {
                format!("drover-webhook-signing/v1\0{}\0{webhook}", project.as_str())
            }
        }
        .into_bytes()
    }
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret { name, .. } => write!(f, "secret `{name}`"),
            Self::WebhookSigning { webhook, .. } => {
                write!(f, "the signing secret of webhook {webhook}")
            }
        }
    }
}

/// Names a master key: the first 8 bytes of a SHA-256 of it, in hex. Safe to store and
/// show; it reveals nothing usable about the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 256-bit master key, wiped from memory when dropped. `Debug` shows its id only.
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_BYTES]>,
    id: KeyId,
}

impl MasterKey {
    /// A new random key (from the operating system's generator, through `rand`'s
    /// cryptographically secure thread generator).
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0_u8; KEY_BYTES]);
        rand::rng().fill_bytes(bytes.as_mut());
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: Zeroizing<[u8; KEY_BYTES]>) -> Self {
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"drover-secrets/key-id/v1\0");
        hasher.update(bytes.as_ref());
        let digest = hasher.finalize();
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self { bytes, id: KeyId(id) }
    }

    /// A key written as 64 hex digits or as base64 (standard or URL-safe, padded or not);
    /// surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let decoded: Zeroizing<Vec<u8>> =
            if text.len() == KEY_BYTES * 2 && text.chars().all(|c| c.is_ascii_hexdigit()) {
                Zeroizing::new(
                    (0..KEY_BYTES)
                        .map(|i| u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).unwrap_or(0))
                        .collect(),
                )
            } else {
                let engines = [
                    &base64::engine::general_purpose::STANDARD,
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ];
                let decoded = engines.iter().find_map(|engine| engine.decode(text).ok());
                Zeroizing::new(decoded.ok_or_else(|| CryptoError::BadKey {
                    reason: "neither hex nor base64".to_owned(),
                })?)
            };
        let bytes: [u8; KEY_BYTES] = decoded.as_slice().try_into().map_err(|_| {
            CryptoError::BadKey { reason: format!("{} bytes given", decoded.len()) }
        })?;
        Ok(Self::from_bytes(Zeroizing::new(bytes)))
    }

    /// The key as standard base64, the form key files hold.
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.bytes.as_ref()))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The same key (to write it to a file while it stays in use).
    pub(crate) fn duplicate(&self) -> Self {
        Self { bytes: self.bytes.clone(), id: self.id.clone() }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*self.bytes).into())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A value sealed by [`Keyring::seal`].
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The key new values are sealed with, and older keys still able to open values sealed
/// before a rotation finished.
#[derive(Debug)]
pub struct Keyring {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl Keyring {
    pub fn new(current: MasterKey) -> Self {
        Self { current, previous: Vec::new() }
    }

    /// Also opens values sealed with `key` (a key being rotated away from).
    #[must_use]
    pub fn with_previous(mut self, key: MasterKey) -> Self {
        if key.id != self.current.id && !self.previous.iter().any(|k| k.id == key.id) {
            self.previous.push(key);
        }
        self
    }

    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// This keyring after a rotation to `new`: `new` seals, every key so far still opens.
    #[must_use]
    pub fn rotated_to(self, new: MasterKey) -> Self {
        let mut rotated = Self::new(new).with_previous(self.current);
        for key in self.previous {
            rotated = rotated.with_previous(key);
        }
        rotated
    }

    /// Ids of the previous keys loaded.
    pub fn previous_ids(&self) -> Vec<KeyId> {
        self.previous.iter().map(|key| key.id.clone()).collect()
    }

    /// Seals `value` for `place` with the current key and a fresh nonce.
    pub fn seal(&self, place: Place<'_>, value: &str) -> Result<Sealed, CryptoError> {
        let mut nonce = [0_u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let aad = place.associated_data();
        let ciphertext = self
            .current
            .cipher()
            .encrypt(&XNonce::from(nonce), Payload { msg: value.as_bytes(), aad: &aad })
            .map_err(|_| CryptoError::Seal { what: place.to_string() })?;
        Ok(Sealed { key_id: self.current.id.0.clone(), nonce: nonce.to_vec(), ciphertext })
    }

    /// Opens a value sealed for `place`, with whichever loaded key sealed it.
    pub fn open(
        &self,
        place: Place<'_>,
        sealed: &Sealed,
    ) -> Result<Zeroizing<String>, CryptoError> {
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|key| key.id.0 == sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey {
                what: place.to_string(),
                key_id: sealed.key_id.clone(),
            })?;
        let tampered = || CryptoError::Tampered { what: place.to_string() };
        let nonce: [u8; NONCE_BYTES] =
            sealed.nonce.as_slice().try_into().map_err(|_| tampered())?;
        let aad = place.associated_data();
        let plain = key
            .cipher()
            .decrypt(&XNonce::from(nonce), Payload { msg: &sealed.ciphertext, aad: &aad })
            .map_err(|_| tampered())?;
        String::from_utf8(plain)
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::NotText { what: place.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> (ProjectId, SecretName) {
        (ProjectId::default_project(), SecretName::parse("MY_TOKEN").unwrap())
    }

    #[test]
    fn a_sealed_value_opens_to_itself_and_hides_it() {
        let (project, name) = place();
        let keys = Keyring::new(MasterKey::generate());
        let sealed =
            keys.seal(Place::Secret { project: &project, name: &name }, "tok-0123456789").unwrap();
        assert_eq!(sealed.key_id, keys.current().id().as_str());
        assert_eq!(sealed.nonce.len(), NONCE_BYTES);
        assert!(!sealed.ciphertext.windows(8).any(|w| w == b"tok-0123"));
        assert_eq!(
            keys.open(Place::Secret { project: &project, name: &name }, &sealed).unwrap().as_str(),
            "tok-0123456789"
        );
        let again =
            keys.seal(Place::Secret { project: &project, name: &name }, "tok-0123456789").unwrap();
        assert_ne!(again.nonce, sealed.nonce, "a nonce was reused");
        assert_ne!(again.ciphertext, sealed.ciphertext);
    }

    #[test]
    fn a_wrong_key_a_tampered_value_or_another_place_is_refused() {
        let (project, name) = place();
        let keys = Keyring::new(MasterKey::generate());
        let sealed =
            keys.seal(Place::Secret { project: &project, name: &name }, "tok-0123456789").unwrap();

        let other = Keyring::new(MasterKey::generate());
        assert!(matches!(
            other.open(Place::Secret { project: &project, name: &name }, &sealed),
            Err(CryptoError::UnknownKey { .. })
        ));
        // A different key claiming the same id still fails authentication.
        let mut forged = sealed.clone();
        forged.key_id = other.current().id().to_string();
        assert!(matches!(
            other.open(Place::Secret { project: &project, name: &name }, &forged),
            Err(CryptoError::Tampered { .. })
        ));

        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(matches!(
            keys.open(Place::Secret { project: &project, name: &name }, &flipped),
            Err(CryptoError::Tampered { .. })
        ));
        let mut renonced = sealed.clone();
        renonced.nonce[0] ^= 1;
        assert!(matches!(
            keys.open(Place::Secret { project: &project, name: &name }, &renonced),
            Err(CryptoError::Tampered { .. })
        ));

        let moved = SecretName::parse("OTHER_NAME").unwrap();
        assert!(matches!(
            keys.open(Place::Secret { project: &project, name: &moved }, &sealed),
            Err(CryptoError::Tampered { .. })
        ));
        let elsewhere = ProjectId::parse("elsewhere").unwrap();
        assert!(matches!(
            keys.open(Place::Secret { project: &elsewhere, name: &name }, &sealed),
            Err(CryptoError::Tampered { .. })
        ));
    }

    #[test]
    fn a_webhook_signing_secret_opens_for_its_endpoint_only() {
        let (project, name) = place();
        let keys = Keyring::new(MasterKey::generate());
        let webhook = WebhookId::new();
        let signing = Place::WebhookSigning { project: &project, webhook };
        let sealed = keys.seal(signing, "whsec_0123456789").unwrap();
        assert_eq!(keys.open(signing, &sealed).unwrap().as_str(), "whsec_0123456789");
        let other = Place::WebhookSigning { project: &project, webhook: WebhookId::new() };
        let as_secret = Place::Secret { project: &project, name: &name };
        for wrong in [other, as_secret] {
            let err = keys.open(wrong, &sealed).unwrap_err();
            assert!(matches!(err, CryptoError::Tampered { .. }), "{err}");
        }
        let err = Keyring::new(MasterKey::generate()).open(signing, &sealed).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the signing secret of webhook {webhook} is sealed with key {}, which is not loaded",
                sealed.key_id
            )
        );
    }

    #[test]
    fn a_keyring_with_the_previous_key_opens_old_values_and_seals_with_the_new_one() {
        let (project, name) = place();
        let old = MasterKey::generate();
        let old_copy = MasterKey::parse(&old.encode()).unwrap();
        let sealed = Keyring::new(old)
            .seal(Place::Secret { project: &project, name: &name }, "tok-0123456789")
            .unwrap();

        let rotated = Keyring::new(MasterKey::generate()).with_previous(old_copy);
        assert_eq!(
            rotated
                .open(Place::Secret { project: &project, name: &name }, &sealed)
                .unwrap()
                .as_str(),
            "tok-0123456789"
        );
        let resealed = rotated
            .seal(Place::Secret { project: &project, name: &name }, "tok-0123456789")
            .unwrap();
        assert_eq!(resealed.key_id, rotated.current().id().as_str());
        assert_ne!(resealed.key_id, sealed.key_id);
        assert_eq!(rotated.previous_ids().len(), 1);
    }

    #[test]
    fn keys_parse_from_hex_and_base64_and_keep_their_id() {
        let key = MasterKey::generate();
        let base64 = key.encode();
        let parsed = MasterKey::parse(&base64).unwrap();
        assert_eq!(parsed.id(), key.id());
        let hex: String = key.bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(MasterKey::parse(&format!("  {hex}\n")).unwrap().id(), key.id());
        for bad in ["", "zz", "c2hvcnQ=", &"ab".repeat(31)] {
            assert!(matches!(MasterKey::parse(bad), Err(CryptoError::BadKey { .. })), "{bad}");
        }
        assert!(!format!("{key:?}").contains(base64.as_str()));
        assert_eq!(key.id().as_str().len(), 16);
    }
}
