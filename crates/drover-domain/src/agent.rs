//! Agent definitions: what executes a stage. The built-in agents are code; users add
//! agents as data (`[agents.NAME]` in the config): a `command` (any coding CLI or script)
//! or another name for the offline `template` scaffolder.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::AgentType;

/// The agent types built into drover (the `sdlc` pipeline's stages).
pub const BUILTIN_AGENTS: [&str; 5] = ["scaffold", "validate", "e2e", "integration", "deploy"];

/// One agent a server or worker can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentDefinition {
    pub name: AgentType,
    pub description: String,
    pub runner: AgentRunner,
}

/// How an agent does its work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentRunner {
    /// Code built into drover (one of [`BUILTIN_AGENTS`]).
    Builtin,
    /// The offline scaffolder, under another name.
    Template,
    /// A program run in the workspace, in its own process group.
    Command(CommandAgent),
    /// A chat model behind an HTTP API, streamed.
    Llm(LlmAgent),
}

/// Which wire protocol an `llm` agent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmProvider {
    /// OpenAI-compatible chat completions (`POST {base_url}/chat/completions`): OpenAI,
    /// Ollama (`http://127.0.0.1:11434/v1`), vLLM, llama.cpp, LM Studio…
    Openai,
    /// Anthropic Messages (`POST {base_url}/v1/messages`).
    Anthropic,
}

/// An `llm` agent: a streamed chat per attempt (one turn, or several when it may run
/// commands); the answer is the stage's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LlmAgent {
    pub provider: LlmProvider,
    pub base_url: String,
    pub model: String,
    /// The name of the variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    pub system: Option<String>,
    /// The user message; placeholders as for command agents (default `{prompt}`).
    pub prompt: String,
    pub max_tokens: u32,
    /// Answers to an identical request (same model, same messages) are reused for this
    /// long; `None`: never (the default).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Option<std::time::Duration>,
    /// Offer the model a `run_command` tool: the commands it proposes run in the workspace
    /// if the stage's `policy.allowed_commands` allows them (one that does not fails the
    /// stage), their output goes back to the model, for at most `max_turns` turns.
    pub run_commands: bool,
    /// Model turns per attempt when it may run commands (each turn: one answer, then the
    /// commands it asked for).
    pub max_turns: u32,
}

/// A command agent: `program args…` with placeholders (`{prompt}`, `{workspace}`,
/// `{run_id}`, `{stage}`, `{attempt}`, `{env.NAME}`, `{output.STAGE}`,
/// `{output.STAGE.FIELD}`) expanded per attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandAgent {
    pub program: String,
    pub args: Vec<String>,
    /// Extra variables; values may hold placeholders. Never shown (they may be keys).
    #[serde(skip)]
    pub env: BTreeMap<String, String>,
    /// Whether a non-zero exit may be retried (rate limits, network); a program that
    /// cannot be started never is.
    pub retry_on_failure: bool,
}

impl AgentDefinition {
    /// The built-in agents.
    pub fn builtins() -> Vec<Self> {
        BUILTIN_AGENTS
            .iter()
            .map(|name| Self {
                // The names are literals that satisfy the slug rules.
                name: AgentType::parse(*name).expect("built-in agent type is a valid slug"),
                description: format!("built-in {name} agent"),
                runner: AgentRunner::Builtin,
            })
            .collect()
    }
}
