//! The webhook delivery loop (a full server only): committed events become deliveries to
//! the project's enabled endpoints whose kind filter matches, and due deliveries are sent.
//!
//! - **Fan-out.** The loop follows the store's committed-event feed. At start it resumes
//!   from the newest event, so history is not sent again; when the feed lags it catches
//!   up from the store, page by page, up to the newest event it saw, remembering the last
//!   sequence number handled (in memory). An event becomes one delivery per matching
//!   endpoint, with its body fixed once (`{"type", "timestamp", "data"}`).
//! - **Sending.** Every poll, due deliveries are sent, at most `concurrency` at once and a
//!   few per endpoint: `POST` of the body with `webhook-id` (the delivery's id, the same on
//!   every attempt), `webhook-timestamp` and `webhook-signature` (Standard Webhooks,
//!   HMAC-SHA256 with the endpoint's secret, stored sealed and opened by the vault for each
//!   attempt), within the request timeout, redirects not followed. A 2xx answer succeeds;
//!   anything else is retried with exponential backoff and jitter until `give_up_after`
//!   has passed (`dead`).
//! - **Targets.** Beyond local mode, unless `allow_private_targets`, nothing is sent to
//!   this machine or a private network (`drover_api::webhook_targets`): an address in the
//!   URL is checked before connecting, and a name is resolved by [`GuardedResolver`], which
//!   refuses it if any address it resolves to is private, so the address connected to is
//!   one that was checked (DNS rebinding). No HTTP proxy is used: it would resolve and
//!   connect where the checks cannot see. A refusal is the attempt's error.
//! - **Failing endpoints.** Failed attempts in a row open the endpoint's circuit breaker
//!   (nothing is sent for `breaker_open_for`, then one delivery goes through) and, at
//!   `disable_after_failures`, disable it: its deliveries are given up and a
//!   `webhook.disabled` event is appended, in the store's transaction.
//!
//! Delivery is at least once: a server stopped mid-attempt sends it again after a
//! restart. Neither a signing secret nor an endpoint's URL (which may hold a token) is
//! ever logged.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_api::webhook_targets::{TargetPolicy, TargetRefused, check_address, check_host};
use drover_auth::webhook::SigningSecret;
use drover_config::WebhooksConfig;
use drover_domain::{
    Breaker, DeliveryId, Event, EventFilter, EventSeq, ProjectId, RetrySchedule, Timestamp,
    WebhookId,
};
use drover_secrets::Vault;
use drover_store::{
    AttemptRecorded, AttemptResult, DueDelivery, EventQuery, FailurePolicy, NewDelivery, Store,
    StoreError, Webhook, WebhookStore,
};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Events fanned out per store write.
const EVENT_BATCH: usize = 128;
/// Events read per page when catching up.
const CATCH_UP_PAGE: u32 = 100;
/// Attempts in flight to one endpoint at once.
const PER_ENDPOINT: usize = 4;
/// Longest error text kept for a failed attempt.
const MAX_ERROR_LEN: usize = 300;

/// How the loop sends and retries.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) schedule: RetrySchedule,
    pub(crate) policy: FailurePolicy,
    pub(crate) request_timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) concurrency: usize,
}

impl From<&WebhooksConfig> for Settings {
    fn from(config: &WebhooksConfig) -> Self {
        Self {
            schedule: RetrySchedule {
                initial: config.retry_initial,
                max: config.retry_max,
                give_up_after: config.give_up_after,
            },
            policy: FailurePolicy {
                breaker_after: config.breaker_after_failures,
                breaker_open_for: config.breaker_open_for,
                disable_after: config.disable_after_failures,
            },
            request_timeout: config.request_timeout,
            poll_interval: config.poll_interval,
            concurrency: usize::try_from(config.concurrency).unwrap_or(1).max(1),
        }
    }
}

/// How attempts are made: the vault that opens signing secrets and the rule on targets.
#[derive(Clone)]
pub(crate) struct Sending {
    /// `None`: nothing can be signed (a server always has one).
    pub(crate) vault: Option<Arc<Vault>>,
    pub(crate) targets: TargetPolicy,
}

/// Starts the loop over the server's store and the cluster's live feed, as `[webhooks]` says.
pub(crate) fn start(
    store: &drover_store::AnyStore,
    vault: Option<Arc<Vault>>,
    feed: broadcast::Receiver<Event>,
    leader: tokio::sync::watch::Receiver<bool>,
    config: &WebhooksConfig,
    targets: TargetPolicy,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let settings = Settings::from(config);
    let sending = Sending { vault, targets };
    spawn(Arc::new(store.clone()), Arc::new(store.clone()), feed, leader, settings, sending, stop)
}

/// Starts the loop; it ends when `stop` fires (attempts in flight are abandoned, and sent
/// again after a restart).
pub(crate) fn spawn(
    events: Arc<dyn Store>,
    webhooks: Arc<dyn WebhookStore>,
    feed: broadcast::Receiver<Event>,
    leader: tokio::sync::watch::Receiver<bool>,
    settings: Settings,
    sending: Sending,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let clients = match Clients::new(settings.request_timeout) {
            Ok(clients) => clients,
            Err(err) => {
                tracing::error!(error = %err, "cannot build the webhook HTTP client; webhooks are not delivered");
                return;
            }
        };
        let deliverer = Deliverer {
            leader,
            events,
            webhooks,
            settings,
            sending,
            clients,
            last_seq: EventSeq(0),
            behind: false,
            more_due: false,
            in_flight: HashMap::new(),
            tasks: HashMap::new(),
        };
        deliverer.run(feed, stop).await;
    })
}

/// The HTTP clients attempts go through: `guarded` connects only to public addresses (for
/// while private targets are not allowed), `open` anywhere. Two clients, so that a
/// connection kept alive from while private targets were allowed (local mode, before the
/// first user) is never reused once they are not.
#[derive(Clone)]
struct Clients {
    guarded: reqwest::Client,
    open: reqwest::Client,
}

impl Clients {
    fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self { guarded: http_client(timeout, true)?, open: http_client(timeout, false)? })
    }

    fn pick(&self, guarded: bool) -> &reqwest::Client {
        if guarded { &self.guarded } else { &self.open }
    }
}

fn http_client(timeout: Duration, guarded: bool) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { guarded }))
        .user_agent(concat!("drover-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Resolves endpoint names as the system does; when `guarded`, refuses a name any of whose
/// addresses is private: the client connects only to addresses checked here, however the
/// name resolves next time.
struct GuardedResolver {
    guarded: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guarded = self.guarded;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if guarded {
                for address in &addresses {
                    check_address(&host, address.ip())?;
                }
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// What one attempt found.
struct Sent {
    delivery: DeliveryId,
    attempts: u32,
    window_start: Timestamp,
    status_code: Option<u16>,
    error: Option<String>,
    latency: Duration,
}

impl Sent {
    fn succeeded(&self) -> bool {
        self.status_code.is_some_and(|code| (200..300).contains(&code))
    }
}

struct Deliverer {
    /// Whether this server holds the leader lease: every server makes deliveries (one per
    /// endpoint and event, whoever inserts first), only the leader sends them.
    leader: tokio::sync::watch::Receiver<bool>,
    events: Arc<dyn Store>,
    webhooks: Arc<dyn WebhookStore>,
    settings: Settings,
    sending: Sending,
    clients: Clients,
    /// The last event fanned out (or skipped).
    last_seq: EventSeq,
    /// A fan-out failed: catch up from the store at the next poll.
    behind: bool,
    /// The last look for due deliveries found as many as it could take.
    more_due: bool,
    /// Deliveries being sent, with their endpoint.
    in_flight: HashMap<DeliveryId, WebhookId>,
    /// The task sending each of them.
    tasks: HashMap<tokio::task::Id, DeliveryId>,
}

impl Deliverer {
    async fn run(mut self, mut feed: broadcast::Receiver<Event>, stop: CancellationToken) {
        // The feed is subscribed to first, so nothing committed after this point is missed.
        loop {
            match self.webhooks.newest_event_seq().await {
                Ok(seq) => {
                    self.last_seq = seq;
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "webhooks: cannot read the newest event; trying again");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(self.settings.poll_interval) => {}
                    }
                }
            }
        }
        let mut sending = JoinSet::new();
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(joined) = sending.join_next_with_id(), if !sending.is_empty() => {
                    self.finish(joined).await;
                    if self.more_due {
                        self.send_due(&mut sending).await;
                    }
                }
                _ = tick.tick() => {
                    if self.behind {
                        self.catch_up().await;
                    }
                    self.send_due(&mut sending).await;
                }
                received = feed.recv() => match received {
                    Ok(event) => {
                        let mut batch = vec![event];
                        let mut lagged = false;
                        while batch.len() < EVENT_BATCH {
                            match feed.try_recv() {
                                Ok(event) => batch.push(event),
                                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                    lagged = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let queued = self.fan_out(batch).await;
                        if lagged {
                            self.catch_up().await;
                        }
                        if queued {
                            self.send_due(&mut sending).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "webhooks fell behind the event feed; catching up from the store");
                        self.catch_up().await;
                        self.send_due(&mut sending).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        // Attempts in flight are dropped: their deliveries stay due and go out again.
        sending.shutdown().await;
    }

    /// Makes the deliveries of live events past the last one handled. Whether any was made.
    async fn fan_out(&mut self, batch: Vec<Event>) -> bool {
        let events: Vec<Event> = batch.into_iter().filter(|e| e.seq > self.last_seq).collect();
        let Some(newest) = events.iter().map(|e| e.seq).max() else { return false };
        if self.behind {
            // The store has them; the catch-up at the next poll will make them.
            return false;
        }
        let made = async {
            let webhooks = self.webhooks.enabled_webhooks().await?;
            let deliveries = deliveries_for(&webhooks, &events);
            let made = !deliveries.is_empty();
            self.enqueue(deliveries).await?;
            Ok::<_, StoreError>(made)
        };
        match made.await {
            Ok(made) => {
                self.last_seq = newest;
                made
            }
            Err(err) => {
                tracing::warn!(error = %err, "webhooks: cannot queue deliveries; catching up from the store");
                self.behind = true;
                false
            }
        }
    }

    async fn enqueue(&self, deliveries: Vec<NewDelivery>) -> Result<(), StoreError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let count = deliveries.len() as u64;
        self.webhooks.enqueue_deliveries(deliveries, now()).await?;
        metrics::counter!("drover_webhooks_deliveries_total").increment(count);
        Ok(())
    }

    /// Fans out, from the store, the events of projects with endpoints committed after the
    /// last one handled and up to the newest one now, then goes on from there.
    async fn catch_up(&mut self) {
        let caught_up = async {
            let target = self.webhooks.newest_event_seq().await?;
            let webhooks = self.webhooks.enabled_webhooks().await?;
            let projects: BTreeSet<&ProjectId> = webhooks.iter().map(|w| &w.project_id).collect();
            for project in projects {
                let mut after = self.last_seq;
                while after < target {
                    let query = EventQuery {
                        after: Some(after),
                        limit: CATCH_UP_PAGE,
                        ..EventQuery::default()
                    };
                    let page = self.events.list_events(project, &query).await?;
                    let full = page.len() == CATCH_UP_PAGE as usize;
                    let Some(last) = page.last().map(|e| e.seq) else { break };
                    let events: Vec<Event> =
                        page.into_iter().filter(|event| event.seq <= target).collect();
                    self.enqueue(deliveries_for(&webhooks, &events)).await?;
                    after = last;
                    if !full {
                        break;
                    }
                }
            }
            Ok::<_, StoreError>(target)
        };
        match caught_up.await {
            Ok(target) => {
                self.last_seq = self.last_seq.max(target);
                self.behind = false;
            }
            Err(err) => {
                tracing::warn!(error = %err, "webhooks: cannot catch up from the store; trying again");
                self.behind = true;
            }
        }
    }

    /// Starts sending the due deliveries there is room for.
    async fn send_due(&mut self, sending: &mut JoinSet<Sent>) {
        if !*self.leader.borrow() {
            return;
        }
        let room = self.settings.concurrency.saturating_sub(self.in_flight.len());
        if room == 0 {
            self.more_due = true;
            return;
        }
        let now = now();
        let limit = u32::try_from(room + self.in_flight.len()).unwrap_or(u32::MAX);
        let due = match self.webhooks.due_deliveries(now, limit).await {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(error = %err, "webhooks: cannot read due deliveries");
                return;
            }
        };
        self.more_due = due.len() >= limit as usize;
        let mut per_endpoint: HashMap<WebhookId, usize> = HashMap::new();
        for webhook in self.in_flight.values() {
            *per_endpoint.entry(*webhook).or_default() += 1;
        }
        for due in due {
            if self.in_flight.len() >= self.settings.concurrency {
                self.more_due = true;
                break;
            }
            let delivery = &due.delivery;
            if self.in_flight.contains_key(&delivery.id) {
                continue;
            }
            let busy = per_endpoint.entry(delivery.webhook_id).or_default();
            let breaker = Breaker::state(
                due.consecutive_failures,
                self.settings.policy.breaker_after,
                due.breaker_open_until,
                now,
            );
            let allowed = match breaker {
                Breaker::Closed => *busy < PER_ENDPOINT,
                // One delivery probes the endpoint; the rest wait for its answer.
                Breaker::HalfOpen => *busy == 0,
                Breaker::Open { .. } => false,
            };
            if !allowed {
                continue;
            }
            *busy = if breaker == Breaker::HalfOpen { PER_ENDPOINT } else { *busy + 1 };
            self.in_flight.insert(delivery.id, delivery.webhook_id);
            let id = delivery.id;
            let task = sending.spawn(attempt(self.clients.clone(), self.sending.clone(), due));
            self.tasks.insert(task.id(), id);
        }
    }

    /// Records an attempt's result and what follows from it.
    async fn finish(&mut self, joined: Result<(tokio::task::Id, Sent), tokio::task::JoinError>) {
        let (task, sent) = match joined {
            Ok(done) => done,
            Err(err) => {
                // The delivery stays due; it is sent again at the next poll.
                if let Some(delivery) = self.tasks.remove(&err.id()) {
                    self.in_flight.remove(&delivery);
                }
                tracing::error!(error = %err, "a webhook attempt failed to finish");
                return;
            }
        };
        self.tasks.remove(&task);
        let webhook = self.in_flight.remove(&sent.delivery);
        let now = now();
        let succeeded = sent.succeeded();
        let retry_at = (!succeeded)
            .then(|| {
                self.settings.schedule.next_attempt(
                    sent.attempts.saturating_add(1),
                    now,
                    sent.window_start,
                    rand::random::<f64>(),
                )
            })
            .flatten();
        let outcome = if succeeded { "succeeded" } else { "failed" };
        metrics::counter!("drover_webhooks_attempts_total", "outcome" => outcome).increment(1);
        metrics::histogram!("drover_webhooks_attempt_duration_seconds")
            .record(sent.latency.as_secs_f64());
        let result = AttemptResult {
            delivery: sent.delivery,
            succeeded,
            status_code: sent.status_code,
            error: sent.error,
            latency_ms: u64::try_from(sent.latency.as_millis()).unwrap_or(u64::MAX),
            retry_at,
        };
        match self.webhooks.record_attempt(&result, &self.settings.policy, now).await {
            Ok(AttemptRecorded::Applied { status, disabled }) => {
                tracing::debug!(
                    delivery = %sent.delivery,
                    status = %status,
                    code = ?result.status_code,
                    "webhook attempt recorded"
                );
                if disabled {
                    metrics::counter!("drover_webhooks_disabled_total").increment(1);
                    tracing::warn!(
                        webhook = ?webhook,
                        "webhook disabled after too many failed attempts in a row"
                    );
                }
            }
            Ok(AttemptRecorded::Stale) => {}
            Err(err) => {
                tracing::warn!(error = %err, delivery = %sent.delivery, "cannot record a webhook attempt");
            }
        }
    }
}

/// One delivery per event and enabled endpoint of its project that wants its kind and
/// existed when it happened.
fn deliveries_for(webhooks: &[Webhook], events: &[Event]) -> Vec<NewDelivery> {
    let filters: Vec<(&Webhook, EventFilter)> = webhooks
        .iter()
        .map(|webhook| (webhook, EventFilter::of_kinds(webhook.kinds.clone())))
        .collect();
    let mut deliveries = Vec::new();
    for event in events {
        let mut body = None;
        for (webhook, filter) in &filters {
            if webhook.project_id != event.project_id
                || event.created_at < webhook.created_at
                || !filter.matches(event)
            {
                continue;
            }
            let body = body.get_or_insert_with(|| drover_api::webhooks::event_body(event));
            deliveries.push(NewDelivery {
                webhook_id: webhook.id,
                project_id: event.project_id.clone(),
                event_seq: Some(event.seq),
                kind: event.kind.to_string(),
                body: body.clone(),
            });
        }
    }
    deliveries
}

/// The endpoint's signing secret, opened, or why it cannot be.
fn signing_secret(sending: &Sending, due: &DueDelivery) -> Result<SigningSecret, String> {
    let delivery = &due.delivery;
    let sealed = due.secret.as_ref().ok_or_else(|| {
        "the endpoint's signing secret is not sealed yet (a server seals it at start)".to_owned()
    })?;
    let vault = sending.vault.as_ref().ok_or_else(|| "this server keeps no secrets".to_owned())?;
    let opened = vault
        .open_webhook_secret(&delivery.project_id, delivery.webhook_id, sealed)
        .map_err(|err| format!("the endpoint's signing secret does not open: {err}"))?;
    SigningSecret::parse(&opened)
        .map_err(|err| format!("the endpoint's signing secret is unusable: {err}"))
}

/// Refuses a URL whose host is an address (or a name of this machine) this server does not
/// send to; names are checked as they resolve ([`GuardedResolver`]).
fn check_target(url: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(url).map_err(|err| format!("invalid URL: {err}"))?;
    check_host(&url).map(drop).map_err(|refused| format!("refused: {refused}"))
}

/// Sends one delivery, signed; reports the answer's status or why there was none.
async fn attempt(clients: Clients, sending: Sending, due: DueDelivery) -> Sent {
    let secret = signing_secret(&sending, &due);
    // Decided once per attempt: the address check and the client's resolver agree.
    let guarded = !sending.targets.private_allowed();
    let target = if guarded { check_target(&due.url) } else { Ok(()) };
    let client = clients.pick(guarded);
    let delivery = due.delivery;
    let mut sent = Sent {
        delivery: delivery.id,
        attempts: delivery.attempts,
        window_start: delivery.window_start,
        status_code: None,
        error: None,
        latency: Duration::ZERO,
    };
    let secret = match secret.and_then(|secret| target.map(|()| secret)) {
        Ok(secret) => secret,
        Err(error) => {
            sent.error = Some(error);
            return sent;
        }
    };
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let id = delivery.id.to_string();
    let signature = secret.sign(&id, timestamp, delivery.body.as_bytes());
    let started = Instant::now();
    let response = client
        .post(&due.url)
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(delivery.body)
        .send()
        .await;
    sent.latency = started.elapsed();
    match response {
        Ok(response) => {
            let status = response.status();
            sent.status_code = Some(status.as_u16());
            if !status.is_success() {
                sent.error = Some(format!("answered {status}"));
            }
        }
        Err(err) => sent.error = Some(describe(&err.without_url())),
    }
    sent
}

/// Why a request got no answer, with its causes, without the URL.
fn describe(err: &reqwest::Error) -> String {
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_builder() {
        "invalid request"
    } else {
        "request failed"
    };
    let mut text = what.to_owned();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<TargetRefused>() {
            // The resolver refused the name: that is the whole story.
            return format!("refused: {refused}");
        }
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use drover_domain::{EventKind, RunStatus, StageStatus};

    use super::*;

    fn webhook(project: &str, kinds: &[&str], created_at: i64) -> Webhook {
        Webhook {
            id: WebhookId::new(),
            project_id: ProjectId::parse(project).unwrap(),
            url: "http://127.0.0.1:1/".to_owned(),
            kinds: EventFilter::parse_kinds(kinds.iter().copied()).unwrap(),
            description: None,
            enabled: true,
            disabled_reason: None,
            consecutive_failures: 0,
            breaker_open_until: None,
            created_by: "alice".to_owned(),
            created_at: Timestamp::from_millis(created_at),
            updated_at: Timestamp::from_millis(created_at),
        }
    }

    fn event(seq: i64, project: &str, kind: EventKind) -> Event {
        Event {
            seq: EventSeq(seq),
            project_id: ProjectId::parse(project).unwrap(),
            run_id: None,
            attempt_id: None,
            environment_id: None,
            kind,
            payload: serde_json::json!({}),
            correlation_id: None,
            created_at: Timestamp::from_millis(1000),
        }
    }

    #[test]
    fn events_go_to_the_endpoints_of_their_project_that_want_them() {
        let all = webhook("default", &[], 0);
        let succeeded = webhook("default", &["run.succeeded"], 0);
        let other = webhook("other", &[], 0);
        let newer = webhook("default", &[], 2000);
        let webhooks = [all.clone(), succeeded.clone(), other, newer];
        let events = [
            event(1, "default", EventKind::Run(RunStatus::Succeeded)),
            event(2, "default", EventKind::Stage(StageStatus::Running)),
        ];
        let made = deliveries_for(&webhooks, &events);
        let pairs: Vec<(WebhookId, i64)> =
            made.iter().map(|d| (d.webhook_id, d.event_seq.unwrap().0)).collect();
        assert_eq!(pairs, [(all.id, 1), (succeeded.id, 1), (all.id, 2)]);
        assert_eq!(made[0].body, made[1].body, "one body per event");
        assert_eq!(made[2].kind, "stage.running");
    }

    async fn open_store(dir: &std::path::Path) -> drover_store::SqliteStore {
        drover_store::SqliteStore::open(&drover_store::SqliteStoreOptions {
            url: format!("sqlite://{}", dir.join("drover.db").display()),
            read_connections: 2,
            busy_timeout: Duration::from_secs(5),
        })
        .await
        .unwrap()
    }

    async fn queue_run(store: &drover_store::SqliteStore, project: &ProjectId) {
        let new = drover_store::NewRun {
            id: None,
            project_id: project.clone(),
            pipeline: drover_domain::sdlc(),
            request: drover_domain::RunRequest::parse("catch me up").unwrap(),
            correlation_id: drover_domain::CorrelationId::new(),
            environment_id: None,
            workspace: None,
            variables: Default::default(),
            budget: None,
            submitted_by: None,
        };
        store.create_run(new, now()).await.unwrap();
    }

    /// What the feed lost is made from the store, once, up to the newest event; events of
    /// projects without endpoints and events already handled are not.
    #[tokio::test]
    async fn a_lagging_loop_catches_up_from_the_store_without_duplicates() {
        use drover_store::{DeliveryQuery, IdentityStore, NewWebhook};

        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let project = ProjectId::default_project();
        let other = ProjectId::parse("other").unwrap();
        store.create_project(&other, "Other", "root", now()).await.unwrap();
        queue_run(&store, &project).await;
        let before = store.newest_event_seq().await.unwrap();
        let new = NewWebhook {
            id: WebhookId::new(),
            project_id: project.clone(),
            url: "http://127.0.0.1:1/".to_owned(),
            origin: "http://127.0.0.1:1".to_owned(),
            kinds: EventFilter::parse_kinds(["run"]).unwrap(),
            description: None,
            secret: drover_store::SealedValue {
                key_id: "k".to_owned(),
                nonce: vec![0; 24],
                ciphertext: vec![1; 32],
            },
        };
        let webhook = store.create_webhook(new, "alice", now()).await.unwrap();
        queue_run(&store, &project).await;
        queue_run(&store, &other).await;
        queue_run(&store, &project).await;

        let mut deliverer = Deliverer {
            leader: tokio::sync::watch::channel(true).1,
            events: Arc::new(store.clone()),
            webhooks: Arc::new(store.clone()),
            settings: Settings::from(&WebhooksConfig::default()),
            sending: Sending { vault: None, targets: TargetPolicy::fixed(true) },
            clients: Clients::new(Duration::from_secs(1)).unwrap(),
            last_seq: before,
            behind: true,
            more_due: false,
            in_flight: HashMap::new(),
            tasks: HashMap::new(),
        };
        deliverer.catch_up().await;
        assert!(!deliverer.behind);
        assert_eq!(deliverer.last_seq, store.newest_event_seq().await.unwrap());
        let query = DeliveryQuery { before: None, limit: 100 };
        let made = store.list_deliveries(&project, webhook.id, &query).await.unwrap();
        assert_eq!(made.len(), 2, "run.queued of the two later runs of its project: {made:?}");
        assert!(made.iter().all(|d| d.kind == "run.queued" && d.event_seq > Some(before)));

        // Live events it already handled are skipped; a new one is fanned out.
        let replayed = store
            .list_events(
                &project,
                &EventQuery { after: Some(before), limit: 100, ..EventQuery::default() },
            )
            .await
            .unwrap();
        assert!(!deliverer.fan_out(replayed).await);
        queue_run(&store, &project).await;
        let newest = store.newest_event_seq().await.unwrap();
        let fresh = store
            .list_events(
                &project,
                &EventQuery {
                    after: Some(deliverer.last_seq),
                    limit: 100,
                    ..EventQuery::default()
                },
            )
            .await
            .unwrap();
        assert!(deliverer.fan_out(fresh).await);
        assert_eq!(deliverer.last_seq, newest);
        let made = store.list_deliveries(&project, webhook.id, &query).await.unwrap();
        assert_eq!(made.len(), 3);
        store.close().await;
    }

    #[test]
    fn settings_follow_the_configuration() {
        let settings = Settings::from(&WebhooksConfig::default());
        assert_eq!(settings.policy.disable_after, 20);
        assert_eq!(settings.schedule.give_up_after, Duration::from_secs(24 * 3600));
        assert_eq!(settings.request_timeout, Duration::from_secs(10));
    }
}
