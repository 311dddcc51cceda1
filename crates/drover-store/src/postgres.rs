//! Opening the PostgreSQL store: a pool of connections to a database several servers may
//! share, migrations under `migrations/postgres` applied on open (sqlx takes an advisory
//! lock for them, so servers starting together migrate once).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::Mutex;

use crate::sql::{Db, Pool, SqlStore};
use crate::{PostgresStore, StoreError, StoreResult};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connection settings for [`PostgresStore::open`].
#[derive(Debug, Clone)]
pub struct PostgresStoreOptions {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=…]`.
    pub url: String,
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long an operation waits for a free connection before failing.
    pub acquire_timeout: Duration,
}

impl PostgresStore {
    /// Connects and applies pending migrations.
    pub async fn open(options: &PostgresStoreOptions) -> StoreResult<Self> {
        let open_error =
            |message: String| StoreError::Open { url: redacted(&options.url), message };
        let connect = PgConnectOptions::from_str(&options.url)
            .map_err(|err| open_error(err.to_string()))?
            .application_name("drover");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|err| open_error(err.to_string()))?;
        let mut conn = pool.acquire().await.map_err(|err| open_error(err.to_string()))?;
        crate::open::check_schema(&mut Db::Postgres(&mut conn), &MIGRATOR).await?;
        MIGRATOR.run(&mut *conn).await.map_err(|err| crate::open::migrate_error(err, &MIGRATOR))?;
        drop(conn);
        Ok(SqlStore::new(Pool::Postgres { pool, publishing: Arc::new(Mutex::new(())) }))
    }
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) => {
            let credentials = &rest[..at - scheme.len() - 3];
            let user = credentials.split_once(':').map_or(credentials, |(user, _)| user);
            format!("{scheme}://{user}@{}", &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
