//! The integration agent: runs the project's own test suite (the manifest's `test`).

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::AgentType;
use drover_env::{CommandSpec, ProcessError, run_command_redacting};
use serde_json::json;

use crate::{Agent, AgentFailure, AgentTask, Manifest, into_result};

pub struct IntegrationAgent {
    agent_type: AgentType,
}

impl IntegrationAgent {
    pub fn new() -> Self {
        Self { agent_type: super::agent_type("integration") }
    }
}

impl Default for IntegrationAgent {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Agent for IntegrationAgent {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(integration(task).await)
    }
}

async fn integration(task: &AgentTask) -> Result<serde_json::Value, AgentFailure> {
    let manifest = Manifest::load(&task.workspace)
        .await
        .map_err(|err| AgentFailure::permanent(err.to_string()))?;
    let spec = CommandSpec {
        program: manifest.test[0].clone(),
        args: manifest.test[1..].to_vec(),
        cwd: task.workspace.clone(),
        env: {
            let mut env = super::variables_and_secrets(task);
            env.push(("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()));
            env
        },
        log_path: task.log.path().to_path_buf(),
    };
    let output = run_command_redacting(&spec, task.log.redactor(), &task.cancel, None)
        .await
        .map_err(|err| match err {
            ProcessError::Spawn { .. } => AgentFailure::permanent(err.to_string()),
            other => AgentFailure::transient(other.to_string()),
        })?;
    let tests_run = tests_run(&output.output_tail);
    if !output.success() {
        let last_lines: Vec<&str> = output.output_tail.lines().rev().take(15).collect();
        let excerpt: Vec<&str> = last_lines.into_iter().rev().collect();
        return Err(AgentFailure::permanent(format!(
            "`{}` failed ({}):\n{}",
            spec.display(),
            output.status,
            excerpt.join("\n")
        )));
    }
    Ok(json!({ "command": spec.display(), "tests_run": tests_run }))
}

/// The test count from unittest's summary line (`Ran 3 tests in 0.01s`), if present.
fn tests_run(output: &str) -> Option<u32> {
    output.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("Ran ")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::tests_run;

    #[test]
    fn the_test_count_is_read_from_unittest_output() {
        let output = "test_a ... ok\n\n-----\nRan 3 tests in 0.004s\n\nOK\n";
        assert_eq!(tests_run(output), Some(3));
        assert_eq!(tests_run("no summary"), None);
    }
}
