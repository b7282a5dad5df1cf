//! The audit log: the audit MAC key, the chain heads, and the chained records.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    Rewrap, StoreError,
    dialect::{Conn, Pool, Row, TxDb, query, sql},
    narrow,
    state::stored_enum,
};

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

stored_enum! {
    /// How an audited action ended.
    pub enum AuditOutcome("audit outcome") {
        /// Done.
        Ok = "ok",
        /// No such token (or another tenant's: the two are not told apart).
        NotFound = "not_found",
        /// The request was malformed.
        InvalidArgument = "invalid_argument",
        /// No valid credentials.
        Unauthenticated = "unauthenticated",
        /// Valid credentials without the permission.
        PermissionDenied = "permission_denied",
        /// Over a rate limit.
        RateLimited = "rate_limited",
        /// Refused because it conflicts with existing state (e.g. a duplicate name).
        Conflict = "conflict",
        /// Failed inside the vault.
        Error = "error",
    }
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
    /// How it ended.
    pub outcome: AuditOutcome,
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

/// Audit key and chain reads, and the audit key's rewrap.
#[async_trait]
pub trait AuditRepo: Send + Sync {
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
    /// Replaces the wrapped audit key if its KEK version is still `rewrap.old_version`
    /// (`rewrap.id` is ignored); returns whether it did.
    async fn rewrap_audit_key(&self, rewrap: &Rewrap) -> Result<bool, StoreError>;
}

/// Audit writes, the last writes of every transaction (see `audit`): a transaction that
/// holds a chain head lock then only commits, so two transactions never wait on each other
/// in a cycle.
#[async_trait]
pub trait AuditTx: Send {
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
}

macro_rules! audit_columns {
    () => {
        "shard, seq, at, tenant_id, principal, action, token, outcome, alarm, peer, request_id, detail, mac"
    };
}

/// A shard number for an `INTEGER` column.
pub(super) fn shard_param(shard: u32) -> Result<i32, StoreError> {
    i32::try_from(shard).map_err(|_| StoreError::Corrupt("audit shard out of range"))
}

/// A sequence number for a `BIGINT` column.
pub(super) fn seq_param(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt("audit seq out of range"))
}

fn head_from_row(row: &Row) -> Result<AuditHeadRow, StoreError> {
    Ok(AuditHeadRow {
        shard: narrow(row.int4("shard")?, "audit shard")?,
        seq: narrow(row.get::<i64>("seq")?, "audit seq")?,
        mac: row.get("mac")?,
        head_mac: row.get("head_mac")?,
    })
}

fn audit_from_row(row: &Row) -> Result<AuditRow, StoreError> {
    Ok(AuditRow {
        shard: narrow(row.int4("shard")?, "audit shard")?,
        seq: narrow(row.get::<i64>("seq")?, "audit seq")?,
        at: row.get("at")?,
        tenant_id: row.get("tenant_id")?,
        principal: row.get("principal")?,
        action: row.get("action")?,
        token: row.get("token")?,
        outcome: row.get("outcome")?,
        alarm: row.get("alarm")?,
        peer: row.get("peer")?,
        request_id: row.get("request_id")?,
        detail: row.get("detail")?,
        mac: row.get("mac")?,
    })
}

#[async_trait]
impl<S: Pool> AuditRepo for S {
    async fn audit_key(&self) -> Result<Option<AuditKeyRow>, StoreError> {
        query(sql!(
            "SELECT kek_version, wrapped_key, shards, created_at FROM audit_keys WHERE id = 1"
        ))
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .map(|row| {
            Ok(AuditKeyRow {
                kek_version: narrow(row.get::<i64>("kek_version")?, "kek_version")?,
                wrapped_key: row.get("wrapped_key")?,
                shards: narrow(row.int4("shards")?, "shards")?,
                created_at: row.get("created_at")?,
            })
        })
        .transpose()
    }

    async fn audit_heads(&self) -> Result<Vec<AuditHeadRow>, StoreError> {
        query(sql!(
            "SELECT shard, seq, mac, head_mac FROM audit_heads ORDER BY shard"
        ))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(head_from_row)
        .collect()
    }

    async fn audit_chain(
        &self,
        shard: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        query(sql!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_records WHERE shard = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(shard_param(shard)?)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn audit_range(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        tenant_id: Option<&str>,
        after: Option<AuditCursor>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let (at, shard, seq) = AuditCursor::position(after, from);
        query(sql!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_records WHERE at >= $1 AND at < $2 \
             AND ($3::text IS NULL OR tenant_id = $3) \
             AND (at, shard, seq) > ($4, $5, $6) ORDER BY at, shard, seq LIMIT $7"
        ))
        .bind(from)
        .bind(to)
        .bind(tenant_id)
        .bind(at)
        .bind(shard)
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn rewrap_audit_key(&self, rewrap: &Rewrap) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE audit_keys SET kek_version = $2, wrapped_key = $3 \
             WHERE id = 1 AND kek_version = $1"
        ))
        .bind(i64::from(rewrap.old_version))
        .bind(i64::from(rewrap.new_version))
        .bind(&rewrap.wrapped)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }
}

#[async_trait]
impl<T: TxDb> AuditTx for T {
    async fn insert_audit_key(&mut self, row: &AuditKeyRow) -> Result<bool, StoreError> {
        let done = query(sql!(
            "INSERT INTO audit_keys (id, kek_version, wrapped_key, shards, created_at) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING"
        ))
        .bind(i64::from(row.kek_version))
        .bind(&row.wrapped_key)
        .bind(shard_param(row.shards)?)
        .bind(row.created_at)
        .execute(self)
        .await?;
        Ok(done == 1)
    }

    async fn insert_audit_head(&mut self, head: &AuditHeadRow) -> Result<(), StoreError> {
        query(sql!(
            "INSERT INTO audit_heads (shard, seq, mac, head_mac) VALUES ($1, $2, $3, $4)"
        ))
        .bind(shard_param(head.shard)?)
        .bind(seq_param(head.seq)?)
        .bind(&head.mac)
        .bind(&head.head_mac)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn lock_audit_head(&mut self, shard: u32) -> Result<Option<AuditHeadRow>, StoreError> {
        // FOR UPDATE on PostgreSQL; SQLite's IMMEDIATE transaction already holds the one
        // write lock (the dialect drops the clause).
        query(sql!(
            "SELECT shard, seq, mac, head_mac FROM audit_heads WHERE shard = $1 FOR UPDATE"
        ))
        .bind(shard_param(shard)?)
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(head_from_row)
        .transpose()
    }

    async fn append_audit(
        &mut self,
        records: &[AuditRow],
        head: &AuditHeadRow,
    ) -> Result<(), StoreError> {
        if let Conn::Pg(conn) = self.conn() {
            // One statement for the records: UNNEST of column arrays (SQLite has no arrays).
            super::postgres::insert_audit_records(conn, records).await?;
        } else {
            // SQLite runs in-process: one prepared statement per record costs no round trip.
            for record in records {
                query(sql!(
                    "INSERT INTO audit_records (shard, seq, at, tenant_id, principal, action, \
                     token, outcome, alarm, peer, request_id, detail, mac) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                ))
                .bind(shard_param(record.shard)?)
                .bind(seq_param(record.seq)?)
                .bind(record.at)
                .bind(&record.tenant_id)
                .bind(&record.principal)
                .bind(&record.action)
                .bind(&record.token)
                .bind(record.outcome)
                .bind(record.alarm)
                .bind(&record.peer)
                .bind(&record.request_id)
                .bind(&record.detail)
                .bind(&record.mac)
                .execute(self)
                .await?;
            }
        }
        let done = query(sql!(
            "UPDATE audit_heads SET seq = $2, mac = $3, head_mac = $4 WHERE shard = $1"
        ))
        .bind(shard_param(head.shard)?)
        .bind(seq_param(head.seq)?)
        .bind(&head.mac)
        .bind(&head.head_mac)
        .execute(self)
        .await?;
        if done != 1 {
            return Err(StoreError::Corrupt("audit chain head missing"));
        }
        Ok(())
    }
}
