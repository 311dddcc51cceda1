//! The built-in sdlc agents, run for real (Python processes, sockets) against a temporary
//! workspace, in pipeline order.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drover_agents::builtin::{
    DeployAgent, E2eAgent, IntegrationAgent, ScaffoldAgent, ValidateAgent,
};
use drover_agents::{Agent, AgentTask, StageLog};
use drover_bus::{AgentResult, TaskEnvelope, WorkflowContext};
use drover_domain::{
    AgentType, AttemptId, CorrelationId, FencingToken, PipelineName, ProjectId, RunId, StageName,
};
use drover_env::Deployments;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn task(workspace: &Path, run_id: RunId, stage: &str, request: &str) -> AgentTask {
    let log_path = workspace.parent().unwrap().join("logs").join(format!("{stage}.1.log"));
    AgentTask {
        envelope: TaskEnvelope {
            task_id: AttemptId::new(),
            project_id: ProjectId::default_project(),
            run_id,
            pipeline: PipelineName::parse("sdlc").unwrap(),
            stage: StageName::parse(stage).unwrap(),
            agent: AgentType::parse(stage).unwrap(),
            attempt: 1,
            fencing_token: FencingToken::FIRST,
            payload: json!({ "request": request }),
            context: WorkflowContext {
                workspace: workspace.display().to_string(),
                log_path: log_path.display().to_string(),
                outputs: Default::default(),
                variables: Default::default(),
                ..Default::default()
            },
            deadline: None,
            correlation_id: CorrelationId::new(),
            traceparent: None,
        },
        workspace: workspace.to_path_buf(),
        log: StageLog::new(log_path),
        cancel: CancellationToken::new(),
        secrets: Default::default(),
    }
}

fn succeeded(result: AgentResult) -> Value {
    match result {
        AgentResult::Succeeded { output } => output,
        AgentResult::Failed { error, .. } => panic!("stage failed: {error}"),
    }
}

#[tokio::test]
async fn the_sdlc_agents_scaffold_check_test_and_deploy_a_hello_world_api() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    let run = RunId::new();
    let request = "Hello World API";

    let scaffolded =
        succeeded(ScaffoldAgent::new().run(&task(&workspace, run, "scaffold", request)).await);
    assert_eq!(scaffolded["template"], "hello-world-api");
    assert!(workspace.join("app.py").is_file());

    let validated =
        succeeded(ValidateAgent::new().run(&task(&workspace, run, "validate", request)).await);
    assert_eq!(validated["checked"], 4, "app.py, two test files and drover.json");

    let e2e = succeeded(E2eAgent::new().run(&task(&workspace, run, "e2e", request)).await);
    assert_eq!(e2e["checks"].as_array().unwrap().len(), 2);
    // The app under test is stopped afterwards: its port is free again.
    let port = e2e["port"].as_u64().unwrap() as u16;
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("e2e app released its port");

    let tested = succeeded(
        IntegrationAgent::new().run(&task(&workspace, run, "integration", request)).await,
    );
    assert_eq!(tested["tests_run"], 3);

    let deployments = Deployments::new();
    let deployed = succeeded(
        DeployAgent::new(Arc::new(deployments.clone()))
            .run(&task(&workspace, run, "deploy", request))
            .await,
    );
    let url = deployed["url"].as_str().unwrap().to_owned();
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(body.contains("Hello, World"), "{body}");
    assert_eq!(deployments.get(run).unwrap().url, url);

    deployments.stop_all(Duration::from_secs(3)).await;
    assert!(reqwest::get(&url).await.is_err(), "app still answers after stop");
    assert!(!workspace.join("__pycache__").exists(), "validation wrote bytecode");
}

#[tokio::test]
async fn validation_reports_every_broken_file_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    let run = RunId::new();
    succeeded(ScaffoldAgent::new().run(&task(&workspace, run, "scaffold", "Todo API")).await);
    std::fs::write(workspace.join("broken.py"), "def f(:\n    pass\n").unwrap();
    std::fs::write(workspace.join("bad.json"), "{\"a\": }").unwrap();

    let result = ValidateAgent::new().run(&task(&workspace, run, "validate", "Todo API")).await;
    let AgentResult::Failed { error, retryable } = result else { panic!("broken files passed") };
    assert!(!retryable, "a syntax error is not worth retrying");
    assert!(error.contains("broken.py:1"), "{error}");
    assert!(error.contains("bad.json:1"), "{error}");
    assert!(error.starts_with("2 of "), "{error}");
}

#[tokio::test]
async fn failing_project_tests_fail_the_integration_stage_with_their_output() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    let run = RunId::new();
    succeeded(ScaffoldAgent::new().run(&task(&workspace, run, "scaffold", "Static Site")).await);
    std::fs::write(workspace.join("public/index.html"), "<p>no heading</p>").unwrap();

    let result = IntegrationAgent::new().run(&task(&workspace, run, "integration", "x")).await;
    let AgentResult::Failed { error, retryable } = result else { panic!("failing tests passed") };
    assert!(!retryable);
    assert!(error.contains("FAILED"), "{error}");
}

#[tokio::test]
async fn an_app_that_crashes_on_start_fails_e2e_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    let run = RunId::new();
    succeeded(
        ScaffoldAgent::new().run(&task(&workspace, run, "scaffold", "Hello World API")).await,
    );
    std::fs::write(workspace.join("app.py"), "raise SystemExit('boom')\n").unwrap();

    let started = std::time::Instant::now();
    let result = E2eAgent::new().run(&task(&workspace, run, "e2e", "x")).await;
    let AgentResult::Failed { error, .. } = result else { panic!("crashing app passed e2e") };
    assert!(error.contains("exited during startup"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_workspace_without_a_manifest_fails_later_stages_permanently() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let result = E2eAgent::new().run(&task(&workspace, RunId::new(), "e2e", "x")).await;
    let AgentResult::Failed { error, retryable } = result else { panic!() };
    assert!(!retryable);
    assert!(error.contains("drover.json"), "{error}");
}

fn write_files(workspace: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let path = workspace.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

fn failed(result: AgentResult) -> String {
    match result {
        AgentResult::Failed { error, retryable } => {
            assert!(!retryable, "{error}");
            error
        }
        AgentResult::Succeeded { output } => panic!("stage succeeded: {output}"),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

const RUST_SERVER: &str = r#"use std::io::{Read, Write};
use std::net::TcpListener;

fn greeting() -> &'static str {
    "Hello, World"
}

fn main() {
    let port = std::env::var("PORT").expect("PORT");
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).expect("bind");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut request = [0u8; 1024];
        let read = stream.read(&mut request).unwrap_or(0);
        let healthy = request[..read].starts_with(b"GET /health");
        let body = if healthy { "ok" } else { greeting() };
        let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn greets() {
        assert_eq!(super::greeting(), "Hello, World");
    }
}
"#;

/// A Cargo project with no manifest, run with the real cargo: checked, started with
/// `cargo run`, tested with `cargo test`.
#[tokio::test]
async fn a_cargo_project_without_a_manifest_is_checked_run_and_tested_with_cargo() {
    assert!(on_path("cargo"), "cargo builds drover, so it is on PATH");
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    write_files(
        &workspace,
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"hello-rs\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
            ),
            ("src/main.rs", RUST_SERVER),
        ],
    );
    let run = RunId::new();
    let validated =
        succeeded(ValidateAgent::new().run(&task(&workspace, run, "validate", "x")).await);
    assert_eq!(validated["ran"], json!(["cargo check --quiet"]));
    assert_eq!(validated["project"]["kind"], "cargo");
    let e2e = succeeded(E2eAgent::new().run(&task(&workspace, run, "e2e", "x")).await);
    assert_eq!(e2e["checks"][0]["path"], "/health", "found in src/main.rs");
    let tested =
        succeeded(IntegrationAgent::new().run(&task(&workspace, run, "integration", "x")).await);
    assert_eq!(tested["command"], "cargo test");
    assert_eq!(tested["tests_run"], 1);
    let log = std::fs::read_to_string(dir.path().join("logs/e2e.1.log")).unwrap();
    assert!(
        log.contains("detected a Cargo project (Cargo.toml): start `cargo run --quiet`, health `/health` (found in src/main.rs), test `cargo test`"),
        "{log}"
    );

    // A compile error fails validation with cargo's own words.
    std::fs::write(workspace.join("src/main.rs"), "fn main() { let x: u32 = \"no\"; }\n").unwrap();
    let error = failed(ValidateAgent::new().run(&task(&workspace, run, "validate", "x")).await);
    assert!(
        error.contains("`cargo check --quiet` failed") && error.contains("mismatched types"),
        "{error}"
    );
}

/// Go is checked with `go vet` where it is installed; where it is not, validation says it
/// was skipped and e2e names the missing program instead of failing obscurely.
#[tokio::test]
async fn a_go_module_is_vetted_where_go_is_installed_and_named_where_it_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    write_files(
        &workspace,
        &[
            ("go.mod", "module example.com/hello\n\ngo 1.21\n"),
            ("main.go", "package main\n\nfunc main() {}\n"),
            (
                "main_test.go",
                "package main\n\nimport \"testing\"\n\nfunc TestNothing(t *testing.T) {}\n",
            ),
        ],
    );
    let run = RunId::new();
    let validated =
        succeeded(ValidateAgent::new().run(&task(&workspace, run, "validate", "x")).await);
    if on_path("go") {
        assert_eq!(validated["ran"], json!(["go vet ./..."]));
    } else {
        assert_eq!(validated["skipped"], json!(["go is not on PATH: `go vet ./...` skipped"]));
        let log = std::fs::read_to_string(dir.path().join("logs/validate.1.log")).unwrap();
        assert!(log.contains("skipped: go is not on PATH"), "{log}");
        let error = failed(E2eAgent::new().run(&task(&workspace, run, "e2e", "x")).await);
        assert_eq!(
            error,
            "`go` is not on PATH (or not executable): it is needed to start the app (`go run .`)"
        );
    }
}

/// A manifest always wins over detection, and a broken one is an error (not a reason to
/// detect instead).
#[tokio::test]
async fn a_manifest_wins_over_detection_and_an_invalid_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = dir.path().join("workspace");
    let run = RunId::new();
    succeeded(
        ScaffoldAgent::new().run(&task(&workspace, run, "scaffold", "Hello World API")).await,
    );
    // A package.json beside it would make it a Node project; the manifest says Python.
    write_files(&workspace, &[("package.json", r#"{"scripts": {"test": "exit 1"}}"#)]);
    let tested =
        succeeded(IntegrationAgent::new().run(&task(&workspace, run, "integration", "x")).await);
    assert_eq!(tested["command"], "python3 -m unittest discover -s tests -v");
    assert_eq!(tested["project"]["source"], "drover.json");

    std::fs::write(workspace.join("drover.json"), r#"{"start": "python3 app.py"}"#).unwrap();
    let error = failed(E2eAgent::new().run(&task(&workspace, run, "e2e", "x")).await);
    assert!(error.starts_with("drover.json is invalid"), "{error}");
}
