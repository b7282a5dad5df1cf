//! PostgreSQL backend: the production store.

use async_trait::async_trait;
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    CardInsert, CardRow, DekRow, ReuseKey, Store, StoreError, StoreOptions, TenantRow,
    metadata_from_json, metadata_to_json, narrow,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Columns of a card row, in the order `card_from_row` reads them by name.
macro_rules! card_columns {
    () => {
        "token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin, exp_month, exp_year, metadata::text AS metadata, canonical, created_at, expires_at"
    };
}

/// A pool of connections to one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Creates the pool without connecting: the vault starts (and reports not ready) while the
    /// database is down, and requests fail with `UNAVAILABLE` instead of the process exiting.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect: PgConnectOptions = url.parse().map_err(|_| StoreError::UnsupportedUrl)?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.application_name("cardvault"));
        Ok(Self { pool })
    }

    /// The underlying pool, for tests and tools that inspect the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn card_from_row(row: &PgRow) -> Result<CardRow, StoreError> {
    Ok(CardRow {
        token: row.try_get("token")?,
        tenant_id: row.try_get("tenant_id")?,
        token_format: row.try_get("token_format")?,
        fingerprint: row.try_get("fingerprint")?,
        dek_id: row.try_get("dek_id")?,
        ciphertext: row.try_get("ciphertext")?,
        brand: row.try_get("brand")?,
        last4: row.try_get("last4")?,
        bin: row.try_get("bin")?,
        exp_month: narrow(i64::from(row.try_get::<i32, _>("exp_month")?), "exp_month")?,
        exp_year: narrow(i64::from(row.try_get::<i32, _>("exp_year")?), "exp_year")?,
        metadata: metadata_from_json(row.try_get::<&str, _>("metadata")?)?,
        canonical: row.try_get("canonical")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

fn dek_from_row(row: &PgRow) -> Result<DekRow, StoreError> {
    Ok(DekRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        kek_version: narrow(row.try_get::<i64, _>("kek_version")?, "kek_version")?,
        wrapped_key: row.try_get("wrapped_key")?,
        active: row.try_get("active")?,
        created_at: row.try_get("created_at")?,
    })
}

fn is_unique_violation(err: &sqlx::Error, constraint: &str) -> bool {
    matches!(err, sqlx::Error::Database(db)
        if db.is_unique_violation() && db.constraint() == Some(constraint))
}

type ArgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds the five `ReuseKey` columns as the first parameters, in the order the reuse
/// queries name them (tenant, fingerprint, expiry month, expiry year, token format).
fn bind_reuse_key<'q>(query: ArgQuery<'q>, key: ReuseKey<'_>) -> ArgQuery<'q> {
    query
        .bind(key.tenant_id)
        .bind(key.fingerprint)
        .bind(i32::from(key.exp_month))
        .bind(i32::from(key.exp_year))
        .bind(key.token_format)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|err| match err {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
            other => StoreError::Migrate(other),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn tenant(&self, id: &str) -> Result<Option<TenantRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, wrapped_secret, secret_kek_version, created_at FROM tenants WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(TenantRow {
                id: row.try_get("id")?,
                wrapped_secret: row.try_get("wrapped_secret")?,
                secret_kek_version: narrow(
                    row.try_get::<i64, _>("secret_kek_version")?,
                    "secret_kek_version",
                )?,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn insert_tenant(&self, row: &TenantRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.wrapped_secret)
        .bind(i64::from(row.secret_kek_version))
        .bind(row.created_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn active_dek(&self, tenant_id: &str) -> Result<Option<DekRow>, StoreError> {
        sqlx::query(
            "SELECT id, tenant_id, kek_version, wrapped_key, active, created_at \
             FROM data_keys WHERE tenant_id = $1 AND active",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<Option<DekRow>, StoreError> {
        sqlx::query(
            "SELECT id, tenant_id, kek_version, wrapped_key, active, created_at \
             FROM data_keys WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn insert_active_dek(&self, row: &DekRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO data_keys (id, tenant_id, kek_version, wrapped_key, active, created_at) \
             VALUES ($1, $2, $3, $4, TRUE, $5) \
             ON CONFLICT (tenant_id) WHERE active DO NOTHING",
        )
        .bind(row.id)
        .bind(&row.tenant_id)
        .bind(i64::from(row.kek_version))
        .bind(&row.wrapped_key)
        .bind(row.created_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_card(&self, row: &CardRow) -> Result<CardInsert, StoreError> {
        let result = sqlx::query(
            "INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
             brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15)",
        )
        .bind(&row.token)
        .bind(&row.tenant_id)
        .bind(&row.token_format)
        .bind(&row.fingerprint)
        .bind(row.dek_id)
        .bind(&row.ciphertext)
        .bind(&row.brand)
        .bind(&row.last4)
        .bind(&row.bin)
        .bind(i32::from(row.exp_month))
        .bind(i32::from(row.exp_year))
        .bind(metadata_to_json(&row.metadata))
        .bind(row.canonical)
        .bind(row.created_at)
        .bind(row.expires_at)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(CardInsert::Inserted),
            Err(err) if is_unique_violation(&err, "cards_pkey") => Ok(CardInsert::TokenTaken),
            Err(err) if is_unique_violation(&err, "cards_canonical") => {
                Ok(CardInsert::CanonicalExists)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            card_columns!(),
            " FROM cards WHERE token = $1 AND tenant_id = $2 \
             AND (expires_at IS NULL OR expires_at > $3)"
        ))
        .bind(token)
        .bind(tenant_id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(card_from_row)
        .transpose()
    }

    async fn reusable_card(
        &self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        bind_reuse_key(
            sqlx::query(concat!(
                "SELECT ",
                card_columns!(),
                " FROM cards WHERE tenant_id = $1 AND fingerprint = $2 \
             AND exp_month = $3 AND exp_year = $4 AND token_format = $5 \
             AND (expires_at IS NULL OR expires_at > $6) \
             ORDER BY canonical DESC, created_at, token LIMIT 1"
            )),
            key,
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(card_from_row)
        .transpose()
    }

    async fn delete_expired_canonical(
        &self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        bind_reuse_key(
            sqlx::query(
                "DELETE FROM cards WHERE tenant_id = $1 AND fingerprint = $2 AND exp_month = $3 \
             AND exp_year = $4 AND token_format = $5 AND canonical AND expires_at <= $6",
            ),
            key,
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "DELETE FROM cards WHERE token = $1 AND tenant_id = $2 \
             AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(token)
        .bind(tenant_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        // SKIP LOCKED lets several replicas sweep at once without waiting on each other.
        let done = sqlx::query(
            "DELETE FROM cards WHERE token IN (SELECT token FROM cards \
             WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
