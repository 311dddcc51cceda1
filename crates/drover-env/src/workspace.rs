//! Workspaces: a plain directory, or a git worktree of a project repository on its own
//! branch, prepared by a setup hook (files copied in, an install command) and removed on
//! delete — but never silently when it holds work that exists nowhere else.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::{CommandSpec, run_command};

async fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .await
        .map_err(|err| format!("cannot run git: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `git worktree add -b BRANCH PATH [BASE]` in `repo`.
pub async fn add_worktree(
    repo: &Path,
    path: &Path,
    branch: &str,
    base: Option<&str>,
) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|e| e.to_string())?;
    }
    let path_text = path.display().to_string();
    let mut args = vec!["worktree", "add", "-b", branch, path_text.as_str()];
    if let Some(base) = base {
        args.push(base);
    }
    git(repo, &args).await.map(|_| ())
}

/// Copies files the repository keeps out of git (`.env`, ...) into the worktree.
pub async fn copy_files(repo: &Path, worktree: &Path, files: &[String]) -> Result<(), String> {
    for file in files {
        let from = repo.join(file);
        if !from.exists() {
            continue;
        }
        let to = worktree.join(file);
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| e.to_string())?;
        }
        tokio::fs::copy(&from, &to).await.map_err(|err| format!("cannot copy {file}: {err}"))?;
    }
    Ok(())
}

/// Runs the setup command (through `sh -c`) in the workspace, logging to `log`.
pub async fn run_setup(workspace: &Path, command: &str, log: &Path) -> Result<(), String> {
    if command.trim().is_empty() {
        return Ok(());
    }
    let spec = CommandSpec {
        program: "sh".to_owned(),
        args: vec!["-c".to_owned(), command.to_owned()],
        cwd: workspace.to_path_buf(),
        env: Vec::new(),
        log_path: log.to_path_buf(),
    };
    let output = run_command(&spec, &CancellationToken::new(), Some(Duration::from_secs(1800)))
        .await
        .map_err(|err| format!("setup command failed: {err}"))?;
    if output.success() {
        Ok(())
    } else {
        Err(format!(
            "setup command `{command}` failed ({}): {}",
            output.status,
            output.output_tail.trim()
        ))
    }
}

/// Why deleting this worktree would lose work, if it would: uncommitted changes (other
/// than the files the setup hook copied in, `copied`), or commits on its branch that no
/// other branch contains.
pub async fn unmerged_work(
    repo: &Path,
    worktree: &Path,
    branch: &str,
    copied: &[String],
) -> Option<String> {
    if worktree.exists()
        && let Ok(status) = git(worktree, &["status", "--porcelain"]).await
    {
        let changed = status
            .lines()
            .filter(|line| {
                !(line.starts_with("?? ") && copied.iter().any(|c| line[3..].trim() == c))
            })
            .count();
        if changed > 0 {
            return Some(format!("the worktree has {changed} uncommitted change(s)"));
        }
    }
    let others: Vec<String> = git(repo, &["for-each-ref", "--format=%(refname)", "refs/heads"])
        .await
        .ok()?
        .lines()
        .filter(|r| *r != format!("refs/heads/{branch}"))
        .map(|r| format!("^{r}"))
        .collect();
    let mut args = vec!["rev-list", "--count", branch];
    args.extend(others.iter().map(String::as_str));
    let unique: u32 = git(repo, &args).await.ok()?.parse().ok()?;
    (unique > 0)
        .then(|| format!("branch {branch} has {unique} commit(s) not merged into any other branch"))
}

/// Removes the worktree and its branch.
pub async fn remove_worktree(repo: &Path, worktree: &Path, force: bool) -> Result<(), String> {
    let path = worktree.display().to_string();
    let branch = git(worktree, &["rev-parse", "--abbrev-ref", "HEAD"]).await.ok();
    let mut args = vec!["worktree", "remove", path.as_str()];
    if force {
        args.push("--force");
    }
    let removed = git(repo, &args).await;
    if removed.is_err() && worktree.exists() {
        let _ = tokio::fs::remove_dir_all(worktree).await;
        let _ = git(repo, &["worktree", "prune"]).await;
    }
    if let Some(branch) = branch.filter(|b| b.starts_with("drover/")) {
        let _ = git(repo, &["branch", "-D", &branch]).await;
    }
    Ok(())
}
