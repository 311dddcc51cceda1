//! Opening the SQLite store: one file under the data directory, WAL journal, migrations
//! under `migrations/sqlite` applied on open.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::Mutex;

use crate::sql::{Db, Pool, SqlStore};
use crate::{SqliteStore, StoreError, StoreResult};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Connection settings for [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteStoreOptions {
    /// `sqlite://PATH`.
    pub url: String,
    pub read_connections: u32,
    pub busy_timeout: Duration,
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub async fn open(options: &SqliteStoreOptions) -> StoreResult<Self> {
        let open_error = |message: String| StoreError::Open { url: options.url.clone(), message };
        let path = options
            .url
            .strip_prefix("sqlite://")
            .ok_or_else(|| open_error("expected a sqlite:// URL".to_owned()))?;
        if let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|err| open_error(format!("cannot create {}: {err}", parent.display())))?;
        }
        let connect = SqliteConnectOptions::from_str(&options.url)
            .map_err(|err| open_error(err.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let mut writer = SqliteConnection::connect_with(&connect)
            .await
            .map_err(|err| open_error(err.to_string()))?;
        crate::open::check_schema(&mut Db::Sqlite(&mut writer), &MIGRATOR).await?;
        MIGRATOR
            .run(&mut writer)
            .await
            .map_err(|err| crate::open::migrate_error(err, &MIGRATOR))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .connect_with(connect.read_only(true))
            .await
            .map_err(|err| open_error(err.to_string()))?;
        Ok(SqlStore::new(Pool::Sqlite { writer: Arc::new(Mutex::new(writer)), reader }))
    }
}
