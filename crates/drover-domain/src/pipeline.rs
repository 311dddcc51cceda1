//! Pipelines: stages, each run by one agent type, ordered by what they need (a DAG), and
//! [`decide`], the pure function that says what happens after an attempt ends (the stages
//! that became ready, a retry, or the end of the run).
//!
//! The store calls [`decide`] inside the transaction that commits the attempt's result, so
//! the decision and its effects are one atomic step.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::condition::{Condition, StageOutcome};
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
    /// The stages that must have succeeded (or been skipped) before this one starts.
    /// `None`: the stage before it in the list (none for the first); `Some([])`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Vec<StageName>>,
    /// The stage waits for a person's approval before it runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval: bool,
    /// Runs only if this holds on the results of the stages it needs; skipped otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    #[serde(default, skip_serializing_if = "StagePolicy::is_unrestricted")]
    pub policy: StagePolicy,
    /// Files (workspace-relative paths or globs) the stage produces, kept as artifacts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// The stage's agent writes the project the later stages start, test and deploy: its
    /// prompt carries the project contract (where to write it, what `drover.json` says).
    /// The built-in `sdlc` sets it on `scaffold`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contract: bool,
}

impl StageSpec {
    /// A stage with the defaults: three attempts, no gate, no condition, no policy, needing
    /// the stage before it.
    pub fn new(name: StageName, agent: AgentType, timeout: Duration) -> Self {
        Self {
            name,
            agent,
            max_attempts: 3,
            timeout,
            backoff: Backoff::default(),
            needs: None,
            approval: false,
            when: None,
            policy: StagePolicy::default(),
            outputs: Vec::new(),
            contract: false,
        }
    }
}

/// What an agent may do in a stage. A violation fails the stage, naming the rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePolicy {
    /// Programs the stage may run (the command agent's own, and every command an `llm`
    /// agent proposes), by name or path. Empty: a command agent may run its program and an
    /// `llm` agent may run none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_commands: Vec<String>,
    /// Workspace paths (globs: `*`, `**`, `?`) the agent must not create, change or delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected_paths: Vec<String>,
}

impl StagePolicy {
    pub fn is_unrestricted(&self) -> bool {
        self.allowed_commands.is_empty() && self.protected_paths.is_empty()
    }

    /// Whether `program` may run: an allowed entry is a name (`cargo`, found on `PATH`)
    /// or an exact path (`/usr/bin/cargo`), and matches only itself, so an allowed name
    /// never lets another file of that name run from elsewhere.
    pub fn allows_command(&self, program: &str) -> bool {
        self.allowed_commands.iter().any(|allowed| allowed == program)
    }
}

/// A pipeline: stages ordered by what they need; independent stages run in parallel.
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

    pub fn index_of(&self, name: &StageName) -> Option<u32> {
        self.stages.iter().position(|s| &s.name == name).and_then(|i| u32::try_from(i).ok())
    }

    /// The positions of the stages stage `index` needs.
    pub fn needs_of(&self, index: u32) -> Vec<u32> {
        match self.stage(index).and_then(|s| s.needs.as_ref()) {
            Some(names) => names.iter().filter_map(|name| self.index_of(name)).collect(),
            None => index.checked_sub(1).into_iter().collect(),
        }
    }

    /// Checks what the type cannot: unique stage names, known `needs`, no cycle, and
    /// `when` conditions that read a stage this one (transitively) needs. The error names
    /// the stage (`stages[2]`) and the problem.
    pub fn validate(&self) -> Result<(), crate::ValidationError> {
        use crate::ValidationError;
        if self.stages.is_empty() {
            return Err(ValidationError::new("stages", "a pipeline needs at least one stage"));
        }
        let at = |i: usize, key: &str| format!("stages[{i}].{key}");
        for (i, stage) in self.stages.iter().enumerate() {
            if self.stages[..i].iter().any(|s| s.name == stage.name) {
                return Err(ValidationError::new(
                    at(i, "name"),
                    format!("two stages are named `{}`", stage.name),
                ));
            }
            for need in stage.needs.iter().flatten() {
                if need == &stage.name {
                    return Err(ValidationError::new(at(i, "needs"), "a stage cannot need itself"));
                }
                if self.index_of(need).is_none() {
                    return Err(ValidationError::new(
                        at(i, "needs"),
                        format!(
                            "no stage `{need}` (stages: {})",
                            self.stages
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        let order = self.topological_order().map_err(|stage| {
            ValidationError::new("stages", format!("`needs` form a cycle through stage `{stage}`"))
        })?;
        debug_assert_eq!(order.len(), self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            let Some(when) = &stage.when else { continue };
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let reads = self.index_of(when.stage());
            if reads.is_none_or(|reads| !self.ancestors_of(index).contains(&reads)) {
                return Err(ValidationError::new(
                    at(i, "when"),
                    format!(
                        "`{when}` reads stage `{}`, which `{}` does not need (directly or through \
                         other stages), so its result is not known when `{}` is due",
                        when.stage(),
                        stage.name,
                        stage.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Stage positions in an order where every stage comes after what it needs; on a cycle,
    /// the name of a stage on it.
    fn topological_order(&self) -> Result<Vec<u32>, StageName> {
        let count = u32::try_from(self.stages.len()).unwrap_or(u32::MAX);
        let mut order = Vec::with_capacity(self.stages.len());
        let mut placed = vec![false; self.stages.len()];
        while order.len() < self.stages.len() {
            let before = order.len();
            for index in 0..count {
                let i = index as usize;
                if !placed[i] && self.needs_of(index).iter().all(|&n| placed[n as usize]) {
                    placed[i] = true;
                    order.push(index);
                }
            }
            if order.len() == before {
                let stuck = placed.iter().position(|p| !p).unwrap_or(0);
                return Err(self.stages[stuck].name.clone());
            }
        }
        Ok(order)
    }

    /// Every stage `index` needs, directly or through others.
    pub fn ancestors_of(&self, index: u32) -> Vec<u32> {
        let mut seen = Vec::new();
        let mut todo = self.needs_of(index);
        while let Some(next) = todo.pop() {
            if !seen.contains(&next) && next != index {
                seen.push(next);
                todo.extend(self.needs_of(next));
            }
        }
        seen
    }
}

/// The built-in pipeline: scaffold → validate → e2e → integration → deploy.
pub fn sdlc() -> PipelineSpec {
    let stage = |name: &str, timeout_secs: u64| {
        StageSpec::new(
            // The names are literals that satisfy the slug rules.
            StageName::parse(name).expect("built-in stage name is a valid slug"),
            AgentType::parse(name).expect("built-in agent type is a valid slug"),
            Duration::from_secs(timeout_secs),
        )
    };
    PipelineSpec {
        name: PipelineName::parse("sdlc").expect("built-in pipeline name is a valid slug"),
        description: "scaffold → validate → e2e → integration → deploy".to_owned(),
        stages: vec![
            StageSpec { contract: true, ..stage("scaffold", 120) },
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

/// What is known of a run's stages: the latest attempt of each stage that has one, by
/// stage position.
pub type RunProgress = BTreeMap<u32, LatestAttempt>;

/// The latest attempt of one stage, as far as the DAG cares.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestAttempt {
    pub status: StageStatus,
    pub output: Option<serde_json::Value>,
}

/// A stage that became due: its first attempt is created `pending`, or
/// `waiting_approval` when the stage is gated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageStart {
    pub index: u32,
    pub gated: bool,
}

/// A stage whose `when` did not hold; it is recorded as `skipped` and counts as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedStage {
    pub index: u32,
    pub reason: String,
}

/// Which stages can start now that `progress` is known.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Advance {
    pub start: Vec<StageStart>,
    pub skip: Vec<SkippedStage>,
    /// Every stage has succeeded or was skipped: the run is over.
    pub done: bool,
}

/// Starts every stage whose needs are met and which is neither done nor in flight;
/// evaluates `when` conditions (a skipped stage counts as done, which can make more
/// stages due, or skip them in turn).
pub fn advance(pipeline: &PipelineSpec, progress: &RunProgress) -> Advance {
    use StageStatus::*;
    let count = u32::try_from(pipeline.stages.len()).unwrap_or(u32::MAX);
    let mut status: Vec<Option<StageStatus>> =
        (0..count).map(|index| progress.get(&index).map(|latest| latest.status)).collect();
    let settled = |s: Option<StageStatus>| matches!(s, Some(Succeeded | Skipped));
    let mut result = Advance::default();
    loop {
        let mut skipped_any = false;
        for index in 0..count {
            let i = index as usize;
            if matches!(
                status[i],
                Some(Succeeded | Skipped | Pending | Dispatched | Running | WaitingApproval)
            ) {
                continue;
            }
            if !pipeline.needs_of(index).iter().all(|&need| settled(status[need as usize])) {
                continue;
            }
            let spec = &pipeline.stages[i];
            let holds = spec.when.as_ref().is_none_or(|when| {
                let read = pipeline.index_of(when.stage()).and_then(|at| {
                    let state = status[at as usize]?;
                    Some(StageOutcome {
                        status: state,
                        output: progress.get(&at).and_then(|latest| latest.output.as_ref()),
                    })
                });
                when.holds(read)
            });
            if holds {
                result.start.push(StageStart { index, gated: spec.approval });
                status[i] = Some(Pending);
            } else {
                let reason = format!(
                    "`when = {}` did not hold",
                    spec.when.as_ref().map_or("", |w| w.as_str())
                );
                result.skip.push(SkippedStage { index, reason });
                status[i] = Some(Skipped);
                skipped_any = true;
            }
        }
        if !skipped_any {
            break;
        }
    }
    result.done = status.iter().all(|s| settled(*s));
    result
}

/// What comes after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStep {
    /// Start these stages (none while other stages of the run are still in flight).
    Stages { start: Vec<StageStart> },
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
    /// Stages skipped because of their `when` (recorded whatever `next` is).
    pub skip: Vec<SkippedStage>,
    pub next: NextStep,
}

/// Decides the consequences of `outcome` for `attempt` of `pipeline`, given the latest
/// attempts of the run's other stages. Pure: `jitter` (a uniform sample from `[0, 1)`) and
/// `now` come from the caller.
pub fn decide(
    pipeline: &PipelineSpec,
    attempt: &StageAttempt,
    outcome: &Outcome,
    progress: &RunProgress,
    jitter: f64,
    now: Timestamp,
) -> Decision {
    let Some(spec) = pipeline.stage(attempt.stage_index) else {
        return Decision {
            attempt_status: StageStatus::Failed,
            attempt_error: Some("stage no longer exists in the pipeline".to_owned()),
            skip: Vec::new(),
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
        Outcome::Succeeded { output } => {
            let mut progress = progress.clone();
            progress.insert(
                attempt.stage_index,
                LatestAttempt { status: StageStatus::Succeeded, output: Some(output.clone()) },
            );
            let advance = advance(pipeline, &progress);
            let next = if advance.done {
                NextStep::FinishRun { status: RunStatus::Succeeded, error: None }
            } else {
                NextStep::Stages { start: advance.start }
            };
            return Decision {
                attempt_status: StageStatus::Succeeded,
                attempt_error: None,
                skip: advance.skip,
                next,
            };
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
            skip: Vec::new(),
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
            skip: Vec::new(),
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
        skip: Vec::new(),
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

    fn done_before(index: u32) -> RunProgress {
        (0..index)
            .map(|i| (i, LatestAttempt { status: StageStatus::Succeeded, output: None }))
            .collect()
    }

    fn stage(name: &str, needs: Option<&[&str]>) -> StageSpec {
        let mut spec = StageSpec::new(
            StageName::parse(name).unwrap(),
            AgentType::parse("agent").unwrap(),
            Duration::from_secs(10),
        );
        spec.needs = needs.map(|n| n.iter().map(|s| StageName::parse(*s).unwrap()).collect());
        spec
    }

    fn pipeline(stages: Vec<StageSpec>) -> PipelineSpec {
        PipelineSpec { name: PipelineName::parse("p").unwrap(), description: String::new(), stages }
    }

    fn succeeded(output: serde_json::Value) -> LatestAttempt {
        LatestAttempt { status: StageStatus::Succeeded, output: Some(output) }
    }

    #[test]
    fn independent_stages_start_together_and_a_join_waits_for_both() {
        // build → (lint, test) → ship
        let p = pipeline(vec![
            stage("build", None),
            stage("lint", Some(&["build"])),
            stage("test", Some(&["build"])),
            stage("ship", Some(&["lint", "test"])),
        ]);
        p.validate().unwrap();
        let first = advance(&p, &RunProgress::new());
        assert_eq!(first.start, [StageStart { index: 0, gated: false }]);
        let after_build: RunProgress = [(0, succeeded(serde_json::json!({})))].into();
        let both = advance(&p, &after_build);
        assert_eq!(both.start.iter().map(|s| s.index).collect::<Vec<_>>(), [1, 2]);
        let mut one_done = after_build.clone();
        one_done.insert(1, succeeded(serde_json::json!({})));
        one_done.insert(2, LatestAttempt { status: StageStatus::Running, output: None });
        assert!(advance(&p, &one_done).start.is_empty(), "ship waits for test");
        one_done.insert(2, succeeded(serde_json::json!({})));
        assert_eq!(advance(&p, &one_done).start, [StageStart { index: 3, gated: false }]);
    }

    #[test]
    fn a_false_condition_skips_the_stage_and_its_dependents_still_run() {
        let mut deploy = stage("deploy", None);
        deploy.when = Some(Condition::parse("check.output.ok").unwrap());
        let mut notify = stage("notify", None);
        notify.approval = true;
        let p = pipeline(vec![stage("check", None), deploy, notify]);
        p.validate().unwrap();
        let progress: RunProgress = [(0, succeeded(serde_json::json!({ "ok": false })))].into();
        let next = advance(&p, &progress);
        assert_eq!(next.skip.len(), 1);
        assert_eq!(next.skip[0].index, 1);
        assert!(next.skip[0].reason.contains("check.output.ok"));
        assert_eq!(next.start, [StageStart { index: 2, gated: true }]);
        let progress: RunProgress = [(0, succeeded(serde_json::json!({ "ok": true })))].into();
        assert_eq!(advance(&p, &progress).start, [StageStart { index: 1, gated: false }]);
    }

    #[test]
    fn the_run_is_done_when_every_stage_succeeded_or_was_skipped() {
        let mut last = stage("last", None);
        last.when = Some(Condition::parse("!first.output.more").unwrap());
        let p = pipeline(vec![stage("first", None), last]);
        let outcome = Outcome::Succeeded { output: serde_json::json!({}) };
        let mut at = attempt_at(0, 1);
        at.stage_index = 0;
        let decision = decide(&p, &at, &outcome, &RunProgress::new(), 0.5, NOW);
        assert_eq!(
            decision.next,
            NextStep::Stages { start: vec![StageStart { index: 1, gated: false }] }
        );
        let outcome = Outcome::Succeeded { output: serde_json::json!({ "more": true }) };
        let decision = decide(&p, &at, &outcome, &RunProgress::new(), 0.5, NOW);
        assert_eq!(decision.skip.len(), 1);
        assert_eq!(
            decision.next,
            NextStep::FinishRun { status: RunStatus::Succeeded, error: None }
        );
    }

    #[test]
    fn validation_names_the_stage_and_the_problem() {
        let p = pipeline(vec![stage("a", Some(&["b"])), stage("b", Some(&["a"]))]);
        assert!(p.validate().unwrap_err().message.contains("cycle"));
        let p = pipeline(vec![stage("a", Some(&["ghost"]))]);
        let err = p.validate().unwrap_err();
        assert_eq!(err.field, "stages[0].needs");
        assert!(err.message.contains("ghost"));
        let mut b = stage("b", Some(&[]));
        b.when = Some(Condition::parse("a.output.x").unwrap());
        let err = pipeline(vec![stage("a", None), b]).validate().unwrap_err();
        assert_eq!(err.field, "stages[1].when");
        let p = pipeline(vec![stage("a", None), stage("a", None)]);
        assert_eq!(p.validate().unwrap_err().field, "stages[1].name");
        sdlc().validate().unwrap();
    }

    #[test]
    fn a_policy_allows_commands_by_exact_name_or_path() {
        let policy = StagePolicy {
            allowed_commands: vec!["cargo".into(), "/usr/bin/git".into()],
            protected_paths: vec![],
        };
        assert!(policy.allows_command("cargo"));
        assert!(policy.allows_command("/usr/bin/git"));
        assert!(!policy.allows_command("/tmp/evil/cargo"), "a name is not any file of that name");
        assert!(!policy.allows_command("git"));
        assert!(!policy.allows_command("rm"));
    }

    #[test]
    fn sdlc_has_the_five_seed_stages_in_order() {
        let names: Vec<_> = sdlc().stages.iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["scaffold", "validate", "e2e", "integration", "deploy"]);
        let authors: Vec<_> =
            sdlc().stages.iter().filter(|s| s.contract).map(|s| s.name.to_string()).collect();
        assert_eq!(authors, ["scaffold"], "only scaffold writes the project");
    }

    #[test]
    fn success_moves_to_the_next_stage() {
        let outcome = Outcome::Succeeded { output: serde_json::json!({}) };
        let decision = decide(&sdlc(), &attempt_at(0, 1), &outcome, &RunProgress::new(), 0.5, NOW);
        assert_eq!(decision.attempt_status, StageStatus::Succeeded);
        assert_eq!(
            decision.next,
            NextStep::Stages { start: vec![StageStart { index: 1, gated: false }] }
        );
    }

    #[test]
    fn success_of_the_last_stage_finishes_the_run() {
        let outcome = Outcome::Succeeded { output: serde_json::json!({}) };
        let decision = decide(&sdlc(), &attempt_at(4, 1), &outcome, &done_before(4), 0.5, NOW);
        assert_eq!(
            decision.next,
            NextStep::FinishRun { status: RunStatus::Succeeded, error: None }
        );
    }

    #[test]
    fn a_retryable_failure_retries_after_a_backoff() {
        let outcome = Outcome::Failed { error: "flaky".into(), retryable: true };
        let decision = decide(&sdlc(), &attempt_at(2, 1), &outcome, &RunProgress::new(), 0.0, NOW);
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
        let decision = decide(&sdlc(), &attempt_at(1, 1), &outcome, &RunProgress::new(), 0.5, NOW);
        assert_eq!(decision.attempt_status, StageStatus::Failed);
        let NextStep::FinishRun { status, error } = decision.next else { panic!() };
        assert_eq!(status, RunStatus::Failed);
        assert!(error.unwrap().contains("invalid syntax"));
    }

    #[test]
    fn the_last_allowed_attempt_is_dead_lettered() {
        let decision = decide(
            &sdlc(),
            &attempt_at(3, 3),
            &Outcome::LeaseExpired,
            &RunProgress::new(),
            0.5,
            NOW,
        );
        assert_eq!(decision.attempt_status, StageStatus::DeadLettered);
        let NextStep::FinishRun { status, error } = decision.next else { panic!() };
        assert_eq!(status, RunStatus::Failed);
        assert!(error.unwrap().contains("after 3 attempts"));
    }

    #[test]
    fn a_timeout_is_recorded_as_timed_out_and_retried() {
        let decision =
            decide(&sdlc(), &attempt_at(0, 1), &Outcome::TimedOut, &RunProgress::new(), 0.5, NOW);
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
