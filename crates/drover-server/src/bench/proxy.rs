//! `drover bench proxy`: wrk-style load against a small upstream, straight to it, through
//! the drover routing proxy and through nginx in front of the same upstream, in one run.
//!
//! Every party runs in its own process, so none shares a runtime with the load generator:
//! the upstream (`drover bench upstream`, a hyper HTTP/1.1 server answering every request
//! with the 13 bytes `Hello, world!`), the drover proxy (`drover bench proxy-server`, the
//! real [`Proxy`] with one route, set up as a server sets it up: Prometheus recorder
//! installed, activity reported) and nginx (a generated configuration under a temporary
//! prefix, as many worker processes as the proxy's runtime has threads, keep-alive
//! connections to the upstream, started under `drover bench guard`). Each child leads
//! its own process group, killed whole when its handle drops, and reads a pipe from the
//! bench on stdin: when the bench dies, however it dies, the pipe closes and the child
//! (for nginx, its guard, taking nginx's workers along) ends its group.
//!
//! The load generator (in this process) keeps a fixed number of keep-alive connections,
//! each sending `GET /` back to back with `Host: bench.localhost` (the route drover
//! follows; the upstream and nginx ignore it). After a warm-up that is not measured,
//! every response completed within the measured window is timed from just before its
//! request was written to its last body byte, into a fixed-size histogram per
//! connection. Non-2xx responses and transport errors are counted apart, never as
//! latencies nor as throughput.
//!
//! Each target's measured time is cut into `rounds` slices, the targets taking turns
//! (direct, drover, nginx, direct, …), each slice after its own warm-up: a change in
//! what else the machine runs then touches every target alike.
//!
//! Two passes: full load (`connections`, default 32, back to back: throughput and the
//! drover/nginx ratio) and moderate load (`moderate_connections`, default 4, sharing a
//! fixed offered rate, default 2000 requests/s, or back to back without one: the latency a
//! proxy adds, its p99 minus the direct p99). Paced requests are timed from when they are
//! sent, so a stall delays the next request rather than being counted against it (the
//! moderate pass is meant to stay far from saturation, where the two agree).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drover_proxy::{Proxy, Route, RouteTable};
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The hostname the drover proxy routes to the upstream.
pub const BENCH_HOST: &str = "bench.localhost";
/// What the upstream answers.
const BODY: &[u8] = b"Hello, world!";
/// How long a party gets to start and answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of a child's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProxyBenchError(String);

impl ProxyBenchError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// What `drover bench proxy` measures.
#[derive(Debug, Clone)]
pub struct ProxyBenchOptions {
    /// The drover binary, started as `EXE bench upstream` and `EXE bench proxy-server`.
    pub exe: PathBuf,
    /// The nginx to compare with; `None` measures direct and drover only.
    pub nginx: Option<PathBuf>,
    /// Connections of the full-load pass.
    pub connections: usize,
    /// Connections of the moderate-load pass.
    pub moderate_connections: usize,
    /// Requests per second of the moderate-load pass, between all its connections;
    /// `None` (or 0) sends back to back.
    pub moderate_rate: Option<u32>,
    /// Measured time per target and pass.
    pub duration: Duration,
    /// Slices each target's `duration` is measured in, the targets taking turns, so a
    /// change in the machine's background load touches all of them alike.
    pub rounds: u32,
    /// Unmeasured load before each slice.
    pub warmup: Duration,
}

/// Figures of one target in one pass.
#[derive(Debug, Clone, Serialize)]
pub struct TargetFigures {
    /// `direct`, `drover` or `nginx`.
    pub target: String,
    pub connections: usize,
    /// 2xx responses completed within the measured window.
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Responses with another status, within the window.
    pub non_2xx: u64,
    /// Failed connects, requests or bodies, within the window.
    pub errors: u64,
    /// Connections the target closed between requests (re-opened, not errors).
    pub reconnects: u64,
    /// CPU time (user + system) of the processes the load generator talks to (the
    /// upstream for `direct`, the proxy for the others) per 2xx response, in µs.
    pub cpu_us_per_request: Option<f64>,
    /// Their average CPU use over the window, in cores.
    pub cpu_cores: Option<f64>,
}

impl TargetFigures {
    /// Whether every request of the window succeeded.
    pub fn clean(&self) -> bool {
        self.non_2xx == 0 && self.errors == 0 && self.requests > 0
    }
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyBenchReport {
    pub connections: usize,
    pub moderate_connections: usize,
    /// Requests per second offered in the moderate pass (`None`: back to back).
    pub moderate_rate: Option<u32>,
    pub duration_seconds: f64,
    pub rounds: u32,
    pub warmup_seconds: f64,
    /// Runtime threads of the drover proxy, and nginx worker processes.
    pub proxy_workers: usize,
    /// The nginx measured, if one was found.
    pub nginx: Option<String>,
    pub full_load: Vec<TargetFigures>,
    pub moderate_load: Vec<TargetFigures>,
    /// drover req/s ÷ nginx req/s at full load (target ≥ 0.9).
    pub drover_to_nginx_throughput: Option<f64>,
    /// drover p99 − direct p99 at moderate load, in ms (target < 1).
    pub drover_added_p99_ms: f64,
    /// nginx p99 − direct p99 at moderate load, in ms.
    pub nginx_added_p99_ms: Option<f64>,
}

impl ProxyBenchReport {
    fn figures<'a>(pass: &'a [TargetFigures], target: &str) -> Option<&'a TargetFigures> {
        pass.iter().find(|figures| figures.target == target)
    }
}

/// nginx on `PATH`, else in the usual system places.
pub fn find_nginx() -> Option<PathBuf> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("nginx")).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(
            ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
                .map(PathBuf::from),
        )
        .find(|candidate| candidate.is_file())
}

/// Runs both passes against every target and reports.
pub async fn bench_proxy(options: ProxyBenchOptions) -> Result<ProxyBenchReport, ProxyBenchError> {
    let dir = tempfile::tempdir()
        .map_err(|err| ProxyBenchError::new(format!("cannot make a temporary directory: {err}")))?;
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);

    let mut upstream = Party::drover(
        "upstream",
        &options.exe,
        dir.path(),
        &["bench", "upstream", "--listen", "127.0.0.1:0"],
    )
    .await?;
    let route = format!("{BENCH_HOST}={}", upstream.addr);
    let mut drover = Party::drover(
        "drover proxy",
        &options.exe,
        dir.path(),
        &["bench", "proxy-server", "--listen", "127.0.0.1:0", "--route", &route],
    )
    .await?;
    let mut nginx = match &options.nginx {
        Some(program) => {
            Some(Party::nginx(&options.exe, program, dir.path(), upstream.addr, workers)?)
        }
        None => None,
    };

    upstream.wait_answering().await?;
    drover.wait_answering().await?;
    if let Some(nginx) = &mut nginx {
        nginx.wait_answering().await?;
    }
    let mut targets = vec![
        ("direct", upstream.addr, upstream.process.pid()),
        ("drover", drover.addr, drover.process.pid()),
    ];
    if let Some(nginx) = &nginx {
        targets.push(("nginx", nginx.addr, nginx.process.pid()));
    }

    let rounds = options.rounds.max(1);
    let slice = options.duration / rounds;
    let mut full_load = Vec::new();
    let mut moderate_load = Vec::new();
    for (connections, rate, figures) in [
        (options.connections.max(1), None, &mut full_load),
        (options.moderate_connections.max(1), options.moderate_rate, &mut moderate_load),
    ] {
        // Per target: what it saw, measured seconds, CPU seconds (if known).
        let mut totals: Vec<(Stats, f64, Option<f64>)> =
            targets.iter().map(|_| (Stats::new(), 0.0, Some(0.0))).collect();
        for _ in 0..rounds {
            for ((_, addr, group), total) in targets.iter().zip(&mut totals) {
                let (stats, seconds, cpu) =
                    load(*addr, *group, connections, rate, options.warmup, slice).await;
                total.0.merge(&stats);
                total.1 += seconds;
                total.2 = total.2.zip(cpu).map(|(sum, cpu)| sum + cpu);
                // Let the closed connections settle before the next target.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for ((target, ..), (stats, seconds, cpu)) in targets.iter().zip(&totals) {
            figures.push(stats.figures(target, connections, *seconds, *cpu));
        }
    }

    // Orderly stops; dropping the handles would kill them anyway.
    if let Some(nginx) = nginx {
        nginx.stop().await;
    }
    drover.stop().await;
    upstream.stop().await;

    let full = |target| ProxyBenchReport::figures(&full_load, target);
    let moderate = |target| ProxyBenchReport::figures(&moderate_load, target);
    let drover_to_nginx_throughput = match (full("drover"), full("nginx")) {
        (Some(drover), Some(nginx)) if nginx.requests_per_second > 0.0 => {
            Some(drover.requests_per_second / nginx.requests_per_second)
        }
        _ => None,
    };
    let added = |target| match (moderate(target), moderate("direct")) {
        (Some(proxied), Some(direct)) => Some(proxied.p99_ms - direct.p99_ms),
        _ => None,
    };
    Ok(ProxyBenchReport {
        connections: options.connections.max(1),
        moderate_connections: options.moderate_connections.max(1),
        moderate_rate: options.moderate_rate.filter(|rate| *rate > 0),
        duration_seconds: options.duration.as_secs_f64(),
        rounds: options.rounds.max(1),
        warmup_seconds: options.warmup.as_secs_f64(),
        proxy_workers: workers,
        nginx: options.nginx.as_ref().map(|path| path.display().to_string()),
        drover_to_nginx_throughput,
        drover_added_p99_ms: added("drover").unwrap_or(f64::NAN),
        nginx_added_p99_ms: added("nginx"),
        full_load,
        moderate_load,
    })
}

// ---------------------------------------------------------------------------------------
// The parties

/// A child that leads its own process group, its stdin a pipe from this process. The
/// whole group is killed when the handle drops; the child ends it itself when the pipe
/// closes, which the kernel does when this process dies.
struct Spawned {
    child: tokio::process::Child,
    group: Pid,
    stdin: Option<tokio::process::ChildStdin>,
}

impl Spawned {
    fn pid(&self) -> u32 {
        self.group.as_raw().unsigned_abs()
    }

    fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Closes its stdin (the child's signal to stop) and waits up to `grace` for it to
    /// exit; dropping then kills whatever is left of the group.
    async fn stop(mut self, grace: Duration) {
        drop(self.stdin.take());
        let _ = tokio::time::timeout(grace, self.child.wait()).await;
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Whatever happened, nothing of this group outlives its handle.
        let _ = killpg(self.group, Signal::SIGKILL);
    }
}

/// A child process serving one target, and the tail of what it said on stderr.
struct Party {
    name: String,
    process: Spawned,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Party {
    fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        cwd: &Path,
    ) -> Result<(Spawned, tokio::process::ChildStdout, Arc<Mutex<String>>), ProxyBenchError> {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                ProxyBenchError::new(format!(
                    "cannot start the {name} ({}): {err}",
                    program.display()
                ))
            })?;
        let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
        let (Some(pid), Some(stdin), Some(stdout), Some(mut stderr)) =
            (pid, child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ProxyBenchError::new(format!("the {name} exited at once")));
        };
        let process = Spawned { child, group: Pid::from_raw(pid), stdin: Some(stdin) };
        let tail = Arc::new(Mutex::new(String::new()));
        let keep = tail.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0; 1024];
            while let Ok(read @ 1..) = stderr.read(&mut chunk).await {
                let mut tail = keep.lock().unwrap_or_else(|poison| poison.into_inner());
                tail.push_str(&String::from_utf8_lossy(&chunk[..read]));
                if tail.len() > STDERR_TAIL {
                    let mut cut = tail.len() - STDERR_TAIL;
                    while !tail.is_char_boundary(cut) {
                        cut += 1;
                    }
                    tail.drain(..cut);
                }
            }
        });
        Ok((process, stdout, tail))
    }

    /// Starts `EXE ARGS…` and reads the address it prints on its first stdout line.
    async fn drover(
        name: &str,
        exe: &Path,
        dir: &Path,
        args: &[&str],
    ) -> Result<Self, ProxyBenchError> {
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        let (process, stdout, stderr) = Self::spawn(name, exe, &args, dir)?;
        let mut party = Self {
            name: name.to_owned(),
            process,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stderr,
        };
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        party.addr = match line {
            Ok(Ok(Some(line))) => line
                .trim()
                .parse()
                .map_err(|_| party.failure(&format!("printed `{line}` instead of its address")))?,
            Ok(_) => return Err(party.failure("exited before printing its address")),
            Err(_) => return Err(party.failure("did not print its address in time")),
        };
        Ok(party)
    }

    /// Starts nginx in front of `upstream`, everything it writes kept under `dir`, under
    /// `EXE bench guard` (nginx's workers are not its children: the guard ends them too).
    fn nginx(
        exe: &Path,
        program: &Path,
        dir: &Path,
        upstream: SocketAddr,
        workers: usize,
    ) -> Result<Self, ProxyBenchError> {
        let listen = free_port()?;
        let prefix = dir.join("nginx");
        for sub in ["", "temp"] {
            std::fs::create_dir_all(prefix.join(sub)).map_err(|err| {
                ProxyBenchError::new(format!("cannot make {}: {err}", prefix.display()))
            })?;
        }
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&prefix, listen, upstream, workers)).map_err(|err| {
            ProxyBenchError::new(format!("cannot write {}: {err}", conf.display()))
        })?;
        let args = vec![
            "bench".to_owned(),
            "guard".to_owned(),
            "--".to_owned(),
            program.display().to_string(),
            "-p".to_owned(),
            format!("{}/", prefix.display()),
            "-c".to_owned(),
            conf.display().to_string(),
            "-e".to_owned(),
            "stderr".to_owned(),
        ];
        let (process, _stdout, stderr) = Self::spawn("nginx", exe, &args, &prefix)?;
        Ok(Self { name: "nginx".to_owned(), process, addr: listen, stderr })
    }

    /// Waits until the party answers a request (any status: errors are reported by the
    /// measurement), or fails with what it said if it exits or never answers.
    async fn wait_answering(&mut self) -> Result<(), ProxyBenchError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.process.try_exited() {
                return Err(self.failure(&format!("exited ({status})")));
            }
            if probe(self.addr).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("did not answer on {} in time", self.addr)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn failure(&mut self, what: &str) -> ProxyBenchError {
        let said = self.stderr.lock().unwrap_or_else(|poison| poison.into_inner()).clone();
        let said = said.trim();
        ProxyBenchError::new(if said.is_empty() {
            format!("the {} {what}", self.name)
        } else {
            format!("the {} {what}; it said: {said}", self.name)
        })
    }

    async fn stop(self) {
        self.process.stop(Duration::from_secs(2)).await;
    }
}

/// A port free at the time of asking (nginx cannot report the one it was given).
fn free_port() -> Result<SocketAddr, ProxyBenchError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|err| ProxyBenchError::new(format!("cannot find a free port: {err}")))
}

/// A minimal reverse proxy: nothing outside `prefix`, no access log, keep-alive both ways.
fn nginx_conf(prefix: &Path, listen: SocketAddr, upstream: SocketAddr, workers: usize) -> String {
    let prefix = prefix.display();
    format!(
        "daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    keepalive_requests 1000000;
    upstream bench_upstream {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
"
    )
}

/// One request on a fresh connection; whether any HTTP response came back.
async fn probe(addr: SocketAddr) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(connection);
        let response = sender.send_request(request()).await.ok()?;
        response.into_body().collect().await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Some(_)))
}

// ---------------------------------------------------------------------------------------
// What the hidden subcommands run

/// Fires `token` once stdin reaches its end: the bench that started this process closed
/// the pipe, or died. A plain thread, not the runtime's blocking pool, so a read that
/// never ends cannot hold up the runtime's shutdown.
pub fn cancel_when_stdin_closes(token: CancellationToken) {
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut buffer = [0; 64];
        while matches!(stdin.read(&mut buffer), Ok(1..)) {}
        token.cancel();
    });
}

/// `drover bench guard -- PROGRAM ARGS…`: runs the program in this process's group (it
/// leads one, as the bench starts it) and returns its exit code. If stdin closes first,
/// stops it: `SIGTERM` (nginx then stops and reaps its workers), and after 2 s `SIGKILL`
/// to the whole group, the program's own children included.
pub async fn guard(command: &[String]) -> Result<i32, ProxyBenchError> {
    let (program, args) =
        command.split_first().ok_or_else(|| ProxyBenchError::new("nothing to guard"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| ProxyBenchError::new(format!("cannot start {program}: {err}")))?;
    let closed = CancellationToken::new();
    cancel_when_stdin_closes(closed.clone());
    tokio::select! {
        status = child.wait() => {
            let status =
                status.map_err(|err| ProxyBenchError::new(format!("{program}: {err}")))?;
            Ok(status.code().unwrap_or(1))
        }
        () = closed.cancelled() => {
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let stopped = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            if let Ok(Ok(status)) = stopped {
                return Ok(status.code().unwrap_or(1));
            }
            // Ends this process too.
            let _ = killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
            Ok(1)
        }
    }
}

/// A bound server of the bench (`drover bench upstream` / `drover bench proxy-server`),
/// not yet serving.
pub struct BenchServer {
    addr: SocketAddr,
    role: Role,
}

enum Role {
    Upstream(TcpListener),
    Proxy(Proxy, RouteTable),
}

impl BenchServer {
    /// The upstream: `Hello, world!` to every request, HTTP/1.1 with keep-alive.
    pub async fn upstream(listen: SocketAddr) -> Result<Self, ProxyBenchError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|err| ProxyBenchError::new(format!("cannot listen on {listen}: {err}")))?;
        let addr = listener
            .local_addr()
            .map_err(|err| ProxyBenchError::new(format!("cannot listen on {listen}: {err}")))?;
        Ok(Self { addr, role: Role::Upstream(listener) })
    }

    /// The real drover proxy with the given `host → upstream` routes, set up as a server
    /// sets it up: the Prometheus recorder installed, every routed request reported as
    /// activity (here to a channel that is drained).
    pub async fn proxy(
        listen: SocketAddr,
        routes: &[(String, SocketAddr)],
    ) -> Result<Self, ProxyBenchError> {
        let (activity, mut reports) = tokio::sync::mpsc::channel::<String>(1024);
        tokio::spawn(async move { while reports.recv().await.is_some() {} });
        let proxy = Proxy::bind(listen)
            .await
            .map_err(|err| ProxyBenchError::new(err.to_string()))?
            .on_activity(activity);
        let table = RouteTable::new();
        for (host, upstream) in routes {
            table.upsert(Route {
                host: host.clone(),
                upstream: *upstream,
                service: "bench".to_owned(),
                environment: Some("bench".to_owned()),
                project: None,
                activity: Some("bench".to_owned()),
                instance: None,
            });
        }
        Ok(Self { addr: proxy.local_addr(), role: Role::Proxy(proxy, table) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` fires.
    pub async fn serve(self, shutdown: CancellationToken) {
        match self.role {
            Role::Proxy(proxy, routes) => {
                crate::metrics_handle();
                let upkeep = crate::telemetry::spawn_upkeep(shutdown.clone());
                proxy.run(routes, shutdown).await;
                let _ = upkeep.await;
            }
            Role::Upstream(listener) => loop {
                let stream = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(err) => {
                            tracing::warn!(error = %err, "bench upstream accept failed");
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// The load generator

fn request() -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    request.headers_mut().insert(HOST, HeaderValue::from_static(BENCH_HOST));
    request
}

/// When measurement starts and stops.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

impl Window {
    fn contains(&self, instant: Instant) -> bool {
        instant >= self.from && instant < self.until
    }
}

/// What one or more connections saw.
struct Stats {
    latencies: Histogram,
    non_2xx: u64,
    errors: u64,
    reconnects: u64,
}

impl Stats {
    fn new() -> Self {
        Self { latencies: Histogram::new(), non_2xx: 0, errors: 0, reconnects: 0 }
    }

    fn merge(&mut self, other: &Self) {
        self.latencies.merge(&other.latencies);
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.reconnects += other.reconnects;
    }

    fn figures(
        &self,
        target: &str,
        connections: usize,
        seconds: f64,
        cpu_seconds: Option<f64>,
    ) -> TargetFigures {
        let ms = |nanos: Option<u64>| nanos.map_or(f64::NAN, |n| n as f64 / 1e6);
        let requests = self.latencies.count();
        TargetFigures {
            target: target.to_owned(),
            connections,
            requests: self.latencies.count(),
            requests_per_second: self.latencies.count() as f64 / seconds,
            p50_ms: ms(self.latencies.quantile(0.50)),
            p99_ms: ms(self.latencies.quantile(0.99)),
            max_ms: ms(self.latencies.max()),
            non_2xx: self.non_2xx,
            errors: self.errors,
            reconnects: self.reconnects,
            cpu_us_per_request: cpu_seconds
                .filter(|_| requests > 0)
                .map(|cpu| cpu * 1e6 / requests as f64),
            cpu_cores: cpu_seconds.map(|cpu| cpu / seconds),
        }
    }
}

/// `connections` connections to `addr` for `warmup + duration`, sending requests back to
/// back, or `rate` requests per second between them all (each connection at its share,
/// the connections' schedules staggered); what the measured window saw and its length in
/// seconds, and the CPU time process group `group` used meanwhile.
async fn load(
    addr: SocketAddr,
    group: u32,
    connections: usize,
    rate: Option<u32>,
    warmup: Duration,
    duration: Duration,
) -> (Stats, f64, Option<f64>) {
    let start = Instant::now();
    let from = start + warmup;
    let window = Window { from, until: from + duration };
    let period = rate.filter(|rate| *rate > 0).map(|rate| {
        Duration::from_secs_f64(connections as f64 / f64::from(rate)).max(Duration::from_micros(1))
    });
    let tasks: Vec<_> = (0..connections)
        .map(|n| {
            let pace = period.map(|period| {
                let first = start + period.mul_f64(n as f64 / connections as f64);
                tokio::time::interval_at(first.into(), period)
            });
            tokio::spawn(connection_loop(addr, window, pace))
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let cpu_before = group_cpu_seconds(group);
    tokio::time::sleep_until(window.until.into()).await;
    let cpu = group_cpu_seconds(group).zip(cpu_before).map(|(after, before)| after - before);
    let mut total = Stats::new();
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(&stats),
            Err(_) => total.errors += 1,
        }
    }
    (total, duration.as_secs_f64(), cpu)
}

/// CPU time (user + system, every thread) used so far by the live processes of process
/// group `group`, in seconds, from `/proc`; `None` where there is no `/proc`.
fn group_cpu_seconds(group: u32) -> Option<f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()?;
    let mut total: u64 = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // After the command's closing parenthesis: state, ppid, pgrp, … utime (14th
        // field of the line), stime (15th).
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        if field(5) == Some(u64::from(group)) {
            total += field(14).unwrap_or(0) + field(15).unwrap_or(0);
        }
    }
    Some(total as f64 / ticks as f64)
}

/// One client connection for the whole window, re-opened if it fails or is closed; each
/// request waits for a tick of `pace` if there is one.
async fn connection_loop(
    addr: SocketAddr,
    window: Window,
    mut pace: Option<tokio::time::Interval>,
) -> Stats {
    let mut stats = Stats::new();
    while Instant::now() < window.until {
        match one_connection(addr, window, pace.as_mut(), &mut stats).await {
            Ok(Ended::Window) => break,
            Ok(Ended::Closed) => {
                if window.contains(Instant::now()) {
                    stats.reconnects += 1;
                }
            }
            Err(()) => {
                if window.contains(Instant::now()) {
                    stats.errors += 1;
                }
                // Do not spin on a target that refuses connections.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    stats
}

enum Ended {
    /// The window is over.
    Window,
    /// The target closed the connection between requests.
    Closed,
}

async fn one_connection(
    addr: SocketAddr,
    window: Window,
    pace: Option<&mut tokio::time::Interval>,
    stats: &mut Stats,
) -> Result<Ended, ()> {
    let stream = TcpStream::connect(addr).await.map_err(drop)?;
    stream.set_nodelay(true).map_err(drop)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(drop)?;
    // The connection is driven in this task, beside its requests: no hand-off between
    // threads per request. It ends once the requests are done and `sender` is dropped.
    let (ended, _) = tokio::join!(requests(sender, window, pace, stats), connection);
    ended
}

/// Requests on one connection, back to back or at the pace's ticks, until the window
/// ends or the connection does. A request is timed from when it is sent, not from its
/// tick (a late response delays the next request rather than counting against it).
async fn requests(
    mut sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    window: Window,
    mut pace: Option<&mut tokio::time::Interval>,
    stats: &mut Stats,
) -> Result<Ended, ()> {
    loop {
        if let Some(pace) = pace.as_deref_mut() {
            pace.tick().await;
        }
        if Instant::now() >= window.until {
            return Ok(Ended::Window);
        }
        if sender.ready().await.is_err() {
            return Ok(Ended::Closed);
        }
        let started = Instant::now();
        let response = sender.send_request(request()).await.map_err(drop)?;
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(drop)?;
        }
        let done = Instant::now();
        if window.contains(done) {
            if status.is_success() {
                let nanos = u64::try_from((done - started).as_nanos()).unwrap_or(u64::MAX);
                stats.latencies.record(nanos);
            } else {
                stats.non_2xx += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The histogram

/// Sub-buckets per power of two: a value is known to within 1/128 of itself.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for every `u64`: 58 × 128, 59 KiB.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) << SUB_BITS;

/// Counts of values (nanoseconds here) in log-linear buckets: exact below 256, then 128
/// equal buckets per power of two. Fixed size whatever the number of values.
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Self { counts: vec![0; BUCKETS], total: 0, max: 0 }
    }

    fn bucket(value: u64) -> usize {
        if value < SUB {
            return value as usize;
        }
        // The highest set bit is at SUB_BITS + shift; keep the SUB_BITS bits below it.
        let shift = 63 - value.leading_zeros() - SUB_BITS;
        (((u64::from(shift) + 1) << SUB_BITS) | ((value >> shift) - SUB)) as usize
    }

    /// The smallest value of bucket `index`, and how many values it spans.
    fn bounds(index: usize) -> (u64, u64) {
        let index = index as u64;
        if index < SUB {
            return (index, 1);
        }
        let shift = (index >> SUB_BITS) - 1;
        (((index & (SUB - 1)) + SUB) << shift, 1 << shift)
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::bucket(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    fn count(&self) -> u64 {
        self.total
    }

    fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }

    /// The value below which a fraction `q` of the values lie (the middle of its bucket,
    /// never above the largest value recorded, which `q = 1` gives); `None` when empty.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return Some(self.max);
        }
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = Self::bounds(index);
                return Some((low + (width - 1) / 2).min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_the_bucket_that_spans_it() {
        let mut values: Vec<u64> = (0..4096).collect();
        values.extend((0..64).flat_map(|bit| {
            let power = 1u64 << bit;
            [power - 1, power, power.saturating_add(power / 3), power | (power - 1)]
        }));
        values.push(u64::MAX);
        for value in values {
            let index = Histogram::bucket(value);
            assert!(index < BUCKETS, "{value} → {index}");
            let (low, width) = Histogram::bounds(index);
            assert!(low <= value && value - low < width, "{value} in [{low}, +{width})");
            assert!(width == 1 || (width as f64) / (low as f64) <= 1.0 / SUB as f64);
        }
    }

    #[test]
    fn quantiles_are_within_a_percent() {
        let mut histogram = Histogram::new();
        // 1 µs … 100 ms, uniformly, in nanoseconds; recorded in two halves and merged.
        let mut other = Histogram::new();
        for micros in 1..=100_000u64 {
            let target = if micros % 2 == 0 { &mut histogram } else { &mut other };
            target.record(micros * 1000);
        }
        histogram.merge(&other);
        assert_eq!(histogram.count(), 100_000);
        assert_eq!(histogram.max(), Some(100_000_000));
        for (q, expected) in [(0.5, 50_000_000.0), (0.99, 99_000_000.0), (0.001, 100_000.0)] {
            let got = histogram.quantile(q).expect("not empty") as f64;
            assert!((got - expected).abs() / expected < 0.01, "q{q}: {got} vs {expected}");
        }
        assert_eq!(histogram.quantile(1.0), Some(100_000_000));
        assert_eq!(Histogram::new().quantile(0.5), None);
    }
}
