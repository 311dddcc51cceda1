//! A property test over the whole HTTP surface: every operation of the served OpenAPI
//! document is called with generated inputs — path parameters (ids, names, traversal,
//! unicode, very long), query strings, bodies built from the operation's schema with right
//! and wrong types, malformed JSON, wrong content types — and must never answer 5xx, and
//! must answer every error as problem+json (`code`, `request_id`, `status` matching).
//!
//! The generator is seeded (`DROVER_FUZZ_SEED`, printed on failure) so any failure can be
//! replayed; `DROVER_FUZZ_CASES` sets the cases per operation (default 40).

use std::path::Path;
use std::time::Duration;

use drover_config::Config;
use drover_server::{Mode, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

const NASTY: &[&str] = &[
    "",
    " ",
    "..",
    "../../etc/passwd",
    "%2e%2e%2f",
    "%00",
    "null",
    "-1",
    "0",
    "99999999999999999999999",
    "01a2018e-6ce0-7296-a575-14a55cd12791",
    "not-a-uuid",
    "ÄÖÜ-ünïcödé-🚀",
    "a\u{7f}b",
    "<script>",
    "'; DROP TABLE runs; --",
    "scaffold.1.log",
    "default",
    "local",
];

fn random_text(rng: &mut StdRng) -> String {
    match rng.random_range(0..5) {
        0 => NASTY[rng.random_range(0..NASTY.len())].to_owned(),
        1 => "x".repeat(rng.random_range(200..5000)),
        2 => (0..rng.random_range(1..20)).map(|_| rng.random_range('a'..='z')).collect(),
        3 => (0..rng.random_range(1..12))
            .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
            .collect(),
        _ => format!("{}", rng.random::<u32>()),
    }
}

fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random_range(-1_000_000i64..1_000_000_000_000)),
        3 => json!(rng.random::<f64>() * 1e6 - 5e5),
        4 => json!(random_text(rng)),
        5 => Value::Array(
            (0..rng.random_range(0..4)).map(|_| random_value(rng, depth + 1)).collect(),
        ),
        _ => {
            let mut object = Map::new();
            for _ in 0..rng.random_range(0..4) {
                object.insert(random_text(rng), random_value(rng, depth + 1));
            }
            Value::Object(object)
        }
    }
}

/// A value for a schema: usually of its type, sometimes anything.
fn value_for(rng: &mut StdRng, doc: &Value, schema: &Value, depth: u32) -> Value {
    if rng.random_ratio(1, 6) || depth > 4 {
        return random_value(rng, depth);
    }
    let schema = resolve(doc, schema);
    if let Some(options) =
        schema.get("oneOf").or_else(|| schema.get("anyOf")).and_then(Value::as_array)
        && !options.is_empty()
    {
        let pick = &options[rng.random_range(0..options.len())];
        return value_for(rng, doc, pick, depth + 1);
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.iter().filter_map(Value::as_str).find(|k| *k != "null"),
        Some(Value::String(kind)) => Some(kind.as_str()),
        _ => None,
    };
    match kind {
        Some("string") => json!(random_text(rng)),
        Some("integer") => json!(rng.random_range(-10i64..100_000)),
        Some("number") => json!(rng.random::<f64>() * 1000.0),
        Some("boolean") => json!(rng.random::<bool>()),
        Some("array") => {
            let items = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| value_for(rng, doc, &items, depth + 1))
                    .collect(),
            )
        }
        Some("object") | None => {
            let mut object = Map::new();
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    if rng.random_ratio(4, 5) {
                        object.insert(name.clone(), value_for(rng, doc, property, depth + 1));
                    }
                }
            }
            if rng.random_ratio(1, 8) {
                object.insert(random_text(rng), random_value(rng, depth + 1));
            }
            Value::Object(object)
        }
        Some(_) => random_value(rng, depth),
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix("#/")
            .map(|path| path.split('/').fold(doc, |node, key| &node[key]))
            .unwrap_or(schema),
        None => schema,
    }
}

fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn start(
    data_dir: &Path,
) -> (String, CancellationToken, tokio::task::JoinHandle<Result<(), drover_server::ServerError>>) {
    let mut config = Config { data_dir: data_dir.to_path_buf(), ..Config::default() };
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.enabled = false;
    // Runs are accepted and queued; nobody works on them.
    config.workers.embedded = false;
    config.auth.rate_limit_per_minute = 1_000_000;
    config.auth.ip_rate_limit_per_minute = 1_000_000;
    (config.environments.port_range_start, config.environments.port_range_end) =
        drover_testkit::port_range(200);
    let server = Server::build(config, Mode::Full).await.unwrap();
    let url = server.url();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    (url, shutdown, task)
}

#[tokio::test]
async fn no_generated_request_gets_a_5xx_or_an_error_that_is_not_problem_json() {
    let seed: u64 = std::env::var("DROVER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let cases: usize =
        std::env::var("DROVER_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (url, shutdown, task) = start(&dir.path().join("data")).await;
    let http =
        reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();

    // Something to find: a run, an environment.
    let run: Value = http
        .post(format!("{url}/api/v1/runs"))
        .json(&json!({ "request": "Hello World API" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = run["id"].as_str().unwrap().to_owned();

    let doc: Value =
        http.get(format!("{url}/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if let Some(operation) = item.get(method) {
                operations.push((method.to_uppercase(), path.clone(), operation.clone()));
            }
        }
    }
    let mut sent = 0usize;
    for (method, template, operation) in &operations {
        // The event stream and log follow stay open while the run lives: one plain call
        // each is checked, not a storm of them.
        let streaming = template.ends_with("/events") || template.ends_with("/logs");
        let body_schema =
            operation.pointer("/requestBody/content/application~1json/schema").cloned();
        let query_names: Vec<String> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
        for case in 0..if streaming { 3 } else { cases } {
            let mut path = String::new();
            for segment in template.split('/') {
                if segment.starts_with('{') {
                    let value = match rng.random_range(0..4) {
                        0 => run_id.clone(),
                        _ => random_text(&mut rng),
                    };
                    path.push_str(&encode(&value));
                } else {
                    path.push_str(segment);
                }
                path.push('/');
            }
            path.pop();
            let mut query = Vec::new();
            for name in &query_names {
                if streaming && name == "follow" {
                    continue;
                }
                if rng.random_ratio(1, 2) {
                    query.push((name.clone(), random_text(&mut rng)));
                }
            }
            if rng.random_ratio(1, 10) {
                query.push((random_text(&mut rng), random_text(&mut rng)));
            }
            let method: Method = method.parse().unwrap();
            let mut request = http.request(method.clone(), format!("{url}{path}")).query(&query);
            let shape = rng.random_range(0..10);
            if method != Method::GET && method != Method::DELETE {
                request = match (shape, &body_schema) {
                    (0, _) => request.header("content-type", "application/json").body("{not json"),
                    (1, _) => request.header("content-type", "text/plain").body("hello"),
                    (2, _) => request,
                    (3, _) => request.json(&random_value(&mut rng, 0)),
                    (_, Some(schema)) => {
                        let mut body = value_for(&mut rng, &doc, schema, 0);
                        // A lease long-polls for up to its `wait_ms`: keep the calls short.
                        if template == "/api/v1/tasks/lease"
                            && let Some(object) = body.as_object_mut()
                        {
                            object.insert("wait_ms".to_owned(), json!(rng.random_range(0..50)));
                        }
                        request.json(&body)
                    }
                    (_, None) => request.json(&random_value(&mut rng, 0)),
                };
            }
            if rng.random_ratio(1, 12) {
                request = request
                    .header("authorization", format!("Bearer {}", encode(&random_text(&mut rng))));
            }
            if rng.random_ratio(1, 12) {
                request = request.header("x-drover-project", encode(&random_text(&mut rng)));
            }
            let response = request.send().await.unwrap_or_else(|err| {
                panic!("seed {seed}, case {case}: {method} {path}: no answer: {err}")
            });
            sent += 1;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = if streaming && status < 300 {
                String::new()
            } else {
                response.text().await.unwrap_or_default()
            };
            assert!(
                status < 500,
                "seed {seed}, case {case}: {method} {path}?{query:?} → {status}: {body}"
            );
            if status >= 400 {
                assert_eq!(
                    content_type, "application/problem+json",
                    "seed {seed}: {method} {path} → {status}: {body}"
                );
                let problem: Value = serde_json::from_str(&body).unwrap_or_else(|_| {
                    panic!("seed {seed}: {method} {path} → {status}: not JSON: {body}")
                });
                assert_eq!(problem["status"], status, "seed {seed}: {body}");
                assert!(
                    problem["code"].is_string() && problem["request_id"].is_string(),
                    "seed {seed}: {body}"
                );
            }
        }
    }
    assert!(sent > 1000, "only {sent} requests");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap().unwrap();
}
