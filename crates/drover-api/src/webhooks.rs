//! `/api/v1/webhooks`: the caller's project's webhook endpoints and their delivery log.
//! Create one (`{url, kinds?, description?}`: the signing secret is in the answer, once,
//! and never again; it is stored sealed by the vault; beyond local mode the URL may not
//! lead to this machine or a private network, see [`crate::webhook_targets`]), list, show, delete, enable again after it was disabled, send it a
//! `webhook.test` delivery, read its deliveries (status, attempts, last answer, latency)
//! and send one again. Another project's endpoint is answered like one that does not
//! exist (404).
//!
//! Also the wire format of what is delivered ([`event_body`], [`test_body`]): a JSON
//! object `{"type", "timestamp", "data"}` whose `data` is the event as the event stream
//! shows it. The server's delivery loop sends it, signed per Standard Webhooks.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use drover_auth::webhook::SigningSecret;
use drover_domain::{
    DeliveryId, ErrorCode, Event, EventFilter, MAX_WEBHOOK_DESCRIPTION_LEN, Timestamp,
    WEBHOOK_TEST_KIND, WebhookId, parse_webhook_url,
};
use drover_store::{DeliveryQuery, NewDelivery, NewWebhook, Webhook, WebhookDelivery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::openapi::InProject;
use crate::wire::{EventView, time};
use crate::{AppState, Caller};

/// Largest page of deliveries.
const MAX_PAGE: u32 = 200;

/// The body of `POST /webhooks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookBody {
    #[serde(default)]
    #[schema(schema_with = crate::wire::rules::webhook_url, required = true)]
    pub url: Option<String>,
    #[serde(default)]
    #[schema(schema_with = crate::wire::rules::event_kinds)]
    pub kinds: Option<Vec<String>>,
    #[serde(default)]
    #[schema(schema_with = crate::wire::rules::webhook_description)]
    pub description: Option<String>,
}

/// A webhook endpoint (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    /// Kinds and families it receives; empty: every kind.
    pub kinds: Vec<String>,
    pub description: Option<String>,
    pub enabled: bool,
    /// Why it was disabled, when it is.
    pub disabled_reason: Option<String>,
    /// Failed attempts since its last success.
    pub consecutive_failures: u32,
    /// While set and in the future, deliveries wait (its circuit breaker is open).
    pub breaker_open_until: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Webhook> for WebhookView {
    fn from(webhook: &Webhook) -> Self {
        Self {
            id: webhook.id.to_string(),
            url: webhook.url.clone(),
            kinds: EventFilter::display_kinds(&webhook.kinds),
            description: webhook.description.clone(),
            enabled: webhook.enabled,
            disabled_reason: webhook.disabled_reason.clone(),
            consecutive_failures: webhook.consecutive_failures,
            breaker_open_until: webhook.breaker_open_until.map(time),
            created_by: webhook.created_by.clone(),
            created_at: time(webhook.created_at),
            updated_at: time(webhook.updated_at),
        }
    }
}

/// A new endpoint: its signing secret appears here once and is never shown again.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedWebhookView {
    /// `whsec_…`: verify deliveries with it (Standard Webhooks).
    pub secret: String,
    #[serde(flatten)]
    pub webhook: WebhookView,
}

impl std::fmt::Debug for CreatedWebhookView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedWebhookView").field("webhook", &self.webhook).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    pub items: Vec<WebhookView>,
}

/// One delivery of an endpoint's log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookDeliveryView {
    /// Also the `webhook-id` header of each of its attempts.
    pub id: String,
    pub webhook_id: String,
    /// The event delivered (none for a test).
    pub event_seq: Option<i64>,
    /// The event's kind, or `webhook.test`.
    pub kind: String,
    /// `pending|failed|succeeded|dead`: `failed` is retried at `next_attempt_at`.
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    /// The HTTP status of the last answer.
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed without an answer (timeout, refused, …).
    pub last_error: Option<String>,
    /// How long the last attempt took to be answered, in milliseconds.
    pub latency_ms: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&WebhookDelivery> for WebhookDeliveryView {
    fn from(delivery: &WebhookDelivery) -> Self {
        Self {
            id: delivery.id.to_string(),
            webhook_id: delivery.webhook_id.to_string(),
            event_seq: delivery.event_seq.map(|seq| seq.0),
            kind: delivery.kind.clone(),
            status: delivery.status.to_string(),
            attempts: delivery.attempts,
            next_attempt_at: delivery.next_attempt_at.map(time),
            last_status_code: delivery.last_status_code,
            last_error: delivery.last_error.clone(),
            latency_ms: delivery.latency_ms,
            created_at: time(delivery.created_at),
            updated_at: time(delivery.updated_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookDeliveryPage {
    pub items: Vec<WebhookDeliveryView>,
    /// Pass as `cursor` for the next (older) page.
    pub next_cursor: Option<String>,
}

/// What a webhook delivery's body is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookPayload {
    /// The event's kind (`run.succeeded`), or `webhook.test`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened (RFC 3339).
    pub timestamp: String,
    /// The event, as `GET /api/v1/events` shows it, with its `environment_id`.
    pub data: serde_json::Value,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesQuery {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
}

/// The body of a delivery of `event`.
pub fn event_body(event: &Event) -> String {
    let mut data = serde_json::to_value(EventView::from(event)).unwrap_or_default();
    if let serde_json::Value::Object(fields) = &mut data {
        fields.insert(
            "environment_id".to_owned(),
            event.environment_id.map(|id| id.to_string()).into(),
        );
    }
    let payload =
        WebhookPayload { kind: event.kind.to_string(), timestamp: time(event.created_at), data };
    serde_json::to_string(&payload).unwrap_or_default()
}

/// The body of a test delivery to `webhook`.
pub fn test_body(webhook: WebhookId, project: &str, now: Timestamp) -> String {
    let payload = WebhookPayload {
        kind: WEBHOOK_TEST_KIND.to_owned(),
        timestamp: time(now),
        data: serde_json::json!({
            "webhook_id": webhook.to_string(),
            "project_id": project,
            "message": "a test delivery from drover",
        }),
    };
    serde_json::to_string(&payload).unwrap_or_default()
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

fn webhook_id(raw: &str) -> Result<WebhookId, ApiError> {
    raw.parse().map_err(|_| not_found(raw))
}

fn not_found(raw: &str) -> ApiError {
    ApiError::new(ErrorCode::WebhookNotFound, format!("no webhook {raw}"))
}

fn delivery_id(raw: &str) -> Result<DeliveryId, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(ErrorCode::WebhookDeliveryNotFound, format!("no delivery {raw}"))
    })
}

/// The caller's project's endpoint, or a 404.
async fn find(state: &AppState, caller: &Caller, raw: &str) -> Result<Webhook, ApiError> {
    let id = webhook_id(raw)?;
    state.webhooks().get_webhook(&caller.project, id).await?.ok_or_else(|| not_found(raw))
}

/// Checks a creation's fields, reporting every invalid one.
fn validate(
    body: CreateWebhookBody,
) -> Result<(String, String, Vec<String>, Option<String>), ApiError> {
    let mut errors = Vec::new();
    let url = body.url.unwrap_or_default();
    let origin =
        parse_webhook_url(url.trim()).map_err(|err| errors.push(FieldError::from(err))).ok();
    let kinds = body.kinds.unwrap_or_default();
    let kinds = EventFilter::parse_kinds(kinds.iter().map(String::as_str))
        .map_err(|err| errors.push(FieldError::from(err)))
        .ok();
    let description = body.description.map(|d| d.trim().to_owned()).filter(|d| !d.is_empty());
    if let Some(description) = &description {
        if description.chars().count() > MAX_WEBHOOK_DESCRIPTION_LEN {
            errors.push(FieldError {
                field: "description".to_owned(),
                message: format!("must be at most {MAX_WEBHOOK_DESCRIPTION_LEN} characters"),
            });
        } else if description.chars().any(char::is_control) {
            errors.push(FieldError {
                field: "description".to_owned(),
                message: "must not contain control characters".to_owned(),
            });
        }
    }
    match (origin, kinds) {
        (Some(origin), Some(kinds)) if errors.is_empty() => {
            Ok((url.trim().to_owned(), origin, kinds, description))
        }
        _ => Err(ApiError::validation(errors)),
    }
}

/// Refuses a URL this server does not send to (`webhook_target_not_allowed`, field
/// `url`): one leading to this machine or a private network, beyond local mode.
async fn check_target(state: &AppState, raw: &str) -> Result<(), ApiError> {
    let field = |message: String| FieldError { field: "url".to_owned(), message };
    let url = url::Url::parse(raw)
        .map_err(|err| ApiError::validation(vec![field(format!("is not a valid URL: {err}"))]))?;
    if state.webhook_targets().private_allowed() {
        return Ok(());
    }
    crate::webhook_targets::check_url(&url).await.map_err(|refused| {
        ApiError::new(ErrorCode::WebhookTargetNotAllowed, refused.to_string())
            .with_errors(vec![field(refused.to_string())])
    })
}

/// Create a webhook endpoint. The answer holds its signing secret, shown this once.
#[utoipa::path(
    post, path = "/api/v1/webhooks", tag = "webhooks",
    params(InProject),
    request_body = CreateWebhookBody,
    responses(
        (status = 201, description = "Created; `secret` is never shown again", body = CreatedWebhookView),
        (status = 409, description = "The project has as many webhooks as allowed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid URL, kind or description (`validation_failed`), or a URL leading to this machine or a private network (`webhook_target_not_allowed`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateWebhookBody>,
) -> Result<(StatusCode, Json<CreatedWebhookView>), ApiError> {
    let (url, origin, kinds, description) = validate(body)?;
    check_target(&state, &url).await?;
    let vault = state.engine().vault().ok_or_else(|| {
        ApiError::new(ErrorCode::ServiceUnavailable, "this server keeps no secrets (no master key)")
    })?;
    let id = WebhookId::new();
    let secret = SigningSecret::generate();
    let sealed = vault
        .seal_webhook_secret(&caller.project, id, secret.expose())
        .map_err(|err| ApiError::new(ErrorCode::Internal, err.to_string()))?;
    let new = NewWebhook {
        id,
        project_id: caller.project.clone(),
        url,
        origin,
        kinds,
        description,
        secret: sealed,
    };
    let webhook = state.webhooks().create_webhook(new, &caller.user, now()).await?;
    tracing::info!(project = %caller.project, webhook = %webhook.id, "webhook created");
    let view = CreatedWebhookView {
        secret: secret.expose().to_owned(),
        webhook: WebhookView::from(&webhook),
    };
    Ok((StatusCode::CREATED, Json(view)))
}

/// The caller's project's webhook endpoints, oldest first.
#[utoipa::path(
    get, path = "/api/v1/webhooks", tag = "webhooks",
    params(InProject),
    responses((status = 200, body = WebhookList))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<WebhookList>, ApiError> {
    let webhooks = state.webhooks().list_webhooks(&caller.project).await?;
    Ok(Json(WebhookList { items: webhooks.iter().map(WebhookView::from).collect() }))
}

/// One webhook endpoint.
#[utoipa::path(
    get, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), InProject),
    responses(
        (status = 200, body = WebhookView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(WebhookView::from(&find(&state, &caller, &id).await?)))
}

/// Delete a webhook endpoint and its delivery log; nothing more is sent to it.
#[utoipa::path(
    delete, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), InProject),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let parsed = webhook_id(&id)?;
    if !state.webhooks().delete_webhook(&caller.project, parsed, &caller.user, now()).await? {
        return Err(not_found(&id));
    }
    tracing::info!(project = %caller.project, webhook = %parsed, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Enable a webhook endpoint (after it was disabled): its failure count and circuit
/// breaker start over. Deliveries given up when it was disabled are not resent; redeliver
/// those wanted.
#[utoipa::path(
    post, path = "/api/v1/webhooks/{id}/enable", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), InProject),
    responses(
        (status = 200, body = WebhookView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<WebhookView>, ApiError> {
    let parsed = webhook_id(&id)?;
    let webhook =
        state.webhooks().enable_webhook(&caller.project, parsed, &caller.user, now()).await?;
    tracing::info!(project = %caller.project, webhook = %parsed, "webhook enabled");
    Ok(Json(WebhookView::from(&webhook)))
}

/// Send the endpoint a `webhook.test` delivery now (retried like any other). Follow it
/// with `GET …/deliveries/{delivery}`.
#[utoipa::path(
    post, path = "/api/v1/webhooks/{id}/test", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), InProject),
    responses(
        (status = 202, description = "Queued", body = WebhookDeliveryView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The endpoint is disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn test(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<WebhookDeliveryView>), ApiError> {
    let parsed = webhook_id(&id)?;
    let now = now();
    let new = NewDelivery {
        webhook_id: parsed,
        project_id: caller.project.clone(),
        event_seq: None,
        kind: WEBHOOK_TEST_KIND.to_owned(),
        body: test_body(parsed, caller.project.as_str(), now),
    };
    let delivery = state.webhooks().enqueue_delivery(&caller.project, new, now).await?;
    Ok((StatusCode::ACCEPTED, Json(WebhookDeliveryView::from(&delivery))))
}

/// The endpoint's deliveries, newest first.
#[utoipa::path(
    get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), DeliveriesQuery, InProject),
    responses(
        (status = 200, body = WebhookDeliveryPage),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Result<Json<WebhookDeliveryPage>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<DeliveryId>()
                .map_err(|_| ApiError::new(ErrorCode::InvalidQuery, "cursor is not a valid cursor"))
        })
        .transpose()?;
    let webhook = find(&state, &caller, &id).await?;
    let mut items = state
        .webhooks()
        .list_deliveries(&caller.project, webhook.id, &DeliveryQuery { before, limit: limit + 1 })
        .await?;
    let next_cursor = (items.len() > limit as usize).then(|| {
        items.truncate(limit as usize);
        items.last().map(|d| d.id.to_string())
    });
    Ok(Json(WebhookDeliveryPage {
        items: items.iter().map(WebhookDeliveryView::from).collect(),
        next_cursor: next_cursor.flatten(),
    }))
}

/// One delivery of the endpoint.
#[utoipa::path(
    get, path = "/api/v1/webhooks/{id}/deliveries/{delivery}", tag = "webhooks",
    params(
        ("id" = String, Path, description = "Webhook id"),
        ("delivery" = String, Path, description = "Delivery id"),
        InProject,
    ),
    responses(
        (status = 200, body = WebhookDeliveryView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delivery(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, delivery)): ApiPath<(String, String)>,
) -> Result<Json<WebhookDeliveryView>, ApiError> {
    let webhook = webhook_id(&id)?;
    let parsed = delivery_id(&delivery)?;
    let found = state.webhooks().get_delivery(&caller.project, webhook, parsed).await?;
    found.map(|found| Json(WebhookDeliveryView::from(&found))).ok_or_else(|| {
        ApiError::new(
            ErrorCode::WebhookDeliveryNotFound,
            format!("webhook {id} has no delivery {delivery}"),
        )
    })
}

/// Send a delivery again, now, with the same `webhook-id` (retried like a new one).
#[utoipa::path(
    post, path = "/api/v1/webhooks/{id}/deliveries/{delivery}/redeliver", tag = "webhooks",
    params(
        ("id" = String, Path, description = "Webhook id"),
        ("delivery" = String, Path, description = "Delivery id"),
        InProject,
    ),
    responses(
        (status = 202, description = "Queued", body = WebhookDeliveryView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The endpoint is disabled", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, delivery)): ApiPath<(String, String)>,
) -> Result<(StatusCode, Json<WebhookDeliveryView>), ApiError> {
    let webhook = webhook_id(&id)?;
    let parsed = delivery_id(&delivery)?;
    let again = state.webhooks().redeliver(&caller.project, webhook, parsed, now()).await?;
    tracing::info!(project = %caller.project, %webhook, delivery = %parsed, "webhook delivery sent again");
    Ok((StatusCode::ACCEPTED, Json(WebhookDeliveryView::from(&again))))
}

#[cfg(test)]
mod tests {
    use drover_domain::{EventKind, EventSeq, ProjectId, RunId, RunStatus};

    use super::*;

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let body = CreateWebhookBody {
            url: Some("ftp://x".into()),
            kinds: Some(vec!["run.exploded".into()]),
            description: Some("x".repeat(300)),
        };
        let err = validate(body).unwrap_err();
        let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["url", "kinds", "description"]);
        let missing = validate(CreateWebhookBody { url: None, kinds: None, description: None });
        assert_eq!(missing.unwrap_err().errors[0].field, "url");
        let (url, origin, kinds, description) = validate(CreateWebhookBody {
            url: Some(" https://example.com/h?k=1 ".into()),
            kinds: Some(vec!["run.succeeded".into(), "stage".into()]),
            description: Some("  ".into()),
        })
        .unwrap();
        assert_eq!(
            (url.as_str(), origin.as_str()),
            ("https://example.com/h?k=1", "https://example.com")
        );
        assert_eq!(kinds, ["run.succeeded", "stage."]);
        assert_eq!(description, None);
    }

    #[test]
    fn a_delivery_body_is_the_event_under_type_timestamp_and_data() {
        let event = Event {
            seq: EventSeq(42),
            project_id: ProjectId::default_project(),
            run_id: Some(RunId::new()),
            attempt_id: None,
            environment_id: None,
            kind: EventKind::Run(RunStatus::Succeeded),
            payload: serde_json::json!({ "request": "x" }),
            correlation_id: None,
            created_at: Timestamp::from_millis(1_700_000_000_000),
        };
        let body: serde_json::Value = serde_json::from_str(&event_body(&event)).unwrap();
        assert_eq!(body["type"], "run.succeeded");
        assert_eq!(body["timestamp"], "2023-11-14T22:13:20.000Z");
        assert_eq!(body["data"]["seq"], 42);
        assert_eq!(body["data"]["payload"]["request"], "x");
        assert!(body["data"]["environment_id"].is_null());
        let test: serde_json::Value =
            serde_json::from_str(&test_body(WebhookId::new(), "default", event.created_at))
                .unwrap();
        assert_eq!(test["type"], "webhook.test");
    }
}
