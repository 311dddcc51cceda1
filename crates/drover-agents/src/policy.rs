//! Stage policy as the worker enforces it, and the files a stage declares as its outputs.
//!
//! A stage's `policy.protected_paths` are globs of workspace paths its agent must not
//! create, change or delete. Whatever the agent is (a coding CLI drover cannot look
//! inside), the worker records the matching files (size, modification time) before the
//! attempt and compares after it: any difference fails the stage, naming the path and the
//! rule. `policy.allowed_commands` is checked where commands are started (the command
//! agent's program, an `llm` agent's proposed commands) with [`command_refusal`].
//!
//! Declared `outputs` are copied after the attempt into `<stage>.<n>.outputs/` beside its
//! log, so they survive the workspace and are served as artifacts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use drover_domain::{Redactor, StagePolicy};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Files looked at per workspace walk, at most (a guard against a huge tree).
const MAX_WALK_ENTRIES: usize = 200_000;
/// Declared output files copied per attempt, at most.
const MAX_OUTPUT_FILES: usize = 1_000;

/// Why `program` may not run under `policy`, if it may not. `program` is what the agent
/// would execute (name or path).
pub fn command_refusal(policy: &StagePolicy, stage: &str, program: &str) -> Option<String> {
    if policy.allowed_commands.is_empty() || policy.allows_command(program) {
        return None;
    }
    Some(format!(
        "policy violation: stage `{stage}` may not run `{program}` (policy.allowed_commands = [{}])",
        policy.allowed_commands.join(", ")
    ))
}

/// A workspace glob: `*` and `?` stay within one path component, `**` crosses them.
fn glob(pattern: &str) -> Option<Glob> {
    GlobBuilder::new(pattern).literal_separator(true).build().ok()
}

fn glob_set(patterns: &[String]) -> Option<(GlobSet, Vec<String>)> {
    let mut builder = GlobSetBuilder::new();
    let mut kept = Vec::new();
    for pattern in patterns {
        // Validated at config load; a pattern that still fails to build is skipped.
        if let Some(glob) = glob(pattern) {
            builder.add(glob);
            kept.push(pattern.clone());
        }
    }
    Some((builder.build().ok()?, kept))
}

type Fingerprint = (u64, Option<SystemTime>);

/// The protected files of a workspace before an attempt.
pub(crate) struct ProtectedFiles {
    workspace: PathBuf,
    globs: GlobSet,
    patterns: Vec<String>,
    before: BTreeMap<String, Fingerprint>,
}

impl ProtectedFiles {
    /// Records the files matching `policy.protected_paths` (none: nothing to watch).
    pub(crate) async fn take(workspace: &Path, policy: &StagePolicy) -> Option<Self> {
        if policy.protected_paths.is_empty() {
            return None;
        }
        let (globs, patterns) = glob_set(&policy.protected_paths)?;
        let workspace = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let before = matching_files(&workspace, &globs);
            Self { workspace, globs, patterns, before }
        })
        .await
        .ok()
    }

    /// The first protected path the attempt created, changed or deleted, as a message
    /// naming it and the rule; `None` if none was touched.
    pub(crate) async fn violation(self, stage: &str) -> Option<String> {
        let stage = stage.to_owned();
        tokio::task::spawn_blocking(move || {
            let after = matching_files(&self.workspace, &self.globs);
            let changed = self
                .before
                .iter()
                .find_map(|(path, old)| match after.get(path) {
                    None => Some((path.clone(), "deleted")),
                    Some(new) if new != old => Some((path.clone(), "modified")),
                    Some(_) => None,
                })
                .or_else(|| {
                    after
                        .keys()
                        .find(|p| !self.before.contains_key(*p))
                        .map(|p| (p.clone(), "created"))
                })?;
            let (path, how) = changed;
            let rule = self
                .patterns
                .iter()
                .find(|pattern| glob(pattern).is_some_and(|g| g.compile_matcher().is_match(&path)))
                .cloned()
                .unwrap_or_default();
            Some(format!(
                "policy violation: stage `{stage}` {how} `{path}`, which policy.protected_paths \
                 protects (rule `{rule}`)"
            ))
        })
        .await
        .ok()
        .flatten()
    }
}

/// Workspace files (relative paths, `/`-separated) matching `globs`, with their size and
/// modification time. `.git` is not walked.
fn matching_files(workspace: &Path, globs: &GlobSet) -> BTreeMap<String, Fingerprint> {
    let mut found = BTreeMap::new();
    walk(workspace, &mut |relative, metadata| {
        if globs.is_match(relative) {
            found.insert(relative.to_owned(), (metadata.len(), metadata.modified().ok()));
        }
    });
    found
}

/// Calls `visit` with every regular file under `root` (relative path), skipping `.git`,
/// not following symbolic links, stopping after [`MAX_WALK_ENTRIES`].
fn walk(root: &Path, visit: &mut dyn FnMut(&str, &std::fs::Metadata)) {
    let mut todo = vec![PathBuf::new()];
    let mut seen = 0usize;
    while let Some(relative) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&relative)) else { continue };
        for entry in entries.flatten() {
            seen += 1;
            if seen > MAX_WALK_ENTRIES {
                return;
            }
            let name = entry.file_name();
            if relative.as_os_str().is_empty() && name == ".git" {
                continue;
            }
            let path = relative.join(&name);
            let Ok(metadata) = entry.path().symlink_metadata() else { continue };
            if metadata.is_dir() {
                todo.push(path);
            } else if let Some(text) = path.to_str() {
                visit(text, &metadata);
            }
        }
    }
}

/// Copies the workspace files matching `patterns` into `dest` (keeping their relative
/// paths), with `redact`'s values replaced; returns how many were copied.
pub(crate) async fn collect_outputs(
    workspace: &Path,
    patterns: &[String],
    dest: PathBuf,
    redact: &Redactor,
) -> usize {
    if patterns.is_empty() {
        return 0;
    }
    let Some((globs, _)) = glob_set(patterns) else { return 0 };
    let workspace = workspace.to_path_buf();
    let redact = redact.clone();
    tokio::task::spawn_blocking(move || {
        let mut copied = 0usize;
        walk(&workspace, &mut |relative, metadata| {
            if copied >= MAX_OUTPUT_FILES || !metadata.is_file() || !globs.is_match(relative) {
                return;
            }
            let target = dest.join(relative);
            let done = target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| copy_redacted(&workspace.join(relative), &target, &redact));
            match done {
                Ok(_) => copied += 1,
                Err(err) => tracing::warn!(file = relative, error = %err, "output file not kept"),
            }
        });
        copied
    })
    .await
    .unwrap_or(0)
}

/// Copies `from` to `to`, streaming it through `redact` (a plain copy when there is
/// nothing to redact). Blocking.
fn copy_redacted(from: &Path, to: &Path, redact: &Redactor) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    if redact.is_empty() {
        return std::fs::copy(from, to);
    }
    let mut input = std::fs::File::open(from)?;
    let mut output = std::io::BufWriter::new(std::fs::File::create(to)?);
    let mut stream = redact.stream();
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut written = 0;
    loop {
        let read = input.read(&mut buffer)?;
        let released = if read == 0 { stream.finish() } else { stream.push(&buffer[..read]) };
        output.write_all(&released)?;
        written += released.len() as u64;
        if read == 0 {
            break;
        }
    }
    output.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(protected: &[&str]) -> StagePolicy {
        StagePolicy {
            allowed_commands: vec![],
            protected_paths: protected.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[tokio::test]
    async fn touching_a_protected_file_names_the_path_and_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
        std::fs::write(dir.path().join("migrations/001.sql"), "create table t;").unwrap();
        std::fs::write(dir.path().join("app.py"), "print(1)").unwrap();
        let rules = policy(&["migrations/**", ".env"]);

        let watch = ProtectedFiles::take(dir.path(), &rules).await.unwrap();
        std::fs::write(dir.path().join("app.py"), "print(2)").unwrap();
        assert_eq!(watch.violation("build").await, None, "unprotected files are free");

        let watch = ProtectedFiles::take(dir.path(), &rules).await.unwrap();
        std::fs::write(dir.path().join("migrations/001.sql"), "drop table t;").unwrap();
        let message = watch.violation("build").await.unwrap();
        assert!(message.contains("modified `migrations/001.sql`"), "{message}");
        assert!(message.contains("rule `migrations/**`"), "{message}");

        let watch = ProtectedFiles::take(dir.path(), &rules).await.unwrap();
        std::fs::write(dir.path().join(".env"), "SECRET=1").unwrap();
        assert!(watch.violation("build").await.unwrap().contains("created `.env`"));

        let watch = ProtectedFiles::take(dir.path(), &rules).await.unwrap();
        std::fs::remove_file(dir.path().join("migrations/001.sql")).unwrap();
        assert!(watch.violation("build").await.unwrap().contains("deleted"));
    }

    #[tokio::test]
    async fn declared_outputs_are_copied_with_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("reports")).unwrap();
        std::fs::write(dir.path().join("reports/junit.xml"), "<testsuite/>").unwrap();
        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        let dest = dir.path().join("out");
        std::fs::write(dir.path().join("reports/token.txt"), "t=tok-0123456789\n").unwrap();
        let mut secrets = drover_domain::SecretValues::default();
        secrets.insert("MY_TOKEN", "tok-0123456789");
        let patterns = ["reports/*.xml".to_owned(), "reports/*.txt".to_owned()];
        let copied =
            collect_outputs(dir.path(), &patterns, dest.clone(), &Redactor::new(&secrets)).await;
        assert_eq!(copied, 2);
        assert_eq!(
            std::fs::read_to_string(dest.join("reports/junit.xml")).unwrap(),
            "<testsuite/>"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("reports/token.txt")).unwrap(),
            "t=[redacted:MY_TOKEN]\n"
        );
    }

    #[test]
    fn commands_outside_the_allowed_list_are_refused_by_name() {
        let rules = StagePolicy { allowed_commands: vec!["cargo".into()], protected_paths: vec![] };
        assert_eq!(command_refusal(&rules, "build", "cargo"), None);
        let refusal = command_refusal(&rules, "build", "rm").unwrap();
        assert!(refusal.contains("may not run `rm`") && refusal.contains("[cargo]"), "{refusal}");
        assert_eq!(command_refusal(&StagePolicy::default(), "build", "rm"), None);
    }
}
