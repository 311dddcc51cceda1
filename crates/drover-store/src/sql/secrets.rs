//! The SQL [`SecretStore`]: the `secrets` table (sealed values only), the sealed signing
//! secrets of `webhooks` when they are sealed anew, and `secret.*` rows of `audit_log`,
//! each change written with its audit row in one transaction.

use async_trait::async_trait;
use drover_domain::{ProjectId, SecretName, Timestamp, WebhookId};
use sqlx::FromRow;

use super::{Backend, Db, SqlStore, corrupt, sql};
use crate::{
    Reseal, ResealWebhook, Resealed, SealPlaintext, SealedSecret, SealedValue, SealedWebhookSecret,
    SecretMeta, SecretRead, SecretStore, StoreError, StoreResult,
};

async fn audit(
    conn: &mut Db<'_>,
    project: &ProjectId,
    actor: &str,
    action: &str,
    name: &str,
    reason: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    let entry = crate::NewAudit { project: project.as_str(), actor, action, target: name, reason };
    super::identities::audit_in(conn, &entry, now).await
}

#[async_trait]
impl<B: Backend> SecretStore for SqlStore<B> {
    async fn put_secret(
        &self,
        sealed: SealedSecret,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<(SecretMeta, bool)> {
        self.with_tx(async |tx| {
            let created_at: Option<(i64,)> =
                sql("SELECT created_at FROM secrets WHERE project_id = ? AND name = ?")
                    .bind(sealed.project_id.as_str())
                    .bind(sealed.name.as_str())
                    .fetch_optional(tx)
                    .await?;
            let created = created_at.is_none();
            let created_at = created_at.map_or(now, |(at,)| Timestamp::from_millis(at));
            sql("INSERT INTO secrets (project_id, name, key_id, nonce, ciphertext, created_at, \
             updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (project_id, name) DO UPDATE SET key_id = excluded.key_id, \
             nonce = excluded.nonce, ciphertext = excluded.ciphertext, \
             updated_at = excluded.updated_at")
            .bind(sealed.project_id.as_str())
            .bind(sealed.name.as_str())
            .bind(&sealed.key_id)
            .bind(&sealed.nonce)
            .bind(&sealed.ciphertext)
            .bind(created_at.as_millis())
            .bind(now.as_millis())
            .execute(tx)
            .await?;
            audit(tx, &sealed.project_id, actor, "secret.set", sealed.name.as_str(), None, now)
                .await?;
            let meta = SecretMeta {
                name: sealed.name,
                key_id: sealed.key_id,
                created_at,
                updated_at: now,
            };
            Ok((meta, created))
        })
        .await
    }

    async fn list_secrets(&self, project: &ProjectId) -> StoreResult<Vec<SecretMeta>> {
        let rows: Vec<MetaRow> =
            sql("SELECT name, key_id, created_at, updated_at FROM secrets WHERE project_id = ? \
             ORDER BY name")
            .bind(project.as_str())
            .fetch_all(&mut self.read())
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(SecretMeta {
                    name: SecretName::parse(row.name).map_err(|e| corrupt("secrets.name", e))?,
                    key_id: row.key_id,
                    created_at: Timestamp::from_millis(row.created_at),
                    updated_at: Timestamp::from_millis(row.updated_at),
                })
            })
            .collect()
    }

    async fn delete_secret(
        &self,
        project: &ProjectId,
        name: &SecretName,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.with_tx(async |tx| {
            let deleted = sql("DELETE FROM secrets WHERE project_id = ? AND name = ?")
                .bind(project.as_str())
                .bind(name.as_str())
                .execute(tx)
                .await?
                > 0;
            if deleted {
                audit(tx, project, actor, "secret.delete", name.as_str(), None, now).await?;
            }
            Ok(deleted)
        })
        .await
    }

    async fn sealed_secrets(&self, projects: &[ProjectId]) -> StoreResult<Vec<SealedSecret>> {
        if projects.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sql(
            "SELECT project_id, name, key_id, nonce, ciphertext FROM secrets WHERE project_id IN (",
        );
        query.push_list(projects.iter().map(ProjectId::as_str)).push(") ORDER BY project_id, name");
        let rows: Vec<SealedRow> = query.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(SealedSecret::try_from).collect()
    }

    async fn secret_names(
        &self,
        projects: &[ProjectId],
    ) -> StoreResult<Vec<(ProjectId, SecretName)>> {
        if projects.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sql("SELECT project_id, name FROM secrets WHERE project_id IN (");
        query.push_list(projects.iter().map(ProjectId::as_str)).push(") ORDER BY project_id, name");
        let rows: Vec<(String, String)> = query.fetch_all(&mut self.read()).await?;
        rows.into_iter()
            .map(|(project, name)| {
                Ok((
                    ProjectId::parse(project).map_err(|e| corrupt("secrets.project_id", e))?,
                    SecretName::parse(name).map_err(|e| corrupt("secrets.name", e))?,
                ))
            })
            .collect()
    }

    async fn record_secret_reads(&self, reads: &[SecretRead], now: Timestamp) -> StoreResult<()> {
        if reads.is_empty() {
            return Ok(());
        }
        self.with_tx(async |tx| {
            // Six parameters a row, well under either database's limit per statement.
            for chunk in reads.chunks(1000) {
                let mut query =
                    sql("INSERT INTO audit_log (project_id, actor, action, target, reason, at)");
                query.push_values(chunk, |read| {
                    vec![
                        read.project_id.as_str().into(),
                        (&read.actor).into(),
                        "secret.read".into(),
                        read.name.as_str().into(),
                        (&read.purpose).into(),
                        now.as_millis().into(),
                    ]
                });
                query.execute(tx).await?;
            }
            Ok(())
        })
        .await
    }

    async fn reseal_secrets(
        &self,
        reseal: Reseal<'_>,
        reseal_webhook: ResealWebhook<'_>,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Resealed> {
        self.with_tx(async |tx| {
            let secrets = reseal_secrets_in(tx, reseal, actor, now).await?;
            let webhook_secrets = reseal_webhook_secrets_in(tx, reseal_webhook, actor, now).await?;
            Ok(Resealed { secrets, webhook_secrets })
        })
        .await
    }

    async fn seal_plaintext_webhook_secrets(&self, seal: SealPlaintext<'_>) -> StoreResult<u64> {
        let sealed = self
            .with_tx(async |tx| {
                let rows: Vec<(String, String, String)> =
                    sql("SELECT id, project_id, legacy_secret FROM webhooks \
                     WHERE legacy_secret IS NOT NULL ORDER BY id")
                    // Servers starting together on one PostgreSQL seal each row once.
                    .for_update(tx)
                    .fetch_all(tx)
                    .await?;
                let mut count = 0;
                for (id, project, plaintext) in rows {
                    let webhook: WebhookId = id.parse().map_err(|e| corrupt("webhooks.id", e))?;
                    let project =
                        ProjectId::parse(project).map_err(|e| corrupt("webhooks.project_id", e))?;
                    let sealed = seal(&project, webhook, &plaintext).map_err(|err| {
                        StoreError::Corrupt(format!(
                            "the signing secret of webhook {webhook}: {err}"
                        ))
                    })?;
                    store_webhook_secret(tx, webhook, &sealed).await?;
                    count += 1;
                }
                Ok(count)
            })
            .await?;
        if sealed > 0 {
            self.wipe_freed_pages().await?;
        }
        Ok(sealed)
    }
}

/// Seals every secret anew, each audited (`secret.rotate`).
async fn reseal_secrets_in(
    tx: &mut Db<'_>,
    reseal: Reseal<'_>,
    actor: &str,
    now: Timestamp,
) -> StoreResult<u64> {
    let rows: Vec<SealedRow> =
        sql("SELECT project_id, name, key_id, nonce, ciphertext FROM secrets \
         ORDER BY project_id, name")
        .fetch_all(tx)
        .await?;
    let mut count = 0;
    for row in rows {
        let old = SealedSecret::try_from(row)?;
        let new = reseal(&old).map_err(|err| {
            StoreError::Corrupt(format!(
                "secret `{}` of project `{}`: {err}",
                old.name, old.project_id
            ))
        })?;
        if new.project_id != old.project_id || new.name != old.name {
            return Err(StoreError::Corrupt(format!(
                "resealing secret `{}` of project `{}` changed its name",
                old.name, old.project_id
            )));
        }
        sql("UPDATE secrets SET key_id = ?, nonce = ?, ciphertext = ? \
         WHERE project_id = ? AND name = ?")
        .bind(&new.key_id)
        .bind(&new.nonce)
        .bind(&new.ciphertext)
        .bind(new.project_id.as_str())
        .bind(new.name.as_str())
        .execute(tx)
        .await?;
        let reason = format!("key {} -> {}", old.key_id, new.key_id);
        audit(tx, &new.project_id, actor, "secret.rotate", new.name.as_str(), Some(&reason), now)
            .await?;
        count += 1;
    }
    Ok(count)
}

/// Seals every webhook endpoint's signing secret anew, each audited (`webhook.rotate`).
async fn reseal_webhook_secrets_in(
    tx: &mut Db<'_>,
    reseal: ResealWebhook<'_>,
    actor: &str,
    now: Timestamp,
) -> StoreResult<u64> {
    let rows: Vec<SealedWebhookRow> =
        sql("SELECT id, project_id, secret_key_id, secret_nonce, secret_ciphertext FROM webhooks \
         WHERE secret_key_id IS NOT NULL ORDER BY id")
        .fetch_all(tx)
        .await?;
    let mut count = 0;
    for row in rows {
        let old = SealedWebhookSecret {
            webhook_id: row.id.parse().map_err(|e| corrupt("webhooks.id", e))?,
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("webhooks.project_id", e))?,
            sealed: SealedValue {
                key_id: row.secret_key_id,
                nonce: row.secret_nonce,
                ciphertext: row.secret_ciphertext,
            },
        };
        let new = reseal(&old).map_err(|err| {
            StoreError::Corrupt(format!("the signing secret of webhook {}: {err}", old.webhook_id))
        })?;
        store_webhook_secret(tx, old.webhook_id, &new).await?;
        let reason = format!("key {} -> {}", old.sealed.key_id, new.key_id);
        let target = old.webhook_id.to_string();
        audit(tx, &old.project_id, actor, "webhook.rotate", &target, Some(&reason), now).await?;
        count += 1;
    }
    Ok(count)
}

/// Writes an endpoint's sealed signing secret, and removes any plaintext one.
async fn store_webhook_secret(
    tx: &mut Db<'_>,
    webhook: WebhookId,
    sealed: &SealedValue,
) -> StoreResult<()> {
    sql("UPDATE webhooks SET secret_key_id = ?, secret_nonce = ?, secret_ciphertext = ?, \
         legacy_secret = NULL WHERE id = ?")
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(webhook.to_string())
    .execute(tx)
    .await?;
    Ok(())
}

#[derive(FromRow)]
struct SealedWebhookRow {
    id: String,
    project_id: String,
    secret_key_id: String,
    secret_nonce: Vec<u8>,
    secret_ciphertext: Vec<u8>,
}

#[derive(FromRow)]
struct MetaRow {
    name: String,
    key_id: String,
    created_at: i64,
    updated_at: i64,
}

#[derive(FromRow)]
struct SealedRow {
    project_id: String,
    name: String,
    key_id: String,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
}

impl TryFrom<SealedRow> for SealedSecret {
    type Error = StoreError;

    fn try_from(row: SealedRow) -> Result<Self, Self::Error> {
        Ok(Self {
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("secrets.project_id", e))?,
            name: SecretName::parse(row.name).map_err(|e| corrupt("secrets.name", e))?,
            key_id: row.key_id,
            nonce: row.nonce,
            ciphertext: row.ciphertext,
        })
    }
}
