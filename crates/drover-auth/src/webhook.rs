//! Webhook signing secrets and signatures, per the Standard Webhooks specification
//! (<https://www.standardwebhooks.com>): a secret is `whsec_` followed by the base64 of
//! random bytes; a delivery is signed over `{webhook-id}.{webhook-timestamp}.{body}` with
//! HMAC-SHA256 keyed by the decoded bytes, and the `webhook-signature` header carries
//! `v1,` and the base64 of the MAC (several space-separated during a secret rotation).
//! Receivers verify with any Standard Webhooks library.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Every signing secret starts with this.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a new secret (the specification asks for 24 to 64).
const SECRET_BYTES: usize = 32;
/// Fewest key bytes a secret may decode to.
const MIN_SECRET_BYTES: usize = 24;
/// The signature scheme this module writes.
const VERSION: &str = "v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookSecretError {
    #[error("a webhook secret is `{SECRET_PREFIX}` followed by base64")]
    Malformed,
    #[error("a webhook secret must hold at least {MIN_SECRET_BYTES} bytes")]
    TooShort,
}

/// A signing secret. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningSecret").finish_non_exhaustive()
    }
}

impl SigningSecret {
    /// A new random secret (the operating system's generator, through `rand`'s
    /// cryptographically secure thread generator).
    pub fn generate() -> Self {
        let mut key = vec![0_u8; SECRET_BYTES];
        rand::rng().fill_bytes(&mut key);
        let text = format!("{SECRET_PREFIX}{}", STANDARD.encode(&key));
        Self { text, key }
    }

    /// A secret as stored or shown: `whsec_` and base64 of at least 24 bytes.
    pub fn parse(text: &str) -> Result<Self, WebhookSecretError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(WebhookSecretError::Malformed)?;
        let key = STANDARD.decode(encoded).map_err(|_| WebhookSecretError::Malformed)?;
        if key.len() < MIN_SECRET_BYTES {
            return Err(WebhookSecretError::TooShort);
        }
        Ok(Self { text: text.to_owned(), key })
    }

    /// The secret as text (`whsec_…`): to store it, and to show it once.
    pub fn expose(&self) -> &str {
        &self.text
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header for a delivery: `v1,<base64 of the MAC>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("{VERSION},{}", STANDARD.encode(tag))
    }

    /// Whether one of the header's space-separated `v1,` signatures is this secret's over
    /// the delivery (compared in constant time). The timestamp's age is the receiver's
    /// concern.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header.split(' ').filter_map(|part| part.strip_prefix("v1,")).any(|encoded| {
            STANDARD
                .decode(encoded)
                .is_ok_and(|tag| self.mac(id, timestamp, body).verify_slice(&tag).is_ok())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_webhooks_test_vector_reproduces_exactly() {
        // The vector of the Standard Webhooks reference implementations.
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, timestamp, body) =
            ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        let signature = secret.sign(id, timestamp, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(secret.verify(id, timestamp, body, &signature));
        assert!(secret.verify(id, timestamp, body, &format!("v1,bm9wZQ== {signature}")));
        assert!(!secret.verify(id, timestamp + 1, body, &signature));
        assert!(!secret.verify("msg_other", timestamp, body, &signature));
        assert!(!secret.verify(id, timestamp, br#"{"test": 2432232315}"#, &signature));
        assert!(!secret.verify(
            id,
            timestamp,
            body,
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
    }

    #[test]
    fn generated_secrets_parse_back_and_differ_and_never_show_in_debug() {
        let a = SigningSecret::generate();
        let b = SigningSecret::generate();
        assert_ne!(a, b);
        assert!(a.expose().starts_with(SECRET_PREFIX));
        assert_eq!(SigningSecret::parse(a.expose()).unwrap(), a);
        assert!(!format!("{a:?}").contains(&a.expose()[SECRET_PREFIX.len()..]));
        let signature = a.sign("id", 1, b"{}");
        assert!(a.verify("id", 1, b"{}", &signature));
        assert!(!b.verify("id", 1, b"{}", &signature));
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert_eq!(
            SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(WebhookSecretError::Malformed)
        );
        assert_eq!(SigningSecret::parse("whsec_not base64!"), Err(WebhookSecretError::Malformed));
        assert_eq!(SigningSecret::parse("whsec_c2hvcnQ="), Err(WebhookSecretError::TooShort));
    }
}
