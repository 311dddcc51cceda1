//! The data directory's layout. One place decides where a run's files live.
//!
//! ```text
//! <data_dir>/drover.db                       the SQLite store
//! <data_dir>/runs/<run_id>/workspace/        the project the agents build
//! <data_dir>/runs/<run_id>/logs/<stage>.<attempt>.log
//! <data_dir>/runs/<run_id>/logs/app.log      the deployed app's output
//! ```

use std::path::{Path, PathBuf};

use drover_domain::{RunId, StageName};

#[derive(Debug, Clone)]
pub struct Layout {
    data_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self { data_dir: data_dir.into() }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn run_dir(&self, run: RunId) -> PathBuf {
        self.data_dir.join("runs").join(run.to_string())
    }

    pub fn workspace(&self, run: RunId) -> PathBuf {
        self.run_dir(run).join("workspace")
    }

    pub fn logs_dir(&self, run: RunId) -> PathBuf {
        self.run_dir(run).join("logs")
    }

    pub fn attempt_log(&self, run: RunId, stage: &StageName, attempt: u32) -> PathBuf {
        self.logs_dir(run).join(format!("{stage}.{attempt}.log"))
    }

    pub fn app_log(&self, run: RunId) -> PathBuf {
        self.logs_dir(run).join("app.log")
    }
}

/// The stable hostname of a run's deployed app behind the proxy:
/// `app.run-<last 8 hex digits of the run id>.localhost`. The tail of a UUIDv7 is random,
/// unlike its head (a timestamp), so runs created together still get distinct names.
pub fn app_hostname(run: RunId) -> String {
    let simple = run.as_uuid().simple().to_string();
    format!("app.run-{}.localhost", &simple[simple.len() - 8..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_hostnames_differ_for_runs_created_in_the_same_millisecond() {
        let (a, b) = (RunId::new(), RunId::new());
        assert_ne!(app_hostname(a), app_hostname(b));
        assert!(app_hostname(a).starts_with("app.run-") && app_hostname(a).ends_with(".localhost"));
    }
}
