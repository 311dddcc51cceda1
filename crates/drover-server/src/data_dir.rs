//! Ownership of a data directory: an exclusive `flock` on `<data_dir>/drover.lock` held for
//! the server's lifetime (released by the kernel even on `kill -9`), and `server.json`,
//! which tells other drover commands where the owner listens.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::ServerError;

const LOCK_FILE: &str = "drover.lock";
const SERVER_FILE: &str = "server.json";

/// Where a running server can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub url: String,
    pub pid: u32,
    /// The routing proxy's address, when it runs.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Its HTTPS address, when it serves HTTPS.
    #[serde(default)]
    pub proxy_tls: Option<String>,
}

impl ServerInfo {
    /// What `server.json` in `data_dir` says, if it exists and parses. It may be stale:
    /// check the server answers before trusting it.
    pub fn read(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(data_dir.join(SERVER_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The exclusive claim on a data directory.
pub struct DataDirLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl DataDirLock {
    /// Creates the directory if needed and locks it, or says who holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, ServerError> {
        let failure = |message: String| ServerError::DataDir {
            path: data_dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(data_dir).map_err(|err| failure(err.to_string()))?;
        let path = std::path::absolute(data_dir).map_err(|err| failure(err.to_string()))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(|err| failure(err.to_string()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                ServerError::DataDirInUse {
                    path: path.display().to_string(),
                    server: ServerInfo::read(&path),
                }
            } else {
                failure(format!("cannot lock it: {errno}"))
            }
        })?;
        Ok(Self { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records where this server listens.
    pub fn publish(&self, info: &ServerInfo) -> Result<(), ServerError> {
        let text = serde_json::to_string_pretty(info).unwrap_or_default();
        let temp = self.path.join(format!("{SERVER_FILE}.tmp"));
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::rename(&temp, self.path.join(SERVER_FILE)))
            .map_err(|err| ServerError::DataDir {
                path: self.path.display().to_string(),
                message: format!("cannot write {SERVER_FILE}: {err}"),
            })
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path.join(SERVER_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_names_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        first
            .publish(&ServerInfo {
                url: "http://127.0.0.1:1".into(),
                pid: 42,
                proxy: None,
                proxy_tls: None,
            })
            .unwrap();
        let Err(err) = DataDirLock::acquire(dir.path()) else { panic!("locked twice") };
        assert!(err.to_string().contains("pid 42"), "{err}");
        drop(first);
        assert!(ServerInfo::read(dir.path()).is_none(), "server.json outlived its server");
        DataDirLock::acquire(dir.path()).expect("free again");
    }
}
