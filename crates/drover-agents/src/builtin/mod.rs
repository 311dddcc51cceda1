//! The built-in agents of the `sdlc` pipeline. They need nothing but Python 3 and work
//! offline; each works on the project the scaffold stage wrote, as its `drover.json`
//! describes it or, where that says nothing, as detection finds it (`crate::project`).
//! Other toolchains (node, go, cargo) are used when the project needs them and they are on
//! `PATH`; a missing one is named.

mod deploy;
mod e2e;
mod integration;
mod probe;
mod scaffold;
mod validate;

use std::sync::Arc;

use drover_domain::AgentType;
use drover_env::apps::AppHost;

pub use deploy::DeployAgent;
pub use e2e::E2eAgent;
pub use integration::IntegrationAgent;
pub use scaffold::ScaffoldAgent;
pub use validate::ValidateAgent;

use crate::Agent;

/// The Python interpreter the built-in agents use to check projects.
pub const PYTHON: &str = "python3";

/// One agent for each stage of the built-in `sdlc` pipeline.
/// `apps` keeps what the deploy stage deploys.
pub fn sdlc_agents(apps: Arc<dyn AppHost>) -> Vec<Arc<dyn Agent>> {
    vec![
        Arc::new(ScaffoldAgent::new()),
        Arc::new(ValidateAgent::new()),
        Arc::new(E2eAgent::new()),
        Arc::new(IntegrationAgent::new()),
        Arc::new(DeployAgent::new(apps)),
    ]
}

/// The agents `definitions` name: built-in ones, config-defined commands and template
/// scaffolders. `apps` keeps what the deploy stage deploys; `llm` agents with a
/// `cache_ttl` keep answers under `data_dir/llm-cache`.
pub fn configured_agents(
    definitions: &[drover_domain::AgentDefinition],
    apps: Arc<dyn AppHost>,
    data_dir: &std::path::Path,
) -> Vec<Arc<dyn Agent>> {
    use drover_domain::AgentRunner;
    let mut agents = sdlc_agents(apps);
    for definition in definitions {
        match &definition.runner {
            AgentRunner::Builtin => {}
            AgentRunner::Template => {
                agents.push(Arc::new(ScaffoldAgent::named(definition.name.clone())));
            }
            AgentRunner::Llm(llm) => agents.push(Arc::new(
                crate::llm::LlmAgentRunner::new(definition.name.clone(), llm.clone())
                    .with_cache_dir(data_dir.join("llm-cache")),
            )),
            AgentRunner::Command(command) => agents.push(Arc::new(
                crate::command::CommandAgentRunner::new(definition.name.clone(), command.clone()),
            )),
        }
    }
    agents
}

/// The project the stage works on, said in its log: what it is and where that came from,
/// or why there is none.
async fn project(task: &crate::AgentTask) -> Result<crate::project::Project, crate::AgentFailure> {
    match crate::project::resolve(&task.workspace).await {
        Ok(project) => {
            task.log.line(&project.description).await;
            Ok(project)
        }
        Err(failure) => {
            task.log.line(&failure.message).await;
            Err(failure)
        }
    }
}

/// The variables of the run's environment, for the processes an agent starts.
pub(crate) fn environment_variables(task: &crate::AgentTask) -> Vec<(String, String)> {
    task.envelope.context.variables.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The variables of the run's environment and then the project's secrets, for processes
/// whose output drover reads into the attempt's log (and so redacts): commands, tests.
/// Apps an agent starts to run on their own (e2e, deploy) get the variables only.
pub(crate) fn variables_and_secrets(task: &crate::AgentTask) -> Vec<(String, String)> {
    let mut env = environment_variables(task);
    let secrets = task.secrets.iter();
    env.extend(secrets.map(|(name, value)| (name.to_owned(), value.to_owned())));
    env
}

/// Runs `argv` in the workspace, its output into the attempt's log, with the run's
/// variables and the project's secrets: the project's tests, a toolchain's check.
async fn run_in_workspace(
    task: &crate::AgentTask,
    argv: &[String],
) -> Result<drover_env::CommandOutput, crate::AgentFailure> {
    let mut env = variables_and_secrets(task);
    env.extend([
        ("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()),
        ("NPM_CONFIG_UPDATE_NOTIFIER".to_owned(), "false".to_owned()),
    ]);
    let spec = drover_env::CommandSpec {
        program: argv.first().cloned().unwrap_or_default(),
        args: argv.get(1..).unwrap_or_default().to_vec(),
        cwd: task.workspace.clone(),
        env,
        log_path: task.log.path().to_path_buf(),
    };
    drover_env::run_command_redacting(&spec, task.log.redactor(), &task.cancel, None).await.map_err(
        |err| match err {
            drover_env::ProcessError::Spawn { .. } => {
                crate::AgentFailure::permanent(err.to_string())
            }
            other => crate::AgentFailure::transient(other.to_string()),
        },
    )
}

/// The last lines of a command's output, for a failure message.
fn excerpt(output: &str, lines: usize) -> String {
    let last: Vec<&str> = output.lines().rev().take(lines).collect();
    last.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Runs one of drover's own Python scripts in the workspace (`args` after it) and reads
/// the JSON report it prints last.
async fn python_report<Report: serde::de::DeserializeOwned>(
    task: &crate::AgentTask,
    script: &str,
    args: &[&str],
) -> Result<Report, crate::AgentFailure> {
    let mut argv = vec!["-c".to_owned(), script.to_owned()];
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    let spec = drover_env::CommandSpec {
        program: PYTHON.to_owned(),
        args: argv,
        cwd: task.workspace.clone(),
        env: vec![("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned())],
        log_path: task.log.path().to_path_buf(),
    };
    let output = drover_env::run_command_redacting(&spec, task.log.redactor(), &task.cancel, None)
        .await
        .map_err(|err| match err {
            drover_env::ProcessError::Spawn { .. } => crate::AgentFailure::permanent(format!(
                "{err} (is Python 3 installed and on PATH?)"
            )),
            other => crate::AgentFailure::transient(other.to_string()),
        })?;
    output.output_tail.lines().rev().find_map(|line| serde_json::from_str(line).ok()).ok_or_else(
        || {
            crate::AgentFailure::transient(format!(
                "drover's check printed no report (exit {}): {}",
                output.status,
                output.output_tail.trim()
            ))
        },
    )
}

fn agent_type(name: &str) -> AgentType {
    // Only called with the literal names of the built-in agents, which are valid slugs.
    AgentType::parse(name).expect("built-in agent type is a valid slug")
}
