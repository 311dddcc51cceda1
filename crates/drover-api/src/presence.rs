//! Who is watching what, across every server of a cluster. A WebSocket subscription to one
//! run or environment is a *watch* ([`Presence::join`]/[`Presence::leave`], counted per
//! user, so two tabs of one person are one watcher). Each server also holds the latest
//! snapshot of every other server's watches (sent on the bus's live channel by the server
//! loop, `drover-server`'s `live.rs`, and dropped when its sender goes quiet), so
//! `GET /runs/{id}/presence` and the joined/left messages are the same whichever replica a
//! client is connected to. A user counts once, however many servers and tabs they watch
//! from: joined when the first of their watches appears anywhere, left when the last goes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_bus::Watching;
use drover_domain::ProjectId;
use tokio::sync::{broadcast, watch};

/// Presence changes buffered for subscribers.
const PRESENCE_FEED: usize = 1024;

/// A change in who watches a subject, anywhere in the cluster.
#[derive(Debug, Clone)]
pub(crate) struct PresenceChange {
    pub(crate) project: ProjectId,
    pub(crate) subject: String,
    pub(crate) user: String,
    pub(crate) joined: bool,
}

#[derive(Default)]
struct Watches {
    /// This server's watches: how many subscriptions of each.
    local: HashMap<Watching, usize>,
    /// Every other server's last snapshot, and when it came.
    remote: HashMap<String, (Instant, HashSet<Watching>)>,
}

impl Watches {
    /// Whether `watch` holds on this server or in a snapshot of a server other than
    /// `except`.
    fn held_elsewhere(&self, watch: &Watching, except: Option<&str>) -> bool {
        self.local.contains_key(watch)
            || self
                .remote
                .iter()
                .any(|(origin, (_, set))| Some(origin.as_str()) != except && set.contains(watch))
    }
}

/// Who watches what; see the module documentation.
pub struct Presence {
    watches: Mutex<Watches>,
    changes: broadcast::Sender<PresenceChange>,
    /// Bumped on every change of this server's watches, for the loop that tells the others.
    version: watch::Sender<u64>,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            watches: Mutex::new(Watches::default()),
            changes: broadcast::channel(PRESENCE_FEED).0,
            version: watch::channel(0).0,
        }
    }
}

impl Presence {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.watches.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tell(&self, watch: &Watching, joined: bool) {
        let _ = self.changes.send(PresenceChange {
            project: watch.project.clone(),
            subject: watch.subject.clone(),
            user: watch.user.clone(),
            joined,
        });
    }

    pub(crate) fn join(&self, project: &ProjectId, subject: &str, user: &str) {
        let watch = Watching {
            project: project.clone(),
            subject: subject.to_owned(),
            user: user.to_owned(),
        };
        let appeared = {
            let mut watches = self.lock();
            let elsewhere = watches.held_elsewhere(&watch, None);
            let count = watches.local.entry(watch.clone()).or_insert(0);
            *count += 1;
            *count == 1 && !elsewhere
        };
        self.version.send_modify(|v| *v += 1);
        if appeared {
            self.tell(&watch, true);
        }
    }

    pub(crate) fn leave(&self, project: &ProjectId, subject: &str, user: &str) {
        let watch = Watching {
            project: project.clone(),
            subject: subject.to_owned(),
            user: user.to_owned(),
        };
        let gone = {
            let mut watches = self.lock();
            let Some(count) = watches.local.get_mut(&watch) else { return };
            *count -= 1;
            if *count > 0 {
                return;
            }
            watches.local.remove(&watch);
            !watches.held_elsewhere(&watch, None)
        };
        self.version.send_modify(|v| *v += 1);
        if gone {
            self.tell(&watch, false);
        }
    }

    /// The users watching `subject` of `project`, on any server, sorted.
    pub(crate) fn watchers(&self, project: &ProjectId, subject: &str) -> Vec<String> {
        let watches = self.lock();
        let of_subject = |w: &&Watching| &w.project == project && w.subject == subject;
        let local = watches.local.keys().filter(of_subject);
        let remote = watches.remote.values().flat_map(|(_, set)| set.iter().filter(of_subject));
        let users: BTreeSet<&str> = local.chain(remote).map(|w| w.user.as_str()).collect();
        users.into_iter().map(str::to_owned).collect()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PresenceChange> {
        self.changes.subscribe()
    }

    /// This server's watches, to tell the others.
    pub fn local_watching(&self) -> Vec<Watching> {
        let mut watching: Vec<Watching> = self.lock().local.keys().cloned().collect();
        watching.sort();
        watching
    }

    /// Changes whenever this server's watches do.
    pub fn local_changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Takes `origin`'s snapshot of its watches in place of its previous one, and tells
    /// this server's subscribers who appeared or went.
    pub fn apply_remote(&self, origin: &str, watching: Vec<Watching>, now: Instant) {
        let (appeared, gone) = {
            let mut watches = self.lock();
            let now_set: HashSet<Watching> = watching.into_iter().collect();
            let before = watches.remote.remove(origin).map(|(_, set)| set).unwrap_or_default();
            let appeared: Vec<Watching> = now_set
                .difference(&before)
                .filter(|w| !watches.held_elsewhere(w, Some(origin)))
                .cloned()
                .collect();
            let gone: Vec<Watching> = before
                .difference(&now_set)
                .filter(|w| !watches.held_elsewhere(w, Some(origin)))
                .cloned()
                .collect();
            if !now_set.is_empty() {
                watches.remote.insert(origin.to_owned(), (now, now_set));
            }
            (appeared, gone)
        };
        appeared.iter().for_each(|w| self.tell(w, true));
        gone.iter().for_each(|w| self.tell(w, false));
    }

    /// Forgets the snapshots of servers silent for longer than `ttl` (stopped, or cut
    /// off), as if they had sent an empty one.
    pub fn expire(&self, now: Instant, ttl: Duration) {
        let silent: Vec<String> = self
            .lock()
            .remote
            .iter()
            .filter(|(_, (seen, _))| now.duration_since(*seen) > ttl)
            .map(|(origin, _)| origin.clone())
            .collect();
        for origin in silent {
            self.apply_remote(&origin, Vec::new(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(user: &str) -> Watching {
        Watching {
            project: ProjectId::default_project(),
            subject: "run:1".to_owned(),
            user: user.to_owned(),
        }
    }

    fn drain(feed: &mut broadcast::Receiver<PresenceChange>) -> Vec<(String, bool)> {
        std::iter::from_fn(|| feed.try_recv().ok()).map(|c| (c.user, c.joined)).collect()
    }

    #[test]
    fn a_user_counts_once_across_tabs_and_servers() {
        let presence = Presence::default();
        let project = ProjectId::default_project();
        let mut feed = presence.subscribe();
        let t0 = Instant::now();

        presence.join(&project, "run:1", "alice");
        presence.join(&project, "run:1", "alice");
        assert_eq!(drain(&mut feed), [("alice".to_owned(), true)], "two tabs, one join");

        // Bob watches through another server; Alice too.
        presence.apply_remote("b", vec![watch("bob"), watch("alice")], t0);
        assert_eq!(drain(&mut feed), [("bob".to_owned(), true)]);
        assert_eq!(presence.watchers(&project, "run:1"), ["alice", "bob"]);

        // Alice leaves here but still watches there: no change.
        presence.leave(&project, "run:1", "alice");
        presence.leave(&project, "run:1", "alice");
        assert!(drain(&mut feed).is_empty());
        assert_eq!(presence.local_watching(), Vec::<Watching>::new());

        // Server b goes quiet: both are gone.
        presence.expire(t0 + Duration::from_secs(60), Duration::from_secs(15));
        let mut left = drain(&mut feed);
        left.sort();
        assert_eq!(left, [("alice".to_owned(), false), ("bob".to_owned(), false)]);
        assert!(presence.watchers(&project, "run:1").is_empty());
    }

    #[test]
    fn a_fresh_snapshot_replaces_the_last_and_local_changes_are_announced() {
        let presence = Presence::default();
        let project = ProjectId::default_project();
        let versions = presence.local_changes();
        let mut feed = presence.subscribe();
        let t0 = Instant::now();
        presence.apply_remote("b", vec![watch("bob")], t0);
        presence.apply_remote("b", vec![watch("carol")], t0);
        assert_eq!(
            drain(&mut feed),
            [("bob".to_owned(), true), ("carol".to_owned(), true), ("bob".to_owned(), false)]
        );
        presence.expire(t0 + Duration::from_secs(1), Duration::from_secs(15));
        assert_eq!(presence.watchers(&project, "run:1"), ["carol"], "not silent yet");
        assert!(!versions.has_changed().unwrap());
        presence.join(&project, "run:2", "dave");
        assert!(versions.has_changed().unwrap());
    }
}
