//! `sdlc` with a scaffold agent of the user's own (a `command` agent), run through the
//! built binary: the agent gets the project contract in its prompt, writes a project in a
//! layout of its own without a `drover.json` (Python, Node, a static site), and validate,
//! e2e, integration and deploy detect it, say what they detected and succeed; a workspace
//! nothing can be detected in fails at validate, naming what was looked for; the stage
//! summary says what the agent changed.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

/// The stand-in coding agent: writes the project named by its first argument into the
/// workspace (its working directory), keeps the prompt it was given in the directory of
/// its third argument, and reports usage on its last line.
const CODER: &str = r#"
import json, os, sys
layout, prompt, keep = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(keep, "prompt-" + layout + ".txt"), "w") as f:
    f.write(prompt)
    f.write("\n--- DROVER_REQUEST: " + os.environ["DROVER_REQUEST"])
PY_APP = '''import os
from http.server import BaseHTTPRequestHandler, HTTPServer

def greeting():
    return "Hello, World"

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok" if self.path == "/health" else greeting().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''
PY_TEST = '''import unittest
import app

class GreetingTest(unittest.TestCase):
    def test_greeting(self):
        self.assertEqual(app.greeting(), "Hello, World")

    def test_greeting_is_polite(self):
        self.assertIn("Hello", app.greeting())
'''
layouts = {
    "python": {"app.py": PY_APP, "requirements.txt": "", "tests/test_app.py": PY_TEST},
    "partial": {
        "app.py": PY_APP,
        "test_app.py": PY_TEST,
        "drover.json": json.dumps({"name": "partial", "start": ["python3", "app.py"], "health_path": "/health"}),
    },
    "node": {
        "package.json": json.dumps({"name": "hello-node", "version": "1.0.0",
            "scripts": {"start": "node server.js", "test": "node --test"}}),
        "greeting.js": "module.exports = () => 'Hello, World';\n",
        "server.js": '''const http = require("http");
const greeting = require("./greeting");
http.createServer((req, res) => {
  res.end(req.url === "/health" ? "ok" : greeting());
}).listen(Number(process.env.PORT), "127.0.0.1");
''',
        "test/greeting.test.js": '''const test = require("node:test");
const assert = require("node:assert");
const greeting = require("../greeting");
test("greets", () => assert.strictEqual(greeting(), "Hello, World"));
''',
    },
    "static": {
        "index.html": '<html><head><link rel="stylesheet" href="style.css"></head>'
            '<body><h1>Hello, World</h1><a href="about.html">about</a><a href="https://example.com/">out</a></body></html>\n',
        "about.html": '<html><body><a href="/">home</a><img src="img/logo.svg"></body></html>\n',
        "style.css": "h1 { font-family: sans-serif; }\n",
        "img/logo.svg": "<svg xmlns='http://www.w3.org/2000/svg'/>\n",
    },
    "notes": {"NOTES.txt": "an idea, no code\n"},
}
for path, text in layouts[layout].items():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
print(f"coder: wrote {len(layouts[layout])} files for {layout}", flush=True)
print(json.dumps({"usage": {"tokens": 321, "cost_usd": 0.0042}}))
"#;

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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A directory with the coder and a config whose `own` pipeline is `sdlc` with the coder
/// as its scaffold stage.
fn project_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("coder.py"), CODER).unwrap();
    let config = format!(
        r#"
[agents.coder]
command = "python3"
args = ["{coder}", "{{request}}", "{{prompt}}", "{keep}"]
retry_on_failure = false

[pipelines.own]
extends = "sdlc"
[[pipelines.own.stages]]
name = "scaffold"
agent = "coder"
"#,
        coder = dir.path().join("coder.py").display(),
        keep = dir.path().display(),
    );
    std::fs::write(dir.path().join("drover.toml"), config).unwrap();
    dir
}

/// `drover run --pipeline own LAYOUT` as a person runs it (its progress on stderr), and
/// then the run as `drover --json runs show` has it.
fn run(dir: &Path, layout: &str) -> (Output, Value) {
    let output = drover(dir).args(["run", "--pipeline", "own", layout]).output().unwrap();
    let json = |args: &[&str]| -> Value {
        let shown = drover(dir).arg("--json").args(args).output().unwrap();
        assert!(shown.status.success(), "{}", text(&shown.stderr));
        serde_json::from_slice(&shown.stdout).expect("one JSON document")
    };
    let listed = json(&["runs", "ls"]);
    let id = listed["items"][0]["id"].as_str().expect("a run").to_owned();
    (output, json(&["runs", "show", &id]))
}

fn logs(dir: &Path, run: &Value, stage: &str) -> String {
    let id = run["id"].as_str().unwrap();
    let output = drover(dir).args(["runs", "logs", id, "--stage", stage]).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}

fn attempt<'a>(run: &'a Value, stage: &str) -> &'a Value {
    run["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} attempt: {run}"))
}

/// Runs `layout` through all five stages and checks that each later stage said what it
/// detected (`detected`), and what the scaffold summary says; returns the run.
fn succeeds_with_detection(layout: &str, detected: &str, files: u64) -> (tempfile::TempDir, Value) {
    let dir = project_dir();
    let (output, run) = run(dir.path(), layout);
    assert_eq!(run["status"], "succeeded", "{run}\n{}", text(&output.stderr));
    let stages: Vec<(&str, &str)> = run["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["stage"].as_str().unwrap(), a["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        stages,
        [
            ("scaffold", "succeeded"),
            ("validate", "succeeded"),
            ("e2e", "succeeded"),
            ("integration", "succeeded"),
            ("deploy", "succeeded")
        ]
    );
    for stage in ["validate", "e2e", "integration", "deploy"] {
        let log = logs(dir.path(), &run, stage);
        assert!(log.contains(detected), "{stage} log does not say {detected:?}:\n{log}");
        assert_eq!(attempt(&run, stage)["output"]["project"]["source"], "detected", "{stage}");
    }

    let scaffold = &attempt(&run, "scaffold")["output"];
    let summary = &scaffold["summary"];
    assert_eq!(summary["files_changed"], files, "{scaffold}");
    assert!(summary["lines_added"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["lines_removed"], 0);
    assert_eq!(summary["tokens"], 321);
    let expected =
        format!("{files} files changed (+{} −0), 321 tokens, $0.0042", summary["lines_added"]);
    assert_eq!(summary["text"], expected.as_str());
    let progress = text(&output.stderr);
    let line = progress
        .lines()
        .find(|l| l.starts_with("scaffold") && l.contains("succeeded"))
        .unwrap_or_else(|| panic!("no scaffold line in the progress: {progress}"));
    assert!(line.ends_with(&expected), "{line}");
    assert!(!line.contains("template"), "{line}");
    (dir, run)
}

#[test]
fn a_python_project_without_a_manifest_is_detected_by_every_later_stage() {
    let (dir, run) = succeeds_with_detection(
        "python",
        "detected a Python project (requirements.txt, app.py): start `python3 app.py`, \
         health `/health` (found in app.py), test `python3 -m unittest discover -s tests`",
        3,
    );
    assert_eq!(attempt(&run, "integration")["output"]["tests_run"], 2);
    assert_eq!(attempt(&run, "e2e")["output"]["checks"][0]["path"], "/health");

    // The agent was told the contract after the request; `{request}` is the request alone.
    let prompt = std::fs::read_to_string(dir.path().join("prompt-python.txt")).unwrap();
    assert!(prompt.starts_with("python\n\nProject contract (drover):\n"), "{prompt}");
    for term in [
        "Write the project in the current directory",
        "drover.json",
        "\"start\"",
        "PORT environment variable",
        "\"health_path\"",
        "\"test\"",
        "drover tries to detect the project",
    ] {
        assert!(prompt.contains(term), "the prompt lacks {term:?}: {prompt}");
    }
    assert!(prompt.ends_with("--- DROVER_REQUEST: python"), "{prompt}");
}

#[test]
fn a_node_project_runs_through_its_package_scripts() {
    let (dir, run) = succeeds_with_detection(
        "node",
        "detected a Node project (package.json): start `npm start`, health `/health` (found \
         in server.js), test `npm test`",
        4,
    );
    let validate = &attempt(&run, "validate")["output"];
    let ran: Vec<&str> =
        validate["ran"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(
        ran,
        [
            "node --check greeting.js",
            "node --check server.js",
            "node --check test/greeting.test.js"
        ]
    );
    assert_eq!(attempt(&run, "integration")["output"]["tests_run"], 1);
    let log = logs(dir.path(), &run, "integration");
    assert!(log.contains("$ npm test"), "{log}");
}

#[test]
fn a_static_site_is_served_and_its_links_checked() {
    let (dir, run) = succeeds_with_detection(
        "static",
        "detected a static site (index.html): start `python3 -m http.server $PORT --bind \
         127.0.0.1 --directory .`, health `/` (the default), test drover's check of the local \
         links under ./",
        4,
    );
    let checks: Vec<&str> = attempt(&run, "e2e")["output"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["path"].as_str())
        .collect();
    assert_eq!(checks, ["/", "/about.html"]);
    let integration = &attempt(&run, "integration")["output"];
    assert_eq!((integration["pages"].as_u64(), integration["links"].as_u64()), (Some(2), Some(4)));
    let log = logs(dir.path(), &run, "integration");
    assert!(log.contains("4 local links in 2 pages resolve"), "{log}");
}

#[test]
fn a_partial_manifest_is_completed_by_detection_and_says_so() {
    let dir = project_dir();
    let (output, run) = run(dir.path(), "partial");
    assert_eq!(run["status"], "succeeded", "{run}\n{}", text(&output.stderr));
    let integration = &attempt(&run, "integration")["output"];
    assert_eq!(integration["command"], "python3 -m unittest discover");
    assert_eq!(integration["project"]["source"], "drover.json + detection");
    let log = logs(dir.path(), &run, "integration");
    assert!(
        log.contains(
            "drover.json without `test`, completed by detection (a Python project): start \
             `python3 app.py`, health `/health`, test `python3 -m unittest discover`"
        ),
        "{log}"
    );
}

#[test]
fn a_project_nothing_can_be_detected_in_fails_at_validate_naming_what_was_looked_for() {
    let dir = project_dir();
    let (output, run) = run(dir.path(), "notes");
    assert!(!output.status.success());
    assert_eq!(run["status"], "failed", "{run}");
    let validate = attempt(&run, "validate");
    assert_eq!(validate["status"], "failed", "{run}");
    let run_error = run["error"].as_str().unwrap();
    assert!(
        run_error.starts_with("stage `validate` failed: no drover.json, and no project detected"),
        "{run_error}"
    );
    let error = validate["error"].as_str().unwrap();
    for looked_for in
        ["drover.json", "Cargo.toml", "go.mod", "package.json", "requirements.txt", "index.html"]
    {
        assert!(error.contains(looked_for), "{looked_for}: {error}");
    }
    assert!(error.ends_with("the workspace holds NOTES.txt"), "{error}");
    assert_eq!(run["attempts"].as_array().unwrap().len(), 2, "no stage ran after validate: {run}");
    assert!(logs(dir.path(), &run, "validate").contains("no project detected"));
}
