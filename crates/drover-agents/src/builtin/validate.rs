//! The validate agent: byte-compiles every Python file, parses every JSON file and decodes
//! every HTML file in the workspace, then runs the checks of the project's toolchain
//! (`node --check`, `go vet`, `cargo check`) where it is on `PATH` (saying so where it is
//! not), reporting each failure with its file and line.

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use serde::Deserialize;
use serde_json::json;

use crate::project::{Validation, shown};
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
        elif name.endswith((".html", ".htm")):
            checked += 1
            try:
                with open(path, encoding="utf-8") as source:
                    source.read()
            except ValueError as error:
                failures.append({"file": path, "line": 0, "message": "not UTF-8: %s" % error})
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
    let project = super::project(task).await?;
    let report: Report = super::python_report(task, VALIDATE_SCRIPT, &[]).await?;
    let mut failures: Vec<String> =
        report.failures.iter().map(|f| format!("{}:{}: {}", f.file, f.line, f.message)).collect();
    let (mut ran, mut skipped) = (Vec::new(), Vec::new());
    for step in &project.validation {
        match step {
            Validation::Skipped(why) => {
                task.log.line(format!("skipped: {why}")).await;
                skipped.push(why.clone());
            }
            Validation::Run(argv) => {
                let output = super::run_in_workspace(task, argv).await?;
                if !output.success() {
                    failures.push(format!(
                        "`{}` failed ({}): {}",
                        shown(argv),
                        output.status,
                        super::excerpt(&output.output_tail, 10)
                    ));
                }
                ran.push(shown(argv));
            }
        }
    }
    if report.checked == 0 && ran.is_empty() && skipped.is_empty() {
        return Err(AgentFailure::permanent("the workspace has no source files to validate"));
    }
    if !failures.is_empty() {
        for line in &failures {
            task.log.line(format!("FAIL {line}")).await;
        }
        let toolchain_failures = failures.len() - report.failures.len();
        let mut counts =
            format!("{} of {} files failed validation", report.failures.len(), report.checked);
        if toolchain_failures > 0 {
            counts.push_str(&format!(
                ", {toolchain_failures} of {} toolchain checks failed",
                ran.len()
            ));
        }
        return Err(AgentFailure::permanent(format!("{counts}: {}", failures.join("; "))));
    }
    task.log
        .line(format!("{} files valid; {} toolchain checks passed", report.checked, ran.len()))
        .await;
    Ok(json!({
        "checked": report.checked,
        "failures": report.failures,
        "ran": ran,
        "skipped": skipped,
        "project": project.to_json(),
    }))
}
