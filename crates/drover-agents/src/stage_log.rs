//! The log of one stage attempt: a file on disk, appended to by the agent and by the
//! programs it runs. Logs live on disk, never in memory, so their size does not matter.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
pub struct StageLog {
    path: PathBuf,
}

impl StageLog {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. A log that cannot be written is reported in the server's own
    /// log but does not fail the stage.
    pub async fn line(&self, text: impl AsRef<str>) {
        if let Err(err) = self.append(text.as_ref()).await {
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
