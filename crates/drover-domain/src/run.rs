//! A run: one request pushed through one pipeline, and the state machine it obeys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    CorrelationId, PipelineName, ProjectId, RunId, Timestamp, TransitionError, ValidationError,
};

/// Where a run is in its life. Terminal statuses never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    WaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        Self::Queued,
        Self::Running,
        Self::WaitingApproval,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::WaitingApproval => "waiting_approval",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Whether the state machine allows going from `self` to `to`.
    pub fn can_become(self, to: RunStatus) -> bool {
        use RunStatus::*;
        matches!(
            (self, to),
            (Queued, Running | WaitingApproval | Failed | Cancelled)
                | (Running, WaitingApproval | Succeeded | Failed | Cancelled)
                | (WaitingApproval, Running | Failed | Cancelled)
        )
    }

    /// Reopening a failed run to run a dead-lettered stage again (redrive). This is the
    /// only way out of a terminal status, and only from `failed`.
    pub fn redrive(self) -> Result<RunStatus, TransitionError> {
        match self {
            Self::Failed => Ok(Self::Running),
            other => Err(TransitionError { entity: "run", from: other.as_str(), to: "running" }),
        }
    }

    /// The checked transition: `to` if allowed, a [`TransitionError`] otherwise.
    pub fn become_(self, to: RunStatus) -> Result<RunStatus, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError { entity: "run", from: self.as_str(), to: to.as_str() })
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| {
            ValidationError::new(
                "status",
                format!(
                    "`{s}` is not a run status; expected one of {}",
                    Self::ALL.map(Self::as_str).join(", ")
                ),
            )
        })
    }
}

/// What the user asked for, in their words: trimmed, non-empty, bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunRequest(String);

impl RunRequest {
    pub const MAX_CHARS: usize = 4_000;

    pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ValidationError::new("request", "must not be empty"));
        }
        let chars = trimmed.chars().count();
        if chars > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "request",
                format!("must be at most {} characters, got {chars}", Self::MAX_CHARS),
            ));
        }
        if trimmed.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(ValidationError::new("request", "must not contain control characters"));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunRequest {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<RunRequest> for String {
    fn from(value: RunRequest) -> String {
        value.0
    }
}

impl fmt::Display for RunRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: RunId,
    pub project_id: ProjectId,
    pub pipeline: PipelineName,
    pub request: RunRequest,
    pub status: RunStatus,
    pub correlation_id: CorrelationId,
    /// Why the run failed or was cancelled.
    pub error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// The environment it runs in, if it was given one.
    #[serde(default)]
    pub environment_id: Option<crate::EnvironmentId>,
    /// Where its agents work, when not the default per-run workspace.
    #[serde(default)]
    pub workspace: Option<String>,
    /// Its environment's variables (ports, service addresses), given to its agents.
    #[serde(default)]
    pub variables: std::collections::BTreeMap<String, String>,
    /// What its stages may spend together; past it the run stops.
    #[serde(default)]
    pub budget: Option<crate::Budget>,
    /// The pipeline as it was when the run was submitted; a configuration reload changes
    /// new runs only. `None` for runs stored before snapshots existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<crate::PipelineSpec>,
    /// Who submitted it (`local` in local mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_statuses_have_no_way_out() {
        for from in RunStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in RunStatus::ALL {
                assert!(!from.can_become(to), "{from} -> {to} must be illegal");
            }
        }
    }

    #[test]
    fn an_illegal_transition_is_a_typed_error_naming_both_ends() {
        let err = RunStatus::Succeeded.become_(RunStatus::Running).unwrap_err();
        assert_eq!(err.to_string(), "run cannot go from `succeeded` to `running`");
    }

    #[test]
    fn only_a_failed_run_can_be_redriven() {
        assert_eq!(RunStatus::Failed.redrive(), Ok(RunStatus::Running));
        for status in [RunStatus::Succeeded, RunStatus::Cancelled, RunStatus::Running] {
            assert!(status.redrive().is_err(), "{status}");
        }
    }

    #[test]
    fn a_run_can_only_start_from_queued_or_resume_from_approval() {
        assert!(RunStatus::Queued.can_become(RunStatus::Running));
        assert!(RunStatus::WaitingApproval.can_become(RunStatus::Running));
        assert!(!RunStatus::Queued.can_become(RunStatus::Succeeded));
    }

    #[test]
    fn statuses_parse_from_their_wire_names() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), status);
        }
        assert!("done".parse::<RunStatus>().unwrap_err().message.contains("expected one of"));
    }

    #[test]
    fn a_request_is_trimmed_and_must_not_be_blank() {
        assert_eq!(RunRequest::parse("  Hello World API \n").unwrap().as_str(), "Hello World API");
        let err = RunRequest::parse("   ").unwrap_err();
        assert_eq!((err.field.as_str(), err.message.as_str()), ("request", "must not be empty"));
    }

    #[test]
    fn a_request_rejects_control_characters_and_excess_length() {
        assert!(RunRequest::parse("bell\u{7}").is_err());
        assert!(RunRequest::parse("x".repeat(RunRequest::MAX_CHARS + 1)).is_err());
        assert!(RunRequest::parse("x".repeat(RunRequest::MAX_CHARS)).is_ok());
    }
}
