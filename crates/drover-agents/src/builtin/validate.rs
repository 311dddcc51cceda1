//! The validate agent: byte-compiles every Python file and parses every JSON file in the
//! workspace, reporting each failure with its file and line.

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use drover_env::{CommandSpec, ProcessError, run_command_redacting};
use serde::Deserialize;
use serde_json::json;

use crate::{Agent, AgentFailure, AgentTask, into_result};

/// Walks the workspace (skipping hidden and cache directories) and prints one JSON report.
/// `compile()` byte-compiles in memory, so nothing is written next to the sources.
const VALIDATE_SCRIPT: &str = r#"
import json, os
checked, failures = 0, []
for root, dirs, files in os.walk("."):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules"))
    for name in sorted(files):
        path = os.path.relpath(os.path.join(root, name))
        if name.endswith(".py"):
            checked += 1
            try:
                with open(path, "rb") as source:
                    compile(source.read(), path, "exec", dont_inherit=True)
            except SyntaxError as error:
                failures.append({"file": path, "line": error.lineno or 0, "message": error.msg})
            except ValueError as error:
                failures.append({"file": path, "line": 0, "message": str(error)})
        elif name.endswith(".json"):
            checked += 1
            try:
                with open(path, encoding="utf-8") as source:
                    json.load(source)
            except ValueError as error:
                failures.append({"file": path, "line": getattr(error, "lineno", 0), "message": str(error)})
print(json.dumps({"checked": checked, "failures": failures}))
"#;

pub struct ValidateAgent {
    agent_type: AgentType,
}

impl ValidateAgent {
    pub fn new() -> Self {
        Self { agent_type: super::agent_type("validate") }
    }
}

impl Default for ValidateAgent {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Deserialize)]
struct Report {
    checked: u32,
    failures: Vec<Failure>,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Failure {
    file: String,
    line: u32,
    message: String,
}

#[async_trait]
impl Agent for ValidateAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(validate(task).await)
    }
}

async fn validate(task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
    let spec = CommandSpec {
        program: super::PYTHON.to_owned(),
        args: vec!["-c".to_owned(), VALIDATE_SCRIPT.to_owned()],
        cwd: task.workspace.clone(),
        env: vec![("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned())],
        log_path: task.log.path().to_path_buf(),
    };
    let output = run_command_redacting(&spec, task.log.redactor(), &task.cancel, None)
        .await
        .map_err(|err| match err {
            ProcessError::Spawn { .. } => {
                AgentFailure::permanent(format!("{err} (is Python 3 installed and on PATH?)"))
            }
            other => AgentFailure::transient(other.to_string()),
        })?;
    let report: Report = output
        .output_tail
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| {
            AgentFailure::transient(format!(
                "the validator printed no report (exit {}): {}",
                output.status,
                output.output_tail.trim()
            ))
        })?;
    if report.checked == 0 {
        return Err(AgentFailure::permanent("the workspace has no source files to validate"));
    }
    if !report.failures.is_empty() {
        let listed: Vec<String> = report
            .failures
            .iter()
            .map(|f| format!("{}:{}: {}", f.file, f.line, f.message))
            .collect();
        for line in &listed {
            task.log.line(format!("FAIL {line}")).await;
        }
        return Err(AgentFailure::permanent(format!(
            "{} of {} files failed validation: {}",
            report.failures.len(),
            report.checked,
            listed.join("; ")
        )));
    }
    task.log.line(format!("{} files valid", report.checked)).await;
    Ok(json!({ "checked": report.checked, "failures": report.failures }))
}
