//! `[agents.NAME]` and `[pipelines.NAME]`: agents and pipelines as data. Either may
//! `extends` another (a base agent, or a base pipeline such as the built-in `sdlc`) and
//! override some of its fields. Resolved and validated at load: an unknown agent, a cycle
//! of `extends`, a duplicate stage is an error naming the key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use drover_domain::{
    AgentDefinition, AgentRunner, AgentType, CommandAgent, Condition, LlmAgent, LlmProvider,
    PipelineCatalog, PipelineName, PipelineSpec, StageName, StageSpec,
};
use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// How deep `extends` chains may go (also what stops a cycle).
const MAX_EXTENDS_DEPTH: usize = 16;

/// `[agents.NAME]`. Every field is optional so that an agent that `extends` another
/// only states what it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Another `[agents.NAME]` whose fields this one inherits.
    pub extends: Option<String>,
    /// `command` (a program run in the workspace) or `template` (the offline scaffolder).
    pub kind: Option<AgentKindConfig>,
    pub description: Option<String>,
    /// The program (`claude`, `codex`, `aider`, `python3`, …).
    pub command: Option<String>,
    /// Its arguments; placeholders: `{prompt}`, `{workspace}`, `{run_id}`, `{stage}`,
    /// `{attempt}`, `{env.NAME}`, `{output.STAGE}`, `{output.STAGE.FIELD}`.
    pub args: Option<Vec<String>>,
    /// Extra variables (merged over the base agent's); values may hold placeholders.
    pub env: Option<BTreeMap<String, String>>,
    /// Retry a non-zero exit (default true: coding CLIs fail on rate limits and networks).
    pub retry_on_failure: Option<bool>,
    /// `llm`: `openai` (any compatible server; the default) or `anthropic`.
    pub provider: Option<LlmProvider>,
    /// `llm`: the API's base URL (default: Ollama's `http://127.0.0.1:11434/v1` for
    /// `openai`, `https://api.anthropic.com` for `anthropic`).
    pub base_url: Option<String>,
    /// `llm`: the model name.
    pub model: Option<String>,
    /// `llm`: the variable holding the API key (e.g. `OPENAI_API_KEY`).
    pub api_key_env: Option<String>,
    /// `llm`: the system message.
    pub system: Option<String>,
    /// `llm`: the user message (default `{prompt}`).
    pub prompt: Option<String>,
    /// `llm`: the most tokens the answer may have (default 4096).
    pub max_tokens: Option<u32>,
    /// `llm`: reuse the answer to an identical request for this long (off by default).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Option<Duration>,
    /// `llm`: let the model run commands in the workspace (a `run_command` tool); which
    /// ones is the stage's `policy.allowed_commands` (none when empty).
    pub run_commands: Option<bool>,
    /// `llm` with `run_commands`: model turns per attempt (default 8).
    pub max_turns: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKindConfig {
    Command,
    Template,
    Llm,
}

/// `[pipelines.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// A pipeline (`sdlc` or another `[pipelines.NAME]`) whose stages this one starts from.
    pub extends: Option<String>,
    pub description: Option<String>,
    /// `[[pipelines.NAME.stages]]`: a stage named like one of the base's changes it in
    /// place; a new name is added at the end.
    pub stages: Vec<StageConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    pub agent: Option<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
    /// First wait between attempts (doubles each time, up to `backoff_max`).
    #[serde(with = "humantime_serde")]
    pub backoff: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Option<Duration>,
    /// Stages that must be done first (default: the stage before it; `[]`: none, so it
    /// starts with the run). Stages with nothing between them run in parallel.
    pub needs: Option<Vec<String>>,
    /// Wait for `drover runs approve RUN STAGE` before running.
    pub approval: Option<bool>,
    /// Run only if this holds, e.g. `validate.output.ok` or `scaffold.output.template == "flask"`.
    pub when: Option<String>,
    pub policy: Option<PolicyConfig>,
    /// Files the stage produces (workspace-relative paths or globs), kept as artifacts.
    pub outputs: Option<Vec<String>>,
    /// The stage's agent writes the project: its prompt carries the project contract
    /// (default: on for `sdlc`'s `scaffold`, off elsewhere).
    pub contract: Option<bool>,
}

/// `policy = { allowed_commands = [...], protected_paths = [...] }` of a stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub allowed_commands: Option<Vec<String>>,
    pub protected_paths: Option<Vec<String>>,
}

fn invalid(key: String, message: impl Into<String>) -> ConfigError {
    ConfigError::InvalidService { key, message: message.into() }
}

/// The built-in agents and those of `[agents]`, resolved through their `extends`.
pub(crate) fn agent_definitions(
    agents: &BTreeMap<String, AgentConfig>,
) -> Result<Vec<AgentDefinition>, ConfigError> {
    let mut definitions = AgentDefinition::builtins();
    for name in agents.keys() {
        let key = format!("agents.{name}");
        let agent_type =
            AgentType::parse(name.as_str()).map_err(|e| invalid(key.clone(), e.message))?;
        if definitions.iter().any(|d| d.name == agent_type) {
            return Err(invalid(key, "is the name of a built-in agent; choose another"));
        }
        let merged = resolve_agent(agents, name)?;
        let runner = match merged.kind {
            Some(AgentKindConfig::Template) => AgentRunner::Template,
            Some(AgentKindConfig::Llm) => AgentRunner::Llm(llm_agent(&key, &merged)?),
            Some(AgentKindConfig::Command) | None => {
                let program = merged.command.filter(|c| !c.trim().is_empty()).ok_or_else(|| {
                    invalid(format!("{key}.command"), "a command agent must name a program")
                })?;
                AgentRunner::Command(CommandAgent {
                    program,
                    args: merged.args.unwrap_or_default(),
                    env: merged.env.unwrap_or_default(),
                    retry_on_failure: merged.retry_on_failure.unwrap_or(true),
                })
            }
        };
        let description = merged.description.clone().unwrap_or_else(|| match &runner {
            AgentRunner::Command(command) => format!("runs `{}`", command.program),
            AgentRunner::Llm(llm) => format!("asks `{}` at {}", llm.model, llm.base_url),
            _ => "the offline template scaffolder".to_owned(),
        });
        definitions.push(AgentDefinition { name: agent_type, description, runner });
    }
    Ok(definitions)
}

fn llm_agent(key: &str, merged: &AgentConfig) -> Result<LlmAgent, ConfigError> {
    let provider = merged.provider.unwrap_or(LlmProvider::Openai);
    let model = merged
        .model
        .clone()
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| invalid(format!("{key}.model"), "an llm agent must name a model"))?;
    let base_url = merged.base_url.clone().unwrap_or_else(|| match provider {
        LlmProvider::Openai => "http://127.0.0.1:11434/v1".to_owned(),
        LlmProvider::Anthropic => "https://api.anthropic.com".to_owned(),
    });
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(invalid(
            format!("{key}.base_url"),
            format!("`{base_url}` is not an http(s) URL"),
        ));
    }
    if let Some(var) = &merged.api_key_env
        && (var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(invalid(
            format!("{key}.api_key_env"),
            "must name an environment variable (letters, digits, `_`), not hold the key",
        ));
    }
    let max_tokens = merged.max_tokens.unwrap_or(4096);
    if !(1..=1_000_000).contains(&max_tokens) {
        return Err(invalid(format!("{key}.max_tokens"), "must be between 1 and 1000000"));
    }
    let max_turns = merged.max_turns.unwrap_or(8);
    if !(1..=100).contains(&max_turns) {
        return Err(invalid(format!("{key}.max_turns"), "must be between 1 and 100"));
    }
    Ok(LlmAgent {
        provider,
        base_url: base_url.trim_end_matches('/').to_owned(),
        model,
        api_key_env: merged.api_key_env.clone(),
        system: merged.system.clone(),
        prompt: merged.prompt.clone().unwrap_or_else(|| "{prompt}".to_owned()),
        max_tokens,
        cache_ttl: merged.cache_ttl.filter(|ttl| !ttl.is_zero()),
        run_commands: merged.run_commands.unwrap_or(false),
        max_turns,
    })
}

/// The built-in pipelines, from `builtin_pipelines.toml` through the same resolution as
/// the user's, with the built-in agents.
fn builtin_pipelines() -> Result<BTreeMap<String, PipelineSpec>, ConfigError> {
    use figment::providers::Format;
    #[derive(Deserialize)]
    struct BuiltinFile {
        pipelines: BTreeMap<String, PipelineConfig>,
    }
    let file: BuiltinFile = figment::Figment::from(figment::providers::Toml::string(include_str!(
        "builtin_pipelines.toml"
    )))
    .extract()
    .map_err(|err| invalid("builtin_pipelines.toml".to_owned(), err.to_string()))?;
    let agents = AgentDefinition::builtins();
    let mut resolved = BTreeMap::new();
    for name in file.pipelines.keys() {
        let spec = resolve_pipeline(&file.pipelines, name, &mut resolved, &agents, 0)?;
        resolved.insert(name.clone(), spec);
    }
    Ok(resolved)
}

/// `name`'s fields over its base's, over its base's base's…
fn resolve_agent(
    agents: &BTreeMap<String, AgentConfig>,
    name: &str,
) -> Result<AgentConfig, ConfigError> {
    let mut chain = vec![name.to_owned()];
    let mut current = &agents[name];
    while let Some(base) = &current.extends {
        let key = format!("agents.{}.extends", chain.last().map_or(name, String::as_str));
        if chain.contains(base) || chain.len() > MAX_EXTENDS_DEPTH {
            return Err(invalid(
                key,
                format!("`extends` goes round in a circle: {} → {base}", chain.join(" → ")),
            ));
        }
        current = agents.get(base).ok_or_else(|| {
            invalid(
                key,
                format!(
                    "no agent `{base}` in [agents] to extend (built-in agents cannot be extended)"
                ),
            )
        })?;
        chain.push(base.clone());
    }
    // Base first, each child overriding what it states.
    let mut merged = AgentConfig::default();
    for link in chain.iter().rev() {
        let agent = &agents[link];
        merged.kind = agent.kind.or(merged.kind);
        merged.description = agent.description.clone().or(merged.description);
        merged.command = agent.command.clone().or(merged.command);
        merged.args = agent.args.clone().or(merged.args);
        merged.retry_on_failure = agent.retry_on_failure.or(merged.retry_on_failure);
        merged.provider = agent.provider.or(merged.provider);
        merged.base_url = agent.base_url.clone().or(merged.base_url);
        merged.model = agent.model.clone().or(merged.model);
        merged.api_key_env = agent.api_key_env.clone().or(merged.api_key_env);
        merged.system = agent.system.clone().or(merged.system);
        merged.prompt = agent.prompt.clone().or(merged.prompt);
        merged.max_tokens = agent.max_tokens.or(merged.max_tokens);
        merged.cache_ttl = agent.cache_ttl.or(merged.cache_ttl);
        merged.run_commands = agent.run_commands.or(merged.run_commands);
        merged.max_turns = agent.max_turns.or(merged.max_turns);
        if let Some(env) = &agent.env {
            merged.env.get_or_insert_with(BTreeMap::new).extend(env.clone());
        }
    }
    Ok(merged)
}

/// The built-in `sdlc` pipeline and those of `[pipelines]`, each resolved through its
/// `extends` and checked against the known agents.
pub(crate) fn pipeline_catalog(
    pipelines: &BTreeMap<String, PipelineConfig>,
    agents: &[AgentDefinition],
) -> Result<PipelineCatalog, ConfigError> {
    let mut resolved = builtin_pipelines()?;
    for name in pipelines.keys() {
        let key = format!("pipelines.{name}");
        if resolved.contains_key(name) {
            return Err(invalid(
                key,
                format!("`{name}` is built in; extend it under another name"),
            ));
        }
        let spec = resolve_pipeline(pipelines, name, &mut resolved, agents, 0)?;
        resolved.insert(name.clone(), spec);
    }
    Ok(PipelineCatalog::from_specs(resolved.into_values()))
}

fn resolve_pipeline(
    pipelines: &BTreeMap<String, PipelineConfig>,
    name: &str,
    resolved: &mut BTreeMap<String, PipelineSpec>,
    agents: &[AgentDefinition],
    depth: usize,
) -> Result<PipelineSpec, ConfigError> {
    if let Some(done) = resolved.get(name) {
        return Ok(done.clone());
    }
    let key = format!("pipelines.{name}");
    let config = &pipelines[name];
    let pipeline_name = PipelineName::parse(name).map_err(|e| invalid(key.clone(), e.message))?;
    let mut stages = match &config.extends {
        Some(base) if depth >= MAX_EXTENDS_DEPTH || base == name => {
            return Err(invalid(
                format!("{key}.extends"),
                format!("`extends` goes round in a circle through `{base}`"),
            ));
        }
        Some(base) if resolved.contains_key(base) || pipelines.contains_key(base) => {
            resolve_pipeline(pipelines, base, resolved, agents, depth + 1)?.stages
        }
        Some(base) => {
            return Err(invalid(
                format!("{key}.extends"),
                format!("no pipeline `{base}` to extend"),
            ));
        }
        None => Vec::new(),
    };
    let mut seen = BTreeSet::new();
    for (index, stage) in config.stages.iter().enumerate() {
        let stage_key = format!("{key}.stages[{index}]");
        let stage_name = StageName::parse(stage.name.as_str())
            .map_err(|e| invalid(format!("{stage_key}.name"), e.message))?;
        if !seen.insert(stage_name.clone()) {
            return Err(invalid(
                format!("{stage_key}.name"),
                format!("stage `{stage_name}` is listed twice"),
            ));
        }
        let agent = match &stage.agent {
            Some(agent) => {
                let known = agents.iter().find(|a| a.name.as_str() == agent).ok_or_else(|| {
                    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
                    invalid(
                        format!("{stage_key}.agent"),
                        format!("no agent `{agent}` (known: {})", names.join(", ")),
                    )
                })?;
                Some(known.name.clone())
            }
            None => None,
        };
        if stage.max_attempts.is_some_and(|n| !(1..=100).contains(&n)) {
            return Err(invalid(format!("{stage_key}.max_attempts"), "must be between 1 and 100"));
        }
        if stage
            .timeout
            .is_some_and(|t| t < Duration::from_secs(1) || t > Duration::from_secs(7 * 24 * 3600))
        {
            return Err(invalid(format!("{stage_key}.timeout"), "must be between 1s and 7 days"));
        }
        match stages.iter_mut().find(|s| s.name == stage_name) {
            Some(existing) => {
                if let Some(agent) = agent {
                    existing.agent = agent;
                }
                apply_stage_fields(existing, stage, &stage_key)?;
            }
            None => {
                let agent = agent.ok_or_else(|| {
                    invalid(
                        format!("{stage_key}.agent"),
                        format!("a new stage (`{stage_name}`) needs an agent"),
                    )
                })?;
                let mut spec = StageSpec::new(stage_name, agent, Duration::from_secs(600));
                apply_stage_fields(&mut spec, stage, &stage_key)?;
                stages.push(spec);
            }
        }
    }
    if stages.is_empty() {
        return Err(invalid(format!("{key}.stages"), "a pipeline needs at least one stage"));
    }
    let description = config
        .description
        .clone()
        .unwrap_or_else(|| stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" → "));
    let spec = PipelineSpec { name: pipeline_name, description, stages };
    spec.validate().map_err(|err| {
        // `stages[i]` of the resolved pipeline: say which stage that is.
        let field = err.field.clone();
        let named = field
            .strip_prefix("stages[")
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(index, _)| index.parse::<usize>().ok())
            .and_then(|index| spec.stages.get(index))
            .map(|stage| format!(" (stage `{}`)", stage.name))
            .unwrap_or_default();
        invalid(format!("{key}.{field}"), format!("{}{named}", err.message))
    })?;
    Ok(spec)
}

fn apply_stage_fields(
    spec: &mut StageSpec,
    stage: &StageConfig,
    stage_key: &str,
) -> Result<(), ConfigError> {
    if let Some(needs) = &stage.needs {
        let names = needs
            .iter()
            .map(|need| {
                StageName::parse(need.as_str())
                    .map_err(|e| invalid(format!("{stage_key}.needs"), e.message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        spec.needs = Some(names);
    }
    if let Some(approval) = stage.approval {
        spec.approval = approval;
    }
    if let Some(contract) = stage.contract {
        spec.contract = contract;
    }
    if let Some(when) = &stage.when {
        spec.when = if when.trim().is_empty() {
            None
        } else {
            Some(
                Condition::parse(when)
                    .map_err(|e| invalid(format!("{stage_key}.when"), e.message))?,
            )
        };
    }
    if let Some(policy) = &stage.policy {
        if let Some(commands) = &policy.allowed_commands {
            if let Some(bad) = commands.iter().find(|c| c.trim().is_empty() || c.contains(' ')) {
                return Err(invalid(
                    format!("{stage_key}.policy.allowed_commands"),
                    format!("`{bad}` is not a program name or path (no spaces, not empty)"),
                ));
            }
            spec.policy.allowed_commands.clone_from(commands);
        }
        if let Some(paths) = &policy.protected_paths {
            for path in paths {
                check_workspace_glob(path, &format!("{stage_key}.policy.protected_paths"))?;
            }
            spec.policy.protected_paths.clone_from(paths);
        }
    }
    if let Some(outputs) = &stage.outputs {
        for path in outputs {
            check_workspace_glob(path, &format!("{stage_key}.outputs"))?;
        }
        spec.outputs.clone_from(outputs);
    }
    apply_retry_fields(spec, stage);
    Ok(())
}

/// A workspace-relative path or glob: not absolute, no `..`, a valid glob.
fn check_workspace_glob(path: &str, key: &str) -> Result<(), ConfigError> {
    if path.is_empty() || path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(invalid(
            key.to_owned(),
            format!("`{path}` must be a path inside the workspace (relative, without `..`)"),
        ));
    }
    globset::Glob::new(path)
        .map_err(|e| invalid(key.to_owned(), format!("`{path}` is not a valid glob: {e}")))?;
    Ok(())
}

fn apply_retry_fields(spec: &mut StageSpec, stage: &StageConfig) {
    if let Some(timeout) = stage.timeout {
        spec.timeout = timeout;
    }
    if let Some(attempts) = stage.max_attempts {
        spec.max_attempts = attempts;
    }
    if let Some(initial) = stage.backoff {
        spec.backoff.initial = initial;
    }
    if let Some(max) = stage.backoff_max {
        spec.backoff.max = max;
    }
    spec.backoff.max = spec.backoff.max.max(spec.backoff.initial);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_sdlc_is_defined_as_config_and_matches_the_domains_reference() {
        let builtin = builtin_pipelines().expect("the built-in file is valid");
        assert_eq!(builtin.keys().collect::<Vec<_>>(), ["sdlc"]);
        // The domain keeps `sdlc()` for code that runs without a configuration (tests,
        // benchmarks); both must describe the same pipeline.
        assert_eq!(builtin["sdlc"], drover_domain::sdlc());
    }
}
