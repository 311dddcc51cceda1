//! Direct chat against the real server and a local OpenAI-compatible model double that
//! streams its reply a word per event: the reply reaches the client piece by piece and is
//! kept; the next message carries the history; a reader that goes away stops the reply and
//! leaves what had arrived as `cancelled`; one reply at a time; sessions are private and
//! bad requests change nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use drover_config::{AgentConfig, AgentKindConfig};
use drover_testkit::model::ModelDouble;
use futures::StreamExt;
use serde_json::{Value, json};

mod common;
use common::{Running, http};

fn llm_agent(base_url: &str) -> AgentConfig {
    AgentConfig {
        kind: Some(AgentKindConfig::Llm),
        base_url: Some(base_url.to_owned()),
        model: Some("double".to_owned()),
        system: Some("You are drover's assistant.".to_owned()),
        ..AgentConfig::default()
    }
}

async fn start(data_dir: &Path, agents: BTreeMap<String, AgentConfig>) -> Running {
    let mut config = common::config(data_dir);
    config.workers.embedded = false;
    config.agents = agents;
    common::start(config).await
}

async fn create_session(url: &str, body: Value) -> Value {
    let response =
        http().post(format!("{url}/api/v1/chat/sessions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

/// One SSE message: its event name and data.
type Sse = (String, String);

/// Reads SSE messages from `response` until `stop` says so or the stream ends.
async fn read_sse(response: reqwest::Response, mut stop: impl FnMut(&Sse) -> bool) -> Vec<Sse> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut seen = Vec::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = Vec::new();
            for line in frame.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = name.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                }
            }
            if data.is_empty() {
                continue;
            }
            let message = (event, data.join("\n"));
            let done = stop(&message);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
    seen
}

async fn say(url: &str, session: &str, content: &str) -> reqwest::Response {
    http()
        .post(format!("{url}/api/v1/chat/sessions/{session}/messages"))
        .json(&json!({ "content": content }))
        .send()
        .await
        .unwrap()
}

async fn transcript(url: &str, session: &str) -> Value {
    http()
        .get(format!("{url}/api/v1/chat/sessions/{session}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_reply_streams_word_by_word_is_kept_and_the_next_message_carries_the_history() {
    let model = ModelDouble::start("have a nice day", Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let server =
        start(dir.path(), BTreeMap::from([("assistant".to_owned(), llm_agent(&model.base_url()))]))
            .await;
    let url = server.url.clone();

    // The only llm agent is picked when none is named.
    let session = create_session(&url, json!({})).await;
    assert_eq!(session["agent"], "assistant");
    let id = session["id"].as_str().unwrap().to_owned();

    let response = say(&url, &id, "hello there").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = read_sse(response, |(event, _)| event == "done" || event == "error").await;
    let kinds: Vec<&str> = events.iter().map(|(event, _)| event.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"message"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"done"), "{events:?}");
    let said: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!((said["seq"].as_u64(), said["role"].as_str()), (Some(1), Some("user")));
    let deltas: Vec<String> = events
        .iter()
        .filter(|(event, _)| event == "delta")
        .map(|(_, data)| {
            serde_json::from_str::<Value>(data).unwrap()["text"].as_str().unwrap().to_owned()
        })
        .collect();
    // Token by token: one piece per word the model streamed.
    let expected = "Echo: hello there have a nice day";
    assert_eq!(deltas.len(), expected.split_whitespace().count(), "{deltas:?}");
    assert_eq!(deltas.concat(), expected);
    let done: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(done["seq"], 2);
    assert_eq!(done["role"], "assistant");
    assert_eq!(done["status"], "complete");
    assert_eq!(done["content"], expected);
    assert_eq!(done["output_tokens"], 7);

    // The model got the system prompt and the message, streamed.
    let first = &model.requests()[0];
    assert_eq!(first["stream"], true);
    assert_eq!(first["messages"][0]["role"], "system");
    assert_eq!(first["messages"][1], json!({ "role": "user", "content": "hello there" }));

    // The next message goes with the whole conversation.
    let response = say(&url, &id, "and again").await;
    read_sse(response, |(event, _)| event == "done").await;
    let second = &model.requests()[1];
    let roles: Vec<&str> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(second["messages"][2]["content"], expected);

    let kept = transcript(&url, &id).await;
    assert_eq!(kept["message_count"], 4);
    let contents: Vec<&str> = kept["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["hello there", expected, "and again", "Echo: and again have a nice day"]);

    // The session survives a restart of the server (it is in the store).
    server.stop().await;
    let server =
        start(dir.path(), BTreeMap::from([("assistant".to_owned(), llm_agent(&model.base_url()))]))
            .await;
    let kept = transcript(&server.url, &id).await;
    assert_eq!(kept["messages"].as_array().unwrap().len(), 4);
    let listed: Value = http()
        .get(format!("{}/api/v1/chat/sessions", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["id"], id.as_str());
    server.stop().await;
}

#[tokio::test]
async fn a_reader_that_goes_away_stops_the_reply_and_keeps_what_arrived() {
    // A long, slow reply: 40 words, 100 ms apart.
    let tail = vec!["word"; 40].join(" ");
    let model = ModelDouble::start(&tail, Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let server =
        start(dir.path(), BTreeMap::from([("assistant".to_owned(), llm_agent(&model.base_url()))]))
            .await;
    let url = server.url.clone();
    let id = create_session(&url, json!({ "agent": "assistant" })).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let response = say(&url, &id, "tell me a long story").await;
    let mut deltas = 0;
    read_sse(response, |(event, _)| {
        deltas += usize::from(event == "delta");
        deltas == 3
    })
    .await;
    // The response is dropped: the reader went away.

    // While it replies, a second message waits its turn.
    let busy = say(&url, &id, "too soon").await;
    if busy.status() == 409 {
        let problem: Value = busy.json().await.unwrap();
        assert_eq!(problem["code"], "chat_reply_in_progress");
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let kept = transcript(&url, &id).await;
        let messages = kept["messages"].as_array().unwrap().clone();
        if let Some(reply) = messages.iter().find(|m| m["seq"] == 2) {
            break reply.clone();
        }
        assert!(Instant::now() < deadline, "the cut reply was never kept: {kept}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["status"], "cancelled", "{reply}");
    let content = reply["content"].as_str().unwrap();
    assert!(content.starts_with("Echo: tell"), "{content}");
    // Stopped well before the end: the model was not read to the last word.
    assert!(content.split_whitespace().count() < 20, "{content}");
    server.stop().await;
}

/// Ends local mode with an administrator, and returns a write token of `user`, a member
/// of the default project.
async fn member_token(url: &str, user: &str) -> String {
    let call = |path: &str, token: Option<&str>, body: Value| {
        let mut request = http().post(format!("{url}/api/v1{path}")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.text().await.unwrap());
            response.json::<Value>().await.unwrap()
        }
    };
    call(
        "/users",
        None,
        json!({ "name": "root", "role": "admin", "password": "correct horse battery" }),
    )
    .await;
    let login =
        call("/auth/login", None, json!({ "user": "root", "password": "correct horse battery" }))
            .await;
    let root = login["access_token"].as_str().unwrap().to_owned();
    call("/users", Some(&root), json!({ "name": user, "role": "member" })).await;
    call("/projects/default/members", Some(&root), json!({ "user": user, "role": "member" })).await;
    let token =
        call("/tokens", Some(&root), json!({ "name": "t", "user": user, "scope": "write" })).await;
    token["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn sessions_are_private_and_bad_requests_change_nothing() {
    let model = ModelDouble::start("ok", Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let agents = BTreeMap::from([
        ("assistant".to_owned(), llm_agent(&model.base_url())),
        ("second".to_owned(), llm_agent(&model.base_url())),
        (
            "shell".to_owned(),
            AgentConfig {
                command: Some("sh".into()),
                args: Some(vec!["-c".into(), "true".into()]),
                ..AgentConfig::default()
            },
        ),
    ]);
    let server = start(dir.path(), agents).await;
    let url = server.url.clone();

    let problem = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        (status, body["code"].as_str().unwrap().to_owned())
    };
    let post = |body: Value| http().post(format!("{url}/api/v1/chat/sessions")).json(&body).send();
    // Two llm agents: one must be named; a command agent cannot chat; nor a missing one.
    assert_eq!(problem(post(json!({})).await.unwrap()).await, (422, "no_chat_agent".into()));
    assert_eq!(
        problem(post(json!({ "agent": "shell" })).await.unwrap()).await,
        (422, "no_chat_agent".into())
    );
    assert_eq!(
        problem(post(json!({ "agent": "nobody" })).await.unwrap()).await,
        (422, "no_chat_agent".into())
    );
    assert_eq!(
        problem(post(json!({ "agent": "assistant", "environment": "nowhere" })).await.unwrap())
            .await,
        (404, "environment_not_found".into())
    );
    let id =
        create_session(&url, json!({ "agent": "second" })).await["id"].as_str().unwrap().to_owned();

    // Empty and oversized messages are refused and not kept.
    assert_eq!(problem(say(&url, &id, "   ").await).await, (422, "validation_failed".into()));
    let huge = "x".repeat(33 * 1024);
    assert_eq!(problem(say(&url, &id, &huge).await).await, (422, "validation_failed".into()));
    assert_eq!(transcript(&url, &id).await["message_count"], 0);
    assert!(model.requests().is_empty());

    // Unknown and malformed ids are 404s.
    let missing = http()
        .get(format!("{url}/api/v1/chat/sessions/0190c0de-0000-7000-8000-000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(missing).await, (404, "chat_session_not_found".into()));
    assert_eq!(
        problem(say(&url, "not-an-id", "hi").await).await,
        (404, "chat_session_not_found".into())
    );

    // Another user of the project sees nothing of it (the session is the local user's).
    let bob = member_token(&url, "bob").await;
    for (method, path) in [
        (reqwest::Method::GET, format!("/api/v1/chat/sessions/{id}")),
        (reqwest::Method::DELETE, format!("/api/v1/chat/sessions/{id}")),
    ] {
        let response =
            http().request(method, format!("{url}{path}")).bearer_auth(&bob).send().await.unwrap();
        assert_eq!(problem(response).await, (404, "chat_session_not_found".into()));
    }
    let listed: Value = http()
        .get(format!("{url}/api/v1/chat/sessions"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]));
    server.stop().await;
}
