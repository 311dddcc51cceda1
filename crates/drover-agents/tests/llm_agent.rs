//! The `llm` agent against local servers that speak the real wire protocols (OpenAI chat
//! completions and Anthropic Messages, both streamed as server-sent events): the answer
//! streams into the log, the transcript and usage are kept, and the key stays secret.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use drover_agents::{Agent, AgentTask, LlmAgentRunner, StageLog};
use drover_bus::{AgentResult, TaskEnvelope, WorkflowContext};
use drover_domain::{
    AgentType, AttemptId, CorrelationId, FencingToken, LlmAgent, LlmProvider, PipelineName,
    ProjectId, Redactor, RunId, SecretValues, StageName,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn task(dir: &Path, request: &str) -> AgentTask {
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let log_path = dir.join("plan.1.log");
    AgentTask {
        envelope: TaskEnvelope {
            task_id: AttemptId::new(),
            project_id: ProjectId::default_project(),
            run_id: RunId::new(),
            pipeline: PipelineName::parse("p").unwrap(),
            stage: StageName::parse("plan").unwrap(),
            agent: AgentType::parse("planner").unwrap(),
            attempt: 1,
            fencing_token: FencingToken::FIRST,
            payload: json!({ "request": request }),
            context: WorkflowContext {
                workspace: workspace.display().to_string(),
                log_path: log_path.display().to_string(),
                outputs: Default::default(),
                variables: Default::default(),
                ..Default::default()
            },
            deadline: None,
            correlation_id: CorrelationId::new(),
            traceparent: None,
        },
        workspace,
        log: StageLog::new(log_path),
        cancel: CancellationToken::new(),
        secrets: Default::default(),
    }
}

/// What the double received: headers of interest and the JSON body.
type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

/// A server speaking OpenAI's streamed chat completions at `/v1/chat/completions` and
/// Anthropic's streamed Messages at `/v1/messages`; a request without the right key gets
/// the vendor's 401, which quotes the key back.
async fn model_api(seen: Seen) -> SocketAddr {
    let openai = {
        let seen = seen.clone();
        move |headers: HeaderMap, body: axum::Json<Value>| async move {
            seen.lock().unwrap().push((headers.clone(), body.0.clone()));
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            if auth != "Bearer sk-test-123" {
                let quoted = auth.trim_start_matches("Bearer ");
                let error = json!({ "error": { "message": format!("Incorrect API key provided: {quoted}"), "type": "invalid_request_error" } });
                return (StatusCode::UNAUTHORIZED, axum::Json(error)).into_response();
            }
            let chunk = |delta: Value, finish: Value| {
                json!({ "id": "c1", "object": "chat.completion.chunk", "model": "tiny",
                        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
            };
            let events = [
                chunk(json!({ "role": "assistant", "content": "" }), Value::Null),
                chunk(json!({ "content": "Plan: " }), Value::Null),
                chunk(json!({ "content": "write app.py" }), Value::Null),
                chunk(json!({}), json!("stop")),
                json!({ "id": "c1", "object": "chat.completion.chunk", "choices": [],
                        "usage": { "prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25 } }),
            ];
            let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            body.push_str("data: [DONE]\n\n");
            ([("content-type", "text/event-stream")], body).into_response()
        }
    };
    let anthropic = move |headers: HeaderMap, body: axum::Json<Value>| async move {
        seen.lock().unwrap().push((headers, body.0));
        let events = [
            (
                "message_start",
                json!({ "type": "message_start", "message": { "id": "m1", "usage": { "input_tokens": 30, "output_tokens": 1 } } }),
            ),
            (
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
            ),
            ("ping", json!({ "type": "ping" })),
            (
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Hello from " } }),
            ),
            (
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Claude" } }),
            ),
            ("content_block_stop", json!({ "type": "content_block_stop", "index": 0 })),
            (
                "message_delta",
                json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn" }, "usage": { "output_tokens": 7 } }),
            ),
            ("message_stop", json!({ "type": "message_stop" })),
        ];
        let body: String =
            events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect();
        ([("content-type", "text/event-stream")], body).into_response()
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Test keys, by variable name (the process environment is not touched).
fn keys(name: &str) -> Option<String> {
    match name {
        "OPENAI_KEY_OK" => Some("sk-test-123".into()),
        "OPENAI_KEY_BAD" => Some("sk-wrong-456".into()),
        "ANTHROPIC_KEY" => Some("sk-ant-789".into()),
        _ => None,
    }
}

fn agent(provider: LlmProvider, base_url: String, key_var: &str) -> LlmAgentRunner {
    LlmAgentRunner::new(
        AgentType::parse("planner").unwrap(),
        LlmAgent {
            provider,
            base_url,
            model: "tiny".into(),
            api_key_env: Some(key_var.into()),
            system: Some("You plan {stage} work.".into()),
            prompt: "Make a plan for: {prompt}".into(),
            max_tokens: 256,
            cache_ttl: None,
            run_commands: false,
            max_turns: 8,
        },
    )
    .with_keys(Arc::new(keys))
}

#[tokio::test]
async fn an_openai_compatible_stream_is_logged_and_its_transcript_and_usage_kept() {
    let seen: Seen = Arc::default();
    let addr = model_api(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let task = task(dir.path(), "Hello World API");
    let runner = agent(LlmProvider::Openai, format!("http://{addr}/v1"), "OPENAI_KEY_OK");
    let output = match runner.run(&task).await {
        AgentResult::Succeeded { output } => output,
        AgentResult::Failed { error, .. } => panic!("{error}"),
    };
    assert_eq!(output["text"], "Plan: write app.py");
    assert_eq!(output["finish_reason"], "stop");
    assert_eq!(output["usage"], json!({ "input_tokens": 21, "output_tokens": 4, "tokens": 25 }));

    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["authorization"], "Bearer sk-test-123");
    assert_eq!(body["stream"], true);
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["messages"][0], json!({ "role": "system", "content": "You plan plan work." }));
    assert_eq!(
        body["messages"][1],
        json!({ "role": "user", "content": "Make a plan for: Hello World API" })
    );

    let log = std::fs::read_to_string(task.log.path()).unwrap();
    assert!(log.contains("Plan: write app.py"), "{log}");
    assert!(!log.contains("sk-test-123"), "the key reached the log");
    let transcript: Value =
        serde_json::from_slice(&std::fs::read(output["transcript"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(transcript["request"]["messages"][1]["content"], "Make a plan for: Hello World API");
    assert_eq!(transcript["response"]["text"], "Plan: write app.py");
    assert_eq!(transcript["response"]["usage"]["tokens"], 25);
    assert!(!transcript.to_string().contains("sk-test-123"), "the key reached the transcript");
}

#[tokio::test]
async fn the_key_comes_from_the_projects_secrets_and_secret_values_stay_out_of_log_and_transcript()
{
    let seen: Seen = Arc::default();
    let addr = model_api(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut task = task(dir.path(), "Hello World API");
    let mut secrets = SecretValues::default();
    secrets.insert("PROJECT_OPENAI_KEY", "sk-test-123");
    // Streamed in two pieces: "Plan: " then "write app.py".
    secrets.insert("SPLIT_VALUE", "Plan: write");
    task.secrets = secrets.clone();
    task.log = StageLog::new(task.log.path()).redacting(Redactor::new(&secrets));
    let runner = agent(LlmProvider::Openai, format!("http://{addr}/v1"), "PROJECT_OPENAI_KEY");
    let output = match runner.run(&task).await {
        AgentResult::Succeeded { output } => output,
        AgentResult::Failed { error, .. } => panic!("{error}"),
    };
    let (headers, _) = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["authorization"], "Bearer sk-test-123", "the secret was the key");

    let log = std::fs::read_to_string(task.log.path()).unwrap();
    assert!(log.contains("[redacted:SPLIT_VALUE] app.py"), "{log}");
    assert!(!log.contains("Plan: write"), "{log}");
    let transcript = std::fs::read_to_string(output["transcript"].as_str().unwrap()).unwrap();
    assert!(transcript.contains("[redacted:SPLIT_VALUE] app.py"), "{transcript}");
    assert!(!transcript.contains("Plan: write") && !transcript.contains("sk-test-123"));
}

#[tokio::test]
async fn a_rejected_key_fails_the_stage_without_ever_showing_the_key() {
    let addr = model_api(Arc::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let runner = agent(LlmProvider::Openai, format!("http://{addr}/v1"), "OPENAI_KEY_BAD");
    match runner.run(&task(dir.path(), "x")).await {
        AgentResult::Failed { error, retryable } => {
            assert!(error.contains("401"), "{error}");
            assert!(error.contains("Incorrect API key provided: [redacted]"), "{error}");
            assert!(!error.contains("sk-wrong-456"), "{error}");
            assert!(!retryable, "a bad key will not fix itself");
        }
        AgentResult::Succeeded { output } => panic!("succeeded: {output}"),
    }
    // A key variable that is not set is named, and nothing is sent.
    let runner = agent(LlmProvider::Openai, format!("http://{addr}/v1"), "NO_SUCH_KEY");
    match runner.run(&task(dir.path(), "x")).await {
        AgentResult::Failed { error, .. } => {
            assert!(error.contains("`NO_SUCH_KEY` is not set"), "{error}");
        }
        AgentResult::Succeeded { output } => panic!("succeeded: {output}"),
    }
}

#[tokio::test]
async fn the_anthropic_messages_stream_is_read_the_same_way() {
    let seen: Seen = Arc::default();
    let addr = model_api(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let runner = agent(LlmProvider::Anthropic, format!("http://{addr}"), "ANTHROPIC_KEY");
    let output = match runner.run(&task(dir.path(), "Todo API")).await {
        AgentResult::Succeeded { output } => output,
        AgentResult::Failed { error, .. } => panic!("{error}"),
    };
    assert_eq!(output["text"], "Hello from Claude");
    assert_eq!(output["finish_reason"], "end_turn");
    assert_eq!(output["usage"], json!({ "input_tokens": 30, "output_tokens": 7, "tokens": 37 }));
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["x-api-key"], "sk-ant-789");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(body["system"], "You plan plan work.");
    assert_eq!(body["messages"][0]["content"], "Make a plan for: Todo API");
}

#[tokio::test]
async fn with_a_cache_ttl_an_identical_request_is_answered_from_the_cache() {
    let seen: Seen = Arc::default();
    let addr = model_api(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let with_ttl = |ttl: Option<Duration>| {
        LlmAgentRunner::new(
            AgentType::parse("planner").unwrap(),
            LlmAgent {
                provider: LlmProvider::Openai,
                base_url: format!("http://{addr}/v1"),
                model: "tiny".into(),
                api_key_env: Some("OPENAI_KEY_OK".into()),
                system: None,
                prompt: "{prompt}".into(),
                max_tokens: 256,
                cache_ttl: ttl,
                run_commands: false,
                max_turns: 8,
            },
        )
        .with_keys(Arc::new(keys))
        .with_cache_dir(dir.path().join("cache"))
    };
    let answer = |result: AgentResult| match result {
        AgentResult::Succeeded { output } => output,
        AgentResult::Failed { error, .. } => panic!("{error}"),
    };
    let first =
        answer(with_ttl(Some(Duration::from_secs(3600))).run(&task(dir.path(), "same")).await);
    let second =
        answer(with_ttl(Some(Duration::from_secs(3600))).run(&task(dir.path(), "same")).await);
    assert_eq!(seen.lock().unwrap().len(), 1, "the second identical request reached the API");
    assert_eq!((first["cached"].as_bool(), second["cached"].as_bool()), (Some(false), Some(true)));
    assert_eq!(first["text"], second["text"]);
    assert_eq!(second["usage"], first["usage"]);
    // Another prompt is another request.
    answer(with_ttl(Some(Duration::from_secs(3600))).run(&task(dir.path(), "different")).await);
    assert_eq!(seen.lock().unwrap().len(), 2);
    // Without a TTL (the default) nothing is reused.
    answer(with_ttl(None).run(&task(dir.path(), "same")).await);
    assert_eq!(seen.lock().unwrap().len(), 3);
}

/// An OpenAI-compatible double that, until the conversation holds a tool result, answers
/// with a streamed `run_command` call (its arguments split over two chunks), and then with
/// text quoting what the tool returned.
async fn tool_calling_api(seen: Seen) -> SocketAddr {
    let handler = move |headers: HeaderMap, body: axum::Json<Value>| async move {
        seen.lock().unwrap().push((headers, body.0.clone()));
        let chunk = |delta: Value, finish: Value| {
            json!({ "id": "c2", "object": "chat.completion.chunk", "model": "tiny",
                    "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
        };
        let usage = |prompt: u64, completion: u64| {
            json!({ "id": "c2", "object": "chat.completion.chunk", "choices": [],
                    "usage": { "prompt_tokens": prompt, "completion_tokens": completion } })
        };
        let messages = body.0["messages"].as_array().cloned().unwrap_or_default();
        let events = match messages.iter().find(|m| m["role"] == "tool") {
            None => vec![
                chunk(json!({ "role": "assistant", "content": "Let me look." }), Value::Null),
                chunk(
                    json!({ "tool_calls": [{ "index": 0, "id": "call_1", "type": "function",
                            "function": { "name": "run_command", "arguments": "{\"argv\": [\"echo\", " } }] }),
                    Value::Null,
                ),
                chunk(
                    json!({ "tool_calls": [{ "index": 0, "function": { "arguments": "\"hello from a tool\"]}" } }] }),
                    Value::Null,
                ),
                chunk(json!({}), json!("tool_calls")),
                usage(10, 5),
            ],
            Some(result) => vec![
                chunk(
                    json!({ "content": format!("The command said: {}", result["content"].as_str().unwrap_or("")) }),
                    Value::Null,
                ),
                chunk(json!({}), json!("stop")),
                usage(30, 7),
            ],
        };
        let mut body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        body.push_str("data: [DONE]\n\n");
        ([("content-type", "text/event-stream")], body).into_response()
    };
    let app = Router::new().route("/v1/chat/completions", post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn commanding_agent(addr: SocketAddr) -> LlmAgentRunner {
    LlmAgentRunner::new(
        AgentType::parse("planner").unwrap(),
        LlmAgent {
            provider: LlmProvider::Openai,
            base_url: format!("http://{addr}/v1"),
            model: "tiny".into(),
            api_key_env: None,
            system: None,
            prompt: "{prompt}".into(),
            max_tokens: 256,
            cache_ttl: None,
            run_commands: true,
            max_turns: 4,
        },
    )
}

#[tokio::test]
async fn a_command_the_model_proposes_runs_only_if_the_stage_allows_it() {
    let seen: Seen = Arc::default();
    let addr = tool_calling_api(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    // Allowed: the command runs in the workspace, its output goes back, usage adds up.
    let mut allowed = task(dir.path(), "look around");
    allowed.envelope.context.policy.allowed_commands = vec!["echo".into()];
    let output = match commanding_agent(addr).run(&allowed).await {
        AgentResult::Succeeded { output } => output,
        AgentResult::Failed { error, .. } => panic!("{error}"),
    };
    assert_eq!(output["text"], "The command said: exit code 0\nhello from a tool\n");
    assert_eq!(output["usage"]["tokens"], 52, "both turns count: {output}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].1["tools"][0]["function"]["name"], "run_command");
    let second = &requests[1].1["messages"];
    assert_eq!(second[1]["tool_calls"][0]["id"], "call_1", "{second}");
    assert_eq!(second[2]["role"], "tool");
    let log = std::fs::read_to_string(allowed.log.path()).unwrap();
    assert!(log.contains("$ echo hello from a tool"), "{log}");
    let transcript: Value =
        serde_json::from_slice(&std::fs::read(output["transcript"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(transcript["turns"][0]["tool_calls"][0]["arguments"]["argv"][0], "echo");
    assert_eq!(transcript["turns"].as_array().unwrap().len(), 2);

    // Not in the list: the stage fails naming the rule, and nothing runs.
    let mut refused = task(&dir.path().join("refused"), "look around");
    refused.envelope.context.policy.allowed_commands = vec!["cargo".into()];
    match commanding_agent(addr).run(&refused).await {
        AgentResult::Failed { error, retryable } => {
            assert!(error.contains("may not run `echo`") && error.contains("[cargo]"), "{error}");
            assert!(!retryable);
        }
        AgentResult::Succeeded { output } => panic!("ran a refused command: {output}"),
    }
    let log = std::fs::read_to_string(refused.log.path()).unwrap();
    assert!(!log.contains("$ echo"), "{log}");

    // No list at all: an llm stage may run nothing.
    match commanding_agent(addr).run(&task(&dir.path().join("none"), "x")).await {
        AgentResult::Failed { error, .. } => {
            assert!(error.contains("allows no commands"), "{error}");
        }
        AgentResult::Succeeded { output } => panic!("ran a command without a policy: {output}"),
    }
}

#[tokio::test]
async fn a_stage_that_writes_the_project_gives_the_model_the_contract_after_the_request() {
    let seen: Seen = Arc::default();
    let addr = model_api(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut task = task(dir.path(), "Hello World API");
    task.envelope.context.project_contract = true;
    let runner = agent(LlmProvider::Openai, format!("http://{addr}/v1"), "OPENAI_KEY_OK");
    assert!(matches!(runner.run(&task).await, AgentResult::Succeeded { .. }));
    let (_, body) = seen.lock().unwrap()[0].clone();
    let user = body["messages"][1]["content"].as_str().unwrap();
    assert_eq!(
        user,
        format!("Make a plan for: Hello World API\n\n{}", drover_agents::CONTRACT),
        "the request, then the contract"
    );

    // An agent whose prompt does not use `{prompt}` still gets it, after its own text.
    let mut fixed = LlmAgent {
        provider: LlmProvider::Openai,
        base_url: format!("http://{addr}/v1"),
        model: "tiny".into(),
        api_key_env: Some("OPENAI_KEY_OK".into()),
        system: None,
        prompt: "Write a greeter.".into(),
        max_tokens: 256,
        cache_ttl: None,
        run_commands: false,
        max_turns: 8,
    };
    let runner = LlmAgentRunner::new(AgentType::parse("writer").unwrap(), fixed.clone())
        .with_keys(Arc::new(keys));
    assert!(matches!(runner.run(&task).await, AgentResult::Succeeded { .. }));
    let (_, body) = seen.lock().unwrap()[1].clone();
    let user = body["messages"][0]["content"].as_str().unwrap();
    assert_eq!(user, format!("Write a greeter.\n\n{}", drover_agents::CONTRACT));

    // Elsewhere the prompt is the agent's own.
    task.envelope.context.project_contract = false;
    fixed.prompt = "{prompt}".into();
    let runner =
        LlmAgentRunner::new(AgentType::parse("writer").unwrap(), fixed).with_keys(Arc::new(keys));
    assert!(matches!(runner.run(&task).await, AgentResult::Succeeded { .. }));
    let (_, body) = seen.lock().unwrap()[2].clone();
    assert_eq!(body["messages"][0]["content"], "Hello World API");
}
