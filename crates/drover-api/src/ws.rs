//! `GET /api/v1/ws`: live events over one WebSocket, with presence.
//!
//! The caller is authenticated at the upgrade (the same credential and project as any
//! request). Messages are JSON text frames:
//!
//! - client → server: `{"type":"subscribe","id":"s1","run":"…","environment":"…",
//!   "kinds":["stage"],"after":123}` (every field but `type` and `id` optional) and
//!   `{"type":"unsubscribe","id":"s1"}`;
//! - server → client: `{"type":"subscribed","id":"s1"}`, `{"type":"event","subscription":
//!   "s1","event":{…}}` (replayed from `after`, then live, in sequence order, no gap and no
//!   duplicate), `{"type":"presence","run"|"environment":"…","user":"…","action":"joined"|
//!   "left"}` to subscribers of that run or environment, `{"type":"error","message":"…"}`.
//!
//! A subscription to one run or environment is *watching* it: `GET /runs/{id}/presence`
//! lists who watches. The server pings every 15 s and closes a connection that has not
//! answered for 45 s. Each connection has a bounded outbound queue: a client that does not
//! read fast enough is closed with code 4008 ("too slow") instead of growing memory. At
//! most [`MAX_SUBSCRIPTIONS`] subscriptions per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use drover_domain::{Event, EventSeq, ProjectId};
use drover_store::{EventQuery, Store};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::events::EventFilter;
use crate::extract::ApiPath;
use crate::openapi::InProject;
use crate::wire::EventView;
use crate::{AppState, Caller};

/// Frames queued per connection before the client counts as too slow.
const OUTBOUND: usize = 512;
/// How long a frame may wait for room in the queue before the client counts as too slow.
const SLOW_AFTER: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(15);
const DEAD_AFTER: Duration = Duration::from_secs(45);
/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// Events replayed per database read.
const REPLAY_PAGE: u32 = 500;
/// Close code for a client dropped for not keeping up.
const TOO_SLOW: u16 = 4008;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Subscribe {
        id: String,
        run: Option<String>,
        environment: Option<String>,
        #[serde(default)]
        kinds: Vec<String>,
        after: Option<i64>,
    },
    Unsubscribe {
        id: String,
    },
}

/// Who watches a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PresenceView {
    /// `run:<id>` or `environment:<id>`.
    pub subject: String,
    pub users: Vec<String>,
}

/// Live events over a WebSocket, with presence (see the module documentation for the
/// message protocol).
#[utoipa::path(
    get, path = "/api/v1/ws", tag = "events",
    params(InProject),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    caller: Caller,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|rejection| {
        ApiError::new(drover_domain::ErrorCode::InvalidRequest, rejection.body_text())
    })?;
    Ok(ws.max_message_size(64 * 1024).on_upgrade(move |socket| serve(state, caller, socket)))
}

/// Who watches a run right now (over WebSocket subscriptions to it).
#[utoipa::path(
    get, path = "/api/v1/runs/{id}/presence", tag = "events",
    params(("id" = String, Path, description = "Run id"), InProject),
    responses(
        (status = 200, body = PresenceView),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn run_presence(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<PresenceView>, ApiError> {
    let run = crate::runs::find_run(&state, &caller.project, &id).await?;
    let subject = format!("run:{}", run.id);
    let users = state.inner.presence.watchers(&caller.project, &subject);
    Ok(Json(PresenceView { subject, users }))
}

type Outbound = mpsc::Sender<Message>;

/// Queues a frame; `false` when the client is gone or too slow (then the connection ends).
async fn push(out: &Outbound, slow: &CancellationToken, frame: Value) -> bool {
    let message = Message::Text(frame.to_string().into());
    match out.send_timeout(message, SLOW_AFTER).await {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            slow.cancel();
            false
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
    }
}

struct Subscription {
    stop: CancellationToken,
    /// What it watches, for presence.
    watches: Option<String>,
}

async fn serve(state: AppState, caller: Caller, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut queue) = mpsc::channel::<Message>(OUTBOUND);
    let done = CancellationToken::new();
    let slow = CancellationToken::new();
    let pong = Arc::new(Mutex::new(tokio::time::Instant::now()));

    // The writer: queued frames, pings, and the close frame.
    let writer = {
        let (done, slow, pong) = (done.clone(), slow.clone(), pong.clone());
        tokio::spawn(async move {
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.tick().await;
            let close = loop {
                tokio::select! {
                    () = done.cancelled() => break None,
                    () = slow.cancelled() => break Some(CloseFrame {
                        code: TOO_SLOW,
                        reason: "too slow: the client did not keep up with its events".into(),
                    }),
                    _ = ping.tick() => {
                        let silent = pong.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                        if silent > DEAD_AFTER {
                            break Some(CloseFrame { code: 1001, reason: "no answer to pings".into() });
                        }
                        if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                            break None;
                        }
                    }
                    frame = queue.recv() => match frame {
                        Some(frame) => if sink.send(frame).await.is_err() { break None },
                        None => break None,
                    },
                }
            };
            if let Some(close) = close {
                let _ = sink.send(Message::Close(Some(close))).await;
            }
            let _ = sink.close().await;
            done.cancel();
        })
    };

    let mut subscriptions: HashMap<String, Subscription> = HashMap::new();
    loop {
        let message = tokio::select! {
            () = done.cancelled() => break,
            message = stream.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Pong(_) | Message::Ping(_))) => {
                *pong.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
                continue;
            }
            Some(Ok(Message::Binary(_))) => {
                let _ = push(
                    &out,
                    &slow,
                    json!({ "type": "error", "message": "send JSON text frames" }),
                )
                .await;
                continue;
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
        };
        *pong.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Subscribe { id, run, environment, kinds, after }) => {
                let refusal = if subscriptions.contains_key(&id) {
                    Some(format!("subscription `{id}` exists; unsubscribe first"))
                } else if subscriptions.len() >= MAX_SUBSCRIPTIONS {
                    Some(format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"))
                } else if id.is_empty() || id.len() > 64 {
                    Some("a subscription id has 1-64 characters".to_owned())
                } else {
                    None
                };
                if let Some(message) = refusal {
                    let _ =
                        push(&out, &slow, json!({ "type": "error", "id": id, "message": message }))
                            .await;
                    continue;
                }
                let kinds = kinds.join(",");
                let filter = match EventFilter::parse(
                    run.as_deref(),
                    environment.as_deref(),
                    Some(&kinds),
                ) {
                    Ok(filter) => filter,
                    Err(err) => {
                        let _ = push(
                            &out,
                            &slow,
                            json!({ "type": "error", "id": id, "message": err.detail }),
                        )
                        .await;
                        continue;
                    }
                };
                // A run or environment of another project does not exist for the caller.
                if let Some(run) = filter.run
                    && !matches!(
                        state.engine().store().get_run(&caller.project, run).await,
                        Ok(Some(_))
                    )
                {
                    let message = format!("no run with id {run}");
                    let _ =
                        push(&out, &slow, json!({ "type": "error", "id": id, "message": message }))
                            .await;
                    continue;
                }
                let watches = filter
                    .run
                    .map(|run| format!("run:{run}"))
                    .or_else(|| filter.environment.map(|env| format!("environment:{env}")));
                let stop = done.child_token();
                if let Some(subject) = &watches {
                    state.inner.presence.join(&caller.project, subject, &caller.user);
                }
                if !push(&out, &slow, json!({ "type": "subscribed", "id": id })).await {
                    break;
                }
                tokio::spawn(feed(
                    state.clone(),
                    caller.project.clone(),
                    id.clone(),
                    filter,
                    watches.clone(),
                    after.map(EventSeq),
                    out.clone(),
                    slow.clone(),
                    stop.clone(),
                ));
                subscriptions.insert(id, Subscription { stop, watches });
            }
            Ok(ClientMessage::Unsubscribe { id }) => match subscriptions.remove(&id) {
                Some(subscription) => {
                    subscription.stop.cancel();
                    if let Some(subject) = &subscription.watches {
                        state.inner.presence.leave(&caller.project, subject, &caller.user);
                    }
                    let _ = push(&out, &slow, json!({ "type": "unsubscribed", "id": id })).await;
                }
                None => {
                    let message = format!("no subscription `{id}`");
                    let _ =
                        push(&out, &slow, json!({ "type": "error", "id": id, "message": message }))
                            .await;
                }
            },
            Err(err) => {
                let message = format!("not a message this server understands: {err}");
                let _ = push(&out, &slow, json!({ "type": "error", "message": message })).await;
            }
        }
    }
    done.cancel();
    for subscription in subscriptions.into_values() {
        subscription.stop.cancel();
        if let Some(subject) = &subscription.watches {
            state.inner.presence.leave(&caller.project, subject, &caller.user);
        }
    }
    let _ = writer.await;
}

/// One subscription: replay from `after`, then live events and presence changes of what it
/// watches, until it is stopped or the client is gone.
#[allow(clippy::too_many_arguments)]
async fn feed(
    state: AppState,
    project: ProjectId,
    id: String,
    filter: EventFilter,
    watches: Option<String>,
    after: Option<EventSeq>,
    out: Outbound,
    slow: CancellationToken,
    stop: CancellationToken,
) {
    let store = state.engine().store().clone();
    let mut live = state.live_events();
    let mut presence = state.inner.presence.subscribe();
    let mut last = match after {
        Some(after) => after,
        // Without `after`, only what happens from now on (the live feed is subscribed
        // already, so nothing between this read and the first receive is missed).
        None => store.latest_event_seq(&project).await.unwrap_or(EventSeq(0)),
    };
    let deliver = Deliver { id: &id, filter: &filter, out: &out, slow: &slow };
    if !replay(store.as_ref(), &project, &mut last, &deliver).await {
        return;
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            received = live.recv() => match received {
                Ok(event) if event.project_id == project && event.seq > last => {
                    if !deliver.send(&event, &mut last).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !replay(store.as_ref(), &project, &mut last, &deliver).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            change = presence.recv() => match change {
                Ok(change) if change.project == project && Some(&change.subject) == watches.as_ref() => {
                    let (kind, subject) = change.subject.split_once(':').unwrap_or(("run", ""));
                    let frame = json!({
                        "type": "presence", "subscription": id, kind: subject,
                        "user": change.user, "action": if change.joined { "joined" } else { "left" },
                    });
                    if !push(&out, &slow, frame).await {
                        return;
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Where one subscription's events go.
struct Deliver<'a> {
    id: &'a str,
    filter: &'a EventFilter,
    out: &'a Outbound,
    slow: &'a CancellationToken,
}

impl Deliver<'_> {
    /// Sends `event` if it matches; `false` once the client is gone or too slow.
    async fn send(&self, event: &Event, last: &mut EventSeq) -> bool {
        *last = event.seq;
        if !self.filter.matches(event) {
            return true;
        }
        let frame =
            json!({ "type": "event", "subscription": self.id, "event": EventView::from(event) });
        push(self.out, self.slow, frame).await
    }
}

async fn replay(
    store: &dyn Store,
    project: &ProjectId,
    last: &mut EventSeq,
    deliver: &Deliver<'_>,
) -> bool {
    loop {
        let query = EventQuery {
            run_id: deliver.filter.run,
            environment_id: deliver.filter.environment,
            after: Some(*last),
            limit: REPLAY_PAGE,
        };
        let Ok(page) = store.list_events(project, &query).await else { return false };
        for event in &page {
            if !deliver.send(event, last).await {
                return false;
            }
        }
        if page.len() < REPLAY_PAGE as usize {
            return true;
        }
    }
}
