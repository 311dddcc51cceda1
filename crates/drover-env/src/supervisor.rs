//! The supervisor: keeps one service instance running the way its [`ServiceSpec`] says.
//!
//! Each instance is a task that starts the process (through a [`Provider`]), copies its
//! output into a size-rotated log file, probes readiness, restarts it after an exit as the
//! restart policy allows (exponential delays, reset after a stable period, at most
//! `max_restarts` within the window), enforces the memory limit, and stops the whole
//! process group gracefully when asked. Every change of state is reported to a
//! [`Reporter`] (the environment manager records it in the store).
//!
//! An instance with [`InstanceSecrets`] asks for its project's secrets before every start
//! of its process (so a restart picks up a changed secret), runs it (and its exec
//! readiness probe) with them as environment variables, and replaces their values with
//! `[redacted:NAME]` in every line of output before it is written to the log, sent to
//! followers or matched by a log-line probe. Without secrets, lines are copied as they are.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::{
    DependencyCondition, EnvironmentId, ProbeKind, Readiness, Redactor, ServiceName, ServiceSpec,
    ServiceStatus,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::provider::{Launch, Provider, SpawnedProcess};
use crate::secrets::{InstanceSecrets, with_secrets};
use crate::{CommandSpec, run_command_redacting};

/// Which instance: a service of an environment, or a shared one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub environment: Option<EnvironmentId>,
    pub service: ServiceName,
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.environment {
            Some(env) => write!(f, "{}@{env}", self.service),
            None => write!(f, "{}@shared", self.service),
        }
    }
}

impl std::str::FromStr for InstanceKey {
    type Err = drover_domain::ValidationError;

    /// The inverse of `Display`: `SERVICE@ENVIRONMENT_ID` or `SERVICE@shared`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || drover_domain::ValidationError::new("instance", format!("`{s}`"));
        let (service, environment) = s.rsplit_once('@').ok_or_else(invalid)?;
        let environment = match environment {
            "shared" => None,
            id => Some(id.parse()?),
        };
        Ok(Self { environment, service: ServiceName::parse(service)? })
    }
}

/// What an instance is doing, as its watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceState {
    pub status: ServiceStatus,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub reason: Option<String>,
    /// It ran to a successful exit at least once (for `completed` dependencies).
    pub completed: bool,
    /// It runs outside drover; drover only uses it.
    pub external: bool,
}

impl InstanceState {
    fn starting() -> Self {
        Self {
            status: ServiceStatus::Starting,
            pid: None,
            restarts: 0,
            reason: None,
            completed: false,
            external: false,
        }
    }

    /// Whether a dependant waiting on `condition` may start.
    pub fn satisfies(&self, condition: DependencyCondition) -> bool {
        match condition {
            DependencyCondition::Started => {
                self.pid.is_some() || self.external || self.status == ServiceStatus::Ready
            }
            DependencyCondition::Ready => self.status == ServiceStatus::Ready,
            DependencyCondition::Completed => self.completed,
        }
    }

    /// Whether it will never satisfy anything again (gave up, or stopped for good).
    pub fn is_final_failure(&self) -> bool {
        self.status == ServiceStatus::Crashed
            || (self.status == ServiceStatus::Stopped && !self.completed)
    }
}

/// Receives every state change of every instance.
#[async_trait]
pub trait Reporter: Send + Sync + 'static {
    async fn report(&self, key: &InstanceKey, state: &InstanceState);
}

/// Everything an instance needs to run, already expanded (placeholders, ports, env).
#[derive(Clone)]
pub struct InstancePlan {
    pub key: InstanceKey,
    pub spec: ServiceSpec,
    pub command: CommandSpec,
    /// Where readiness probes (http, tcp) connect.
    pub probe_addr: Option<SocketAddr>,
    /// Instances this one waits for before starting, with the condition.
    pub dependencies: Vec<(InstanceKey, watch::Receiver<InstanceState>, DependencyCondition)>,
    /// If it answers here already, it is used instead of started (shared services).
    pub external_addr: Option<SocketAddr>,
    /// Where to get the project's secrets at each start (per-environment services of a
    /// server with a vault); `None`: the process gets none and its output is not redacted.
    pub secrets: Option<InstanceSecrets>,
}

/// A running instance.
pub struct Instance {
    pub key: InstanceKey,
    state: watch::Receiver<InstanceState>,
    stop: CancellationToken,
    restart_now: Arc<tokio::sync::Notify>,
    output: broadcast::Sender<String>,
    task: JoinHandle<()>,
    pub log_path: PathBuf,
}

impl Instance {
    pub fn state(&self) -> InstanceState {
        self.state.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<InstanceState> {
        self.state.clone()
    }

    /// Lines of output as they are written (bounded; a slow follower skips lines and
    /// can read them from the log file).
    pub fn follow(&self) -> broadcast::Receiver<String> {
        self.output.subscribe()
    }

    /// Restarts the process now (stop, then start), outside the restart policy.
    pub fn restart(&self) {
        self.restart_now.notify_one();
    }

    /// Asks the instance to stop; the returned future ends once it has (its final state
    /// recorded). The handle stays where it is meanwhile, so the instance is still seen,
    /// stopping, rather than missing.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.cancel();
        let mut state = self.state.clone();
        // The supervision owns the sender: it is dropped when the task ends.
        async move { while state.changed().await.is_ok() {} }
    }

    /// Whether its supervision has ended (stopped, or given up).
    pub fn has_ended(&self) -> bool {
        self.state.has_changed().is_err()
    }

    /// Stops the process group (SIGTERM, grace, SIGKILL) and waits for the task.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

/// An instance nobody holds any more is stopped: no process outlives the handle that
/// tracks it (callers still `stop` and wait, so the final state is recorded in order).
impl Drop for Instance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const OUTPUT_FOLLOWERS: usize = 1024;

/// Starts supervising `plan`.
pub fn start_instance(
    plan: InstancePlan,
    provider: Arc<dyn Provider>,
    reporter: Arc<dyn Reporter>,
) -> Instance {
    let (state_tx, state_rx) = watch::channel(InstanceState::starting());
    let stop = CancellationToken::new();
    let restart_now = Arc::new(tokio::sync::Notify::new());
    let (output, _) = broadcast::channel(OUTPUT_FOLLOWERS);
    let log_path = plan.command.log_path.clone();
    let key = plan.key.clone();
    let task = tokio::spawn(
        Supervision {
            plan,
            provider,
            reporter,
            state: state_tx,
            stop: stop.clone(),
            restart_now: restart_now.clone(),
            output: output.clone(),
        }
        .run(),
    );
    Instance { key, state: state_rx, stop, restart_now, output, task, log_path }
}

struct Supervision {
    plan: InstancePlan,
    provider: Arc<dyn Provider>,
    reporter: Arc<dyn Reporter>,
    state: watch::Sender<InstanceState>,
    stop: CancellationToken,
    restart_now: Arc<tokio::sync::Notify>,
    output: broadcast::Sender<String>,
}

enum Ended {
    Exited { success: bool, description: String },
    Stopped,
    Restart { reason: String },
}

impl Supervision {
    async fn set(&self, change: impl FnOnce(&mut InstanceState)) {
        let mut next = self.state.borrow().clone();
        change(&mut next);
        let changed = *self.state.borrow() != next;
        if changed {
            self.state.send_replace(next.clone());
            self.reporter.report(&self.plan.key, &next).await;
        }
    }

    async fn run(self) {
        let initial = self.state.borrow().clone();
        self.reporter.report(&self.plan.key, &initial).await;
        if !self.wait_for_dependencies().await {
            return;
        }
        if let Some(addr) = self.plan.external_addr
            && tcp_answers(addr, Duration::from_millis(300)).await
        {
            let reason = format!("already running outside drover at {addr}; using it");
            tracing::info!(instance = %self.plan.key, "{reason}");
            self.set(|s| {
                s.status = ServiceStatus::Ready;
                s.external = true;
                s.reason = Some(reason);
            })
            .await;
            self.stop.cancelled().await;
            return;
        }
        let rules = self.plan.spec.restart;
        let mut recent: VecDeque<Instant> = VecDeque::new();
        let mut streak = 0_u32;
        loop {
            let started = Instant::now();
            let ended = match self.command_and_redactor().await {
                Ok((command, redactor)) => {
                    let instance = self.plan.key.to_string();
                    let launch = Launch {
                        instance: &instance,
                        command: &command,
                        image: self.plan.spec.image.as_deref(),
                        memory_limit_bytes: self.plan.spec.memory_limit_bytes,
                    };
                    match self.provider.spawn(&launch).await {
                        Ok(process) => self.supervise(process, &command, &redactor).await,
                        Err(err) => Ended::Exited {
                            success: false,
                            description: format!("cannot start: {err}"),
                        },
                    }
                }
                // Not started without its secrets: it would run misconfigured. The restart
                // policy decides, as for any failed start.
                Err(err) => {
                    Ended::Exited { success: false, description: format!("cannot start: {err}") }
                }
            };
            let (success, description) = match ended {
                Ended::Stopped => {
                    self.set(|s| {
                        s.status = ServiceStatus::Stopped;
                        s.pid = None;
                        s.reason = Some("stopped".to_owned());
                    })
                    .await;
                    return;
                }
                Ended::Restart { reason } => {
                    self.set(|s| {
                        s.restarts += 1;
                        s.pid = None;
                        s.status = ServiceStatus::Starting;
                        s.reason = Some(reason);
                    })
                    .await;
                    continue;
                }
                Ended::Exited { success, description } => (success, description),
            };
            if success {
                self.set(|s| s.completed = true).await;
            }
            if started.elapsed() >= rules.reset_after {
                streak = 0;
            }
            if !rules.policy.restarts_after(success) {
                let status = if success { ServiceStatus::Stopped } else { ServiceStatus::Crashed };
                self.set(|s| {
                    s.status = status;
                    s.pid = None;
                    s.reason = Some(description.clone());
                })
                .await;
                self.stop.cancelled().await;
                return;
            }
            let now = Instant::now();
            while recent.front().is_some_and(|at| now.duration_since(*at) > rules.window) {
                recent.pop_front();
            }
            if recent.len() >= rules.max_restarts as usize {
                let reason = format!(
                    "{description}; gave up after {} restarts within {}",
                    recent.len(),
                    humantime::format_duration(rules.window)
                );
                tracing::warn!(instance = %self.plan.key, %reason, "service crashed for good");
                self.set(|s| {
                    s.status = ServiceStatus::Crashed;
                    s.pid = None;
                    s.reason = Some(reason);
                })
                .await;
                self.stop.cancelled().await;
                return;
            }
            streak += 1;
            let delay = rules.delay(streak);
            self.set(|s| {
                s.status = ServiceStatus::Backoff;
                s.pid = None;
                s.reason = Some(format!(
                    "{description}; restarting in {}",
                    humantime::format_duration(delay)
                ));
            })
            .await;
            tokio::select! {
                () = self.stop.cancelled() => {
                    self.set(|s| {
                        s.status = ServiceStatus::Stopped;
                        s.reason = Some("stopped".to_owned());
                    })
                    .await;
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
            recent.push_back(Instant::now());
            self.set(|s| {
                s.restarts += 1;
                s.status = ServiceStatus::Starting;
            })
            .await;
        }
    }

    /// The command of this start and what to redact from its output: the plan's command
    /// with the project's secrets, read once, now; the plan's as it is without secrets.
    async fn command_and_redactor(
        &self,
    ) -> Result<(CommandSpec, Redactor), crate::SecretsUnavailable> {
        let Some(secrets) = &self.plan.secrets else {
            return Ok((self.plan.command.clone(), Redactor::default()));
        };
        let values = secrets.fetch().await?;
        if values.is_empty() {
            return Ok((self.plan.command.clone(), Redactor::default()));
        }
        Ok((with_secrets(&self.plan.command, &values), Redactor::new(&values)))
    }

    /// Waits until every dependency is satisfied. A dependency that failed for good does
    /// not block forever: the instance starts without it, with a warning.
    async fn wait_for_dependencies(&self) -> bool {
        for (key, watch, condition) in &self.plan.dependencies {
            let mut watch = watch.clone();
            loop {
                let current = watch.borrow_and_update().clone();
                if current.satisfies(*condition) {
                    break;
                }
                if current.is_final_failure() {
                    let reason = format!(
                        "{key} is {} ({}); starting without it",
                        current.status,
                        current.reason.as_deref().unwrap_or("no reason")
                    );
                    tracing::warn!(instance = %self.plan.key, "{reason}");
                    self.set(|s| s.reason = Some(reason)).await;
                    break;
                }
                tokio::select! {
                    () = self.stop.cancelled() => {
                        self.set(|s| s.status = ServiceStatus::Stopped).await;
                        return false;
                    }
                    changed = watch.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        true
    }

    /// Runs one process (started from `command`) until it exits, is stopped, or must
    /// restart; `redactor` cleans its output.
    async fn supervise(
        &self,
        mut process: Box<dyn SpawnedProcess>,
        command: &CommandSpec,
        redactor: &Redactor,
    ) -> Ended {
        let pid = process.pid();
        self.set(|s| {
            s.pid = pid;
            s.status = ServiceStatus::Starting;
        })
        .await;
        let (log_lines_tx, log_lines) = watch::channel(String::new());
        let copier = process.take_output().map(|(out, err)| {
            tokio::spawn(copy_output(
                out,
                err,
                self.plan.command.log_path.clone(),
                self.plan.spec.log_max_bytes,
                self.plan.spec.log_keep,
                redactor.clone(),
                self.output.clone(),
                log_lines_tx,
            ))
        });
        let probe = self.plan.spec.readiness.clone();
        let probing = async {
            match probe {
                None => {
                    self.set(|s| s.status = ServiceStatus::Ready).await;
                    std::future::pending::<()>().await;
                }
                Some(readiness) => self.probe(&readiness, log_lines, command, redactor).await,
            }
        };
        let watched_limit = self.plan.spec.memory_limit_bytes.filter(|_| !process.limits_memory());
        let memory = async {
            match watched_limit.zip(pid) {
                Some((limit, pid)) => watch_memory(pid, limit).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            exit = process.wait() => Ended::Exited { success: exit.success, description: exit.description },
            () = self.stop.cancelled() => Ended::Stopped,
            () = self.restart_now.notified() => Ended::Restart { reason: "restarted on request".to_owned() },
            reason = memory => Ended::Restart { reason },
            () = probing => unreachable_end(),
        };
        if !matches!(ended, Ended::Exited { .. }) {
            process.terminate(self.plan.spec.stop_grace).await;
        }
        // Whatever the leader did, nothing of its group outlives this run.
        process.kill_group();
        if let Some(copier) = copier {
            let _ = tokio::time::timeout(Duration::from_secs(2), copier).await;
        }
        match ended {
            Ended::Restart { reason } if reason.starts_with("memory") => {
                tracing::warn!(instance = %self.plan.key, %reason, "restarting over its memory limit");
                Ended::Exited { success: false, description: reason }
            }
            other => other,
        }
    }

    /// Probes until ready, then keeps watching (ready ⇄ unhealthy). An exec probe runs
    /// with the environment of `command`, its log redacted by `redactor`.
    async fn probe(
        &self,
        readiness: &Readiness,
        mut log_lines: watch::Receiver<String>,
        command: &CommandSpec,
        redactor: &Redactor,
    ) {
        let started = Instant::now();
        let mut successes = 0;
        let pattern = match &readiness.kind {
            ProbeKind::LogLine { pattern } => regex::Regex::new(pattern).ok(),
            _ => None,
        };
        let mut seen_match = false;
        loop {
            let ok = match &readiness.kind {
                ProbeKind::Http { path } => match self.plan.probe_addr {
                    Some(addr) => {
                        http_ok(addr, path, readiness.interval.max(Duration::from_millis(500)))
                            .await
                    }
                    None => false,
                },
                ProbeKind::Tcp => match self.plan.probe_addr {
                    Some(addr) => {
                        tcp_answers(addr, readiness.interval.max(Duration::from_millis(200))).await
                    }
                    None => false,
                },
                ProbeKind::Exec { command: probe } => exec_ok(probe, command, redactor).await,
                ProbeKind::LogLine { .. } => {
                    if !seen_match {
                        let line = log_lines.borrow_and_update().clone();
                        seen_match = pattern.as_ref().is_some_and(|p| p.is_match(&line));
                    }
                    seen_match
                }
            };
            successes = if ok { successes + 1 } else { 0 };
            let current = { self.state.borrow().status };
            if successes >= readiness.threshold && current != ServiceStatus::Ready {
                self.set(|s| s.status = ServiceStatus::Ready).await;
            } else if !ok && current == ServiceStatus::Ready {
                self.set(|s| {
                    s.status = ServiceStatus::Unhealthy;
                    s.reason = Some("readiness probe failing".to_owned());
                })
                .await;
            } else if !ok
                && current == ServiceStatus::Starting
                && started.elapsed() > readiness.timeout
            {
                self.set(|s| {
                    s.status = ServiceStatus::Unhealthy;
                    s.reason = Some(format!(
                        "not ready after {}",
                        humantime::format_duration(readiness.timeout)
                    ));
                })
                .await;
            }
            if matches!(readiness.kind, ProbeKind::LogLine { .. }) && !seen_match {
                let _ = tokio::time::timeout(readiness.interval, log_lines.changed()).await;
            } else {
                tokio::time::sleep(readiness.interval).await;
            }
        }
    }
}

fn unreachable_end() -> Ended {
    Ended::Stopped
}

async fn tcp_answers(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// A minimal HTTP/1.1 GET: 2xx within the timeout.
async fn http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).await.ok()?;
        let code: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..300).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

async fn exec_ok(command: &[String], service: &CommandSpec, redactor: &Redactor) -> bool {
    let Some((program, args)) = command.split_first() else { return false };
    let spec = CommandSpec {
        program: program.clone(),
        args: args.to_vec(),
        cwd: service.cwd.clone(),
        env: service.env.clone(),
        log_path: service.log_path.with_extension("probe.log"),
    };
    let _ = tokio::fs::remove_file(&spec.log_path).await;
    let ran = run_command_redacting(
        &spec,
        redactor,
        &CancellationToken::new(),
        Some(Duration::from_secs(10)),
    )
    .await;
    matches!(ran, Ok(output) if output.success())
}

/// Resolves with a reason once the group's resident memory stays above `limit`.
async fn watch_memory(pid: u32, limit: u64) -> String {
    let mut over = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = crate::resources::group_rss_bytes(pid);
        over = if rss > limit { over + 1 } else { 0 };
        // Two readings in a row, so a brief spike does not kill it.
        if over >= 2 {
            return format!(
                "memory limit exceeded: {} MiB resident > {} MiB allowed",
                rss >> 20,
                limit >> 20
            );
        }
    }
}

/// Copies stdout and stderr line by line into the rotating log file, to followers, and to
/// the log-line readiness probe, every secret `redactor` knows replaced first. Lines are
/// whole when redacted (the readers split on newlines), so a value split across two reads
/// of a pipe is still caught; a multi-line value is caught line by line.
#[expect(clippy::too_many_arguments, reason = "one call site")]
async fn copy_output(
    stdout: Box<dyn AsyncRead + Send + Unpin>,
    stderr: Box<dyn AsyncRead + Send + Unpin>,
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    redactor: Redactor,
    followers: broadcast::Sender<String>,
    probe: watch::Sender<String>,
) {
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(256);
    for stream in [stdout, stderr] {
        let lines_tx = lines_tx.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if lines_tx.send(line).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(lines_tx);
    let mut log = RotatingLog::open(path, max_bytes, keep).await;
    while let Some(line) = lines.recv().await {
        let line = redact_line(&redactor, line);
        log.write_line(&line).await;
        let _ = followers.send(line.clone());
        probe.send_replace(line);
    }
    // The last write may still be under way on a blocking thread: the log is complete
    // when this returns.
    log.flush().await;
}

/// `line` with every secret value replaced; as it is (no copy) when there is nothing to
/// redact or nothing found.
fn redact_line(redactor: &Redactor, line: String) -> String {
    if redactor.is_empty() {
        return line;
    }
    match redactor.redact(&line) {
        std::borrow::Cow::Borrowed(_) => line,
        std::borrow::Cow::Owned(redacted) => redacted,
    }
}

/// A log file that is renamed to `.1` (shifting older ones up to `.keep`) when it grows
/// past `max_bytes`.
pub(crate) struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<tokio::fs::File>,
    size: u64,
}

impl RotatingLog {
    pub(crate) async fn open(path: PathBuf, max_bytes: u64, keep: u32) -> Self {
        if let Some(parent) = path.parent() {
            let _ = tokio::fs::create_dir_all(parent).await;
        }
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await.ok();
        let size = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
        Self { path, max_bytes, keep, file, size }
    }

    pub(crate) async fn write_line(&mut self, line: &str) {
        if self.size + line.len() as u64 + 1 > self.max_bytes {
            self.rotate().await;
        }
        if let Some(file) = &mut self.file
            && file.write_all(line.as_bytes()).await.is_ok()
            && file.write_all(b"\n").await.is_ok()
        {
            self.size += line.len() as u64 + 1;
        }
    }

    /// Waits for the writes under way to reach the file.
    pub(crate) async fn flush(&mut self) {
        if let Some(file) = &mut self.file {
            let _ = file.flush().await;
        }
    }

    async fn rotate(&mut self) {
        self.file = None;
        for n in (1..self.keep).rev() {
            let _ = tokio::fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1)).await;
        }
        if self.keep > 0 {
            let _ = tokio::fs::rename(&self.path, numbered(&self.path, 1)).await;
        } else {
            let _ = tokio::fs::remove_file(&self.path).await;
        }
        self.file =
            tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.ok();
        self.size = 0;
    }
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn logs_rotate_past_their_size_keeping_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut log = RotatingLog::open(path.clone(), 100, 2).await;
        for n in 0..30 {
            log.write_line(&format!("line {n:03} ........")).await;
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists(), "only `keep` old files");
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.contains("line 029"), "{newest}");
    }

    fn reader(text: &'static [u8]) -> Box<dyn AsyncRead + Send + Unpin> {
        Box::new(std::io::Cursor::new(text))
    }

    #[tokio::test]
    async fn secrets_are_redacted_before_the_log_followers_and_the_probe_see_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut values = drover_domain::SecretValues::default();
        values.insert("MY_TOKEN", "tok-12345678");
        let (followers, mut following) = broadcast::channel(16);
        let (probe, probed) = watch::channel(String::new());
        copy_output(
            reader(b"token=tok-12345678\nplain line\n"),
            reader(b"on stderr: tok-12345678 and tok-1234"),
            path.clone(),
            1 << 20,
            1,
            Redactor::new(&values),
            followers,
            probe,
        )
        .await;
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.contains("token=[redacted:MY_TOKEN]\n"), "{log}");
        assert!(log.contains("plain line\n"), "{log}");
        assert!(log.contains("on stderr: [redacted:MY_TOKEN] and tok-1234\n"), "{log}");
        assert!(!log.contains("tok-12345678"), "{log}");
        let mut followed = Vec::new();
        while let Ok(line) = following.try_recv() {
            followed.push(line);
        }
        assert_eq!(followed.len(), 3, "{followed:?}");
        assert!(followed.contains(&"token=[redacted:MY_TOKEN]".to_owned()), "{followed:?}");
        assert!(followed.iter().all(|line| !line.contains("tok-12345678")), "{followed:?}");
        assert!(!probed.borrow().contains("tok-12345678"));
    }

    #[tokio::test]
    async fn without_secrets_lines_are_copied_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let (followers, mut following) = broadcast::channel(16);
        let (probe, _probed) = watch::channel(String::new());
        copy_output(
            reader(b"token=tok-12345678\n"),
            reader(b""),
            path.clone(),
            1 << 20,
            1,
            Redactor::default(),
            followers,
            probe,
        )
        .await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "token=tok-12345678\n");
        assert_eq!(following.try_recv().unwrap(), "token=tok-12345678");
    }
}
