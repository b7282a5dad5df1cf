//! SQLite backend: the embedded default (one file in the data directory, WAL mode).

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Row, SqlitePool,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    CardInsert, CardRow, DekRow, ReuseKey, Store, StoreError, StoreOptions, TenantRow,
    metadata_from_json, metadata_to_json, narrow,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Columns of a card row, in the order `card_from_row` reads them by name.
macro_rules! card_columns {
    () => {
        "token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at"
    };
}

/// A pool of connections to one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by a `sqlite://PATH` URL.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::UnsupportedUrl)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged token must survive a power cut, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self { pool })
    }
}

fn micros(t: OffsetDateTime) -> i64 {
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

fn card_from_row(row: &SqliteRow) -> Result<CardRow, StoreError> {
    Ok(CardRow {
        token: row.try_get("token")?,
        tenant_id: row.try_get("tenant_id")?,
        token_format: row.try_get("token_format")?,
        fingerprint: row.try_get("fingerprint")?,
        dek_id: uuid_from_blob(row.try_get::<&[u8], _>("dek_id")?)?,
        ciphertext: row.try_get("ciphertext")?,
        brand: row.try_get("brand")?,
        last4: row.try_get("last4")?,
        bin: row.try_get("bin")?,
        exp_month: narrow(row.try_get::<i64, _>("exp_month")?, "exp_month")?,
        exp_year: narrow(row.try_get::<i64, _>("exp_year")?, "exp_year")?,
        metadata: metadata_from_json(row.try_get::<&str, _>("metadata")?)?,
        canonical: row.try_get("canonical")?,
        created_at: from_micros(row.try_get("created_at")?)?,
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(from_micros)
            .transpose()?,
    })
}

fn dek_from_row(row: &SqliteRow) -> Result<DekRow, StoreError> {
    Ok(DekRow {
        id: uuid_from_blob(row.try_get::<&[u8], _>("id")?)?,
        tenant_id: row.try_get("tenant_id")?,
        kek_version: narrow(row.try_get::<i64, _>("kek_version")?, "kek_version")?,
        wrapped_key: row.try_get("wrapped_key")?,
        active: row.try_get("active")?,
        created_at: from_micros(row.try_get("created_at")?)?,
    })
}

/// SQLite names the violated index by its exact column list ("UNIQUE constraint failed:
/// cards.token"), not by its name; compare the whole list, since one column name can be a
/// prefix of another (`cards.token` / `cards.token_format`).
fn unique_violation_on(err: &sqlx::Error, columns: &str) -> bool {
    matches!(err, sqlx::Error::Database(db)
        if db.is_unique_violation()
            && db.message().strip_prefix("UNIQUE constraint failed: ") == Some(columns))
}

type ArgQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds the five `ReuseKey` columns as the first parameters, in the order the reuse
/// queries name them (tenant, fingerprint, expiry month, expiry year, token format).
fn bind_reuse_key<'q>(query: ArgQuery<'q>, key: ReuseKey<'_>) -> ArgQuery<'q> {
    query
        .bind(key.tenant_id)
        .bind(key.fingerprint)
        .bind(i64::from(key.exp_month))
        .bind(i64::from(key.exp_year))
        .bind(key.token_format)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
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
            "SELECT id, wrapped_secret, secret_kek_version, created_at FROM tenants WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(TenantRow {
                id: row.try_get("id")?,
                wrapped_secret: row.try_get("wrapped_secret")?,
                secret_kek_version: narrow(row.try_get("secret_kek_version")?, "kek_version")?,
                created_at: from_micros(row.try_get("created_at")?)?,
            })
        })
        .transpose()
    }

    async fn insert_tenant(&self, row: &TenantRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.wrapped_secret)
        .bind(i64::from(row.secret_kek_version))
        .bind(micros(row.created_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn active_dek(&self, tenant_id: &str) -> Result<Option<DekRow>, StoreError> {
        sqlx::query(
            "SELECT id, tenant_id, kek_version, wrapped_key, active, created_at \
             FROM data_keys WHERE tenant_id = ?1 AND active = 1",
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
             FROM data_keys WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(tenant_id)
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn insert_active_dek(&self, row: &DekRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO data_keys (id, tenant_id, kek_version, wrapped_key, active, created_at) \
             VALUES (?1, ?2, ?3, ?4, 1, ?5) ON CONFLICT (tenant_id) WHERE active = 1 DO NOTHING",
        )
        .bind(row.id.as_bytes().as_slice())
        .bind(&row.tenant_id)
        .bind(i64::from(row.kek_version))
        .bind(&row.wrapped_key)
        .bind(micros(row.created_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_card(&self, row: &CardRow) -> Result<CardInsert, StoreError> {
        let result = sqlx::query(
            "INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
             brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .bind(&row.token)
        .bind(&row.tenant_id)
        .bind(&row.token_format)
        .bind(&row.fingerprint)
        .bind(row.dek_id.as_bytes().as_slice())
        .bind(&row.ciphertext)
        .bind(&row.brand)
        .bind(&row.last4)
        .bind(&row.bin)
        .bind(i64::from(row.exp_month))
        .bind(i64::from(row.exp_year))
        .bind(metadata_to_json(&row.metadata))
        .bind(row.canonical)
        .bind(micros(row.created_at))
        .bind(row.expires_at.map(micros))
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(CardInsert::Inserted),
            Err(err) if unique_violation_on(&err, "cards.token") => Ok(CardInsert::TokenTaken),
            Err(err)
                if unique_violation_on(
                    &err,
                    "cards.tenant_id, cards.fingerprint, cards.exp_month, cards.exp_year, \
                     cards.token_format",
                ) =>
            {
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
            " FROM cards WHERE token = ?1 AND tenant_id = ?2 \
             AND (expires_at IS NULL OR expires_at > ?3)"
        ))
        .bind(token)
        .bind(tenant_id)
        .bind(micros(now))
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
                " FROM cards WHERE tenant_id = ?1 AND fingerprint = ?2 \
             AND exp_month = ?3 AND exp_year = ?4 AND token_format = ?5 \
             AND (expires_at IS NULL OR expires_at > ?6) \
             ORDER BY canonical DESC, created_at, token LIMIT 1"
            )),
            key,
        )
        .bind(micros(now))
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
                "DELETE FROM cards WHERE tenant_id = ?1 AND fingerprint = ?2 AND exp_month = ?3 \
             AND exp_year = ?4 AND token_format = ?5 AND canonical = 1 AND expires_at <= ?6",
            ),
            key,
        )
        .bind(micros(now))
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
            "DELETE FROM cards WHERE token = ?1 AND tenant_id = ?2 \
             AND (expires_at IS NULL OR expires_at > ?3)",
        )
        .bind(token)
        .bind(tenant_id)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM cards WHERE token IN (SELECT token FROM cards \
             WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
