//! The store a test runs against, for suites that run unchanged on every backend: a fresh
//! SQLite file, or a fresh database on the PostgreSQL server `DROVER_TEST_POSTGRES_URL`
//! names (the machine's, by default), dropped when the test ends. Without a reachable
//! server the PostgreSQL variants print `drover-test: SKIP …` and pass, unless
//! `DROVER_TEST_REQUIRE_BACKENDS=1`.
//!
//! [`backend_tests!`] turns `async fn case(db: TestDb)` functions into one test per backend:
//! `sqlite::case` and `postgres::case`.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use drover_store::{AnyStore, StoreOptions};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A test's store and what it takes to reopen and to clean it up.
pub struct TestDb {
    pub store: AnyStore,
    pub backend: Backend,
    options: StoreOptions,
    _dir: Option<tempfile::TempDir>,
    /// The server's URL and the test's database on it, dropped with the test.
    database: Option<(String, String)>,
}

fn options(url: String) -> StoreOptions {
    StoreOptions {
        url,
        max_connections: 4,
        acquire_timeout: Duration::from_secs(10),
        busy_timeout: Duration::from_secs(5),
    }
}

impl TestDb {
    /// A fresh store on `backend`, or `None` (after printing why) when it cannot be had.
    pub async fn open(backend: Backend) -> Option<Self> {
        Self::open_upgraded(backend, i64::MAX, &[]).await
    }

    /// A fresh database on `backend` as an older drover left it: migrated up to (not
    /// including) migration `until`, with `setup` (SQL statements) run on it; then opened
    /// as the store, which applies the rest.
    pub async fn open_upgraded(backend: Backend, until: i64, setup: &[&str]) -> Option<Self> {
        let (options, dir, database) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let nested = dir.path().join("nested");
                std::fs::create_dir_all(&nested).expect("nested dir");
                let url = format!("sqlite://{}", nested.join("drover.db").display());
                (options(url), Some(dir), None)
            }
            Backend::Postgres => {
                let server = drover_testkit::postgres_url()?;
                let name = drover_testkit::unique_name("drover_test_");
                let mut admin = match PgConnection::connect(&server).await {
                    Ok(admin) => admin,
                    Err(err) => {
                        return drover_testkit::skip(&format!(
                            "PostgreSQL tests: cannot connect to {server}: {err}"
                        ));
                    }
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut admin)
                    .await
                    .expect("test database created");
                let _ = admin.close().await;
                (options(database_url(&server, &name)), None, Some((server, name)))
            }
        };
        if until < i64::MAX {
            migrate_until(backend, &options.url, until, setup).await;
        }
        let store = drover_store::open(&options).await.expect("store opens");
        Some(Self { store, backend, options, _dir: dir, database })
    }

    /// Closes the store and opens the same database again.
    pub async fn reopen(&mut self) -> AnyStore {
        self.store.close().await;
        self.store = drover_store::open(&self.options).await.expect("store reopens");
        self.store.clone()
    }

    /// Opens the same database once more, beside the store.
    pub async fn open_again(&self) -> drover_store::StoreResult<AnyStore> {
        drover_store::open(&self.options).await
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.options.url
    }

    /// The first column of every row `query` returns, as text, read over a connection of
    /// its own (what is in the database, whatever the store makes of it).
    pub async fn query_strings(&self, query: &str) -> Vec<String> {
        macro_rules! with {
            ($connection:ty) => {{
                let mut conn = <$connection>::connect(&self.options.url).await.unwrap();
                let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(query.to_owned()))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                let _ = conn.close().await;
                rows.into_iter().map(|(value,)| value).collect()
            }};
        }
        match self.backend {
            Backend::Sqlite => with!(SqliteConnection),
            Backend::Postgres => with!(PgConnection),
        }
    }

    /// Records migration `version` as applied, as a newer drover would have.
    pub async fn pretend_migrated(&self, version: i64) {
        let insert = "INSERT INTO _sqlx_migrations \
                      (version, description, success, checksum, execution_time) \
                      VALUES ($1, 'from a newer drover', $2, $3, 0)";
        macro_rules! insert_with {
            ($connection:ty) => {{
                let mut conn = <$connection>::connect(&self.options.url).await.unwrap();
                let insert = sqlx::query(insert).bind(version).bind(true).bind(vec![0_u8]);
                insert.execute(&mut conn).await.unwrap();
            }};
        }
        match self.backend {
            Backend::Sqlite => insert_with!(SqliteConnection),
            Backend::Postgres => insert_with!(PgConnection),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server, name)) = self.database.take() else { return };
        // Drop runs inside the test's runtime, which cannot block on a future: a thread
        // with its own runtime drops the database (and ends the store's connections).
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if let Ok(Err(err)) = dropped {
            eprintln!("could not drop test database: {err}");
        }
    }
}

/// Applies `backend`'s migrations below `until` to the database at `url`, as the store
/// would have, then runs `setup` on it.
async fn migrate_until(backend: Backend, url: &str, until: i64, setup: &[&str]) {
    let folder = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(folder);
    let mut migrator = sqlx::migrate::Migrator::new(dir).await.expect("migrations load");
    let older: Vec<_> = migrator.iter().filter(|m| m.version < until).cloned().collect();
    migrator.migrations = std::borrow::Cow::Owned(older);
    macro_rules! with {
        ($connection:ty, $url:expr) => {{
            let mut conn = <$connection>::connect($url).await.expect("database connects");
            migrator.run(&mut conn).await.expect("older migrations apply");
            for statement in setup {
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
                    .execute(&mut conn)
                    .await
                    .expect("setup runs");
            }
            let _ = conn.close().await;
        }};
    }
    match backend {
        Backend::Sqlite => with!(SqliteConnection, &format!("{url}?mode=rwc")),
        Backend::Postgres => with!(PgConnection, url),
    }
}

/// `server` (a URL naming some database) with its database replaced by `name`.
fn database_url(server: &str, name: &str) -> String {
    let (base, query) = server.split_once('?').map_or((server, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// One `#[tokio::test]` per backend for each `async fn case(db: TestDb)` named:
/// `sqlite::case` and `postgres::case`.
macro_rules! backend_tests {
    ($($case:ident),* $(,)?) => {
        backend_tests!(@on sqlite, Sqlite, $($case),*);
        backend_tests!(@on postgres, Postgres, $($case),*);
    };
    (@on $module:ident, $backend:ident, $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $case() {
                    let backend = crate::common::Backend::$backend;
                    if let Some(db) = crate::common::TestDb::open(backend).await {
                        super::$case(db).await;
                    }
                }
            )*
        }
    };
}
