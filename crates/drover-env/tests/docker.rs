//! The Docker provider against a Docker Engine API double (no engine runs on this machine
//! kind): a server on a Unix socket that speaks the Engine API's endpoints, status codes and
//! multiplexed log stream, and runs each container's command as a local process. Then, if
//! a real engine answers and `DROVER_TEST_DOCKER_IMAGE` names an image it has, the same
//! provider against it.

mod common;
use common::wait_for;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use drover_domain::{
    EnvironmentId, ProbeKind, Readiness, RestartPolicy, RestartRules, ServiceName, ServiceSpec,
    ServiceStatus, Sharing,
};
use drover_env::docker::DockerProvider;
use drover_env::provider::{Provider, Providers};
use drover_env::supervisor::{InstanceKey, InstancePlan, InstanceState, Reporter, start_instance};
use drover_env::{CommandSpec, free_port};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------
// The Engine API double.

#[derive(Default)]
struct Engine {
    containers: Mutex<HashMap<String, FakeContainer>>,
    /// Images present; creating a container of another answers 404 until it is pulled.
    images: Mutex<Vec<String>>,
    pulls: Mutex<Vec<String>>,
    created: Mutex<Vec<Value>>,
}

struct FakeContainer {
    name: String,
    labels: BTreeMap<String, String>,
    body: Value,
    pid: Option<u32>,
    frames: Frames,
    /// `Some(code)` once exited.
    exit: watch::Receiver<Option<i64>>,
    exit_tx: Option<watch::Sender<Option<i64>>>,
}

type Shared = Arc<Engine>;
/// A container's output frames (stream, bytes), in order.
type Frames = Arc<Mutex<Vec<(u8, Vec<u8>)>>>;

fn problem(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

fn find<'a>(
    containers: &'a mut HashMap<String, FakeContainer>,
    id: &str,
) -> Option<&'a mut FakeContainer> {
    let key = containers
        .iter()
        .find(|(key, c)| key.as_str() == id || c.name == id)
        .map(|(key, _)| key.clone())?;
    containers.get_mut(&key)
}

async fn create(
    State(engine): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    let image = body["Image"].as_str().unwrap_or_default().to_owned();
    if !engine.images.lock().unwrap().contains(&image) {
        return problem(StatusCode::NOT_FOUND, &format!("No such image: {image}"));
    }
    let name = query.get("name").cloned().unwrap_or_default();
    let mut containers = engine.containers.lock().unwrap();
    if containers.values().any(|c| c.name == name) {
        return problem(StatusCode::CONFLICT, &format!("name {name} is already in use"));
    }
    let id = format!("{:064x}", rand_id());
    let labels = body["Labels"]
        .as_object()
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect())
        .unwrap_or_default();
    let (exit_tx, exit) = watch::channel(None);
    containers.insert(
        id.clone(),
        FakeContainer {
            name,
            labels,
            body: body.clone(),
            pid: None,
            frames: Arc::default(),
            exit,
            exit_tx: Some(exit_tx),
        },
    );
    engine.created.lock().unwrap().push(body);
    (StatusCode::CREATED, Json(json!({ "Id": id, "Warnings": [] }))).into_response()
}

fn rand_id() -> u128 {
    use std::hash::{BuildHasher, RandomState};
    u128::from(RandomState::new().hash_one(std::time::Instant::now()))
}

async fn pull(
    State(engine): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let name = query.get("fromImage").cloned().unwrap_or_default();
    let image = match query.get("tag") {
        Some(tag) => format!("{name}:{tag}"),
        None => name,
    };
    engine.pulls.lock().unwrap().push(image.clone());
    engine.images.lock().unwrap().push(image.clone());
    let progress = format!(
        "{{\"status\":\"Pulling from {image}\"}}\n{{\"status\":\"Downloaded newer image for {image}\"}}\n"
    );
    (StatusCode::OK, progress).into_response()
}

async fn start(State(engine): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let mut containers = engine.containers.lock().unwrap();
    let Some(container) = find(&mut containers, &id) else {
        return problem(StatusCode::NOT_FOUND, "No such container");
    };
    let Some(exit_tx) = container.exit_tx.take() else {
        return StatusCode::NOT_MODIFIED.into_response();
    };
    let cmd: Vec<String> = container.body["Cmd"]
        .as_array()
        .map(|c| c.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let mut command = tokio::process::Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for pair in container.body["Env"].as_array().into_iter().flatten() {
        if let Some((k, v)) = pair.as_str().and_then(|p| p.split_once('=')) {
            command.env(k, v);
        }
    }
    if let Some(dir) = container.body["WorkingDir"].as_str() {
        command.current_dir(dir);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => return problem(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    container.pid = child.id();
    let frames = container.frames.clone();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let copy = |frames: Frames, stream: u8| {
            move |bytes: &[u8]| frames.lock().unwrap().push((stream, bytes.to_vec()))
        };
        let (to_out, to_err) = (copy(frames.clone(), 1), copy(frames, 2));
        let out = async {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf).await {
                to_out(&buf[..n]);
            }
        };
        let err = async {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                to_err(&buf[..n]);
            }
        };
        let (status, (), ()) = tokio::join!(child.wait(), out, err);
        let code = status.ok().and_then(|s| s.code()).unwrap_or(137);
        let _ = exit_tx.send(Some(i64::from(code)));
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn inspect(State(engine): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let mut containers = engine.containers.lock().unwrap();
    let Some(container) = find(&mut containers, &id) else {
        return problem(StatusCode::NOT_FOUND, "No such container");
    };
    let exited = *container.exit.borrow();
    Json(json!({
        "Id": id,
        "State": {
            "Running": container.pid.is_some() && exited.is_none(),
            "Pid": if exited.is_none() { container.pid.unwrap_or(0) } else { 0 },
            "ExitCode": exited.unwrap_or(0),
            "OOMKilled": false,
        }
    }))
    .into_response()
}

async fn logs(State(engine): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let (frames, exit) = {
        let mut containers = engine.containers.lock().unwrap();
        let Some(container) = find(&mut containers, &id) else {
            return problem(StatusCode::NOT_FOUND, "No such container");
        };
        (container.frames.clone(), container.exit.clone())
    };
    // Follows: everything so far, then new frames until the container exits.
    let stream = futures::stream::unfold((0usize, false), move |(sent, done)| {
        let frames = frames.clone();
        let exit = exit.clone();
        async move {
            loop {
                let pending: Vec<(u8, Vec<u8>)> = frames.lock().unwrap()[sent..].to_vec();
                if !pending.is_empty() {
                    let mut bytes = Vec::new();
                    for (stream, payload) in &pending {
                        bytes.extend_from_slice(&[*stream, 0, 0, 0]);
                        bytes.extend_from_slice(
                            &u32::try_from(payload.len()).unwrap().to_be_bytes(),
                        );
                        bytes.extend_from_slice(payload);
                    }
                    return Some((Ok::<_, std::io::Error>(bytes), (sent + pending.len(), done)));
                }
                if done {
                    return None;
                }
                if exit.borrow().is_some() {
                    // One more look for output that raced the exit, then end.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let more = frames.lock().unwrap().len() > sent;
                    if !more {
                        return None;
                    }
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/vnd.docker.multiplexed-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn wait(State(engine): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let exit = {
        let mut containers = engine.containers.lock().unwrap();
        let Some(container) = find(&mut containers, &id) else {
            return problem(StatusCode::NOT_FOUND, "No such container");
        };
        container.exit.clone()
    };
    let mut exit = exit;
    let code = loop {
        if let Some(code) = *exit.borrow_and_update() {
            break code;
        }
        if exit.changed().await.is_err() {
            break 137;
        }
    };
    Json(json!({ "StatusCode": code })).into_response()
}

fn signal_group(pid: Option<u32>, signal: nix::sys::signal::Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

async fn stop(
    State(engine): State<Shared>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (pid, mut exit) = {
        let mut containers = engine.containers.lock().unwrap();
        let Some(container) = find(&mut containers, &id) else {
            return problem(StatusCode::NOT_FOUND, "No such container");
        };
        (container.pid, container.exit.clone())
    };
    let grace: u64 = query.get("t").and_then(|t| t.parse().ok()).unwrap_or(10);
    signal_group(pid, nix::sys::signal::Signal::SIGTERM);
    let exited = tokio::time::timeout(Duration::from_secs(grace), exit.wait_for(Option::is_some));
    if exited.await.is_err() {
        signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn remove(State(engine): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let mut containers = engine.containers.lock().unwrap();
    let Some(key) = containers
        .iter()
        .find(|(key, c)| key.as_str() == id || c.name == id)
        .map(|(key, _)| key.clone())
    else {
        return problem(StatusCode::NOT_FOUND, &format!("No such container: {id}"));
    };
    if let Some(container) = containers.remove(&key)
        && container.exit.borrow().is_none()
    {
        signal_group(container.pid, nix::sys::signal::Signal::SIGKILL);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn list(
    State(engine): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let wanted: Vec<(String, String)> = query
        .get("filters")
        .and_then(|f| serde_json::from_str::<Value>(f).ok())
        .and_then(|f| f["label"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let containers = engine.containers.lock().unwrap();
    let items: Vec<Value> = containers
        .iter()
        .filter(|(_, c)| wanted.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
        .map(|(id, c)| json!({ "Id": id, "Names": [format!("/{}", c.name)] }))
        .collect();
    Json(items).into_response()
}

async fn version() -> Response {
    Json(json!({ "Version": "25.0.0-double", "ApiVersion": "1.44" })).into_response()
}

/// Serves the double on a socket in `dir`; returns its state and the socket path.
async fn engine(dir: &Path) -> (Shared, PathBuf) {
    let engine = Shared::default();
    let socket = dir.join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = axum::Router::new()
        .route("/v1.41/version", get(version))
        .route("/v1.41/containers/create", post(create))
        .route("/v1.41/containers/json", get(list))
        .route("/v1.41/containers/{id}/start", post(start))
        .route("/v1.41/containers/{id}/json", get(inspect))
        .route("/v1.41/containers/{id}/logs", get(logs))
        .route("/v1.41/containers/{id}/wait", post(wait))
        .route("/v1.41/containers/{id}/stop", post(stop))
        .route("/v1.41/containers/{id}", delete(remove))
        .route("/v1.41/images/create", post(pull))
        .with_state(engine.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (engine, socket)
}

// ---------------------------------------------------------------------------------------
// The provider under test.

#[derive(Default)]
struct Recorder;

#[async_trait]
impl Reporter for Recorder {
    async fn report(&self, _: &InstanceKey, _: &InstanceState) {}
}

fn spec(name: &str, image: &str, command: &str, args: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: ServiceName::parse(name).unwrap(),
        image: Some(image.to_owned()),
        command: command.to_owned(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: BTreeMap::new(),
        ports: vec!["http".into()],
        readiness: None,
        depends_on: BTreeMap::new(),
        restart: RestartRules { policy: RestartPolicy::Never, ..RestartRules::default() },
        stop_grace: Duration::from_secs(2),
        memory_limit_bytes: None,
        sharing: Sharing::PerEnv,
        address: None,
        log_max_bytes: 1 << 20,
        log_keep: 1,
    }
}

fn plan(workspace: &Path, spec: ServiceSpec, port: u16) -> InstancePlan {
    let command = CommandSpec {
        program: spec.command.clone(),
        args: spec.args.clone(),
        cwd: workspace.to_path_buf(),
        env: vec![("PORT".to_owned(), port.to_string())],
        log_path: workspace.join(format!("{}.log", spec.name)),
    };
    InstancePlan {
        key: InstanceKey { environment: Some(EnvironmentId::new()), service: spec.name.clone() },
        probe_addr: Some(([127, 0, 0, 1], port).into()),
        spec,
        command,
        dependencies: Vec::new(),
        external_addr: None,
        secrets: None,
    }
}

fn docker(socket: &Path, home: &Path) -> Arc<dyn Provider> {
    Arc::new(Providers::new(
        drover_env::provider::LocalProvider::default(),
        Some(Box::new(DockerProvider::new(socket, home).unwrap())),
    ))
}

#[tokio::test]
async fn a_service_with_an_image_runs_as_a_container_pulled_limited_labelled_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, socket) = engine(dir.path()).await;
    let workspace = dir.path().join("workspace");
    std::fs::create_dir(&workspace).unwrap();
    let port = free_port().unwrap();
    let mut web = spec(
        "web",
        "python:3-slim",
        "python3",
        &["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"],
    );
    web.memory_limit_bytes = Some(256 << 20);
    web.readiness = Some(Readiness {
        kind: ProbeKind::Http { path: "/".into() },
        port: None,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(15),
        threshold: 1,
    });
    let plan = plan(&workspace, web, port);
    let log_path = plan.command.log_path.clone();
    let instance = start_instance(plan, docker(&socket, dir.path()), Arc::new(Recorder));
    let ready = wait_for(&instance, "ready", |s| s.status == ServiceStatus::Ready).await;
    let pid = ready.pid.expect("the container's process id is known");

    assert_eq!(*engine.pulls.lock().unwrap(), vec!["python:3-slim".to_owned()], "pulled once");
    let created = engine.created.lock().unwrap()[0].clone();
    assert_eq!(created["Image"], "python:3-slim");
    assert_eq!(created["HostConfig"]["NetworkMode"], "host");
    assert_eq!(created["HostConfig"]["Memory"], 256 << 20);
    let ws = workspace.display().to_string();
    assert_eq!(created["HostConfig"]["Binds"][0], format!("{ws}:{ws}"));
    assert_eq!(created["WorkingDir"], ws);
    assert_eq!(created["Labels"]["dev.drover.home"], dir.path().display().to_string());
    assert!(
        created["Env"].as_array().unwrap().contains(&json!(format!("PORT={port}"))),
        "{created}"
    );

    let page = reqwest::get(format!("http://127.0.0.1:{port}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let mut logged = String::new();
    for _ in 0..100 {
        logged = std::fs::read_to_string(&log_path).unwrap_or_default();
        if logged.contains("GET / HTTP/1.1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged.contains("GET / HTTP/1.1"), "the container's stderr reached its log: {logged}");

    instance.stop().await;
    for _ in 0..100 {
        if engine.containers.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(engine.containers.lock().unwrap().is_empty(), "the stopped container was removed");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "its process is gone");
}

#[tokio::test]
async fn a_failing_container_reports_its_exit_code_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, socket) = engine(dir.path()).await;
    engine.images.lock().unwrap().push("busybox".to_owned());
    let port = free_port().unwrap();
    let crashy = spec("crashy", "busybox", "sh", &["-c", "echo boom >&2; exit 3"]);
    let plan = plan(dir.path(), crashy, port);
    let log_path = plan.command.log_path.clone();
    let instance = start_instance(plan, docker(&socket, dir.path()), Arc::new(Recorder));
    let crashed = wait_for(&instance, "crashed", |s| s.status == ServiceStatus::Crashed).await;
    assert_eq!(crashed.reason.as_deref(), Some("exited with code 3"));
    assert!(engine.pulls.lock().unwrap().is_empty(), "a present image is not pulled");
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("boom"), "{logged}");
    instance.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(engine.containers.lock().unwrap().is_empty(), "the exited container was removed");
}

#[tokio::test]
async fn the_orphan_sweep_removes_only_this_installations_containers() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, socket) = engine(dir.path()).await;
    engine.images.lock().unwrap().push("busybox".to_owned());
    let mine = dir.path().join("mine");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    // Each installation starts a long-running container, then "dies" without stopping it.
    for home in [&mine, &theirs] {
        let provider = docker(&socket, home);
        let spec = spec("sleeper", "busybox", "sleep", &["600"]);
        let plan = plan(home, spec, free_port().unwrap());
        let command = plan.command.clone();
        let launch = drover_env::provider::Launch {
            instance: "sleeper@x",
            command: &command,
            image: Some("busybox"),
            memory_limit_bytes: None,
        };
        let process = provider.spawn(&launch).await.unwrap();
        std::mem::forget(process);
    }
    assert_eq!(engine.containers.lock().unwrap().len(), 2);
    let swept = docker(&socket, &mine).sweep_orphans().await;
    assert_eq!(swept, 1);
    let left: Vec<String> = engine
        .containers
        .lock()
        .unwrap()
        .values()
        .map(|c| c.labels["dev.drover.home"].clone())
        .collect();
    assert_eq!(left, vec![theirs.display().to_string()]);
    docker(&socket, &theirs).sweep_orphans().await;
}

#[tokio::test]
async fn an_image_service_without_a_reachable_engine_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let plan_unconfigured = plan(dir.path(), spec("web", "busybox", "true", &[]), port);
    let instance =
        start_instance(plan_unconfigured, Arc::new(Providers::local_only()), Arc::new(Recorder));
    let crashed = wait_for(&instance, "crashed", |s| s.status == ServiceStatus::Crashed).await;
    assert!(
        crashed.reason.as_deref().unwrap_or("").contains("needs the Docker provider"),
        "{crashed:?}"
    );
    instance.stop().await;

    let nowhere = dir.path().join("no-engine.sock");
    let plan_unreachable = plan(dir.path(), spec("web", "busybox", "true", &[]), port);
    let instance =
        start_instance(plan_unreachable, docker(&nowhere, dir.path()), Arc::new(Recorder));
    let crashed = wait_for(&instance, "crashed", |s| s.status == ServiceStatus::Crashed).await;
    let reason = crashed.reason.unwrap_or_default();
    assert!(reason.contains("cannot be reached") && reason.contains("no-engine.sock"), "{reason}");
    instance.stop().await;
}

/// The real engine, where there is one and an image to use offline.
#[tokio::test]
async fn a_real_docker_engine_runs_a_service_when_one_is_here() {
    let socket = PathBuf::from("/var/run/docker.sock");
    let Ok(image) = std::env::var("DROVER_TEST_DOCKER_IMAGE") else {
        eprintln!(
            "drover-test: no real Docker engine test: set DROVER_TEST_DOCKER_IMAGE to an image \
             with `sh` the engine at {} has (the Engine API double tests above ran)",
            socket.display()
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let provider = DockerProvider::new(&socket, dir.path()).unwrap();
    let version =
        provider.ping().await.expect("DROVER_TEST_DOCKER_IMAGE is set: the engine must answer");
    eprintln!("drover-test: Docker engine {version}");
    let port = free_port().unwrap();
    let service = spec("hello", &image, "sh", &["-c", "echo hello from a container; exit 4"]);
    let plan = plan(dir.path(), service, port);
    let log_path = plan.command.log_path.clone();
    let instance = start_instance(plan, docker(&socket, dir.path()), Arc::new(Recorder));
    let crashed = wait_for(&instance, "exit", |s| s.status == ServiceStatus::Crashed).await;
    assert_eq!(crashed.reason.as_deref(), Some("exited with code 4"));
    assert!(std::fs::read_to_string(log_path).unwrap().contains("hello from a container"));
    instance.stop().await;
}
