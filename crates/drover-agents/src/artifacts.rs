//! What a stage attempt produced besides its result: for a workspace that is a git work
//! tree, the diff the attempt made, kept beside its log as `<stage>.<attempt>.diff`, and
//! what it changed file by file (for the stage's summary, [`crate::changes`]).
//!
//! The workspace is snapshotted as a git tree before and after the attempt through a
//! private index file, so the user's index, branch and stash are never touched, and
//! ignored files stay out of it.

use std::path::{Path, PathBuf};

use drover_domain::Redactor;
use tokio::process::Command;

use crate::changes::Changes;

/// A workspace's content as a git tree, taken before an attempt.
pub(crate) struct Snapshot {
    workspace: PathBuf,
    index: PathBuf,
    tree: String,
}

impl Snapshot {
    /// The workspace's tree now, if it is a git work tree (else `None`: no diff kept).
    pub(crate) async fn take(workspace: &Path, log: &Path) -> Option<Self> {
        if !workspace.join(".git").exists() {
            return None;
        }
        // Outside the work tree, so the snapshot never holds its own index.
        let index = std::env::temp_dir().join(format!("drover-{}.index", private_name(log)));
        let tree = write_tree(workspace, &index).await?;
        Some(Self { workspace: workspace.to_path_buf(), index, tree })
    }

    /// Writes what changed since the snapshot to `out` (nothing if nothing changed), with
    /// `redact`'s values replaced, and says what changed, file by file (`None` if git
    /// could not tell).
    pub(crate) async fn finish(self, out: &Path, redact: &Redactor) -> Option<Changes> {
        let changes = async {
            let after = write_tree(&self.workspace, &self.index).await?;
            if after == self.tree {
                return Some(Changes { files: Vec::new(), complete: true });
            }
            let diff_tree = |format: &'static str| {
                let mut command = git(&self.workspace, &self.index);
                command.args(["diff-tree", "-r", "--no-renames", format, "-z", &self.tree, &after]);
                command
            };
            let output = git(&self.workspace, &self.index)
                .args(["diff-tree", "-p", "--binary", &self.tree, &after])
                .output()
                .await
                .ok()?;
            if output.status.success() && !output.stdout.is_empty() {
                let _ = tokio::fs::write(out, redact.redact_bytes(&output.stdout)).await;
            }
            let name_status = diff_tree("--name-status").output().await.ok()?;
            let numstat = diff_tree("--numstat").output().await.ok()?;
            (name_status.status.success() && numstat.status.success())
                .then(|| crate::changes::from_git(&name_status.stdout, &numstat.stdout))
        }
        .await;
        let _ = tokio::fs::remove_file(&self.index).await;
        changes
    }
}

/// A name unique to this attempt's log (and this process).
fn private_name(log: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    log.hash(&mut hasher);
    format!("{}-{:016x}", std::process::id(), hasher.finish())
}

fn git(workspace: &Path, index: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(workspace)
        .env("GIT_INDEX_FILE", index)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// `git add -A` into the private index, then `git write-tree`.
async fn write_tree(workspace: &Path, index: &Path) -> Option<String> {
    let added = git(workspace, index).args(["add", "-A", "."]).output().await.ok()?;
    if !added.status.success() {
        tracing::debug!(stderr = %String::from_utf8_lossy(&added.stderr), "git add failed; no diff kept");
        return None;
    }
    let tree = git(workspace, index).arg("write-tree").output().await.ok()?;
    tree.status.success().then(|| String::from_utf8_lossy(&tree.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    #[tokio::test]
    async fn the_diff_holds_what_the_attempt_changed_and_the_index_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        run(&ws, &["init", "-q"]);
        std::fs::write(ws.join("a.txt"), "one\n").unwrap();
        std::fs::write(ws.join(".gitignore"), "secret.env\n").unwrap();
        run(&ws, &["add", "."]);
        run(&ws, &["commit", "-qm", "start"]);
        std::fs::write(ws.join("before.txt"), "made before the attempt\n").unwrap();

        let log = dir.path().join("scaffold.1.log");
        let snapshot = Snapshot::take(&ws, &log).await.expect("a git work tree");
        std::fs::write(ws.join("a.txt"), "one\ntwo\n").unwrap();
        std::fs::write(ws.join("new.txt"), "new\n").unwrap();
        std::fs::write(ws.join("secret.env"), "KEY=1\n").unwrap();
        let out = dir.path().join("scaffold.1.diff");
        let changes = snapshot.finish(&out, &Redactor::default()).await.unwrap();
        let changed: Vec<(&str, Option<u64>)> =
            changes.files.iter().map(|f| (f.path.as_str(), f.added)).collect();
        assert_eq!(
            changed,
            [("a.txt", Some(1)), ("new.txt", Some(1))],
            "before.txt was there before"
        );

        let diff = std::fs::read_to_string(&out).unwrap();
        assert!(diff.contains("+two"), "{diff}");
        assert!(diff.contains("new.txt"), "{diff}");
        assert!(!diff.contains("before.txt"), "changes from before the attempt: {diff}");
        assert!(!diff.contains("secret.env"), "ignored files: {diff}");
        let index = std::env::temp_dir().join(format!("drover-{}.index", private_name(&log)));
        assert!(!index.exists(), "the private index is removed");
        // The user's own index still has nothing staged.
        let staged = std::process::Command::new("git")
            .current_dir(&ws)
            .args(["diff", "--cached", "--name-only"])
            .output()
            .unwrap();
        assert!(staged.stdout.is_empty(), "{}", String::from_utf8_lossy(&staged.stdout));
    }

    #[tokio::test]
    async fn secret_values_written_into_the_workspace_are_redacted_from_the_diff() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        run(&ws, &["init", "-q"]);
        let log = dir.path().join("code.1.log");
        let snapshot = Snapshot::take(&ws, &log).await.unwrap();
        std::fs::write(ws.join("config.py"), "TOKEN = 'tok-0123456789'\n").unwrap();
        let mut secrets = drover_domain::SecretValues::default();
        secrets.insert("MY_TOKEN", "tok-0123456789");
        let out = dir.path().join("code.1.diff");
        assert_eq!(snapshot.finish(&out, &Redactor::new(&secrets)).await.unwrap().files.len(), 1);
        let diff = std::fs::read_to_string(&out).unwrap();
        assert!(diff.contains("+TOKEN = '[redacted:MY_TOKEN]'"), "{diff}");
        assert!(!diff.contains("tok-0123456789"), "{diff}");
    }

    #[tokio::test]
    async fn a_plain_directory_or_no_change_keeps_no_diff() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Snapshot::take(dir.path(), &dir.path().join("x.1.log")).await.is_none());
        run(dir.path(), &["init", "-q"]);
        let snapshot = Snapshot::take(dir.path(), &dir.path().join("x.1.log")).await.unwrap();
        let changes = snapshot.finish(&dir.path().join("x.1.diff"), &Redactor::default()).await;
        assert_eq!(changes, Some(Changes { files: Vec::new(), complete: true }));
        assert!(!dir.path().join("x.1.diff").exists());
    }
}
