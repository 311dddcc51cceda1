//! What an attempt did to its workspace, counted: the files it created, changed or deleted
//! and the lines it added and removed, for the stage's summary ([`crate::summary`]), and
//! its diff, kept beside the log as `<stage>.<attempt>.diff`.
//!
//! A git work tree is compared through git ([`crate::artifacts`]: a private index, so the
//! user's is never touched). A plain directory is compared with a snapshot taken here
//! before the attempt: every file's size and modification time, and the contents of the
//! smaller ones, within fixed bounds (files listed, bytes kept per file and in all), so a
//! huge workspace costs a bounded amount of memory; what falls outside is still reported
//! as changed, without its line counts, and the summary says it is partial.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use drover_domain::Redactor;
use serde::Serialize;

use crate::artifacts::Snapshot;

/// Files a plain-directory snapshot lists at most.
const MAX_FILES: usize = 5_000;
/// A file larger than this has no contents kept (nor lines counted).
const MAX_FILE_BYTES: u64 = 512 * 1024;
/// Bytes of contents a snapshot keeps in all.
const MAX_KEPT_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes of diff written for a plain directory at most.
const MAX_DIFF_BYTES: usize = 4 * 1024 * 1024;
/// Time one file's line diff may take before it settles for a coarser answer.
const DIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// How a file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
}

/// One changed file. Line counts are absent for a binary file or one too large to count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FileChange {
    pub path: String,
    pub change: Change,
    pub added: Option<u64>,
    pub removed: Option<u64>,
}

/// Everything an attempt changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Sorted by path.
    pub files: Vec<FileChange>,
    /// False when a bound was reached: some files may be missing or uncounted.
    pub complete: bool,
}

impl Changes {
    pub(crate) fn lines_added(&self) -> u64 {
        self.files.iter().filter_map(|f| f.added).sum()
    }

    pub(crate) fn lines_removed(&self) -> u64 {
        self.files.iter().filter_map(|f| f.removed).sum()
    }
}

/// The workspace before an attempt.
pub(crate) enum Before {
    Git(Snapshot),
    Plain(PlainSnapshot),
}

impl Before {
    /// A git snapshot for a git work tree, a bounded one of the files otherwise; `None` if
    /// the workspace cannot be read (it may not exist yet: then everything is new).
    pub(crate) async fn take(workspace: &Path, log: &Path) -> Option<Self> {
        if let Some(snapshot) = Snapshot::take(workspace, log).await {
            return Some(Self::Git(snapshot));
        }
        let root = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || PlainSnapshot::take(&root)).await.ok().map(Self::Plain)
    }

    /// What changed since, with the diff written to `diff_out` (when anything changed)
    /// with `redact`'s values replaced. `None` if it cannot be told.
    pub(crate) async fn finish(self, diff_out: &Path, redact: &Redactor) -> Option<Changes> {
        match self {
            Self::Git(snapshot) => snapshot.finish(diff_out, redact).await,
            Self::Plain(snapshot) => {
                let (changes, diff) =
                    tokio::task::spawn_blocking(move || snapshot.compare()).await.ok()?;
                if !diff.is_empty() {
                    let _ = tokio::fs::write(diff_out, redact.redact(&diff).as_bytes()).await;
                }
                Some(changes)
            }
        }
    }
}

struct Kept {
    len: u64,
    modified: Option<SystemTime>,
    /// The contents, if the file was small enough and the budget not spent.
    contents: Option<Vec<u8>>,
}

/// A plain directory's files before an attempt.
pub(crate) struct PlainSnapshot {
    root: PathBuf,
    files: BTreeMap<String, Kept>,
    complete: bool,
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut contents = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_FILE_BYTES + 1).read_to_end(&mut contents).ok()?;
    (contents.len() as u64 <= MAX_FILE_BYTES).then_some(contents)
}

/// The text of `contents`, unless it looks binary (a NUL early on) or is not UTF-8.
fn text(contents: &[u8]) -> Option<&str> {
    if contents.iter().take(8192).any(|&b| b == 0) {
        return None;
    }
    std::str::from_utf8(contents).ok()
}

impl PlainSnapshot {
    /// The files under `root` now (blocking).
    pub(crate) fn take(root: &Path) -> Self {
        let listed = crate::walk::files(root, MAX_FILES);
        let mut budget = MAX_KEPT_BYTES;
        let mut complete = !listed.truncated;
        let mut files = BTreeMap::new();
        for entry in listed.entries {
            let contents = if entry.len <= MAX_FILE_BYTES && entry.len <= budget {
                read_bounded(&root.join(&entry.path))
            } else {
                None
            };
            match &contents {
                Some(kept) => budget -= kept.len() as u64,
                None => complete = false,
            }
            files.insert(entry.path, Kept { len: entry.len, modified: entry.modified, contents });
        }
        Self { root: root.to_path_buf(), files, complete }
    }

    /// What changed since the snapshot, and its unified diff (blocking).
    fn compare(mut self) -> (Changes, String) {
        let listed = crate::walk::files(&self.root, MAX_FILES);
        let mut complete = self.complete && !listed.truncated;
        let mut changes = Vec::new();
        let mut diff = Diff::default();
        for entry in listed.entries {
            let before = self.files.remove(&entry.path);
            if let Some(kept) = &before
                && kept.len == entry.len
                && kept.modified == entry.modified
            {
                continue;
            }
            let after = read_bounded(&self.root.join(&entry.path));
            let old = before.as_ref().map(|kept| kept.contents.as_deref());
            let change = match old {
                None => Change::Added,
                Some(old) if old.is_some() && old == after.as_deref() => continue,
                Some(_) => Change::Modified,
            };
            let old_text = match old {
                None => Some(""),
                Some(old) => old.and_then(text),
            };
            let counted = match (old_text, after.as_deref().and_then(text)) {
                (Some(old), Some(new)) => Some(diff.file(&entry.path, change, old, new)),
                _ => None,
            };
            complete &= counted.is_some() || after.is_some();
            changes.push(FileChange {
                path: entry.path,
                change,
                added: counted.map(|(added, _)| added),
                removed: counted.map(|(_, removed)| removed),
            });
        }
        for (path, kept) in self.files {
            let counted = kept
                .contents
                .as_deref()
                .and_then(text)
                .map(|old| diff.file(&path, Change::Deleted, old, ""));
            changes.push(FileChange {
                path,
                change: Change::Deleted,
                added: counted.map(|(added, _)| added),
                removed: counted.map(|(_, removed)| removed),
            });
        }
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        (Changes { files: changes, complete }, diff.text)
    }
}

/// A unified diff being written, bounded.
#[derive(Default)]
struct Diff {
    text: String,
    truncated: bool,
}

impl Diff {
    /// Counts the lines `new` adds to and removes from `old` and appends the file's diff;
    /// returns (added, removed).
    fn file(&mut self, path: &str, change: Change, old: &str, new: &str) -> (u64, u64) {
        let diff = similar::TextDiff::configure().timeout(DIFF_TIMEOUT).diff_lines(old, new);
        let (mut added, mut removed) = (0, 0);
        for line in diff.iter_all_changes() {
            match line.tag() {
                similar::ChangeTag::Insert => added += 1,
                similar::ChangeTag::Delete => removed += 1,
                similar::ChangeTag::Equal => {}
            }
        }
        if !self.truncated {
            let (a, b) = match change {
                Change::Added => ("/dev/null".to_owned(), format!("b/{path}")),
                Change::Deleted => (format!("a/{path}"), "/dev/null".to_owned()),
                Change::Modified => (format!("a/{path}"), format!("b/{path}")),
            };
            let hunks = diff.unified_diff().context_radius(3).header(&a, &b).to_string();
            if self.text.len() + hunks.len() > MAX_DIFF_BYTES {
                self.truncated = true;
                self.text.push_str("… (diff truncated)\n");
            } else {
                self.text.push_str(&format!("diff a/{path} b/{path}\n{hunks}"));
                if !hunks.ends_with('\n') {
                    self.text.push('\n');
                }
            }
        }
        (added, removed)
    }
}

/// Parses `git diff-tree -r --no-renames --name-status -z` and `… --numstat -z` output.
pub(crate) fn from_git(name_status: &[u8], numstat: &[u8]) -> Changes {
    let mut counts = BTreeMap::new();
    for record in numstat.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let record = String::from_utf8_lossy(record);
        let mut fields = record.splitn(3, '\t');
        let (Some(added), Some(removed), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        counts.insert(path.to_owned(), (added.parse().ok(), removed.parse().ok()));
    }
    let mut files = Vec::new();
    let mut parts = name_status.split(|&b| b == 0).filter(|r| !r.is_empty());
    while let (Some(status), Some(path)) = (parts.next(), parts.next()) {
        let path = String::from_utf8_lossy(path).into_owned();
        let change = match status.first() {
            Some(b'A') => Change::Added,
            Some(b'D') => Change::Deleted,
            _ => Change::Modified,
        };
        let (added, removed) = counts.get(&path).copied().unwrap_or((None, None));
        files.push(FileChange { path, change, added, removed });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Changes { files, complete: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[tokio::test]
    async fn a_plain_directory_reports_files_and_lines_changed_and_keeps_a_diff() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "keep.txt", "same\n");
        write(&ws, "edit.py", "a = 1\nb = 2\nc = 3\n");
        write(&ws, "gone.md", "one\ntwo\n");
        write(&ws, "node_modules/dep/index.js", "x\n");
        let log = dir.path().join("scaffold.1.log");
        let before = Before::take(&ws, &log).await.unwrap();
        assert!(matches!(before, Before::Plain(_)));

        // Edits within the same second as the snapshot are seen (contents are compared).
        write(&ws, "edit.py", "a = 1\nb = 20\nc = 3\nd = 4\n");
        write(&ws, "src/new.py", "print('hi')\nprint('there')\n");
        std::fs::remove_file(ws.join("gone.md")).unwrap();
        write(&ws, "blob.bin", "\0\u{1}\u{2}");
        write(&ws, "node_modules/dep/index.js", "changed\n");
        let out = dir.path().join("scaffold.1.diff");
        let changes = before.finish(&out, &Redactor::default()).await.unwrap();

        let listed: Vec<(&str, Change, Option<u64>, Option<u64>)> =
            changes.files.iter().map(|f| (f.path.as_str(), f.change, f.added, f.removed)).collect();
        assert_eq!(
            listed,
            [
                ("blob.bin", Change::Added, None, None),
                ("edit.py", Change::Modified, Some(2), Some(1)),
                ("gone.md", Change::Deleted, Some(0), Some(2)),
                ("src/new.py", Change::Added, Some(2), Some(0)),
            ]
        );
        assert!(changes.complete);
        assert_eq!((changes.lines_added(), changes.lines_removed()), (4, 3));
        let diff = std::fs::read_to_string(&out).unwrap();
        assert!(diff.contains("+b = 20") && diff.contains("-b = 2"), "{diff}");
        assert!(diff.contains("+++ b/src/new.py") && diff.contains("--- /dev/null"), "{diff}");
        assert!(!diff.contains("keep.txt") && !diff.contains("node_modules"), "{diff}");
    }

    #[tokio::test]
    async fn nothing_changed_writes_no_diff_and_secrets_never_reach_it() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        write(&ws, "a.txt", "a\n");
        let out = dir.path().join("x.1.diff");
        let before = Before::take(&ws, &dir.path().join("x.1.log")).await.unwrap();
        let changes = before.finish(&out, &Redactor::default()).await.unwrap();
        assert!(changes.files.is_empty());
        assert!(!out.exists());

        let before = Before::take(&ws, &dir.path().join("x.1.log")).await.unwrap();
        write(&ws, "config.py", "TOKEN = 'tok-0123456789'\n");
        let mut secrets = drover_domain::SecretValues::default();
        secrets.insert("MY_TOKEN", "tok-0123456789");
        before.finish(&out, &Redactor::new(&secrets)).await.unwrap();
        let diff = std::fs::read_to_string(&out).unwrap();
        assert!(diff.contains("[redacted:MY_TOKEN]") && !diff.contains("tok-0123456789"), "{diff}");
    }

    #[tokio::test]
    async fn a_file_too_large_to_keep_is_reported_changed_without_line_counts() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        let big = "line\n".repeat(usize::try_from(MAX_FILE_BYTES).unwrap() / 5 + 10);
        write(&ws, "big.log", &big);
        let before = Before::take(&ws, &dir.path().join("x.1.log")).await.unwrap();
        write(&ws, "big.log", &format!("{big}more\n"));
        let changes =
            before.finish(&dir.path().join("x.1.diff"), &Redactor::default()).await.unwrap();
        assert_eq!(changes.files.len(), 1);
        assert_eq!(changes.files[0].change, Change::Modified);
        assert_eq!(changes.files[0].added, None);
        assert!(!changes.complete, "the count is partial");
    }

    #[test]
    fn git_name_status_and_numstat_are_read_together() {
        let name_status = b"A\0new.py\0M\0app.py\0D\0old.txt\0M\0logo.png\0";
        let numstat = b"3\t1\tapp.py\0-\t-\tlogo.png\x0010\t0\tnew.py\x000\t4\told.txt\0";
        let changes = from_git(name_status, numstat);
        let listed: Vec<(&str, Change, Option<u64>, Option<u64>)> =
            changes.files.iter().map(|f| (f.path.as_str(), f.change, f.added, f.removed)).collect();
        assert_eq!(
            listed,
            [
                ("app.py", Change::Modified, Some(3), Some(1)),
                ("logo.png", Change::Modified, None, None),
                ("new.py", Change::Added, Some(10), Some(0)),
                ("old.txt", Change::Deleted, Some(0), Some(4)),
            ]
        );
    }
}
