//! The `command` agent: any coding CLI (`claude -p`, `codex exec`, `aider`, a script) run
//! in the run's workspace, in its own process group, its output streamed into the
//! attempt's log as it is written. Exit code 0 is success; a JSON object on the last line
//! of output becomes the stage's output, and its `usage` (tokens, cost) is kept with it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::{AgentType, CommandAgent};
use drover_env::{CommandSpec, ProcessError, run_command_redacting};
use serde_json::{Value, json};

use crate::{Agent, AgentFailure, AgentTask, into_result};

/// An agent defined as a command in the config.
pub struct CommandAgentRunner {
    agent_type: AgentType,
    spec: CommandAgent,
}

impl CommandAgentRunner {
    pub fn new(agent_type: AgentType, spec: CommandAgent) -> Self {
        Self { agent_type, spec }
    }
}

#[async_trait]
impl Agent for CommandAgentRunner {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(self.execute(task).await)
    }
}

impl CommandAgentRunner {
    async fn execute(&self, task: &AgentTask) -> Result<Value, AgentFailure> {
        let values = Placeholders::of(task);
        let mut env = super::builtin::variables_and_secrets(task);
        env.extend([
            ("DROVER_PROMPT".to_owned(), values.prompt.clone()),
            ("DROVER_REQUEST".to_owned(), values.request().to_owned()),
            ("DROVER_WORKSPACE".to_owned(), task.workspace.display().to_string()),
            ("DROVER_RUN_ID".to_owned(), task.envelope.run_id.to_string()),
            ("DROVER_STAGE".to_owned(), task.envelope.stage.to_string()),
            ("DROVER_ATTEMPT".to_owned(), task.envelope.attempt.to_string()),
        ]);
        env.extend(self.spec.env.iter().map(|(k, v)| (k.clone(), values.expand(v))));
        let program = values.expand(&self.spec.program);
        let stage = task.envelope.stage.as_str();
        if let Some(refusal) =
            crate::policy::command_refusal(&task.envelope.context.policy, stage, &program)
        {
            task.log.line(&refusal).await;
            return Err(AgentFailure::permanent(refusal));
        }
        let spec = CommandSpec {
            program,
            args: self.spec.args.iter().map(|arg| values.expand(arg)).collect(),
            cwd: task.workspace.clone(),
            env,
            log_path: task.log.path().to_path_buf(),
        };
        let output = run_command_redacting(&spec, task.log.redactor(), &task.cancel, None)
            .await
            .map_err(|err| match err {
                ProcessError::Spawn { .. } => AgentFailure::permanent(err.to_string()),
                other => AgentFailure::transient(other.to_string()),
            })?;
        let reported = last_line_json(&output.output_tail);
        if !output.success() {
            let excerpt: Vec<&str> = output.output_tail.lines().rev().take(10).collect();
            let excerpt: Vec<&str> = excerpt.into_iter().rev().collect();
            let message = format!(
                "`{}` failed ({}):\n{}",
                self.spec.program,
                output.status,
                excerpt.join("\n")
            );
            return Err(match self.spec.retry_on_failure {
                true => AgentFailure::transient(message),
                false => AgentFailure::permanent(message),
            });
        }
        let mut result = json!({ "agent": self.agent_type.as_str(), "exit_code": 0 });
        if let Some(Value::Object(fields)) = reported {
            for (key, value) in fields {
                result[key] = value;
            }
        }
        Ok(result)
    }
}

/// The last non-empty line of `output`, if it is a JSON object.
/// The agent's result: the last line of its output that is a JSON object. Its stdout and
/// stderr arrive interleaved, so a few stderr lines written as it exits may follow the
/// result; the search looks back over the final [`RESULT_SEARCH_LINES`] lines only.
fn last_line_json(output: &str) -> Option<Value> {
    output.lines().rev().filter(|line| !line.trim().is_empty()).take(RESULT_SEARCH_LINES).find_map(
        |line| match serde_json::from_str(line.trim()) {
            Ok(value @ Value::Object(_)) => Some(value),
            _ => None,
        },
    )
}

/// How many final output lines may hold the JSON result.
const RESULT_SEARCH_LINES: usize = 8;

/// The request, then the project contract.
pub(crate) fn with_contract(request: &str) -> String {
    format!("{}\n\n{}", request.trim_end(), crate::CONTRACT)
}

/// What `{…}` placeholders stand for in one attempt.
pub(crate) struct Placeholders {
    prompt: String,
    /// The stage writes the project: `{prompt}` carries the contract.
    contract: bool,
    simple: BTreeMap<&'static str, String>,
    variables: BTreeMap<String, String>,
    outputs: BTreeMap<String, Value>,
}

impl Placeholders {
    /// The attempt's values. `{prompt}` is the run's request, followed by the project
    /// [`CONTRACT`](crate::CONTRACT) when the stage writes the project; `{request}` is the
    /// request alone.
    pub(crate) fn of(task: &AgentTask) -> Self {
        let envelope = &task.envelope;
        let request =
            envelope.payload.get("request").and_then(Value::as_str).unwrap_or("").to_owned();
        let contract = envelope.context.project_contract;
        let prompt = if contract { with_contract(&request) } else { request.clone() };
        let simple = BTreeMap::from([
            ("prompt", prompt.clone()),
            ("request", request),
            ("workspace", task.workspace.display().to_string()),
            ("run_id", envelope.run_id.to_string()),
            ("stage", envelope.stage.to_string()),
            ("attempt", envelope.attempt.to_string()),
        ]);
        Self {
            prompt,
            contract,
            simple,
            variables: envelope.context.variables.clone(),
            outputs: envelope.context.outputs.clone(),
        }
    }

    /// The run's request, without the contract.
    pub(crate) fn request(&self) -> &str {
        self.simple.get("request").map_or("", String::as_str)
    }

    /// Whether `{prompt}` carries the project contract.
    pub(crate) fn has_contract(&self) -> bool {
        self.contract
    }

    /// Replaces every known `{name}`; unknown ones are left as written. Values are
    /// substituted once (a value holding `{…}` is not expanded again) and each argument
    /// stays one argument: nothing goes through a shell.
    pub(crate) fn expand(&self, text: &str) -> String {
        let mut result = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            result.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let Some(end) = after.find('}') else {
                result.push_str(&rest[start..]);
                return result;
            };
            let name = &after[..end];
            match self.lookup(name) {
                Some(value) => result.push_str(&value),
                None => result.push_str(&rest[start..start + end + 2]),
            }
            rest = &after[end + 1..];
        }
        result.push_str(rest);
        result
    }

    fn lookup(&self, name: &str) -> Option<String> {
        if let Some(value) = self.simple.get(name) {
            return Some(value.clone());
        }
        if let Some(variable) = name.strip_prefix("env.") {
            return self.variables.get(variable).cloned();
        }
        let path = name.strip_prefix("output.")?;
        let (stage, field) = match path.split_once('.') {
            Some((stage, field)) => (stage, Some(field)),
            None => (path, None),
        };
        let output = self.outputs.get(stage)?;
        let value = match field {
            Some(field) => field.split('.').try_fold(output, |value, key| value.get(key))?,
            None => output,
        };
        Some(match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders() -> Placeholders {
        Placeholders {
            prompt: "Hello {World}".into(),
            contract: false,
            simple: BTreeMap::from([
                ("prompt", "Hello {World}".into()),
                ("request", "Hello {World}".into()),
                ("stage", "scaffold".into()),
            ]),
            variables: BTreeMap::from([("PORT".into(), "8080".into())]),
            outputs: BTreeMap::from([(
                "scaffold".into(),
                json!({ "template": "hello", "files": { "count": 3 } }),
            )]),
        }
    }

    #[test]
    fn placeholders_expand_once_and_unknown_ones_stay() {
        let values = placeholders();
        assert_eq!(values.expand("-p {prompt}"), "-p Hello {World}");
        assert_eq!(values.expand("{stage}:{env.PORT}"), "scaffold:8080");
        assert_eq!(values.expand("{output.scaffold.template}"), "hello");
        assert_eq!(values.expand("{output.scaffold.files.count}"), "3");
        assert_eq!(values.expand("{nope} {env.MISSING} {"), "{nope} {env.MISSING} {");
        assert_eq!(values.expand("{output.scaffold.files}"), r#"{"count":3}"#);
    }

    #[test]
    fn the_last_json_object_near_the_end_is_the_result() {
        assert_eq!(last_line_json("work\n{\"a\": 1}\n\n"), Some(json!({ "a": 1 })));
        // A stderr line that arrived after the result does not hide it.
        assert_eq!(last_line_json("{\"a\": 1}\nwarning: done\n"), Some(json!({ "a": 1 })));
        assert_eq!(last_line_json("{\"a\": 1}\n{\"b\": 2}\n"), Some(json!({ "b": 2 })));
        let buried = format!("{{\"a\": 1}}\n{}", "more\n".repeat(RESULT_SEARCH_LINES));
        assert_eq!(last_line_json(&buried), None, "a result is at the end of the output");
        assert_eq!(last_line_json("[1, 2]"), None);
    }
}
