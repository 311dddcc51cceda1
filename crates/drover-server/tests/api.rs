//! The real server on port 0 with its own data directory, driven over HTTP: the main job
//! end to end, every bad input's status and code, the event stream, logs and pagination.

use std::time::Duration;

use drover_config::Config;
use drover_server::{Mode, Server};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct TestServer {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), drover_server::ServerError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.proxy.listen = "127.0.0.1:0".parse().unwrap();
        config.engine.heartbeat_interval = Duration::from_millis(500);
        tweak(&mut config);
        let server = Server::build(config, Mode::Full).await.expect("server builds");
        let url = server.url();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { url, http, shutdown, task: Some(task), _dir: dir }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(self.at(path)).json(&body).send().await.unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.at(path)).send().await.unwrap()
    }

    async fn submit(&self, request: &str) -> Value {
        let response = self.post_json("/api/v1/runs", json!({ "request": request })).await;
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    async fn wait_finished(&self, id: &str) -> Value {
        for _ in 0..600 {
            let run: Value = self.get(&format!("/api/v1/runs/{id}")).await.json().await.unwrap();
            if matches!(run["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("run {id} did not finish");
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

/// Asserts a problem+json response: status, code, and the request id in body and header.
async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status for {code}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let header_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], code, "{problem}");
    assert_eq!(problem["status"], status);
    assert_eq!(problem["request_id"], header_id.as_str());
    for field in ["type", "title", "detail"] {
        assert!(problem[field].as_str().is_some_and(|s| !s.is_empty()), "{field} in {problem}");
    }
    problem
}

#[tokio::test]
async fn hello_world_api_runs_to_succeeded_and_its_app_answers_until_the_server_stops() {
    let server = TestServer::spawn().await;
    let created = server.submit("Hello World API").await;
    assert_eq!(created["status"], "queued");
    let id = created["id"].as_str().unwrap().to_owned();

    let run = server.wait_finished(&id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let attempts = run["attempts"].as_array().unwrap();
    let stages: Vec<&str> = attempts.iter().map(|a| a["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["scaffold", "validate", "e2e", "integration", "deploy"]);
    assert!(attempts.iter().all(|a| a["status"] == "succeeded"));
    assert_eq!(attempts[0]["output"]["template"], "hello-world-api");

    let deployment = &run["deployment"];
    assert_eq!(deployment["live"], true);
    let url = deployment["url"].as_str().unwrap().to_owned();
    let answer: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert!(answer["message"].as_str().unwrap().contains("Hello, World"), "{answer}");

    // The same app through the routing proxy, by its stable hostname.
    let routed = deployment["routed_url"].as_str().unwrap();
    let hostname = deployment["hostname"].as_str().unwrap();
    assert!(routed.starts_with(&format!("http://{hostname}:")), "{routed}");
    let proxy_port = routed.trim_end_matches('/').rsplit(':').next().unwrap();
    let through_proxy: Value = server
        .http
        .get(format!("http://127.0.0.1:{proxy_port}/"))
        .header("host", hostname)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(through_proxy, answer);

    let pid = deployment["pid"].as_u64().unwrap() as i32;
    server.stop().await;
    assert!(reqwest::get(&url).await.is_err(), "the app outlived the server");
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'));
    assert!(!alive, "deployed app {pid} was orphaned");
}

#[tokio::test]
async fn every_bad_input_gets_its_own_code_and_changes_nothing() {
    let server = TestServer::spawn().await;
    let runs = "/api/v1/runs";
    let raw = |body: &'static str, content_type: &'static str| {
        server.http.post(server.at(runs)).header("content-type", content_type).body(body).send()
    };

    assert_problem(raw("{\"request\": ", "application/json").await.unwrap(), 400, "malformed_json")
        .await;
    assert_problem(raw("", "application/json").await.unwrap(), 400, "empty_body").await;
    assert_problem(
        raw("request=hi", "application/x-www-form-urlencoded").await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;

    let unknown = assert_problem(
        server.post_json(runs, json!({ "request": "Hello", "colour": "blue" })).await,
        422,
        "unknown_field",
    )
    .await;
    assert_eq!(unknown["errors"][0]["field"], "colour");

    let empty = assert_problem(
        server.post_json(runs, json!({ "request": "   " })).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(empty["errors"], json!([{ "field": "request", "message": "must not be empty" }]));

    let missing =
        assert_problem(server.post_json(runs, json!({})).await, 422, "invalid_body").await;
    assert_eq!(missing["errors"][0]["field"], "request");

    let pipeline = assert_problem(
        server.post_json(runs, json!({ "request": "Hello", "pipeline": "nope" })).await,
        422,
        "unknown_pipeline",
    )
    .await;
    assert!(pipeline["detail"].as_str().unwrap().contains("sdlc"), "names the known pipelines");

    let unknown_run = "/api/v1/runs/01a2001a-39f1-7541-b586-cc5e4504a789";
    assert_problem(server.get(unknown_run).await, 404, "run_not_found").await;
    assert_problem(server.get("/api/v1/runs/not-a-run-id").await, 404, "run_not_found").await;
    assert_problem(server.get(&format!("{unknown_run}/logs")).await, 404, "run_not_found").await;
    assert_problem(server.get(&format!("{unknown_run}/events")).await, 404, "run_not_found").await;
    assert_problem(
        server.http.post(server.at(&format!("{unknown_run}/cancel"))).send().await.unwrap(),
        404,
        "run_not_found",
    )
    .await;
    assert_problem(server.get("/api/v1/runs?limit=0").await, 400, "invalid_query").await;
    assert_problem(server.get("/api/v1/runs?status=done").await, 400, "invalid_query").await;
    assert_problem(server.get("/api/v1/runs?cursor=garbage").await, 400, "invalid_query").await;
    assert_problem(server.get("/api/v1/runs?bogus=1").await, 400, "invalid_query").await;
    assert_problem(server.get("/api/v1/nothing-here").await, 404, "route_not_found").await;
    assert_problem(
        server.http.delete(server.at(runs)).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    let huge = json!({ "request": "x".repeat(2 * 1024 * 1024) });
    assert_problem(server.post_json(runs, huge).await, 413, "payload_too_large").await;

    let page: Value = server.get(runs).await.json().await.unwrap();
    assert_eq!(page["items"], json!([]), "a rejected request created a run");
    server.stop().await;
}

#[tokio::test]
async fn a_client_request_id_is_echoed_in_the_header_and_the_problem() {
    let server = TestServer::spawn().await;
    let response = server
        .http
        .get(server.at("/api/v1/runs/nope"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["request_id"], "trace-me-42");

    let generated = server.get("/healthz").await;
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID is generated when none is sent: {id}");
    server.stop().await;
}

#[tokio::test]
async fn the_event_stream_replays_then_resumes_after_last_event_id_without_gaps_or_duplicates() {
    let server = TestServer::spawn().await;
    let id = server.submit("Static Site").await["id"].as_str().unwrap().to_owned();

    // Follow live from the start until the stream ends with the run.
    let all = sse_events(&server, &id, None).await;
    let kinds: Vec<&str> = all.iter().map(|(_, e)| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"run.queued"));
    assert_eq!(kinds.last(), Some(&"run.succeeded"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "stage.succeeded").count(), 5);
    let seqs: Vec<i64> = all.iter().map(|(seq, _)| *seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence strictly increases: {seqs:?}");

    // Resume after the fourth event: exactly the rest, in order.
    let resumed = sse_events(&server, &id, Some(seqs[3])).await;
    let resumed_seqs: Vec<i64> = resumed.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(resumed_seqs, seqs[4..]);
    server.stop().await;
}

async fn sse_events(server: &TestServer, id: &str, after: Option<i64>) -> Vec<(i64, Value)> {
    let mut request = server.http.get(server.at(&format!("/api/v1/runs/{id}/events")));
    if let Some(after) = after {
        request = request.header("last-event-id", after.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = String::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the stream ends with the run");
    body.split("\n\n")
        .filter_map(|block| {
            let mut seq = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(id) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                    seq = id.trim().parse().ok();
                }
                if let Some(json) =
                    line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:"))
                {
                    data = serde_json::from_str(json).ok();
                }
            }
            Some((seq?, data?))
        })
        .collect()
}

#[tokio::test]
async fn logs_show_each_stage_and_a_finished_run_cannot_be_cancelled() {
    let server = TestServer::spawn().await;
    let id = server.submit("Todo API").await["id"].as_str().unwrap().to_owned();
    let run = server.wait_finished(&id).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let logs = server.get(&format!("/api/v1/runs/{id}/logs")).await;
    assert_eq!(logs.headers()["content-type"], "text/plain; charset=utf-8");
    let logs = logs.text().await.unwrap();
    for stage in ["scaffold", "validate", "e2e", "integration", "deploy"] {
        assert!(
            logs.contains(&format!("==> {stage} attempt 1 (succeeded) <==")),
            "{stage} missing in:\n{logs}"
        );
    }
    assert!(logs.contains("wrote app.py"), "{logs}");
    assert!(logs.contains("Ran 4 tests"), "{logs}");
    let only_integration = server
        .get(&format!("/api/v1/runs/{id}/logs?stage=integration"))
        .await
        .text()
        .await
        .unwrap();
    assert!(only_integration.contains("Ran 4 tests") && !only_integration.contains("wrote app.py"));

    let cancel =
        server.http.post(server.at(&format!("/api/v1/runs/{id}/cancel"))).send().await.unwrap();
    assert_problem(cancel, 409, "run_already_finished").await;
    server.stop().await;
}

#[tokio::test]
async fn cancelling_an_unfinished_run_stops_it() {
    let server = TestServer::spawn().await;
    let id = server.submit("Hello World API").await["id"].as_str().unwrap().to_owned();
    let cancelled =
        server.http.post(server.at(&format!("/api/v1/runs/{id}/cancel"))).send().await.unwrap();
    assert_eq!(cancelled.status(), 200);
    let run = server.wait_finished(&id).await;
    assert_eq!(run["status"], "cancelled");
    // Nothing of the run keeps running after a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later: Value = server.get(&format!("/api/v1/runs/{id}")).await.json().await.unwrap();
    let active = later["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| matches!(a["status"].as_str(), Some("pending" | "dispatched" | "running")))
        .count();
    assert_eq!(active, 0, "{later}");
    assert_eq!(later["deployment"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn runs_are_listed_newest_first_in_pages() {
    let server = TestServer::spawn().await;
    let mut ids = Vec::new();
    for request in ["first", "second", "third"] {
        let id = server.submit(request).await["id"].as_str().unwrap().to_owned();
        server.http.post(server.at(&format!("/api/v1/runs/{id}/cancel"))).send().await.unwrap();
        ids.push(id);
    }
    let page: Value = server.get("/api/v1/runs?limit=2").await.json().await.unwrap();
    let listed: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let next: Value =
        server.get(&format!("/api/v1/runs?limit=2&cursor={cursor}")).await.json().await.unwrap();
    assert_eq!(next["items"][0]["id"], ids[0].as_str());
    assert_eq!(next["next_cursor"], Value::Null);
    let cancelled: Value = server.get("/api/v1/runs?status=cancelled").await.json().await.unwrap();
    assert_eq!(cancelled["items"].as_array().unwrap().len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn health_readiness_metrics_pipelines_and_openapi_answer() {
    let server = TestServer::spawn().await;
    let health: Value = server.get("/healthz").await.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    // Ready, and (alone on its store) it takes the leader lease at once.
    let mut ready: Value = server.get("/readyz").await.json().await.unwrap();
    for _ in 0..50 {
        if ready["checks"]["leader"] == "yes" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = server.get("/readyz").await.json().await.unwrap();
    }
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["store"], "ok");
    assert_eq!(ready["checks"]["leader"], "yes", "{ready}");
    let pool = ready["checks"]["store_pool"].as_str().unwrap();
    assert!(pool.starts_with("sqlite ") && pool.contains(" open, "), "{pool}");

    let pipelines: Value = server.get("/api/v1/pipelines").await.json().await.unwrap();
    assert_eq!(pipelines["items"][0]["name"], "sdlc");
    assert_eq!(pipelines["items"][0]["stages"].as_array().unwrap().len(), 5);

    let openapi: Value = server.get("/api/v1/openapi.json").await.json().await.unwrap();
    for path in [
        "/api/v1/runs",
        "/api/v1/runs/{id}",
        "/api/v1/runs/{id}/cancel",
        "/api/v1/runs/{id}/events",
        "/api/v1/runs/{id}/logs",
        "/healthz",
        "/readyz",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} missing from OpenAPI");
    }
    assert!(openapi["components"]["schemas"]["Problem"].is_object());

    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("drover_http_requests_total"), "{metrics}");
    server.stop().await;
}

/// Issue 15, point 8: what the OpenAPI document's schemas forbid, the server refuses, and
/// what they allow it takes; its query parameters are where the server reads them.
#[tokio::test]
async fn the_server_refuses_what_its_openapi_schemas_forbid_and_takes_what_they_allow() {
    let server = TestServer::spawn_with(|config| config.workers.embedded = false).await;
    let doc: Value = server.get("/api/v1/openapi.json").await.json().await.unwrap();
    let list_runs = doc["paths"]["/api/v1/runs"]["get"]["parameters"].as_array().unwrap();
    let placed: Vec<(&str, &str)> = list_runs
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["in"].as_str().unwrap()))
        .collect();
    for query in ["limit", "cursor", "status"] {
        assert!(placed.contains(&(query, "query")), "{query} is not in the query: {placed:?}");
    }
    let tokens = &doc["components"]["schemas"]["BudgetBody"]["properties"]["tokens"];
    assert_eq!(
        (tokens["format"].as_str(), tokens["maximum"].as_i64()),
        (Some("int64"), Some(i64::MAX))
    );

    // Beyond the declared int64, and `null` where the schema wants a number.
    let beyond = json!({ "request": "x", "budget": { "tokens": 9_223_372_036_854_775_808_u64 } });
    let problem =
        assert_problem(server.post_json("/api/v1/runs", beyond).await, 422, "validation_failed")
            .await;
    assert_eq!(problem["errors"][0]["field"], "budget.tokens", "{problem}");
    let null = json!({ "request": "x", "budget": { "tokens": null, "cost_usd": 1.0 } });
    assert_problem(server.post_json("/api/v1/runs", null).await, 422, "invalid_body").await;
    let blank = json!({ "request": " \n\t " });
    assert_problem(server.post_json("/api/v1/runs", blank).await, 422, "validation_failed").await;
    // An array is no object, even one that serde could read as the struct's fields.
    let array = server.post_json("/api/v1/environments", json!([null, null, null, null])).await;
    assert_problem(array, 422, "invalid_body").await;
    let environments: Value = server.get("/api/v1/environments").await.json().await.unwrap();
    assert_eq!(environments["items"], json!([]), "a refused request changes nothing");

    // `3.0` is the integer 3 to JSON Schema; `null` is an optional body left out.
    let hours = json!({ "worker": "w1", "expires_in_hours": 24.0 });
    assert_eq!(server.post_json("/api/v1/workers/tokens", hours).await.status(), 201);
    let run = server.submit("Hello World API").await;
    let id = run["id"].as_str().unwrap();
    let approve = server
        .http
        .post(server.at(&format!("/api/v1/runs/{id}/stages/scaffold/approve")))
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_problem(approve, 409, "not_waiting_approval").await;
    server.stop().await;
}

/// Plays an external worker over HTTP: leases one task of `agent` and reports `result`.
async fn work_one(server: &TestServer, agent: &str, result: Value) -> Value {
    let response = server
        .post_json("/api/v1/tasks/lease", json!({ "agents": [agent], "wait_ms": 10_000 }))
        .await;
    assert_eq!(response.status(), 200, "no {agent} task to lease");
    let task: Value = response.json().await.unwrap();
    let started = json!({ "type": "started", "attempt_id": task["task_id"], "token": task["fencing_token"], "worker_id": "test-worker" });
    let answer = server.post_json("/api/v1/worker-messages", started).await;
    assert_eq!(answer.status(), 202);
    let mut finished = json!({ "type": "finished", "attempt_id": task["task_id"], "token": task["fencing_token"], "worker_id": "test-worker" });
    finished["result"] = result;
    assert_eq!(server.post_json("/api/v1/worker-messages", finished).await.status(), 202);
    task
}

async fn attempts_of(server: &TestServer, run: &str) -> Vec<Value> {
    let run: Value = server.get(&format!("/api/v1/runs/{run}")).await.json().await.unwrap();
    run["attempts"].as_array().unwrap().clone()
}

#[tokio::test]
async fn an_always_failing_stage_lands_in_the_dlq_and_a_redrive_runs_it_again() {
    let server = TestServer::spawn_with(|config| config.workers.embedded = false).await;
    let run = server.submit("Hello World API").await["id"].as_str().unwrap().to_owned();

    // No worker serves `scaffold` yet: the run says it is waiting for one.
    let waiting = attempts_of(&server, &run).await;
    assert_eq!(waiting[0]["waiting_for_worker"], true, "{waiting:?}");

    let failure = json!({ "status": "failed", "error": "the model is down", "retryable": true });
    for attempt in 1..=3 {
        let task = work_one(&server, "scaffold", failure.clone()).await;
        assert_eq!(task["attempt"], attempt);
    }
    let run_view = server.wait_finished(&run).await;
    assert_eq!(run_view["status"], "failed");
    let letters: Value = server.get("/api/v1/dlq").await.json().await.unwrap();
    let items = letters["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{letters}");
    assert_eq!(
        (items[0]["stage"].as_str(), items[0]["attempt"].as_u64()),
        (Some("scaffold"), Some(3))
    );
    assert_eq!(items[0]["error"], "the model is down");
    let letter = items[0]["id"].as_str().unwrap().to_owned();

    let redriven =
        server.http.post(server.at(&format!("/api/v1/dlq/{letter}/redrive"))).send().await.unwrap();
    assert_eq!(redriven.status(), 200);
    let retry: Value = redriven.json().await.unwrap();
    assert_eq!(retry["attempt"], 4);
    let dlq: Value = server.get("/api/v1/dlq").await.json().await.unwrap();
    assert_eq!(dlq["items"], json!([]), "redriven letters leave the queue");
    let again =
        server.http.post(server.at(&format!("/api/v1/dlq/{letter}/redrive"))).send().await.unwrap();
    assert_problem(again, 409, "not_dead_lettered").await;

    // This time every stage succeeds and the run completes.
    for stage in ["scaffold", "validate", "e2e", "integration", "deploy"] {
        work_one(&server, stage, json!({ "status": "succeeded", "output": { "stage": stage } }))
            .await;
    }
    let done = server.wait_finished(&run).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    server.stop().await;
}

#[tokio::test]
async fn dlq_ids_that_do_not_exist_or_are_not_dead_letters_are_refused() {
    let server = TestServer::spawn_with(|config| config.workers.embedded = false).await;
    let missing = "01a2001a-39f1-7541-b586-cc5e4504a789";
    let redrive = server
        .http
        .post(server.at(&format!("/api/v1/dlq/{missing}/redrive")))
        .send()
        .await
        .unwrap();
    assert_problem(redrive, 404, "dead_letter_not_found").await;
    let garbage = server.http.post(server.at("/api/v1/dlq/garbage/discard")).send().await.unwrap();
    assert_problem(garbage, 404, "dead_letter_not_found").await;

    let run = server.submit("Hello World API").await["id"].as_str().unwrap().to_owned();
    let pending = attempts_of(&server, &run).await[0]["id"].as_str().unwrap().to_owned();
    let discard = server
        .http
        .post(server.at(&format!("/api/v1/dlq/{pending}/discard")))
        .send()
        .await
        .unwrap();
    assert_problem(discard, 409, "not_dead_lettered").await;
    assert_problem(server.get("/api/v1/dlq?limit=0").await, 400, "invalid_query").await;
    server.stop().await;
}

#[tokio::test]
async fn a_heartbeat_for_a_cancelled_attempt_is_told_to_stop() {
    let server = TestServer::spawn_with(|config| config.workers.embedded = false).await;
    let run = server.submit("Hello World API").await["id"].as_str().unwrap().to_owned();
    let lease = server
        .post_json("/api/v1/tasks/lease", json!({ "agents": ["scaffold"], "wait_ms": 10_000 }))
        .await;
    let task: Value = lease.json().await.unwrap();
    let ids =
        json!({ "attempt_id": task["task_id"], "token": task["fencing_token"], "worker_id": "w" });
    let mut started = ids.clone();
    started["type"] = json!("started");
    server.post_json("/api/v1/worker-messages", started).await;

    let mut heartbeat = ids.clone();
    heartbeat["type"] = json!("heartbeat");
    let ack: Value =
        server.post_json("/api/v1/worker-messages", heartbeat.clone()).await.json().await.unwrap();
    assert_eq!(ack["cancel"], false);

    server.http.post(server.at(&format!("/api/v1/runs/{run}/cancel"))).send().await.unwrap();
    let ack: Value =
        server.post_json("/api/v1/worker-messages", heartbeat).await.json().await.unwrap();
    assert_eq!(ack["cancel"], true);

    let workers: Value = server.get("/api/v1/workers").await.json().await.unwrap();
    assert_eq!(workers["items"], json!([]), "a server without embedded workers has none");
    let nothing = server
        .post_json("/api/v1/tasks/lease", json!({ "agents": ["deploy"], "wait_ms": 100 }))
        .await;
    assert_eq!(nothing.status(), 204);
    let bad = server.post_json("/api/v1/tasks/lease", json!({ "agents": ["Not Valid"] })).await;
    assert_problem(bad, 422, "validation_failed").await;
    server.stop().await;
}

/// The store statements a response says its request ran (`Server-Timing`).
fn statements(response: &reqwest::Response) -> u64 {
    let timing = response.headers()["server-timing"].to_str().unwrap();
    let (_, rest) = timing.split_once("store;desc=\"").expect(timing);
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn list_endpoints_run_as_many_statements_for_one_item_as_for_a_full_page() {
    let server = TestServer::spawn_with(|config| {
        config.workers.embedded = false;
        config.agents.insert(
            "assistant".to_owned(),
            drover_config::AgentConfig {
                kind: Some(drover_config::AgentKindConfig::Llm),
                base_url: Some("http://127.0.0.1:1/v1".to_owned()),
                model: Some("m".to_owned()),
                ..drover_config::AgentConfig::default()
            },
        );
    })
    .await;
    for n in 0..25 {
        server.submit(&format!("run {n}")).await;
        let chat = server.post_json("/api/v1/chat/sessions", json!({})).await;
        assert_eq!(chat.status(), 201);
    }
    for n in 0..3 {
        let env =
            server.post_json("/api/v1/environments", json!({ "name": format!("e{n}") })).await;
        assert_eq!(env.status(), 201);
    }
    for list in ["/api/v1/runs", "/api/v1/chat/sessions", "/api/v1/environments", "/api/v1/dlq"] {
        let one = server.get(&format!("{list}?limit=1")).await;
        assert_eq!(one.status(), 200, "{list}");
        let page = server.get(&format!("{list}?limit=100")).await;
        assert_eq!(page.status(), 200, "{list}");
        let (few, many) = (statements(&one), statements(&page));
        assert!(many >= 1, "{list} ran no statement?");
        assert_eq!(few, many, "{list}: {few} statements for 1 item, {many} for a page");
    }
    // A run with all its attempts: a constant too.
    let page: Value = server.get("/api/v1/runs?limit=1").await.json().await.unwrap();
    let id = page["items"][0]["id"].as_str().unwrap();
    let run = server.get(&format!("/api/v1/runs/{id}")).await;
    assert!(statements(&run) <= 4, "GET /runs/{{id}}: {}", statements(&run));
    server.stop().await;
}

#[tokio::test]
async fn a_path_parameter_that_is_not_utf8_is_a_400_invalid_path_problem_on_every_route() {
    let server = TestServer::spawn().await;
    let send = |method: reqwest::Method, path: String| {
        server.http.request(method, server.at(&path)).send()
    };
    use reqwest::Method;
    for (method, path) in [
        (Method::GET, "/api/v1/runs/%FF%FE"),
        (Method::GET, "/api/v1/environments/%FF"),
        (Method::GET, "/api/v1/webhooks/%FF"),
        (Method::GET, "/api/v1/runs/x/artifacts/%FF"),
        (Method::PUT, "/api/v1/secrets/%FF"),
    ] {
        let problem =
            assert_problem(send(method, path.to_owned()).await.unwrap(), 400, "invalid_path").await;
        assert!(problem["detail"].as_str().unwrap().contains("UTF-8"), "{path}: {problem}");
    }

    // The other extractors' rejections are problems too: a query string, a WebSocket upgrade.
    assert_problem(server.get("/api/v1/runs?status=%FF").await, 400, "invalid_query").await;
    assert_problem(server.get("/api/v1/ws").await, 400, "invalid_request").await;

    // Every operation of the document, each of its path parameters in turn not UTF-8.
    let doc: Value = server.get("/api/v1/openapi.json").await.json().await.unwrap();
    let mut walked = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let params: Vec<&str> = template.split('/').filter(|s| s.starts_with('{')).collect();
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            for bad in &params {
                let mut path = template.clone();
                for param in &params {
                    path = path.replace(param, if param == bad { "%FF" } else { "x" });
                }
                let response =
                    send(method.to_uppercase().parse().unwrap(), path.clone()).await.unwrap();
                assert_problem(response, 400, "invalid_path").await;
                walked.push(format!("{method} {path}"));
            }
        }
    }
    assert!(walked.len() >= 35, "walked only {walked:?}");
    server.stop().await;
}
