//! The cluster's live feed. Every server tells the others, on the bus's live channel, the
//! events it commits and who watches what through it. This loop merges the events this
//! server commits with those the others announce into one feed in sequence order, with no
//! gap and no duplicate, which every live stream (SSE, WebSocket, run events), the webhook
//! deliverer and the environments' activity clocks follow:
//!
//! - an event at or below the last one sent was seen (the bus echoes, or the store's own
//!   feed came late): dropped;
//! - an event further ahead than the next number means some were missed (a lost pub/sub
//!   message, a lagging feed, or a number never committed): the store is read for the
//!   events in between first. The store hands out numbers in commit order (SQLite's one
//!   writer; PostgreSQL's advisory lock), so once an event is seen every smaller number is
//!   either committed or never will be.
//!
//! Presence goes the same way: this server's watches are sent whenever they change and
//! every few seconds; another server's snapshot replaces its last one, and a server silent
//! for [`PRESENCE_TTL`] is taken to watch nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_api::presence::Presence;
use drover_bus::{Bus, LiveMessage};
use drover_domain::{Event, EventSeq};
use drover_store::Store;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Events held for slow followers of the merged feed (they catch up from the store).
pub(crate) const FEED_CAPACITY: usize = 4096;
/// Events read from the store at once to fill a gap.
const FILL_PAGE: u32 = 500;
/// How often a server's watches are sent even when unchanged.
const PRESENCE_EVERY: Duration = Duration::from_secs(5);
/// How long another server's watches count without news from it.
pub(crate) const PRESENCE_TTL: Duration = Duration::from_secs(15);
/// Wait before subscribing again to a live channel that failed.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// What the loops need.
pub(crate) struct Live {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) presence: Arc<Presence>,
    /// The merged feed.
    pub(crate) feed: broadcast::Sender<Event>,
    /// This server, on the live channel.
    pub(crate) origin: String,
}

/// Starts the loops; they end when `stop` fires.
pub(crate) fn spawn(live: Live, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let live = Arc::new(live);
    // Subscribed now, so nothing committed from here on is missing from the merged feed.
    let local = live.store.subscribe();
    let mut tasks = vec![tokio::spawn(merge(live.clone(), local, stop.clone()))];
    // On the embedded bus there is no other server to tell.
    if live.bus.kind() != "embedded" {
        tasks.push(tokio::spawn(announce_events(live.clone(), stop.clone())));
        tasks.push(tokio::spawn(announce_presence(live, stop)));
    }
    tasks
}

/// Tells the others every event this server commits.
async fn announce_events(live: Arc<Live>, stop: CancellationToken) {
    let mut committed = live.store.subscribe();
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = committed.recv() => event,
        };
        match event {
            Ok(event) => {
                let message = LiveMessage::Event { origin: live.origin.clone(), event };
                if let Err(err) = live.bus.publish_live(&message).await {
                    tracing::debug!(error = %err, "event not announced to the other servers");
                }
            }
            // The others fill the gap from the store when they see the next event.
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                tracing::debug!(
                    skipped,
                    "events not announced; the others read them from the store"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Tells the others this server's watches: at once on a change, and every few seconds.
async fn announce_presence(live: Arc<Live>, stop: CancellationToken) {
    let mut changes = live.presence.local_changes();
    let mut every = tokio::time::interval(PRESENCE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = every.tick() => live.presence.expire(Instant::now(), PRESENCE_TTL),
        }
        let message = LiveMessage::Presence {
            origin: live.origin.clone(),
            watching: live.presence.local_watching(),
        };
        if let Err(err) = live.bus.publish_live(&message).await {
            tracing::debug!(error = %err, "presence not announced to the other servers");
        }
    }
    // Leaving: the others forget this server's watches at once.
    let message = LiveMessage::Presence { origin: live.origin.clone(), watching: Vec::new() };
    let _ = live.bus.publish_live(&message).await;
}

/// The merged feed: this server's events and the others', in order (see the module
/// documentation).
async fn merge(live: Arc<Live>, mut local: broadcast::Receiver<Event>, stop: CancellationToken) {
    let mut order = Order { live: live.clone(), last: None };
    let mut remote = None;
    let mut resubscribe_at = Instant::now();
    loop {
        if remote.is_none() && live.bus.kind() != "embedded" && Instant::now() >= resubscribe_at {
            match live.bus.subscribe_live().await {
                Ok(stream) => remote = Some(stream),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot follow the other servers; retrying");
                    resubscribe_at = Instant::now() + RESUBSCRIBE_AFTER;
                }
            }
        }
        let from_others = async {
            match &mut remote {
                Some(stream) => stream.next().await,
                None => {
                    tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                    None
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            event = local.recv() => match event {
                Ok(event) => order.take(event).await,
                Err(broadcast::error::RecvError::Lagged(_)) => order.catch_up().await,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            message = from_others => match message {
                Some(message) if message.origin() == live.origin => {}
                Some(LiveMessage::Event { event, .. }) => order.take(event).await,
                Some(LiveMessage::Presence { origin, watching }) => {
                    live.presence.apply_remote(&origin, watching, Instant::now());
                }
                None if remote.is_some() => {
                    tracing::warn!("the live channel closed; following it again");
                    remote = None;
                    resubscribe_at = Instant::now() + RESUBSCRIBE_AFTER;
                }
                None => {}
            },
        }
    }
}

/// Puts events in sequence order, once each.
struct Order {
    live: Arc<Live>,
    /// The last event sent on the merged feed.
    last: Option<EventSeq>,
}

impl Order {
    async fn take(&mut self, event: Event) {
        match self.last {
            Some(last) if event.seq <= last => return,
            Some(last) if event.seq.0 > last.0 + 1 => self.fill(last, Some(event.seq)).await,
            _ => {}
        }
        self.send(event);
    }

    /// After the local feed lagged: everything committed since the last event sent.
    async fn catch_up(&mut self) {
        if let Some(last) = self.last {
            self.fill(last, None).await;
        }
    }

    /// Sends the stored events after `after` and before `before` (all of them, with
    /// `None`).
    async fn fill(&mut self, after: EventSeq, before: Option<EventSeq>) {
        let mut from = after;
        loop {
            let page = match self.live.store.events_after(from, FILL_PAGE).await {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read missed events; live streams may skip some");
                    return;
                }
            };
            let full = page.len() == FILL_PAGE as usize;
            for event in page {
                if before.is_some_and(|before| event.seq >= before) {
                    return;
                }
                from = event.seq;
                self.send(event);
            }
            if !full {
                return;
            }
        }
    }

    fn send(&mut self, event: Event) {
        self.last = Some(event.seq);
        // Nobody may be following right now.
        let _ = self.live.feed.send(event);
    }
}
