//! Persistence: one [`Store`] trait, two sqlx backends ([`postgres`], [`sqlite`]).
//!
//! The store keeps rows; it decides nothing. Rows hold only what DESIGN §3 allows in clear
//! (token, tenant, brand, last 4, BIN, expiry, timestamps, caller metadata) plus ciphertext,
//! wrapped keys and keyed fingerprints. Queries are built at run time (not with sqlx's
//! compile-time macros) because the two dialects would need two offline query caches and a
//! live database of each kind at build time; every query is covered by the integration
//! suite, which runs against both backends.

pub mod postgres;
pub mod sqlite;

use std::{fmt, sync::Arc, time::Duration};

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

/// Connection settings shared by both backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest number of pooled connections.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before the store reports
    /// [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The vault's persistence. Every card query is scoped by tenant.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Backend name for logs: `"postgres"` or `"sqlite"`.
    fn backend(&self) -> &'static str;
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

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

    /// Inserts a card. A canonical insert reports [`CardInsert::CanonicalExists`] instead of
    /// storing a second canonical copy.
    async fn insert_card(&self, row: &CardRow) -> Result<CardInsert, StoreError>;
    /// A live (not expired at `now`) card by token within a tenant.
    async fn card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError>;
    /// The live card `reuse_existing` should return: the canonical row if there is one, else
    /// the oldest matching row.
    async fn reusable_card(
        &self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError>;
    /// Deletes an expired canonical row for `key`, so a new canonical row can take its place.
    async fn delete_expired_canonical(
        &self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Deletes a live card; returns whether one was deleted.
    async fn delete_card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Deletes up to `limit` cards whose token expired at or before `now`; returns how many.
    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError>;
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
