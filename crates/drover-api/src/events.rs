//! `GET /api/v1/events`: the project's event log as server-sent events — every state
//! change of runs, stages, environments, services, workers and the dead-letter queue, in
//! global sequence order, filtered by run, environment and kinds. It replays from
//! `Last-Event-ID` (or `?after=`), then follows live, with no gap and no duplicate across
//! the switch: the live feed is subscribed to before the replay starts, and a live event is
//! sent only if its sequence number is past the last one sent. A client that falls behind
//! the live feed is caught up from the store, never from memory.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use drover_domain::{ErrorCode, Event, EventSeq, ProjectId};
use drover_store::{EventQuery, Store};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::ApiQuery;
use crate::openapi::InProject;
use crate::wire::EventView;
use crate::{AppState, Caller};

/// Events replayed per database read.
const REPLAY_PAGE: u32 = 500;
/// Events buffered per client; a slower client holds the replay, not memory.
const BUFFER: usize = 256;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    /// Only this run's events.
    #[param(format = Uuid)]
    run: Option<String>,
    /// Only this environment's events.
    #[param(format = Uuid)]
    environment: Option<String>,
    #[param(schema_with = crate::wire::rules::event_kind_list)]
    kinds: Option<String>,
    /// Replay events after this sequence number (the `Last-Event-ID` header wins).
    after: Option<i64>,
}

/// What a subscriber wants to see: the domain's [`drover_domain::EventFilter`] (shared
/// with webhook endpoints), parsed from a query with field errors.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventFilter(drover_domain::EventFilter);

impl std::ops::Deref for EventFilter {
    type Target = drover_domain::EventFilter;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl EventFilter {
    /// Parses the query's filters; an unknown kind or id is a field error.
    pub(crate) fn parse(
        run: Option<&str>,
        environment: Option<&str>,
        kinds: Option<&str>,
    ) -> Result<Self, ApiError> {
        let field = |name: &str, message: String| {
            ApiError::validation(vec![FieldError { field: name.to_owned(), message }])
        };
        let run = run
            .map(|raw| raw.parse().map_err(|_| field("run", format!("`{raw}` is not a run id"))))
            .transpose()?;
        let environment = environment
            .map(|raw| {
                raw.parse()
                    .map_err(|_| field("environment", format!("`{raw}` is not an environment id")))
            })
            .transpose()?;
        let kinds = drover_domain::EventFilter::parse_kinds(kinds.unwrap_or_default().split(','))
            .map_err(|err| ApiError::validation(vec![FieldError::from(err)]))?;
        Ok(Self(drover_domain::EventFilter { run, environment, kinds }))
    }
}

/// The last event id a client saw: `Last-Event-ID` or `?after=`.
pub(crate) fn resume_point(
    headers: &HeaderMap,
    after: Option<i64>,
) -> Result<Option<EventSeq>, ApiError> {
    match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map(|seq| Some(EventSeq(seq)))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidQuery,
                    "Last-Event-ID must be an event sequence number",
                )
            }),
        None => Ok(after.map(EventSeq)),
    }
}

/// Follow the project's events (SSE), filtered; replays from `Last-Event-ID`, then follows.
#[utoipa::path(
    get, path = "/api/v1/events", tag = "events",
    params(EventsQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event (wins over `after`)"), InProject),
    responses(
        (status = 200, description = "Server-sent events, one per event of the log (`event`: its kind, `id`: its sequence number, `data`: the `EventView` as JSON), replayed then live, until the client leaves", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_query`: `Last-Event-ID` is not a sequence number", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: an unknown kind, too many kinds, or a malformed run or environment id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let filter = EventFilter::parse(
        query.run.as_deref(),
        query.environment.as_deref(),
        query.kinds.as_deref(),
    )?;
    let after = resume_point(&headers, query.after)?;
    let store = state.engine().store().clone();
    // Subscribed before the replay starts, so nothing committed in between is missed.
    let live = state.live_events();
    let (sender, receiver) = mpsc::channel(BUFFER);
    tokio::spawn(feed(store, caller.project, filter, after, live, sender));
    Ok(Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(state.inner.sse_keep_alive)))
}

type Sender = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Replays, then follows until the client leaves or the server stops.
async fn feed(
    store: std::sync::Arc<dyn Store>,
    project: ProjectId,
    filter: EventFilter,
    after: Option<EventSeq>,
    mut live: broadcast::Receiver<Event>,
    sender: Sender,
) {
    let mut last = after.unwrap_or(EventSeq(0));
    if replay(store.as_ref(), &project, &filter, &mut last, &sender).await.is_err() {
        return;
    }
    loop {
        let received = tokio::select! {
            () = sender.closed() => return,
            received = live.recv() => received,
        };
        match received {
            Ok(event) if event.project_id == project && event.seq > last => {
                // Past the last sent, whether shown or not: the next replay starts here.
                let seq = event.seq;
                if filter.matches(&event) && !send(&sender, &event).await {
                    return;
                }
                last = seq;
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                tracing::debug!(skipped, "event stream fell behind; catching up from the store");
                if replay(store.as_ref(), &project, &filter, &mut last, &sender).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn replay(
    store: &dyn Store,
    project: &ProjectId,
    filter: &EventFilter,
    last: &mut EventSeq,
    sender: &Sender,
) -> Result<(), ()> {
    loop {
        let query = EventQuery {
            run_id: filter.run,
            environment_id: filter.environment,
            after: Some(*last),
            limit: REPLAY_PAGE,
        };
        let page = store.list_events(project, &query).await.map_err(|err| {
            tracing::warn!(error = %err, "cannot replay events");
        })?;
        for event in &page {
            *last = event.seq;
            if filter.matches(event) && !send(sender, event).await {
                return Err(());
            }
        }
        if page.len() < REPLAY_PAGE as usize {
            return Ok(());
        }
    }
}

/// Sends one event; `false` once the client is gone.
async fn send(sender: &Sender, event: &Event) -> bool {
    let data = serde_json::to_string(&EventView::from(event)).unwrap_or_default();
    let sse = SseEvent::default().id(event.seq.to_string()).event(event.kind.as_str()).data(data);
    sender.send(Ok(sse)).await.is_ok()
}
