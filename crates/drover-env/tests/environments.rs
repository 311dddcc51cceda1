//! The environment manager with a real SQLite store and real processes: port blocks,
//! per-env and shared services, stop, delete, worktrees, idle auto-stop, orphan sweep,
//! project secrets for per-env services (and none for shared ones).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_domain::{
    DependencyCondition, EnvName, EnvStatus, Environment, ProbeKind, ProjectId, Readiness,
    RestartRules, SecretValues, ServiceName, ServiceRecord, ServiceSpec, ServiceStatus, Sharing,
    Timestamp,
};
use drover_env::manager::{CreateEnvironment, EnvError, EnvManager, EnvSettings, INSTANCE_VAR};
use drover_env::provider::LocalProvider;
use drover_env::{SecretSource, SecretsUnavailable, free_port, resources};
use drover_store::{EnvironmentStore, SqliteStore, SqliteStoreOptions, StoreError};
use tokio_util::sync::CancellationToken;

fn project() -> ProjectId {
    ProjectId::default_project()
}

fn http_service(name: &str, sharing: Sharing, address: Option<String>) -> ServiceSpec {
    ServiceSpec {
        name: ServiceName::parse(name).unwrap(),
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
        readiness: Some(Readiness {
            kind: ProbeKind::Http { path: "/".into() },
            port: None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(20),
            threshold: 1,
        }),
        depends_on: BTreeMap::new(),
        restart: RestartRules::default(),
        stop_grace: Duration::from_secs(2),
        memory_limit_bytes: None,
        sharing,
        address,
        log_max_bytes: 1 << 20,
        log_keep: 1,
    }
}

struct Fixture {
    manager: Arc<EnvManager>,
    store: Arc<SqliteStore>,
    stop: CancellationToken,
    dir: tempfile::TempDir,
}

fn settings(data_dir: &Path, port_range: (u16, u16)) -> EnvSettings {
    EnvSettings {
        data_dir: data_dir.to_path_buf(),
        port_range,
        block_size: 10,
        quota: 5,
        idle_timeout: Duration::ZERO,
        delete_after: Duration::ZERO,
        setup_command: String::new(),
        copy_files: Vec::new(),
        max_apps: 5,
        reconcile_interval: Duration::from_millis(200),
    }
}

async fn fixture(services: Vec<ServiceSpec>, tweak: impl FnOnce(&mut EnvSettings)) -> Fixture {
    fixture_with(services, tweak, None).await
}

async fn fixture_with(
    services: Vec<ServiceSpec>,
    tweak: impl FnOnce(&mut EnvSettings),
    secrets: Option<Arc<dyn SecretSource>>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(&SqliteStoreOptions {
            url: format!("sqlite://{}", dir.path().join("drover.db").display()),
            read_connections: 2,
            busy_timeout: Duration::from_secs(5),
        })
        .await
        .unwrap(),
    );
    // A range of its own per test, so tests running at once never compete for ports.
    let mut settings = settings(dir.path(), drover_testkit::port_range(200));
    tweak(&mut settings);
    let mut manager =
        EnvManager::new(store.clone(), settings, services, Arc::new(LocalProvider::default()));
    if let Some(source) = secrets {
        manager = manager.with_secrets(source);
    }
    let manager = Arc::new(manager);
    let stop = CancellationToken::new();
    manager.spawn(stop.clone());
    Fixture { manager, store, stop, dir }
}

impl Fixture {
    async fn create(&self, name: &str) -> Environment {
        self.manager
            .create(
                &project(),
                CreateEnvironment {
                    name: Some(EnvName::parse(name).unwrap()),
                    actor: "test".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    async fn wait_env(&self, name: &str, status: EnvStatus) -> Environment {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let env = self.manager.find(&project(), name).await.unwrap();
            if env.status == status {
                return env;
            }
            assert!(Instant::now() < deadline, "{name} stayed {} (wanted {status})", env.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(
        &self,
        env: Option<&Environment>,
        service: &str,
    ) -> drover_env::manager::ServiceView {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let views = self.manager.services(env.map(|e| e.id)).await.unwrap();
            if let Some(view) = views
                .into_iter()
                .find(|v| v.name.as_str() == service && v.state.status == ServiceStatus::Ready)
            {
                return view;
            }
            assert!(Instant::now() < deadline, "{service} never got ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) {
        self.stop.cancel();
        self.manager.shutdown().await;
    }
}

/// A deployed app for `run`: Python's HTTP server on `port`, in `cwd`.
fn app_launch(
    run: drover_domain::RunId,
    port: u16,
    cwd: &Path,
    log_path: &Path,
) -> drover_env::apps::AppLaunch {
    drover_env::apps::AppLaunch {
        project: project(),
        run,
        command: drover_env::CommandSpec {
            program: "python3".into(),
            args: vec![
                "-m".into(),
                "http.server".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
            ],
            cwd: cwd.to_path_buf(),
            env: Vec::new(),
            log_path: log_path.to_path_buf(),
        },
        port,
        health_path: "/".into(),
    }
}

async fn get(port: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn two_environments_with_the_same_services_get_disjoint_ports_and_both_serve() {
    let fx = fixture(vec![http_service("web", Sharing::PerEnv, None)], |_| {}).await;
    let a = fx.create("alpha").await;
    let b = fx.create("beta").await;
    assert!(!a.ports.overlaps(b.ports), "{:?} overlaps {:?}", a.ports, b.ports);
    fx.wait_env("alpha", EnvStatus::Running).await;
    fx.wait_env("beta", EnvStatus::Running).await;
    let web_a = fx.wait_ready(Some(&a), "web").await;
    let web_b = fx.wait_ready(Some(&b), "web").await;
    let (port_a, port_b) = (web_a.ports["http"], web_b.ports["http"]);
    assert_eq!(port_a, a.ports.base);
    assert_eq!(port_b, b.ports.base);
    assert_ne!(port_a, port_b);
    assert_eq!(web_a.hostname, "web.alpha.localhost");
    assert!(web_a.rss_bytes > 0);
    let vars = fx.manager.variables(&a);
    assert_eq!(vars["DROVER_PORT_BASE"], a.ports.base.to_string());
    assert_eq!(vars["DROVER_PORT_WEB_HTTP"], port_a.to_string());
    fx.finish().await;
}

#[tokio::test]
async fn stopping_an_environment_stops_every_process_of_its_services() {
    let mut sleeper = http_service("worker", Sharing::PerEnv, None);
    sleeper.command = "sh".into();
    sleeper.args = vec!["-c".into(), "sleep 600 & sleep 600 & wait".into()];
    sleeper.readiness = None;
    let fx = fixture(vec![sleeper], |_| {}).await;
    let env = fx.create("gamma").await;
    let view = fx.wait_ready(Some(&env), "worker").await;
    let pgid = view.state.pid.unwrap();
    assert!(!resources::group_members(pgid).is_empty());

    fx.manager.stop(&project(), env.id, "test", Some("done")).await.unwrap();
    // Stopping twice is one stop.
    fx.manager.stop(&project(), env.id, "test", None).await.unwrap();
    fx.wait_env("gamma", EnvStatus::Stopped).await;
    assert!(
        resources::group_members(pgid).is_empty(),
        "processes of group {pgid} outlived the stop"
    );
    let records = fx.store.service_records(Some(env.id)).await.unwrap();
    assert_eq!(records[0].status, ServiceStatus::Stopped);

    fx.manager.start(&project(), env.id, "test", None).await.unwrap();
    fx.wait_env("gamma", EnvStatus::Running).await;
    fx.wait_ready(Some(&env), "worker").await;
    fx.finish().await;
}

#[tokio::test]
async fn a_shared_service_starts_once_for_three_environments() {
    let mail_port = free_port().unwrap();
    let mail = http_service("mail", Sharing::Shared, Some(format!("127.0.0.1:{mail_port}")));
    let mut app = http_service("app", Sharing::PerEnv, None);
    app.depends_on =
        BTreeMap::from([(ServiceName::parse("mail").unwrap(), DependencyCondition::Ready)]);
    app.env = BTreeMap::from([("MAIL_URL".to_owned(), "{url.mail}".to_owned())]);
    let fx = fixture(vec![app, mail], |_| {}).await;
    let mut envs = Vec::new();
    for name in ["one", "two", "three"] {
        envs.push(fx.create(name).await);
    }
    for env in &envs {
        fx.wait_ready(Some(env), "app").await;
    }
    let shared = fx.manager.services(None).await.unwrap();
    assert_eq!(shared.len(), 1, "one shared instance: {shared:?}");
    assert_eq!(shared[0].ports["http"], mail_port);
    assert_eq!(get(mail_port).await, 200);
    let vars = fx.manager.variables(&envs[0]);
    assert_eq!(vars["DROVER_SERVICE_MAIL_URL"], format!("http://127.0.0.1:{mail_port}"));
    assert_eq!(vars["DROVER_HOST_MAIL"], "mail.localhost");
    fx.finish().await;
}

/// One secret, and who read it for what.
#[derive(Default)]
struct OneSecret {
    reads: std::sync::Mutex<Vec<(ProjectId, String, String)>>,
}

#[async_trait::async_trait]
impl SecretSource for OneSecret {
    async fn secrets_for(
        &self,
        project: &ProjectId,
        actor: &str,
        purpose: &str,
    ) -> Result<SecretValues, SecretsUnavailable> {
        self.reads.lock().unwrap().push((project.clone(), actor.to_owned(), purpose.to_owned()));
        let mut values = SecretValues::default();
        values.insert("MY_TOKEN", "tok-5ecret-0123456789");
        Ok(values)
    }
}

#[tokio::test]
async fn per_env_services_get_the_project_secrets_and_shared_ones_do_not() {
    let telling = |name: &str, sharing, address| {
        let mut spec = http_service(name, sharing, address);
        spec.command = "sh".into();
        spec.args = vec![
            "-c".into(),
            r#"echo "token=$MY_TOKEN."; exec python3 -m http.server "$PORT" --bind 127.0.0.1"#
                .into(),
        ];
        spec
    };
    let mail_port = free_port().unwrap();
    let services = vec![
        telling("web", Sharing::PerEnv, None),
        telling("mail", Sharing::Shared, Some(format!("127.0.0.1:{mail_port}"))),
    ];
    let source = Arc::new(OneSecret::default());
    let fx = fixture_with(services, |_| {}, Some(source.clone())).await;
    let env = fx.create("secretive").await;
    let web = fx.wait_ready(Some(&env), "web").await;
    let mail = fx.wait_ready(None, "mail").await;
    let web_log = std::fs::read_to_string(&web.log_path).unwrap();
    assert!(web_log.starts_with("token=[redacted:MY_TOKEN].\n"), "{web_log}");
    let mail_log = std::fs::read_to_string(&mail.log_path).unwrap();
    assert!(mail_log.starts_with("token=.\n"), "{mail_log}");
    assert_eq!(
        *source.reads.lock().unwrap(),
        [(project(), "environment secretive".to_owned(), "service web".to_owned())],
        "one read, by the per-env service's one start"
    );
    fx.finish().await;
}

#[tokio::test]
async fn the_quota_caps_live_environments_and_deleting_frees_a_slot() {
    let fx = fixture(Vec::new(), |settings| settings.quota = 2).await;
    let first = fx.create("q1").await;
    fx.create("q2").await;
    let over = fx
        .manager
        .create(
            &project(),
            CreateEnvironment {
                name: Some(EnvName::parse("q3").unwrap()),
                actor: "test".into(),
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(over, Err(EnvError::Store(StoreError::EnvironmentQuotaExceeded { limit: 2 }))),
        "{over:?}"
    );
    fx.manager.delete(&project(), first.id, false, "test", None).await.unwrap();
    fx.wait_env(&first.id.to_string(), EnvStatus::Deleted).await;
    assert!(!Path::new(&first.workspace).exists(), "the workspace was removed");
    fx.create("q3").await;
    fx.finish().await;
}

#[tokio::test]
async fn an_idle_environment_is_stopped_and_the_stop_is_audited() {
    let fx =
        fixture(Vec::new(), |settings| settings.idle_timeout = Duration::from_millis(600)).await;
    let env = fx.create("sleepy").await;
    fx.wait_env("sleepy", EnvStatus::Running).await;
    fx.wait_env("sleepy", EnvStatus::Stopped).await;
    let audit = fx.store.list_audit(&project(), 10).await.unwrap();
    let stop = audit.iter().find(|a| a.action == "environment.stop").expect("the stop is audited");
    assert_eq!(stop.actor, "drover");
    assert!(stop.reason.as_deref().unwrap().starts_with("idle for"), "{stop:?}");
    assert_eq!(stop.target, env.id.to_string());
    fx.finish().await;
}

#[tokio::test]
async fn processes_left_by_a_killed_server_are_found_by_their_process_group_and_stopped() {
    let fx = fixture(Vec::new(), |_| {}).await;
    let env = fx.create("orphans").await;
    // What a killed server leaves: a service's process group, still running, recorded.
    let key = format!("worker@{}", env.id);
    let mut orphan = std::process::Command::new("sh");
    orphan.args(["-c", "sleep 600 & sleep 600 & wait"]).env(INSTANCE_VAR, &key);
    std::os::unix::process::CommandExt::process_group(&mut orphan, 0);
    let mut child = orphan.spawn().unwrap();
    let pgid = child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while resources::group_members(pgid).len() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    fx.store
        .record_service(ServiceRecord {
            environment_id: Some(env.id),
            service: ServiceName::parse("worker").unwrap(),
            status: ServiceStatus::Ready,
            pid: Some(pgid),
            restarts: 0,
            reason: None,
            updated_at: Timestamp::from_millis(0),
        })
        .await
        .unwrap();

    fx.manager.sweep_orphans().await;
    let _ = child.wait();
    // The group's other members are reaped by init a moment after they die.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !resources::group_members(pgid).is_empty() {
        assert!(Instant::now() < deadline, "the orphan group survived the sweep");
        std::thread::sleep(Duration::from_millis(50));
    }
    let record = fx.store.service_records(Some(env.id)).await.unwrap().remove(0);
    assert_eq!((record.status, record.pid), (ServiceStatus::Stopped, None));
    // The sweep, or the reconcile loop that may see the record first, says why.
    let reason = record.reason.unwrap_or_default();
    assert!(reason.contains("orphan") || reason.contains("previous server"), "{reason}");
    fx.finish().await;
}

fn git(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

#[tokio::test]
async fn a_worktree_environment_with_unmerged_work_is_not_deleted_without_force() {
    let fx = fixture(Vec::new(), |settings| settings.copy_files = vec![".env".into()]).await;
    let repo = fx.dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    std::fs::write(repo.join(".env"), "SECRET=1\n").unwrap();
    git(&repo, &["add", "README.md"]);
    git(&repo, &["commit", "-q", "-m", "init"]);

    let env = fx
        .manager
        .create(
            &project(),
            CreateEnvironment {
                name: Some(EnvName::parse("feature").unwrap()),
                repo: Some(repo.clone()),
                base: Some("main".into()),
                actor: "test".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let worktree = Path::new(&env.workspace);
    assert!(worktree.join("README.md").is_file());
    assert!(worktree.join(".env").is_file(), "copied by the setup hook");
    assert_eq!(env.branch.as_deref(), Some("drover/feature"));

    std::fs::write(worktree.join("work.txt"), "precious\n").unwrap();
    git(worktree, &["add", "work.txt"]);
    git(worktree, &["commit", "-q", "-m", "work"]);
    let refused = fx.manager.delete(&project(), env.id, false, "test", None).await;
    let Err(EnvError::UnmergedWork(why)) = refused else {
        panic!("deleted unmerged work: {refused:?}")
    };
    assert!(why.contains("1 commit(s) not merged"), "{why}");
    assert!(worktree.exists());

    fx.manager.delete(&project(), env.id, true, "test", Some("abandoned")).await.unwrap();
    fx.wait_env(&env.id.to_string(), EnvStatus::Deleted).await;
    assert!(!worktree.exists(), "the worktree is gone");
    fx.finish().await;
}

#[tokio::test]
async fn deployed_apps_run_in_the_deployments_environment_and_the_oldest_goes_beyond_the_cap() {
    use drover_env::apps::AppHost;
    let fixture = fixture(Vec::new(), |settings| settings.max_apps = 2).await;
    let workspace = fixture.dir.path().join("app");
    std::fs::create_dir_all(&workspace).unwrap();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = drover_domain::RunId::new();
        let port = free_port().unwrap();
        let launch =
            app_launch(run, port, &workspace, &fixture.dir.path().join(format!("{run}.log")));
        let started = AppHost::deploy(fixture.manager.as_ref(), launch).await.unwrap();
        assert_eq!(started.environment.as_deref(), Some("deployments"));
        let pid = started.pid.unwrap_or_else(|| panic!("no pid: {started:?}"));
        runs.push((run, port, pid));
    }
    let deployments = fixture.manager.find(&project(), "deployments").await.unwrap();
    let apps = fixture.store.apps(deployments.id).await.unwrap();
    let kept: Vec<_> = apps.iter().map(|app| app.run_id).collect();
    assert_eq!(kept, vec![runs[1].0, runs[2].0], "the oldest app was undeployed");
    assert!(!AppHost::is_up(fixture.manager.as_ref(), runs[0].0).await);
    for (run, port, _) in &runs[1..] {
        // Up, or coming back up (a loaded machine may make a first start fail).
        let deadline = Instant::now() + Duration::from_secs(15);
        while !AppHost::is_up(fixture.manager.as_ref(), *run).await {
            assert!(Instant::now() < deadline, "app of run {run} is not up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", *port)).await.is_err() {
            assert!(Instant::now() < deadline, "app on {port} never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(get(*port).await, 200);
    }
    // The undeployed app's process is gone (its port may already serve someone else).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !drover_env::resources::group_members(runs[0].2).is_empty() {
        assert!(Instant::now() < deadline, "the undeployed app's processes still run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The deployments environment counts towards no quota and the name is reserved.
    assert_eq!(fixture.store.count_live_environments(&project()).await.unwrap(), 0);
    let reserved = fixture
        .manager
        .create(
            &project(),
            CreateEnvironment {
                name: Some(EnvName::parse("deployments").unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(reserved, EnvError::ReservedName(_)), "{reserved}");
    fixture.manager.undeploy_app(&project(), runs[1].0).await.unwrap();
    fixture.manager.undeploy_app(&project(), runs[2].0).await.unwrap();
    fixture.stop.cancel();
    fixture.manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_created_at_once_each_get_a_block_of_their_own_until_none_is_free() {
    let project = project();
    // 20 blocks of 10 in the test's 200 ports.
    let fx = fixture(Vec::new(), |_| {}).await;
    let creations =
        (0..20).map(|_| fx.manager.create_for_run(&project, drover_domain::RunId::new()));
    let created: Vec<Environment> =
        futures::future::join_all(creations).await.into_iter().map(Result::unwrap).collect();
    let bases: std::collections::BTreeSet<u16> = created.iter().map(|env| env.ports.base).collect();
    assert_eq!(bases.len(), 20, "two environments share a port block: {bases:?}");
    let refused = fx.manager.create_for_run(&project, drover_domain::RunId::new()).await;
    assert!(matches!(refused, Err(EnvError::NoFreePorts { .. })), "{refused:?}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_on_one_store_creating_at_once_pass_over_the_blocks_the_other_took() {
    let project = project();
    // Two servers on one store: neither knows what the other has chosen; the store's
    // unique index decides and the loser takes the next free block.
    let range = drover_testkit::port_range(200);
    let fx = fixture(Vec::new(), |settings| settings.port_range = range).await;
    let other = EnvManager::new(
        fx.store.clone(),
        settings(&fx.dir.path().join("second"), range),
        Vec::new(),
        Arc::new(LocalProvider::default()),
    );
    let ours = (0..10).map(|_| fx.manager.create_for_run(&project, drover_domain::RunId::new()));
    let theirs = (0..10).map(|_| other.create_for_run(&project, drover_domain::RunId::new()));
    let (ours, theirs) =
        tokio::join!(futures::future::join_all(ours), futures::future::join_all(theirs));
    let bases: std::collections::BTreeSet<u16> =
        ours.into_iter().chain(theirs).map(|env| env.unwrap().ports.base).collect();
    assert_eq!(bases.len(), 20, "two environments share a port block: {bases:?}");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_at_once_never_run_more_apps_than_the_cap_nor_undeploy_one_still_deploying() {
    use drover_env::apps::AppHost;
    const CAP: usize = 3;
    let fixture = fixture(Vec::new(), |settings| settings.max_apps = CAP).await;
    let workspace = fixture.dir.path().join("app");
    std::fs::create_dir_all(&workspace).unwrap();
    let manager = fixture.manager.clone();
    let sampling = CancellationToken::new();
    let sampler = {
        let (manager, sampling) = (manager.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !sampling.is_cancelled() {
                most = most.max(manager.apps_up().await.len());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let deploys = (0..12).map(|i| {
        let (manager, workspace, logs) =
            (manager.clone(), workspace.clone(), fixture.dir.path().to_path_buf());
        async move {
            let run = drover_domain::RunId::new();
            let port = free_port().unwrap();
            let launch = app_launch(run, port, &workspace, &logs.join(format!("app-{i}.log")));
            let started = AppHost::deploy(manager.as_ref(), launch).await.unwrap();
            // While the deploy stage verifies it, nobody undeploys it.
            for _ in 0..10 {
                assert!(
                    AppHost::is_up(manager.as_ref(), run).await,
                    "app {i} undeployed mid-deploy"
                );
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            drop(started);
            run
        }
    });
    let runs = futures::future::join_all(deploys).await;
    sampling.cancel();
    let most = sampler.await.unwrap();
    assert!(most <= CAP, "{most} apps were up at once; the cap is {CAP}");
    let up = manager.apps_up().await;
    assert_eq!(up.len(), CAP, "the newest {CAP} stay: {up:?}");
    // Every app process still running is one the manager tracks.
    let deployments = manager.find(&project(), "deployments").await.unwrap();
    let tracked: Vec<u32> = manager
        .services(Some(deployments.id))
        .await
        .unwrap()
        .iter()
        .filter_map(|s| s.state.pid)
        .collect();
    assert_eq!(tracked.len(), CAP, "{tracked:?}");
    for run in runs {
        manager.undeploy_app(&project(), run).await.unwrap();
    }
    fixture.stop.cancel();
    manager.shutdown().await;
}
