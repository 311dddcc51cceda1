//! One way to run a statement on either database, so the store's logic is written once.
//!
//! [`Sql`] is a statement with its arguments; [`Db`] is where it runs: a SQLite or
//! PostgreSQL connection (inside a transaction) or pool. Statements use `?` for each
//! parameter in order; they are numbered `$1, $2, …` before they run, a form both SQLite
//! and PostgreSQL read. The SQL itself is the dialect both understand (`ON CONFLICT`,
//! `RETURNING`, `COUNT(*) FILTER (WHERE …)`, `TRUE`/`FALSE`); what differs, like row locks,
//! is asked of [`Db`].

use std::borrow::Cow;

use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, FromRow, Postgres, Sqlite};

use crate::{StoreError, StoreResult};

/// Where a statement runs.
pub(crate) enum Db<'c> {
    Sqlite(&'c mut SqliteConnection),
    SqlitePool(&'c SqlitePool),
    Postgres(&'c mut PgConnection),
    PostgresPool(&'c PgPool),
}

impl Db<'_> {
    /// ` FOR NO KEY UPDATE` inside a PostgreSQL transaction, nothing elsewhere: a write
    /// that reads a row before changing it locks it, so concurrent transactions (other
    /// connections, other servers) take turns as SQLite's single writer makes them.
    ///
    /// Not `FOR UPDATE`: that lock also blocks the `KEY SHARE` lock a foreign-key check
    /// takes on the referenced row, so inserting an event (which references its project)
    /// would wait for whoever locked the project — while holding the event lock that this
    /// very holder waits for at its commit: a deadlock across the process's event mutex
    /// that PostgreSQL cannot see. Keys never change, so `NO KEY UPDATE` is all a writer
    /// needs, and foreign-key checks pass it.
    pub(crate) fn for_update(&self) -> &'static str {
        match self {
            Db::Postgres(_) => " FOR NO KEY UPDATE",
            _ => "",
        }
    }

    /// ` FOR NO KEY UPDATE SKIP LOCKED` inside a PostgreSQL transaction: rows another
    /// transaction holds are passed over rather than waited for.
    pub(crate) fn skip_locked(&self) -> &'static str {
        match self {
            Db::Postgres(_) => " FOR NO KEY UPDATE SKIP LOCKED",
            _ => "",
        }
    }
}

/// A value bound to a parameter. Nulls keep their type: PostgreSQL checks it.
#[derive(Debug, Clone)]
pub(crate) enum Arg<'q> {
    Text(Option<Cow<'q, str>>),
    Int(Option<i64>),
    Bool(bool),
    Bytes(&'q [u8]),
}

impl<'q> From<&'q str> for Arg<'q> {
    fn from(value: &'q str) -> Self {
        Arg::Text(Some(Cow::Borrowed(value)))
    }
}

impl<'q> From<&'q String> for Arg<'q> {
    fn from(value: &'q String) -> Self {
        Arg::Text(Some(Cow::Borrowed(value)))
    }
}

impl From<String> for Arg<'_> {
    fn from(value: String) -> Self {
        Arg::Text(Some(Cow::Owned(value)))
    }
}

impl<'q> From<Option<&'q str>> for Arg<'q> {
    fn from(value: Option<&'q str>) -> Self {
        Arg::Text(value.map(Cow::Borrowed))
    }
}

impl From<Option<String>> for Arg<'_> {
    fn from(value: Option<String>) -> Self {
        Arg::Text(value.map(Cow::Owned))
    }
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Arg::Int(Some(value))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(value: Option<i64>) -> Self {
        Arg::Int(value)
    }
}

impl From<bool> for Arg<'_> {
    fn from(value: bool) -> Self {
        Arg::Bool(value)
    }
}

impl<'q> From<&'q [u8]> for Arg<'q> {
    fn from(value: &'q [u8]) -> Self {
        Arg::Bytes(value)
    }
}

impl<'q> From<&'q Vec<u8>> for Arg<'q> {
    fn from(value: &'q Vec<u8>) -> Self {
        Arg::Bytes(value)
    }
}

/// A row type both databases can decode.
pub(crate) trait Row:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

impl<T> Row for T where T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{}

/// A statement and its arguments.
#[derive(Debug, Clone)]
pub(crate) struct Sql<'q> {
    text: String,
    /// How many parameters the text has.
    params: usize,
    args: Vec<Arg<'q>>,
}

/// A statement written in full (its `?` bound with [`Sql::bind`]).
pub(crate) fn sql<'q>(text: &'static str) -> Sql<'q> {
    let mut statement =
        Sql { text: String::with_capacity(text.len() + 16), params: 0, args: Vec::new() };
    statement.push(text);
    statement
}

/// Binds each argument of a statement, in order, to a sqlx query of either database.
macro_rules! bind_args {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Arg::Text(value) => query.bind(value.as_deref()),
                Arg::Int(value) => query.bind(*value),
                Arg::Bool(value) => query.bind(*value),
                Arg::Bytes(value) => query.bind(*value),
            };
        }
        query
    }};
}

/// Builds the sqlx query (`query` or `query_as::<Row>`) for the database `$db` is, binds
/// the arguments, runs `$run` on it and, if given, maps its result with `$then`.
macro_rules! run_on {
    (
        $db:expr, $text:expr, $args:expr, $make:ident $(::<$row:ty>)?, $run:ident
        $(, $then:ident)?
    ) => {
        match $db {
            Db::Sqlite(conn) => bind_args!(sqlx::$make::<Sqlite $(, $row)?>($text), $args)
                .$run(&mut **conn)
                .await?
                $(.$then())?,
            Db::SqlitePool(pool) => bind_args!(sqlx::$make::<Sqlite $(, $row)?>($text), $args)
                .$run(*pool)
                .await?
                $(.$then())?,
            Db::Postgres(conn) => bind_args!(sqlx::$make::<Postgres $(, $row)?>($text), $args)
                .$run(&mut **conn)
                .await?
                $(.$then())?,
            Db::PostgresPool(pool) => bind_args!(sqlx::$make::<Postgres $(, $row)?>($text), $args)
                .$run(*pool)
                .await?
                $(.$then())?,
        }
    };
}

impl<'q> Sql<'q> {
    /// Appends text; each `?` in it is the next parameter. Only static text: values are
    /// always bound, never written into the statement.
    pub(crate) fn push(&mut self, text: &'static str) -> &mut Self {
        for piece in text.split_inclusive('?') {
            match piece.strip_suffix('?') {
                Some(before) => {
                    self.params += 1;
                    self.text.push_str(before);
                    self.text.push('$');
                    self.text.push_str(&self.params.to_string());
                }
                None => self.text.push_str(piece),
            }
        }
        self
    }

    /// Appends [`Db::for_update`]: read inside a PostgreSQL transaction, the rows are
    /// locked until it ends.
    #[must_use]
    pub(crate) fn for_update(mut self, db: &Db<'_>) -> Self {
        self.push(db.for_update());
        self
    }

    /// Binds the next parameter.
    #[must_use]
    pub(crate) fn bind(mut self, value: impl Into<Arg<'q>>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Appends a parameter and binds it.
    pub(crate) fn push_bind(&mut self, value: impl Into<Arg<'q>>) -> &mut Self {
        self.push("?");
        self.args.push(value.into());
        self
    }

    /// Appends `?, ?, …`, one parameter per value.
    pub(crate) fn push_list<V: Into<Arg<'q>>>(
        &mut self,
        values: impl IntoIterator<Item = V>,
    ) -> &mut Self {
        for (n, value) in values.into_iter().enumerate() {
            if n > 0 {
                self.push(", ");
            }
            self.push_bind(value);
        }
        self
    }

    /// Appends `VALUES (…), (…)`: one row per item, its values given by `row`.
    pub(crate) fn push_values<T>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        mut row: impl FnMut(T) -> Vec<Arg<'q>>,
    ) -> &mut Self {
        self.push(" VALUES ");
        for (n, item) in items.into_iter().enumerate() {
            self.push(if n == 0 { "(" } else { ", (" });
            let values = row(item);
            self.push_list(values);
            self.push(")");
        }
        self
    }

    /// Runs the statement; how many rows it changed.
    pub(crate) async fn execute(self, db: &mut Db<'_>) -> StoreResult<u64> {
        counted();
        let Sql { text, args, .. } = self;
        Ok(run_on!(db, AssertSqlSafe(text), &args, query, execute, rows_affected))
    }

    /// Every row of the result.
    pub(crate) async fn fetch_all<R: Row>(self, db: &mut Db<'_>) -> StoreResult<Vec<R>> {
        counted();
        let Sql { text, args, .. } = self;
        Ok(run_on!(db, AssertSqlSafe(text), &args, query_as::<R>, fetch_all))
    }

    /// The first row of the result, if any.
    pub(crate) async fn fetch_optional<R: Row>(self, db: &mut Db<'_>) -> StoreResult<Option<R>> {
        counted();
        let Sql { text, args, .. } = self;
        Ok(run_on!(db, AssertSqlSafe(text), &args, query_as::<R>, fetch_optional))
    }

    /// The first row of the result, which must exist.
    pub(crate) async fn fetch_one<R: Row>(self, db: &mut Db<'_>) -> StoreResult<R> {
        self.fetch_optional(db).await?.ok_or_else(|| sqlx::Error::RowNotFound.into())
    }
}

tokio::task_local! {
    /// Statements run by the task inside [`counting_statements`].
    static STATEMENTS: std::cell::Cell<u64>;
}

fn counted() {
    let _ = STATEMENTS.try_with(|count| count.set(count.get() + 1));
}

/// Runs `work` and counts the statements the store runs for it (in this task; work it
/// spawns is not counted). The API reports the count per request (`Server-Timing`), which
/// is how a test holds list endpoints to a constant number of queries whatever the page
/// size.
pub async fn counting_statements<F: Future>(work: F) -> (F::Output, u64) {
    STATEMENTS
        .scope(std::cell::Cell::new(0), async {
            let output = work.await;
            (output, STATEMENTS.with(std::cell::Cell::get))
        })
        .await
}

/// Whether a statement failed on a unique constraint.
pub(crate) fn unique_violation(err: &StoreError) -> bool {
    matches!(err, StoreError::Database(sqlx::Error::Database(db)) if db.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_in_order_across_pushes() {
        let mut statement = sql("SELECT a FROM t WHERE b = ? AND (? IS NULL OR c = ?)");
        statement.push(" AND d IN (").push_list([1_i64, 2]).push(")");
        assert_eq!(
            statement.text,
            "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $3) AND d IN ($4, $5)"
        );
        let mut rows = sql("INSERT INTO t (a, b)");
        rows.push_values([1_i64, 2], |n| vec![n.into(), Arg::from(n * 10)]);
        assert_eq!(rows.text, "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)");
    }
}
