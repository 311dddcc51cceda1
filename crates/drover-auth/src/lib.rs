//! Credentials, and nothing else: minting and checking them, never storing them.
//!
//! - **API tokens** (`drv_` + 40 random alphanumerics): shown once, stored as their
//!   SHA-256 (a token is high-entropy, so a fast hash is the right tool; a leaked table
//!   yields nothing usable). [`ApiToken::generate`], [`hash_token`].
//! - **Passwords**: argon2id with a random salt, verified in constant time
//!   ([`hash_password`], [`verify_password`]). Hashing is deliberately slow: callers run it
//!   on a blocking thread.
//! - **JWTs** (HS256) signed with the server's key ([`Signer`]): short-lived user access
//!   tokens (audience `drover-api`) issued at login, and service tokens for workers
//!   (audience `drover-worker`, the agent types they may run, an expiry). A token is
//!   accepted only for its own audience, unexpired, with a valid signature.
//! - **Webhook signing secrets** (`whsec_…`) and Standard Webhooks signatures ([`webhook`]).

pub mod webhook;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_domain::{AgentType, UserName};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Every API token starts with this, so a leaked one is recognisable (secret scanners)
/// and never confused with a JWT.
pub const TOKEN_PREFIX: &str = "drv_";
/// Every refresh token starts with this.
pub const REFRESH_PREFIX: &str = "drr_";
/// Audience of user access tokens.
pub const USER_AUDIENCE: &str = "drover-api";
/// Audience of worker service tokens.
pub const WORKER_AUDIENCE: &str = "drover-worker";
/// Issuer of every token this server signs.
pub const ISSUER: &str = "drover";
/// Random characters in an API token (~238 bits).
const TOKEN_CHARS: usize = 40;
/// Smallest accepted signing key.
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed, expired, not for this audience, or its signature is wrong")]
    InvalidToken,
    #[error("the signing key must have at least {MIN_KEY_BYTES} bytes")]
    WeakKey,
    #[error("cannot hash the password: {0}")]
    Hashing(String),
    #[error("cannot sign the token: {0}")]
    Signing(String),
}

/// A new API token: the secret to show once, and the hash to store.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub secret: String,
    pub hash: String,
}

impl ApiToken {
    pub fn generate() -> Self {
        let random: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(TOKEN_CHARS)
            .map(char::from)
            .collect();
        let secret = format!("{TOKEN_PREFIX}{random}");
        let hash = hash_token(&secret);
        Self { secret, hash }
    }
}

/// Whether `credential` looks like an API token (as opposed to a JWT).
pub fn is_api_token(credential: &str) -> bool {
    credential.starts_with(TOKEN_PREFIX)
}

/// The stored form of an API token or a refresh token: its SHA-256, in hex.
pub fn hash_token(secret: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random opaque secret (refresh tokens), same alphabet as API tokens.
pub fn random_secret(prefix: &str) -> String {
    let random: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(TOKEN_CHARS)
        .map(char::from)
        .collect();
    format!("{prefix}{random}")
}

/// An argon2id hash of `password` (PHC string, salt included).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| AuthError::Hashing(err.to_string()))
}

/// Whether `password` matches `hash` (a PHC string from [`hash_password`]).
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
    })
}

/// What a user access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    pub sub: String,
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

/// What a worker service token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerClaims {
    /// The worker's name.
    pub sub: String,
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    /// Agent types it may take tasks for (empty: any).
    pub agents: Vec<String>,
}

/// Signs and verifies the server's JWTs with one HMAC key.
#[derive(Clone)]
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([key hidden])")
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Result<Self, AuthError> {
        if key.len() < MIN_KEY_BYTES {
            return Err(AuthError::WeakKey);
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
        })
    }

    /// A new random signing key.
    pub fn generate_key() -> Vec<u8> {
        let mut key = vec![0u8; 48];
        rand::rng().fill(key.as_mut_slice());
        key
    }

    pub fn user_token(&self, user: &UserName, ttl: Duration) -> Result<String, AuthError> {
        let (iat, exp) = window(ttl);
        let claims = UserClaims {
            sub: user.to_string(),
            aud: USER_AUDIENCE.to_owned(),
            iss: ISSUER.to_owned(),
            iat,
            exp,
        };
        self.sign(&claims)
    }

    pub fn worker_token(
        &self,
        worker: &str,
        agents: &[AgentType],
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let (iat, exp) = window(ttl);
        let claims = WorkerClaims {
            sub: worker.to_owned(),
            aud: WORKER_AUDIENCE.to_owned(),
            iss: ISSUER.to_owned(),
            iat,
            exp,
            agents: agents.iter().map(ToString::to_string).collect(),
        };
        self.sign(&claims)
    }

    /// Signs any claims (tests make expired or wrong-audience tokens with it).
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|err| AuthError::Signing(err.to_string()))
    }

    pub fn verify_user(&self, token: &str) -> Result<UserClaims, AuthError> {
        self.verify(token, USER_AUDIENCE)
    }

    pub fn verify_worker(&self, token: &str) -> Result<WorkerClaims, AuthError> {
        self.verify(token, WORKER_AUDIENCE)
    }

    fn verify<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<T, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<T>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|_| AuthError::InvalidToken)
    }
}

/// Issued-at and expiry (seconds since the epoch) for a token valid `ttl` from now.
fn window(ttl: Duration) -> (u64, u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (now, now.saturating_add(ttl.as_secs().max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_signer() -> Signer {
        Signer::new(&Signer::generate_key()).unwrap()
    }

    #[test]
    fn api_tokens_are_random_prefixed_and_stored_only_as_a_hash() {
        let (a, b) = (ApiToken::generate(), ApiToken::generate());
        assert_ne!(a.secret, b.secret);
        assert!(is_api_token(&a.secret) && a.secret.len() == TOKEN_PREFIX.len() + TOKEN_CHARS);
        assert_eq!(a.hash, hash_token(&a.secret));
        assert!(!a.hash.contains(&a.secret[TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn a_token_is_accepted_only_for_its_audience_with_its_own_key() {
        let signer = new_signer();
        let ann = UserName::parse("ann").unwrap();
        let user = signer.user_token(&ann, Duration::from_secs(60)).unwrap();
        assert_eq!(signer.verify_user(&user).unwrap().sub, "ann");
        assert!(signer.verify_worker(&user).is_err(), "a user token is not a service token");

        let agents = [AgentType::parse("scaffold").unwrap()];
        let worker = signer.worker_token("w1", &agents, Duration::from_secs(60)).unwrap();
        assert_eq!(signer.verify_worker(&worker).unwrap().agents, ["scaffold"]);
        assert!(signer.verify_user(&worker).is_err(), "a service token is not a user token");

        assert!(new_signer().verify_user(&user).is_err(), "another key's token is forged");
        let mut tampered = user.clone();
        tampered.pop();
        assert!(signer.verify_user(&tampered).is_err());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let signer = new_signer();
        let claims = UserClaims {
            sub: "ann".into(),
            aud: USER_AUDIENCE.into(),
            iss: ISSUER.into(),
            iat: 1,
            exp: 2,
        };
        let old = signer.sign(&claims).unwrap();
        assert!(signer.verify_user(&old).is_err());
        assert!(matches!(Signer::new(b"short"), Err(AuthError::WeakKey)));
    }
}
