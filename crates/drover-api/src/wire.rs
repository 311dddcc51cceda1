//! JSON wire types of `/api/v1`. They are the contract with clients (the `drover` CLI
//! among them), kept apart from domain types so the two can evolve separately.

use std::collections::BTreeMap;

use drover_domain::{Event, Run, StageAttempt, Timestamp};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// Schemas of the text rules the server enforces, for `#[schema(schema_with = …)]`. The
/// server trims (`str::trim`) before it checks lengths and characters; these patterns say
/// the same of the untrimmed value, so whatever a schema forbids the server refuses.
pub(crate) mod rules {
    use utoipa::openapi::schema::{Array, ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};

    /// A slug (`drover_domain::ProjectId::parse` and the other names).
    const SLUG: &str = "^[a-z0-9][a-z0-9_-]{0,62}$";

    /// What `str::trim` removes: `char::is_whitespace` (Unicode `White_Space`).
    const SPACE: &str = r"\t-\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";
    /// `char::is_control` (Unicode `Cc`).
    const CONTROL: &str = r"\x00-\x1F\x7F-\x9F";
    /// Control characters but a line feed.
    const CONTROL_BUT_LF: &str = r"\x00-\x09\x0B-\x1F\x7F-\x9F";
    /// Control characters but a tab and a line feed.
    const CONTROL_BUT_TAB_LF: &str = r"\x00-\x08\x0B-\x1F\x7F-\x9F";

    /// Whether `null` stands for the field left out (an `Option` the server defaults).
    #[derive(Clone, Copy, PartialEq)]
    enum Null {
        Allowed,
        Refused,
    }

    /// Text that, trimmed, is 1 to `max` characters (0 too when `blank_ok`), none of them
    /// in `forbidden`.
    fn trimmed(
        description: &str,
        max: usize,
        forbidden: &str,
        blank_ok: bool,
        null: Null,
    ) -> Object {
        let inner = max.saturating_sub(2);
        let text =
            format!("[^{SPACE}{forbidden}](?:[^{forbidden}]{{0,{inner}}}[^{SPACE}{forbidden}])?");
        let text = if blank_ok { format!("(?:{text})?") } else { text };
        string(description, format!("^[{SPACE}]*{text}[{SPACE}]*$"), null)
    }

    fn string(description: &str, pattern: String, null: Null) -> Object {
        let types = match null {
            Null::Allowed => SchemaType::from_iter([Type::String, Type::Null]),
            Null::Refused => SchemaType::Type(Type::String),
        };
        ObjectBuilder::new()
            .schema_type(types)
            .description(Some(description))
            .pattern(Some(pattern))
            .build()
    }

    pub(crate) fn run_request() -> Object {
        trimmed(
            "What to build, in the user's words, e.g. \"Hello World API\": 1 to 4000 characters \
             once trimmed, no control characters but tabs and line feeds",
            drover_domain::RunRequest::MAX_CHARS,
            CONTROL_BUT_TAB_LF,
            false,
            Null::Refused,
        )
    }

    pub(crate) fn approval_reason() -> Object {
        trimmed(
            "Why (at most 2000 characters once trimmed, no control characters but line \
             feeds; blank is none)",
            crate::approvals::MAX_REASON_CHARS,
            CONTROL_BUT_LF,
            true,
            Null::Allowed,
        )
    }

    pub(crate) fn rejection_reason() -> Object {
        trimmed(
            "Why the stage is rejected: 1 to 2000 characters once trimmed, no control \
             characters but line feeds",
            crate::approvals::MAX_REASON_CHARS,
            CONTROL_BUT_LF,
            false,
            Null::Refused,
        )
    }

    pub(crate) fn token_name() -> Object {
        trimmed(
            "What it is for (shown in listings): 1 to 100 characters once trimmed, no control \
             characters",
            100,
            CONTROL,
            false,
            Null::Refused,
        )
    }

    pub(crate) fn project_name() -> Object {
        trimmed(
            "Its display name (default: its id): 1 to 200 characters once trimmed, no control \
             characters",
            200,
            CONTROL,
            false,
            Null::Allowed,
        )
    }

    pub(crate) fn webhook_description() -> Object {
        trimmed(
            "What it is for: at most 256 characters once trimmed, no control characters \
             (blank is none)",
            drover_domain::MAX_WEBHOOK_DESCRIPTION_LEN,
            CONTROL,
            true,
            Null::Allowed,
        )
    }

    pub(crate) fn worker_name() -> Object {
        string(
            "The worker's name: 1 to 100 visible ASCII characters once trimmed",
            format!("^[{SPACE}]*[!-~]{{1,100}}[{SPACE}]*$"),
            Null::Refused,
        )
    }

    pub(crate) fn webhook_url() -> Object {
        string(
            "Where deliveries are `POST`ed: an absolute `http://` or `https://` URL with a host, \
             no spaces or control characters, at most 2048 bytes once trimmed",
            format!("^[{SPACE}]*[hH][tT][tT][pP][sS]?://[^{SPACE}{CONTROL}]+[{SPACE}]*$"),
            Null::Refused,
        )
    }

    pub(crate) fn chat_content() -> Object {
        string(
            "What the person says: 1 byte to 32 KiB of text once trimmed",
            format!("[^{SPACE}]"),
            Null::Refused,
        )
    }

    /// Agent type names (slugs).
    pub(crate) fn agent_types() -> Array {
        let slug = ObjectBuilder::new().schema_type(Type::String).pattern(Some(SLUG));
        ArrayBuilder::new().items(slug).build()
    }

    /// The agent types a lease waits for: at least one.
    pub(crate) fn leased_agent_types() -> Array {
        let mut types = agent_types();
        types.min_items = Some(1);
        types
    }

    /// One entry of an event filter (`drover_domain::EventFilter::parse_kinds`): a kind
    /// (`run.succeeded`), a family (`stage`, `stage.`, `stage.*`), or blank; trimmed.
    fn event_kind() -> String {
        let names = drover_domain::EventKind::all_names();
        let mut families: Vec<&str> = names.iter().filter_map(|n| n.split('.').next()).collect();
        families.sort_unstable();
        families.dedup();
        let escaped = |name: &str| name.replace('.', r"\.");
        let kinds: Vec<String> = names.iter().map(|n| escaped(n)).collect();
        let families: Vec<String> = families.iter().map(|f| escaped(f)).collect();
        format!(
            r"[{SPACE}]*(?:{}|(?:{})\.*(?:\.\*)*)?[{SPACE}]*",
            kinds.join("|"),
            families.join("|")
        )
    }

    /// Comma-separated event kinds and families (`?kinds=` of the event stream).
    pub(crate) fn event_kind_list() -> Object {
        let entry = event_kind();
        string(
            "Comma-separated kinds (`run.succeeded`) or families (`stage`, `service`, ...), at \
             most 32 different ones",
            format!("^{entry}(?:,{entry})*$"),
            Null::Refused,
        )
    }

    /// Event kinds and families a webhook endpoint receives.
    pub(crate) fn event_kinds() -> Array {
        let entry = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(format!("^{}$", event_kind())));
        let mut kinds = ArrayBuilder::new()
            .items(entry)
            .description(Some(
                "Kinds (`run.succeeded`) or families (`stage`) to receive, at most 32 different \
                 ones; none or empty: all",
            ))
            .build();
        kinds.schema_type = SchemaType::from_iter([Type::Array, Type::Null]);
        kinds
    }

    /// A run status, as `drover_domain::RunStatus` names them.
    pub(crate) fn run_status() -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(drover_domain::RunStatus::ALL.map(|status| status.as_str())))
            .build()
    }

    pub(crate) fn secret_value() -> Object {
        let mut value = string(
            "The value: what agents see in the variable `{name}`. 8 characters to 64 KiB \
             (65536 bytes of UTF-8), at least 8 of them once trimmed, no NUL character",
            format!("^[{SPACE}]*[^{SPACE}\\x00][^\\x00]{{6,}}[^{SPACE}\\x00][{SPACE}]*$"),
            Null::Refused,
        );
        value.min_length = Some(drover_domain::MIN_SECRET_VALUE_CHARS);
        value.max_length = Some(drover_domain::MAX_SECRET_VALUE_BYTES);
        value
    }
}

#[cfg(test)]
mod tests {
    use super::rules;

    fn matches(schema: &utoipa::openapi::schema::Object, text: &str) -> bool {
        let pattern = schema.pattern.as_deref().expect("a pattern");
        let chars = text.chars().count();
        regex::Regex::new(pattern).unwrap().is_match(text)
            && schema.min_length.is_none_or(|min| chars >= min)
            && schema.max_length.is_none_or(|max| chars <= max)
    }

    /// Edges of trimming and control characters, where a pattern could say otherwise.
    fn samples() -> Vec<String> {
        let mut samples: Vec<String> = [
            "",
            " ",
            "x",
            " x ",
            "\tx\n",
            "a\nb",
            "a\tb",
            "a\rb",
            "x\r",
            "\u{85}x",
            "x\u{85}",
            "\u{a0}",
            "a\u{7f}b",
            "a\u{0}b",
            "\u{2028}",
            "héllo wörld",
            "\u{feff}",
            "12345678",
            " 1234567 ",
            "1234567",
            "\u{3000}abcdefgh\u{3000}",
            "abc\u{0}defgh",
        ]
        .map(str::to_owned)
        .to_vec();
        for length in [3999, 4000, 4001] {
            samples.push("x".repeat(length));
            samples.push(format!("  {}  ", "y".repeat(length)));
        }
        samples
    }

    #[test]
    fn the_text_rules_say_what_the_domain_checks() {
        for text in samples() {
            let request = drover_domain::RunRequest::parse(text.clone()).is_ok();
            assert_eq!(matches(&rules::run_request(), &text), request, "request {text:?}");
            let secret = drover_domain::validate_secret_value(&text).is_ok();
            assert_eq!(matches(&rules::secret_value(), &text), secret, "secret {text:?}");
        }
    }
}

/// Deserializes a field that may be left out but, when present, is not `null`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    field: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(field).map(Some)
}

/// `POST /api/v1/runs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    #[schema(schema_with = rules::run_request)]
    pub request: String,
    /// The pipeline to run; `sdlc` when omitted.
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub pipeline: Option<String>,
    /// Run in this environment (id or name): its workspace, its services. Without it the
    /// run gets a workspace of its own.
    #[serde(default)]
    pub environment: Option<String>,
    /// What its stages may spend together; past it the run stops with the reason.
    #[serde(default)]
    pub budget: Option<BudgetBody>,
}

/// A run's budget: `tokens`, `cost_usd`, or both (neither may be `null`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct BudgetBody {
    /// Tokens its stages may use together.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 9223372036854775807_i64)]
    pub tokens: Option<u64>,
    /// US dollars its stages may spend together.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, exclusive_minimum = 0)]
    pub cost_usd: Option<f64>,
}

/// What a run's stages spent (from the `usage` their agents reported).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    pub tokens: u64,
    pub cost_usd: f64,
}

/// A run, with its stage attempts when fetched alone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    pub id: String,
    pub project_id: String,
    pub pipeline: String,
    pub request: String,
    /// `queued|running|waiting_approval|succeeded|failed|cancelled`
    pub status: String,
    pub error: Option<String>,
    pub correlation_id: String,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The deployed app, once the deploy stage succeeded.
    pub deployment: Option<DeploymentView>,
    /// The environment it runs in, if any.
    #[serde(default)]
    pub environment_id: Option<String>,
    /// Every attempt of every stage, in pipeline order (only on `GET /runs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
    /// Its budget, if it has one.
    #[serde(default)]
    pub budget: Option<BudgetBody>,
    /// What its stages spent so far (only on `GET /runs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
    /// Who submitted it.
    #[serde(default)]
    pub submitted_by: Option<String>,
}

/// Where a run's app was deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentView {
    pub url: String,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// Whether this server is still running the app.
    pub live: bool,
    /// The app's stable hostname behind the routing proxy.
    pub hostname: Option<String>,
    /// The app's URL through the routing proxy, while it is live and the proxy runs.
    pub routed_url: Option<String>,
}

/// One attempt at one stage.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub id: String,
    pub stage: String,
    pub stage_index: u32,
    pub agent: String,
    pub attempt: u32,
    /// `pending|dispatched|running|succeeded|failed|timed_out|cancelled|dead_lettered`
    pub status: String,
    pub fencing_token: i64,
    pub worker_id: Option<String>,
    pub error: Option<String>,
    pub output: Option<serde_json::Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub lease_expires_at: Option<String>,
    pub deadline_at: Option<String>,
    /// For an attempt not yet started: no live worker serves its agent type, so it waits
    /// for one to register.
    #[serde(default)]
    pub waiting_for_worker: bool,
}

/// A page of runs, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    pub items: Vec<RunView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One event of the event log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub seq: i64,
    /// `run.<status>` or `stage.<status>`.
    pub kind: String,
    pub project_id: String,
    pub run_id: Option<String>,
    pub attempt_id: Option<String>,
    pub payload: serde_json::Value,
    pub correlation_id: Option<String>,
    pub created_at: String,
}

/// A pipeline and its stages.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PipelineView {
    pub name: String,
    pub description: String,
    pub stages: Vec<StageView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageView {
    pub name: String,
    pub agent: String,
    pub max_attempts: u32,
    pub timeout_secs: u64,
    /// The stages that must be done before it starts.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Whether it waits for approval.
    #[serde(default)]
    pub approval: bool,
    /// Its `when` condition, if any.
    #[serde(default)]
    pub when: Option<String>,
    /// Programs it may run (empty: no restriction beyond its agent).
    #[serde(default)]
    pub allowed_commands: Vec<String>,
    /// Workspace globs its agent must not touch.
    #[serde(default)]
    pub protected_paths: Vec<String>,
    /// Files it declares as outputs.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Whether its agent writes the project (its prompt carries the project contract).
    #[serde(default)]
    pub contract: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PipelineList {
    pub items: Vec<PipelineView>,
}

/// An agent a stage can name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub name: String,
    /// `builtin`, `template` or `command`.
    pub kind: String,
    pub description: String,
    /// For a command agent: the program and its argument templates.
    pub command: Option<Vec<String>>,
    /// For a command agent: the names of its extra variables (never their values).
    pub env: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<AgentView>,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthView {
    pub status: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, String>,
}

pub(crate) fn time(at: Timestamp) -> String {
    humantime::format_rfc3339_millis(at.to_system_time()).to_string()
}

impl RunView {
    pub(crate) fn new(run: &Run, deployment: Option<DeploymentView>) -> Self {
        Self {
            id: run.id.to_string(),
            project_id: run.project_id.to_string(),
            pipeline: run.pipeline.to_string(),
            request: run.request.to_string(),
            status: run.status.to_string(),
            error: run.error.clone(),
            correlation_id: run.correlation_id.to_string(),
            created_at: time(run.created_at),
            updated_at: time(run.updated_at),
            started_at: run.started_at.map(time),
            finished_at: run.finished_at.map(time),
            deployment,
            environment_id: run.environment_id.map(|id| id.to_string()),
            attempts: None,
            budget: run.budget.map(|b| BudgetBody { tokens: b.tokens, cost_usd: b.cost_usd }),
            usage: None,
            submitted_by: run.submitted_by.clone(),
        }
    }
}

impl From<&StageAttempt> for AttemptView {
    fn from(attempt: &StageAttempt) -> Self {
        Self {
            id: attempt.id.to_string(),
            stage: attempt.stage.to_string(),
            stage_index: attempt.stage_index,
            agent: attempt.agent.to_string(),
            attempt: attempt.attempt,
            status: attempt.status.to_string(),
            fencing_token: attempt.fencing_token.0,
            worker_id: attempt.worker_id.as_ref().map(ToString::to_string),
            error: attempt.error.clone(),
            output: attempt.output.clone(),
            created_at: time(attempt.created_at),
            started_at: attempt.started_at.map(time),
            finished_at: attempt.finished_at.map(time),
            lease_expires_at: attempt.lease_expires_at.map(time),
            deadline_at: attempt.deadline_at.map(time),
            waiting_for_worker: false,
        }
    }
}

impl From<&Event> for EventView {
    fn from(event: &Event) -> Self {
        Self {
            seq: event.seq.0,
            kind: event.kind.to_string(),
            project_id: event.project_id.to_string(),
            run_id: event.run_id.map(|id| id.to_string()),
            attempt_id: event.attempt_id.map(|id| id.to_string()),
            payload: event.payload.clone(),
            correlation_id: event.correlation_id.map(|id| id.to_string()),
            created_at: time(event.created_at),
        }
    }
}

/// A registered worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub agents: Vec<String>,
    pub version: String,
    pub hostname: String,
    pub concurrency: u32,
    /// `embedded` or `external`.
    pub kind: String,
    /// `live|lost|gone`
    pub status: String,
    pub registered_at: String,
    pub last_seen_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    pub items: Vec<WorkerView>,
}

impl From<&drover_domain::Worker> for WorkerView {
    fn from(worker: &drover_domain::Worker) -> Self {
        Self {
            id: worker.id.to_string(),
            agents: worker.agents.iter().map(ToString::to_string).collect(),
            version: worker.version.clone(),
            hostname: worker.hostname.clone(),
            concurrency: worker.concurrency,
            kind: worker.kind.clone(),
            status: worker.status.to_string(),
            registered_at: time(worker.registered_at),
            last_seen_at: time(worker.last_seen_at),
        }
    }
}

/// A stage attempt that used every allowed try and waits for a decision.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// The dead-lettered attempt's id; redrive or discard by it.
    pub id: String,
    pub run_id: String,
    pub stage: String,
    pub agent: String,
    pub attempt: u32,
    pub error: Option<String>,
    pub dead_lettered_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterView>,
    pub next_cursor: Option<String>,
}

impl From<&StageAttempt> for DeadLetterView {
    fn from(attempt: &StageAttempt) -> Self {
        Self {
            id: attempt.id.to_string(),
            run_id: attempt.run_id.to_string(),
            stage: attempt.stage.to_string(),
            agent: attempt.agent.to_string(),
            attempt: attempt.attempt,
            error: attempt.error.clone(),
            dead_lettered_at: attempt.finished_at.map(time),
        }
    }
}

/// What an external worker needs to know to join: which bus to use, and how often to
/// heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerBootstrap {
    /// `embedded` (lease tasks over this API), `redis` or `nats`.
    pub bus: String,
    /// The broker to connect to, when the server advertises it.
    pub bus_url: Option<String>,
    pub namespace: String,
    pub heartbeat_interval_ms: u64,
    pub claim_idle_ms: u64,
    pub block_time_ms: u64,
    pub batch_size: usize,
}

/// `POST /api/v1/tasks/lease`: wait up to `wait_ms` for a task of one of `agents`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Agent types of this server (see `GET /api/v1/agents`) the worker runs.
    #[schema(schema_with = rules::leased_agent_types)]
    pub agents: Vec<String>,
    /// How long to wait for a task (default 20000; more than 30000 waits 30000).
    #[serde(default)]
    #[schema(maximum = 9223372036854775807_i64)]
    pub wait_ms: Option<u64>,
}

/// `POST /api/v1/tasks/{task_id}/secrets`: what the worker's envelope says of the attempt
/// it holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSecretsRequest {
    /// The envelope's `project_id`.
    pub project_id: String,
    /// The envelope's `fencing_token`: the attempt must still be held under it.
    pub fencing_token: i64,
}

/// The values of the project's secrets, for the worker holding the attempt. Never cached
/// (`Cache-Control: no-store`); `Debug` shows names only.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskSecretsView {
    /// Values by name (environment variable names).
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub secrets: drover_domain::SecretValues,
}

/// The answer to a worker message sent over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerMessageAck {
    /// Stop the attempt now: it is no longer this worker's (cancelled, reclaimed).
    pub cancel: bool,
}

/// Why the stage is approved.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalBody {
    #[schema(schema_with = rules::approval_reason)]
    pub reason: Option<String>,
}

/// Why the stage is rejected.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectionBody {
    #[schema(schema_with = rules::rejection_reason, required = true)]
    pub reason: Option<String>,
}

/// One row of a usage breakdown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    /// A stage name, a run id or a submitter.
    pub key: String,
    pub tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageReportView {
    pub hours: u64,
    pub total: UsageView,
    pub by_stage: Vec<UsageRow>,
    pub by_run: Vec<UsageRow>,
    pub by_user: Vec<UsageRow>,
}

/// `POST /auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub user: String,
    pub password: String,
}

/// `POST /auth/refresh`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    pub refresh_token: String,
}

/// A login session: a short-lived access token (a JWT) and a single-use refresh token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds the access token lives.
    pub expires_in: u64,
    pub refresh_token: String,
}

/// A user's role in a project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembershipView {
    pub project: String,
    pub user: String,
    /// `viewer|member|admin`
    pub role: String,
}

/// Who a credential belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MeView {
    pub user: String,
    /// The global role: `viewer|member|admin`.
    pub role: String,
    /// The credential's scope: `read|write`.
    pub scope: String,
    /// The one project the credential reaches, if it is bound to one.
    pub project_limit: Option<String>,
    pub memberships: Vec<MembershipView>,
    /// The server needs no credential (loopback, no users yet).
    pub local_mode: bool,
}

/// `POST /tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    #[schema(schema_with = rules::token_name)]
    pub name: String,
    /// `read` or `write` (default).
    #[schema(value_type = Option<ScopeName>)]
    pub scope: Option<String>,
    /// Bind it to one project.
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub project: Option<String>,
    /// Days until it expires (1-365, default 90).
    #[schema(minimum = 1, maximum = 365)]
    pub expires_in_days: Option<u32>,
    /// Whose token (administrators only; default: the caller).
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,63}$")]
    pub user: Option<String>,
}

/// An API token, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub user: String,
    pub name: String,
    pub scope: String,
    pub project: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used_at: Option<String>,
}

/// A new API token: the secret appears here once and is never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedTokenView {
    pub token: String,
    #[serde(flatten)]
    pub details: TokenView,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub disabled: bool,
}

/// `POST /users`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    /// 1-64 lowercase letters, digits, `-` or `_`, starting with a letter or digit; not
    /// `local` (the implicit user of local mode).
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,63}$")]
    pub name: String,
    /// Default `member`.
    #[schema(value_type = Option<RoleName>)]
    pub role: Option<String>,
    /// For `POST /auth/login` (at least 12 characters); without one the user works with
    /// API tokens only.
    #[schema(min_length = 12)]
    pub password: Option<String>,
}

/// `PATCH /users/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRoleBody {
    #[schema(value_type = RoleName)]
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    pub created_at: String,
    /// The caller's role in it.
    pub role: String,
}

/// `POST /projects`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectBody {
    /// A slug: 1-63 lowercase letters, digits, `-` or `_`, starting with a letter or
    /// digit; not `global`.
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub id: String,
    #[schema(schema_with = rules::project_name)]
    pub name: Option<String>,
}

/// `POST /projects/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberBody {
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,63}$")]
    pub user: String,
    #[schema(value_type = RoleName)]
    pub role: String,
}

/// A role: globally, or in a project.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // Documents the strings `drover_domain::Role` parses.
pub(crate) enum RoleName {
    Viewer,
    Member,
    Admin,
}

/// What an API token may do.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // Documents the strings `drover_domain::TokenScope` parses.
pub(crate) enum ScopeName {
    Read,
    Write,
}

/// `POST /workers/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerTokenBody {
    #[schema(schema_with = rules::worker_name)]
    pub worker: String,
    /// Agent types it may take tasks for (empty: any).
    #[serde(default)]
    #[schema(schema_with = rules::agent_types)]
    pub agents: Vec<String>,
    /// Hours until it expires (1-8760, default 720).
    #[schema(minimum = 1, maximum = 8760)]
    pub expires_in_hours: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerTokenView {
    pub token: String,
    pub worker: String,
    pub agents: Vec<String>,
    pub expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub id: i64,
    pub project: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntryView>,
    pub next_cursor: Option<i64>,
}
