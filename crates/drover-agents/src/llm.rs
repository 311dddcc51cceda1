//! The `llm` agent: one streamed chat turn against an HTTP model API, either
//! OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, llama.cpp…) or Anthropic
//! Messages. The answer streams into the attempt's log as it arrives; the whole exchange
//! is kept as a transcript beside the log; the answer and the token usage become the
//! stage's output. The API key is read from the variable the config names and never
//! written anywhere: error messages have it replaced before they leave this module.
//!
//! The agent proposes nothing to run: its answer is text for later stages
//! (`{output.STAGE.text}`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_bus::AgentResult;
use drover_domain::{AgentType, LlmAgent, LlmProvider};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

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
        })
    }

    async fn put(&self, path: &Path, answer: &Answer) {
        let kept = json!({
            "text": answer.text,
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
}

impl LlmAgentRunner {
    async fn execute(&self, task: &AgentTask) -> Result<Value, AgentFailure> {
        let values = Placeholders::of(task);
        let prompt = values.expand(&self.spec.prompt);
        let system = self.spec.system.as_deref().map(|s| values.expand(s));
        let key = match &self.spec.api_key_env {
            Some(var) => Some((self.keys)(var).ok_or_else(|| {
                AgentFailure::permanent(format!("the API key variable `{var}` is not set"))
            })?),
            None => None,
        };
        let secret = Secret(key.as_deref());
        let (url, body) = self.request(system.as_deref(), &prompt);
        let mut request = self.http.post(&url).json(&body);
        if let Some(key) = &key {
            request = match self.spec.provider {
                LlmProvider::Openai => request.bearer_auth(key),
                LlmProvider::Anthropic => request.header("x-api-key", key),
            };
        }
        if self.spec.provider == LlmProvider::Anthropic {
            request = request.header("anthropic-version", "2023-06-01");
        }

        let mut log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(task.log.path())
            .await
            .map_err(|err| AgentFailure::transient(format!("cannot write the log: {err}")))?;
        let header =
            format!("$ {} {} ({url})\n", provider_name(self.spec.provider), self.spec.model);
        let _ = log.write_all(header.as_bytes()).await;

        let cached = match &self.cache {
            Some(cache) => {
                let path = cache.path(&url, &body);
                cache.get(&path).await.map(|answer| (answer, path))
            }
            None => None,
        };
        let from_cache = cached.is_some();
        let answer = match cached {
            Some((answer, _)) => {
                let _ = log.write_all(b"(answer reused from the llm cache)\n").await;
                let _ = log.write_all(answer.text.as_bytes()).await;
                answer
            }
            None => {
                let answer = tokio::select! {
                    () = task.cancel.cancelled() => return Err(AgentFailure::transient("cancelled")),
                    answer = self.converse(request, &mut log, &secret) => answer?,
                };
                if let Some(cache) = &self.cache {
                    cache.put(&cache.path(&url, &body), &answer).await;
                }
                answer
            }
        };
        let _ = log.write_all(b"\n").await;
        let _ = log.flush().await;

        let transcript_path = task.log.path().with_extension("transcript.json");
        let usage = json!({
            "input_tokens": answer.input_tokens,
            "output_tokens": answer.output_tokens,
            "tokens": answer.input_tokens.unwrap_or(0) + answer.output_tokens.unwrap_or(0),
        });
        let transcript = json!({
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
        Ok(json!({
            "agent": self.agent_type.as_str(),
            "model": self.spec.model,
            "text": text,
            "finish_reason": answer.finish_reason,
            "usage": usage,
            "cached": from_cache,
            "transcript": transcript_path.display().to_string(),
        }))
    }

    fn request(&self, system: Option<&str>, prompt: &str) -> (String, Value) {
        let spec = &self.spec;
        match spec.provider {
            LlmProvider::Openai => {
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(json!({ "role": "system", "content": system }));
                }
                messages.push(json!({ "role": "user", "content": prompt }));
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
                    "messages": [{ "role": "user", "content": prompt }],
                    "stream": true,
                });
                if let Some(system) = system {
                    body["system"] = json!(system);
                }
                (format!("{}/v1/messages", spec.base_url), body)
            }
        }
    }

    /// Sends the request and reads the event stream, appending the answer to `log`.
    async fn converse(
        &self,
        request: reqwest::RequestBuilder,
        log: &mut tokio::fs::File,
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
                        let _ = log.write_all(delta.as_bytes()).await;
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
                Some("content_block_delta") => {
                    if let Some(text) = event.pointer("/delta/text").and_then(Value::as_str) {
                        delta.push_str(text);
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
    fn the_key_never_survives_in_a_message() {
        let secret = Secret(Some("sk-live-123"));
        assert_eq!(secret.redact("bad key sk-live-123 given"), "bad key [redacted] given");
    }
}
