//! Environments: an isolated place for agents to work (a workspace, a block of ports, its
//! services), with the state machine of its life and the desired state the reconciler
//! drives it towards.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{EnvName, EnvironmentId, ProjectId, Timestamp, TransitionError, ValidationError};

/// Where an environment is in its life (observed state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvStatus {
    Creating,
    Running,
    Stopping,
    Stopped,
    Error,
    Deleting,
    Deleted,
}

impl EnvStatus {
    pub const ALL: [EnvStatus; 7] = [
        Self::Creating,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Error,
        Self::Deleting,
        Self::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
        }
    }

    pub fn can_become(self, to: EnvStatus) -> bool {
        use EnvStatus::*;
        matches!(
            (self, to),
            (Creating, Running | Stopped | Error | Deleting)
                | (Running, Stopping | Error | Deleting)
                | (Stopping, Stopped | Error)
                | (Stopped, Running | Error | Deleting)
                | (Error, Running | Stopping | Stopped | Deleting)
                | (Deleting, Deleted | Error)
        )
    }

    pub fn become_(self, to: EnvStatus) -> Result<EnvStatus, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError { entity: "environment", from: self.as_str(), to: to.as_str() })
        }
    }
}

impl fmt::Display for EnvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EnvStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
            ValidationError::new("status", format!("`{s}` is not an environment status"))
        })
    }
}

/// What the user asked an environment to be; the reconciler makes it so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Stopped,
    Deleted,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Deleted => "deleted",
        }
    }

    /// The observed status that satisfies this desire.
    pub fn goal(self) -> EnvStatus {
        match self {
            Self::Running => EnvStatus::Running,
            Self::Stopped => EnvStatus::Stopped,
            Self::Deleted => EnvStatus::Deleted,
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DesiredState {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Running, Self::Stopped, Self::Deleted]
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| ValidationError::new("desired", format!("`{s}` is not a desired state")))
    }
}

/// A block of consecutive ports owned by one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortBlock {
    pub base: u16,
    pub size: u16,
}

impl PortBlock {
    /// The `n`th port of the block, if the block has one.
    pub fn port(self, n: u16) -> Option<u16> {
        (n < self.size).then(|| self.base + n)
    }

    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.base..self.base + self.size
    }

    pub fn overlaps(self, other: PortBlock) -> bool {
        self.base < other.base + other.size && other.base < self.base + self.size
    }
}

/// An environment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub id: EnvironmentId,
    pub project_id: ProjectId,
    pub name: EnvName,
    pub status: EnvStatus,
    pub desired: DesiredState,
    pub workspace: String,
    pub ports: PortBlock,
    /// The repository the workspace is a git worktree of, if any.
    pub repo: Option<String>,
    /// The worktree's branch, if any.
    pub branch: Option<String>,
    /// Why it is in `error`, or the last failure.
    pub error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Last agent work or proxied request; idle auto-stop counts from here.
    pub last_active_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_is_terminal_and_stopping_only_ends_stopped_or_in_error() {
        for to in EnvStatus::ALL {
            assert!(!EnvStatus::Deleted.can_become(to));
        }
        assert!(EnvStatus::Stopping.can_become(EnvStatus::Stopped));
        assert!(!EnvStatus::Stopping.can_become(EnvStatus::Running));
        let err = EnvStatus::Deleted.become_(EnvStatus::Running).unwrap_err();
        assert_eq!(err.to_string(), "environment cannot go from `deleted` to `running`");
    }

    #[test]
    fn a_stopped_environment_can_start_again_and_be_deleted() {
        assert!(EnvStatus::Stopped.can_become(EnvStatus::Running));
        assert!(EnvStatus::Stopped.can_become(EnvStatus::Deleting));
        assert_eq!(DesiredState::Stopped.goal(), EnvStatus::Stopped);
    }

    #[test]
    fn port_blocks_know_their_ports_and_overlaps() {
        let a = PortBlock { base: 20000, size: 10 };
        assert_eq!(a.port(0), Some(20000));
        assert_eq!(a.port(10), None);
        assert_eq!(a.ports().count(), 10);
        assert!(a.overlaps(PortBlock { base: 20009, size: 10 }));
        assert!(!a.overlaps(PortBlock { base: 20010, size: 10 }));
    }
}

/// One audited operation: who did what to which resource, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub project_id: ProjectId,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    pub at: Timestamp,
}
