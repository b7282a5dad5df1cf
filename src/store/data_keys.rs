//! Data keys and key material at rest: DEKs, what each KEK version wraps, rewraps under a new
//! KEK version, re-encryption of records, the KEK rotation lease, and crypto-shredding.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    StoreError, TenantRow,
    access::{AccessTx, tenant_columns, tenant_from_row},
    dialect::{Conn, Db, Pool, Row, TxDb, query, sql},
    int8, narrow,
};

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

/// What one KEK version wraps, as counted by [`DataKeyRepo::kek_usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KekUsage {
    /// The KEK version.
    pub version: u32,
    /// Data keys wrapped under it.
    pub deks: u64,
    /// Tenant secrets wrapped under it (shredded tenants have none).
    pub tenant_secrets: u64,
    /// Audit keys wrapped under it (0 or 1).
    pub audit_keys: u64,
    /// Card records sealed by the data keys it wraps.
    pub records: u64,
}

impl KekUsage {
    /// Whether anything stored is still wrapped under this version.
    pub fn in_use(&self) -> bool {
        self.deks + self.tenant_secrets + self.audit_keys > 0
    }
}

/// A DEK with the number of records it seals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekUsage {
    /// The DEK.
    pub dek: DekRow,
    /// Card rows whose record it sealed.
    pub records: u64,
}

/// A key to rewrap under a new KEK version: compare-and-set on the version it had when read.
#[derive(Clone, PartialEq, Eq)]
pub struct Rewrap {
    /// The DEK's id (hyphenated UUID) or the tenant's id.
    pub id: String,
    /// The KEK version the key was read under; the update applies only if it still is.
    pub old_version: u32,
    /// The KEK version of `wrapped`.
    pub new_version: u32,
    /// The key wrapped under `new_version`.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for Rewrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rewrap")
            .field("id", &self.id)
            .field("old_version", &self.old_version)
            .field("new_version", &self.new_version)
            .finish_non_exhaustive()
    }
}

/// One card's sealed record, read for or written by re-encryption.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// The card's token (bound into the record's AAD).
    pub token: String,
    /// Its tenant (bound into the AAD).
    pub tenant_id: String,
    /// The DEK that sealed `ciphertext`.
    pub dek_id: Uuid,
    /// The self-describing sealed record.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedRecord")
            .field("token", &self.token)
            .field("tenant_id", &self.tenant_id)
            .field("dek_id", &self.dek_id)
            .finish_non_exhaustive()
    }
}

/// What shredding a tenant removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shredded {
    /// Card rows deleted.
    pub cards: u64,
    /// Data keys destroyed (rows deleted).
    pub deks: u64,
    /// Principals revoked (with their API keys).
    pub principals: u64,
}
/// Data keys, rewraps, re-encryption and the KEK rotation lease.
#[async_trait]
pub trait DataKeyRepo: Send + Sync {
    /// The tenant's active DEK, if any.
    async fn active_dek(&self, tenant_id: &str) -> Result<Option<DekRow>, StoreError>;
    /// A DEK by id, scoped to its tenant.
    async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<Option<DekRow>, StoreError>;
    /// Inserts an active DEK unless the tenant already has one; returns whether it inserted.
    async fn insert_active_dek(&self, row: &DekRow) -> Result<bool, StoreError>;
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
}

/// Crypto-shredding, inside a transaction.
#[async_trait]
pub trait DataKeyTx: Send {
    /// Crypto-shreds a tenant: deletes its cards and data keys, erases its wrapped secret
    /// (marking it shredded at `at`), revokes its principals and their API keys.
    async fn shred_tenant(
        &mut self,
        tenant_id: &str,
        at: OffsetDateTime,
    ) -> Result<Shredded, StoreError>;
}

/// Columns of a data key row, as `dek_from_row` reads them.
macro_rules! dek_columns {
    () => {
        "id, tenant_id, kek_version, wrapped_key, active, created_at, reserved, retired_at"
    };
}

fn dek_from_row(row: &Row) -> Result<DekRow, StoreError> {
    Ok(DekRow {
        id: row.get("id")?,
        tenant_id: row.get("tenant_id")?,
        kek_version: narrow(row.get::<i64>("kek_version")?, "kek_version")?,
        wrapped_key: row.get("wrapped_key")?,
        active: row.get("active")?,
        created_at: row.get("created_at")?,
        reserved: narrow(row.get::<i64>("reserved")?, "reserved")?,
        retired_at: row.get("retired_at")?,
    })
}

/// Inserts `row` as its tenant's active DEK (not retired, `reserved` as given) unless the
/// tenant has one; the partial unique index `data_keys_one_active` decides, so of two
/// replicas racing, one inserts. A clash on the primary key is an error.
async fn insert_active_dek_row<D: Db + ?Sized>(
    db: &mut D,
    row: &DekRow,
) -> Result<bool, StoreError> {
    let done = query(sql!(
        "INSERT INTO data_keys (id, tenant_id, kek_version, wrapped_key, active, created_at, \
         reserved, retired_at) VALUES ($1, $2, $3, $4, TRUE, $5, $6, NULL) \
         ON CONFLICT (tenant_id) WHERE {active} DO NOTHING"
    ))
    .bind(row.id)
    .bind(&row.tenant_id)
    .bind(i64::from(row.kek_version))
    .bind(&row.wrapped_key)
    .bind(row.created_at)
    .bind(int8(row.reserved, "reserved out of range")?)
    .execute(db)
    .await?;
    Ok(done == 1)
}

#[async_trait]
impl<S: Pool> DataKeyRepo for S {
    async fn active_dek(&self, tenant_id: &str) -> Result<Option<DekRow>, StoreError> {
        query(sql!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE tenant_id = $1 AND {active}"
        ))
        .bind(tenant_id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<Option<DekRow>, StoreError> {
        query(sql!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn insert_active_dek(&self, row: &DekRow) -> Result<bool, StoreError> {
        insert_active_dek_row(&mut self.pooled().await?, row).await
    }

    async fn kek_usage(&self) -> Result<Vec<KekUsage>, StoreError> {
        // One row per source and version, summed per version. Records count through the DEK
        // that sealed them, so a card counts under the version wrapping its DEK.
        query(sql!(
            "SELECT version, sum(deks)::int8 AS deks, sum(secrets)::int8 AS secrets, \
             sum(audit_keys)::int8 AS audit_keys, sum(records)::int8 AS records FROM (\
               SELECT d.kek_version AS version, count(DISTINCT d.id) AS deks, 0 AS secrets, \
               0 AS audit_keys, count(c.dek_id) AS records \
               FROM data_keys d LEFT JOIN cards c ON c.dek_id = d.id GROUP BY d.kek_version \
               UNION ALL \
               SELECT secret_kek_version, 0, count(*), 0, 0 FROM tenants \
               WHERE shredded_at IS NULL GROUP BY secret_kek_version \
               UNION ALL \
               SELECT kek_version, 0, 0, count(*), 0 FROM audit_keys GROUP BY kek_version\
             ) AS per_source GROUP BY version ORDER BY version"
        ))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(KekUsage {
                version: narrow(row.get::<i64>("version")?, "kek_version")?,
                deks: narrow(row.get::<i64>("deks")?, "usage count")?,
                tenant_secrets: narrow(row.get::<i64>("secrets")?, "usage count")?,
                audit_keys: narrow(row.get::<i64>("audit_keys")?, "usage count")?,
                records: narrow(row.get::<i64>("records")?, "usage count")?,
            })
        })
        .collect()
    }

    async fn dek_usage(&self, tenant_id: Option<&str>) -> Result<Vec<DekUsage>, StoreError> {
        // A count per DEK (an index-only range of `cards_by_dek` each) rather than a join
        // grouped over every card: with a tenant given, only its DEKs' records are counted.
        query(sql!(
            "SELECT ",
            dek_columns!(),
            ", (SELECT count(*) FROM cards WHERE cards.dek_id = data_keys.id) AS records \
             FROM data_keys WHERE ($1::text IS NULL OR tenant_id = $1) \
             ORDER BY tenant_id, active DESC, created_at DESC, id"
        ))
        .bind(tenant_id)
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(DekUsage {
                dek: dek_from_row(row)?,
                records: narrow(row.get::<i64>("records")?, "record count")?,
            })
        })
        .collect()
    }

    async fn deks_not_under(&self, version: u32, limit: u32) -> Result<Vec<DekRow>, StoreError> {
        query(sql!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE kek_version <> $1 ORDER BY id LIMIT $2"
        ))
        .bind(i64::from(version))
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(dek_from_row)
        .collect()
    }

    async fn tenants_not_under(
        &self,
        version: u32,
        limit: u32,
    ) -> Result<Vec<TenantRow>, StoreError> {
        query(sql!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE secret_kek_version <> $1 AND shredded_at IS NULL \
             ORDER BY id LIMIT $2"
        ))
        .bind(i64::from(version))
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(tenant_from_row)
        .collect()
    }

    async fn rewrap_deks(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError> {
        let mut db = self.pooled().await?;
        if let Conn::Pg(conn) = db.conn() {
            // One statement for the batch (UNNEST of column arrays; SQLite has no arrays).
            return super::postgres::rewrap_deks(conn, rewraps).await;
        }
        drop(db);
        // An id that is not a UUID names no DEK; like one rewrapped meanwhile, it is skipped.
        let parsed: Vec<(Uuid, &Rewrap)> = rewraps
            .iter()
            .filter_map(|r| Some((Uuid::parse_str(&r.id).ok()?, r)))
            .collect();
        if parsed.is_empty() {
            return Ok(0);
        }
        // SQLite runs in-process: one statement per key costs no round trip, and one
        // transaction makes the batch one fsync.
        let mut tx = self.write_tx().await?;
        let mut replaced = 0;
        for (id, r) in parsed {
            replaced += query(sql!(
                "UPDATE data_keys SET kek_version = $3, wrapped_key = $4 \
                 WHERE id = $1 AND kek_version = $2"
            ))
            .bind(id)
            .bind(i64::from(r.old_version))
            .bind(i64::from(r.new_version))
            .bind(&r.wrapped)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(replaced)
    }

    async fn rewrap_tenant_secrets(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError> {
        if rewraps.is_empty() {
            return Ok(0);
        }
        let mut db = self.pooled().await?;
        if let Conn::Pg(conn) = db.conn() {
            // As for DEKs: one UNNEST statement on PostgreSQL.
            return super::postgres::rewrap_tenant_secrets(conn, rewraps).await;
        }
        drop(db);
        let mut tx = self.write_tx().await?;
        let mut replaced = 0;
        for r in rewraps {
            // A shredded tenant's erased secret is never given a wrapped one back.
            replaced += query(sql!(
                "UPDATE tenants SET secret_kek_version = $3, wrapped_secret = $4 \
                 WHERE id = $1 AND secret_kek_version = $2 AND shredded_at IS NULL"
            ))
            .bind(&r.id)
            .bind(i64::from(r.old_version))
            .bind(i64::from(r.new_version))
            .bind(&r.wrapped)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(replaced)
    }

    async fn rotate_dek(
        &self,
        tenant_id: &str,
        old: Option<Uuid>,
        new: &DekRow,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        if let Some(old) = old {
            // On PostgreSQL a replica that rotated first holds the row lock until it commits;
            // this UPDATE then re-reads the row, finds it inactive and retires nothing. SQLite
            // runs one writer at a time.
            let done = query(sql!(
                "UPDATE data_keys SET active = FALSE, retired_at = $3 \
                 WHERE id = $1 AND tenant_id = $2 AND {active}"
            ))
            .bind(old)
            .bind(tenant_id)
            .bind(at)
            .execute(&mut tx)
            .await?;
            if done != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        // With `old` None, an active DEK that exists (or that a racing replica inserts first)
        // makes the insert do nothing: the same answer as checking for one beforehand.
        if !insert_active_dek_row(&mut tx, new).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn reserve_encryptions(
        &self,
        dek_id: Uuid,
        count: u64,
        max: u64,
    ) -> Result<Option<u64>, StoreError> {
        // `reserved <= max - count` rather than `reserved + count <= max`: nothing can
        // overflow, and a count above `max` never fits.
        let Some(room) = max.checked_sub(count) else {
            return Ok(None);
        };
        query(sql!(
            "UPDATE data_keys SET reserved = reserved + $2 \
             WHERE id = $1 AND {active} AND reserved <= $3 RETURNING reserved"
        ))
        .bind(dek_id)
        .bind(int8(count, "encryption count out of range")?)
        .bind(i64::try_from(room).unwrap_or(i64::MAX))
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .map(|row| narrow(row.get::<i64>("reserved")?, "reserved"))
        .transpose()
    }

    async fn retired_deks(&self, tenant_id: Option<&str>) -> Result<Vec<DekRow>, StoreError> {
        query(sql!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE {NOT active} AND ($1::text IS NULL OR tenant_id = $1) \
             ORDER BY created_at, id"
        ))
        .bind(tenant_id)
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(dek_from_row)
        .collect()
    }

    async fn records_under(
        &self,
        dek_id: Uuid,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        query(sql!(
            "SELECT token, tenant_id, dek_id, ciphertext FROM cards \
             WHERE dek_id = $1 AND token > $2 ORDER BY token LIMIT $3"
        ))
        .bind(dek_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(SealedRecord {
                token: row.get("token")?,
                tenant_id: row.get("tenant_id")?,
                dek_id: row.get("dek_id")?,
                ciphertext: row.get("ciphertext")?,
            })
        })
        .collect()
    }

    async fn replace_records(
        &self,
        old_dek: Uuid,
        records: &[SealedRecord],
    ) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut db = self.pooled().await?;
        if let Conn::Pg(conn) = db.conn() {
            // One UNNEST statement for the batch on PostgreSQL.
            return super::postgres::replace_records(conn, old_dek, records).await;
        }
        drop(db);
        // SQLite: one statement per record, in one transaction (one fsync).
        let mut tx = self.write_tx().await?;
        let mut replaced = 0;
        for r in records {
            replaced += query(sql!(
                "UPDATE cards SET dek_id = $4, ciphertext = $5 \
                 WHERE token = $2 AND tenant_id = $3 AND dek_id = $1"
            ))
            .bind(old_dek)
            .bind(&r.token)
            .bind(&r.tenant_id)
            .bind(r.dek_id)
            .bind(&r.ciphertext)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(replaced)
    }

    async fn destroy_dek(
        &self,
        id: Uuid,
        retired_before: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let result = query(sql!(
            "DELETE FROM data_keys WHERE id = $1 AND {NOT active} AND retired_at < $2 \
             AND NOT EXISTS (SELECT 1 FROM cards WHERE dek_id = $1)"
        ))
        .bind(id)
        .bind(retired_before)
        .execute(&mut self.pooled().await?)
        .await;
        match result {
            Ok(done) => Ok(done == 1),
            // PostgreSQL: a card sealed under it was committed while this DELETE ran (NOT
            // EXISTS looked at an older snapshot): the foreign key refuses, and the DEK stays.
            // SQLite serializes writes, so no card can come between the check and the delete.
            Err(sqlx::Error::Database(db))
                if db.is_foreign_key_violation()
                    && db.constraint() == Some("cards_dek_id_fkey") =>
            {
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn claim_kek_rotation(
        &self,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The first claim ever creates the row; later ones take it over only from a lease
        // that ran out. The row lock of the upsert (PostgreSQL) or the one writer at a time
        // (SQLite) serializes claimants.
        let done = query(sql!(
            "INSERT INTO kek_rotation (id, version, lease_owner, lease_until, updated_at) \
             VALUES (1, 0, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET lease_owner = $1, lease_until = $2, updated_at = $3 \
             WHERE kek_rotation.lease_until IS NULL OR kek_rotation.lease_until <= $3"
        ))
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn release_kek_rotation(
        &self,
        owner: &str,
        version: Option<u32>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE kek_rotation SET version = COALESCE($2, version), lease_owner = NULL, \
             lease_until = NULL, updated_at = $3 WHERE id = 1 AND lease_owner = $1"
        ))
        .bind(owner)
        .bind(version.map(i64::from))
        .bind(now)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn rotated_kek_version(&self) -> Result<Option<u32>, StoreError> {
        query(sql!(
            "SELECT version FROM kek_rotation WHERE id = 1 AND version > 0"
        ))
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .map(|row| narrow(row.get::<i64>("version")?, "kek_version"))
        .transpose()
    }
}

#[async_trait]
impl<T: TxDb> DataKeyTx for T {
    async fn shred_tenant(
        &mut self,
        tenant_id: &str,
        at: OffsetDateTime,
    ) -> Result<Shredded, StoreError> {
        // Cards first: they reference the data keys. CVC holds are sealed by the data keys
        // too (without a foreign key): they go before the keys, like the cards.
        let cards = query(sql!("DELETE FROM cards WHERE tenant_id = $1"))
            .bind(tenant_id)
            .execute(self)
            .await?;
        query(sql!("DELETE FROM cvc_holds WHERE tenant_id = $1"))
            .bind(tenant_id)
            .execute(self)
            .await?;
        // The tenant's charges stay: without their CVCs they hold no card data (token,
        // amounts, gateway ids and outcomes), and they are its financial record, which
        // outlives its cards (no foreign key ties a charge to a card). Their CVCs go.
        query(sql!(
            "UPDATE charges SET cvc_dek_id = NULL, cvc_ciphertext = NULL, cvc_expires_at = NULL \
             WHERE tenant_id = $1 AND cvc_ciphertext IS NOT NULL"
        ))
        .bind(tenant_id)
        .execute(self)
        .await?;
        let deks = query(sql!("DELETE FROM data_keys WHERE tenant_id = $1"))
            .bind(tenant_id)
            .execute(self)
            .await?;
        // The erased secret is an empty byte string; shredding again keeps the time of the
        // first.
        query(sql!(
            "UPDATE tenants SET wrapped_secret = $3, shredded_at = COALESCE(shredded_at, $2) \
             WHERE id = $1"
        ))
        .bind(tenant_id)
        .bind(at)
        .bind(&[][..])
        .execute(self)
        .await?;
        let live = query(sql!(
            "SELECT id FROM principals WHERE tenant_id = $1 AND revoked_at IS NULL ORDER BY id"
        ))
        .bind(tenant_id)
        .fetch_all(self)
        .await?
        .iter()
        .map(|row| row.get::<String>("id"))
        .collect::<Result<Vec<_>, _>>()?;
        let mut principals = 0;
        for id in &live {
            if self.revoke_principal(id, at).await? {
                principals += 1;
            }
        }
        Ok(Shredded {
            cards,
            deks,
            principals,
        })
    }
}
