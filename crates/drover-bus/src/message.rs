//! What travels on the bus: task envelopes to workers, worker messages back, control
//! broadcasts. All of it is plain serde data, the same on every backend.

use std::collections::BTreeMap;

use drover_domain::{
    AgentType, AttemptId, CorrelationId, FencingToken, PipelineName, ProjectId, RunId, StageName,
    StagePolicy, Timestamp, WorkerId, WorkerProfile,
};
use serde::{Deserialize, Serialize};

/// One stage attempt handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEnvelope {
    /// The attempt id; unique per task.
    pub task_id: AttemptId,
    pub project_id: ProjectId,
    pub run_id: RunId,
    pub pipeline: PipelineName,
    pub stage: StageName,
    pub agent: AgentType,
    pub attempt: u32,
    pub fencing_token: FencingToken,
    /// The user's request and any stage-specific input.
    pub payload: serde_json::Value,
    pub context: WorkflowContext,
    /// When the stage times out, if it has started before.
    pub deadline: Option<Timestamp>,
    pub correlation_id: CorrelationId,
    /// W3C `traceparent` of the span that dispatched the task.
    pub traceparent: Option<String>,
}

/// What a stage needs to know about the run it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkflowContext {
    /// The run's workspace directory.
    pub workspace: String,
    /// Where the attempt's output log is written.
    pub log_path: String,
    /// Outputs of the stages that already succeeded, by stage name.
    pub outputs: BTreeMap<String, serde_json::Value>,
    /// The variables of the run's environment (ports, service addresses): what the
    /// processes an agent starts for the run should see.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
    /// What the stage's agent may do (commands, protected paths); checked by the worker.
    #[serde(default, skip_serializing_if = "StagePolicy::is_unrestricted")]
    pub policy: StagePolicy,
    /// Files the stage declares as its outputs (workspace-relative paths or globs),
    /// copied into the attempt's artifacts by the worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_files: Vec<String>,
    /// The stage writes the project (`contract` in its spec): the agent's prompt carries
    /// the project contract.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub project_contract: bool,
    /// The names of the project's secrets, never their values: the broker carries this
    /// envelope in clear. The worker fetches the values when it runs the attempt (from the
    /// vault in a server, over the authenticated API in `drover worker`), hands them to the
    /// agent's processes and redacts them from everything the attempt leaves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_names: Vec<String>,
}

/// How an agent's work ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AgentResult {
    Succeeded { output: serde_json::Value },
    Failed { error: String, retryable: bool },
}

/// A worker's message to the engine about an attempt it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Started {
        attempt_id: AttemptId,
        token: FencingToken,
        worker_id: WorkerId,
    },
    Heartbeat {
        attempt_id: AttemptId,
        token: FencingToken,
        worker_id: WorkerId,
    },
    Finished {
        attempt_id: AttemptId,
        token: FencingToken,
        worker_id: WorkerId,
        result: AgentResult,
    },
    /// The worker is stopping and gives the attempt back unfinished.
    Released {
        attempt_id: AttemptId,
        token: FencingToken,
        worker_id: WorkerId,
    },
    /// The worker is alive and serves these agent types (sent on start and every
    /// heartbeat interval; also how a worker registers).
    Alive {
        worker_id: WorkerId,
        profile: WorkerProfile,
    },
    /// The worker is stopping for good.
    Gone {
        worker_id: WorkerId,
    },
}

impl WorkerMessage {
    /// The attempt the message is about, if it is about one.
    pub fn attempt_id(&self) -> Option<AttemptId> {
        match self {
            Self::Started { attempt_id, .. }
            | Self::Heartbeat { attempt_id, .. }
            | Self::Finished { attempt_id, .. }
            | Self::Released { attempt_id, .. } => Some(*attempt_id),
            Self::Alive { .. } | Self::Gone { .. } => None,
        }
    }
}

/// A broadcast from the engine to all workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Stop the attempt now (run cancelled, stage timed out, lease lost): kill its
    /// process group and report nothing.
    Cancel { attempt_id: AttemptId, reason: String },
}

/// What servers tell each other on the live channel (publish/subscribe, nothing kept):
/// the events each commits, and who watches what through it, so every replica serves the
/// same live streams and presence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveMessage {
    /// An event `origin` committed.
    Event { origin: String, event: drover_domain::Event },
    /// Everything watched through `origin` now; it replaces the previous snapshot of
    /// `origin` and is sent again every few seconds (a silent server's is dropped).
    Presence { origin: String, watching: Vec<Watching> },
}

impl LiveMessage {
    /// The server that sent it.
    pub fn origin(&self) -> &str {
        match self {
            Self::Event { origin, .. } | Self::Presence { origin, .. } => origin,
        }
    }
}

/// One user watching one subject (`run:<id>`, `environment:<id>`) of a project.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Watching {
    pub project: ProjectId,
    pub subject: String,
    pub user: String,
}

#[cfg(test)]
mod live_tests {
    use super::*;

    #[test]
    fn live_messages_round_trip_through_json() {
        let message = LiveMessage::Presence {
            origin: "a".to_owned(),
            watching: vec![Watching {
                project: ProjectId::default_project(),
                subject: "run:1".to_owned(),
                user: "alice".to_owned(),
            }],
        };
        let text = serde_json::to_string(&message).unwrap();
        assert_eq!(serde_json::from_str::<LiveMessage>(&text).unwrap(), message, "{text}");
    }
}
