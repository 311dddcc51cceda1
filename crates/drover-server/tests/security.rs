//! Multi-user security against the real server: local mode ends with the first user;
//! every route of the OpenAPI document, walked as a user of another project, answers
//! 403/404 and never shows the other project's data; walked anonymously on a network
//! address, answers 401; service tokens are checked for signature, expiry, audience and
//! agent types, and cannot reach user endpoints; roles, read-only and revoked tokens,
//! idempotency keys and rate limits hold.

use drover_server::{Mode, Server};
use std::collections::BTreeMap;
use std::path::Path;

use drover_config::Config;
use reqwest::Method;
use serde_json::{Value, json};

mod common;
use common::start;

fn config(data_dir: &Path, listen: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = common::config(data_dir);
    config.server.listen = listen.parse().unwrap();
    tweak(&mut config);
    config
}

struct Http {
    http: reqwest::Client,
    url: String,
}

impl Http {
    fn new(url: &str) -> Self {
        Self { http: reqwest::Client::builder().no_proxy().build().unwrap(), url: url.to_owned() }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        project: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(project) = project {
            request = request.header("x-drover-project", project);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        // An event stream never ends: its status and headers are the answer.
        let streaming = headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("text/event-stream"));
        let body = if streaming { String::new() } else { response.text().await.unwrap() };
        (status, headers, body)
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Value {
        let (status, _, text) = self.call(method.clone(), path, token, None, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

/// Every operation of the served OpenAPI document: (method, path template).
async fn operations(http: &Http) -> Vec<(Method, String)> {
    let doc: Value = http.json(Method::GET, "/api/v1/openapi.json", None, None).await;
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                operations.push((method.to_uppercase().parse().unwrap(), path.clone()));
            }
        }
    }
    assert!(operations.len() > 40, "the document lists {} operations", operations.len());
    operations
}

/// `template` with its parameters pointing at `victim`'s resources.
fn fill(template: &str, victim: &BTreeMap<&str, String>) -> String {
    let mut path = template.to_owned();
    let pick = |key: &str| victim.get(key).cloned().unwrap_or_else(|| "x".to_owned());
    let resource = if template.starts_with("/api/v1/environments") {
        pick("environment")
    } else if template.starts_with("/api/v1/dlq") {
        pick("attempt")
    } else if template.starts_with("/api/v1/projects") {
        pick("project")
    } else if template.starts_with("/api/v1/tokens") {
        pick("token")
    } else if template.starts_with("/api/v1/chat") {
        pick("chat")
    } else {
        pick("run")
    };
    path = path.replace("{id}", &resource);
    for (param, value) in [
        ("{name}", pick("name")),
        ("{stage}", "scaffold".to_owned()),
        ("{user}", pick("user")),
        ("{*name}", "scaffold.1.log".to_owned()),
    ] {
        path = path.replace(param, &value);
    }
    path
}

/// A plausible body for a write, so that refusals come from authorization, not shape.
fn body_for(method: &Method, template: &str) -> Option<Value> {
    if *method == Method::GET || *method == Method::DELETE {
        return None;
    }
    Some(match template {
        "/api/v1/runs" => json!({ "request": "steal" }),
        "/api/v1/environments" => json!({ "name": "intruder" }),
        "/api/v1/tokens" => json!({ "name": "x" }),
        "/api/v1/users" => json!({ "name": "mallory", "role": "admin" }),
        "/api/v1/projects" => json!({ "id": "mallory" }),
        "/api/v1/auth/login" => json!({ "user": "alice", "password": "wrong-password!" }),
        "/api/v1/auth/refresh" => json!({ "refresh_token": "drr_nope" }),
        "/api/v1/tasks/lease" => json!({ "agents": ["scaffold"], "wait_ms": 0 }),
        "/api/v1/workers/tokens" => json!({ "worker": "w" }),
        _ if template.ends_with("/members") => json!({ "user": "bob", "role": "admin" }),
        _ if template.starts_with("/api/v1/users/") => json!({ "role": "admin" }),
        _ if template.ends_with("/reject") => json!({ "reason": "no" }),
        _ if template.starts_with("/api/v1/chat/sessions/") => json!({ "content": "hi" }),
        _ if template.starts_with("/api/v1/secrets/") => {
            json!({ "value": "bobs-own-secret-value" })
        }
        _ => json!({}),
    })
}

#[tokio::test]
async fn projects_are_walls_and_credentials_are_checked_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // An `llm` agent (whose API is never called) so that Alice can keep a chat session.
    let server = start(config(&data, "127.0.0.1:0", |config| {
        config.agents.insert(
            "assistant".to_owned(),
            drover_config::AgentConfig {
                kind: Some(drover_config::AgentKindConfig::Llm),
                base_url: Some("http://127.0.0.1:1/v1".to_owned()),
                model: Some("m".to_owned()),
                ..drover_config::AgentConfig::default()
            },
        );
    }))
    .await;
    let http = Http::new(&server.url);

    // Local mode: no credential needed, until the first user exists.
    let me = http.json(Method::GET, "/api/v1/me", None, None).await;
    assert_eq!((me["user"].as_str(), me["local_mode"].as_bool()), (Some("local"), Some(true)));
    http.json(
        Method::POST,
        "/api/v1/users",
        None,
        Some(json!({ "name": "root", "role": "admin", "password": "correct horse battery" })),
    )
    .await;
    let (status, headers, body) = http.call(Method::GET, "/api/v1/runs", None, None, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"unauthenticated\""), "{body}");
    assert!(headers["www-authenticate"].to_str().unwrap().starts_with("Bearer"));

    // Login: a wrong password and an unknown user look the same; the right one works.
    for (user, password) in [("root", "wrong password!!"), ("nobody", "correct horse battery")] {
        let (status, _, body) = http
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                None,
                Some(json!({ "user": user, "password": password })),
            )
            .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("wrong user name or password"), "{body}");
    }
    let session = http
        .json(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "user": "root", "password": "correct horse battery" })),
        )
        .await;
    let root = session["access_token"].as_str().unwrap().to_owned();
    let refreshed = http
        .json(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": session["refresh_token"] })),
        )
        .await;
    assert!(refreshed["access_token"].is_string());
    let (status, _, _) = http
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            None,
            Some(json!({ "refresh_token": session["refresh_token"] })),
        )
        .await;
    assert_eq!(status, 401, "a refresh token works once");

    // Two users in two projects, and a viewer.
    let root = Some(root.as_str());
    http.json(Method::POST, "/api/v1/projects", root, Some(json!({ "id": "beta" }))).await;
    for (user, role, project) in
        [("alice", "member", "default"), ("bob", "member", "beta"), ("carol", "viewer", "default")]
    {
        http.json(
            Method::POST,
            "/api/v1/users",
            root,
            Some(json!({ "name": user, "role": "member" })),
        )
        .await;
        http.json(
            Method::POST,
            &format!("/api/v1/projects/{project}/members"),
            root,
            Some(json!({ "user": user, "role": role })),
        )
        .await;
    }
    let (status, _, body) = http
        .call(
            Method::POST,
            "/api/v1/projects/beta/members",
            root,
            None,
            Some(json!({ "user": "bob", "role": "viewer" })),
        )
        .await;
    assert_eq!(status, 409, "no double membership: {body}");
    let token = |user: &str, scope: &str| {
        let http = &http;
        let body = json!({ "name": "test", "user": user, "scope": scope });
        async move {
            http.json(Method::POST, "/api/v1/tokens", root, Some(body)).await["token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let alice = token("alice", "write").await;
    let bob = token("bob", "write").await;
    let carol = token("carol", "write").await;
    let alice_read = token("alice", "read").await;

    // Alice's resources.
    let run = http
        .json(
            Method::POST,
            "/api/v1/runs",
            Some(&alice),
            Some(json!({ "request": "Hello World API" })),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    let env = http
        .json(Method::POST, "/api/v1/environments", Some(&alice), Some(json!({ "name": "alpha" })))
        .await;
    let env_id = env["id"].as_str().unwrap().to_owned();
    let tokens: Value = http.json(Method::GET, "/api/v1/tokens", Some(&alice), None).await;
    let alice_token_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["scope"] == "write")
        .and_then(|t| t["id"].as_str())
        .unwrap()
        .to_owned();
    let chat =
        http.json(Method::POST, "/api/v1/chat/sessions", Some(&alice), Some(json!({}))).await;
    let chat_id = chat["id"].as_str().unwrap().to_owned();
    let victim = BTreeMap::from([
        ("chat", chat_id.clone()),
        ("run", run_id.clone()),
        ("environment", env_id.clone()),
        ("attempt", run_id.clone()),
        ("project", "default".to_owned()),
        ("token", alice_token_id.clone()),
        ("user", "alice".to_owned()),
        ("name", "alice".to_owned()),
    ]);

    // Bob walks every route, in his project and in Alice's: never her data.
    let operations = operations(&http).await;
    for (method, template) in &operations {
        let path = fill(template, &victim);
        for project in [None, Some("beta"), Some("default")] {
            let (status, _, body) = http
                .call(method.clone(), &path, Some(&bob), project, body_for(method, template))
                .await;
            assert!(status < 500, "{method} {path} as bob ({project:?}): {status} {body}");
            // An error may echo the id Bob sent; nothing else of Alice's may appear.
            let success = (200..300).contains(&status);
            for secret in [&run_id, &env_id, &alice_token_id, &chat_id] {
                let echoed = !success && path.contains(secret.as_str());
                assert!(
                    echoed || !body.contains(secret.as_str()),
                    "{method} {path} as bob showed alice's data: {status} {body}"
                );
            }
            if (200..300).contains(&status) {
                assert!(!body.contains("\"alice\""), "{method} {path} as bob: {body}");
            }
            // Resources named by id are Alice's; names (a secret's, a user's) in Bob's own
            // project are his to use.
            let named_in_own_project =
                project == Some("beta") && template.starts_with("/api/v1/secrets/");
            let touches_alice = template.contains('{')
                && !template.starts_with("/api/v1/users/")
                && !named_in_own_project;
            if touches_alice {
                assert!(
                    matches!(status, 403 | 404),
                    "{method} {path} as bob ({project:?}): {status} {body}"
                );
            }
            if !(200..300).contains(&status) {
                assert!(body.contains("\"request_id\""), "not problem+json: {body}");
            }
        }
    }
    // Nothing of Alice's changed: her run and environment are there, her token works.
    let (status, _, _) =
        http.call(Method::GET, &format!("/api/v1/runs/{run_id}"), Some(&alice), None, None).await;
    assert_eq!(status, 200);
    let (status, _, _) = http
        .call(Method::GET, &format!("/api/v1/environments/{env_id}"), Some(&alice), None, None)
        .await;
    assert_eq!(status, 200);
    let chat = http
        .json(Method::GET, &format!("/api/v1/chat/sessions/{chat_id}"), Some(&alice), None)
        .await;
    assert_eq!(chat["message_count"], 0, "nobody else said anything in Alice's chat");

    // A viewer and a read-only token read but do not write.
    for reader in [&carol, &alice_read] {
        let (status, _, _) = http
            .call(Method::GET, &format!("/api/v1/runs/{run_id}"), Some(reader), None, None)
            .await;
        assert_eq!(status, 200);
        let (status, _, body) = http
            .call(Method::POST, "/api/v1/runs", Some(reader), None, Some(json!({ "request": "x" })))
            .await;
        assert_eq!(status, 403, "{body}");
    }
    // A member is not an administrator.
    let (status, _, _) = http.call(Method::GET, "/api/v1/audit", Some(&alice), None, None).await;
    assert_eq!(status, 403);

    // Service tokens.
    let worker = http
        .json(
            Method::POST,
            "/api/v1/workers/tokens",
            root,
            Some(json!({ "worker": "w1", "agents": ["scaffold"] })),
        )
        .await;
    let worker = worker["token"].as_str().unwrap().to_owned();
    let (status, _, _) =
        http.call(Method::GET, "/api/v1/workers/config", Some(&worker), None, None).await;
    assert_eq!(status, 200);
    let (status, _, body) = http
        .call(
            Method::POST,
            "/api/v1/tasks/lease",
            Some(&worker),
            None,
            Some(json!({ "agents": ["deploy"], "wait_ms": 0 })),
        )
        .await;
    assert_eq!(status, 403, "an agent type the token does not allow: {body}");
    let (status, _, body) = http.call(Method::GET, "/api/v1/runs", Some(&worker), None, None).await;
    assert_eq!(status, 403, "a worker token on a user endpoint: {body}");
    let (status, _, _) =
        http.call(Method::GET, "/api/v1/workers/config", Some(&alice), None, None).await;
    assert_eq!(status, 403, "a user token on a worker endpoint");
    let key = std::fs::read(data.join("auth/jwt.key")).unwrap();
    let signer = drover_auth::Signer::new(&key).unwrap();
    let other = drover_auth::Signer::new(&drover_auth::Signer::generate_key()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |aud: &str, exp: u64| drover_auth::WorkerClaims {
        sub: "w1".into(),
        aud: aud.into(),
        iss: drover_auth::ISSUER.into(),
        iat: now - 100,
        exp,
        agents: vec![],
    };
    for (forged, why) in [
        (other.sign(&claims(drover_auth::WORKER_AUDIENCE, now + 600)).unwrap(), "another key"),
        (signer.sign(&claims(drover_auth::WORKER_AUDIENCE, now - 60)).unwrap(), "expired"),
        (signer.sign(&claims("someone-else", now + 600)).unwrap(), "wrong audience"),
    ] {
        let (status, _, body) =
            http.call(Method::GET, "/api/v1/workers/config", Some(&forged), None, None).await;
        assert_eq!(status, 401, "{why}: {body}");
    }

    // A revoked token stops working at once.
    let (status, _, _) = http
        .call(Method::DELETE, &format!("/api/v1/tokens/{alice_token_id}"), Some(&alice), None, None)
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = http.call(Method::GET, "/api/v1/runs", Some(&alice), None, None).await;
    assert_eq!(status, 401);

    // The audit log saw it all.
    let audit: Value = http.json(Method::GET, "/api/v1/audit?limit=200", root, None).await;
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for action in [
        "user.create",
        "auth.login",
        "auth.login_failed",
        "token.create",
        "token.revoke",
        "member.add",
        "worker_token.create",
    ] {
        assert!(actions.contains(&action), "no {action} in {actions:?}");
    }
    server.stop().await;

    // On a network address, every route but login, refresh and the probes wants a credential.
    let server = start(config(&data, "0.0.0.0:0", |_| {})).await;
    let http = Http::new(&server.url);
    for (method, template) in operations {
        let path = fill(&template, &victim);
        let (status, _, body) =
            http.call(method.clone(), &path, None, None, body_for(&method, &template)).await;
        let open = template.starts_with("/api/v1/auth/")
            || ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"]
                .contains(&template.as_str());
        if open {
            assert_ne!(status, 500, "{method} {path}: {body}");
        } else {
            assert_eq!(status, 401, "{method} {path} anonymous: {body}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_network_server_without_users_refuses_to_start_and_says_how_to_begin() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        Server::build(config(dir.path(), "0.0.0.0:0", |_| {}), Mode::Full).await.err().unwrap();
    let message = err.to_string();
    assert!(
        message.contains("requires authentication") && message.contains("drover users add"),
        "{message}"
    );
}

#[tokio::test]
async fn idempotency_keys_replay_and_rate_limits_answer_429() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        start(config(dir.path(), "127.0.0.1:0", |c| c.auth.rate_limit_per_minute = 8)).await;
    let http = Http::new(&server.url);
    let post = |key: &'static str, request: &'static str| {
        let http = &http;
        async move {
            let response = http
                .http
                .post(format!("{}/api/v1/runs", http.url))
                .header("idempotency-key", key)
                .json(&json!({ "request": request }))
                .send()
                .await
                .unwrap();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let status = response.status().as_u16();
            (status, replayed, response.json::<Value>().await.unwrap())
        }
    };
    let (status, replayed, first) = post("k-1", "Hello World API").await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let (status, replayed, again) = post("k-1", "Hello World API").await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again["id"], first["id"], "the same run, not a second one");
    let (status, _, problem) = post("k-1", "Todo API").await;
    assert_eq!((status, problem["code"].as_str()), (422, Some("idempotency_key_reused")));

    // 3 requests so far; the limit is 8 a minute.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..8 {
        let response = http.http.get(format!("{}/api/v1/runs", server.url)).send().await.unwrap();
        statuses.push(response.status().as_u16());
        last = Some(response);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "{statuses:?}");
    let refused = last.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(refused.headers()["ratelimit-remaining"], "0");
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");
    let health = http.http.get(format!("{}/healthz", server.url)).send().await.unwrap();
    assert_eq!(health.status(), 200, "probes are not limited");
    server.stop().await;
}

#[tokio::test]
async fn a_token_made_in_local_mode_belongs_to_the_local_admin_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(config(&data, "127.0.0.1:0", |_| {})).await;
    let http = Http::new(&server.url);
    let (status, headers, body) =
        http.call(Method::POST, "/api/v1/tokens", None, None, Some(json!({ "name": "x" }))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let created: Value = serde_json::from_str(&body).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("drv_"), "{created}");
    assert_eq!(
        (created["user"].as_str(), created["name"].as_str(), created["scope"].as_str()),
        (Some("local"), Some("x"), Some("write")),
        "{created}"
    );
    let (status, _, body) = http
        .call(
            Method::POST,
            "/api/v1/tokens",
            None,
            None,
            Some(json!({ "name": "r", "scope": "read" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let read_only =
        serde_json::from_str::<Value>(&body).unwrap()["token"].as_str().unwrap().to_owned();

    // The token proves the local admin; the read-only one reads and does not write.
    let me = http.json(Method::GET, "/api/v1/me", Some(&token), None).await;
    assert_eq!((me["user"].as_str(), me["role"].as_str()), (Some("local"), Some("admin")), "{me}");
    let (status, _, body) = http
        .call(Method::POST, "/api/v1/runs", Some(&read_only), None, Some(json!({ "request": "x" })))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"forbidden\""), "{body}");
    let listed = http.json(Method::GET, "/api/v1/tokens", Some(&read_only), None).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    // Making it did not end local mode, here or after a restart.
    assert_eq!(http.json(Method::GET, "/api/v1/me", None, None).await["local_mode"], true);
    server.stop().await;
    let server = start(config(&data, "127.0.0.1:0", |_| {})).await;
    let http = Http::new(&server.url);
    assert_eq!(http.json(Method::GET, "/api/v1/me", None, None).await["local_mode"], true);
    let me = http.json(Method::GET, "/api/v1/me", Some(&token), None).await;
    assert_eq!(me["user"], "local", "{me}");

    // The first user ends local mode; the local admin's token stays an admin's credential.
    http.json(
        Method::POST,
        "/api/v1/users",
        None,
        Some(json!({ "name": "root", "role": "admin", "password": "correct horse battery" })),
    )
    .await;
    let (status, _, _) = http.call(Method::GET, "/api/v1/runs", None, None, None).await;
    assert_eq!(status, 401);
    let (status, _, body) = http.call(Method::GET, "/api/v1/users", Some(&token), None, None).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// The `RateLimit-*` headers of an answer, as numbers, and its `Retry-After` if any.
fn rate_limit_headers(headers: &reqwest::header::HeaderMap) -> (u64, u64, u64, Option<u64>) {
    let number = |name: &str| -> Option<u64> {
        headers.get(name).map(|v| v.to_str().unwrap().parse().unwrap())
    };
    let limit = number("ratelimit-limit").expect("RateLimit-Limit");
    let remaining = number("ratelimit-remaining").expect("RateLimit-Remaining");
    let reset = number("ratelimit-reset").expect("RateLimit-Reset");
    (limit, remaining, reset, number("retry-after"))
}

/// A `429 rate_limited` problem from a bucket of `limit` a minute: none left, one more
/// within a request's refill time (`Retry-After`), full again the other `limit - 1` later.
fn assert_refused((status, headers, body): (u16, reqwest::header::HeaderMap, String), limit: u64) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], "rate_limited");
    let (limit_header, remaining, reset, retry) = rate_limit_headers(&headers);
    let retry = retry.expect("Retry-After");
    assert_eq!((limit_header, remaining), (limit, 0));
    let per_request = 60 / limit;
    assert!((1..=per_request).contains(&retry), "Retry-After {retry}");
    assert_eq!(reset, retry + (limit - 1) * per_request, "RateLimit-Reset");
}

#[tokio::test]
async fn every_answer_carries_the_rate_limit_of_its_tightest_bucket_and_a_429_says_when_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path(), "127.0.0.1:0", |c| {
        c.auth.rate_limit_per_minute = 4;
        c.auth.ip_rate_limit_per_minute = 6;
    }))
    .await;
    let http = Http::new(&server.url);

    // Anonymous: the caller's bucket (4 a minute) is the tighter one.
    for remaining in [3, 2, 1, 0] {
        let (status, headers, body) =
            http.call(Method::GET, "/api/v1/runs", None, None, None).await;
        assert_eq!(status, 200, "{body}");
        let (limit, left, reset, retry) = rate_limit_headers(&headers);
        assert_eq!((limit, left, retry), (4, remaining, None));
        // Seconds until the bucket is full again: 15 per request taken.
        assert_eq!(reset, (4 - remaining) * 15);
    }
    assert_refused(http.call(Method::GET, "/api/v1/runs", None, None, None).await, 4);

    // Other credentials from the same address: each has a bucket of its own, the address's
    // (6 a minute, 5 taken) is the tighter one, until it refuses.
    let (status, headers, _) =
        http.call(Method::GET, "/api/v1/runs", Some("not-a-token-1"), None, None).await;
    assert_eq!(status, 401);
    assert_eq!(rate_limit_headers(&headers), (6, 0, 60, None));
    let refused = http.call(Method::GET, "/api/v1/runs", Some("not-a-token-2"), None, None).await;
    assert_refused(refused, 6);
    server.stop().await;
}
