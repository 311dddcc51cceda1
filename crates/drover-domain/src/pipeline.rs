//! Pipelines: ordered stages, each run by one agent type, and [`decide`], the pure function
//! that says what happens after an attempt ends (next stage, retry, or the end of the run).
//!
//! The store calls [`decide`] inside the transaction that commits the attempt's result, so
//! the decision and its effects are one atomic step.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{AgentType, PipelineName, RunStatus, StageAttempt, StageName, StageStatus, Timestamp};

/// Exponential backoff with jitter between attempts of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// The wait after attempt number `failed_attempt` (1-based) failed. `jitter` is a
    /// uniform sample from `[0, 1)`; the result lies in `[d/2, d)` for the capped
    /// exponential delay `d` ("equal jitter"), so retries of many runs spread out.
    pub fn delay(&self, failed_attempt: u32, jitter: f64) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(20);
        let base = self.initial.saturating_mul(1 << exponent).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        base.mul_f64(0.5 + jitter / 2.0)
    }
}

/// One stage of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    pub name: StageName,
    /// The agent type whose workers execute this stage.
    pub agent: AgentType,
    /// How many attempts before the stage is dead-lettered; at least 1.
    pub max_attempts: u32,
    /// How long one attempt may run before it is timed out.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub backoff: Backoff,
}

/// A pipeline: stages that run one after another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineSpec {
    pub name: PipelineName,
    pub description: String,
    pub stages: Vec<StageSpec>,
}

impl PipelineSpec {
    pub fn stage(&self, index: u32) -> Option<&StageSpec> {
        self.stages.get(usize::try_from(index).ok()?)
    }
}

/// The built-in pipeline: scaffold → validate → e2e → integration → deploy.
pub fn sdlc() -> PipelineSpec {
    let stage = |name: &str, timeout_secs: u64| StageSpec {
        // The names are literals that satisfy the slug rules.
        name: StageName::parse(name).expect("built-in stage name is a valid slug"),
        agent: AgentType::parse(name).expect("built-in agent type is a valid slug"),
        max_attempts: 3,
        timeout: Duration::from_secs(timeout_secs),
        backoff: Backoff::default(),
    };
    PipelineSpec {
        name: PipelineName::parse("sdlc").expect("built-in pipeline name is a valid slug"),
        description: "scaffold → validate → e2e → integration → deploy".to_owned(),
        stages: vec![
            stage("scaffold", 120),
            stage("validate", 120),
            stage("e2e", 180),
            stage("integration", 300),
            stage("deploy", 180),
        ],
    }
}

/// The pipelines a server knows, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineCatalog {
    pipelines: BTreeMap<String, PipelineSpec>,
}

impl PipelineCatalog {
    /// The pipelines built into drover: `sdlc`.
    pub fn builtin() -> Self {
        Self::from_specs([sdlc()])
    }

    pub fn from_specs(specs: impl IntoIterator<Item = PipelineSpec>) -> Self {
        Self { pipelines: specs.into_iter().map(|spec| (spec.name.to_string(), spec)).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&PipelineSpec> {
        self.pipelines.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pipelines.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &PipelineSpec> {
        self.pipelines.values()
    }
}

/// How an attempt ended, as far as the engine knows.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        output: serde_json::Value,
    },
    /// The agent reported failure. `retryable = false` for deterministic failures (a syntax
    /// error will not fix itself), which fail the run at once.
    Failed {
        error: String,
        retryable: bool,
    },
    /// The stage ran past its timeout.
    TimedOut,
    /// The worker stopped heartbeating (crashed, lost its network, was killed).
    LeaseExpired,
}

/// What comes after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStep {
    /// Start the stage at `index` with its first attempt.
    Stage { index: u32 },
    /// Try the same stage again, not before `available_at`.
    Retry { attempt: u32, available_at: Timestamp },
    /// The run is over.
    FinishRun { status: RunStatus, error: Option<String> },
}

/// The status the ended attempt takes, and what happens next.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub attempt_status: StageStatus,
    pub attempt_error: Option<String>,
    pub next: NextStep,
}

/// Decides the consequences of `outcome` for `attempt` of `pipeline`. Pure: `jitter` (a
/// uniform sample from `[0, 1)`) and `now` come from the caller.
pub fn decide(
    pipeline: &PipelineSpec,
    attempt: &StageAttempt,
    outcome: &Outcome,
    jitter: f64,
    now: Timestamp,
) -> Decision {
    let Some(spec) = pipeline.stage(attempt.stage_index) else {
        return Decision {
            attempt_status: StageStatus::Failed,
            attempt_error: Some("stage no longer exists in the pipeline".to_owned()),
            next: NextStep::FinishRun {
                status: RunStatus::Failed,
                error: Some(format!(
                    "pipeline `{}` has no stage at position {}",
                    pipeline.name, attempt.stage_index
                )),
            },
        };
    };

    let (failed_status, error, retryable) = match outcome {
        Outcome::Succeeded { .. } => {
            let next_index = attempt.stage_index + 1;
            let next = if pipeline.stage(next_index).is_some() {
                NextStep::Stage { index: next_index }
            } else {
                NextStep::FinishRun { status: RunStatus::Succeeded, error: None }
            };
            return Decision { attempt_status: StageStatus::Succeeded, attempt_error: None, next };
        }
        Outcome::Failed { error, retryable } => (StageStatus::Failed, error.clone(), *retryable),
        Outcome::TimedOut => (
            StageStatus::TimedOut,
            format!(
                "timed out after {}",
                humantime_serde::re::humantime::format_duration(spec.timeout)
            ),
            true,
        ),
        Outcome::LeaseExpired => {
            (StageStatus::Failed, "worker stopped heartbeating; lease expired".to_owned(), true)
        }
    };

    if !retryable {
        return Decision {
            attempt_status: failed_status,
            attempt_error: Some(error.clone()),
            next: NextStep::FinishRun {
                status: RunStatus::Failed,
                error: Some(format!("stage `{}` failed: {error}", spec.name)),
            },
        };
    }
    if attempt.attempt >= spec.max_attempts {
        return Decision {
            attempt_status: StageStatus::DeadLettered,
            attempt_error: Some(error.clone()),
            next: NextStep::FinishRun {
                status: RunStatus::Failed,
                error: Some(format!(
                    "stage `{}` failed after {} attempts: {error}",
                    spec.name, attempt.attempt
                )),
            },
        };
    }
    Decision {
        attempt_status: failed_status,
        attempt_error: Some(error),
        next: NextStep::Retry {
            attempt: attempt.attempt + 1,
            available_at: now.plus(spec.backoff.delay(attempt.attempt, jitter)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttemptId, FencingToken, ProjectId, RunId};

    fn attempt_at(stage_index: u32, attempt: u32) -> StageAttempt {
        let pipeline = sdlc();
        let spec = pipeline.stage(stage_index).unwrap();
        StageAttempt {
            id: AttemptId::new(),
            project_id: ProjectId::default_project(),
            run_id: RunId::new(),
            stage: spec.name.clone(),
            stage_index,
            agent: spec.agent.clone(),
            attempt,
            fencing_token: FencingToken::FIRST,
            status: StageStatus::Running,
            worker_id: None,
            bus_message_id: None,
            available_at: Timestamp::from_millis(0),
            lease_expires_at: None,
            deadline_at: None,
            output: None,
            error: None,
            created_at: Timestamp::from_millis(0),
            started_at: None,
            finished_at: None,
        }
    }

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    #[test]
    fn sdlc_has_the_five_seed_stages_in_order() {
        let names: Vec<_> = sdlc().stages.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["scaffold", "validate", "e2e", "integration", "deploy"]);
    }

    #[test]
    fn success_moves_to_the_next_stage() {
        let outcome = Outcome::Succeeded { output: serde_json::json!({}) };
        let decision = decide(&sdlc(), &attempt_at(0, 1), &outcome, 0.5, NOW);
        assert_eq!(decision.attempt_status, StageStatus::Succeeded);
        assert_eq!(decision.next, NextStep::Stage { index: 1 });
    }

    #[test]
    fn success_of_the_last_stage_finishes_the_run() {
        let outcome = Outcome::Succeeded { output: serde_json::json!({}) };
        let decision = decide(&sdlc(), &attempt_at(4, 1), &outcome, 0.5, NOW);
        assert_eq!(
            decision.next,
            NextStep::FinishRun { status: RunStatus::Succeeded, error: None }
        );
    }

    #[test]
    fn a_retryable_failure_retries_after_a_backoff() {
        let outcome = Outcome::Failed { error: "flaky".into(), retryable: true };
        let decision = decide(&sdlc(), &attempt_at(2, 1), &outcome, 0.0, NOW);
        assert_eq!(decision.attempt_status, StageStatus::Failed);
        let NextStep::Retry { attempt, available_at } = decision.next else {
            panic!("expected a retry, got {:?}", decision.next)
        };
        assert_eq!(attempt, 2);
        assert_eq!(available_at, NOW.plus(Duration::from_millis(500)));
    }

    #[test]
    fn a_deterministic_failure_fails_the_run_without_retrying() {
        let outcome =
            Outcome::Failed { error: "app.py:3: invalid syntax".into(), retryable: false };
        let decision = decide(&sdlc(), &attempt_at(1, 1), &outcome, 0.5, NOW);
        assert_eq!(decision.attempt_status, StageStatus::Failed);
        let NextStep::FinishRun { status, error } = decision.next else { panic!() };
        assert_eq!(status, RunStatus::Failed);
        assert!(error.unwrap().contains("invalid syntax"));
    }

    #[test]
    fn the_last_allowed_attempt_is_dead_lettered() {
        let decision = decide(&sdlc(), &attempt_at(3, 3), &Outcome::LeaseExpired, 0.5, NOW);
        assert_eq!(decision.attempt_status, StageStatus::DeadLettered);
        let NextStep::FinishRun { status, error } = decision.next else { panic!() };
        assert_eq!(status, RunStatus::Failed);
        assert!(error.unwrap().contains("after 3 attempts"));
    }

    #[test]
    fn a_timeout_is_recorded_as_timed_out_and_retried() {
        let decision = decide(&sdlc(), &attempt_at(0, 1), &Outcome::TimedOut, 0.5, NOW);
        assert_eq!(decision.attempt_status, StageStatus::TimedOut);
        assert!(matches!(decision.next, NextStep::Retry { attempt: 2, .. }));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_stays_in_the_upper_half() {
        let backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(10) };
        assert_eq!(backoff.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(backoff.delay(30, 0.0), Duration::from_secs(5));
        assert!(backoff.delay(2, 0.999) < Duration::from_secs(2));
    }
}
