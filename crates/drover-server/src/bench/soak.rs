//! `drover bench soak`: whether a server's resident memory stays flat under varied traffic.
//!
//! It starts a real `drover up` (this binary, in a data directory of its own, behind
//! `drover bench guard` so it cannot outlive the bench), makes an administrator and an
//! API token, and sends `rounds` identical rounds of mixed traffic: every operation of the
//! served OpenAPI document with generated path parameters, query strings and bodies (right
//! and wrong types, malformed JSON, wrong content types), under the user's session, the
//! API token, a bogus credential or none, `concurrency` requests at a time. Each round is
//! the same sequence (the same seed); valid run submissions among them execute the real
//! `sdlc` pipeline. After each round it waits until no run is queued or running and the
//! server has been idle for `idle`, then reads the server's `VmRSS`.
//!
//! Memory that only grows shows as a third round growing about as much as the first; a
//! server that keeps only what it must grows in the first round (caches, pools, the
//! allocator's working set) and barely after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::bench_error;
use crate::ServerError;
use crate::data_dir::ServerInfo;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The drover binary to start (`std::env::current_exe()`).
    pub exe: PathBuf,
    pub rounds: usize,
    /// Requests per round.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub seed: u64,
    /// How long the server is left idle before its memory is read.
    pub idle: Duration,
    /// Also measure a server with glibc's default malloc settings, side by side.
    pub compare_glibc_defaults: bool,
}

/// One round's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SoakRound {
    pub requests: usize,
    pub seconds: f64,
    /// Resident memory after the round, once idle.
    pub rss_mb: f64,
    /// Its growth over the round.
    pub growth_mb: f64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, usize>,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub seed: u64,
    pub concurrency: usize,
    /// drover as it runs, then (with `compare_glibc_defaults`) the baseline.
    pub series: Vec<SoakSeries>,
}

/// One server through every round.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSeries {
    /// `pinned mmap threshold` (drover as it runs) or `glibc defaults`.
    pub allocator: String,
    /// Resident memory of the fresh server, set up, before the first round.
    pub rss_start_mb: f64,
    pub rounds: Vec<SoakRound>,
    /// The last round's growth as a share of the first's (target < 0.1); 0 when the first
    /// grew nothing.
    pub last_over_first: f64,
}

/// One generated request.
#[derive(Debug, Clone)]
struct Call {
    method: reqwest::Method,
    path: String,
    query: Vec<(String, String)>,
    credential: Credential,
    project: Option<String>,
    body: Body,
}

#[derive(Debug, Clone, Copy)]
enum Credential {
    Session,
    ApiToken,
    Bogus(u32),
    None,
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Json(Value),
    Raw { content_type: &'static str, text: &'static str },
}

/// The variable that keeps glibc's default (dynamic) mmap threshold in a drover process
/// (`allocator.rs` in the binary): how the bench measures the baseline beside the fix.
pub const GLIBC_DEFAULT_MALLOC_VAR: &str = "DROVER_MALLOC_GLIBC_DEFAULTS";

/// Runs the benchmark and reports.
pub async fn bench_soak(options: SoakOptions) -> Result<SoakReport, ServerError> {
    let mut series = vec![measure(&options, "pinned mmap threshold", &[]).await?];
    if options.compare_glibc_defaults {
        let env = [(GLIBC_DEFAULT_MALLOC_VAR, "1")];
        series.push(measure(&options, "glibc defaults", &env).await?);
    }
    Ok(SoakReport { seed: options.seed, concurrency: options.concurrency, series })
}

/// One server, `rounds` rounds.
async fn measure(
    options: &SoakOptions,
    allocator: &str,
    env: &[(&str, &str)],
) -> Result<SoakSeries, ServerError> {
    let dir = tempfile::tempdir().map_err(|err| bench_error(err.to_string()))?;
    let server = SoakServer::start(&options.exe, dir.path(), env).await?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|err| bench_error(err.to_string()))?;
    let credentials = set_up(&http, &server.url).await?;
    let doc: Value = http
        .get(format!("{}/api/v1/openapi.json", server.url))
        .send()
        .await
        .map_err(|err| bench_error(format!("cannot read the OpenAPI document: {err}")))?
        .json()
        .await
        .map_err(|err| bench_error(format!("the OpenAPI document is not JSON: {err}")))?;
    let operations = operations(&doc);
    if operations.is_empty() {
        return Err(bench_error("the OpenAPI document lists no operation".to_owned()));
    }

    settle(&http, &server, &credentials, options.idle).await;
    let rss_start = server.rss_mb()?;
    let mut previous = rss_start;
    let mut rounds = Vec::new();
    for _ in 0..options.rounds.max(1) {
        // The same sequence every round.
        let mut rng = StdRng::seed_from_u64(options.seed);
        let calls: Vec<Call> =
            (0..options.requests).map(|_| generate(&mut rng, &doc, &operations)).collect();
        let started = Instant::now();
        let statuses = send_all(&http, &server.url, &credentials, calls, options.concurrency).await;
        let seconds = started.elapsed().as_secs_f64();
        settle(&http, &server, &credentials, options.idle).await;
        let rss = server.rss_mb()?;
        rounds.push(SoakRound {
            requests: options.requests,
            seconds,
            rss_mb: rss,
            growth_mb: rss - previous,
            statuses,
        });
        previous = rss;
    }
    let first = rounds.first().map_or(0.0, |r| r.growth_mb);
    let last = rounds.last().map_or(0.0, |r| r.growth_mb);
    let last_over_first = if first > 0.0 { last.max(0.0) / first } else { 0.0 };
    server.stop().await;
    Ok(SoakSeries {
        allocator: allocator.to_owned(),
        rss_start_mb: rss_start,
        rounds,
        last_over_first,
    })
}

/// The server under test.
struct SoakServer {
    guard: tokio::process::Child,
    url: String,
    pid: u32,
}

impl SoakServer {
    async fn start(exe: &Path, dir: &Path, env: &[(&str, &str)]) -> Result<Self, ServerError> {
        let data_dir = dir.join("data");
        let config = dir.join("drover.toml");
        // Limits high enough that the traffic reaches the handlers instead of the limiter;
        // the routing proxy on a port of its own.
        std::fs::write(
            &config,
            "[auth]\nrate_limit_per_minute = 100000000\nip_rate_limit_per_minute = 100000000\n",
        )
        .map_err(|err| bench_error(err.to_string()))?;
        let log = std::fs::File::create(dir.join("server.log"))
            .map_err(|err| bench_error(err.to_string()))?;
        let err_log = log.try_clone().map_err(|err| bench_error(err.to_string()))?;
        let guard = tokio::process::Command::new(exe)
            .arg("bench")
            .arg("guard")
            .arg("--")
            .arg(exe)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["up", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0"])
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(err_log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| bench_error(format!("cannot start {}: {err}", exe.display())))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(info) = ServerInfo::read(&data_dir)
                && reqwest::get(format!("{}/healthz", info.url)).await.is_ok()
            {
                return Ok(Self { guard, url: info.url, pid: info.pid });
            }
            if Instant::now() > deadline {
                return Err(bench_error(format!(
                    "the server did not come up in 60 s; see {}",
                    dir.join("server.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn rss_mb(&self) -> Result<f64, ServerError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .map_err(|err| bench_error(format!("cannot read the server's memory: {err}")))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .ok_or_else(|| bench_error("no VmRSS in the server's /proc status".to_owned()))?;
        Ok(kib / 1024.0)
    }

    /// Closing the guard's stdin stops the server (SIGTERM, then SIGKILL).
    async fn stop(mut self) {
        drop(self.guard.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(15), self.guard.wait()).await;
    }
}

/// The credentials the traffic uses.
struct Credentials {
    session: String,
    token: String,
}

/// `POST url` with a JSON body (and a bearer credential), answered with JSON.
async fn post_json(
    http: &reqwest::Client,
    url: String,
    bearer: Option<&str>,
    body: Value,
) -> Result<Value, ServerError> {
    let mut request = http.post(url).json(&body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.map_err(|err| bench_error(err.to_string()))?;
    response.json().await.map_err(|err| bench_error(err.to_string()))
}

async fn set_up(http: &reqwest::Client, url: &str) -> Result<Credentials, ServerError> {
    let password = "soak-password-long-enough";
    let user = json!({ "name": "soak-admin", "role": "admin", "password": password });
    let created = post_json(http, format!("{url}/api/v1/users"), None, user).await?;
    if created["name"] != "soak-admin" {
        return Err(bench_error(format!("cannot make the administrator: {created}")));
    }
    let login = json!({ "user": "soak-admin", "password": password });
    let login = post_json(http, format!("{url}/api/v1/auth/login"), None, login).await?;
    let session = login["access_token"]
        .as_str()
        .ok_or_else(|| bench_error(format!("the login gave no access token: {login}")))?
        .to_owned();
    let token =
        post_json(http, format!("{url}/api/v1/tokens"), Some(&session), json!({ "name": "soak" }))
            .await?;
    let token = token["token"]
        .as_str()
        .ok_or_else(|| bench_error(format!("no API token was made: {token}")))?
        .to_owned();
    Ok(Credentials { session, token })
}

/// Waits until no run is queued or running (at most two minutes), then `idle` more.
async fn settle(
    http: &reqwest::Client,
    server: &SoakServer,
    credentials: &Credentials,
    idle: Duration,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut busy = false;
        for status in ["queued", "running"] {
            let page: Value = match http
                .get(format!("{}/api/v1/runs?status={status}&limit=1", server.url))
                .bearer_auth(&credentials.token)
                .send()
                .await
            {
                Ok(response) => response.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            busy |= page["items"].as_array().is_some_and(|items| !items.is_empty());
        }
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(idle).await;
}

type Operation = (reqwest::Method, String, Value);

/// Every operation of the document but those that stream or long-poll (they hold a
/// connection open, which is not what this measures).
fn operations(doc: &Value) -> Vec<Operation> {
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let streams = path.ends_with("/events")
            || path.contains("/logs")
            || path.ends_with("/ws")
            || path.ends_with("/lease");
        if streams {
            continue;
        }
        for method in ["get", "post", "put", "patch", "delete"] {
            if let (Some(operation), Ok(verb)) = (item.get(method), method.to_uppercase().parse()) {
                operations.push((verb, path.clone(), operation.clone()));
            }
        }
    }
    operations
}

const NASTY: &[&str] = &[
    "",
    "..",
    "%00",
    "-1",
    "0",
    "99999999999999999999999",
    "01a2018e-6ce0-7296-a575-14a55cd12791",
    "ÄÖÜ-ünïcödé",
    "<script>",
    "default",
    "Hello World API",
];

fn text(rng: &mut StdRng) -> String {
    match rng.random_range(0..5) {
        0 => NASTY[rng.random_range(0..NASTY.len())].to_owned(),
        1 => "x".repeat(rng.random_range(10..2000)),
        2 => (0..rng.random_range(1..20)).map(|_| rng.random_range('a'..='z')).collect(),
        3 => "Hello World API".to_owned(),
        _ => rng.random::<u32>().to_string(),
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/")) {
        Some(path) => path.split('/').fold(doc, |node, key| &node[key]),
        None => schema,
    }
}

/// A value for `schema`: of its type, mostly.
fn value_for(rng: &mut StdRng, doc: &Value, schema: &Value, depth: u32) -> Value {
    let schema = resolve(doc, schema);
    if depth > 4 || rng.random_ratio(1, 8) {
        return json!(text(rng));
    }
    if let Some(options) =
        schema.get("oneOf").or_else(|| schema.get("anyOf")).and_then(Value::as_array)
        && !options.is_empty()
    {
        let pick = rng.random_range(0..options.len());
        return value_for(rng, doc, &options[pick], depth + 1);
    }
    if let Some(choices) = schema.get("enum").and_then(Value::as_array)
        && !choices.is_empty()
    {
        return choices[rng.random_range(0..choices.len())].clone();
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.iter().filter_map(Value::as_str).find(|k| *k != "null"),
        Some(Value::String(kind)) => Some(kind.as_str()),
        _ => None,
    };
    match kind {
        Some("string") => json!(text(rng)),
        Some("integer") => json!(rng.random_range(0i64..1000)),
        Some("number") => json!(rng.random::<f64>() * 10.0),
        Some("boolean") => json!(rng.random::<bool>()),
        Some("array") => {
            let items = schema.get("items").unwrap_or(&Value::Null);
            Value::Array(
                (0..rng.random_range(0..3))
                    .map(|_| value_for(rng, doc, items, depth + 1))
                    .collect(),
            )
        }
        _ => {
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut object = Map::new();
            for (name, property) in
                schema.get("properties").and_then(Value::as_object).into_iter().flatten()
            {
                if required.contains(&name.as_str()) || rng.random_ratio(1, 2) {
                    object.insert(name.clone(), value_for(rng, doc, property, depth + 1));
                }
            }
            Value::Object(object)
        }
    }
}

fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn generate(rng: &mut StdRng, doc: &Value, operations: &[Operation]) -> Call {
    let (method, template, operation) = &operations[rng.random_range(0..operations.len())];
    let path = template
        .split('/')
        .map(
            |segment| {
                if segment.starts_with('{') { encode(&text(rng)) } else { segment.to_owned() }
            },
        )
        .collect::<Vec<_>>()
        .join("/");
    let mut query = Vec::new();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        if parameter["in"] == "query"
            && rng.random_ratio(1, 2)
            && let Some(name) = parameter["name"].as_str()
        {
            let value = value_for(rng, doc, &parameter["schema"], 1);
            query.push((
                name.to_owned(),
                value.as_str().map_or_else(|| value.to_string(), str::to_owned),
            ));
        }
    }
    if rng.random_ratio(1, 10) {
        query.push((text(rng), text(rng)));
    }
    let credential = match rng.random_range(0..20) {
        0..=6 => Credential::Session,
        7..=13 => Credential::ApiToken,
        14..=16 => Credential::Bogus(rng.random()),
        _ => Credential::None,
    };
    let project = rng.random_ratio(1, 10).then(|| text(rng));
    let schema = operation.pointer("/requestBody/content/application~1json/schema");
    let body = if *method == reqwest::Method::GET || *method == reqwest::Method::DELETE {
        Body::None
    } else {
        match (rng.random_range(0..10), schema) {
            (0, _) => Body::Raw { content_type: "application/json", text: "{not json" },
            (1, _) => Body::Raw { content_type: "text/plain", text: "hello" },
            (2, _) => Body::None,
            (_, Some(schema)) => Body::Json(value_for(rng, doc, schema, 0)),
            (_, None) => Body::Json(json!({ text(rng): text(rng) })),
        }
    };
    Call { method: method.clone(), path, query, credential, project, body }
}

async fn send_all(
    http: &reqwest::Client,
    url: &str,
    credentials: &Credentials,
    calls: Vec<Call>,
    concurrency: usize,
) -> BTreeMap<u16, usize> {
    let answers = futures::stream::iter(calls)
        .map(|call| {
            let mut request =
                http.request(call.method, format!("{url}{}", call.path)).query(&call.query);
            request = match call.credential {
                Credential::Session => request.bearer_auth(&credentials.session),
                Credential::ApiToken => request.bearer_auth(&credentials.token),
                Credential::Bogus(n) => request.bearer_auth(format!("drv_bogus{n}")),
                Credential::None => request,
            };
            if let Some(project) = call.project {
                request = request.header("x-drover-project", encode(&project));
            }
            request = match call.body {
                Body::None => request,
                Body::Json(value) => request.json(&value),
                Body::Raw { content_type, text } => {
                    request.header("content-type", content_type).body(text)
                }
            };
            async move {
                match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    // No answer at all.
                    Err(_) => 0,
                }
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut statuses = BTreeMap::new();
    futures::pin_mut!(answers);
    while let Some(status) = answers.next().await {
        *statuses.entry(status).or_insert(0) += 1;
    }
    statuses
}
