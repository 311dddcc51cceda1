//! Workers as the engine knows them: who serves which agent types, and whether they are
//! still alive.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{AgentType, Timestamp, ValidationError, WorkerId};

/// Whether a worker is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStatus {
    /// Heartbeating.
    Live,
    /// Silent for longer than its liveness window.
    Lost,
    /// Said goodbye.
    Gone,
}

impl WorkerStatus {
    pub const ALL: [WorkerStatus; 3] = [Self::Live, Self::Lost, Self::Gone];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Lost => "lost",
            Self::Gone => "gone",
        }
    }
}

impl fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkerStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ValidationError::new("status", format!("`{s}` is not a worker status")))
    }
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub agents: Vec<AgentType>,
    pub version: String,
    pub hostname: String,
    pub concurrency: u32,
    /// `embedded` or `external`.
    pub kind: String,
    pub status: WorkerStatus,
    pub registered_at: Timestamp,
    pub last_seen_at: Timestamp,
}

/// What a worker tells the engine about itself when it registers and heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerProfile {
    pub agents: Vec<AgentType>,
    pub version: String,
    pub hostname: String,
    pub concurrency: u32,
    /// `embedded` (inside a server) or `external` (`drover worker`).
    pub kind: String,
}
