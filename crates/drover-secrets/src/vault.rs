//! The vault: project secrets as the API, the engine, workers and environments use them.
//! It validates and seals values before they reach the store, lists names (never values,
//! what a dispatched task carries), and opens a project's secrets (for the worker running
//! an attempt, or for a service of an environment as it starts), recording each read, by
//! whom and what for, in the audit log before any value leaves. Webhook endpoints'
//! signing secrets are sealed and opened here too. Key rotation ([`rotate`]) re-seals
//! every sealed value in one transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use drover_domain::{
    ProjectId, SecretName, SecretValues, Timestamp, ValidationError, WebhookId,
    validate_secret_value,
};
use drover_store::{
    Resealed, SealedSecret, SealedValue, SealedWebhookSecret, SecretMeta, SecretRead, SecretStore,
    StoreError,
};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, KeyId, Keyring, MasterKey, Place, Sealed};
use crate::keys::{self, KeyError, KeyOrigin, KeySource};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("invalid secret: {}", describe(.0))]
    Invalid(Vec<ValidationError>),
    #[error("the project has no secret `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("the key work was interrupted: {0}")]
    Interrupted(String),
}

fn describe(errors: &[ValidationError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// One task that is to receive its project's secrets: whose, and what for (the audit
/// log's reason).
#[derive(Debug, Clone)]
pub struct Reveal {
    pub project: ProjectId,
    pub purpose: String,
}

/// Project secrets, sealed under one keyring.
pub struct Vault {
    store: Arc<dyn SecretStore>,
    keys: Arc<Keyring>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("key_id", self.keys.current().id()).finish_non_exhaustive()
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

impl Vault {
    pub fn new(store: Arc<dyn SecretStore>, keys: Keyring) -> Self {
        Self { store, keys: Arc::new(keys) }
    }

    /// The id of the key new values are sealed with.
    pub fn key_id(&self) -> &KeyId {
        self.keys.current().id()
    }

    /// Creates or replaces a secret. Returns what is stored and whether it is new.
    pub async fn set(
        &self,
        project: &ProjectId,
        name: &str,
        value: &str,
        actor: &str,
    ) -> Result<(SecretMeta, bool), VaultError> {
        let mut errors = Vec::new();
        let name = SecretName::parse(name).map_err(|err| errors.push(err)).ok();
        if let Err(err) = validate_secret_value(value) {
            errors.push(err);
        }
        let Some(name) = name.filter(|_| errors.is_empty()) else {
            return Err(VaultError::Invalid(errors));
        };
        let sealed = self.keys.seal(Place::Secret { project, name: &name }, value)?;
        let row = SealedSecret {
            project_id: project.clone(),
            name,
            key_id: sealed.key_id,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
        };
        Ok(self.store.put_secret(row, actor, now()).await?)
    }

    /// The project's secrets, by name, without values.
    pub async fn list(&self, project: &ProjectId) -> Result<Vec<SecretMeta>, VaultError> {
        Ok(self.store.list_secrets(project).await?)
    }

    pub async fn delete(
        &self,
        project: &ProjectId,
        name: &str,
        actor: &str,
    ) -> Result<(), VaultError> {
        let parsed = SecretName::parse(name).map_err(|err| VaultError::Invalid(vec![err]))?;
        match self.store.delete_secret(project, &parsed, actor, now()).await? {
            true => Ok(()),
            false => Err(VaultError::NotFound(parsed.to_string())),
        }
    }

    /// The names of these projects' secrets (what a dispatched task carries), with one
    /// query; a project without secrets is absent.
    pub async fn names(
        &self,
        projects: &[ProjectId],
    ) -> Result<HashMap<ProjectId, Vec<String>>, VaultError> {
        let mut names: HashMap<ProjectId, Vec<String>> = HashMap::new();
        for (project, name) in self.store.secret_names(projects).await? {
            names.entry(project).or_default().push(name.to_string());
        }
        Ok(names)
    }

    /// The secrets of the projects these tasks (or services) belong to, opened, with one
    /// query for the whole batch, on behalf of `actor` (what the audit log records as the
    /// reader: `worker w1`, `environment dev`). Every value handed out is first recorded in
    /// the audit log (one `secret.read` per reveal and secret, in one transaction); nothing
    /// is returned if that fails. A secret that does not open (its key is gone, it was
    /// tampered with) is left out and reported in the server log by name.
    pub async fn reveal_as(
        &self,
        actor: &str,
        reveals: &[Reveal],
    ) -> Result<HashMap<ProjectId, SecretValues>, VaultError> {
        let mut projects: Vec<ProjectId> = reveals.iter().map(|r| r.project.clone()).collect();
        projects.sort();
        projects.dedup();
        let sealed = self.store.sealed_secrets(&projects).await?;
        if sealed.is_empty() {
            return Ok(HashMap::new());
        }
        let mut opened: HashMap<ProjectId, BTreeMap<String, String>> = HashMap::new();
        for secret in sealed {
            let parts = Sealed {
                key_id: secret.key_id.clone(),
                nonce: secret.nonce,
                ciphertext: secret.ciphertext,
            };
            let place = Place::Secret { project: &secret.project_id, name: &secret.name };
            match self.keys.open(place, &parts) {
                Ok(value) => {
                    opened
                        .entry(secret.project_id)
                        .or_default()
                        .insert(secret.name.to_string(), value.to_string());
                }
                Err(err) => tracing::error!(
                    project = %secret.project_id,
                    secret = %secret.name,
                    key_id = %secret.key_id,
                    error = %err,
                    "a secret cannot be opened; its tasks run without it"
                ),
            }
        }
        let reads: Vec<SecretRead> = reveals
            .iter()
            .flat_map(|reveal| {
                let names = opened.get(&reveal.project).into_iter().flat_map(BTreeMap::keys);
                names.filter_map(|name| {
                    Some(SecretRead {
                        project_id: reveal.project.clone(),
                        name: SecretName::parse(name.as_str()).ok()?,
                        actor: actor.to_owned(),
                        purpose: reveal.purpose.clone(),
                    })
                })
            })
            .collect();
        self.store.record_secret_reads(&reads, now()).await?;
        Ok(opened
            .into_iter()
            .map(|(project, values)| (project, SecretValues::new(values)))
            .collect())
    }

    /// Seals a webhook endpoint's signing secret for it.
    pub fn seal_webhook_secret(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        secret: &str,
    ) -> Result<SealedValue, VaultError> {
        Ok(stored(self.keys.seal(Place::WebhookSigning { project, webhook }, secret)?))
    }

    /// Opens a webhook endpoint's signing secret, to sign a delivery with.
    pub fn open_webhook_secret(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        sealed: &SealedValue,
    ) -> Result<Zeroizing<String>, VaultError> {
        Ok(self.keys.open(Place::WebhookSigning { project, webhook }, &parts(sealed))?)
    }

    /// Seals the plaintext signing secret of every endpoint made before they were sealed,
    /// and removes the plaintext (a server does this once, before it serves). Returns how
    /// many.
    pub async fn seal_plaintext_webhook_secrets(&self) -> Result<u64, VaultError> {
        seal_plaintext(&self.store, &self.keys).await
    }
}

/// Seals every plaintext webhook signing secret left from before they were sealed, under
/// `keyring`'s current key.
async fn seal_plaintext(
    store: &Arc<dyn SecretStore>,
    keyring: &Keyring,
) -> Result<u64, VaultError> {
    let seal = |project: &ProjectId, webhook: WebhookId, plaintext: &str| {
        let place = Place::WebhookSigning { project, webhook };
        keyring.seal(place, plaintext).map(stored).map_err(|err| err.to_string())
    };
    Ok(store.seal_plaintext_webhook_secrets(&seal).await?)
}

fn parts(sealed: &SealedValue) -> Sealed {
    Sealed {
        key_id: sealed.key_id.clone(),
        nonce: sealed.nonce.clone(),
        ciphertext: sealed.ciphertext.clone(),
    }
}

fn stored(sealed: Sealed) -> SealedValue {
    SealedValue { key_id: sealed.key_id, nonce: sealed.nonce, ciphertext: sealed.ciphertext }
}

/// What a key rotation did.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Where the new key is: the key file, or the environment.
    pub origin: KeyOrigin,
    pub new_key: KeyId,
    /// The keys values were sealed with before.
    pub old_keys: Vec<KeyId>,
    /// Secrets sealed anew under the new key.
    pub resealed: u64,
    /// Webhook endpoints' signing secrets sealed anew under the new key.
    pub resealed_webhook_secrets: u64,
    /// Values (secrets and signing secrets) re-sealed first to finish a rotation that had
    /// been interrupted.
    pub finished_interrupted: Option<u64>,
}

/// Rotates the master key: a new key is made and written to the key file (the current one
/// kept as `master.key.old` until every value is sealed anew), every secret of every
/// project and every webhook endpoint's signing secret is re-sealed under it in one
/// transaction, and the old key file is removed. A rotation interrupted earlier is
/// finished first. With keys from the environment no file is written: every value is
/// re-sealed under `DROVER_MASTER_KEY`, opening old values with `DROVER_MASTER_KEY_OLD`
/// (or the key file), which must differ from it. Plaintext signing secrets left from
/// before they were sealed are sealed first.
///
/// Only one process may use the store's secrets meanwhile: run it with the server stopped.
pub async fn rotate(
    store: Arc<dyn SecretStore>,
    source: &KeySource,
    actor: &str,
) -> Result<Rotation, VaultError> {
    let keyring = blocking({
        let source = source.clone();
        move || source.load_or_create()
    })
    .await??;
    if source.env_key().is_some() {
        if keyring.previous_ids().is_empty() {
            return Err(KeyError::EnvKeyUnchanged.into());
        }
        let old_keys = keyring.previous_ids();
        let new_key = keyring.current().id().clone();
        let resealed = reseal_all(&store, &keyring, actor).await?;
        return Ok(Rotation {
            origin: KeyOrigin::Env,
            new_key,
            old_keys,
            resealed: resealed.secrets,
            resealed_webhook_secrets: resealed.webhook_secrets,
            finished_interrupted: None,
        });
    }

    let mut finished_interrupted = None;
    if source.has_old_key_file() {
        // A rotation stopped half way: seal everything under the current key, so the old
        // key file may go, before rotating again.
        let resealed = reseal_all(&store, &keyring, actor).await?;
        finished_interrupted = Some(resealed.secrets + resealed.webhook_secrets);
        let old = source.old_key_file();
        blocking(move || keys::remove_key(&old)).await??;
    }

    let old_id = keyring.current().id().clone();
    let new = MasterKey::generate();
    let new_id = new.id().clone();
    {
        let (old_copy, new_copy) = (keyring.current().duplicate(), new.duplicate());
        let (key_file, old_file) = (source.key_file().to_path_buf(), source.old_key_file());
        blocking(move || {
            keys::write_key(&old_file, &old_copy)?;
            keys::write_key(&key_file, &new_copy)
        })
        .await??;
    }
    tracing::info!(key_id = %new_id, "wrote the new master key; re-sealing secrets");
    let keyring = keyring.rotated_to(new);
    let resealed = reseal_all(&store, &keyring, actor).await?;
    let old = source.old_key_file();
    blocking(move || keys::remove_key(&old)).await??;
    Ok(Rotation {
        origin: source.origin(),
        new_key: new_id,
        old_keys: vec![old_id],
        resealed: resealed.secrets,
        resealed_webhook_secrets: resealed.webhook_secrets,
        finished_interrupted,
    })
}

/// Re-seals every secret and webhook signing secret under `keyring`'s current key, in one
/// transaction (plaintext signing secrets are sealed first).
async fn reseal_all(
    store: &Arc<dyn SecretStore>,
    keyring: &Keyring,
    actor: &str,
) -> Result<Resealed, VaultError> {
    seal_plaintext(store, keyring).await?;
    let reseal = |old: &SealedSecret| -> Result<SealedSecret, String> {
        let parts = Sealed {
            key_id: old.key_id.clone(),
            nonce: old.nonce.clone(),
            ciphertext: old.ciphertext.clone(),
        };
        let place = Place::Secret { project: &old.project_id, name: &old.name };
        let value = keyring.open(place, &parts).map_err(|e| e.to_string())?;
        let sealed = keyring.seal(place, &value).map_err(|e| e.to_string())?;
        Ok(SealedSecret {
            project_id: old.project_id.clone(),
            name: old.name.clone(),
            key_id: sealed.key_id,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
        })
    };
    let reseal_webhook = |old: &SealedWebhookSecret| -> Result<SealedValue, String> {
        let place = Place::WebhookSigning { project: &old.project_id, webhook: old.webhook_id };
        let value = keyring.open(place, &parts(&old.sealed)).map_err(|e| e.to_string())?;
        keyring.seal(place, &value).map(stored).map_err(|e| e.to_string())
    };
    Ok(store.reseal_secrets(&reseal, &reseal_webhook, actor, now()).await?)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, VaultError> {
    tokio::task::spawn_blocking(work).await.map_err(|err| VaultError::Interrupted(err.to_string()))
}
