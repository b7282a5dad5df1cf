//! The dialect layer: each statement is written once, in PostgreSQL's syntax, and rendered
//! for SQLite the first time it runs there; values are bound and read through one vocabulary
//! ([`Arg`], [`Row`]) that each backend encodes its own way.
//!
//! Rendering for SQLite, outside quoted literals:
//! - `$N` placeholders become `?N` (numbered, so a parameter used twice or out of order
//!   stays right);
//! - casts (`::text`, `::jsonb`, `::int8[]`) are dropped: SQLite's columns are untyped;
//! - `TRUE` / `FALSE` become `1` / `0`, the values SQLite's boolean columns hold;
//! - `FOR UPDATE` and `FOR UPDATE SKIP LOCKED` are dropped: a SQLite write transaction
//!   (`BEGIN IMMEDIATE`) already holds the database's one write lock, so row locks have
//!   nothing to add.
//!
//! A boolean column tested on its own is written `{column}` or `{NOT column}`: PostgreSQL
//! gets the bare test, SQLite `column = 1` / `column = 0`, the exact form of its partial
//! indexes (`WHERE active = 1`), which an upsert's conflict target must repeat.
//!
//! Values: timestamps are `TIMESTAMPTZ` on PostgreSQL and microseconds since the epoch
//! (`INTEGER`) on SQLite; UUIDs are `UUID` and 16-byte `BLOB`s; `INTEGER` (32-bit) columns of
//! PostgreSQL are read and written as `i32` there and as `i64` on SQLite.

use std::sync::OnceLock;

use sqlx::{
    PgConnection, Postgres, Row as _, Sqlite, SqliteConnection, Transaction, pool::PoolConnection,
    postgres::PgRow, sqlite::SqliteRow,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

/// The SQL dialect of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// PostgreSQL: the syntax statements are written in.
    Postgres,
    /// SQLite: statements rendered as the module docs say.
    Sqlite,
}

/// One statement, written once in PostgreSQL's syntax; each dialect's text is rendered on
/// first use and kept for the life of the process. Made by [`sql!`].
#[derive(Debug)]
pub(crate) struct Sql {
    text: &'static str,
    postgres: OnceLock<String>,
    sqlite: OnceLock<String>,
}

impl Sql {
    /// A statement; see [`sql!`].
    pub(crate) const fn new(text: &'static str) -> Self {
        Sql {
            text,
            postgres: OnceLock::new(),
            sqlite: OnceLock::new(),
        }
    }

    /// The statement as `dialect` runs it.
    pub(crate) fn text(&'static self, dialect: Dialect) -> &'static str {
        let cell = match dialect {
            Dialect::Postgres => &self.postgres,
            Dialect::Sqlite => &self.sqlite,
        };
        cell.get_or_init(|| render(self.text, dialect)).as_str()
    }
}

/// A `&'static Sql` from string literals (and column-list macros), concatenated.
macro_rules! sql {
    ($($part:expr),+ $(,)?) => {{
        static SQL: $crate::store::dialect::Sql =
            $crate::store::dialect::Sql::new(concat!($($part),+));
        &SQL
    }};
}
pub(crate) use sql;

/// Renders a statement written for PostgreSQL (with `{column}` boolean tests) for `dialect`.
fn render(text: &str, dialect: Dialect) -> String {
    let sqlite = dialect == Dialect::Sqlite;
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' => {
                // A quoted literal goes through untouched ('' inside is two quotes in a row).
                out.push(c);
                for (_, c) in chars.by_ref() {
                    out.push(c);
                    if c == '\'' {
                        break;
                    }
                }
            }
            '{' => {
                let end = text[i..].find('}').map(|n| i + n);
                let Some(end) = end else {
                    out.push(c);
                    continue;
                };
                let test = text[i + 1..end].trim();
                while chars.peek().is_some_and(|&(j, _)| j <= end) {
                    chars.next();
                }
                match (sqlite, test.strip_prefix("NOT ")) {
                    (false, _) => out.push_str(test),
                    (true, Some(column)) => {
                        out.push_str(column.trim());
                        out.push_str(" = 0");
                    }
                    (true, None) => {
                        out.push_str(test);
                        out.push_str(" = 1");
                    }
                }
            }
            '$' if sqlite => out.push('?'),
            ':' if sqlite && chars.peek().is_some_and(|&(_, n)| n == ':') => {
                chars.next();
                while chars
                    .peek()
                    .is_some_and(|&(_, n)| n.is_ascii_alphanumeric() || n == '_')
                {
                    chars.next();
                }
                if chars.peek().is_some_and(|&(_, n)| n == '[') {
                    chars.next();
                    if chars.peek().is_some_and(|&(_, n)| n == ']') {
                        chars.next();
                    }
                }
            }
            c if sqlite && (c.is_ascii_alphabetic() || c == '_') => {
                let mut end = i + c.len_utf8();
                while chars
                    .peek()
                    .is_some_and(|&(_, n)| n.is_ascii_alphanumeric() || n == '_')
                {
                    end += chars.next().map_or(0, |(_, n)| n.len_utf8());
                }
                match &text[i..end] {
                    "TRUE" => out.push('1'),
                    "FALSE" => out.push('0'),
                    word => out.push_str(word),
                }
            }
            c => out.push(c),
        }
    }
    if sqlite {
        out = out
            .replace(" FOR UPDATE SKIP LOCKED", "")
            .replace(" FOR UPDATE", "");
    }
    out
}

/// One bound value, encoded by each backend its own way (see the module docs).
#[derive(Debug)]
pub(crate) enum Arg<'a> {
    /// `TEXT` (or JSON text).
    Str(Option<&'a str>),
    /// `TEXT` made for this statement.
    String(String),
    /// `BYTEA` / `BLOB`.
    Bytes(Option<&'a [u8]>),
    /// `BIGINT` / `INTEGER`.
    Int(Option<i64>),
    /// PostgreSQL `INTEGER` (32-bit) / SQLite `INTEGER`.
    Int4(Option<i32>),
    /// `BOOLEAN` / `INTEGER` 0 or 1.
    Bool(bool),
    /// `TIMESTAMPTZ` / microseconds since the epoch.
    Time(Option<OffsetDateTime>),
    /// `UUID` / 16-byte `BLOB`.
    Uuid(Option<Uuid>),
}

macro_rules! arg_from {
    ($($t:ty => |$v:ident| $e:expr;)*) => {$(
        impl<'a> From<$t> for Arg<'a> {
            fn from($v: $t) -> Self {
                $e
            }
        }
    )*};
}

arg_from! {
    &'a str => |v| Arg::Str(Some(v));
    &'a String => |v| Arg::Str(Some(v.as_str()));
    Option<&'a str> => |v| Arg::Str(v);
    &'a Option<String> => |v| Arg::Str(v.as_deref());
    String => |v| Arg::String(v);
    &'a [u8] => |v| Arg::Bytes(Some(v));
    &'a Vec<u8> => |v| Arg::Bytes(Some(v.as_slice()));
    i64 => |v| Arg::Int(Some(v));
    Option<i64> => |v| Arg::Int(v);
    i32 => |v| Arg::Int4(Some(v));
    bool => |v| Arg::Bool(v);
    OffsetDateTime => |v| Arg::Time(Some(v));
    Option<OffsetDateTime> => |v| Arg::Time(v);
    Uuid => |v| Arg::Uuid(Some(v));
}

/// Microseconds since the epoch: how SQLite stores a timestamp.
pub(crate) fn micros(t: OffsetDateTime) -> i64 {
    // i128 → i64 cannot overflow for any year the vault accepts (±292,000 years).
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn from_micros(us: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|_| StoreError::Corrupt("timestamp out of range"))
}

fn uuid_from_blob(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|_| StoreError::Corrupt("key id is not 16 bytes"))
}

/// A statement and its arguments, run on a connection or in a transaction.
#[derive(Debug)]
pub(crate) struct Query<'a> {
    sql: &'static Sql,
    args: Vec<Arg<'a>>,
}

/// A statement to bind and run.
pub(crate) fn query<'a>(sql: &'static Sql) -> Query<'a> {
    Query {
        sql,
        args: Vec::new(),
    }
}

type PgQuery = sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>;
type SqliteQuery = sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments>;

impl<'a> Query<'a> {
    /// Binds the next parameter (`$1`, `$2`, … in order).
    pub(crate) fn bind(mut self, value: impl Into<Arg<'a>>) -> Self {
        self.args.push(value.into());
        self
    }

    fn postgres(self) -> PgQuery {
        let mut q = sqlx::query(self.sql.text(Dialect::Postgres));
        for arg in self.args {
            q = match arg {
                Arg::Str(v) => q.bind(v),
                Arg::String(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
                Arg::Int(v) => q.bind(v),
                Arg::Int4(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
                Arg::Time(v) => q.bind(v),
                Arg::Uuid(v) => q.bind(v),
            };
        }
        q
    }

    fn sqlite(self) -> SqliteQuery {
        let mut q = sqlx::query(self.sql.text(Dialect::Sqlite));
        for arg in self.args {
            q = match arg {
                Arg::Str(v) => q.bind(v),
                Arg::String(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
                Arg::Int(v) => q.bind(v),
                Arg::Int4(v) => q.bind(v.map(i64::from)),
                Arg::Bool(v) => q.bind(v),
                Arg::Time(v) => q.bind(v.map(micros)),
                Arg::Uuid(v) => q.bind(v.map(|id| id.as_bytes().to_vec())),
            };
        }
        q
    }

    /// Runs the statement; returns the number of rows it changed.
    pub(crate) async fn execute<D: Db + ?Sized>(self, db: &mut D) -> Result<u64, sqlx::Error> {
        Ok(match db.conn() {
            Conn::Pg(c) => self.postgres().execute(c).await?.rows_affected(),
            Conn::Sqlite(c) => self.sqlite().execute(c).await?.rows_affected(),
        })
    }

    /// Runs the statement; returns its first row, if any.
    pub(crate) async fn fetch_optional<D: Db + ?Sized>(
        self,
        db: &mut D,
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(match db.conn() {
            Conn::Pg(c) => self.postgres().fetch_optional(c).await?.map(Row::Pg),
            Conn::Sqlite(c) => self.sqlite().fetch_optional(c).await?.map(Row::Sqlite),
        })
    }

    /// Runs the statement; returns its one row.
    pub(crate) async fn fetch_one<D: Db + ?Sized>(self, db: &mut D) -> Result<Row, sqlx::Error> {
        Ok(match db.conn() {
            Conn::Pg(c) => Row::Pg(self.postgres().fetch_one(c).await?),
            Conn::Sqlite(c) => Row::Sqlite(self.sqlite().fetch_one(c).await?),
        })
    }

    /// Runs the statement; returns all its rows.
    pub(crate) async fn fetch_all<D: Db + ?Sized>(
        self,
        db: &mut D,
    ) -> Result<Vec<Row>, sqlx::Error> {
        Ok(match db.conn() {
            Conn::Pg(c) => self
                .postgres()
                .fetch_all(c)
                .await?
                .into_iter()
                .map(Row::Pg)
                .collect(),
            Conn::Sqlite(c) => self
                .sqlite()
                .fetch_all(c)
                .await?
                .into_iter()
                .map(Row::Sqlite)
                .collect(),
        })
    }
}

/// A row of either backend.
#[derive(Debug)]
pub(crate) enum Row {
    /// From PostgreSQL.
    Pg(PgRow),
    /// From SQLite.
    Sqlite(SqliteRow),
}

/// A Rust type a column is read as, decoded per backend.
pub(crate) trait Column: Sized {
    /// The column `name` of `row`.
    fn read(row: &Row, name: &str) -> Result<Self, StoreError>;
}

/// Types both backends decode directly.
macro_rules! plain_column {
    ($($t:ty),*) => {$(
        impl Column for $t {
            fn read(row: &Row, name: &str) -> Result<Self, StoreError> {
                Ok(match row {
                    Row::Pg(r) => r.try_get(name)?,
                    Row::Sqlite(r) => r.try_get(name)?,
                })
            }
        }
    )*};
}

plain_column!(String, Option<String>, Vec<u8>, bool, i64, Option<i64>);

impl Column for OffsetDateTime {
    fn read(row: &Row, name: &str) -> Result<Self, StoreError> {
        match row {
            Row::Pg(r) => Ok(r.try_get(name)?),
            Row::Sqlite(r) => from_micros(r.try_get(name)?),
        }
    }
}

impl Column for Option<OffsetDateTime> {
    fn read(row: &Row, name: &str) -> Result<Self, StoreError> {
        match row {
            Row::Pg(r) => Ok(r.try_get(name)?),
            Row::Sqlite(r) => r
                .try_get::<Option<i64>, _>(name)?
                .map(from_micros)
                .transpose(),
        }
    }
}

impl Column for Uuid {
    fn read(row: &Row, name: &str) -> Result<Self, StoreError> {
        match row {
            Row::Pg(r) => Ok(r.try_get(name)?),
            Row::Sqlite(r) => uuid_from_blob(r.try_get::<&[u8], _>(name)?),
        }
    }
}

impl Row {
    /// The column `name`, as `T`.
    pub(crate) fn get<T: Column>(&self, name: &str) -> Result<T, StoreError> {
        T::read(self, name)
    }

    /// A PostgreSQL `INTEGER` (32-bit) column; SQLite's integers are all 64-bit.
    pub(crate) fn int4(&self, name: &str) -> Result<i64, StoreError> {
        Ok(match self {
            Row::Pg(r) => i64::from(r.try_get::<i32, _>(name)?),
            Row::Sqlite(r) => r.try_get(name)?,
        })
    }
}

/// A connection of either backend, borrowed for one statement.
#[derive(Debug)]
pub(crate) enum Conn<'c> {
    /// PostgreSQL.
    Pg(&'c mut PgConnection),
    /// SQLite.
    Sqlite(&'c mut SqliteConnection),
}

/// Where statements run: a pooled connection or a transaction.
pub(crate) trait Db: Send {
    /// The connection, for one statement.
    fn conn(&mut self) -> Conn<'_>;

    /// The connection's dialect.
    fn dialect(&mut self) -> Dialect {
        match self.conn() {
            Conn::Pg(_) => Dialect::Postgres,
            Conn::Sqlite(_) => Dialect::Sqlite,
        }
    }
}

/// A connection from a pool of either backend.
#[derive(Debug)]
pub(crate) enum Pooled {
    /// PostgreSQL.
    Pg(PoolConnection<Postgres>),
    /// SQLite.
    Sqlite(PoolConnection<Sqlite>),
}

impl Db for Pooled {
    fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Pg(c) => Conn::Pg(c),
            Pooled::Sqlite(c) => Conn::Sqlite(c),
        }
    }
}

/// A read-write transaction of either backend: READ COMMITTED on PostgreSQL, `BEGIN
/// IMMEDIATE` on SQLite (see each backend's `begin`).
#[derive(Debug)]
pub(crate) enum WriteTx {
    /// PostgreSQL.
    Pg(Transaction<'static, Postgres>),
    /// SQLite.
    Sqlite(Transaction<'static, Sqlite>),
}

impl WriteTx {
    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Pg(tx) => tx.commit().await,
            WriteTx::Sqlite(tx) => tx.commit().await,
        }
    }

    /// Rolls back.
    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Pg(tx) => tx.rollback().await,
            WriteTx::Sqlite(tx) => tx.rollback().await,
        }
    }
}

impl Db for WriteTx {
    fn conn(&mut self) -> Conn<'_> {
        match self {
            WriteTx::Pg(tx) => Conn::Pg(tx),
            WriteTx::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }
}

/// A transaction: what the `…Tx` repository traits are implemented for.
pub(crate) trait TxDb: Db {}

impl TxDb for WriteTx {}

/// A backend's pool, as the repositories use it.
#[async_trait::async_trait]
pub(crate) trait Pool: Send + Sync {
    /// A pooled connection, its wait counted and timed.
    async fn pooled(&self) -> Result<Pooled, sqlx::Error>;
    /// A read-write transaction, for a repository method that writes several statements.
    async fn write_tx(&self) -> Result<WriteTx, sqlx::Error>;
}

/// Whether `err` is a unique violation of the index PostgreSQL names `constraint` and SQLite
/// names by its column list `sqlite_columns` (SQLite reports "UNIQUE constraint failed:
/// cards.token", not the index name). The whole list is compared, since one column name can
/// be a prefix of another (`cards.token` / `cards.token_format`).
pub(crate) fn unique_violation(err: &sqlx::Error, constraint: &str, sqlite_columns: &str) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    db.is_unique_violation()
        && (db.constraint() == Some(constraint)
            || db.message().strip_prefix("UNIQUE constraint failed: ") == Some(sqlite_columns))
}

/// Opens a savepoint on PostgreSQL, where a failed statement (a unique violation) aborts the
/// whole transaction unless rolled back to one; SQLite undoes only the failed statement and
/// needs none. Ended by [`end_savepoint`].
pub(crate) async fn savepoint<D: Db + ?Sized>(db: &mut D, name: &str) -> Result<(), StoreError> {
    if let Conn::Pg(c) = db.conn() {
        sqlx::query(sqlx::AssertSqlSafe(format!("SAVEPOINT {name}")))
            .execute(c)
            .await?;
    }
    Ok(())
}

/// Ends a savepoint opened by [`savepoint`]: releases it when the statement's work is kept,
/// else rolls back to it, which also clears the aborted state a failed statement leaves. An
/// error of the statement itself wins over one from ending the savepoint, so the caller sees
/// the cause rather than "current transaction is aborted".
pub(crate) async fn end_savepoint<D: Db + ?Sized, T>(
    db: &mut D,
    name: &str,
    keep: bool,
    outcome: Result<T, StoreError>,
) -> Result<T, StoreError> {
    let Conn::Pg(c) = db.conn() else {
        return outcome;
    };
    let end = if keep {
        format!("RELEASE SAVEPOINT {name}")
    } else {
        format!("ROLLBACK TO SAVEPOINT {name}")
    };
    let ended = sqlx::query(sqlx::AssertSqlSafe(end)).execute(c).await;
    match (outcome, ended) {
        (Err(err), _) => Err(err),
        (Ok(_), Err(err)) => Err(err.into()),
        (Ok(value), Ok(_)) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_text_is_kept_apart_from_boolean_tests() {
        assert_eq!(
            render(
                "SELECT a::text AS a FROM t WHERE {active} AND {NOT honeytoken} AND x = $1 FOR UPDATE",
                Dialect::Postgres
            ),
            "SELECT a::text AS a FROM t WHERE active AND NOT honeytoken AND x = $1 FOR UPDATE"
        );
    }

    #[test]
    fn sqlite_gets_numbered_placeholders_no_casts_and_integer_booleans() {
        assert_eq!(
            render(
                "SELECT a::text AS a, sum(n)::int8 FROM t WHERE {active} AND {NOT honeytoken} \
                 AND x = $12 AND ($3::text IS NULL OR y = $3) AND z = TRUE AND w = 'TRUE $1 {a}' \
                 AND v = ANY($4::bytea[]) FOR UPDATE SKIP LOCKED",
                Dialect::Sqlite
            ),
            "SELECT a AS a, sum(n) FROM t WHERE active = 1 AND honeytoken = 0 \
             AND x = ?12 AND (?3 IS NULL OR y = ?3) AND z = 1 AND w = 'TRUE $1 {a}' \
             AND v = ANY(?4)"
        );
        assert_eq!(
            render("SELECT 1 FROM t WHERE k = $1 FOR UPDATE", Dialect::Sqlite),
            "SELECT 1 FROM t WHERE k = ?1"
        );
        assert_eq!(
            render("UPDATE t SET active = FALSE, TRUEISH = 2", Dialect::Sqlite),
            "UPDATE t SET active = 0, TRUEISH = 2"
        );
    }
}
