//! Persistence: one [`Store`] trait, two sqlx backends ([`postgres`], [`sqlite`]).
//!
//! The store keeps rows; it decides nothing. Rows hold only what may be stored in clear
//! (token, tenant, brand, last 4, BIN, expiry, timestamps, caller metadata) plus ciphertext,
//! wrapped keys and keyed fingerprints. Queries are built at run time (not with sqlx's
//! compile-time macros) because the two dialects would need two offline query caches and a
//! live database of each kind at build time; every query is covered by the integration
//! suite, which runs against both backends.

mod access;
mod cards;
mod charge_ops;
mod charges;
mod data_keys;
pub(crate) mod dialect;
mod keys;
mod pool;
pub mod postgres;
pub mod sqlite;

pub use self::access::{AccessRepo, AccessTx, ApiKeyRow, PrincipalRow, TenantRow};
pub use self::cards::{CardInsert, CardRepo, CardRow, CardTx, ImportedCard, ReuseKey};
pub use self::data_keys::{DataKeyRepo, DataKeyTx};

pub use self::charge_ops::{ChargeOperationRow, OperationSettlement};
pub use self::charges::{ChargeActionRow, ChargeRow, ChargeSettlement, CvcHoldRow};
pub use self::keys::{
    DekUsage, KekUsage, KeyJobRow, KeyRequestRow, Rewrap, SealedRecord, Shredded,
};
pub use self::pool::{PoolStats, sample_pool};

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

/// A data-encryption key as stored: wrapped by a KEK version.
#[derive(Clone, PartialEq, Eq)]
pub struct DekRow {
    /// DEK id, also written in the header of every record it seals.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: String,
    /// KEK version that wrapped it.
    pub kek_version: u32,
    /// The wrapped key bytes.
    pub wrapped_key: Vec<u8>,
    /// Whether new records are sealed with it.
    pub active: bool,
    /// When it was generated.
    pub created_at: OffsetDateTime,
    /// Encryptions reserved under it so far (an upper bound of the records it sealed).
    pub reserved: u64,
    /// When it stopped being active.
    pub retired_at: Option<OffsetDateTime>,
}

impl fmt::Debug for DekRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DekRow")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("kek_version", &self.kek_version)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// The audit MAC key as stored (one per vault), wrapped by a KEK.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKeyRow {
    /// KEK version that wrapped it.
    pub kek_version: u32,
    /// The wrapped key bytes.
    pub wrapped_key: Vec<u8>,
    /// Number of audit chains; bound into the wrapping, so it cannot be changed unnoticed.
    pub shards: u32,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

impl fmt::Debug for AuditKeyRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKeyRow")
            .field("kek_version", &self.kek_version)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

/// The head of one audit chain: its last sequence number and MAC, and a MAC over both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHeadRow {
    /// Chain (shard) number, `0..shards`.
    pub shard: u32,
    /// Sequence number of the last record (0: no record yet).
    pub seq: u64,
    /// MAC of the last record (the genesis MAC when `seq` is 0).
    pub mac: Vec<u8>,
    /// MAC binding `shard`, `seq` and `mac`, so the head cannot be wound back to an earlier
    /// record by someone who can write the database but does not hold the audit key.
    pub head_mac: Vec<u8>,
}

/// One audit record. Never holds a PAN, CVC or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Chain the record belongs to.
    pub shard: u32,
    /// Position in its chain, from 1, without gaps.
    pub seq: u64,
    /// When the action happened.
    pub at: OffsetDateTime,
    /// Tenant acted on (none when authentication failed).
    pub tenant_id: Option<String>,
    /// Principal that acted (none when authentication failed).
    pub principal: Option<String>,
    /// Action name, e.g. `reveal` or `admin.create_principal`.
    pub action: String,
    /// Token acted on, if any.
    pub token: Option<String>,
    /// Outcome name, e.g. `ok`, `not_found`, `denied`.
    pub outcome: String,
    /// True for a honeytoken access or another event an operator must look at.
    pub alarm: bool,
    /// Caller's network address.
    pub peer: Option<String>,
    /// Request id, as returned to the caller in `x-request-id`.
    pub request_id: Option<String>,
    /// Extra non-secret context (e.g. the principal created).
    pub detail: Option<String>,
    /// HMAC-SHA256 over the previous record's MAC and this record.
    pub mac: Vec<u8>,
}

/// Where to resume a time-ordered audit scan: records strictly after this position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCursor {
    /// Time of the last record seen.
    pub at: OffsetDateTime,
    /// Its shard.
    pub shard: u32,
    /// Its sequence number.
    pub seq: u64,
}

impl AuditCursor {
    /// The keyset position a time-ordered scan starts after, as `(at, shard, seq)`: the
    /// cursor, or just before the first record at `from`.
    pub fn position(
        after: Option<AuditCursor>,
        from: OffsetDateTime,
    ) -> (OffsetDateTime, i64, i64) {
        match after {
            Some(c) => (
                c.at,
                i64::from(c.shard),
                i64::try_from(c.seq).unwrap_or(i64::MAX),
            ),
            None => (from, -1, -1),
        }
    }
}

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

/// Of `embedded`, the up migrations whose version is not in `applied`.
fn pending(embedded: &sqlx::migrate::Migrator, applied: &[i64]) -> Vec<i64> {
    embedded
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| m.version)
        .collect()
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
pub trait Store: AccessRepo + CardRepo + DataKeyRepo + Send + Sync + fmt::Debug + 'static {
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

    /// The audit key, if one was created.
    async fn audit_key(&self) -> Result<Option<AuditKeyRow>, StoreError>;
    /// Every audit chain head, by shard.
    async fn audit_heads(&self) -> Result<Vec<AuditHeadRow>, StoreError>;
    /// Up to `limit` records of one chain with `seq > after_seq`, by `seq`.
    async fn audit_chain(
        &self,
        shard: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError>;
    /// Up to `limit` records with `from <= at < to`, of one tenant or of all, ordered by
    /// (`at`, `shard`, `seq`) and strictly after `after` when given.
    async fn audit_range(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        tenant_id: Option<&str>,
        after: Option<AuditCursor>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError>;

    // --- Key management (see `keys`). -------------------------------------------------------
    /// Replaces the wrapped audit key if its KEK version is still `rewrap.old_version`
    /// (`rewrap.id` is ignored); returns whether it did.
    async fn rewrap_audit_key(&self, rewrap: &Rewrap) -> Result<bool, StoreError>;

    /// Inserts a running job unless one of its kind is running; returns whether it inserted.
    async fn insert_key_job(&self, row: &KeyJobRow) -> Result<bool, StoreError>;
    /// The running jobs and the `limit` most recent others, newest first.
    async fn key_jobs(&self, limit: u32) -> Result<Vec<KeyJobRow>, StoreError>;
    /// Takes (or renews) the lease of the oldest running job that has no live lease of
    /// another owner, until `lease_until`; returns the job. Atomic across replicas: of two
    /// claiming the same job, one gets it.
    async fn claim_key_job(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Option<KeyJobRow>, StoreError>;
    /// Records progress and renews the lease, if `owner` still holds it; returns whether it did.
    async fn key_job_progress(
        &self,
        id: &str,
        owner: &str,
        done: u64,
        total: u64,
        lease_until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Ends a job held by `owner` with `state` (`"done"` or `"failed"`) and an error text;
    /// clears the lease; returns whether it did.
    async fn finish_key_job(
        &self,
        id: &str,
        owner: &str,
        state: &str,
        error: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// A dual-control request by id.
    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRow>, StoreError>;
    /// Pending requests not expired at `now`, oldest first.
    async fn pending_key_requests(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<KeyRequestRow>, StoreError>;

    // --- Charge forwarding (see `charges`). -------------------------------------------------

    /// Inserts a charge unless the tenant already has one with that idempotency key; returns
    /// `None` when it inserted, else the existing row.
    async fn insert_charge(&self, row: &ChargeRow) -> Result<Option<ChargeRow>, StoreError>;
    /// The tenant's charge with this idempotency key.
    async fn charge_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRow>, StoreError>;
    /// A charge by id.
    async fn charge(&self, id: &str) -> Result<Option<ChargeRow>, StoreError>;
    /// Takes the right to send a `pending` or `unknown` charge to the gateway until `until`:
    /// sets `sending_until` and counts an attempt, only if no other request holds that right
    /// (`sending_until` unset or before `now`). Returns whether it took it. Of concurrent
    /// callers exactly one gets it.
    async fn claim_charge_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Records how a send ended and clears `sending_until`; only a `pending` or `unknown`
    /// charge changes. A final status (anything but `unknown`) also erases the CVC attached
    /// to the charge (`cvc_*` columns set to NULL). Returns whether it did.
    async fn settle_charge(
        &self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Up to `limit` charges (of one tenant or all) that are `unknown`, or `pending` with no
    /// live send (`sending_until` unset or before `now`), oldest first.
    async fn unsettled_charges(
        &self,
        tenant_id: Option<&str>,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError>;

    /// Up to `limit` unsettled charges (as [`Store::unsettled_charges`], of every tenant)
    /// whose `next_reconcile_at` is unset or not after `now`, oldest first: the background
    /// reconciler's work.
    async fn charges_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError>;
    /// Records a reconciliation that left a charge unsettled: its count of attempts and when
    /// the reconciler may try again. Only an unsettled charge changes; returns whether it did.
    async fn defer_charge_reconcile(
        &self,
        id: &str,
        attempts: u32,
        next_at: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// How many charges are `unknown`, and how many of those were created before
    /// `overdue_before`.
    async fn unknown_charge_counts(
        &self,
        overdue_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError>;
    /// Marks the alarm of a charge unknown for too long as raised; true only the first time.
    async fn mark_charge_alarmed(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError>;
    /// Takes (or renews) the lease of the background job `name` for `owner` until `until`,
    /// if no other owner holds it at `now`. Of concurrent callers at most one gets it.
    async fn claim_job_lease(
        &self,
        name: &str,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Gives up `owner`'s lease of `name`, if it holds it.
    async fn release_job_lease(&self, name: &str, owner: &str) -> Result<(), StoreError>;

    /// Attaches a taken CVC hold to a charge (its `cvc_dek_id`, `cvc_ciphertext`,
    /// `cvc_expires_at` from the hold), for the charge's own re-sends.
    async fn attach_charge_cvc(&self, charge_id: &str, hold: &CvcHoldRow)
    -> Result<(), StoreError>;
    /// The CVC attached to a charge, as a hold row (token and tenant from the charge), if
    /// it has one that has not expired at `now`.
    async fn charge_cvc(
        &self,
        charge_id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError>;
    /// Erases CVCs attached to charges that expired at `now` (sets the `cvc_*` columns to
    /// NULL), up to `limit`; returns how many.
    async fn erase_expired_charge_cvcs(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Stores (or replaces) the CVC hold of a token.
    async fn put_cvc_hold(&self, row: &CvcHoldRow) -> Result<(), StoreError>;
    /// Removes and returns the tenant's live (not expired at `now`) CVC hold of a token, so
    /// it is used at most once.
    async fn take_cvc_hold(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError>;
    /// Deletes up to `limit` holds expired at `now`; returns how many.
    async fn delete_expired_cvc_holds(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError>;

    // --- Captures, refunds and cancellations (see `charge_ops`). ---------------------------

    /// The tenant's operation with this idempotency key.
    async fn charge_operation_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeOperationRow>, StoreError>;
    /// An operation by id.
    async fn charge_operation(&self, id: &str) -> Result<Option<ChargeOperationRow>, StoreError>;
    /// Takes the right to send a `pending` or `unknown` operation until `until`, as
    /// [`Store::claim_charge_send`] does for a charge (counting an attempt); returns whether
    /// it took it.
    async fn claim_charge_operation_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
}

/// One database transaction. Dropped without [`StoreTx::commit`], it rolls back.
///
/// Audit writes come last in every transaction (see `audit`): a transaction that holds a
/// chain head lock then only commits, so two transactions never wait on each other in a
/// cycle.
#[async_trait]
pub trait StoreTx: AccessTx + CardTx + DataKeyTx + Send {
    /// Commits everything written in this transaction.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// Inserts the audit key unless one exists; returns whether it inserted.
    async fn insert_audit_key(&mut self, row: &AuditKeyRow) -> Result<bool, StoreError>;
    /// Inserts the head of a new, empty chain.
    async fn insert_audit_head(&mut self, head: &AuditHeadRow) -> Result<(), StoreError>;
    /// Reads a chain head and locks it until this transaction ends (`FOR UPDATE`), so
    /// appends to one chain are serialized while other chains proceed.
    async fn lock_audit_head(&mut self, shard: u32) -> Result<Option<AuditHeadRow>, StoreError>;
    /// Appends records (consecutive in one chain, oldest first) and moves the chain head to
    /// the last of them.
    async fn append_audit(
        &mut self,
        records: &[AuditRow],
        head: &AuditHeadRow,
    ) -> Result<(), StoreError>;

    /// Inserts a dual-control request.
    async fn insert_key_request(&mut self, row: &KeyRequestRow) -> Result<(), StoreError>;
    /// Moves a pending request to `state`, recording who decided and when; returns false
    /// (changing nothing) when it is no longer pending.
    async fn decide_key_request(
        &mut self,
        id: &str,
        state: &str,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// As [`Store::settle_charge`], inside this transaction: a send's outcome commits with
    /// its audit record, or neither does.
    async fn settle_charge(
        &mut self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    // --- Captures, refunds and cancellations (see `charge_ops`). ---------------------------

    /// A charge by id, locked until this transaction ends (PostgreSQL: `FOR UPDATE`; SQLite
    /// transactions hold the write lock from their start), so the operations checked against
    /// it and the one inserted after the check cannot interleave with another request's.
    async fn lock_charge(&mut self, id: &str) -> Result<Option<ChargeRow>, StoreError>;
    /// A charge's operations, oldest first.
    async fn charge_operations(
        &mut self,
        charge_id: &str,
    ) -> Result<Vec<ChargeOperationRow>, StoreError>;
    /// Inserts an operation unless the tenant already has one with that idempotency key;
    /// returns whether it inserted.
    async fn insert_charge_operation(
        &mut self,
        row: &ChargeOperationRow,
    ) -> Result<bool, StoreError>;
    /// Records how a send of a `pending` or `unknown` operation ended and clears
    /// `sending_until`; a gateway id or amount learnt before is kept when this send brought
    /// none. Returns whether the operation changed.
    async fn settle_charge_operation(
        &mut self,
        id: &str,
        settlement: &OperationSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
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

/// A stored action from its four nullable columns: none when all are NULL.
fn action_from_parts(
    client_secret: Option<String>,
    kind: Option<String>,
    redirect_url: Option<String>,
    details_json: Option<String>,
) -> Option<ChargeActionRow> {
    let action = ChargeActionRow {
        client_secret,
        kind,
        redirect_url,
        details_json,
    };
    (action != ChargeActionRow::default()).then_some(action)
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
