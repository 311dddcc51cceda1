//! A bounded walk of a workspace's own files, shared by project detection and the
//! before/after snapshot of a plain-directory workspace. It skips what tools generate or
//! keep for themselves (hidden directories such as `.git` or `.pytest_cache`,
//! `node_modules`, `__pycache__`, `target`, `venv`), never follows a symbolic link, and
//! stops after a number of files, saying so.

use std::path::Path;
use std::time::SystemTime;

/// Directories below the workspace whose files are not the project's own.
pub(crate) fn generated_dir(name: &str) -> bool {
    name.starts_with('.') || matches!(name, "node_modules" | "__pycache__" | "target" | "venv")
}

/// How deep below the workspace files are looked for.
const MAX_DEPTH: usize = 12;

/// One regular file of the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileEntry {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

/// The workspace's files, sorted by path.
#[derive(Debug, Clone, Default)]
pub(crate) struct Files {
    pub entries: Vec<FileEntry>,
    /// More files than `max_files` were there; the rest were not looked at.
    pub truncated: bool,
}

/// The regular files under `root` (at most `max_files`), generated directories skipped.
/// A directory that cannot be read is passed over.
pub(crate) fn files(root: &Path, max_files: usize) -> Files {
    let mut found = Files::default();
    let walk = walkdir::WalkDir::new(root)
        .max_depth(MAX_DEPTH)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| {
            entry.depth() == 0
                || !(entry.file_type().is_dir()
                    && generated_dir(&entry.file_name().to_string_lossy()))
        });
    for entry in walk.filter_map(Result::ok) {
        if !entry.file_type().is_file() {
            continue;
        }
        if found.entries.len() == max_files {
            found.truncated = true;
            break;
        }
        let Ok(relative) = entry.path().strip_prefix(root) else { continue };
        let path = relative
            .components()
            .map(|part| part.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let metadata = entry.metadata().ok();
        found.entries.push(FileEntry {
            path,
            len: metadata.as_ref().map_or(0, std::fs::Metadata::len),
            modified: metadata.and_then(|m| m.modified().ok()),
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_lists_the_projects_files_and_skips_generated_ones() {
        let dir = tempfile::tempdir().unwrap();
        for path in [
            "app.py",
            "src/lib/util.js",
            ".git/HEAD",
            "node_modules/x/index.js",
            "a/__pycache__/m.pyc",
            "target/debug/app",
        ] {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x\n").unwrap();
        }
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        let listed = files(dir.path(), 100);
        let paths: Vec<&str> = listed.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["app.py", "src/lib/util.js"]);
        assert!(!listed.truncated);
        assert_eq!(listed.entries[0].len, 2);

        let bounded = files(dir.path(), 1);
        assert_eq!(bounded.entries.len(), 1);
        assert!(bounded.truncated);
    }
}
