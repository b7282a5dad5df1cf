//! Access: tenants (and their wrapped secrets), principals and API keys.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    StoreError,
    dialect::{Db, Pool, Row, TxDb, end_savepoint, query, savepoint, sql, unique_violation},
    narrow,
};

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

/// Tenant, principal and API key reads, and tenant creation outside a transaction.
#[async_trait]
pub trait AccessRepo: Send + Sync {
    /// Reads a tenant's key material.
    async fn tenant(&self, id: &str) -> Result<Option<TenantRow>, StoreError>;
    /// Inserts a tenant unless one with that id exists; returns whether it inserted.
    async fn insert_tenant(&self, row: &TenantRow) -> Result<bool, StoreError>;
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
}

/// Tenant, principal and API key writes inside a transaction.
#[async_trait]
pub trait AccessTx: Send {
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
}

/// Columns of a tenant row, as `tenant_from_row` reads them.
macro_rules! tenant_columns {
    () => {
        "id, wrapped_secret, secret_kek_version, created_at, shredded_at"
    };
}
pub(super) use tenant_columns;

macro_rules! principal_columns {
    () => {
        "id, tenant_id, name, mtls_identity, permissions, created_at, revoked_at, created_by, global_operator"
    };
}

macro_rules! api_key_columns {
    () => {
        "id, principal_id, secret_hash, created_at, expires_at, revoked_at, created_by"
    };
}

pub(super) fn tenant_from_row(row: &Row) -> Result<TenantRow, StoreError> {
    Ok(TenantRow {
        id: row.get("id")?,
        wrapped_secret: row.get("wrapped_secret")?,
        secret_kek_version: narrow(row.get::<i64>("secret_kek_version")?, "secret_kek_version")?,
        created_at: row.get("created_at")?,
        shredded_at: row.get("shredded_at")?,
    })
}

fn principal_from_row(row: &Row) -> Result<PrincipalRow, StoreError> {
    Ok(PrincipalRow {
        id: row.get("id")?,
        tenant_id: row.get("tenant_id")?,
        name: row.get("name")?,
        mtls_identity: row.get("mtls_identity")?,
        // Stored as one space-separated string of sorted names.
        permissions: row
            .get::<String>("permissions")?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        created_at: row.get("created_at")?,
        revoked_at: row.get("revoked_at")?,
        created_by: row.get("created_by")?,
        global_operator: row.get("global_operator")?,
    })
}

fn api_key_from_row(row: &Row) -> Result<ApiKeyRow, StoreError> {
    Ok(ApiKeyRow {
        id: row.get("id")?,
        principal_id: row.get("principal_id")?,
        secret_hash: row.get("secret_hash")?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        revoked_at: row.get("revoked_at")?,
        created_by: row.get("created_by")?,
    })
}

/// Inserts a tenant unless one with that id exists, through the pool or inside a
/// transaction. A new tenant is never shredded: `shredded_at` is written NULL.
async fn insert_tenant_row<D: Db + ?Sized>(
    db: &mut D,
    row: &TenantRow,
) -> Result<bool, StoreError> {
    let done = query(sql!(
        "INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at, shredded_at) \
         VALUES ($1, $2, $3, $4, NULL) ON CONFLICT (id) DO NOTHING"
    ))
    .bind(&row.id)
    .bind(&row.wrapped_secret)
    .bind(i64::from(row.secret_kek_version))
    .bind(row.created_at)
    .execute(db)
    .await?;
    Ok(done == 1)
}

#[async_trait]
impl<S: Pool> AccessRepo for S {
    async fn tenant(&self, id: &str) -> Result<Option<TenantRow>, StoreError> {
        query(sql!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(tenant_from_row)
        .transpose()
    }

    async fn insert_tenant(&self, row: &TenantRow) -> Result<bool, StoreError> {
        insert_tenant_row(&mut self.pooled().await?, row).await
    }

    async fn principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        query(sql!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(principal_from_row)
        .transpose()
    }

    async fn principal_by_mtls_identity(
        &self,
        identity: &str,
    ) -> Result<Option<PrincipalRow>, StoreError> {
        query(sql!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE mtls_identity = $1 AND revoked_at IS NULL"
        ))
        .bind(identity)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(principal_from_row)
        .transpose()
    }

    async fn principals(&self, tenant_id: Option<&str>) -> Result<Vec<PrincipalRow>, StoreError> {
        query(sql!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE ($1::text IS NULL OR tenant_id = $1) \
             ORDER BY tenant_id, name, id"
        ))
        .bind(tenant_id)
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(principal_from_row)
        .collect()
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        query(sql!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(api_key_from_row)
        .transpose()
    }

    async fn api_keys_of(&self, principal_id: &str) -> Result<Vec<ApiKeyRow>, StoreError> {
        query(sql!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE principal_id = $1 ORDER BY created_at, id"
        ))
        .bind(principal_id)
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(api_key_from_row)
        .collect()
    }
}

#[async_trait]
impl<T: TxDb> AccessTx for T {
    async fn insert_tenant(&mut self, row: &TenantRow) -> Result<bool, StoreError> {
        insert_tenant_row(self, row).await
    }

    async fn tenant_exists(&mut self, id: &str) -> Result<bool, StoreError> {
        let found = query(sql!("SELECT 1 FROM tenants WHERE id = $1"))
            .bind(id)
            .fetch_optional(self)
            .await?;
        Ok(found.is_some())
    }

    async fn insert_principal(&mut self, row: &PrincipalRow) -> Result<bool, StoreError> {
        // Not `ON CONFLICT DO NOTHING`: that would also swallow a primary-key collision and
        // report it as a taken name. Only the two live-uniqueness indexes mean "taken"; on
        // PostgreSQL the savepoint keeps the transaction usable for the audit record after
        // one of them.
        savepoint(self, "principal_insert").await?;
        let result = query(sql!(
            "INSERT INTO principals (id, tenant_id, name, mtls_identity, permissions, \
             created_at, revoked_at, created_by, global_operator) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.name)
        .bind(&row.mtls_identity)
        .bind(row.permissions.join(" "))
        .bind(row.created_at)
        .bind(row.revoked_at)
        .bind(&row.created_by)
        .bind(row.global_operator)
        .execute(self)
        .await;
        let outcome = match result {
            Ok(_) => Ok(true),
            Err(err)
                if unique_violation(
                    &err,
                    "principals_live_name",
                    "principals.tenant_id, principals.name",
                ) || unique_violation(
                    &err,
                    "principals_live_mtls_identity",
                    "principals.mtls_identity",
                ) =>
            {
                Ok(false)
            }
            Err(err) => Err(err.into()),
        };
        let keep = matches!(outcome, Ok(true));
        end_savepoint(self, "principal_insert", keep, outcome).await
    }

    async fn revoke_principal(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE principals SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL"
        ))
        .bind(id)
        .bind(at)
        .execute(self)
        .await?;
        query(sql!(
            "UPDATE api_keys SET revoked_at = $2 WHERE principal_id = $1 AND revoked_at IS NULL"
        ))
        .bind(id)
        .bind(at)
        .execute(self)
        .await?;
        Ok(done == 1)
    }

    async fn insert_api_key(&mut self, row: &ApiKeyRow) -> Result<(), StoreError> {
        query(sql!(
            "INSERT INTO api_keys (id, principal_id, secret_hash, created_at, expires_at, \
             revoked_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&row.id)
        .bind(&row.principal_id)
        .bind(&row.secret_hash)
        .bind(row.created_at)
        .bind(row.expires_at)
        .bind(row.revoked_at)
        .bind(&row.created_by)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn revoke_api_key(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL"
        ))
        .bind(id)
        .bind(at)
        .execute(self)
        .await?;
        Ok(done == 1)
    }
}
