//! `drover secrets` as a user runs it, with no server (an embedded one on the data
//! directory): a value piped in is stored sealed and never printed, `ls` shows names,
//! `rotate-key` re-seals under a new key, `rm` deletes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");
const SECRET: &str = "tok-cli-0123456789";

fn drover(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(DROVER)
        .current_dir(dir)
        .args(args)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_DATA_DIR")
        .env_remove("DROVER_MASTER_KEY")
        .env_remove("DROVER_MASTER_KEY_OLD")
        .env_remove("RUST_LOG")
        .env("DROVER_SERVER__LISTEN", "127.0.0.1:1")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("drover runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(output: Output) -> String {
    let (out, err) =
        (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "drover failed:\nstdout: {out}\nstderr: {err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "the value was printed: {out}{err}");
    out.into_owned()
}

#[test]
fn secrets_are_set_from_stdin_listed_by_name_rotated_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    ok(drover(dir.path(), &["secrets", "set", "MY_TOKEN"], Some(&format!("{SECRET}\n"))));
    let listed: Value =
        serde_json::from_str(&ok(drover(dir.path(), &["--json", "secrets", "ls"], None))).unwrap();
    assert_eq!(listed["items"][0]["name"], "MY_TOKEN", "{listed}");

    let refused = drover(dir.path(), &["secrets", "set", "SHORT"], Some("tok-5"));
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("at least 8 characters") && !message.contains("tok-5"), "{message}");

    let key_file = dir.path().join(".drover/secrets/master.key");
    let old_key = std::fs::read_to_string(&key_file).unwrap();
    let rotated: Value =
        serde_json::from_str(&ok(drover(dir.path(), &["--json", "secrets", "rotate-key"], None)))
            .unwrap();
    assert_eq!(rotated["resealed"], 1, "{rotated}");
    assert_ne!(std::fs::read_to_string(&key_file).unwrap(), old_key);
    assert!(!dir.path().join(".drover/secrets/master.key.old").exists());

    ok(drover(dir.path(), &["secrets", "rm", "MY_TOKEN"], None));
    let out = ok(drover(dir.path(), &["secrets", "ls"], None));
    assert!(!out.contains("MY_TOKEN"), "{out}");
    let again = drover(dir.path(), &["secrets", "rm", "MY_TOKEN"], None);
    assert!(String::from_utf8_lossy(&again.stderr).contains("secret_not_found"));
}
