//! Opening a store: by URL ([`open`]), and the migration step both databases share.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};

use crate::sql::{Db, sql};
use crate::{AnyStore, PostgresStore, PostgresStoreOptions, SqliteStore, SqliteStoreOptions};
use crate::{StoreError, StoreResult};

/// Where the store is and how to reach it, for [`open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://PATH` (or a bare path) for SQLite; `postgres://…` or `postgresql://…` for
    /// PostgreSQL.
    pub url: String,
    /// Most pooled connections: SQLite's readers (it writes on one more), PostgreSQL's
    /// connections.
    pub max_connections: u32,
    /// PostgreSQL: how long an operation waits for a pooled connection before failing.
    pub acquire_timeout: Duration,
    /// SQLite: how long a statement waits on a locked database before failing.
    pub busy_timeout: Duration,
}

/// Opens the store `options.url` names, applying pending migrations.
pub async fn open(options: &StoreOptions) -> StoreResult<AnyStore> {
    let url = options.url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PostgresStore::open(&PostgresStoreOptions {
            url: options.url.clone(),
            max_connections: options.max_connections,
            acquire_timeout: options.acquire_timeout,
        })
        .await?;
        return Ok(store.into());
    }
    let path = match url.split_once(':') {
        _ if url.starts_with("sqlite://") => url.to_owned(),
        _ if url.starts_with("sqlite:") => format!("sqlite://{}", &url["sqlite:".len()..]),
        Some((scheme, _)) if !scheme.contains(['/', '.']) && scheme.len() > 1 => {
            return Err(StoreError::Open {
                url: options.url.clone(),
                message: "unsupported; expected sqlite://PATH or postgres://…".to_owned(),
            });
        }
        _ => format!("sqlite://{url}"),
    };
    let store = SqliteStore::open(&SqliteStoreOptions {
        url: path,
        read_connections: options.max_connections,
        busy_timeout: options.busy_timeout,
    })
    .await?;
    Ok(store.into())
}

/// Refuses a database that has migrations this binary does not know (a newer drover
/// migrated it) with [`StoreError::SchemaTooNew`], before anything touches it.
pub(crate) async fn check_schema(db: &mut Db<'_>, migrator: &Migrator) -> StoreResult<()> {
    // No table yet (a new database) is no migration.
    let applied: Option<(Option<i64>,)> =
        match sql("SELECT MAX(version) FROM _sqlx_migrations").fetch_optional(db).await {
            Ok(row) => row,
            Err(StoreError::Database(sqlx::Error::Database(_))) => None,
            Err(err) => return Err(err),
        };
    let database = applied.and_then(|(version,)| version).unwrap_or(0);
    let binary = latest_version(migrator);
    if database > binary {
        return Err(StoreError::SchemaTooNew { database, binary });
    }
    Ok(())
}

/// A failed migration as a store error: an applied migration this binary lacks (below
/// its newest) is a schema too new as well.
pub(crate) fn migrate_error(err: MigrateError, migrator: &Migrator) -> StoreError {
    match err {
        MigrateError::VersionMissing(version) => {
            StoreError::SchemaTooNew { database: version, binary: latest_version(migrator) }
        }
        err => err.into(),
    }
}

fn latest_version(migrator: &Migrator) -> i64 {
    migrator.iter().map(|migration| migration.version).max().unwrap_or(0)
}

/// A scratch PostgreSQL database beside the one `url` names (a benchmark's, so that it
/// measures an empty database and leaves nothing behind): creates `name` and returns its
/// URL. `name` must be lowercase letters, digits and `_`.
pub async fn create_scratch_database(url: &str, name: &str) -> StoreResult<String> {
    use sqlx::Connection;
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(StoreError::Open {
            url: name.to_owned(),
            message: "a scratch database name is lowercase letters, digits and _".to_owned(),
        });
    }
    let mut admin = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    let _ = admin.close().await;
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    Ok(format!("{server}/{name}{query}"))
}

/// Drops a database [`create_scratch_database`] made (its connections are closed first).
pub async fn drop_scratch_database(url: &str, name: &str) -> StoreResult<()> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    let _ = admin.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(url: String) -> StoreOptions {
        StoreOptions {
            url,
            max_connections: 2,
            acquire_timeout: Duration::from_secs(1),
            busy_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_url_picks_the_backend_and_an_unknown_scheme_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for url in [
            format!("sqlite://{}", dir.path().join("a.db").display()),
            format!("sqlite:{}", dir.path().join("b.db").display()),
            dir.path().join("c.db").display().to_string(),
        ] {
            let store =
                open(&options(url.clone())).await.unwrap_or_else(|err| panic!("{url}: {err}"));
            assert_eq!(store.pool_stats().backend, "sqlite", "{url}");
            store.close().await;
        }
        let refused = open(&options("mysql://db/drover".to_owned())).await.unwrap_err();
        assert!(matches!(refused, StoreError::Open { .. }), "{refused}");
    }
}
