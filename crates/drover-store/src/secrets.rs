//! The store's side of project secrets: sealed values (ciphertext, nonce and the id of the
//! key that sealed them) and the audit trail of who set, deleted and read them. The store
//! never sees a value in clear nor a key: sealing and opening happen above it (the
//! `drover-secrets` vault), so a database file or backup alone reveals nothing. Kept apart
//! from [`Store`](crate::Store) because only the vault uses it.
//!
//! Webhook endpoints' signing secrets are sealed the same way (see
//! [`WebhookStore`](crate::WebhookStore) for the endpoints); what the vault does to all
//! sealed values at once (a key rotation, sealing the plaintext secrets of endpoints made
//! before they were sealed) is here.

use async_trait::async_trait;
use drover_domain::{ProjectId, SecretName, Timestamp, WebhookId};

use crate::StoreResult;

/// One secret as stored: what the vault sealed.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub project_id: ProjectId,
    pub name: SecretName,
    /// Names the master key that sealed it (a fingerprint of the key, not the key).
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("project_id", &self.project_id)
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A value the vault sealed: what the database holds of a secret. `Debug` shows the key's
/// id only.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedValue {
    /// Names the master key that sealed it (a fingerprint of the key, not the key).
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedValue").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// A webhook endpoint's sealed signing secret, with the place it is sealed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedWebhookSecret {
    pub project_id: ProjectId,
    pub webhook_id: WebhookId,
    pub sealed: SealedValue,
}

/// How many values a key rotation sealed anew.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resealed {
    pub secrets: u64,
    pub webhook_secrets: u64,
}

/// What may be shown about a secret: everything but its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: SecretName,
    pub key_id: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One read of a secret's value, for the audit log.
#[derive(Debug, Clone)]
pub struct SecretRead {
    pub project_id: ProjectId,
    pub name: SecretName,
    /// Who read it (`worker w1` for the attempt it runs, `environment dev` for a service).
    pub actor: String,
    /// What for (`run … stage … attempt …`).
    pub purpose: String,
}

/// Turns one sealed secret into the same secret sealed anew (key rotation). An error
/// aborts the whole rotation.
pub type Reseal<'a> = &'a (dyn Fn(&SealedSecret) -> Result<SealedSecret, String> + Send + Sync);

/// Turns one webhook signing secret into the same secret sealed anew (key rotation). An
/// error aborts the whole rotation.
pub type ResealWebhook<'a> =
    &'a (dyn Fn(&SealedWebhookSecret) -> Result<SealedValue, String> + Send + Sync);

/// Seals the plaintext signing secret of an endpoint made before secrets were sealed
/// (project, endpoint, plaintext). An error aborts the whole batch.
pub type SealPlaintext<'a> =
    &'a (dyn Fn(&ProjectId, WebhookId, &str) -> Result<SealedValue, String> + Send + Sync);

#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Creates or replaces a secret, audited (`secret.set`) in the same transaction.
    /// Returns what is stored now and whether it was created (not replaced).
    async fn put_secret(
        &self,
        sealed: SealedSecret,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<(SecretMeta, bool)>;

    /// The project's secrets by name, without their values.
    async fn list_secrets(&self, project: &ProjectId) -> StoreResult<Vec<SecretMeta>>;

    /// Deletes a secret, audited (`secret.delete`); whether there was one.
    async fn delete_secret(
        &self,
        project: &ProjectId,
        name: &SecretName,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<bool>;

    /// All projects: the sealed secrets of these projects, in one query, by project and
    /// name.
    async fn sealed_secrets(&self, projects: &[ProjectId]) -> StoreResult<Vec<SealedSecret>>;

    /// All projects: the names of these projects' secrets, in one query, by project and
    /// name.
    async fn secret_names(
        &self,
        projects: &[ProjectId],
    ) -> StoreResult<Vec<(ProjectId, SecretName)>>;

    /// Records reads of secret values (`secret.read`), in one transaction.
    async fn record_secret_reads(&self, reads: &[SecretRead], now: Timestamp) -> StoreResult<()>;

    /// All projects: seals every secret anew with `reseal` and every webhook endpoint's
    /// signing secret with `reseal_webhook`, each audited (`secret.rotate`,
    /// `webhook.rotate`), in one transaction: all of them or, on any error, none.
    async fn reseal_secrets(
        &self,
        reseal: Reseal<'_>,
        reseal_webhook: ResealWebhook<'_>,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Resealed>;

    /// All projects: seals the plaintext signing secret of every endpoint made before
    /// secrets were sealed and removes the plaintext, in one transaction; on SQLite the
    /// freed pages are then wiped (the file is compacted) so no copy of a plaintext
    /// remains in it. Returns how many were sealed.
    async fn seal_plaintext_webhook_secrets(&self, seal: SealPlaintext<'_>) -> StoreResult<u64>;
}
