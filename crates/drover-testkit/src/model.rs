//! A local stand-in for a model vendor's API, speaking OpenAI's streamed chat completions
//! (`POST /v1/chat/completions`, server-sent `chat.completion.chunk` events, `[DONE]`).
//! Its reply is `Echo: <the last user message>` followed by `tail`, streamed one word per
//! event with `pause` between words, so a test can watch a reply arrive token by token or
//! interrupt it. It keeps every request body it was sent. It runs on a thread of its own
//! with its own runtime, so blocking and async tests can both use it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use serde_json::{Value, json};

/// A running model double; stops when dropped.
pub struct ModelDouble {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct Script {
    tail: String,
    pause: Duration,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl ModelDouble {
    /// Replies `Echo: <last user message> <tail>`, a word every `pause`.
    pub fn start(tail: &str, pause: Duration) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Script { tail: tail.to_owned(), pause, requests: requests.clone() };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the model double");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new()
                    .route(
                        "/v1/chat/completions",
                        post(move |body: axum::Json<Value>| completions(script.clone(), body.0)),
                    )
                    .into_make_service();
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let addr = ready_rx.recv().expect("the model double starts");
        Self { addr, requests, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// What to configure as the agent's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request body received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for ModelDouble {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Streams still open end with the runtime; do not wait on slow readers.
        drop(self.thread.take());
    }
}

/// The words of the reply to `request`.
pub fn reply_words(request: &Value, tail: &str) -> Vec<String> {
    let last_user = request["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let text = format!("Echo: {last_user} {tail}");
    let words: Vec<&str> = text.split_whitespace().collect();
    let count = words.len();
    words
        .into_iter()
        .enumerate()
        .map(|(i, word)| if i + 1 < count { format!("{word} ") } else { word.to_owned() })
        .collect()
}

async fn completions(script: Script, request: Value) -> Response {
    script.requests.lock().unwrap().push(request.clone());
    let words = reply_words(&request, &script.tail);
    let prompt_tokens = request["messages"].as_array().map_or(0, Vec::len) * 10;
    let completion_tokens = words.len();
    let chunk = |delta: Value, finish: Value| {
        json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "double",
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
    };
    let mut events = vec![chunk(json!({ "role": "assistant", "content": "" }), Value::Null)];
    events.extend(words.iter().map(|word| chunk(json!({ "content": word }), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    events.push(json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens } }));
    let mut frames: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    frames.push("data: [DONE]\n\n".to_owned());
    let pause = script.pause;
    let stream =
        futures::stream::unfold((frames.into_iter(), true), move |(mut rest, first)| async move {
            let frame = rest.next()?;
            if !first {
                tokio::time::sleep(pause).await;
            }
            Some((Ok::<_, std::convert::Infallible>(frame), (rest, false)))
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}
