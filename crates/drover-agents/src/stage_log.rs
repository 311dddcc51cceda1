//! The log of one stage attempt: a file on disk, appended to by the agent and by the
//! programs it runs. Logs live on disk, never in memory, so their size does not matter.
//! The log carries the attempt's [`Redactor`]: every line written through it, and the
//! output of every program an agent runs into it, has the project's secret values
//! replaced first.

use std::path::{Path, PathBuf};

use drover_domain::Redactor;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
pub struct StageLog {
    path: PathBuf,
    redactor: Redactor,
}

impl StageLog {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), redactor: Redactor::default() }
    }

    /// The same log, with `redactor`'s values replaced in everything written to it.
    #[must_use]
    pub fn redacting(mut self, redactor: Redactor) -> Self {
        self.redactor = redactor;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What must not appear in the log (nor anywhere else the attempt leaves).
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Appends one line. A log that cannot be written is reported in the server's own
    /// log but does not fail the stage.
    pub async fn line(&self, text: impl AsRef<str>) {
        if let Err(err) = self.append(&self.redactor.redact(text.as_ref())).await {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot write stage log");
        }
    }

    async fn append(&self, text: &str) -> std::io::Result<()> {
        if let Some(parent) = self.path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut file =
            tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await?;
        file.write_all(text.as_bytes()).await?;
        if !text.ends_with('\n') {
            file.write_all(b"\n").await?;
        }
        Ok(())
    }
}
