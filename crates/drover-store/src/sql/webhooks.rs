//! The SQLite [`WebhookStore`]: the `webhooks` and `webhook_deliveries` tables, and the
//! `webhook.*` rows of `audit_log`. Signing secrets go in and out sealed (the vault seals
//! and opens them); nothing here sees one in clear. An attempt's result, its endpoint's counters and, when
//! the endpoint is disabled, its `webhook.disabled` event are written in one transaction;
//! the event is published after the commit, like every other event.

use async_trait::async_trait;
use drover_domain::{
    DeliveryId, DeliveryStatus, EventKind, EventSeq, NewEvent, ProjectId, Timestamp, WebhookId,
};
use serde_json::json;
use sqlx::FromRow;

use super::{Backend, Db, SqlStore, corrupt, sql};
use crate::{
    AttemptRecorded, AttemptResult, DeliveryQuery, DueDelivery, FailurePolicy,
    MAX_DELIVERIES_PER_WEBHOOK, MAX_WEBHOOKS_PER_PROJECT, NewDelivery, NewWebhook, SealedValue,
    StoreError, StoreResult, Webhook, WebhookDelivery, WebhookStore,
};

macro_rules! webhook_columns {
    () => {
        "id, project_id, url, kinds, description, enabled, disabled_reason, \
         consecutive_failures, breaker_open_until, created_by, created_at, updated_at"
    };
}

macro_rules! delivery_columns {
    () => {
        "id, webhook_id, project_id, event_seq, kind, body, status, attempts, next_attempt_at, \
         window_start, last_status_code, last_error, latency_ms, created_at, updated_at"
    };
}

/// Rows inserted per statement (15 parameters a row, well under SQLite's limit).
const INSERT_CHUNK: usize = 500;

async fn audit(
    conn: &mut Db<'_>,
    project: &ProjectId,
    actor: &str,
    action: &str,
    target: &str,
    reason: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    let entry = crate::NewAudit { project: project.as_str(), actor, action, target, reason };
    super::identities::audit_in(conn, &entry, now).await
}

async fn fetch_webhook(
    db: &mut Db<'_>,
    project: &ProjectId,
    id: WebhookId,
) -> StoreResult<Option<Webhook>> {
    let row: Option<WebhookRow> = sql(concat!(
        "SELECT ",
        webhook_columns!(),
        " FROM webhooks WHERE project_id = ? AND id = ?"
    ))
    .bind(project.as_str())
    .bind(id.to_string())
    .for_update(db)
    .fetch_optional(db)
    .await?;
    row.map(Webhook::try_from).transpose()
}

async fn fetch_delivery(
    db: &mut Db<'_>,
    project: &ProjectId,
    webhook: WebhookId,
    id: DeliveryId,
) -> StoreResult<Option<WebhookDelivery>> {
    let row: Option<DeliveryRow> = sql(concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM webhook_deliveries WHERE project_id = ? AND webhook_id = ? AND id = ?"
    ))
    .bind(project.as_str())
    .bind(webhook.to_string())
    .bind(id.to_string())
    .for_update(db)
    .fetch_optional(db)
    .await?;
    row.map(WebhookDelivery::try_from).transpose()
}

/// Inserts deliveries due at `now`; returns them as stored.
async fn insert_deliveries(
    conn: &mut Db<'_>,
    deliveries: Vec<NewDelivery>,
    now: Timestamp,
) -> StoreResult<Vec<WebhookDelivery>> {
    let stored: Vec<WebhookDelivery> = deliveries
        .into_iter()
        .map(|new| WebhookDelivery {
            id: DeliveryId::new(),
            webhook_id: new.webhook_id,
            project_id: new.project_id,
            event_seq: new.event_seq,
            kind: new.kind,
            body: new.body,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: Some(now),
            window_start: now,
            last_status_code: None,
            last_error: None,
            latency_ms: None,
            created_at: now,
            updated_at: now,
        })
        .collect();
    for chunk in stored.chunks(INSERT_CHUNK) {
        let mut query = sql(concat!("INSERT INTO webhook_deliveries (", delivery_columns!(), ")"));
        query.push_values(chunk, |d| {
            vec![
                d.id.to_string().into(),
                d.webhook_id.to_string().into(),
                d.project_id.as_str().into(),
                d.event_seq.map(|seq| seq.0).into(),
                d.kind.as_str().into(),
                d.body.as_str().into(),
                d.status.as_str().into(),
                0_i64.into(),
                now.as_millis().into(),
                now.as_millis().into(),
                None::<i64>.into(),
                None::<String>.into(),
                None::<i64>.into(),
                now.as_millis().into(),
                now.as_millis().into(),
            ]
        });
        // Another server may have made this (webhook, event) delivery already.
        query.push(" ON CONFLICT DO NOTHING");
        query.execute(conn).await?;
    }
    let mut webhooks: Vec<WebhookId> = stored.iter().map(|d| d.webhook_id).collect();
    webhooks.sort_unstable();
    webhooks.dedup();
    for webhook in webhooks {
        trim_log(conn, webhook).await?;
    }
    Ok(stored)
}

/// Keeps an endpoint's newest [`MAX_DELIVERIES_PER_WEBHOOK`] deliveries (ids are
/// time-ordered), deleting older ones whatever their state.
async fn trim_log(conn: &mut Db<'_>, webhook: WebhookId) -> StoreResult<()> {
    let id = webhook.to_string();
    let deleted = sql(
        "DELETE FROM webhook_deliveries WHERE webhook_id = ? AND id < \
         (SELECT id FROM webhook_deliveries WHERE webhook_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
    )
    .bind(&id)
    .bind(&id)
    .bind(i64::from(MAX_DELIVERIES_PER_WEBHOOK) - 1)
    .execute(conn)
    .await?
    ;
    if deleted > 0 {
        tracing::debug!(webhook = %webhook, deleted, "oldest webhook deliveries trimmed");
    }
    Ok(())
}

fn to_u32(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

#[async_trait]
impl<B: Backend> WebhookStore for SqlStore<B> {
    async fn create_webhook(
        &self,
        new: NewWebhook,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Webhook> {
        let webhook = Webhook {
            id: new.id,
            project_id: new.project_id,
            url: new.url,
            kinds: new.kinds,
            description: new.description,
            enabled: true,
            disabled_reason: None,
            consecutive_failures: 0,
            breaker_open_until: None,
            created_by: actor.to_owned(),
            created_at: now,
            updated_at: now,
        };
        let kinds = serde_json::to_string(&webhook.kinds)
            .map_err(|err| StoreError::Corrupt(format!("webhook kinds: {err}")))?;
        self.with_tx(async |tx| {
            // Administrators (and the local admin) may name any project: it must exist. Its
            // row is locked (PostgreSQL), so concurrent creations count the quota in turn.
            let project: Option<(String,)> = sql("SELECT id FROM projects WHERE id = ?")
                .bind(webhook.project_id.as_str())
                .for_update(tx)
                .fetch_optional(tx)
                .await?;
            if project.is_none() {
                return Err(StoreError::ProjectNotFound(webhook.project_id.to_string()));
            }
            let (count,): (i64,) = sql("SELECT COUNT(*) FROM webhooks WHERE project_id = ?")
                .bind(webhook.project_id.as_str())
                .fetch_one(tx)
                .await?;
            if count >= i64::from(MAX_WEBHOOKS_PER_PROJECT) {
                return Err(StoreError::WebhookQuotaExceeded { limit: MAX_WEBHOOKS_PER_PROJECT });
            }
            sql(concat!(
                "INSERT INTO webhooks (",
                webhook_columns!(),
                ", secret_key_id, secret_nonce, secret_ciphertext) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(webhook.id.to_string())
            .bind(webhook.project_id.as_str())
            .bind(&webhook.url)
            .bind(kinds)
            .bind(webhook.description.as_deref())
            .bind(true)
            .bind(None::<String>)
            .bind(0_i64)
            .bind(None::<i64>)
            .bind(actor)
            .bind(now.as_millis())
            .bind(now.as_millis())
            .bind(&new.secret.key_id)
            .bind(&new.secret.nonce)
            .bind(&new.secret.ciphertext)
            .execute(tx)
            .await?;
            let target = webhook.id.to_string();
            audit(
                tx,
                &webhook.project_id,
                actor,
                "webhook.create",
                &target,
                Some(&new.origin),
                now,
            )
            .await?;
            Ok(webhook)
        })
        .await
    }

    async fn list_webhooks(&self, project: &ProjectId) -> StoreResult<Vec<Webhook>> {
        let rows: Vec<WebhookRow> = sql(concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM webhooks WHERE project_id = ? ORDER BY id"
        ))
        .bind(project.as_str())
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(Webhook::try_from).collect()
    }

    async fn get_webhook(
        &self,
        project: &ProjectId,
        id: WebhookId,
    ) -> StoreResult<Option<Webhook>> {
        fetch_webhook(&mut self.read(), project, id).await
    }

    async fn delete_webhook(
        &self,
        project: &ProjectId,
        id: WebhookId,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.with_tx(async |tx| {
            let deleted = sql("DELETE FROM webhooks WHERE project_id = ? AND id = ?")
                .bind(project.as_str())
                .bind(id.to_string())
                .execute(tx)
                .await?
                > 0;
            if deleted {
                audit(tx, project, actor, "webhook.delete", &id.to_string(), None, now).await?;
            }
            Ok(deleted)
        })
        .await
    }

    async fn enable_webhook(
        &self,
        project: &ProjectId,
        id: WebhookId,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Webhook> {
        self.with_tx(async |tx| {
            let updated = sql(
            "UPDATE webhooks SET enabled = TRUE, disabled_reason = NULL, consecutive_failures = 0, \
             breaker_open_until = NULL, updated_at = ? WHERE project_id = ? AND id = ?",
        )
        .bind(now.as_millis())
        .bind(project.as_str())
        .bind(id.to_string())
        .execute(tx)
        .await?
        ;
            if updated == 0 {
                return Err(StoreError::WebhookNotFound(id.to_string()));
            }
            audit(tx, project, actor, "webhook.enable", &id.to_string(), None, now).await?;
            let webhook = fetch_webhook(tx, project, id)
                .await?
                .ok_or_else(|| StoreError::WebhookNotFound(id.to_string()))?;
            Ok(webhook)
        })
        .await
    }

    async fn list_deliveries(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        query: &DeliveryQuery,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        let mut statement = sql(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM webhook_deliveries WHERE project_id = ? AND webhook_id = ?"
        ))
        .bind(project.as_str())
        .bind(webhook.to_string());
        if let Some(before) = query.before {
            statement.push(" AND id < ").push_bind(before.to_string());
        }
        statement.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows: Vec<DeliveryRow> = statement.fetch_all(&mut self.read()).await?;
        rows.into_iter().map(WebhookDelivery::try_from).collect()
    }

    async fn get_delivery(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        delivery: DeliveryId,
    ) -> StoreResult<Option<WebhookDelivery>> {
        fetch_delivery(&mut self.read(), project, webhook, delivery).await
    }

    async fn enqueue_delivery(
        &self,
        project: &ProjectId,
        delivery: NewDelivery,
        now: Timestamp,
    ) -> StoreResult<WebhookDelivery> {
        let webhook = delivery.webhook_id;
        self.with_tx(async |tx| {
            let found = fetch_webhook(tx, project, webhook)
                .await?
                .ok_or_else(|| StoreError::WebhookNotFound(webhook.to_string()))?;
            if !found.enabled {
                return Err(StoreError::WebhookDisabled(webhook.to_string()));
            }
            let delivery = NewDelivery { project_id: project.clone(), ..delivery };
            let mut stored = insert_deliveries(tx, vec![delivery], now).await?;
            stored.pop().ok_or_else(|| StoreError::Corrupt("a queued delivery vanished".to_owned()))
        })
        .await
    }

    async fn redeliver(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        delivery: DeliveryId,
        now: Timestamp,
    ) -> StoreResult<WebhookDelivery> {
        self.with_tx(async |tx| {
            let found = fetch_webhook(tx, project, webhook)
                .await?
                .ok_or_else(|| StoreError::WebhookNotFound(webhook.to_string()))?;
            let mut current =
                fetch_delivery(tx, project, webhook, delivery).await?.ok_or_else(|| {
                    StoreError::WebhookDeliveryNotFound {
                        webhook: webhook.to_string(),
                        delivery: delivery.to_string(),
                    }
                })?;
            if !found.enabled {
                return Err(StoreError::WebhookDisabled(webhook.to_string()));
            }
            current.status = current.status.become_(DeliveryStatus::Pending)?;
            current.next_attempt_at = Some(now);
            current.window_start = now;
            current.updated_at = now;
            sql(
                "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ?, window_start = ?, \
             updated_at = ? WHERE id = ?",
            )
            .bind(current.status.as_str())
            .bind(now.as_millis())
            .bind(now.as_millis())
            .bind(now.as_millis())
            .bind(delivery.to_string())
            .execute(tx)
            .await?;
            Ok(current)
        })
        .await
    }

    async fn enabled_webhooks(&self) -> StoreResult<Vec<Webhook>> {
        let rows: Vec<WebhookRow> =
            sql(concat!("SELECT ", webhook_columns!(), " FROM webhooks WHERE enabled ORDER BY id"))
                .fetch_all(&mut self.read())
                .await?;
        rows.into_iter().map(Webhook::try_from).collect()
    }

    async fn enqueue_deliveries(
        &self,
        deliveries: Vec<NewDelivery>,
        now: Timestamp,
    ) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        self.with_tx(async |tx| {
            insert_deliveries(tx, deliveries, now).await?;
            Ok(())
        })
        .await
    }

    async fn due_deliveries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueDelivery>> {
        let rows: Vec<DueRow> =
            sql("SELECT d.id, d.webhook_id, d.project_id, d.event_seq, d.kind, d.body, d.status, \
             d.attempts, d.next_attempt_at, d.window_start, d.last_status_code, d.last_error, \
             d.latency_ms, d.created_at, d.updated_at, w.url, w.secret_key_id, \
             w.secret_nonce, w.secret_ciphertext, w.consecutive_failures, w.breaker_open_until \
             FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.status IN ('pending', 'failed') AND d.next_attempt_at <= ? \
             AND w.enabled AND (w.breaker_open_until IS NULL OR w.breaker_open_until <= ?) \
             ORDER BY d.next_attempt_at LIMIT ?")
            .bind(now.as_millis())
            .bind(now.as_millis())
            .bind(i64::from(limit))
            .fetch_all(&mut self.read())
            .await?;
        rows.into_iter()
            .map(|row| {
                let secret = match (row.secret_key_id, row.secret_nonce, row.secret_ciphertext) {
                    (Some(key_id), Some(nonce), Some(ciphertext)) => {
                        Some(SealedValue { key_id, nonce, ciphertext })
                    }
                    _ => None,
                };
                Ok(DueDelivery {
                    url: row.url,
                    secret,
                    consecutive_failures: to_u32(row.consecutive_failures),
                    breaker_open_until: row.breaker_open_until.map(Timestamp::from_millis),
                    delivery: WebhookDelivery::try_from(row.delivery)?,
                })
            })
            .collect()
    }

    async fn record_attempt(
        &self,
        result: &AttemptResult,
        policy: &FailurePolicy,
        now: Timestamp,
    ) -> StoreResult<AttemptRecorded> {
        self.transaction(now, async |tx, events| {
            let row: Option<(String, String, String, i64, bool, Option<String>)> = sql(
                "SELECT d.status, d.webhook_id, d.project_id, w.consecutive_failures, w.enabled, \
             w.description FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.id = ?",
            )
            .bind(result.delivery.to_string())
            .for_update(tx)
            .fetch_optional(tx)
            .await?;
            let Some((status, webhook_id, project_id, failures, enabled, description)) = row else {
                return Ok(AttemptRecorded::Stale);
            };
            let current: DeliveryStatus =
                status.parse().map_err(|e| corrupt("webhook_deliveries.status", e))?;
            let target = match (result.succeeded, result.retry_at) {
                (true, _) => DeliveryStatus::Succeeded,
                (false, Some(_)) => DeliveryStatus::Failed,
                (false, None) => DeliveryStatus::Dead,
            };
            let Ok(mut status) = current.become_(target) else {
                return Ok(AttemptRecorded::Stale);
            };
            sql("UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1, \
             next_attempt_at = ?, last_status_code = ?, last_error = ?, latency_ms = ?, \
             updated_at = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(result.retry_at.filter(|_| !result.succeeded).map(Timestamp::as_millis))
            .bind(result.status_code.map(i64::from))
            .bind(result.error.as_deref())
            .bind(i64::try_from(result.latency_ms).unwrap_or(i64::MAX))
            .bind(now.as_millis())
            .bind(result.delivery.to_string())
            .execute(tx)
            .await?;
            let mut disabled = false;
            if result.succeeded {
                sql("UPDATE webhooks SET consecutive_failures = 0, breaker_open_until = NULL, \
                 updated_at = ? WHERE id = ?")
                .bind(now.as_millis())
                .bind(&webhook_id)
                .execute(tx)
                .await?;
            } else {
                let failures = to_u32(failures).saturating_add(1);
                let open_until = (failures >= policy.breaker_after.max(1))
                    .then(|| now.plus(policy.breaker_open_for).as_millis());
                sql("UPDATE webhooks SET consecutive_failures = ?, breaker_open_until = ?, \
                 updated_at = ? WHERE id = ?")
                .bind(i64::from(failures))
                .bind(open_until)
                .bind(now.as_millis())
                .bind(&webhook_id)
                .execute(tx)
                .await?;
                if enabled && failures >= policy.disable_after.max(1) {
                    disabled = true;
                    let last = match (result.status_code, result.error.as_deref()) {
                        (Some(code), _) => format!("HTTP {code}"),
                        (None, Some(error)) => error.to_owned(),
                        (None, None) => "no answer".to_owned(),
                    };
                    let reason = format!(
                        "disabled after {failures} failed attempts in a row (last: {last})"
                    );
                    sql("UPDATE webhooks SET enabled = FALSE, disabled_reason = ?, \
                     breaker_open_until = NULL WHERE id = ?")
                    .bind(&reason)
                    .bind(&webhook_id)
                    .execute(tx)
                    .await?;
                    sql("UPDATE webhook_deliveries SET status = 'dead', next_attempt_at = NULL, \
                     last_error = COALESCE(last_error, 'not sent: the endpoint was disabled'), \
                     updated_at = ? WHERE webhook_id = ? AND status IN ('pending', 'failed')")
                    .bind(now.as_millis())
                    .bind(&webhook_id)
                    .execute(tx)
                    .await?;
                    if status == DeliveryStatus::Failed {
                        status = status.become_(DeliveryStatus::Dead)?;
                    }
                    let event = NewEvent {
                        project_id: ProjectId::parse(project_id)
                            .map_err(|e| corrupt("webhook_deliveries.project_id", e))?,
                        run_id: None,
                        attempt_id: None,
                        environment_id: None,
                        kind: EventKind::WebhookDisabled,
                        payload: json!({
                            "webhook_id": webhook_id,
                            "description": description,
                            "consecutive_failures": failures,
                            "reason": reason,
                        }),
                        correlation_id: None,
                    };
                    events.push(event);
                }
            }
            Ok(AttemptRecorded::Applied { status, disabled })
        })
        .await
    }

    async fn newest_event_seq(&self) -> StoreResult<EventSeq> {
        let (seq,): (Option<i64>,) =
            sql("SELECT MAX(seq) FROM events").fetch_one(&mut self.read()).await?;
        Ok(EventSeq(seq.unwrap_or(0)))
    }
}

#[derive(FromRow)]
struct WebhookRow {
    id: String,
    project_id: String,
    url: String,
    kinds: String,
    description: Option<String>,
    enabled: bool,
    disabled_reason: Option<String>,
    consecutive_failures: i64,
    breaker_open_until: Option<i64>,
    created_by: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<WebhookRow> for Webhook {
    type Error = StoreError;

    fn try_from(row: WebhookRow) -> Result<Self, Self::Error> {
        Ok(Self {
            id: row.id.parse().map_err(|e| corrupt("webhooks.id", e))?,
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("webhooks.project_id", e))?,
            url: row.url,
            kinds: serde_json::from_str(&row.kinds).map_err(|e| corrupt("webhooks.kinds", e))?,
            description: row.description,
            enabled: row.enabled,
            disabled_reason: row.disabled_reason,
            consecutive_failures: to_u32(row.consecutive_failures),
            breaker_open_until: row.breaker_open_until.map(Timestamp::from_millis),
            created_by: row.created_by,
            created_at: Timestamp::from_millis(row.created_at),
            updated_at: Timestamp::from_millis(row.updated_at),
        })
    }
}

#[derive(FromRow)]
struct DeliveryRow {
    id: String,
    webhook_id: String,
    project_id: String,
    event_seq: Option<i64>,
    kind: String,
    body: String,
    status: String,
    attempts: i64,
    next_attempt_at: Option<i64>,
    window_start: i64,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    latency_ms: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<DeliveryRow> for WebhookDelivery {
    type Error = StoreError;

    fn try_from(row: DeliveryRow) -> Result<Self, Self::Error> {
        Ok(Self {
            id: row.id.parse().map_err(|e| corrupt("webhook_deliveries.id", e))?,
            webhook_id: row
                .webhook_id
                .parse()
                .map_err(|e| corrupt("webhook_deliveries.webhook_id", e))?,
            project_id: ProjectId::parse(row.project_id)
                .map_err(|e| corrupt("webhook_deliveries.project_id", e))?,
            event_seq: row.event_seq.map(EventSeq),
            kind: row.kind,
            body: row.body,
            status: row.status.parse().map_err(|e| corrupt("webhook_deliveries.status", e))?,
            attempts: to_u32(row.attempts),
            next_attempt_at: row.next_attempt_at.map(Timestamp::from_millis),
            window_start: Timestamp::from_millis(row.window_start),
            last_status_code: row.last_status_code.and_then(|code| u16::try_from(code).ok()),
            last_error: row.last_error,
            latency_ms: row.latency_ms.map(|ms| u64::try_from(ms).unwrap_or(0)),
            created_at: Timestamp::from_millis(row.created_at),
            updated_at: Timestamp::from_millis(row.updated_at),
        })
    }
}

#[derive(FromRow)]
struct DueRow {
    #[sqlx(flatten)]
    delivery: DeliveryRow,
    url: String,
    secret_key_id: Option<String>,
    secret_nonce: Option<Vec<u8>>,
    secret_ciphertext: Option<Vec<u8>>,
    consecutive_failures: i64,
    breaker_open_until: Option<i64>,
}
