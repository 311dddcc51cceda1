//! Stage attempts: one try at one stage of a run, the unit the bus carries and a worker
//! leases, with its state machine and its fencing token.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    AgentType, AttemptId, ProjectId, RunId, StageName, Timestamp, TransitionError, ValidationError,
    WorkerId,
};

/// Where a stage attempt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Written to the store (the outbox), not yet handed to the bus.
    Pending,
    /// On the bus, waiting for a worker.
    Dispatched,
    /// Leased by a worker that heartbeats.
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// Failed with every allowed attempt used; kept for redrive.
    DeadLettered,
    /// A gated stage waiting for a person to approve (then `pending`) or reject it.
    WaitingApproval,
    /// Not run: its `when` condition did not hold. Counts as done.
    Skipped,
}

impl StageStatus {
    pub const ALL: [StageStatus; 10] = [
        Self::Pending,
        Self::Dispatched,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::DeadLettered,
        Self::WaitingApproval,
        Self::Skipped,
    ];

    /// Statuses in which an attempt still holds or waits for a worker.
    pub const ACTIVE: [StageStatus; 3] = [Self::Pending, Self::Dispatched, Self::Running];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::DeadLettered => "dead_lettered",
            Self::WaitingApproval => "waiting_approval",
            Self::Skipped => "skipped",
        }
    }

    pub fn is_terminal(self) -> bool {
        !Self::ACTIVE.contains(&self) && self != Self::WaitingApproval
    }

    pub fn can_become(self, to: StageStatus) -> bool {
        use StageStatus::*;
        matches!(
            (self, to),
            (Pending, Dispatched | Running | Cancelled | Skipped)
                | (WaitingApproval, Pending | Failed | Cancelled)
                | (Dispatched, Running | Pending | Cancelled | Failed)
                | (Running, Succeeded | Failed | TimedOut | Cancelled | DeadLettered | Pending)
        )
    }

    pub fn become_(self, to: StageStatus) -> Result<StageStatus, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError { entity: "stage attempt", from: self.as_str(), to: to.as_str() })
        }
    }
}

impl fmt::Display for StageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StageStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ValidationError::new("status", format!("`{s}` is not a stage status")))
    }
}

/// The epoch of an attempt. It starts at 1 and grows each time the attempt is handed out
/// again; a result or heartbeat is applied only if it carries the attempt's current token,
/// so a worker that lost its lease can never overwrite the work of its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(pub i64);

impl FencingToken {
    pub const FIRST: FencingToken = FencingToken(1);

    pub fn next(self) -> FencingToken {
        FencingToken(self.0 + 1)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One attempt at one stage, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageAttempt {
    pub id: AttemptId,
    pub project_id: ProjectId,
    pub run_id: RunId,
    pub stage: StageName,
    /// Position of the stage in its pipeline, from 0.
    pub stage_index: u32,
    pub agent: AgentType,
    /// 1 for the first try, 2 for the first retry, ...
    pub attempt: u32,
    pub fencing_token: FencingToken,
    pub status: StageStatus,
    pub worker_id: Option<WorkerId>,
    /// The bus's id of the message that carries it, while dispatched.
    pub bus_message_id: Option<String>,
    /// Not handed out before this instant (retry backoff).
    pub available_at: Timestamp,
    pub lease_expires_at: Option<Timestamp>,
    /// The stage timeout, fixed when the attempt starts running.
    pub deadline_at: Option<Timestamp>,
    /// What the agent reported on success (files written, URL deployed, ...).
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_attempts_never_change_again() {
        for from in StageStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in StageStatus::ALL {
                assert!(from.become_(to).is_err(), "{from} -> {to} must be illegal");
            }
        }
    }

    #[test]
    fn only_a_running_attempt_can_succeed() {
        assert!(StageStatus::Running.can_become(StageStatus::Succeeded));
        assert!(!StageStatus::Pending.can_become(StageStatus::Succeeded));
        assert!(!StageStatus::Dispatched.can_become(StageStatus::Succeeded));
    }

    #[test]
    fn fencing_tokens_only_grow() {
        assert!(FencingToken::FIRST.next() > FencingToken::FIRST);
    }
}
