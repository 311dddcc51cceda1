//! Events: the append-only record of every state change, written in the same transaction
//! as the change itself, and the feed for live streams.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    AttemptId, CorrelationId, EnvStatus, EnvironmentId, EventSeq, ProjectId, RunId, RunStatus,
    ServiceStatus, StageStatus, Timestamp, ValidationError,
};

/// What happened. The wire name is `<subject>.<what>`, e.g. `run.succeeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Run(RunStatus),
    Stage(StageStatus),
    /// `environment.<status>`
    Env(EnvStatus),
    /// `service.<status>`
    Service(ServiceStatus),
    /// A dead-lettered attempt was sent to run again.
    DlqRedriven,
    /// A dead-lettered attempt was dismissed.
    DlqDiscarded,
    /// A worker registered (or came back).
    WorkerJoined,
    /// A worker stopped heartbeating.
    WorkerLost,
    /// A worker said goodbye.
    WorkerLeft,
    /// A webhook endpoint was disabled after failing too many times in a row.
    WebhookDisabled,
}

/// Every kind that is not a run or stage status, with its wire name.
const OTHER_KINDS: [(EventKind, &str); 6] = [
    (EventKind::DlqRedriven, "dlq.redriven"),
    (EventKind::DlqDiscarded, "dlq.discarded"),
    (EventKind::WorkerJoined, "worker.joined"),
    (EventKind::WorkerLost, "worker.lost"),
    (EventKind::WorkerLeft, "worker.left"),
    (EventKind::WebhookDisabled, "webhook.disabled"),
];

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run(status) => match status {
                RunStatus::Queued => "run.queued",
                RunStatus::Running => "run.running",
                RunStatus::WaitingApproval => "run.waiting_approval",
                RunStatus::Succeeded => "run.succeeded",
                RunStatus::Failed => "run.failed",
                RunStatus::Cancelled => "run.cancelled",
            },
            Self::Stage(status) => match status {
                StageStatus::Pending => "stage.pending",
                StageStatus::Dispatched => "stage.dispatched",
                StageStatus::Running => "stage.running",
                StageStatus::Succeeded => "stage.succeeded",
                StageStatus::Failed => "stage.failed",
                StageStatus::TimedOut => "stage.timed_out",
                StageStatus::Cancelled => "stage.cancelled",
                StageStatus::DeadLettered => "stage.dead_lettered",
                StageStatus::WaitingApproval => "stage.waiting_approval",
                StageStatus::Skipped => "stage.skipped",
            },
            Self::Env(status) => match status {
                EnvStatus::Creating => "environment.creating",
                EnvStatus::Running => "environment.running",
                EnvStatus::Stopping => "environment.stopping",
                EnvStatus::Stopped => "environment.stopped",
                EnvStatus::Error => "environment.error",
                EnvStatus::Deleting => "environment.deleting",
                EnvStatus::Deleted => "environment.deleted",
            },
            Self::Service(status) => match status {
                ServiceStatus::Starting => "service.starting",
                ServiceStatus::Ready => "service.ready",
                ServiceStatus::Unhealthy => "service.unhealthy",
                ServiceStatus::Crashed => "service.crashed",
                ServiceStatus::Backoff => "service.backoff",
                ServiceStatus::Stopped => "service.stopped",
            },
            other => OTHER_KINDS
                .iter()
                .find(|(kind, _)| *kind == other)
                .map_or("unknown", |(_, name)| name),
        }
    }

    /// Every kind's wire name.
    pub fn all_names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        names.extend(RunStatus::ALL.map(|s| Self::Run(s).as_str()));
        names.extend(StageStatus::ALL.map(|s| Self::Stage(s).as_str()));
        names.extend(EnvStatus::ALL.map(|s| Self::Env(s).as_str()));
        names.extend(ServiceStatus::ALL.map(|s| Self::Service(s).as_str()));
        names.extend(OTHER_KINDS.map(|(_, name)| name));
        names
    }

    /// Whether this event ends a run's event stream.
    pub fn is_run_terminal(self) -> bool {
        matches!(self, Self::Run(status) if status.is_terminal())
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || ValidationError::new("kind", format!("`{s}` is not an event kind"));
        if let Some((kind, _)) = OTHER_KINDS.iter().find(|(_, name)| *name == s) {
            return Ok(*kind);
        }
        let (subject, status) = s.split_once('.').ok_or_else(unknown)?;
        match subject {
            "run" => status.parse().map(Self::Run).map_err(|_| unknown()),
            "stage" => status.parse().map(Self::Stage).map_err(|_| unknown()),
            "environment" => status.parse().map(Self::Env).map_err(|_| unknown()),
            "service" => status.parse().map(Self::Service).map_err(|_| unknown()),
            _ => Err(unknown()),
        }
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        value.parse().map_err(serde::de::Error::custom)
    }
}

/// An event about to be appended; the store assigns its sequence number and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub project_id: ProjectId,
    pub run_id: Option<RunId>,
    pub attempt_id: Option<AttemptId>,
    pub environment_id: Option<EnvironmentId>,
    pub kind: EventKind,
    pub payload: serde_json::Value,
    pub correlation_id: Option<CorrelationId>,
}

/// An event as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: EventSeq,
    pub project_id: ProjectId,
    pub run_id: Option<RunId>,
    pub attempt_id: Option<AttemptId>,
    #[serde(default)]
    pub environment_id: Option<EnvironmentId>,
    pub kind: EventKind,
    pub payload: serde_json::Value,
    pub correlation_id: Option<CorrelationId>,
    pub created_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_wire_name() {
        let kinds = RunStatus::ALL
            .into_iter()
            .map(EventKind::Run)
            .chain(StageStatus::ALL.into_iter().map(EventKind::Stage))
            .chain(OTHER_KINDS.iter().map(|(kind, _)| *kind))
            .chain(EnvStatus::ALL.into_iter().map(EventKind::Env))
            .chain(ServiceStatus::ALL.into_iter().map(EventKind::Service));
        for kind in kinds {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        for bad in ["run", "run.exploded", "env.running", ""] {
            assert!(bad.parse::<EventKind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_terminal_run_events_end_a_stream() {
        assert!(EventKind::Run(RunStatus::Failed).is_run_terminal());
        assert!(!EventKind::Run(RunStatus::Running).is_run_terminal());
        assert!(!EventKind::Stage(StageStatus::Succeeded).is_run_terminal());
    }
}
