//! The `llm` agent: one streamed chat turn against an HTTP model API, either
//! OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, llama.cpp…) or Anthropic
//! Messages. The answer streams into the attempt's log as it arrives; the whole exchange
//! is kept as a transcript beside the log; the answer and the token usage become the
//! stage's output. The API key is the project's secret of the name the config gives in
//! `api_key_env`, else that variable of the worker's environment, and is never written
//! anywhere: error messages have it replaced before they leave this module, and the log,
//! the transcript and cached answers have every secret value of the project replaced.
//!
//! Its answer is text for later stages (`{output.STAGE.text}`). With `run_commands`, the
//! model is also offered a `run_command` tool (OpenAI function calling, Anthropic tool
//! use): each command it asks for is checked against the stage's
//! `policy.allowed_commands` (a command outside it fails the stage, naming the rule), run
//! in the workspace in its own process group with its output in the log, and its exit
//! code and output go back to the model, turn after turn, up to `max_turns`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::{AgentType, ChatRole, LlmAgent, LlmProvider, Redactor, StreamRedactor};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::command::Placeholders;
use crate::{Agent, AgentFailure, AgentTask, into_result};

/// The most of an answer kept (in the transcript; the stage output keeps less).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// The most of an answer carried in the stage's output.
const MAX_OUTPUT_TEXT_BYTES: usize = 64 * 1024;
/// The most of an error body quoted in a failure.
const MAX_ERROR_BODY_BYTES: usize = 2048;
/// How long to wait for the response headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one command the model asked for may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// The most of a command's output handed back to the model.
const MAX_COMMAND_OUTPUT_BYTES: usize = 16 * 1024;
/// The tool offered with `run_commands`.
const RUN_COMMAND: &str = "run_command";
const RUN_COMMAND_DESCRIPTION: &str = "Run a program in the project's workspace and get its \
    exit code and output. No shell: give the program and its arguments as a list, e.g. \
    [\"cargo\", \"test\"]. Only programs the stage allows may run.";

/// Where API keys come from, by variable name.
pub type KeySource = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub struct LlmAgentRunner {
    agent_type: AgentType,
    spec: LlmAgent,
    http: reqwest::Client,
    keys: KeySource,
    cache: Option<ResponseCache>,
}

/// Answers kept on disk by a hash of the whole request (URL, model, messages, limits),
/// each reused until its age passes the agent's `cache_ttl`.
struct ResponseCache {
    dir: PathBuf,
    ttl: Duration,
}

impl ResponseCache {
    fn path(&self, url: &str, body: &Value) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{url}\n{body}").as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.json"))
    }

    /// A kept answer younger than the TTL; an expired one is removed.
    async fn get(&self, path: &Path) -> Option<Answer> {
        let age = tokio::fs::metadata(path).await.ok()?.modified().ok()?.elapsed().ok()?;
        if age > self.ttl {
            let _ = tokio::fs::remove_file(path).await;
            return None;
        }
        let kept: Value = serde_json::from_slice(&tokio::fs::read(path).await.ok()?).ok()?;
        Some(Answer {
            text: kept["text"].as_str()?.to_owned(),
            truncated: kept["truncated"].as_bool().unwrap_or(false),
            finish_reason: kept["finish_reason"].as_str().map(str::to_owned),
            input_tokens: kept["input_tokens"].as_u64(),
            output_tokens: kept["output_tokens"].as_u64(),
            tool_calls: Vec::new(),
        })
    }

    /// Keeps `answer`, with `redact`'s values replaced.
    async fn put(&self, path: &Path, answer: &Answer, redact: &Redactor) {
        let kept = json!({
            "text": redact.redact(&answer.text),
            "truncated": answer.truncated,
            "finish_reason": answer.finish_reason,
            "input_tokens": answer.input_tokens,
            "output_tokens": answer.output_tokens,
        });
        // Written aside and renamed, so a reader never sees half an answer.
        let partial = path.with_extension("partial");
        let written = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            tokio::fs::write(&partial, kept.to_string()).await?;
            tokio::fs::rename(&partial, path).await
        };
        if let Err(err) = written.await {
            tracing::warn!(error = %err, "cannot keep an llm answer in the cache");
        }
    }
}

impl LlmAgentRunner {
    /// An agent whose API key is read from the process environment.
    pub fn new(agent_type: AgentType, spec: LlmAgent) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let keys: KeySource = Arc::new(|name| std::env::var(name).ok());
        Self { agent_type, spec, http, keys, cache: None }
    }

    /// Keeps answers under `dir` when the agent has a `cache_ttl`.
    pub fn with_cache_dir(mut self, dir: PathBuf) -> Self {
        self.cache = self.spec.cache_ttl.map(|ttl| ResponseCache { dir, ttl });
        self
    }

    /// Reads API keys from `keys` instead (project secrets, a test's own values).
    pub fn with_keys(mut self, keys: KeySource) -> Self {
        self.keys = keys;
        self
    }
}

/// One reply of a direct chat (`drover chat`), with secret values replaced.
#[derive(Debug, Clone, Default)]
pub struct ChatReply {
    pub text: String,
    /// The model said more than is kept.
    pub truncated: bool,
    pub finish_reason: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

impl LlmAgentRunner {
    /// What the agent is.
    pub fn spec(&self) -> &LlmAgent {
        &self.spec
    }

    /// Answers the last message of `conversation` (oldest first) under the agent's system
    /// prompt followed by `context`. The reply's text goes to `pieces` as it arrives, with
    /// `redact`'s values replaced (held back only while it could be the start of one).
    /// `key` is the API key, already looked up. Dropping the future stops the reply.
    pub async fn reply(
        &self,
        context: Option<&str>,
        conversation: &[(ChatRole, &str)],
        key: Option<&str>,
        redact: &Redactor,
        pieces: mpsc::Sender<String>,
    ) -> Result<ChatReply, AgentFailure> {
        let system = match (self.spec.system.as_deref(), context) {
            (Some(system), Some(context)) => Some(format!("{system}\n\n{context}")),
            (system, context) => system.or(context).map(str::to_owned),
        };
        let (url, body) = self.conversation_request(system.as_deref(), conversation);
        let secret = Secret(key);
        let mut sink = ChatPieces { pieces, redact: redact.stream_eager() };
        let answer = self.converse(self.post(&url, &body, key), &mut sink, &secret).await?;
        let rest = sink.redact.finish();
        if !rest.is_empty() {
            let _ = sink.pieces.send(String::from_utf8_lossy(&rest).into_owned()).await;
        }
        Ok(ChatReply {
            text: redact.redact(&answer.text).into_owned(),
            truncated: answer.truncated,
            finish_reason: answer.finish_reason,
            input_tokens: answer.input_tokens,
            output_tokens: answer.output_tokens,
        })
    }
}

/// A chat reply's pieces on their way to the person reading it.
struct ChatPieces {
    pieces: mpsc::Sender<String>,
    redact: StreamRedactor,
}

impl AnswerSink for ChatPieces {
    async fn text(&mut self, delta: &str) {
        let released = self.redact.push(delta.as_bytes());
        if !released.is_empty() {
            // Released text never ends inside a character.
            let _ = self.pieces.send(String::from_utf8_lossy(&released).into_owned()).await;
        }
    }
}

#[async_trait]
impl Agent for LlmAgentRunner {
    fn agent_type(&self) -> &AgentType {
        &self.agent_type
    }

    async fn run(&self, task: &AgentTask) -> AgentResult {
        into_result(self.execute(task).await)
    }
}

/// What came back.
#[derive(Default)]
struct Answer {
    text: String,
    truncated: bool,
    finish_reason: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// Tools the model asked to call (with `run_commands`).
    tool_calls: Vec<ToolCall>,
}

/// One tool call, assembled from its streamed pieces.
#[derive(Debug, Clone, Default)]
struct ToolCall {
    id: String,
    name: String,
    /// The arguments as JSON text.
    arguments: String,
    /// Anthropic: the content block it arrives in.
    block: Option<u64>,
}

impl ToolCall {
    fn input(&self) -> Value {
        serde_json::from_str(&self.arguments).unwrap_or_else(|_| json!({}))
    }

    fn describe(&self) -> Value {
        json!({ "id": self.id, "name": self.name, "arguments": self.input() })
    }
}

impl LlmAgentRunner {
    async fn execute(&self, task: &AgentTask) -> Result<Value, AgentFailure> {
        let values = Placeholders::of(task);
        let mut prompt = values.expand(&self.spec.prompt);
        // A stage that writes the project tells the model the contract even when the
        // agent's prompt does not use `{prompt}`.
        if values.has_contract() && !prompt.contains(crate::CONTRACT) {
            prompt = crate::command::with_contract(&prompt);
        }
        let system = self.spec.system.as_deref().map(|s| values.expand(s));
        // The project's secrets first, then wherever the runner reads keys from.
        let key = match &self.spec.api_key_env {
            Some(var) => {
                let secret = task.secrets.get(var).map(str::to_owned);
                Some(secret.or_else(|| (self.keys)(var)).ok_or_else(|| {
                    AgentFailure::permanent(format!(
                        "the API key variable `{var}` is not set (neither a project secret nor \
                         in the worker's environment)"
                    ))
                })?)
            }
            None => None,
        };
        let secret = Secret(key.as_deref());
        let (url, body) = self.request(system.as_deref(), &prompt);

        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(task.log.path())
            .await
            .map_err(|err| AgentFailure::transient(format!("cannot write the log: {err}")))?;
        let mut log = AnswerLog { file, redact: task.log.redactor().stream() };
        let header =
            format!("$ {} {} ({url})\n", provider_name(self.spec.provider), self.spec.model);
        let _ = log.write_all(header.as_bytes()).await;

        let mut turns = Vec::new();
        let (answer, from_cache) = if self.spec.run_commands {
            let answer = self
                .with_commands(
                    task,
                    &url,
                    body.clone(),
                    key.as_deref(),
                    &mut log,
                    &secret,
                    &mut turns,
                )
                .await?;
            (answer, false)
        } else {
            self.one_turn(task, &url, &body, key.as_deref(), &mut log, &secret).await?
        };
        let _ = log.write_all(b"\n").await;
        let _ = log.flush().await;

        let transcript_path = task.log.path().with_extension("transcript.json");
        let usage = json!({
            "input_tokens": answer.input_tokens,
            "output_tokens": answer.output_tokens,
            "tokens": answer.input_tokens.unwrap_or(0) + answer.output_tokens.unwrap_or(0),
        });
        let mut transcript = json!({
            "provider": provider_name(self.spec.provider),
            "model": self.spec.model,
            "url": url,
            "request": body,
            "cached": from_cache,
            "response": {
                "text": answer.text,
                "truncated": answer.truncated,
                "finish_reason": answer.finish_reason,
                "usage": usage,
            },
        });
        let tools_run: usize = turns
            .iter()
            .filter_map(|turn| turn.get("tool_calls").and_then(Value::as_array))
            .map(Vec::len)
            .sum();
        if self.spec.run_commands {
            transcript["turns"] = Value::Array(turns);
        }
        task.log.redactor().redact_json(&mut transcript);
        tokio::fs::write(
            &transcript_path,
            serde_json::to_vec_pretty(&transcript).unwrap_or_default(),
        )
        .await
        .map_err(|err| AgentFailure::transient(format!("cannot keep the transcript: {err}")))?;
        let mut text = answer.text;
        if text.len() > MAX_OUTPUT_TEXT_BYTES {
            let mut cut = MAX_OUTPUT_TEXT_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let mut output = json!({
            "agent": self.agent_type.as_str(),
            "model": self.spec.model,
            "text": text,
            "finish_reason": answer.finish_reason,
            "usage": usage,
            "cached": from_cache,
            "transcript": transcript_path.display().to_string(),
        });
        if self.spec.run_commands {
            output["tools_run"] = json!(tools_run);
        }
        Ok(output)
    }

    fn request(&self, system: Option<&str>, prompt: &str) -> (String, Value) {
        self.conversation_request(system, &[(ChatRole::User, prompt)])
    }

    /// The request for a conversation (oldest message first) under `system`.
    fn conversation_request(
        &self,
        system: Option<&str>,
        conversation: &[(ChatRole, &str)],
    ) -> (String, Value) {
        let spec = &self.spec;
        let turns = conversation
            .iter()
            .map(|(role, content)| json!({ "role": role.as_str(), "content": content }));
        match spec.provider {
            LlmProvider::Openai => {
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(json!({ "role": "system", "content": system }));
                }
                messages.extend(turns);
                let body = json!({
                    "model": spec.model,
                    "messages": messages,
                    "max_tokens": spec.max_tokens,
                    "stream": true,
                    "stream_options": { "include_usage": true },
                });
                (format!("{}/chat/completions", spec.base_url), body)
            }
            LlmProvider::Anthropic => {
                let mut body = json!({
                    "model": spec.model,
                    "max_tokens": spec.max_tokens,
                    "messages": turns.collect::<Vec<_>>(),
                    "stream": true,
                });
                if let Some(system) = system {
                    body["system"] = json!(system);
                }
                (format!("{}/v1/messages", spec.base_url), body)
            }
        }
    }

    /// The HTTP request for `body`, with the provider's authentication headers.
    fn post(&self, url: &str, body: &Value, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut request = self.http.post(url).json(body);
        if let Some(key) = key {
            request = match self.spec.provider {
                LlmProvider::Openai => request.bearer_auth(key),
                LlmProvider::Anthropic => request.header("x-api-key", key),
            };
        }
        if self.spec.provider == LlmProvider::Anthropic {
            request = request.header("anthropic-version", "2023-06-01");
        }
        request
    }

    /// One request, one answer (reused from the cache when the agent has one).
    async fn one_turn(
        &self,
        task: &AgentTask,
        url: &str,
        body: &Value,
        key: Option<&str>,
        log: &mut AnswerLog,
        secret: &Secret<'_>,
    ) -> Result<(Answer, bool), AgentFailure> {
        if let Some(cache) = &self.cache {
            let path = cache.path(url, body);
            if let Some(answer) = cache.get(&path).await {
                let _ = log.write_all(b"(answer reused from the llm cache)\n").await;
                let _ = log.write_all(answer.text.as_bytes()).await;
                return Ok((answer, true));
            }
        }
        let answer = tokio::select! {
            () = task.cancel.cancelled() => return Err(AgentFailure::transient("cancelled")),
            answer = self.converse(self.post(url, body, key), log, secret) => answer?,
        };
        if let Some(cache) = &self.cache {
            cache.put(&cache.path(url, body), &answer, task.log.redactor()).await;
        }
        Ok((answer, false))
    }

    /// Turns of answer → commands → their results, until the model answers without
    /// asking for a command. Each turn's request and answer go into `turns`; usage is
    /// summed over them.
    #[allow(clippy::too_many_arguments)]
    async fn with_commands(
        &self,
        task: &AgentTask,
        url: &str,
        mut body: Value,
        key: Option<&str>,
        log: &mut AnswerLog,
        secret: &Secret<'_>,
        turns: &mut Vec<Value>,
    ) -> Result<Answer, AgentFailure> {
        self.offer_tool(&mut body);
        let (mut input_tokens, mut output_tokens) = (0u64, 0u64);
        for turn in 1..=self.spec.max_turns {
            let mut answer = tokio::select! {
                () = task.cancel.cancelled() => return Err(AgentFailure::transient("cancelled")),
                answer = self.converse(self.post(url, &body, key), log, secret) => answer?,
            };
            input_tokens += answer.input_tokens.unwrap_or(0);
            output_tokens += answer.output_tokens.unwrap_or(0);
            let calls: Vec<Value> = answer.tool_calls.iter().map(ToolCall::describe).collect();
            turns.push(json!({
                "turn": turn,
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "tool_calls": calls,
            }));
            if answer.tool_calls.is_empty() {
                answer.input_tokens = Some(input_tokens);
                answer.output_tokens = Some(output_tokens);
                return Ok(answer);
            }
            let mut results = Vec::with_capacity(answer.tool_calls.len());
            for call in &answer.tool_calls {
                let result = self.run_tool(task, call, log).await?;
                results.push((call.id.clone(), result));
            }
            if let Some(last) = turns.last_mut() {
                last["tool_results"] =
                    results.iter().map(|(id, out)| json!({ "id": id, "output": out })).collect();
            }
            self.continue_conversation(&mut body, &answer, &results);
        }
        Err(AgentFailure::permanent(format!(
            "the model was still asking to run commands after {} turns (max_turns)",
            self.spec.max_turns
        )))
    }

    fn offer_tool(&self, body: &mut Value) {
        let schema = json!({
            "type": "object",
            "properties": { "argv": { "type": "array", "items": { "type": "string" }, "minItems": 1 } },
            "required": ["argv"],
        });
        body["tools"] = match self.spec.provider {
            LlmProvider::Openai => json!([{ "type": "function", "function": {
                "name": RUN_COMMAND, "description": RUN_COMMAND_DESCRIPTION, "parameters": schema } }]),
            LlmProvider::Anthropic => json!([{
                "name": RUN_COMMAND, "description": RUN_COMMAND_DESCRIPTION, "input_schema": schema }]),
        };
    }

    /// Appends the model's turn and the commands' results to the conversation.
    fn continue_conversation(
        &self,
        body: &mut Value,
        answer: &Answer,
        results: &[(String, String)],
    ) {
        let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else { return };
        match self.spec.provider {
            LlmProvider::Openai => {
                let calls: Vec<Value> = answer
                    .tool_calls
                    .iter()
                    .map(|c| {
                        json!({ "id": c.id, "type": "function",
                                     "function": { "name": c.name, "arguments": c.arguments } })
                    })
                    .collect();
                let content = if answer.text.is_empty() { Value::Null } else { json!(answer.text) };
                messages
                    .push(json!({ "role": "assistant", "content": content, "tool_calls": calls }));
                for (id, output) in results {
                    messages.push(json!({ "role": "tool", "tool_call_id": id, "content": output }));
                }
            }
            LlmProvider::Anthropic => {
                let mut content = Vec::new();
                if !answer.text.is_empty() {
                    content.push(json!({ "type": "text", "text": answer.text }));
                }
                content.extend(answer.tool_calls.iter().map(|c| {
                    json!({ "type": "tool_use", "id": c.id, "name": c.name, "input": c.input() })
                }));
                messages.push(json!({ "role": "assistant", "content": content }));
                let results: Vec<Value> = results
                    .iter()
                    .map(|(id, output)| json!({ "type": "tool_result", "tool_use_id": id, "content": output }))
                    .collect();
                messages.push(json!({ "role": "user", "content": results }));
            }
        }
    }

    /// Runs one tool call if the stage's policy allows it; what to tell the model.
    async fn run_tool(
        &self,
        task: &AgentTask,
        call: &ToolCall,
        log: &mut AnswerLog,
    ) -> Result<String, AgentFailure> {
        if call.name != RUN_COMMAND {
            return Ok(format!("error: there is no tool `{}`; use `{RUN_COMMAND}`", call.name));
        }
        let argv: Option<Vec<String>> = call
            .input()
            .get("argv")
            .and_then(Value::as_array)
            .and_then(|argv| argv.iter().map(|a| a.as_str().map(str::to_owned)).collect());
        let Some((program, args)) = argv.as_deref().and_then(<[String]>::split_first) else {
            return Ok(
                r#"error: the arguments must be {"argv": ["program", "arg", ...]}"#.to_owned()
            );
        };
        let policy = &task.envelope.context.policy;
        let stage = task.envelope.stage.as_str();
        let refusal = if policy.allowed_commands.is_empty() {
            Some(format!(
                "policy violation: stage `{stage}` may not run `{program}`: the model asked to, \
                 but policy.allowed_commands is empty, so the stage allows no commands"
            ))
        } else {
            crate::policy::command_refusal(policy, stage, program)
        };
        if let Some(refusal) = refusal {
            let _ = log.write_all(format!("\n{refusal}\n").as_bytes()).await;
            return Err(AgentFailure::permanent(refusal));
        }
        let spec = drover_env::CommandSpec {
            program: program.clone(),
            args: args.to_vec(),
            cwd: task.workspace.clone(),
            env: crate::builtin::variables_and_secrets(task),
            log_path: task.log.path().to_path_buf(),
        };
        let _ = log.write_all(format!("\n$ {}\n", spec.display()).as_bytes()).await;
        let _ = log.flush().await;
        let result = drover_env::run_command_redacting(
            &spec,
            task.log.redactor(),
            &task.cancel,
            Some(COMMAND_TIMEOUT),
        )
        .await;
        Ok(match result {
            Ok(output) => {
                let mut tail = output.output_tail;
                if tail.len() > MAX_COMMAND_OUTPUT_BYTES {
                    let mut cut = tail.len() - MAX_COMMAND_OUTPUT_BYTES;
                    while !tail.is_char_boundary(cut) {
                        cut += 1;
                    }
                    tail.drain(..cut);
                }
                let code = output.status.code().map_or("a signal".to_owned(), |c| c.to_string());
                format!("exit code {code}\n{tail}")
            }
            Err(err) => format!("error: {err}"),
        })
    }

    /// Sends the request and reads the event stream, appending the answer to `log`.
    async fn converse(
        &self,
        request: reqwest::RequestBuilder,
        log: &mut impl AnswerSink,
        secret: &Secret<'_>,
    ) -> Result<Answer, AgentFailure> {
        let response = request.send().await.map_err(|err| {
            AgentFailure::transient(secret.redact(&format!("cannot reach the model API: {err}")))
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let mut excerpt: String = body.chars().take(MAX_ERROR_BODY_BYTES).collect();
            excerpt = secret.redact(&excerpt);
            let message = format!("the model API answered {status}: {excerpt}");
            let retryable = status.as_u16() == 429 || status.is_server_error();
            return Err(AgentFailure { message, retryable });
        }
        let mut answer = Answer::default();
        let mut events = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = events.next().await {
            let chunk = chunk.map_err(|err| {
                AgentFailure::transient(secret.redact(&format!("the answer stream broke: {err}")))
            })?;
            pending.extend_from_slice(&chunk);
            while let Some(end) = find_event_end(&pending) {
                let event: Vec<u8> = pending.drain(..end).collect();
                if let Some(data) = event_data(&event) {
                    if data == "[DONE]" {
                        return Ok(answer);
                    }
                    let Ok(value) = serde_json::from_str::<Value>(&data) else { continue };
                    let delta = self.absorb(&value, &mut answer)?;
                    if !delta.is_empty() {
                        log.text(&delta).await;
                    }
                }
            }
            if pending.len() > MAX_ANSWER_BYTES {
                return Err(AgentFailure::transient(
                    "the model API sent an event too large to read",
                ));
            }
        }
        Ok(answer)
    }

    /// Takes one streamed event into `answer`; returns the text it added.
    fn absorb(&self, event: &Value, answer: &mut Answer) -> Result<String, AgentFailure> {
        let mut delta = String::new();
        match self.spec.provider {
            LlmProvider::Openai => {
                if let Some(error) = event.get("error") {
                    return Err(AgentFailure::transient(format!("the model API failed: {error}")));
                }
                if let Some(choice) = event.pointer("/choices/0") {
                    if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
                        delta.push_str(text);
                    }
                    let pieces = choice.pointer("/delta/tool_calls").and_then(Value::as_array);
                    for piece in pieces.into_iter().flatten() {
                        let index = piece.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let index = usize::try_from(index).unwrap_or(usize::MAX).min(63);
                        if answer.tool_calls.len() <= index {
                            answer.tool_calls.resize_with(index + 1, ToolCall::default);
                        }
                        let call = &mut answer.tool_calls[index];
                        if let Some(id) = piece.get("id").and_then(Value::as_str) {
                            id.clone_into(&mut call.id);
                        }
                        if let Some(name) = piece.pointer("/function/name").and_then(Value::as_str)
                        {
                            call.name.push_str(name);
                        }
                        if let Some(args) =
                            piece.pointer("/function/arguments").and_then(Value::as_str)
                        {
                            call.arguments.push_str(args);
                        }
                        if call.arguments.len() > MAX_ANSWER_BYTES {
                            return Err(AgentFailure::transient(
                                "a tool call's arguments are too large",
                            ));
                        }
                    }
                    if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                        answer.finish_reason = Some(reason.to_owned());
                    }
                }
                if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                    answer.input_tokens = usage.get("prompt_tokens").and_then(Value::as_u64);
                    answer.output_tokens = usage.get("completion_tokens").and_then(Value::as_u64);
                }
            }
            LlmProvider::Anthropic => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    answer.input_tokens =
                        event.pointer("/message/usage/input_tokens").and_then(Value::as_u64);
                }
                Some("content_block_start") => {
                    let block = event.get("content_block");
                    if block.and_then(|b| b.get("type")).and_then(Value::as_str) == Some("tool_use")
                        && answer.tool_calls.len() < 64
                    {
                        let text = |key: &str| {
                            block
                                .and_then(|b| b.get(key))
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                        };
                        answer.tool_calls.push(ToolCall {
                            id: text("id").to_owned(),
                            name: text("name").to_owned(),
                            arguments: String::new(),
                            block: event.get("index").and_then(Value::as_u64),
                        });
                    }
                }
                Some("content_block_delta") => {
                    if let Some(text) = event.pointer("/delta/text").and_then(Value::as_str) {
                        delta.push_str(text);
                    }
                    if let Some(json) = event.pointer("/delta/partial_json").and_then(Value::as_str)
                    {
                        let block = event.get("index").and_then(Value::as_u64);
                        if let Some(call) = answer.tool_calls.iter_mut().find(|c| c.block == block)
                        {
                            call.arguments.push_str(json);
                            if call.arguments.len() > MAX_ANSWER_BYTES {
                                return Err(AgentFailure::transient(
                                    "a tool call's arguments are too large",
                                ));
                            }
                        }
                    }
                }
                Some("message_delta") => {
                    if let Some(reason) =
                        event.pointer("/delta/stop_reason").and_then(Value::as_str)
                    {
                        answer.finish_reason = Some(reason.to_owned());
                    }
                    if let Some(tokens) =
                        event.pointer("/usage/output_tokens").and_then(Value::as_u64)
                    {
                        answer.output_tokens = Some(tokens);
                    }
                }
                Some("error") => {
                    let error = event.get("error").cloned().unwrap_or_default();
                    return Err(AgentFailure::transient(format!("the model API failed: {error}")));
                }
                _ => {}
            },
        }
        if answer.text.len() + delta.len() > MAX_ANSWER_BYTES {
            answer.truncated = true;
        } else {
            answer.text.push_str(&delta);
        }
        Ok(delta)
    }
}

fn provider_name(provider: LlmProvider) -> &'static str {
    match provider {
        LlmProvider::Openai => "openai",
        LlmProvider::Anthropic => "anthropic",
    }
}

/// Where the first complete SSE event in `buffer` ends (after its blank line).
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `data:` payloads of one SSE event, joined per the spec.
fn event_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Where the text of a streamed answer goes as it arrives.
trait AnswerSink: Send {
    async fn text(&mut self, delta: &str);
}

impl AnswerSink for AnswerLog {
    async fn text(&mut self, delta: &str) {
        let _ = self.write_all(delta.as_bytes()).await;
    }
}

/// The attempt's log as this agent writes it: through the attempt's redactor, which holds
/// back an unfinished line of a streamed answer until it is complete.
struct AnswerLog {
    file: tokio::fs::File,
    redact: StreamRedactor,
}

impl AnswerLog {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let released = self.redact.push(bytes);
        if released.is_empty() {
            return Ok(());
        }
        self.file.write_all(&released).await
    }

    /// Writes what was held back (the text so far is complete) and flushes the file.
    async fn flush(&mut self) -> std::io::Result<()> {
        let rest = self.redact.finish();
        self.file.write_all(&rest).await?;
        self.file.flush().await
    }
}

/// The API key, to be kept out of every message.
struct Secret<'a>(Option<&'a str>);

impl Secret<'_> {
    fn redact(&self, text: &str) -> String {
        match self.0 {
            Some(key) if !key.is_empty() => text.replace(key, "[redacted]"),
            _ => text.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_and_their_data_joined() {
        let buffer = b"data: {\"a\":1}\n\ndata: x\ndata: y\r\n\r\nrest";
        let end = find_event_end(buffer).unwrap();
        assert_eq!(event_data(&buffer[..end]).as_deref(), Some("{\"a\":1}"));
        let second = &buffer[end..];
        let end = find_event_end(second).unwrap();
        assert_eq!(event_data(&second[..end]).as_deref(), Some("x\ny"));
        assert!(find_event_end(&second[end..]).is_none());
        assert_eq!(event_data(b": keep-alive\n\n"), None);
    }

    #[test]
    fn anthropic_tool_use_blocks_are_assembled_from_their_json_pieces() {
        let runner = LlmAgentRunner::new(
            AgentType::parse("coder").unwrap(),
            LlmAgent {
                provider: LlmProvider::Anthropic,
                base_url: "http://127.0.0.1:1".into(),
                model: "m".into(),
                api_key_env: None,
                system: None,
                prompt: "{prompt}".into(),
                max_tokens: 10,
                cache_ttl: None,
                run_commands: true,
                max_turns: 2,
            },
        );
        let mut answer = Answer::default();
        for event in [
            json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
            json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Running tests." } }),
            json!({ "type": "content_block_start", "index": 1, "content_block": { "type": "tool_use", "id": "toolu_1", "name": "run_command", "input": {} } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": "{\"argv\": [\"cargo\"," } }),
            json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": " \"test\"]}" } }),
            json!({ "type": "message_delta", "delta": { "stop_reason": "tool_use" }, "usage": { "output_tokens": 9 } }),
        ] {
            runner.absorb(&event, &mut answer).unwrap();
        }
        assert_eq!(answer.text, "Running tests.");
        assert_eq!(answer.finish_reason.as_deref(), Some("tool_use"));
        assert_eq!(answer.tool_calls.len(), 1);
        assert_eq!(answer.tool_calls[0].id, "toolu_1");
        assert_eq!(answer.tool_calls[0].input(), json!({ "argv": ["cargo", "test"] }));

        let mut body = json!({ "messages": [{ "role": "user", "content": "x" }] });
        let results = [("toolu_1".to_owned(), "exit code 0\nok".to_owned())];
        runner.continue_conversation(&mut body, &answer, &results);
        assert_eq!(body["messages"][1]["content"][1]["type"], "tool_use");
        assert_eq!(body["messages"][1]["content"][1]["input"]["argv"][1], "test");
        assert_eq!(body["messages"][2]["content"][0]["tool_use_id"], "toolu_1");
    }

    #[test]
    fn the_key_never_survives_in_a_message() {
        let secret = Secret(Some("sk-live-123"));
        assert_eq!(secret.redact("bad key sk-live-123 given"), "bad key [redacted] given");
    }
}
