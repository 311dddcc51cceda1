//! Test support shared by the crates' integration tests: where the real PostgreSQL, Redis
//! and NATS are, private broker instances a test may restart at will, and the skip rule.
//!
//! The rule: a backend test runs against the service named by its environment variable
//! (`DROVER_TEST_REDIS_URL`, ...), or the service's default local address if something
//! listens there. Otherwise it prints `drover-test: SKIP <why>` and passes — unless
//! `DROVER_TEST_REQUIRE_BACKENDS=1` (set by CI), where a missing service fails the test.
//!
//! Also the one thing that cannot be reached from here, played locally: a model vendor's
//! streaming API ([`model::ModelDouble`]).

pub mod model;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Whether missing backends must fail tests instead of skipping them.
pub fn backends_required() -> bool {
    std::env::var("DROVER_TEST_REQUIRE_BACKENDS").is_ok_and(|v| v == "1")
}

/// Skips (returns `None`, printing why) or, when backends are required, panics.
pub fn skip<T>(reason: &str) -> Option<T> {
    if backends_required() {
        panic!("{reason}, but DROVER_TEST_REQUIRE_BACKENDS=1");
    }
    eprintln!("drover-test: SKIP {reason}");
    None
}

fn listening(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
}

fn service_url(var: &str, default_addr: &str, default_url: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if listening(default_addr) => Some(default_url.to_owned()),
        _ => skip(&format!("{what}: no server at {default_addr} and {var} is not set")),
    }
}

/// The Redis the tests use, if any.
pub fn redis_url() -> Option<String> {
    service_url("DROVER_TEST_REDIS_URL", "127.0.0.1:6379", "redis://127.0.0.1:6379", "Redis tests")
}

/// The NATS (with JetStream) the tests use, if any.
pub fn nats_url() -> Option<String> {
    service_url("DROVER_TEST_NATS_URL", "127.0.0.1:4222", "nats://127.0.0.1:4222", "NATS tests")
}

/// The PostgreSQL the tests use, if any.
pub fn postgres_url() -> Option<String> {
    service_url(
        "DROVER_TEST_POSTGRES_URL",
        "127.0.0.1:5432",
        "postgres://postgres@127.0.0.1:5432/postgres",
        "PostgreSQL tests",
    )
}

/// A name no other test (in this or another process) uses: for broker namespaces,
/// databases and the like. Lowercase letters and digits only.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{}x{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A range of `width` ports (at most 200) for a test's environments: below the kernel's
/// ephemeral range (so outgoing connections never squat in it), outside drover's default
/// range, and different for every call in this process, so tests running at once never
/// race for the same block.
pub fn port_range(width: u16) -> (u16, u16) {
    static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
    const SLOTS: u32 = 50;
    let width = width.clamp(1, 200);
    let slot =
        (std::process::id().wrapping_mul(7) + NEXT_SLOT.fetch_add(1, Ordering::Relaxed)) % SLOTS;
    // Slots are 200 wide from 10000: the highest range ends below 20000.
    let start = 10_000 + u16::try_from(slot).unwrap_or(0) * 200;
    (start, start + width - 1)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

fn find_program(name: &str, extra: &[&str]) -> Option<String> {
    let from_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
    });
    from_path
        .or_else(|| extra.iter().map(Path::new).find(|p| p.is_file()).map(Path::to_path_buf))
        .map(|path| path.display().to_string())
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(&format!("127.0.0.1:{port}")) {
        assert!(Instant::now() < deadline, "{what} on port {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis server of the test's own (no persistence), which the test may restart.
pub struct PrivateRedis {
    program: String,
    port: u16,
    child: Child,
}

impl PrivateRedis {
    pub fn start() -> Option<Self> {
        let Some(program) = find_program("redis-server", &["/usr/bin/redis-server"]) else {
            return skip("Redis chaos tests: redis-server is not installed");
        };
        let port = free_port();
        let child = Self::spawn(&program, port);
        Some(Self { program, port, child })
    }

    fn spawn(program: &str, port: u16) -> Child {
        let child = Command::new(program)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        wait_listening(port, "redis-server");
        child
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (everything in memory is lost) and starts an empty one on the
    /// same port.
    pub fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.program, self.port);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A NATS server with JetStream of the test's own, storing in a temporary directory.
pub struct PrivateNats {
    program: String,
    port: u16,
    store: tempfile::TempDir,
    child: Child,
}

impl PrivateNats {
    pub fn start() -> Option<Self> {
        let Some(program) =
            find_program("nats-server", &["/usr/sbin/nats-server", "/usr/bin/nats-server"])
        else {
            return skip("NATS chaos tests: nats-server is not installed");
        };
        let port = free_port();
        let store = tempfile::tempdir().expect("temp dir");
        let child = Self::spawn(&program, port, store.path());
        Some(Self { program, port, store, child })
    }

    fn spawn(program: &str, port: u16, store: &Path) -> Child {
        let child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        wait_listening(port, "nats-server");
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server and wipes its storage, then starts an empty one on the same port.
    pub fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for entry in std::fs::read_dir(self.store.path()).into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
        self.child = Self::spawn(&self.program, self.port, self.store.path());
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database of its own on the test PostgreSQL (made with `psql`), dropped when this is.
pub struct PrivateDatabase {
    admin_url: String,
    name: String,
}

impl PrivateDatabase {
    /// A fresh database, or `None` (after the skip rule) without a PostgreSQL or `psql`.
    pub fn create() -> Option<Self> {
        let admin_url = postgres_url()?;
        let name = unique_name("drover_test_");
        let created = Command::new("psql")
            .args([admin_url.as_str(), "-qAtc", &format!("CREATE DATABASE {name}")])
            .stdout(Stdio::null())
            .status();
        match created {
            Ok(status) if status.success() => Some(Self { admin_url, name }),
            Ok(status) => skip(&format!("psql could not create a database ({status})")),
            Err(err) => skip(&format!("psql is not available: {err}")),
        }
    }

    /// Its URL: the admin URL with this database's name.
    pub fn url(&self) -> String {
        let base = self.admin_url.rsplit_once('/').map_or(self.admin_url.as_str(), |(b, _)| b);
        format!("{base}/{}", self.name)
    }
}

impl Drop for PrivateDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                self.admin_url.as_str(),
                "-qAtc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
