//! Persistence: one [`Store`] trait, two sqlx backends ([`postgres`], [`sqlite`]).
//!
//! The store keeps rows; it decides nothing. Rows hold only what may be stored in clear
//! (token, tenant, brand, last 4, BIN, expiry, timestamps, caller metadata) plus ciphertext,
//! wrapped keys and keyed fingerprints. Queries are built at run time (not with sqlx's
//! compile-time macros) because the two dialects would need two offline query caches and a
//! live database of each kind at build time; every query is covered by the integration
//! suite, which runs against both backends.

mod charge_ops;
mod charges;
mod keys;
mod pool;
pub mod postgres;
pub mod sqlite;
mod state;

pub use self::charge_ops::{
    ChargeOperationKind, ChargeOperationRow, ChargeOperationState, OperationSettlement,
};
pub use self::charges::{
    CaptureMethod, ChargeActionRow, ChargeRow, ChargeSettlement, ChargeState, CvcHoldRow,
};
pub use self::keys::{
    DekUsage, KekUsage, KeyJobKind, KeyJobRow, KeyJobState, KeyRequestKind, KeyRequestRow,
    KeyRequestState, Rewrap, SealedRecord, Shredded,
};
pub use self::pool::{PoolStats, sample_pool};

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

/// A tenant's key material as stored: its secret, wrapped by a KEK version.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantRow {
    /// Tenant id.
    pub id: String,
    /// The tenant secret wrapped by the KEK (provider-specific, self-describing bytes).
    pub wrapped_secret: Vec<u8>,
    /// KEK version that wrapped the secret.
    pub secret_kek_version: u32,
    /// When the tenant was created.
    pub created_at: OffsetDateTime,
    /// When it was crypto-shredded (its secret is then empty and it has no DEKs).
    pub shredded_at: Option<OffsetDateTime>,
}

impl fmt::Debug for TenantRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantRow")
            .field("id", &self.id)
            .field("secret_kek_version", &self.secret_kek_version)
            .finish_non_exhaustive()
    }
}

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

/// A stored card: clear metadata plus the sealed record.
#[derive(Clone, PartialEq, Eq)]
pub struct CardRow {
    /// The token (primary key, unique across tenants).
    pub token: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// `"opaque"` or `"pan_shaped"`.
    pub token_format: String,
    /// Keyed fingerprint of the PAN (32 bytes).
    pub fingerprint: Vec<u8>,
    /// DEK that sealed `ciphertext`.
    pub dek_id: Uuid,
    /// The sealed record (PAN and cardholder name).
    pub ciphertext: Vec<u8>,
    /// Brand name, e.g. `"VISA"`.
    pub brand: String,
    /// Last 4 digits.
    pub last4: String,
    /// First 6 or 8 digits.
    pub bin: String,
    /// Expiry month.
    pub exp_month: u8,
    /// Expiry year (4 digits).
    pub exp_year: u16,
    /// Caller metadata, sorted by key.
    pub metadata: Vec<(String, String)>,
    /// Whether `reuse_existing` resolves to this row (see the `cards_canonical` index).
    pub canonical: bool,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Expiry of the token itself, if any.
    pub expires_at: Option<OffsetDateTime>,
    /// A canary card minted by an operator: any access raises an alarm.
    pub honeytoken: bool,
    /// The importer's own id for a card stored by `ImportCards`, unique per tenant, so an
    /// interrupted import can be sent again without storing a card twice.
    pub import_id: Option<String>,
}

impl fmt::Debug for CardRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Everything here is allowed in clear, but a Debug that dumps rows invites copying
        // them into logs wholesale; show the identifying parts only.
        f.debug_struct("CardRow")
            .field("token", &self.token)
            .field("tenant_id", &self.tenant_id)
            .field("brand", &self.brand)
            .field("last4", &self.last4)
            .finish_non_exhaustive()
    }
}

/// A principal as stored: an identity of one tenant with a set of permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRow {
    /// Principal id (`p_…`), stable and public.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Human name, unique among a tenant's live principals.
    pub name: String,
    /// mTLS identity (SPIFFE ID or certificate CN) this principal authenticates as, if any.
    pub mtls_identity: Option<String>,
    /// Permission names, sorted (`tokenize`, `read`, `reveal`, …).
    pub permissions: Vec<String>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was revoked; a revoked principal never authenticates again.
    pub revoked_at: Option<OffsetDateTime>,
    /// The operator that created it (a principal id, or `local:unverified:<user>` for the
    /// CLI); `None` for principals made before this was recorded.
    pub created_by: Option<String>,
    /// A `keys:admin` principal that manages every tenant, not only its own.
    pub global_operator: bool,
}

/// An API key as stored: only a hash of the secret, never the key itself.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    /// Public key id, the middle part of `cv_<id>_<secret>`.
    pub id: String,
    /// The principal the key authenticates as.
    pub principal_id: String,
    /// SHA-256 of the whole key.
    pub secret_hash: Vec<u8>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// The operator that created it, who was shown the key (a principal id, or
    /// `local:unverified:<user>` for the CLI); `None` for keys made before this was recorded.
    pub created_by: Option<String>,
}

impl fmt::Debug for ApiKeyRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyRow")
            .field("id", &self.id)
            .field("principal_id", &self.principal_id)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .field("created_by", &self.created_by)
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

state::stored_enum! {
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

/// The identity of a card for `reuse_existing`: same tenant, PAN, expiry and token format.
#[derive(Debug, Clone, Copy)]
pub struct ReuseKey<'a> {
    /// Tenant.
    pub tenant_id: &'a str,
    /// PAN fingerprint.
    pub fingerprint: &'a [u8],
    /// Expiry month.
    pub exp_month: u8,
    /// Expiry year.
    pub exp_year: u16,
    /// Token format name.
    pub token_format: &'a str,
}

/// What happened to an insert.
#[derive(Debug)]
pub enum CardInsert {
    /// The row was stored.
    Inserted,
    /// Another card already has this token (possible for short PAN-shaped tokens): the
    /// caller draws a new token and tries again.
    TokenTaken,
    /// A canonical row for the same card already exists (only for canonical inserts).
    CanonicalExists,
}

/// A card stored by `ImportCards`, as an import that clashes with it needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedCard {
    /// The importer's id of the card.
    pub import_id: String,
    /// Its token.
    pub token: String,
    /// Keyed fingerprint of its PAN, to tell a resent card from another card under a reused
    /// import id.
    pub fingerprint: Vec<u8>,
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
pub trait Store: Send + Sync + fmt::Debug + 'static {
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

    /// Reads a tenant's key material.
    async fn tenant(&self, id: &str) -> Result<Option<TenantRow>, StoreError>;
    /// Inserts a tenant unless one with that id exists; returns whether it inserted.
    async fn insert_tenant(&self, row: &TenantRow) -> Result<bool, StoreError>;

    /// The tenant's active DEK, if any.
    async fn active_dek(&self, tenant_id: &str) -> Result<Option<DekRow>, StoreError>;
    /// A DEK by id, scoped to its tenant.
    async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<Option<DekRow>, StoreError>;
    /// Inserts an active DEK unless the tenant already has one; returns whether it inserted.
    async fn insert_active_dek(&self, row: &DekRow) -> Result<bool, StoreError>;

    /// A live (not expired at `now`) card by token within a tenant, read outside any
    /// transaction: the read path of `GetCard` and `Reveal`.
    async fn card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError>;

    /// The BIN of the tenant's first card (honeytokens left out) whose fingerprint is at or
    /// after `from`, in fingerprint order. Keyed fingerprints are uniformly random, so a
    /// random `from` picks a card at random and each BIN comes out as often as the tenant's
    /// cards have it; `None` when no card's fingerprint is that high (or the tenant has no
    /// card).
    async fn card_bin_at(&self, tenant_id: &str, from: &[u8])
    -> Result<Option<String>, StoreError>;
    /// Whether any card of the tenant (expired ones and honeytokens included) has this PAN
    /// fingerprint.
    async fn fingerprint_in_use(
        &self,
        tenant_id: &str,
        fingerprint: &[u8],
    ) -> Result<bool, StoreError>;

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

    /// A principal by id (revoked ones included).
    async fn principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError>;
    /// The live (not revoked) principal with this mTLS identity.
    async fn principal_by_mtls_identity(
        &self,
        identity: &str,
    ) -> Result<Option<PrincipalRow>, StoreError>;
    /// Principals (revoked ones included), of one tenant or of all, ordered by tenant, name, id.
    async fn principals(&self, tenant_id: Option<&str>) -> Result<Vec<PrincipalRow>, StoreError>;
    /// An API key by its public id.
    async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRow>, StoreError>;
    /// The API keys of a principal, oldest first.
    async fn api_keys_of(&self, principal_id: &str) -> Result<Vec<ApiKeyRow>, StoreError>;

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

    /// Deletes up to `limit` cards whose token expired at or before `now`; returns how many.
    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError>;

    // --- Key management (see `keys`). -------------------------------------------------------

    /// For every KEK version that wraps anything, what it wraps, by version.
    async fn kek_usage(&self) -> Result<Vec<KekUsage>, StoreError>;
    /// DEKs (of one tenant or all, shredded tenants have none) with their record counts,
    /// ordered by tenant, then active first, then newest first.
    async fn dek_usage(&self, tenant_id: Option<&str>) -> Result<Vec<DekUsage>, StoreError>;
    /// Up to `limit` DEKs not wrapped under KEK version `version`, by id.
    async fn deks_not_under(&self, version: u32, limit: u32) -> Result<Vec<DekRow>, StoreError>;
    /// Up to `limit` tenants (not shredded) whose secret is not wrapped under `version`, by id.
    async fn tenants_not_under(
        &self,
        version: u32,
        limit: u32,
    ) -> Result<Vec<TenantRow>, StoreError>;
    /// Replaces wrapped DEKs (ids are DEK UUIDs), each only if its KEK version is still
    /// `old_version`; returns how many it replaced. One statement on PostgreSQL.
    async fn rewrap_deks(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError>;
    /// Replaces wrapped tenant secrets (ids are tenant ids), each only if its KEK version is
    /// still `old_version`; returns how many it replaced.
    async fn rewrap_tenant_secrets(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError>;
    /// Replaces the wrapped audit key if its KEK version is still `rewrap.old_version`
    /// (`rewrap.id` is ignored); returns whether it did.
    async fn rewrap_audit_key(&self, rewrap: &Rewrap) -> Result<bool, StoreError>;

    /// Makes `new` the tenant's active DEK: retires (`active = false`, `retired_at = at`) the
    /// active DEK `old` — or, when `old` is `None`, expects none — and inserts `new`, in one
    /// transaction. Returns false and changes nothing when `old` is no longer the active DEK
    /// (another replica rotated first).
    async fn rotate_dek(
        &self,
        tenant_id: &str,
        old: Option<Uuid>,
        new: &DekRow,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Reserves `count` more encryptions under the DEK if it is still active and its
    /// `reserved` would stay at or below `max`; returns the new `reserved`, or `None` (the
    /// DEK was retired or is used up).
    async fn reserve_encryptions(
        &self,
        dek_id: Uuid,
        count: u64,
        max: u64,
    ) -> Result<Option<u64>, StoreError>;
    /// Retired (not active) DEKs, of one tenant or all, oldest first.
    async fn retired_deks(&self, tenant_id: Option<&str>) -> Result<Vec<DekRow>, StoreError>;
    /// Up to `limit` records sealed by `dek_id` with token greater than `after`, by token.
    async fn records_under(
        &self,
        dek_id: Uuid,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRecord>, StoreError>;
    /// Replaces records re-sealed by their new `dek_id`, each only if the row is still
    /// sealed by `old_dek`; returns how many it replaced. One statement on PostgreSQL.
    async fn replace_records(
        &self,
        old_dek: Uuid,
        records: &[SealedRecord],
    ) -> Result<u64, StoreError>;
    /// Deletes a retired DEK that no record uses any more and that was retired before
    /// `retired_before`; returns whether it did.
    async fn destroy_dek(
        &self,
        id: Uuid,
        retired_before: OffsetDateTime,
    ) -> Result<bool, StoreError>;

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
    /// Ends a job held by `owner` with `state` (done or failed) and an error text; clears
    /// the lease; returns whether it did.
    async fn finish_key_job(
        &self,
        id: &str,
        owner: &str,
        state: KeyJobState,
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
    /// Takes the lease on KEK rotation for `owner` until `until`, unless another owner holds
    /// a lease that has not run out at `now`; returns whether it took it. Of replicas
    /// claiming at once, exactly one gets it.
    async fn claim_kek_rotation(
        &self,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Ends `owner`'s lease on KEK rotation, recording `version` (when the rotation made
    /// one) as the primary version; returns whether `owner` still held the lease.
    async fn release_kek_rotation(
        &self,
        owner: &str,
        version: Option<u32>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// The primary KEK version the last rotation recorded, if any rotation did.
    async fn rotated_kek_version(&self) -> Result<Option<u32>, StoreError>;

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
pub trait StoreTx: Send {
    /// Commits everything written in this transaction.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// Inserts a tenant unless one with that id exists; returns whether it inserted.
    async fn insert_tenant(&mut self, row: &TenantRow) -> Result<bool, StoreError>;
    /// Whether a tenant exists.
    async fn tenant_exists(&mut self, id: &str) -> Result<bool, StoreError>;

    /// Inserts a principal; returns false (and stores nothing) when a live principal of the
    /// tenant has the same name, or a live principal has the same mTLS identity.
    async fn insert_principal(&mut self, row: &PrincipalRow) -> Result<bool, StoreError>;
    /// Revokes a live principal and its API keys; returns whether it was live.
    async fn revoke_principal(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError>;
    /// Inserts an API key.
    async fn insert_api_key(&mut self, row: &ApiKeyRow) -> Result<(), StoreError>;
    /// Revokes a live API key; returns whether it was live.
    async fn revoke_api_key(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError>;

    /// Inserts a card. A canonical insert reports [`CardInsert::CanonicalExists`] instead of
    /// storing a second canonical copy.
    async fn insert_card(&mut self, row: &CardRow) -> Result<CardInsert, StoreError>;
    /// Inserts many cards at once (one statement on PostgreSQL) and says, row by row,
    /// whether each was stored. A row that clashes with a unique key (its token, a canonical
    /// copy of the same card, its import id) is skipped rather than failing the others; the
    /// caller resolves those with [`StoreTx::insert_card`] or by reading the existing row.
    async fn insert_cards(&mut self, rows: &[&CardRow]) -> Result<Vec<bool>, StoreError>;
    /// A live (not expired at `now`) card by token within a tenant.
    async fn card(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError>;
    /// The live card `reuse_existing` should return: the canonical row if there is one, else
    /// the oldest matching row.
    async fn reusable_card(
        &mut self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError>;
    /// Deletes an expired canonical row for `key`, so a new canonical row can take its place.
    async fn delete_expired_canonical(
        &mut self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Deletes a live card; returns whether one was deleted.
    async fn delete_card(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

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
        state: KeyRequestState,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Crypto-shreds a tenant: deletes its cards and data keys, erases its wrapped secret
    /// (marking it shredded at `at`), revokes its principals and their API keys.
    async fn shred_tenant(
        &mut self,
        tenant_id: &str,
        at: OffsetDateTime,
    ) -> Result<Shredded, StoreError>;

    /// The tenant's cards with any of these import ids (expired ones included: the import id
    /// stays taken until the row is deleted), in no particular order; one query. Read in the
    /// transaction of an import whose rows clashed, so it sees what the clash was with.
    async fn imported_cards(
        &mut self,
        tenant_id: &str,
        import_ids: &[&str],
    ) -> Result<Vec<ImportedCard>, StoreError>;

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

/// For each row, whether its token is the first of its kind in the slice. A batch insert
/// reports stored rows by token, so it cannot tell two rows with one token apart; only the
/// first is sent and the others count as clashes.
fn first_of_each_token(rows: &[&CardRow]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    rows.iter()
        .map(|row| seen.insert(row.token.as_str()))
        .collect()
}

/// Metadata travels as a JSON object of strings in both backends.
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

/// Permissions are stored as one space-separated string of sorted names.
fn split_permissions(text: String) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
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
