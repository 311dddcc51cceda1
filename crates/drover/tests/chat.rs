//! `drover chat`, the built binary, as a person at a terminal would use it (stdin piped):
//! against the local OpenAI-compatible model double, a reply streams out, the session is
//! kept in the data directory and `--session` resumes it with its history; commands act on
//! drover from the chat; a server that went away is reported and the chat goes on.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_testkit::model::ModelDouble;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

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

fn configure(dir: &Path, model: &ModelDouble) {
    std::fs::write(
        dir.join("drover.toml"),
        format!(
            "[agents.assistant]\nkind = \"llm\"\nbase_url = \"{}\"\nmodel = \"double\"\n",
            model.base_url()
        ),
    )
    .unwrap();
}

/// Runs `drover chat ARGS` with `input` on its stdin; (stdout, stderr).
fn chat(dir: &Path, args: &[&str], input: &str) -> (String, String) {
    let mut child = drover(dir)
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "drover chat failed:\nstdout: {out}\nstderr: {err}");
    (out, err)
}

fn session_id(stderr: &str) -> String {
    let line = stderr.lines().find(|l| l.starts_with("chat session ")).expect(stderr);
    line.split_whitespace().nth(2).unwrap().trim_end_matches(';').to_owned()
}

#[test]
fn a_chat_streams_replies_and_resumes_its_session_with_the_history() {
    let model = ModelDouble::start("glad to help", Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &model);

    let (out, err) = chat(dir.path(), &[], "hello drover\n/session\n/nonsense\n");
    assert!(out.contains("Echo: hello drover glad to help"), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("with assistant"), "{err}");
    assert!(err.contains("2 messages"), "/session shows the count: {err}");
    assert!(err.contains("no command /nonsense"), "{err}");
    let id = session_id(&err);
    assert!(err.contains(&format!("resume with: drover chat --session {id}")), "{err}");

    // Another process, another embedded server on the same data directory: resumed.
    let (out, err) = chat(dir.path(), &["--session", &id], "what did I say?\n");
    assert!(out.contains("user› hello drover"), "the history is shown: {out}");
    assert!(out.contains("assistant› Echo: hello drover glad to help"), "{out}");
    assert!(out.contains("Echo: what did I say? glad to help"), "{out}");
    assert_eq!(session_id(&err), id);
    let last = model.requests().pop().unwrap();
    let contents: Vec<&str> = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        ["hello drover", "Echo: hello drover glad to help", "what did I say?"],
        "the resumed session sends its history"
    );

    // A session that does not exist: a one-line error, non-zero exit.
    let output = drover(dir.path())
        .args(["chat", "--session", "0190c0de-0000-7000-8000-000000000000"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("chat_session_not_found"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn chat_commands_run_pipelines_and_show_logs_and_environments() {
    let model = ModelDouble::start("ok", Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &model);
    let (out, err) = chat(dir.path(), &[], "/run --pipeline nope x\n/run Hello World API\n/env\n");
    assert!(err.contains("unknown_pipeline"), "a bad /run is told and the chat goes on: {err}");
    assert!(err.contains("run ") && err.contains("succeeded"), "{err}");
    assert!(out.contains("NAME"), "/env lists environments: {out}");
    let run = err
        .lines()
        .find_map(|l| l.strip_prefix("run ").and_then(|rest| rest.split_whitespace().next()))
        .unwrap()
        .to_owned();
    let (out, _) = chat(dir.path(), &[], &format!("/logs {run} scaffold\n"));
    assert!(out.contains("scaffold"), "/logs prints the stage's log: {out}");
}

#[test]
fn a_lost_server_is_reported_and_the_chat_goes_on() {
    let model = ModelDouble::start("still here", Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    configure(dir.path(), &model);
    // A server of its own, so it can be taken away mid-chat.
    let mut server = drover(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        let line = lines.next().expect("the server starts").unwrap();
        if let Some(at) = line.find("http://127.0.0.1:") {
            let url: String = line[at..].chars().take_while(|c| !c.is_whitespace()).collect();
            break url.trim_end_matches(['"', ',', ')']).to_owned();
        }
        assert!(Instant::now() < deadline, "no URL in the server's output");
    };
    std::thread::spawn(move || for _ in lines {});

    let mut chat = drover(dir.path())
        .args(["--server", &url, "chat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    let mut stdout = BufReader::new(chat.stdout.take().unwrap());
    stdin.write_all(b"first\n").unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("Echo: first still here"), "{line}");

    server.kill().unwrap();
    server.wait().unwrap();
    stdin.write_all(b"second\n").unwrap();
    drop(stdin);
    let status = chat.wait().unwrap();
    let mut err = String::new();
    chat.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("cannot reach the drover server"), "{err}");
    assert!(err.contains("the session is kept"), "{err}");
    assert!(err.contains("resume with: drover chat --session"), "{err}");
}
