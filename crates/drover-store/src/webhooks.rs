//! The store's webhook side: each project's endpoints (URL, kind filter, sealed signing
//! secret, failure counters and circuit breaker) and the log of their deliveries (one row per
//! event and endpoint, retried in place: attempts, status, last answer, latency). The
//! delivery loop's queries span projects and say so; everything users reach takes a
//! [`ProjectId`]. Kept apart from [`Store`](crate::Store) because only the webhook API and
//! the delivery loop use it.
//!
//! Deliveries are bounded: an endpoint keeps its newest [`MAX_DELIVERIES_PER_WEBHOOK`],
//! older ones are deleted as new ones arrive. Endpoints are bounded per project
//! ([`MAX_WEBHOOKS_PER_PROJECT`]).

use async_trait::async_trait;
use drover_domain::{DeliveryId, DeliveryStatus, EventSeq, ProjectId, Timestamp, WebhookId};

use crate::{SealedValue, StoreResult};

/// Most endpoints one project may have.
pub const MAX_WEBHOOKS_PER_PROJECT: u32 = 50;
/// Deliveries kept per endpoint; older ones are deleted as new ones are made.
pub const MAX_DELIVERIES_PER_WEBHOOK: u32 = 1000;

/// An endpoint as stored, without its signing secret (only the delivery loop reads that,
/// sealed: [`DueDelivery`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: WebhookId,
    pub project_id: ProjectId,
    pub url: String,
    /// Kinds and families (`stage.`) it receives, as the event filter parses them; empty:
    /// every kind.
    pub kinds: Vec<String>,
    pub description: Option<String>,
    pub enabled: bool,
    /// Why it was disabled, when it is.
    pub disabled_reason: Option<String>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// While in the future, nothing is sent to it (its circuit breaker is open).
    pub breaker_open_until: Option<Timestamp>,
    pub created_by: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("project_id", &self.project_id)
            .field("kinds", &self.kinds)
            .field("enabled", &self.enabled)
            .field("consecutive_failures", &self.consecutive_failures)
            .finish_non_exhaustive()
    }
}

/// An endpoint to create.
#[derive(Clone)]
pub struct NewWebhook {
    /// Chosen by the caller: the signing secret is sealed for it.
    pub id: WebhookId,
    pub project_id: ProjectId,
    pub url: String,
    /// What the audit log says about the URL (its origin: the path may hold a token).
    pub origin: String,
    pub kinds: Vec<String>,
    pub description: Option<String>,
    /// The signing secret (`whsec_…`), sealed by the vault for this project and endpoint.
    pub secret: SealedValue,
}

impl std::fmt::Debug for NewWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewWebhook")
            .field("project_id", &self.project_id)
            .field("origin", &self.origin)
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

/// One delivery: an event (or a test) for one endpoint, with its attempts so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// Also its `webhook-id` header, the same on every attempt.
    pub id: DeliveryId,
    pub webhook_id: WebhookId,
    pub project_id: ProjectId,
    /// The event delivered; `None` for a test.
    pub event_seq: Option<EventSeq>,
    /// The event's kind, or `webhook.test`.
    pub kind: String,
    /// The JSON body sent on every attempt.
    pub body: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    /// When it is (or was to be) tried next.
    pub next_attempt_at: Option<Timestamp>,
    /// Retries are given up a configured time after this (its creation, or a redelivery).
    pub window_start: Timestamp,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
    /// How long the last attempt took to be answered.
    pub latency_ms: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A delivery to make.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub webhook_id: WebhookId,
    pub project_id: ProjectId,
    pub event_seq: Option<EventSeq>,
    pub kind: String,
    pub body: String,
}

/// A due delivery with what sending it needs: its endpoint's URL, sealed secret and
/// breaker.
#[derive(Clone)]
pub struct DueDelivery {
    pub delivery: WebhookDelivery,
    pub url: String,
    /// The endpoint's signing secret, sealed for its project and id; `None` while an
    /// endpoint made before secrets were sealed still waits for the server to seal it.
    pub secret: Option<SealedValue>,
    pub consecutive_failures: u32,
    pub breaker_open_until: Option<Timestamp>,
}

impl std::fmt::Debug for DueDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueDelivery")
            .field("delivery", &self.delivery.id)
            .field("webhook", &self.delivery.webhook_id)
            .finish_non_exhaustive()
    }
}

/// The result of one attempt, as the delivery loop reports it.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub delivery: DeliveryId,
    /// The endpoint answered 2xx.
    pub succeeded: bool,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: u64,
    /// After a failure: when to try again; `None` gives the delivery up (`dead`).
    pub retry_at: Option<Timestamp>,
}

/// What happens to an endpoint that keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Consecutive failed attempts that open the circuit breaker.
    pub breaker_after: u32,
    /// How long an open breaker holds deliveries back.
    pub breaker_open_for: std::time::Duration,
    /// Consecutive failed attempts that disable the endpoint.
    pub disable_after: u32,
}

/// What recording an attempt changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptRecorded {
    /// The delivery's new status.
    Applied { status: DeliveryStatus, disabled: bool },
    /// The delivery is gone (its endpoint was deleted) or was no longer to be sent:
    /// nothing was written.
    Stale,
}

/// Which deliveries to list: newest first, strictly older than `before`.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub before: Option<DeliveryId>,
    pub limit: u32,
}

#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Creates an endpoint, enabled, if the project is under its quota; audited
    /// (`webhook.create`).
    async fn create_webhook(
        &self,
        new: NewWebhook,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Webhook>;

    /// The project's endpoints, oldest first.
    async fn list_webhooks(&self, project: &ProjectId) -> StoreResult<Vec<Webhook>>;

    async fn get_webhook(&self, project: &ProjectId, id: WebhookId)
    -> StoreResult<Option<Webhook>>;

    /// Deletes an endpoint and its deliveries; audited (`webhook.delete`). Whether there
    /// was one.
    async fn delete_webhook(
        &self,
        project: &ProjectId,
        id: WebhookId,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<bool>;

    /// Enables an endpoint and resets its failure count and breaker; audited
    /// (`webhook.enable`).
    async fn enable_webhook(
        &self,
        project: &ProjectId,
        id: WebhookId,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Webhook>;

    /// An endpoint's deliveries, newest first.
    async fn list_deliveries(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        query: &DeliveryQuery,
    ) -> StoreResult<Vec<WebhookDelivery>>;

    async fn get_delivery(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        delivery: DeliveryId,
    ) -> StoreResult<Option<WebhookDelivery>>;

    /// Queues a delivery to an enabled endpoint of the project, due now (a test).
    async fn enqueue_delivery(
        &self,
        project: &ProjectId,
        delivery: NewDelivery,
        now: Timestamp,
    ) -> StoreResult<WebhookDelivery>;

    /// Sends a delivery again, now, with a new retry window (same id, attempts go on).
    /// Its endpoint must be enabled.
    async fn redeliver(
        &self,
        project: &ProjectId,
        webhook: WebhookId,
        delivery: DeliveryId,
        now: Timestamp,
    ) -> StoreResult<WebhookDelivery>;

    /// All projects: every enabled endpoint, to match events against.
    async fn enabled_webhooks(&self) -> StoreResult<Vec<Webhook>>;

    /// All projects: queues deliveries due now, in one transaction, trimming each
    /// endpoint's log to its newest [`MAX_DELIVERIES_PER_WEBHOOK`].
    async fn enqueue_deliveries(
        &self,
        deliveries: Vec<NewDelivery>,
        now: Timestamp,
    ) -> StoreResult<()>;

    /// All projects: deliveries due at `now` to enabled endpoints whose breaker is not
    /// open, soonest first.
    async fn due_deliveries(&self, now: Timestamp, limit: u32) -> StoreResult<Vec<DueDelivery>>;

    /// All projects: records an attempt and what it does to its endpoint, in one
    /// transaction: a success resets the endpoint's failures and closes its breaker; a
    /// failure counts, opens the breaker at `policy.breaker_after` and, at
    /// `policy.disable_after`, disables the endpoint, gives up its other deliveries and
    /// appends a `webhook.disabled` event.
    async fn record_attempt(
        &self,
        result: &AttemptResult,
        policy: &FailurePolicy,
        now: Timestamp,
    ) -> StoreResult<AttemptRecorded>;

    /// All projects: the newest event's sequence number (0 without events), where the
    /// delivery loop starts.
    async fn newest_event_seq(&self) -> StoreResult<EventSeq>;
}
