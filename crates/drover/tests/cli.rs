//! The built `drover` binary, run as a user would, each test in a fresh directory:
//! the main job embedded, against `drover up`, inspection commands, bad input, and a
//! `kill -9` of the server in the middle of a run.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

/// A command for the binary, isolated from the developer's environment: its own working
/// directory (so its own `.drover`), and a configured address where nothing listens, so a
/// `drover up` on the machine is never picked up by accident.
fn drover(dir: &Path) -> Command {
    let mut command = Command::new(DROVER);
    command
        .current_dir(dir)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_DATA_DIR")
        .env_remove("RUST_LOG")
        .env("DROVER_SERVER__LISTEN", "127.0.0.1:1")
        .env("NO_COLOR", "1");
    command
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("drover runs");
    assert!(
        output.status.success(),
        "drover failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[test]
fn drover_run_hello_world_api_embedded_succeeds_and_prints_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ok(drover(dir.path()).args(["run", "Hello World API"]));
    let out = stdout(&output);
    assert!(out.trim().starts_with("http://127.0.0.1:"), "stdout: {out}");
    let err = stderr(&output);
    assert!(err.contains("succeeded"), "{err}");
    assert!(err.contains("app stops when this command ends"), "{err}");
    for stage in ["scaffold", "validate", "e2e", "integration", "deploy"] {
        assert!(err.contains(stage), "{stage} progress missing: {err}");
    }
    assert!(dir.path().join(".drover/drover.db").is_file());
    // The embedded deployment ended with the command.
    assert!(http().get(out.trim()).send().is_err());

    // History is readable afterwards, without a server.
    let listed = run_ok(drover(dir.path()).args(["runs", "ls"]));
    assert!(stdout(&listed).contains("succeeded"), "{}", stdout(&listed));
    let page: Value =
        serde_json::from_slice(&run_ok(drover(dir.path()).args(["--json", "runs", "ls"])).stdout)
            .unwrap();
    let id = page["items"][0]["id"].as_str().unwrap().to_owned();
    let shown = stdout(&run_ok(drover(dir.path()).args(["runs", "show", &id])));
    assert!(shown.contains("integration") && shown.contains("3 tests passed"), "{shown}");
    assert!(shown.contains("(stopped)"), "{shown}");
    let logs =
        stdout(&run_ok(drover(dir.path()).args(["runs", "logs", &id, "--stage", "validate"])));
    assert!(logs.contains("==> validate attempt 1 (succeeded) <=="), "{logs}");
}

#[test]
fn drover_run_json_prints_a_machine_readable_summary() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ok(drover(dir.path()).args(["--json", "run", "Todo API"]));
    let run: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["attempts"][0]["output"]["template"], "todo-api");
    assert!(run["deployment"]["url"].as_str().unwrap().starts_with("http://127.0.0.1:"));
}

#[test]
fn drover_run_list_shows_the_template_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let out = stdout(&run_ok(drover(dir.path()).args(["run", "--list"])));
    for name in ["Hello World API", "Todo API", "Static Site"] {
        assert!(out.contains(name), "{out}");
    }
    assert!(!dir.path().join(".drover").exists(), "listing templates touched the data dir");
}

#[test]
fn bad_input_exits_non_zero_with_a_one_line_message_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output = drover(dir.path()).args(["run", "   "]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("validation_failed") && err.contains("must not be empty"), "{err}");

    let output = drover(dir.path()).args(["run", "x", "--pipeline", "nope"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unknown_pipeline"), "{}", stderr(&output));

    let output = drover(dir.path()).args(["runs", "show", "not-a-run"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("run_not_found"), "{}", stderr(&output));

    let output = drover(dir.path())
        .env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "soon")
        .args(["runs", "ls"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("engine.heartbeat_interval"), "{}", stderr(&output));

    let page: Value =
        serde_json::from_slice(&run_ok(drover(dir.path()).args(["--json", "runs", "ls"])).stdout)
            .unwrap();
    assert_eq!(page["items"], Value::Array(vec![]));
}

#[test]
fn a_run_that_fails_exits_non_zero_and_says_which_stage_and_why() {
    let dir = tempfile::tempdir().unwrap();
    // No Python on PATH: the validate stage cannot run, deterministically.
    let empty_path = dir.path().join("empty-bin");
    std::fs::create_dir(&empty_path).unwrap();
    let output = drover(dir.path())
        .env("PATH", &empty_path)
        .args(["run", "Hello World API"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("✗ run") && err.contains("failed"), "{err}");
    assert!(err.contains("stage `validate` failed"), "{err}");
    assert!(err.contains("python3"), "{err}");
    assert!(err.contains("drover runs logs"), "points at the logs: {err}");
    assert!(stdout(&output).trim().is_empty(), "no URL for a failed run");
}

/// `drover up` in the background, stopped (SIGINT) when dropped.
struct Up {
    child: Child,
    url: String,
}

impl Up {
    fn start(dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let mut command = drover(dir);
        command
            .args(["up", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        Self::spawn(dir, command)
    }

    /// Starts a server command and waits until it publishes its address.
    fn spawn(dir: &Path, mut command: Command) -> Self {
        let data_dir = dir.join(".drover");
        let _ = std::fs::remove_file(data_dir.join("server.json"));
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(data_dir.join("server.json"))
                && let Ok(info) = serde_json::from_str::<Value>(&text)
            {
                break info["url"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "drover up did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Self { child, url }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Ctrl-C, then waits for a clean exit.
    fn interrupt(mut self) -> std::process::ExitStatus {
        kill(self.pid(), Signal::SIGINT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "drover up did not stop on Ctrl-C");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(mut self) {
        kill(self.pid(), Signal::SIGKILL).unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Live (non-zombie) processes whose working directory is inside `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.canonicalize().unwrap();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
                && alive(u64::from(*pid))
        })
        .collect()
}

/// Waits until nothing runs inside `dir` any more.
fn assert_no_processes_left_in(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_in(dir);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "orphaned processes in {}: {left:?}", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

#[test]
fn with_drover_up_running_a_run_deploys_an_app_that_answers_until_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), &[]);

    // `drover run` finds the server through the data directory.
    let output = run_ok(drover(dir.path()).args(["run", "Hello World API"]));
    let url = stdout(&output).trim().to_owned();
    assert!(!stderr(&output).contains("app stops when this command ends"), "{}", stderr(&output));
    let answer: Value = http().get(&url).send().unwrap().json().unwrap();
    assert!(answer["message"].as_str().unwrap().contains("Hello, World"), "{answer}");

    // Still answering after the command ended, and reported live by the server.
    let page: Value = http().get(format!("{}/api/v1/runs", up.url)).send().unwrap().json().unwrap();
    let deployment = page["items"][0]["deployment"].clone();
    assert_eq!(deployment["live"], true, "{page}");
    assert!(http().get(&url).send().unwrap().status().is_success());

    // And by its stable hostname through the routing proxy.
    let routed = deployment["routed_url"].as_str().unwrap().trim_end_matches('/').to_owned();
    let port = routed.rsplit(':').next().unwrap();
    let hostname = deployment["hostname"].as_str().unwrap();
    let routed_answer: Value = http()
        .get(format!("http://127.0.0.1:{port}/"))
        .header("host", hostname)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(routed_answer, answer);

    let status = up.interrupt();
    assert!(status.success(), "drover up exited with {status}");
    assert!(http().get(&url).send().is_err(), "the app outlived drover up");
    assert!(!alive(deployment["pid"].as_u64().unwrap()), "orphaned app process");
}

#[test]
fn a_sigkilled_server_resumes_the_run_without_rerunning_completed_stages() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("DROVER_ENGINE__HEARTBEAT_INTERVAL", "400ms")];
    let up = Up::start(dir.path(), &env);
    let client = http();
    let run: Value = client
        .post(format!("{}/api/v1/runs", up.url))
        .json(&serde_json::json!({ "request": "Hello World API" }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = run["id"].as_str().unwrap().to_owned();

    // Kill the server the moment the e2e stage is running (its app is up mid-check).
    let events = client.get(format!("{}/api/v1/runs/{id}/events", up.url)).send().unwrap();
    let mut completed_before = Vec::new();
    let reader = std::io::BufReader::new(events);
    for line in std::io::BufRead::lines(reader) {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) else {
            continue;
        };
        let event: Value = serde_json::from_str(data).unwrap();
        let kind = event["kind"].as_str().unwrap().to_owned();
        let stage = event["payload"]["stage"].as_str().unwrap_or_default().to_owned();
        if kind == "stage.succeeded" {
            completed_before.push(stage.clone());
        }
        if kind == "stage.running" && stage == "e2e" {
            break;
        }
        assert!(kind != "run.succeeded", "the run finished before the kill");
    }
    up.kill9();
    assert_eq!(completed_before, ["scaffold", "validate"]);
    // The app the e2e stage had started died with the server.
    assert_no_processes_left_in(&dir.path().join(".drover"));

    let up = Up::start(dir.path(), &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        let run: Value =
            client.get(format!("{}/api/v1/runs/{id}", up.url)).send().unwrap().json().unwrap();
        if matches!(run["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            break run;
        }
        assert!(Instant::now() < deadline, "the run did not resume: {run}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(finished["status"], "succeeded", "{finished}");

    let attempts = finished["attempts"].as_array().unwrap();
    for stage in ["scaffold", "validate", "e2e", "integration", "deploy"] {
        let of_stage: Vec<&Value> = attempts.iter().filter(|a| a["stage"] == stage).collect();
        let succeeded = of_stage.iter().filter(|a| a["status"] == "succeeded").count();
        assert_eq!(succeeded, 1, "{stage} committed {succeeded} times: {finished}");
        if completed_before.iter().any(|s| s == stage) {
            assert_eq!(of_stage.len(), 1, "completed stage {stage} ran again: {finished}");
        }
    }
    let e2e: Vec<&Value> = attempts.iter().filter(|a| a["stage"] == "e2e").collect();
    assert_eq!(e2e.len(), 2, "the interrupted e2e attempt is retried once: {finished}");
    assert_eq!(e2e[0]["status"], "failed");
    assert!(e2e[0]["error"].as_str().unwrap().contains("lease expired"));
    let status = up.interrupt();
    assert!(status.success());
}

#[test]
fn an_external_worker_over_http_runs_a_stage_that_was_waiting_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = drover(dir.path());
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0"])
        .env("DROVER_ENGINE__HEARTBEAT_INTERVAL", "500ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = Up::spawn(dir.path(), serve);

    let submitted = run_ok(drover(dir.path()).args(["run", "--detach", "Static Site"]));
    let id = stdout(&submitted).trim().to_owned();
    let run: Value =
        http().get(format!("{}/api/v1/runs/{id}", server.url)).send().unwrap().json().unwrap();
    assert_eq!(run["attempts"][0]["waiting_for_worker"], true, "{run}");
    let none = stdout(&run_ok(drover(dir.path()).args(["workers"])));
    assert_eq!(none.lines().count(), 1, "only the header: {none}");

    let mut worker = drover(dir.path())
        .args(["worker", "--agent", "all"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        let run: Value =
            http().get(format!("{}/api/v1/runs/{id}", server.url)).send().unwrap().json().unwrap();
        if run["status"] == "succeeded" || run["status"] == "failed" {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not proceed once a worker registered: {run}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let worker_id = finished["attempts"][0]["worker_id"].as_str().unwrap().to_owned();
    assert!(worker_id.ends_with(&format!("-{}", worker.id())), "{worker_id}");
    let listed = stdout(&run_ok(drover(dir.path()).args(["workers"])));
    assert!(
        listed.contains(&worker_id) && listed.contains("live") && listed.contains("external"),
        "{listed}"
    );

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGINT).unwrap();
    assert!(worker.wait().unwrap().success());
    let listed: Value =
        serde_json::from_slice(&run_ok(drover(dir.path()).args(["--json", "workers"])).stdout)
            .unwrap();
    assert_eq!(listed["items"][0]["status"], "gone", "{listed}");
    assert!(server.interrupt().success());
}

#[test]
fn a_worker_without_a_server_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let output = drover(dir.path()).args(["worker", "--agent", "scaffold"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no drover server to work for"), "{}", stderr(&output));
    let output = drover(dir.path())
        .args(["worker", "--agent", "nope", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cannot reach"), "{}", stderr(&output));
}

#[test]
fn a_sigkilled_server_with_running_environments_finds_and_reconciles_them_with_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = drover_testkit::port_range(100);
    std::fs::write(
        dir.path().join("drover.toml"),
        format!(
            "[environments]\nport_range_start = {base}\nport_range_end = {}\n\n\
             [services.web]\ncommand = \"sh\"\n\
             args = [\"-c\", \"sleep 600 & exec python3 -m http.server $PORT --bind 127.0.0.1\"]\n\
             readiness = {{ http = \"/\" }}\n",
            base + 99
        ),
    )
    .unwrap();
    let up = Up::start(dir.path(), &[]);
    run_ok(drover(dir.path()).args(["env", "create", "survivor"]));
    let ready = |url: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http().get(format!("{url}/api/v1/environments/survivor")).send() {
                let env: Value = response.json().unwrap();
                if env["status"] == "running"
                    && env["services"][0]["status"] == "ready"
                    && env["services"][0]["pid"].is_u64()
                {
                    return env;
                }
            }
            assert!(Instant::now() < deadline, "the environment never got ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let before = ready(&up.url);
    let old_group = before["services"][0]["pid"].as_u64().unwrap() as u32;
    let port = before["services"][0]["ports"]["http"].as_u64().unwrap();
    up.kill9();

    // The service's shell child survives the server (it was not its direct child).
    let orphans = group_members(old_group);
    assert!(!orphans.is_empty(), "expected a leftover process in group {old_group}");

    let up = Up::start(dir.path(), &[]);
    let after = ready(&up.url);
    let new_group = after["services"][0]["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_group, old_group);
    assert!(
        group_members(old_group).is_empty(),
        "the previous server's processes survived the restart"
    );
    assert_eq!(http().get(format!("http://127.0.0.1:{port}/")).send().unwrap().status(), 200);
    assert!(up.interrupt().success());
    assert!(group_members(new_group).is_empty(), "Ctrl-C left service processes behind");
}

/// Live processes of a process group.
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                let Some((_, rest)) = stat.rsplit_once(')') else { return false };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields.first().is_some_and(|s| *s != "Z")
                    && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
            })
        })
        .collect()
}

/// A stand-in for a coding CLI (`claude -p PROMPT`): says what it does, writes a project
/// into its working directory, and reports its result and usage on the last line.
const FAKE_CODER: &str = r#"
import json, os, shutil, sys
prompt, template = sys.argv[1], sys.argv[2]
print(f"fake-coder: asked to build {prompt!r} in {os.getcwd()}", flush=True)
print(f"fake-coder: model {os.environ['CODER_MODEL']}", flush=True)
shutil.copytree(template, os.getcwd(), dirs_exist_ok=True)
print(json.dumps({"files": sorted(os.listdir(".")), "usage": {"tokens": 1234, "cost_usd": 0.02}}))
"#;

#[test]
fn a_pipeline_extending_sdlc_with_a_command_agent_for_scaffold_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fake_coder.py"), FAKE_CODER).unwrap();
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../drover-agents/templates/hello-world-api");
    let config = format!(
        r#"
[agents.fake-coder]
command = "python3"
args = ["{coder}", "{{prompt}}", "{template}"]
env = {{ CODER_MODEL = "tiny-for-{{stage}}" }}

[pipelines.coded]
extends = "sdlc"
description = "sdlc with a coding CLI writing the code"
[[pipelines.coded.stages]]
name = "scaffold"
agent = "fake-coder"
"#,
        coder = dir.path().join("fake_coder.py").display(),
        template = template.display(),
    );
    std::fs::write(dir.path().join("drover.toml"), config).unwrap();

    let agents = stdout(&run_ok(drover(dir.path()).args(["agents"])));
    assert!(agents.contains("fake-coder") && agents.contains("command"), "{agents}");
    let pipelines = stdout(&run_ok(drover(dir.path()).args(["pipelines"])));
    assert!(pipelines.contains("scaffold (fake-coder) → validate"), "{pipelines}");

    let output = run_ok(drover(dir.path()).args([
        "--json",
        "run",
        "--pipeline",
        "coded",
        "Hello World API",
    ]));
    let run: Value = serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(run["status"], "succeeded", "{run}");
    let scaffold = &run["attempts"][0];
    assert_eq!(scaffold["stage"], "scaffold");
    assert_eq!(scaffold["output"]["usage"]["tokens"], 1234, "{scaffold}");
    assert!(scaffold["output"]["files"].as_array().unwrap().contains(&Value::from("app.py")));
    assert_eq!(run["attempts"].as_array().unwrap().len(), 5, "the other stages ran: {run}");

    let id = run["id"].as_str().unwrap();
    let logs =
        stdout(&run_ok(drover(dir.path()).args(["runs", "logs", id, "--stage", "scaffold"])));
    // As sdlc's scaffold, the agent's `{prompt}` is the request and the project contract.
    assert!(
        logs.contains(r"fake-coder: asked to build 'Hello World API\n\nProject contract (drover):"),
        "{logs}"
    );
    assert!(logs.contains("fake-coder: model tiny-for-scaffold"), "{logs}");

    let artifacts = stdout(&run_ok(drover(dir.path()).args(["runs", "artifacts", id])));
    assert!(
        artifacts.contains("scaffold.1.log") && artifacts.contains("deploy.1.log"),
        "{artifacts}"
    );
    let out = dir.path().join("artifacts");
    run_ok(
        drover(dir.path())
            .args(["runs", "artifacts", id, "--stage", "scaffold", "--out"])
            .arg(&out),
    );
    let saved = std::fs::read_to_string(out.join("scaffold.1.log")).unwrap();
    assert!(saved.contains("fake-coder: asked to build"), "{saved}");
    assert!(!out.join("validate.1.log").exists(), "--stage scaffold saved other stages");

    // With a budget below what the coder reports, the run stops after that stage and
    // says what was spent of what was allowed.
    let over = drover(dir.path())
        .args([
            "--json",
            "run",
            "--pipeline",
            "coded",
            "--budget-tokens",
            "1000",
            "Hello World API",
        ])
        .output()
        .unwrap();
    assert!(!over.status.success(), "{}", stderr(&over));
    let run: Value = serde_json::from_slice(&over.stdout).expect("one JSON document");
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"], "budget exceeded: 1234 tokens used of 1000 allowed");
    assert_eq!(run["budget"]["tokens"], 1000);
    assert_eq!(run["attempts"].as_array().unwrap().len(), 1, "stages ran past the budget: {run}");
    assert_eq!(run["attempts"][0]["status"], "succeeded");
    let refused = drover(dir.path())
        .args(["run", "--budget-tokens", "0", "Hello World API"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("budget.tokens"), "{}", stderr(&refused));

    // A config naming an agent that does not exist is refused before anything runs.
    std::fs::write(
        dir.path().join("drover.toml"),
        "[pipelines.broken]\nextends = \"sdlc\"\n[[pipelines.broken.stages]]\nname = \"scaffold\"\nagent = \"ghost\"\n",
    )
    .unwrap();
    let refused = drover(dir.path()).args(["run", "Hello World API"]).output().unwrap();
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(
        err.contains("drover.toml")
            && err.contains("pipelines.broken.stages[0].agent")
            && err.contains("ghost"),
        "{err}"
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = drover(dir.path())
        .args(["proxy", "trust"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `drover proxy trust | head -0`: the pipe's reader is gone before it writes.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert!(!err.contains("panicked"), "{err}");
    assert!(output.status.success(), "{err}");
}

/// Reads `child`'s stdout until `until` holds for a line (or the stream ends); the lines.
fn lines_until(child: &mut Child, until: impl Fn(&str) -> bool) -> Vec<String> {
    use std::io::BufRead;
    let stdout = child.stdout.as_mut().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = until(&line);
        lines.push(line);
        if done {
            break;
        }
    }
    lines
}

#[test]
fn logs_stream_live_to_several_watchers_and_replay_from_disk_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("drover.toml"),
        r#"
[agents.counter]
command = "sh"
args = ["-c", "for i in 1 2 3 4 5 6; do echo count $i; sleep 0.3; done"]

[pipelines.count]
[[pipelines.count.stages]]
name = "count"
agent = "counter"

[services.ticker]
command = "sh"
args = ["-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"]
"#,
    )
    .unwrap();
    let up = Up::start(dir.path(), &[]);
    let counted: Vec<String> = (1..=6).map(|i| format!("count {i}")).collect();

    // Three watchers follow one stage's output live; each sees all of it, in order, and
    // ends with the run.
    let run: Value = serde_json::from_slice(
        &run_ok(drover(dir.path()).args(["--json", "run", "--detach", "--pipeline", "count", "x"]))
            .stdout,
    )
    .unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    let watchers: Vec<Child> = (0..3)
        .map(|_| {
            drover(dir.path())
                .args(["runs", "logs", "-f", &id])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for watcher in watchers {
        let output = watcher.wait_with_output().unwrap();
        assert!(output.status.success());
        let out = stdout(&output);
        let seen: Vec<&str> = out.lines().filter(|l| l.starts_with("count ")).collect();
        assert_eq!(seen, counted, "a live watcher missed or reordered lines: {out}");
    }
    // After the fact, from disk: the same lines, and the command ends by itself.
    let after = run_ok(drover(dir.path()).args(["runs", "logs", "-f", &id]));
    let out = stdout(&after);
    assert_eq!(out.lines().filter(|l| l.starts_with("count ")).collect::<Vec<_>>(), counted);

    // A service's log: a watcher that joins late first gets what is on disk, then new
    // lines as they are written.
    run_ok(drover(dir.path()).args(["env", "create", "logs"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stdout(&run_ok(drover(dir.path()).args(["env", "logs", "logs", "ticker"])))
        .contains("tick 3")
    {
        assert!(Instant::now() < deadline, "the ticker never ticked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut follower = drover(dir.path())
        .args(["env", "logs", "-f", "logs", "ticker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let joined_at = Instant::now();
    let lines = lines_until(&mut follower, |line| line.contains("tick 12"));
    follower.kill().unwrap();
    follower.wait().unwrap();
    let ticks: Vec<&str> =
        lines.iter().filter(|l| l.starts_with("tick ")).map(String::as_str).collect();
    let expected: Vec<String> = (1..=12).map(|i| format!("tick {i}")).collect();
    assert_eq!(ticks, expected, "replayed from the start, then live, with no gap: {lines:?}");
    // The later ticks came live: they did not exist when the follower joined.
    assert!(joined_at.elapsed() > Duration::from_millis(600), "{:?}", joined_at.elapsed());

    run_ok(drover(dir.path()).args(["env", "rm", "logs"]));
    assert!(up.interrupt().success());
}

#[test]
fn bench_soak_measures_a_real_server_over_rounds_of_traffic_its_handlers_answer() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_ok(drover(dir.path()).args([
        "--json",
        "bench",
        "soak",
        "--rounds",
        "2",
        "--requests",
        "150",
        "--idle",
        "200ms",
    ]));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let series = &report["series"][0];
    assert_eq!(series["allocator"], "pinned mmap threshold", "{report}");
    let rounds = series["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report}");
    assert!(series["rss_start_mb"].as_f64().unwrap() > 1.0, "{report}");
    for round in rounds {
        let statuses = round["statuses"].as_object().unwrap();
        let answered: u64 = statuses.values().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(answered, 150, "{report}");
        assert!(!statuses.contains_key("0"), "requests got no answer: {report}");
        // The traffic reaches handlers (2xx), is refused as a client's (4xx), never 5xx.
        assert!(statuses.keys().any(|s| s.starts_with('2')), "{report}");
        assert!(statuses.keys().any(|s| s.starts_with('4')), "{report}");
        assert!(!statuses.keys().any(|s| s.starts_with('5')), "{report}");
    }
}
