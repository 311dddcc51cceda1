//! Environments over HTTP on the real server: lifecycle, services, logs, quota and errors.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_config::{Config, ReadinessConfig, ServiceConfig};
use drover_domain::{RestartPolicy, Sharing};
use drover_server::{Mode, Server};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn web_service() -> ServiceConfig {
    ServiceConfig {
        image: None,
        command: "python3".into(),
        args: vec![
            "-m".into(),
            "http.server".into(),
            "{port}".into(),
            "--bind".into(),
            "127.0.0.1".into(),
        ],
        env: BTreeMap::new(),
        ports: vec!["http".into()],
        readiness: Some(ReadinessConfig {
            http: Some("/".into()),
            tcp: false,
            exec: None,
            log: None,
            port: None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(20),
            threshold: 1,
        }),
        depends_on: BTreeMap::new(),
        restart: RestartPolicy::OnFailure,
        restart_backoff: Duration::from_millis(200),
        restart_backoff_max: Duration::from_secs(2),
        restart_reset_after: Duration::from_secs(60),
        max_restarts: 3,
        restart_window: Duration::from_secs(60),
        stop_grace: Duration::from_secs(2),
        memory_limit: None,
        sharing: Sharing::PerEnv,
        address: None,
        log_max_bytes: 1 << 20,
        log_keep: 1,
    }
}

struct TestServer {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
    _dir: Option<tempfile::TempDir>,
}

async fn spawn(quota: u32) -> TestServer {
    spawn_with(quota, false).await
}

async fn spawn_with(quota: u32, embedded_workers: bool) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut server = spawn_at(dir.path(), quota, embedded_workers).await;
    server._dir = Some(dir);
    server
}

/// A server on the data directory under `dir` (which the caller keeps).
async fn spawn_at(dir: &std::path::Path, quota: u32, embedded_workers: bool) -> TestServer {
    let mut config = Config { data_dir: dir.join("data"), ..Config::default() };
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.workers.embedded = embedded_workers;
    config.environments.max_per_project = quota;
    (config.environments.port_range_start, config.environments.port_range_end) =
        drover_testkit::port_range(100);
    config.services = BTreeMap::from([("web".to_owned(), web_service())]);
    let server = Server::build(config, Mode::Full).await.unwrap();
    let url = server.url();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    TestServer {
        url,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        shutdown,
        task,
        _dir: None,
    }
}

impl TestServer {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn wait_service_ready(&self, env: &str) -> Value {
        for _ in 0..200 {
            let (_, view) =
                self.send(reqwest::Method::GET, &format!("/api/v1/environments/{env}"), None).await;
            if view["status"] == "running" && view["services"][0]["status"] == "ready" {
                return view;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{env} never had its service ready");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn an_environment_is_created_serves_stops_starts_and_is_deleted_over_http() {
    let server = spawn(5).await;
    use reqwest::Method;
    let (status, created) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "web1" }))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "creating");
    let view = server.wait_service_ready("web1").await;
    let port = view["services"][0]["ports"]["http"].as_u64().unwrap();
    assert_eq!(view["variables"]["PORT"], Value::Null, "PORT is per process, not per environment");
    assert_eq!(view["variables"]["DROVER_PORT_WEB_HTTP"], port.to_string());
    let page = reqwest::get(format!("http://127.0.0.1:{port}/")).await.unwrap();
    assert_eq!(page.status(), 200);

    let (status, _) =
        server.send(Method::GET, "/api/v1/environments/web1/services/web/logs", None).await;
    assert_eq!(status, 200);
    let log = server
        .http
        .get(format!("{}/api/v1/environments/web1/services/web/logs", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("GET / HTTP/1.1"), "{log}");

    let (status, stopped) = server.send(Method::POST, "/api/v1/environments/web1/stop", None).await;
    assert_eq!((status, stopped["desired"].as_str()), (202, Some("stopped")));
    server.send(Method::POST, "/api/v1/environments/web1/stop", None).await;
    for _ in 0..100 {
        let (_, view) = server.send(Method::GET, "/api/v1/environments/web1", None).await;
        if view["status"] == "stopped" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/")).await.is_err(),
        "the service still answers after stop"
    );

    server.send(Method::POST, "/api/v1/environments/web1/start", None).await;
    server.wait_service_ready("web1").await;
    let (status, _) =
        server.send(Method::POST, "/api/v1/environments/web1/services/web/restart", None).await;
    assert_eq!(status, 202);

    let (status, deleted) = server.send(Method::DELETE, "/api/v1/environments/web1", None).await;
    assert_eq!((status, deleted["desired"].as_str()), (202, Some("deleted")));
    for _ in 0..100 {
        let (status, _) = server.send(Method::GET, "/api/v1/environments/web1", None).await;
        if status == 404 {
            server.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the environment was not deleted");
}

#[tokio::test]
async fn the_environment_quota_answers_429_with_its_code_and_errors_have_codes() {
    let server = spawn(1).await;
    use reqwest::Method;
    let (status, _) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "only" }))).await;
    assert_eq!(status, 201);
    let (status, problem) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "second" }))).await;
    assert_eq!(status, 429, "{problem}");
    assert_eq!(problem["code"], "environment_quota_exceeded");

    let (status, problem) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "only" }))).await;
    assert_eq!((status, problem["code"].as_str()), (409, Some("environment_name_taken")));
    let (status, problem) = server
        .send(Method::POST, "/api/v1/environments", Some(json!({ "name": "Bad Name" })))
        .await;
    assert_eq!((status, problem["code"].as_str()), (422, Some("validation_failed")));
    assert_eq!(problem["errors"][0]["field"], "name");
    let (status, problem) = server.send(Method::GET, "/api/v1/environments/nope", None).await;
    assert_eq!((status, problem["code"].as_str()), (404, Some("environment_not_found")));
    let (status, problem) =
        server.send(Method::POST, "/api/v1/environments/only/services/nope/restart", None).await;
    assert_eq!((status, problem["code"].as_str()), (404, Some("service_not_found")));
    let (status, list) = server.send(Method::GET, "/api/v1/environments", None).await;
    assert_eq!((status, list["items"].as_array().unwrap().len()), (200, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_run_placed_in_an_environment_works_in_its_workspace_and_keeps_it_active() {
    let server = spawn_with(5, true).await;
    use reqwest::Method;
    let (status, created) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "agent1" }))).await;
    assert_eq!(status, 201, "{created}");
    let env = server.wait_service_ready("agent1").await;
    let workspace = std::path::PathBuf::from(env["workspace"].as_str().unwrap());
    let idle_before = env["last_active_at"].as_str().unwrap().to_owned();

    let (status, problem) = server
        .send(
            Method::POST,
            "/api/v1/runs",
            Some(json!({ "request": "Hello World API", "environment": "nope" })),
        )
        .await;
    assert_eq!((status, problem["code"].as_str()), (404, Some("environment_not_found")));

    let (status, run) = server
        .send(
            Method::POST,
            "/api/v1/runs",
            Some(json!({ "request": "Hello World API", "environment": "agent1" })),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["environment_id"], env["id"]);
    let id = run["id"].as_str().unwrap().to_owned();
    let mut finished = Value::Null;
    for _ in 0..600 {
        let (_, view) = server.send(Method::GET, &format!("/api/v1/runs/{id}"), None).await;
        if matches!(view["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            finished = view;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert!(
        workspace.join("drover.json").is_file(),
        "the agents did not work in the environment's workspace {}",
        workspace.display()
    );
    let (_, env) = server.send(Method::GET, "/api/v1/environments/agent1", None).await;
    assert!(
        env["last_active_at"].as_str().unwrap() > idle_before.as_str(),
        "agent work did not count as activity: {} -> {}",
        idle_before,
        env["last_active_at"]
    );
    server.stop().await;
}

async fn wait_run(server: &TestServer, id: &str) -> Value {
    for _ in 0..600 {
        let (_, view) =
            server.send(reqwest::Method::GET, &format!("/api/v1/runs/{id}"), None).await;
        if matches!(view["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {id} did not finish");
}

async fn answers(url: &str) -> bool {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    matches!(client.get(url).send().await, Ok(response) if response.status().is_success())
}

#[tokio::test]
async fn a_deployed_app_is_a_service_of_the_deployments_environment_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_at(dir.path(), 1, true).await;
    use reqwest::Method;
    let (status, run) = server
        .send(Method::POST, "/api/v1/runs", Some(json!({ "request": "Hello World API" })))
        .await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let finished = wait_run(&server, &id).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(finished["deployment"]["live"], true, "{finished}");
    let url = finished["deployment"]["url"].as_str().unwrap().to_owned();
    assert!(answers(&url).await);

    let service = format!("run-{}", id.replace('-', ""));
    let mut app = Value::Null;
    for _ in 0..100 {
        let (status, env) =
            server.send(Method::GET, "/api/v1/environments/deployments", None).await;
        assert_eq!(status, 200, "{env}");
        app = env["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == service.as_str())
            .unwrap_or_else(|| panic!("no service {service} in {env}"))
            .clone();
        if app["status"] == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app["status"], "ready", "{app}");
    assert_eq!(app["hostname"], finished["deployment"]["hostname"]);

    // The deployments environment counts towards no quota (this server allows one).
    let (status, created) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "mine" }))).await;
    assert_eq!(status, 201, "{created}");
    let (status, problem) = server
        .send(Method::POST, "/api/v1/environments", Some(json!({ "name": "deployments" })))
        .await;
    assert_eq!((status, problem["code"].as_str()), (422, Some("validation_failed")), "{problem}");

    server.stop().await;
    assert!(!answers(&url).await, "the app outlived the server");

    // A new server on the same data directory brings the app back at the same URL.
    let server = spawn_at(dir.path(), 1, true).await;
    let mut back = false;
    for _ in 0..200 {
        if answers(&url).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the deployed app did not come back after the restart");
    let (_, view) = server.send(Method::GET, &format!("/api/v1/runs/{id}"), None).await;
    assert_eq!(view["deployment"]["live"], true, "{view}");
    server.stop().await;
}

#[tokio::test]
async fn a_run_gets_an_environment_of_its_own_that_goes_when_the_run_ends() {
    let server = spawn_with(1, true).await;
    use reqwest::Method;
    let (status, run) = server
        .send(Method::POST, "/api/v1/runs", Some(json!({ "request": "Hello World API" })))
        .await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let env_id = run["environment_id"].as_str().expect("the run has an environment").to_owned();
    let (status, env) =
        server.send(Method::GET, &format!("/api/v1/environments/{env_id}"), None).await;
    assert_eq!(status, 200, "{env}");
    let hex = id.replace('-', "");
    assert_eq!(env["name"], format!("run-{}", &hex[hex.len() - 12..]));
    let workspace = std::path::PathBuf::from(env["workspace"].as_str().unwrap());
    assert!(workspace.ends_with(format!("runs/{id}/workspace")), "{}", workspace.display());

    // Its own instance of the per-environment services, on its own ports.
    let mut web = Value::Null;
    for _ in 0..100 {
        let (_, env) =
            server.send(Method::GET, &format!("/api/v1/environments/{env_id}"), None).await;
        web = env["services"][0].clone();
        if web["status"] == "ready" || env["status"] == "deleted" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (web["name"].as_str(), web["status"].as_str()),
        (Some("web"), Some("ready")),
        "{web}"
    );
    assert_eq!(web["ports"]["http"], env["ports"]["base"]);

    // Run environments count towards no quota (this server allows one).
    let (status, created) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "mine" }))).await;
    assert_eq!(status, 201, "{created}");
    let (status, problem) =
        server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": "run-x" }))).await;
    assert_eq!((status, problem["code"].as_str()), (422, Some("validation_failed")), "{problem}");

    let finished = wait_run(&server, &id).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, view) =
            server.send(Method::GET, &format!("/api/v1/environments/{env_id}"), None).await;
        if status == 404 || view["status"] == "deleted" {
            last = Value::Null;
            break;
        }
        last = view;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, Value::Null, "the run's environment outlived the run");
    assert!(workspace.join("drover.json").is_file(), "the run's workspace was kept");
    let url = finished["deployment"]["url"].as_str().unwrap();
    assert!(answers(url).await, "the deployed app (working in that workspace) still answers");
    server.stop().await;
}
