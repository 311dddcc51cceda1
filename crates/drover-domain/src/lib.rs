//! The domain of drover: what a run, a stage attempt, a pipeline and an event *are*, and
//! which changes between them are legal.
//!
//! This crate does no IO (no database, no network, no clock reads, no async runtime), so
//! every rule in it can be tested as a pure function and shared unchanged by the store,
//! the engine, the workers and the API. Illegal state transitions are rejected here with a
//! typed [`TransitionError`]; nothing downstream writes a status without asking.

mod error;
mod event;
mod ids;
mod pipeline;
mod run;
mod stage;
mod time;
mod worker;

pub use error::{ErrorCode, TransitionError, ValidationError};
pub use event::{Event, EventKind, NewEvent};
pub use ids::{
    AgentType, AttemptId, CorrelationId, EventSeq, PipelineName, ProjectId, RunId, StageName,
    WorkerId,
};
pub use pipeline::{
    Backoff, Decision, NextStep, Outcome, PipelineCatalog, PipelineSpec, StageSpec, decide, sdlc,
};
pub use run::{Run, RunRequest, RunStatus};
pub use stage::{FencingToken, StageAttempt, StageStatus};
pub use time::Timestamp;
pub use worker::{Worker, WorkerProfile, WorkerStatus};
