//! Persistence: per-aggregate repositories, two sqlx backends ([`postgres`], [`sqlite`]).
//!
//! The store keeps rows; it decides nothing. Rows hold only what may be stored in clear
//! (token, tenant, brand, last 4, BIN, expiry, timestamps, caller metadata) plus ciphertext,
//! wrapped keys and keyed fingerprints.
//!
//! Each aggregate is a module holding its rows, a small repository trait for reads and
//! one-statement writes through the pool, a `…Tx` trait for writes inside a transaction, and
//! their SQL: cards ([`CardRepo`], [`CardTx`]), access — tenants, principals, API keys
//! ([`AccessRepo`], [`AccessTx`]), the audit log ([`AuditRepo`], [`AuditTx`]), data keys and
//! their rewraps ([`DataKeyRepo`], [`DataKeyTx`]), key jobs and dual-control requests
//! ([`KeyJobRepo`], [`KeyJobTx`]), charges with their CVC holds and operations
//! ([`ChargeRepo`], [`ChargeTx`]). [`Store`] combines the repositories with what is the
//! backend's own (migrations, readiness, pool metrics, transactions, the group commit's fast
//! lane); [`StoreTx`] combines the `…Tx` traits. A component that needs one aggregate takes
//! that trait (an `Arc<dyn Store>` upcasts to `Arc<dyn ChargeRepo>`).
//!
//! Each statement is written once, in PostgreSQL's syntax, in the aggregate's module; the
//! `dialect` layer renders it for SQLite (placeholders, casts, boolean literals and tests,
//! row locks) and binds and reads values per backend (timestamps, UUIDs, 32-bit integers).
//! The repository code is plain generic Rust over one executor (`dialect::Db`: a pooled
//! connection or a transaction, of either backend), implemented once for every backend
//! pool — not a macro instantiated per backend — so a type error points at the line that
//! has it, and each SQL text exists once in the source. Backend-specific code is left only
//! where the databases differ, each place saying why: PostgreSQL's column-array batches
//! (`UNNEST`) and data-modifying CTEs, array parameters (SQLite takes a JSON array), its
//! savepoints after unique violations, and each backend's connection set-up and transaction
//! start (`BEGIN IMMEDIATE` on SQLite).
//!
//! Queries are built at run time (not with sqlx's compile-time macros) because the two
//! dialects would need two offline query caches and a live database of each kind at build
//! time; every query is covered by the store's contract tests, which run against both
//! backends.

mod access;
mod audit;
mod cards;
mod charges;
mod data_keys;
pub(crate) mod dialect;
mod key_jobs;
mod pool;
pub mod postgres;
pub mod sqlite;
mod state;

pub use self::access::{AccessRepo, AccessTx, ApiKeyRow, PrincipalRow, TenantRow};
pub use self::audit::{
    AuditCursor, AuditHeadRow, AuditKeyRow, AuditOutcome, AuditRepo, AuditRow, AuditTx,
};
pub use self::cards::{CardInsert, CardRepo, CardRow, CardTx, ImportedCard, ReuseKey};
pub use self::charges::{
    CaptureMethod, ChargeActionRow, ChargeOperationKind, ChargeOperationRow, ChargeOperationState,
    ChargeRepo, ChargeRow, ChargeSettlement, ChargeState, ChargeTx, CvcHoldRow,
    OperationSettlement,
};
pub use self::data_keys::{
    DataKeyRepo, DataKeyTx, DekRow, DekUsage, KekUsage, Rewrap, SealedRecord, Shredded,
};
pub use self::key_jobs::{
    KeyJobKind, KeyJobRepo, KeyJobRow, KeyJobState, KeyJobTx, KeyRequestKind, KeyRequestRow,
    KeyRequestState,
};
pub use self::pool::{PoolStats, sample_pool};

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;

use self::dialect::{Pooled, WriteTx, query, sql};

/// Store failures, split by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool timeout, I/O): retryable.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database answered with an error.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// Applying migrations failed.
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A stored value does not have the shape the vault writes (e.g. a 15-byte UUID).
    #[error("corrupt row: {0}")]
    Corrupt(&'static str),
    /// The SQLite database files could not be created or made owner-only.
    #[error("cannot make the database file {path} owner-only (0600)")]
    FileMode {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database URL is neither `postgres://` nor `sqlite://`, or cannot be parsed.
    #[error("unsupported database URL (expected postgres://… or sqlite://…)")]
    UnsupportedUrl,
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
            // Server-side conditions that mean "this server cannot serve you now".
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| {
                    c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03"
                }) =>
            {
                StoreError::Unavailable(err)
            }
            other => StoreError::Database(other),
        }
    }
}

/// A migration failure as a store error: a failed statement says whether the database can
/// be reached, like any other.
fn migrate_error(err: sqlx::migrate::MigrateError) -> StoreError {
    match err {
        sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
        other => StoreError::Migrate(other),
    }
}

/// A cheap round trip, for readiness.
async fn ping(db: &mut Pooled) -> Result<(), StoreError> {
    query(sql!("SELECT 1")).execute(db).await?;
    Ok(())
}

/// Of the up migrations `embedded` holds, those whose version the database has not applied,
/// ascending.
async fn pending_migrations(
    db: &mut Pooled,
    embedded: &sqlx::migrate::Migrator,
) -> Result<Vec<i64>, StoreError> {
    let applied = match query(sql!("SELECT version FROM _sqlx_migrations WHERE success"))
        .fetch_all(db)
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|row| row.get::<i64>("version"))
            .collect::<Result<Vec<_>, _>>()?,
        // No migration table (PostgreSQL's undefined_table, SQLite's message): nothing was
        // ever applied.
        Err(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("42P01") || db.message().contains("no such table") =>
        {
            Vec::new()
        }
        Err(err) => return Err(err.into()),
    };
    Ok(embedded
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| m.version)
        .collect())
}

/// TLS to PostgreSQL (ignored by SQLite), as libpq's `sslmode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreTls {
    /// Plain TCP.
    Disable,
    /// Encrypted, server unverified.
    Require,
    /// Encrypted, server certificate chains to the CA file (or the system roots).
    VerifyCa(Option<PathBuf>),
    /// As `VerifyCa`, and the certificate names the host.
    VerifyFull(Option<PathBuf>),
}

/// Connection settings shared by both backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest number of pooled connections.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before the store reports
    /// [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// TLS to PostgreSQL. `serve` takes it from `database.tls_mode`, whose default is
    /// `verify-full`; this type's default (`Disable`) is for tests and tools on loopback.
    pub tls: StoreTls,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            tls: StoreTls::Disable,
        }
    }
}

/// The vault's persistence. Every card query is scoped by tenant.
#[async_trait]
pub trait Store:
    AccessRepo
    + AuditRepo
    + CardRepo
    + ChargeRepo
    + DataKeyRepo
    + KeyJobRepo
    + Send
    + Sync
    + fmt::Debug
    + 'static
{
    /// Backend name for logs: `"postgres"` or `"sqlite"`.
    fn backend(&self) -> &'static str;
    /// The connection pool's occupancy, for metrics; none for a store without a pool.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Versions of the migrations this binary embeds that the database has not applied,
    /// ascending: the schema is behind the binary while any are left.
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError>;

    /// Commits new cards and the audit records that extend one chain from `expected` to
    /// `head`, all or nothing — provided nothing clashes: every card is new (no unique key
    /// taken) and `expected` is still the chain's head. Otherwise it writes nothing and
    /// returns false, and the caller falls back to a locked transaction. This is the group
    /// commit's fast lane: on PostgreSQL it is one statement, one round trip and one flush.
    async fn commit_batch(
        &self,
        cards: &[&CardRow],
        records: &[AuditRow],
        expected: &AuditHeadRow,
        head: &AuditHeadRow,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        if tx.insert_cards(cards).await?.contains(&false) {
            return Ok(false);
        }
        if tx.lock_audit_head(expected.shard).await?.as_ref() != Some(expected) {
            return Ok(false);
        }
        tx.append_audit(records, head).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Starts a read-write transaction. Every action and its audit record are written in one
    /// transaction, so an action whose record cannot be written does not happen.
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError>;
}

/// One database transaction. Dropped without [`StoreTx::commit`], it rolls back.
///
/// Audit writes come last in every transaction (see `audit`): a transaction that holds a
/// chain head lock then only commits, so two transactions never wait on each other in a
/// cycle.
#[async_trait]
pub trait StoreTx: AccessTx + AuditTx + CardTx + ChargeTx + DataKeyTx + KeyJobTx + Send {
    /// Commits everything written in this transaction.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

#[async_trait]
impl StoreTx for WriteTx {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        WriteTx::commit(*self).await?;
        Ok(())
    }
}

/// Opens the backend named by the URL scheme (`postgres://`, `postgresql://`, `sqlite://`).
pub async fn connect(url: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::connect(url, options).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url, options).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// Metadata travels as a JSON object of strings in both backends.
fn metadata_to_json(metadata: &[(String, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn metadata_from_json(text: &str) -> Result<Vec<(String, String)>, StoreError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| StoreError::Corrupt("metadata is not JSON"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(StoreError::Corrupt("metadata is not a JSON object"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        match v {
            serde_json::Value::String(s) => out.push((k, s)),
            _ => return Err(StoreError::Corrupt("metadata value is not a string")),
        }
    }
    out.sort();
    Ok(out)
}

/// A count or size for a `BIGINT` column.
fn int8(value: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(what))
}

/// A count for a PostgreSQL `INTEGER` (32-bit) column.
fn int4(value: u32, what: &'static str) -> Result<i32, StoreError> {
    i32::try_from(value).map_err(|_| StoreError::Corrupt(what))
}

fn narrow<T: TryFrom<i64>>(value: i64, what: &'static str) -> Result<T, StoreError> {
    T::try_from(value).map_err(|_| StoreError::Corrupt(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_json_sorted_by_key() {
        let md = vec![
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "quote\"and\\slash".to_owned()),
        ];
        let back = metadata_from_json(&metadata_to_json(&md)).expect("round trip");
        assert_eq!(
            back,
            vec![
                ("a".to_owned(), "quote\"and\\slash".to_owned()),
                ("b".to_owned(), "2".to_owned())
            ]
        );
    }

    #[test]
    fn metadata_that_is_not_an_object_of_strings_is_corrupt() {
        assert!(metadata_from_json("[1]").is_err());
        assert!(metadata_from_json("{\"a\":1}").is_err());
        assert!(metadata_from_json("nope").is_err());
    }
}
