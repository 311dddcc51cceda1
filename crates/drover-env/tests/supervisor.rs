//! The supervisor with real processes: restarts and their pacing, graceful group stops,
//! readiness probes, dependencies, memory limits, using a service already running, and
//! project secrets (read at every start, redacted from the output).

mod common;
use common::wait_for;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::{
    DependencyCondition, EnvironmentId, ProbeKind, ProjectId, Readiness, RestartPolicy,
    RestartRules, SecretValues, ServiceName, ServiceSpec, ServiceStatus, Sharing,
};
use drover_env::cgroup::MemoryCgroups;
use drover_env::provider::LocalProvider;
use drover_env::supervisor::{InstanceKey, InstancePlan, InstanceState, Reporter, start_instance};
use drover_env::{
    CommandSpec, InstanceSecrets, SecretSource, SecretsUnavailable, free_port, resources,
};

#[derive(Default)]
struct Recorder {
    states: Mutex<Vec<(Instant, InstanceKey, InstanceState)>>,
}

#[async_trait]
impl Reporter for Recorder {
    async fn report(&self, key: &InstanceKey, state: &InstanceState) {
        self.states.lock().unwrap().push((Instant::now(), key.clone(), state.clone()));
    }
}

impl Recorder {
    fn of(&self, service: &str) -> Vec<(Instant, InstanceState)> {
        self.states
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, key, _)| key.service.as_str() == service)
            .map(|(at, _, state)| (*at, state.clone()))
            .collect()
    }
}

fn spec(name: &str, script: &str) -> ServiceSpec {
    ServiceSpec {
        name: ServiceName::parse(name).unwrap(),
        image: None,
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::new(),
        ports: vec!["http".into()],
        readiness: None,
        depends_on: BTreeMap::new(),
        restart: RestartRules::default(),
        stop_grace: Duration::from_secs(2),
        memory_limit_bytes: None,
        sharing: Sharing::PerEnv,
        address: None,
        log_max_bytes: 1 << 20,
        log_keep: 2,
    }
}

fn plan(dir: &tempfile::TempDir, spec: ServiceSpec, port: Option<u16>) -> InstancePlan {
    let command = CommandSpec {
        program: spec.command.clone(),
        args: spec.args.clone(),
        cwd: dir.path().to_path_buf(),
        env: port.map(|p| vec![("PORT".to_owned(), p.to_string())]).unwrap_or_default(),
        log_path: dir.path().join(format!("{}.log", spec.name)),
    };
    InstancePlan {
        key: InstanceKey { environment: Some(EnvironmentId::new()), service: spec.name.clone() },
        probe_addr: port.map(|p| ([127, 0, 0, 1], p).into()),
        spec,
        command,
        dependencies: Vec::new(),
        external_addr: None,
        secrets: None,
    }
}

fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
                let fields: Vec<String> =
                    stat.rsplit_once(')')?.1.split_whitespace().map(str::to_owned).collect();
                Some(fields.get(2)?.parse::<u32>().ok()? == pgid && fields.first()? != "Z")
            }) == Some(true)
        })
        .collect()
}

#[tokio::test]
async fn a_crashing_service_restarts_with_growing_delays_and_gives_up_after_the_max() {
    let dir = tempfile::tempdir().unwrap();
    let mut crashing = spec("crashy", "echo boom; exit 3");
    crashing.restart = RestartRules {
        policy: RestartPolicy::OnFailure,
        backoff: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        reset_after: Duration::from_secs(60),
        max_restarts: 3,
        window: Duration::from_secs(60),
    };
    let recorder = Arc::new(Recorder::default());
    let instance = start_instance(
        plan(&dir, crashing, None),
        Arc::new(LocalProvider::default()),
        recorder.clone(),
    );
    let last = wait_for(&instance, "giving up", |s| s.status == ServiceStatus::Crashed).await;
    assert_eq!(last.restarts, 3);
    assert!(last.reason.as_deref().unwrap().contains("gave up after 3 restarts"), "{last:?}");
    assert!(last.reason.as_deref().unwrap().contains("exited with code 3"), "{last:?}");

    // The delays between crash and restart grow: 100ms, 200ms, 400ms.
    let states = recorder.of("crashy");
    let backoffs: Vec<String> = states
        .iter()
        .filter(|(_, s)| s.status == ServiceStatus::Backoff)
        .map(|(_, s)| s.reason.clone().unwrap())
        .collect();
    assert_eq!(backoffs.len(), 3, "{backoffs:?}");
    assert!(backoffs[0].ends_with("restarting in 100ms"), "{backoffs:?}");
    assert!(backoffs[1].ends_with("restarting in 200ms"), "{backoffs:?}");
    assert!(backoffs[2].ends_with("restarting in 400ms"), "{backoffs:?}");
    let log = std::fs::read_to_string(dir.path().join("crashy.log")).unwrap();
    assert_eq!(log.matches("boom").count(), 4, "one run and three restarts: {log}");
    instance.stop().await;
}

#[tokio::test]
async fn stopping_leaves_no_process_of_the_group_alive() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let service = spec("sleepers", "sleep 600 & sleep 600 & trap '' TERM; wait");
    let instance = start_instance(
        plan(&dir, service, None),
        Arc::new(LocalProvider::default()),
        recorder.clone(),
    );
    let ready =
        wait_for(&instance, "ready", |s| s.status == ServiceStatus::Ready && s.pid.is_some()).await;
    let pgid = ready.pid.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while group_members(pgid).len() < 3 {
        assert!(Instant::now() < deadline, "the children did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = Instant::now();
    instance.stop().await;
    // The leader ignores SIGTERM: the grace period passes, then SIGKILL takes the group.
    assert!(stopping.elapsed() < Duration::from_secs(6));
    assert_eq!(group_members(pgid), Vec::<u32>::new(), "processes of group {pgid} survived");
    let last = recorder.of("sleepers").last().unwrap().1.clone();
    assert_eq!((last.status, last.pid), (ServiceStatus::Stopped, None));
}

#[tokio::test]
async fn http_readiness_waits_for_the_server_to_answer() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let mut web = spec("web", "sleep 0.5; exec python3 -m http.server $PORT --bind 127.0.0.1");
    web.readiness = Some(Readiness {
        kind: ProbeKind::Http { path: "/".into() },
        port: None,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(15),
        threshold: 2,
    });
    let recorder = Arc::new(Recorder::default());
    let instance = start_instance(
        plan(&dir, web, Some(port)),
        Arc::new(LocalProvider::default()),
        recorder.clone(),
    );
    wait_for(&instance, "ready", |s| s.status == ServiceStatus::Ready).await;
    let states = recorder.of("web");
    assert!(
        states.iter().any(|(_, s)| s.status == ServiceStatus::Starting && s.pid.is_some()),
        "it was starting before ready"
    );
    reqwest_like_get(port).await;
    instance.stop().await;
}

async fn reqwest_like_get(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
}

#[tokio::test]
async fn a_dependant_starts_only_once_its_dependency_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut db = spec("db", "sleep 0.6; echo 'database system is ready'; exec sleep 600");
    db.readiness = Some(Readiness {
        kind: ProbeKind::LogLine { pattern: "system is ready".into() },
        port: None,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
        threshold: 1,
    });
    let db =
        start_instance(plan(&dir, db, None), Arc::new(LocalProvider::default()), recorder.clone());
    let mut web = plan(&dir, spec("web", "exec sleep 600"), None);
    web.dependencies = vec![(db.key.clone(), db.watch(), DependencyCondition::Ready)];
    let web = start_instance(web, Arc::new(LocalProvider::default()), recorder.clone());

    let web_started = wait_for(&web, "web running", |s| s.pid.is_some()).await;
    assert!(web_started.pid.is_some());
    let db_ready_at = recorder
        .of("db")
        .iter()
        .find(|(_, s)| s.status == ServiceStatus::Ready)
        .map(|(at, _)| *at)
        .unwrap();
    let web_pid_at =
        recorder.of("web").iter().find(|(_, s)| s.pid.is_some()).map(|(at, _)| *at).unwrap();
    assert!(web_pid_at >= db_ready_at, "web started before db was ready");
    web.stop().await;
    db.stop().await;
}

#[tokio::test]
async fn a_service_over_its_memory_limit_is_restarted_with_the_reason_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut hog = spec(
        "hog",
        "exec python3 -c 'import time; x = bytearray(120 * 1024 * 1024); time.sleep(600)'",
    );
    hog.memory_limit_bytes = Some(50 * 1024 * 1024);
    hog.restart = RestartRules {
        max_restarts: 1,
        backoff: Duration::from_millis(50),
        ..RestartRules::default()
    };
    let recorder = Arc::new(Recorder::default());
    let instance =
        start_instance(plan(&dir, hog, None), Arc::new(LocalProvider::default()), recorder.clone());
    let crashed = wait_for(&instance, "crashed", |s| s.status == ServiceStatus::Crashed).await;
    assert!(crashed.reason.as_deref().unwrap().contains("memory limit exceeded"), "{crashed:?}");
    assert_eq!(crashed.restarts, 1);
    instance.stop().await;
}

/// Memory cgroups where this machine has a writable hierarchy (v2 delegated or v1).
fn memory_cgroups() -> Option<Arc<MemoryCgroups>> {
    match MemoryCgroups::detect() {
        Ok(cgroups) => Some(Arc::new(cgroups)),
        Err(reason) => {
            eprintln!(
                "drover-test: no kernel memory limits to test here ({reason}); the RSS watch test covers the fallback"
            );
            None
        }
    }
}

#[tokio::test]
async fn with_a_memory_cgroup_the_kernel_enforces_the_limit_and_the_reason_says_so() {
    let Some(cgroups) = memory_cgroups() else { return };
    let provider = Arc::new(LocalProvider::with_memory_cgroups(cgroups.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut hog = spec(
        "hog",
        "exec python3 -c 'import time; x = bytearray(200 * 1024 * 1024); time.sleep(600)'",
    );
    hog.memory_limit_bytes = Some(50 * 1024 * 1024);
    hog.restart = RestartRules {
        max_restarts: 1,
        backoff: Duration::from_millis(50),
        ..RestartRules::default()
    };
    let recorder = Arc::new(Recorder::default());
    let instance = start_instance(plan(&dir, hog, None), provider.clone(), recorder.clone());
    let crashed = wait_for(&instance, "crashed", |s| s.status == ServiceStatus::Crashed).await;
    let reason = crashed.reason.clone().unwrap_or_default();
    assert!(reason.contains("memory limit: killed by the kernel over 52428800 bytes"), "{reason}");
    assert_eq!(crashed.restarts, 1);
    instance.stop().await;

    // A well-behaved service runs in its own cgroup, children included, which goes with it.
    let mut calm = spec("calm", "sleep 600 & exec sleep 600");
    calm.memory_limit_bytes = Some(64 * 1024 * 1024);
    let instance = start_instance(plan(&dir, calm, None), provider, recorder.clone());
    let running = wait_for(&instance, "ready", |s| s.status == ServiceStatus::Ready).await;
    let pid = running.pid.unwrap();
    let own = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .find(|l| l.contains("memory") || l.starts_with("0::"))
            .map(|l| l.rsplit_once(':').unwrap().1.to_owned())
            .unwrap()
    };
    let path = own(pid);
    let name = path.rsplit('/').next().unwrap().to_owned();
    assert!(name.starts_with("drover-svc-"), "{path}");
    let cgroup_dir = cgroups.base().join(&name);
    let limit_file = match cgroups.version() {
        drover_env::cgroup::CgroupVersion::V1 => "memory.limit_in_bytes",
        drover_env::cgroup::CgroupVersion::V2 => "memory.max",
    };
    assert_eq!(std::fs::read_to_string(cgroup_dir.join(limit_file)).unwrap().trim(), "67108864");
    // The shell forks its background child a moment after it starts.
    let mut members = String::new();
    for _ in 0..100 {
        members = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")).unwrap();
        if members.lines().count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(members.lines().count(), 2, "the service and its child: {members}");
    instance.stop().await;
    for _ in 0..60 {
        if !cgroup_dir.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cgroup_dir.exists(), "the cgroup was removed with the service");
}

#[tokio::test]
async fn a_service_already_answering_at_its_address_is_used_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut shared = plan(&dir, spec("mail", "exit 1"), None);
    shared.key.environment = None;
    shared.external_addr = Some(addr);
    let recorder = Arc::new(Recorder::default());
    let instance = start_instance(shared, Arc::new(LocalProvider::default()), recorder.clone());
    let state = wait_for(&instance, "ready", |s| s.status == ServiceStatus::Ready).await;
    assert!(state.external && state.pid.is_none());
    assert!(state.reason.unwrap().contains("already running outside drover"));
    instance.stop().await;
    assert!(resources::alive(std::process::id()));
}

/// A project's secrets held in memory, changeable between starts; counts its reads.
struct Secrets {
    values: Mutex<Option<Vec<(&'static str, String)>>>,
    reads: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl SecretSource for Secrets {
    async fn secrets_for(
        &self,
        _project: &ProjectId,
        actor: &str,
        purpose: &str,
    ) -> Result<SecretValues, SecretsUnavailable> {
        self.reads.lock().unwrap().push((actor.to_owned(), purpose.to_owned()));
        let values = self.values.lock().unwrap().clone();
        let values = values.ok_or_else(|| SecretsUnavailable("the vault is closed".into()))?;
        let mut secrets = SecretValues::default();
        for (name, value) in values {
            secrets.insert(name, value);
        }
        Ok(secrets)
    }
}

fn with_secrets(mut plan: InstancePlan, source: Arc<Secrets>) -> InstancePlan {
    plan.secrets = Some(InstanceSecrets {
        source,
        project: ProjectId::default_project(),
        actor: "environment dev".into(),
        purpose: format!("service {}", plan.key.service),
    });
    plan
}

#[tokio::test]
async fn a_service_gets_its_secrets_at_every_start_and_its_output_is_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let first = "tok-first-0123456789";
    let second = "tok-second-0123456789";
    let source = Arc::new(Secrets {
        values: Mutex::new(Some(vec![
            ("MY_TOKEN", first.to_owned()),
            // Drover's own variable wins over a secret of its name.
            ("PORT", "secret-port-value".to_owned()),
        ])),
        reads: Mutex::new(Vec::new()),
    });
    let mut service = spec(
        "svc",
        r#"echo "token=$MY_TOKEN port=$PORT"; printf '%s' "$MY_TOKEN" > seen.txt; exec sleep 600"#,
    );
    // The exec probe runs with the service's variables too; its log is redacted.
    service.readiness = Some(Readiness {
        kind: ProbeKind::Exec {
            command: vec![
                "sh".into(),
                "-c".into(),
                r#"echo "probe sees $MY_TOKEN"; test "$MY_TOKEN" = "$(cat seen.txt)""#.into(),
            ],
        },
        port: None,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(15),
        threshold: 1,
    });
    let mut plan = with_secrets(plan(&dir, service, None), source.clone());
    plan.command.env.push(("PORT".into(), "4321".into()));
    let recorder = Arc::new(Recorder::default());
    let instance = start_instance(plan, Arc::new(LocalProvider::default()), recorder.clone());
    let mut following = instance.follow();
    wait_for(&instance, "ready", |s| s.status == ServiceStatus::Ready).await;
    assert_eq!(std::fs::read_to_string(dir.path().join("seen.txt")).unwrap(), first);
    let followed = tokio::time::timeout(Duration::from_secs(5), following.recv()).await;
    assert_eq!(followed.unwrap().unwrap(), "token=[redacted:MY_TOKEN] port=4321");

    // A changed secret is read again when the process restarts.
    *source.values.lock().unwrap() = Some(vec![("MY_TOKEN", second.to_owned())]);
    instance.restart();
    wait_for(&instance, "ready again", |s| s.status == ServiceStatus::Ready && s.restarts == 1)
        .await;
    assert_eq!(std::fs::read_to_string(dir.path().join("seen.txt")).unwrap(), second);
    assert_eq!(
        *source.reads.lock().unwrap(),
        vec![("environment dev".to_owned(), "service svc".to_owned()); 2],
        "one read per start of the process"
    );
    instance.stop().await;

    let log = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
    assert_eq!(log.matches("token=[redacted:MY_TOKEN] port=4321").count(), 2, "{log}");
    let probe_log = std::fs::read_to_string(dir.path().join("svc.probe.log")).unwrap();
    assert!(probe_log.contains("probe sees [redacted:MY_TOKEN]"), "{probe_log}");
    for (what, text) in [("log", &log), ("probe log", &probe_log)] {
        assert!(!text.contains(first) && !text.contains(second), "a value in the {what}: {text}");
    }
    for (_, state) in recorder.of("svc") {
        let reason = state.reason.unwrap_or_default();
        assert!(!reason.contains(first) && !reason.contains(second), "{reason}");
    }
}

#[tokio::test]
async fn a_service_whose_secrets_cannot_be_read_is_not_started_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let source = Arc::new(Secrets { values: Mutex::new(None), reads: Mutex::new(Vec::new()) });
    let mut service = spec("svc", "echo started; exec sleep 600");
    service.restart.policy = RestartPolicy::Never;
    let plan = with_secrets(plan(&dir, service, None), source.clone());
    let instance =
        start_instance(plan, Arc::new(LocalProvider::default()), Arc::new(Recorder::default()));
    let crashed = wait_for(&instance, "crashed", |s| s.status == ServiceStatus::Crashed).await;
    assert_eq!(
        crashed.reason.as_deref(),
        Some("cannot start: the project's secrets cannot be read: the vault is closed")
    );
    assert!(!dir.path().join("svc.log").exists(), "no process was started");
    instance.stop().await;
}
