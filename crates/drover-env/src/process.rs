//! Child processes in their own process group.
//!
//! Agents run arbitrary programs that may start programs of their own (a test runner, a
//! dev server). Each child is made the leader of a new process group, so stopping it means
//! signalling the whole group: `SIGTERM`, a grace period, then `SIGKILL`. Each child also
//! asks the kernel for `SIGKILL` should drover die first (`PR_SET_PDEATHSIG`), so a
//! `kill -9` of drover leaves no app holding a port.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use drover_domain::{Redactor, StreamRedactor};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How much of a command's output is kept in memory for error reports; the full output
/// is in its log file.
const OUTPUT_TAIL_BYTES: usize = 16 * 1024;
/// How long a cancelled or timed-out command gets between `SIGTERM` and `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start `{program}`: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("cannot write log {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("waiting for `{program}` failed: {source}")]
    Wait { program: String, source: io::Error },
    #[error("cancelled")]
    Cancelled,
    /// The provider (e.g. the Docker engine) could not start it.
    #[error("{0}")]
    Provider(String),
    #[error("`{program}` did not finish within {timeout:?}")]
    TimedOut { program: String, timeout: Duration },
}

/// A program to run: what, where, with which environment, and where its output goes.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub log_path: PathBuf,
}

impl CommandSpec {
    /// The command line as a user would type it, for logs and error messages.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .current_dir(&self.cwd)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        command
    }
}

#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before `exec`. It calls only prctl(2),
    // which is async-signal-safe, allocates nothing and touches no lock.
    unsafe {
        command
            .pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from));
    }
}

/// Makes the child write `0` (itself) into an open `cgroup.procs` before `exec`, so the
/// program and everything it ever starts live in that cgroup from the first instruction.
#[allow(unsafe_code)]
fn join_cgroup_before_exec(command: &mut Command, procs: RawFd) {
    // SAFETY: the closure runs in the forked child before `exec`. It calls only write(2),
    // which is async-signal-safe, allocates nothing and touches no lock. `procs` is open:
    // the parent holds the file until `spawn` has returned, and it is close-on-exec.
    unsafe {
        command.pre_exec(move || {
            let procs = BorrowedFd::borrow_raw(procs);
            nix::unistd::write(procs, b"0").map(drop).map_err(io::Error::from)
        });
    }
}

/// A running child that leads its own process group.
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    pgid: Pid,
    program: String,
    exited: bool,
}

impl GroupChild {
    /// Starts `spec` with the given output handles.
    pub fn spawn(spec: &CommandSpec, stdout: Stdio, stderr: Stdio) -> Result<Self, ProcessError> {
        Self::spawn_in(spec, stdout, stderr, None)
    }

    /// Starts `spec` inside the cgroup whose `cgroup.procs` is open as `cgroup_procs`.
    pub fn spawn_in(
        spec: &CommandSpec,
        stdout: Stdio,
        stderr: Stdio,
        cgroup_procs: Option<&std::fs::File>,
    ) -> Result<Self, ProcessError> {
        let mut command = spec.command();
        if let Some(procs) = cgroup_procs {
            join_cgroup_before_exec(&mut command, procs.as_raw_fd());
        }
        let child = command
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| ProcessError::Spawn { program: spec.program.clone(), source })?;
        let pid = child.id().ok_or_else(|| ProcessError::Spawn {
            program: spec.program.clone(),
            source: io::Error::other("child exited before its pid was read"),
        })?;
        let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        Ok(Self { child, pgid, program: spec.program.clone(), exited: false })
    }

    pub fn pid(&self) -> u32 {
        self.pgid.as_raw().unsigned_abs()
    }

    /// Waits for the group leader to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|source| ProcessError::Wait { program: self.program.clone(), source })?;
        self.exited = true;
        Ok(status)
    }

    /// Its piped stdout and stderr, once.
    pub fn take_output(
        &mut self,
    ) -> Option<(tokio::process::ChildStdout, tokio::process::ChildStderr)> {
        Some((self.child.stdout.take()?, self.child.stderr.take()?))
    }

    /// The leader's exit status if it has exited, without waiting.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = true;
                Some(status)
            }
            _ => None,
        }
    }

    /// Sends `signal` to every process in the group. A group that is already gone is fine.
    pub fn signal_group(&self, signal: Signal) {
        if let Err(err) = killpg(self.pgid, signal)
            && err != nix::errno::Errno::ESRCH
        {
            tracing::warn!(pgid = self.pgid.as_raw(), %signal, error = %err, "signalling process group failed");
        }
    }

    /// Stops the whole group: `SIGTERM`, up to `grace` to exit, then `SIGKILL`.
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if !self.exited {
            self.signal_group(Signal::SIGTERM);
            if let Ok(status) = tokio::time::timeout(grace, self.wait()).await {
                // Members of the group may outlive the leader; they go too.
                self.signal_group(Signal::SIGKILL);
                return status;
            }
        }
        self.signal_group(Signal::SIGKILL);
        self.wait().await
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // Whatever happened, nothing of this group outlives its handle.
        self.signal_group(Signal::SIGKILL);
    }
}

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    /// The last bytes of stdout and stderr, interleaved as they arrived.
    pub output_tail: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs `spec` to completion, appending its stdout and stderr to its log file. Stops the
/// whole process group on `cancel` or after `timeout`.
pub async fn run_command(
    spec: &CommandSpec,
    cancel: &CancellationToken,
    timeout: Option<Duration>,
) -> Result<CommandOutput, ProcessError> {
    run_command_redacting(spec, &Redactor::default(), cancel, timeout).await
}

/// [`run_command`] for a command that may see secrets: every value `redact` knows is
/// replaced in the log and in the returned output tail, line by line, before it is
/// written (a value split across two reads of a pipe is still caught).
pub async fn run_command_redacting(
    spec: &CommandSpec,
    redact: &Redactor,
    cancel: &CancellationToken,
    timeout: Option<Duration>,
) -> Result<CommandOutput, ProcessError> {
    let log_error = |source| ProcessError::Log { path: spec.log_path.clone(), source };
    let mut log = open_log(&spec.log_path).await.map_err(log_error)?;
    let header = format!("$ {}\n", spec.display());
    log.write_all(redact.redact(&header).as_bytes()).await.map_err(log_error)?;
    let log = Arc::new(Mutex::new(log));
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));

    let mut child = GroupChild::spawn(spec, Stdio::piped(), Stdio::piped())?;
    let stdout = child.child.stdout.take();
    let stderr = child.child.stderr.take();
    let readers = [
        stdout
            .map(|out| tokio::spawn(copy_output(out, log.clone(), tail.clone(), redact.stream()))),
        stderr
            .map(|err| tokio::spawn(copy_output(err, log.clone(), tail.clone(), redact.stream()))),
    ];

    let deadline = async {
        match timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        status = child.wait() => status,
        () = cancel.cancelled() => Err(ProcessError::Cancelled),
        () = deadline => Err(ProcessError::TimedOut {
            program: spec.program.clone(),
            timeout: timeout.unwrap_or_default(),
        }),
    };
    let status = match outcome {
        Ok(status) => status,
        Err(err) => {
            let _ = child.terminate(STOP_GRACE).await;
            let _ = log.lock().await.write_all(format!("[drover] {err}\n").as_bytes()).await;
            return Err(err);
        }
    };
    // Anything the command left running in its group goes now, which also closes pipes.
    child.signal_group(Signal::SIGKILL);
    for reader in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    }
    let mut log = log.lock().await;
    log.write_all(format!("[drover] exited with {status}\n").as_bytes())
        .await
        .map_err(log_error)?;
    log.flush().await.map_err(log_error)?;
    let tail = tail.lock().await;
    Ok(CommandOutput { status, output_tail: String::from_utf8_lossy(&tail).into_owned() })
}

/// Starts `spec` and leaves it running (an app under test), its stdout and stderr
/// appended to its log file. With values to redact, the output is piped through `redact`
/// line by line on its way to the log; otherwise the child writes to the file itself.
pub async fn spawn_logged(
    spec: &CommandSpec,
    redact: &Redactor,
) -> Result<GroupChild, ProcessError> {
    let log_error = |source| ProcessError::Log { path: spec.log_path.clone(), source };
    let log = open_log(&spec.log_path).await.map_err(log_error)?;
    if redact.is_empty() {
        let log = log.into_std().await;
        let log_err = log.try_clone().map_err(log_error)?;
        return GroupChild::spawn(spec, Stdio::from(log), Stdio::from(log_err));
    }
    let mut child = GroupChild::spawn(spec, Stdio::piped(), Stdio::piped())?;
    let log = Arc::new(Mutex::new(log));
    // Only the log matters here; the tail is bounded and dropped with the copiers, which
    // end when the group is stopped and its pipes close.
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    if let Some(out) = child.child.stdout.take() {
        tokio::spawn(copy_output(out, log.clone(), tail.clone(), redact.stream()));
    }
    if let Some(err) = child.child.stderr.take() {
        tokio::spawn(copy_output(err, log, tail, redact.stream()));
    }
    Ok(child)
}

async fn open_log(path: &std::path::Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    OpenOptions::new().create(true).append(true).open(path).await
}

async fn copy_output(
    mut from: impl AsyncRead + Unpin,
    log: Arc<Mutex<File>>,
    tail: Arc<Mutex<Vec<u8>>>,
    mut redact: StreamRedactor,
) {
    let mut buffer = vec![0_u8; 8192];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        keep_output(&redact.push(&buffer[..read]), &log, &tail).await;
    }
    keep_output(&redact.finish(), &log, &tail).await;
}

/// Appends output (already redacted) to the log and to the in-memory tail.
async fn keep_output(chunk: &[u8], log: &Mutex<File>, tail: &Mutex<Vec<u8>>) {
    if chunk.is_empty() {
        return;
    }
    if let Err(err) = log.lock().await.write_all(chunk).await {
        tracing::warn!(error = %err, "writing command output to its log failed");
    }
    let mut tail = tail.lock().await;
    tail.extend_from_slice(chunk);
    if tail.len() > OUTPUT_TAIL_BYTES {
        let excess = tail.len() - OUTPUT_TAIL_BYTES;
        tail.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &tempfile::TempDir, script: &str) -> CommandSpec {
        CommandSpec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: dir.path().to_path_buf(),
            env: vec![("GREETING".into(), "hello".into())],
            log_path: dir.path().join("logs/cmd.log"),
        }
    }

    /// Alive and not a zombie (an orphan's zombie waits for init to reap it).
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim_start().to_owned()))
            .is_some_and(|rest| !rest.starts_with('Z'))
    }

    #[tokio::test]
    async fn output_goes_to_the_log_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(&dir, "echo $GREETING; echo oops >&2; exit 3");
        let output = run_command(&spec, &CancellationToken::new(), None).await.unwrap();
        assert_eq!(output.status.code(), Some(3));
        assert!(output.output_tail.contains("hello"));
        assert!(output.output_tail.contains("oops"));
        let log = std::fs::read_to_string(&spec.log_path).unwrap();
        assert!(log.starts_with("$ sh -c"), "{log}");
        assert!(log.contains("hello") && log.contains("exited with"), "{log}");
    }

    #[tokio::test]
    async fn secret_values_are_redacted_from_the_log_and_the_tail_even_split_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut secrets = drover_domain::SecretValues::default();
        secrets.insert("MY_TOKEN", "tok-0123456789");
        let redact = Redactor::new(&secrets);
        // The value leaves the child in two writes, the second after a pause.
        let mut spec = spec(
            &dir,
            r#"printf "token=$HEAD"; sleep 0.2; printf "$REST\n"; echo "$HEAD$REST" >&2"#,
        );
        spec.env = vec![("HEAD".into(), "tok-01234".into()), ("REST".into(), "56789".into())];
        let output =
            run_command_redacting(&spec, &redact, &CancellationToken::new(), None).await.unwrap();
        assert!(output.success());
        let log = std::fs::read_to_string(&spec.log_path).unwrap();
        for text in [&log, &output.output_tail] {
            assert!(!text.contains("tok-0123"), "{text}");
            assert!(text.contains("token=[redacted:MY_TOKEN]"), "{text}");
            assert!(text.lines().any(|line| line == "[redacted:MY_TOKEN]"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_child_left_running_has_its_output_redacted_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(&dir, r#"echo "serving with $TOKEN"; exec sleep 60"#);
        spec.env = vec![("TOKEN".into(), "tok-0123456789".into())];
        let mut secrets = drover_domain::SecretValues::default();
        secrets.insert("MY_TOKEN", "tok-0123456789");
        let mut child = spawn_logged(&spec, &Redactor::new(&secrets)).await.unwrap();
        let mut log = String::new();
        for _ in 0..100 {
            log = std::fs::read_to_string(&spec.log_path).unwrap_or_default();
            if log.contains("serving") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.terminate(Duration::from_secs(1)).await.unwrap();
        assert!(log.contains("serving with [redacted:MY_TOKEN]"), "{log}");
    }

    #[tokio::test]
    async fn cancelling_kills_the_whole_group_including_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let spec = spec(&dir, &script);
        let cancel = CancellationToken::new();
        let task = {
            let cancel = cancel.clone();
            tokio::spawn(async move { run_command(&spec, &cancel, None).await })
        };
        let grandchild = loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file)
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(alive(grandchild));
        cancel.cancel();
        let result = task.await.unwrap();
        assert!(matches!(result, Err(ProcessError::Cancelled)));
        // Reaped by init once killed; give it a moment.
        for _ in 0..50 {
            if !alive(grandchild) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("grandchild {grandchild} survived cancellation");
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(&dir, "sleep 600");
        let started = std::time::Instant::now();
        let result =
            run_command(&spec, &CancellationToken::new(), Some(Duration::from_millis(200))).await;
        assert!(matches!(result, Err(ProcessError::TimedOut { .. })));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(&dir, "");
        spec.program = "definitely-not-a-program-xyz".into();
        let err = run_command(&spec, &CancellationToken::new(), None).await.unwrap_err();
        assert!(err.to_string().contains("definitely-not-a-program-xyz"), "{err}");
    }
}
