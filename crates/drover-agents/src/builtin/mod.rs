//! The built-in agents of the `sdlc` pipeline. They need nothing but Python 3 and work
//! offline; each reads the project's `drover.json` manifest written by the scaffold stage.

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

fn agent_type(name: &str) -> AgentType {
    // Only called with the literal names of the built-in agents, which are valid slugs.
    AgentType::parse(name).expect("built-in agent type is a valid slug")
}
