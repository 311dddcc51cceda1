//! The routing proxy inside the real server: each environment's services by hostname,
//! custom names from `[routes]`, the routes API (each project sees its own routes only),
//! and HTTPS through the data directory's local CA.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use drover_config::{Config, ReadinessConfig, ServiceConfig};
use drover_domain::{RestartPolicy, Sharing};
use drover_server::{Mode, Server};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A per-environment web server that names the environment it belongs to.
fn named_web_service() -> ServiceConfig {
    ServiceConfig {
        image: None,
        command: "python3".into(),
        args: vec![
            "-c".into(),
            "import http.server, os\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       body = ('env=' + os.environ['DROVER_ENV'] + ' host=' + self.headers['Host']).encode()\n\
             \x20       self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n\
             \x20   def log_message(self, *a): pass\n\
             http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n"
                .into(),
        ],
        env: BTreeMap::from([("DROVER_ENV".to_owned(), "{env}".to_owned())]),
        ports: vec!["http".into(), "spare".into()],
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
        // Long enough to catch the service between a crash and its restart.
        restart_backoff: Duration::from_secs(3),
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
    proxy: SocketAddr,
    proxy_tls: SocketAddr,
    data_dir: std::path::PathBuf,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), drover_server::ServerError>>,
    _dir: tempfile::TempDir,
}

async fn spawn() -> TestServer {
    spawn_with(|_| {}).await
}

async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.workers.embedded = false;
    (config.environments.port_range_start, config.environments.port_range_end) =
        drover_testkit::port_range(100);
    config.services = BTreeMap::from([("web".to_owned(), named_web_service())]);
    config.routes = BTreeMap::from([
        ("web.alice.loc".to_owned(), "alice/web".to_owned()),
        ("web.carol.loc".to_owned(), "carol/web".to_owned()),
    ]);
    tweak(&mut config);
    let server = Server::build(config, Mode::Full).await.unwrap();
    let url = server.url();
    let proxy = server.proxy_addr().unwrap();
    let proxy_tls = server.proxy_tls_addr().unwrap();
    let data_dir = server.config().data_dir.clone();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    TestServer {
        url,
        proxy,
        proxy_tls,
        data_dir,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        shutdown,
        task,
        _dir: dir,
    }
}

impl TestServer {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send_as(None, method, path, body).await
    }

    /// As the holder of `credential` (a bearer token and the project it acts in).
    async fn send_as(
        &self,
        credential: Option<(&str, &str)>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some((token, project)) = credential {
            request = request.bearer_auth(token).header("x-drover-project", project);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// GET `/` through the proxy with this `Host`.
    async fn via_proxy(&self, host: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("http://{}/", self.proxy))
            .header("host", host)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn wait_routed(&self, host: &str) -> String {
        for _ in 0..200 {
            let (status, body) = self.via_proxy(host).await;
            if status == 200 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{host} never answered through the proxy");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn two_environments_services_are_reached_by_hostname_and_custom_names() {
    let server = spawn().await;
    use reqwest::Method;
    for name in ["alice", "bob"] {
        let (status, body) =
            server.send(Method::POST, "/api/v1/environments", Some(json!({ "name": name }))).await;
        assert_eq!(status, 201, "{body}");
    }
    let alice = server.wait_routed("web.alice.localhost").await;
    let bob = server.wait_routed("web.bob.localhost:7080").await;
    assert_eq!(alice, "env=alice host=web.alice.localhost");
    assert_eq!(bob, "env=bob host=web.bob.localhost:7080");
    // The custom name leads to alice's service, keeping the name the client used.
    assert_eq!(server.wait_routed("web.alice.loc").await, "env=alice host=web.alice.loc");

    let (status, routes) = server.send(Method::GET, "/api/v1/routes", None).await;
    assert_eq!(status, 200, "{routes}");
    let hosts: Vec<&str> =
        routes["items"].as_array().unwrap().iter().map(|r| r["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["web.alice.loc", "web.alice.localhost", "web.bob.localhost"]);
    let custom = &routes["items"][0];
    assert_eq!(
        (custom["kind"].as_str(), custom["service"].as_str()),
        (Some("custom"), Some("alice/web"))
    );
    assert_eq!(routes["items"][1]["kind"], "service");
    assert_eq!(routes["items"][1]["environment"], "alice");
    assert_eq!(
        routes["items"][1]["url"],
        format!("http://web.alice.localhost:{}/", server.proxy.port())
    );
    assert_eq!(routes["unrouted"], json!([{ "host": "web.carol.loc", "target": "carol/web" }]));
    let (_, alice_env) = server.send(Method::GET, "/api/v1/environments/alice", None).await;
    let first_port = alice_env["services"][0]["ports"]["http"].as_u64().unwrap();
    assert_eq!(
        routes["items"][1]["upstream"],
        format!("127.0.0.1:{first_port}"),
        "the first declared port"
    );

    // HTTPS through the same routes, verified against the data directory's CA.
    let ca = std::fs::read(server.data_dir.join("proxy-ca").join("ca.pem")).unwrap();
    let https = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .resolve("web.bob.localhost", server.proxy_tls)
        .build()
        .unwrap();
    let secure = https
        .get(format!("https://web.bob.localhost:{}/", server.proxy_tls.port()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(secure, format!("env=bob host=web.bob.localhost:{}", server.proxy_tls.port()));

    // Stopping bob takes its hostname out of the table; alice's stays.
    server.send(Method::POST, "/api/v1/environments/bob/stop", None).await;
    let mut gone = None;
    for _ in 0..100 {
        let (status, body) = server.via_proxy("web.bob.localhost").await;
        if status == 404 {
            gone = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let problem: Value =
        serde_json::from_str(&gone.expect("bob's route outlived its stop")).unwrap();
    assert_eq!(problem["code"], "unknown_host");
    assert_eq!(problem["known_hosts"], json!(["web.alice.loc", "web.alice.localhost"]));
    assert_eq!(server.via_proxy("web.alice.localhost").await.0, 200);

    // alice's service crashes: until it is back, the 502 says what state it is in.
    let (_, alice_env) = server.send(Method::GET, "/api/v1/environments/alice", None).await;
    let pid = alice_env["services"][0]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL)
        .unwrap();
    // (The first 502s may still say `ready`: the supervisor has not reaped it yet.)
    let mut detail = String::new();
    for _ in 0..100 {
        let (status, body) = server.via_proxy("web.alice.localhost").await;
        if status == 502 {
            let problem: Value = serde_json::from_str(&body).unwrap();
            detail = problem["detail"].as_str().unwrap().to_owned();
            if detail.contains("crashed") || detail.contains("backoff") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(detail.contains("service `web` of environment `alice` (state: "), "{detail}");
    assert!(detail.contains("crashed") || detail.contains("backoff"), "{detail}");
    assert_eq!(
        server.wait_routed("web.alice.localhost").await,
        "env=alice host=web.alice.localhost"
    );
    server.stop().await;
}

/// A per-environment web server that answers with its environment's id.
fn env_id_web_service() -> ServiceConfig {
    let mut service = named_web_service();
    service.args[1] =
        service.args[1].replace("os.environ['DROVER_ENV']", "os.environ['DROVER_ENV_ID']");
    service
}

#[tokio::test]
async fn a_project_sees_only_its_own_routes_and_its_names_lead_to_its_own_services() {
    let server = spawn_with(|config| {
        config.services = BTreeMap::from([("web".to_owned(), env_id_web_service())]);
        config.routes = BTreeMap::from([
            ("web.pa.loc".to_owned(), "pa/alpha/web".to_owned()),
            ("web.pb.loc".to_owned(), "pb/alpha/web".to_owned()),
            ("web.dflt.loc".to_owned(), "alpha/web".to_owned()),
        ]);
    })
    .await;
    use reqwest::Method;
    // The local admin's token, then out of local mode: two projects, a member in each.
    let (status, created) =
        server.send(Method::POST, "/api/v1/tokens", Some(json!({ "name": "root" }))).await;
    assert_eq!(status, 201, "{created}");
    let root = created["token"].as_str().unwrap().to_owned();
    let as_root = Some((root.as_str(), "default"));
    let mut tokens = BTreeMap::new();
    for (user, project) in [("ann", "pa"), ("ben", "pb")] {
        let calls = [
            ("/api/v1/projects", json!({ "id": project })),
            ("/api/v1/users", json!({ "name": user, "role": "member" })),
            (
                &format!("/api/v1/projects/{project}/members"),
                json!({ "user": user, "role": "member" }),
            ),
            ("/api/v1/tokens", json!({ "name": "t", "user": user })),
        ];
        for (path, body) in calls {
            let (status, answer) = server.send_as(as_root, Method::POST, path, Some(body)).await;
            assert_eq!(status, 201, "{path}: {answer}");
            if path == "/api/v1/tokens" {
                tokens.insert(project, answer["token"].as_str().unwrap().to_owned());
            }
        }
    }
    // Each project has an environment named `alpha`, with its `web` service.
    let mut env_ids = BTreeMap::new();
    for project in ["pa", "pb"] {
        let credential = Some((tokens[project].as_str(), project));
        let (status, env) = server
            .send_as(
                credential,
                Method::POST,
                "/api/v1/environments",
                Some(json!({ "name": "alpha" })),
            )
            .await;
        assert_eq!(status, 201, "{env}");
        env_ids.insert(project, env["id"].as_str().unwrap().to_owned());
    }
    // Each project's names lead to its own environment's service.
    for project in ["pa", "pb"] {
        let env_id = &env_ids[project];
        let host = format!("web.alpha.{project}.localhost");
        assert_eq!(server.wait_routed(&host).await, format!("env={env_id} host={host}"));
        let custom = format!("web.{project}.loc");
        assert_eq!(server.wait_routed(&custom).await, format!("env={env_id} host={custom}"));
    }

    // The routes API shows each member their project's routes, nothing of the other's.
    let mut upstreams = BTreeMap::new();
    for (project, other) in [("pa", "pb"), ("pb", "pa")] {
        let credential = Some((tokens[project].as_str(), project));
        let (status, routes) =
            server.send_as(credential, Method::GET, "/api/v1/routes", None).await;
        assert_eq!(status, 200, "{routes}");
        let items = routes["items"].as_array().unwrap();
        let hosts: Vec<&str> = items.iter().map(|r| r["host"].as_str().unwrap()).collect();
        assert_eq!(hosts, [format!("web.alpha.{project}.localhost"), format!("web.{project}.loc")]);
        assert!(items.iter().all(|r| r["environment_id"] == env_ids[project].as_str()), "{routes}");
        assert_eq!(items[1]["service"], format!("{project}/alpha/web"));
        assert_eq!(routes["unrouted"], json!([]), "the default project's name is not theirs");
        upstreams.insert(project, items[0]["upstream"].as_str().unwrap().to_owned());
        let text = routes.to_string();
        assert!(!text.contains(&env_ids[other]) && !text.contains(&format!(".{other}")), "{text}");
        // Nor does their environment's view name the other project's.
        let (status, env) =
            server.send_as(credential, Method::GET, "/api/v1/environments/alpha", None).await;
        assert_eq!(status, 200, "{env}");
        assert_eq!(env["services"][0]["hostname"], format!("web.alpha.{project}.localhost"));
    }
    assert_ne!(upstreams["pa"], upstreams["pb"]);
    for project in ["pa", "pb"] {
        let credential = Some((tokens[project].as_str(), project));
        let (_, routes) = server.send_as(credential, Method::GET, "/api/v1/routes", None).await;
        let other = if project == "pa" { "pb" } else { "pa" };
        assert!(!routes.to_string().contains(&upstreams[other]), "{routes}");
    }
    // The default project sees neither, and its own name (no `alpha` there) as unrouted.
    let (_, routes) = server.send_as(as_root, Method::GET, "/api/v1/routes", None).await;
    assert_eq!(routes["items"], json!([]), "{routes}");
    assert_eq!(routes["unrouted"], json!([{ "host": "web.dflt.loc", "target": "alpha/web" }]));

    // Out of local mode, the proxy's 404 names no project's hostnames.
    let response = server
        .http
        .get(format!("http://{}/", server.proxy))
        .header("host", "nothing.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        (problem["code"].as_str(), &problem["known_hosts"]),
        (Some("unknown_host"), &json!([]))
    );
    server.stop().await;
}
