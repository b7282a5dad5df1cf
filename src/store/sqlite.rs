//! SQLite backend: the embedded default (one file in the data directory, WAL mode).

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    Row, Sqlite, SqlitePool, Transaction,
    pool::PoolConnection,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiKeyRow, AuditCursor, AuditHeadRow, AuditKeyRow, AuditOutcome, AuditRow, CaptureMethod,
    CardInsert, CardRow, ChargeOperationKind, ChargeOperationRow, ChargeOperationState, ChargeRow,
    ChargeSettlement, ChargeState, CvcHoldRow, DekRow, DekUsage, ImportedCard, KekUsage,
    KeyJobKind, KeyJobRow, KeyJobState, KeyRequestKind, KeyRequestRow, KeyRequestState,
    OperationSettlement, PrincipalRow, ReuseKey, Rewrap, SealedRecord, Shredded, Store, StoreError,
    StoreOptions, StoreTx, TenantRow, action_from_parts, metadata_from_json, metadata_to_json,
    narrow,
    pool::{Acquires, PoolStats},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Columns of a card row, in the order `card_from_row` reads them by name.
macro_rules! card_columns {
    () => {
        "token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at, honeytoken, import_id"
    };
}

/// Inserts one card row (17 parameters, in [`bind_card`] order).
macro_rules! insert_card_sql {
    ($conflict:literal) => {
        concat!(
            "INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
             brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at, \
             honeytoken, import_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            $conflict
        )
    };
}

/// Columns of a tenant row, as `tenant_from_row` reads them.
macro_rules! tenant_columns {
    () => {
        "id, wrapped_secret, secret_kek_version, created_at, shredded_at"
    };
}

/// Columns of a data key row, as `dek_from_row` reads them.
macro_rules! dek_columns {
    () => {
        "id, tenant_id, kek_version, wrapped_key, active, created_at, reserved, retired_at"
    };
}

macro_rules! key_job_columns {
    () => {
        "id, kind, state, tenant_id, done, total, requested_by, lease_owner, lease_until, created_at, updated_at, finished_at, error"
    };
}

macro_rules! key_request_columns {
    () => {
        "id, kind, target, requested_by, requested_at, expires_at, state, decided_by, decided_at, tenant_id, params"
    };
}

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

macro_rules! audit_columns {
    () => {
        "shard, seq, at, tenant_id, principal, action, token, outcome, alarm, peer, request_id, detail, mac"
    };
}

/// Columns of a charge row, as `charge_from_row` reads them.
macro_rules! charge_columns {
    () => {
        "id, tenant_id, idempotency_key, request_hash, token, gateway, amount, currency, capture, description, metadata, status, gateway_payment_id, decline_code, message, attempts, sending_until, created_at, updated_at, action_client_secret, action_type, action_redirect_url, action_json, reconcile_attempts, next_reconcile_at"
    };
}

/// Columns of a CVC hold row, as `cvc_hold_from_row` reads them (the sealed CVC is never
/// selected with a charge: only `charge_cvc` reads it, under these names).
macro_rules! cvc_hold_columns {
    () => {
        "token, tenant_id, dek_id, ciphertext, expires_at"
    };
}

/// A pool of connections to one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    acquires: Acquires,
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
        if !url.contains("mode=memory") {
            owner_only_files(connect.get_filename())?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self {
            pool,
            acquires: Acquires::new("sqlite"),
        })
    }

    /// A pooled connection, its wait counted and timed.
    async fn conn(&self) -> Result<PoolConnection<Sqlite>, sqlx::Error> {
        self.acquires.timed(self.pool.acquire()).await
    }

    /// `BEGIN IMMEDIATE` on a connection from [`SqliteStore::conn`]. `Transaction::begin` is
    /// what `Pool::begin_with` runs once it has a connection; calling it here keeps the pool
    /// wait measured apart from the wait for SQLite's write lock.
    async fn begin_immediate(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        Transaction::begin(
            self.conn().await?,
            Some(sqlx::SqlSafeStr::into_sql_str("BEGIN IMMEDIATE")),
        )
        .await
    }
}

/// Creates the database file owner-only (0600) if it is missing, and makes it and any
/// `-wal` and `-shm` file beside it owner-only if they are not — whatever the process umask
/// or the data directory's mode: they hold cards, wrapped keys and the audit log. SQLite
/// creates a missing `-wal` or `-shm` later with the main file's permissions (and sets them
/// so regardless of the umask), so those are owner-only too. An in-memory database (a
/// `file:` name) has no files.
fn owner_only_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    if path.as_os_str().to_string_lossy().starts_with("file:") {
        return Ok(());
    }
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::FileMode { path, source }
    };
    // Created here, before SQLite opens it, so it never exists with wider permissions.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(DATABASE_FILE_MODE)
        .open(path)
        .map_err(failed(path))?;
    let mut names = vec![path.to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        names.push(PathBuf::from(name));
    }
    for name in &names {
        let mode = match std::fs::metadata(name) {
            Ok(meta) => meta.permissions().mode() & 0o777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(failed(name)(e)),
        };
        if mode != DATABASE_FILE_MODE {
            std::fs::set_permissions(name, std::fs::Permissions::from_mode(DATABASE_FILE_MODE))
                .map_err(failed(name))?;
        }
    }
    Ok(())
}

/// Owner read and write, nobody else anything.
const DATABASE_FILE_MODE: u32 = 0o600;

fn micros(t: OffsetDateTime) -> i64 {
    // i128 → i64 cannot overflow for any year the vault accepts (±292,000 years).
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn from_micros(us: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|_| StoreError::Corrupt("timestamp out of range"))
}

/// A nullable timestamp column.
fn optional_time(row: &SqliteRow, name: &str) -> Result<Option<OffsetDateTime>, StoreError> {
    row.try_get::<Option<i64>, _>(name)?
        .map(from_micros)
        .transpose()
}

fn uuid_from_blob(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|_| StoreError::Corrupt("key id is not 16 bytes"))
}

/// A count or size for an INTEGER column.
fn int8_param(value: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(what))
}

/// A live card of one tenant by token, through the pool or inside a transaction.
async fn card_by_token<'e, E>(
    executor: E,
    tenant_id: &str,
    token: &str,
    now: OffsetDateTime,
) -> Result<Option<CardRow>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    sqlx::query(concat!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE token = ?1 AND tenant_id = ?2 \
         AND (expires_at IS NULL OR expires_at > ?3)"
    ))
    .bind(token)
    .bind(tenant_id)
    .bind(micros(now))
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(card_from_row)
    .transpose()
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
        honeytoken: row.try_get("honeytoken")?,
        import_id: row.try_get("import_id")?,
    })
}

/// Records how a send of a `pending` or `unknown` charge ended, through the pool or inside a
/// transaction (with the outcome's audit record); returns whether the charge changed.
async fn settle_charge_row<'e, E>(
    executor: E,
    id: &str,
    settlement: &ChargeSettlement,
    now: OffsetDateTime,
) -> Result<bool, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    // A payment id learnt by an earlier send is kept when this one brought none. A final
    // status ends the re-sends, and with them the need for the attached CVC. The action is
    // the latest outcome's: a charge that no longer waits for the cardholder has none.
    let action = settlement.action.as_ref();
    let done = sqlx::query(
        "UPDATE charges SET status = ?2, gateway_payment_id = COALESCE(?3, gateway_payment_id), \
         decline_code = ?4, message = ?5, sending_until = NULL, updated_at = ?6, \
         cvc_dek_id = CASE WHEN ?7 THEN NULL ELSE cvc_dek_id END, \
         cvc_ciphertext = CASE WHEN ?7 THEN NULL ELSE cvc_ciphertext END, \
         cvc_expires_at = CASE WHEN ?7 THEN NULL ELSE cvc_expires_at END, \
         action_client_secret = ?8, action_type = ?9, action_redirect_url = ?10, \
         action_json = ?11 \
         WHERE id = ?1 AND status IN ('pending', 'unknown')",
    )
    .bind(id)
    .bind(settlement.status.as_str())
    .bind(&settlement.gateway_payment_id)
    .bind(&settlement.decline_code)
    .bind(&settlement.message)
    .bind(micros(now))
    .bind(settlement.status != ChargeState::Unknown)
    .bind(action.and_then(|a| a.client_secret.as_deref()))
    .bind(action.and_then(|a| a.kind.as_deref()))
    .bind(action.and_then(|a| a.redirect_url.as_deref()))
    .bind(action.and_then(|a| a.details_json.as_deref()))
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts a tenant unless one with that id exists, through the pool or inside a
/// transaction. A new tenant is never shredded: `shredded_at` is written NULL.
async fn insert_tenant_row<'e, E>(executor: E, row: &TenantRow) -> Result<bool, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let done = sqlx::query(
        "INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at, shredded_at) \
         VALUES (?1, ?2, ?3, ?4, NULL) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&row.id)
    .bind(&row.wrapped_secret)
    .bind(i64::from(row.secret_kek_version))
    .bind(micros(row.created_at))
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts `row` as its tenant's active DEK (not retired, `reserved` as given) unless the
/// tenant has one (the partial unique index `data_keys_one_active` decides). A clash on the
/// primary key is an error.
async fn insert_active_dek_row<'e, E>(executor: E, row: &DekRow) -> Result<bool, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let done = sqlx::query(
        "INSERT INTO data_keys (id, tenant_id, kek_version, wrapped_key, active, created_at, \
         reserved, retired_at) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, NULL) \
         ON CONFLICT (tenant_id) WHERE active = 1 DO NOTHING",
    )
    .bind(row.id.as_bytes().as_slice())
    .bind(&row.tenant_id)
    .bind(i64::from(row.kek_version))
    .bind(&row.wrapped_key)
    .bind(micros(row.created_at))
    .bind(int8_param(row.reserved, "reserved out of range")?)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

fn tenant_from_row(row: &SqliteRow) -> Result<TenantRow, StoreError> {
    Ok(TenantRow {
        id: row.try_get("id")?,
        wrapped_secret: row.try_get("wrapped_secret")?,
        secret_kek_version: narrow(row.try_get("secret_kek_version")?, "kek_version")?,
        created_at: from_micros(row.try_get("created_at")?)?,
        shredded_at: optional_time(row, "shredded_at")?,
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
        reserved: narrow(row.try_get::<i64, _>("reserved")?, "reserved")?,
        retired_at: optional_time(row, "retired_at")?,
    })
}

fn charge_from_row(row: &SqliteRow) -> Result<ChargeRow, StoreError> {
    Ok(ChargeRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_hash: row.try_get("request_hash")?,
        token: row.try_get("token")?,
        gateway: row.try_get("gateway")?,
        amount: narrow(
            row.try_get::<i64, _>("amount")?,
            "a stored charge amount is out of range (negative)",
        )?,
        currency: row.try_get("currency")?,
        capture: CaptureMethod::parse(row.try_get("capture")?)?,
        description: row.try_get("description")?,
        metadata: metadata_from_json(row.try_get::<&str, _>("metadata")?)?,
        status: ChargeState::parse(row.try_get("status")?)?,
        gateway_payment_id: row.try_get("gateway_payment_id")?,
        decline_code: row.try_get("decline_code")?,
        message: row.try_get("message")?,
        attempts: narrow(row.try_get::<i64, _>("attempts")?, "charge attempts")?,
        sending_until: optional_time(row, "sending_until")?,
        created_at: from_micros(row.try_get("created_at")?)?,
        updated_at: from_micros(row.try_get("updated_at")?)?,
        action: action_from_parts(
            row.try_get("action_client_secret")?,
            row.try_get("action_type")?,
            row.try_get("action_redirect_url")?,
            row.try_get("action_json")?,
        ),
        reconcile_attempts: narrow(
            row.try_get::<i64, _>("reconcile_attempts")?,
            "charge reconcile attempts",
        )?,
        next_reconcile_at: optional_time(row, "next_reconcile_at")?,
    })
}

fn cvc_hold_from_row(row: &SqliteRow) -> Result<CvcHoldRow, StoreError> {
    Ok(CvcHoldRow {
        token: row.try_get("token")?,
        tenant_id: row.try_get("tenant_id")?,
        dek_id: uuid_from_blob(row.try_get::<&[u8], _>("dek_id")?)?,
        ciphertext: row.try_get("ciphertext")?,
        expires_at: from_micros(row.try_get("expires_at")?)?,
    })
}

/// Deletes the CVC holds of these tokens (cards just deleted in the same transaction), so
/// no hold outlives its card. One statement however many tokens: they travel as one JSON
/// array, as in `imported_cards`.
async fn delete_holds_of<'e, E>(executor: E, tokens: &[String]) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    if tokens.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM cvc_holds WHERE token IN (SELECT value FROM json_each(?1))")
        .bind(serde_json::Value::from(tokens.to_vec()).to_string())
        .execute(executor)
        .await?;
    Ok(())
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

/// Binds a card row's 17 columns in `insert_card_sql!` order.
fn bind_card<'q>(query: ArgQuery<'q>, row: &'q CardRow) -> ArgQuery<'q> {
    query
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
        .bind(row.honeytoken)
        .bind(&row.import_id)
}

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

    fn pool_stats(&self) -> Option<PoolStats> {
        Some(PoolStats {
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            max: self.pool.options().get_max_connections(),
            waiters: self.acquires.waiting(),
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|err| match err {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
            other => StoreError::Migrate(other),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let applied: Vec<i64> =
            match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
            {
                Ok(applied) => applied,
                // No migration table: nothing was ever applied.
                Err(sqlx::Error::Database(db)) if db.message().contains("no such table") => {
                    Vec::new()
                }
                Err(err) => return Err(err.into()),
            };
        Ok(super::pending(&MIGRATOR, &applied))
    }

    async fn tenant(&self, id: &str) -> Result<Option<TenantRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(tenant_from_row)
        .transpose()
    }

    async fn insert_tenant(&self, row: &TenantRow) -> Result<bool, StoreError> {
        insert_tenant_row(&mut *self.conn().await?, row).await
    }

    async fn active_dek(&self, tenant_id: &str) -> Result<Option<DekRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE tenant_id = ?1 AND active = 1"
        ))
        .bind(tenant_id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<Option<DekRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE tenant_id = ?1 AND id = ?2"
        ))
        .bind(tenant_id)
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(dek_from_row)
        .transpose()
    }

    async fn insert_active_dek(&self, row: &DekRow) -> Result<bool, StoreError> {
        insert_active_dek_row(&mut *self.conn().await?, row).await
    }

    async fn card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        card_by_token(&mut *self.conn().await?, tenant_id, token, now).await
    }

    async fn card_bin_at(
        &self,
        tenant_id: &str,
        from: &[u8],
    ) -> Result<Option<String>, StoreError> {
        // A range scan of `cards_by_fingerprint`, one row.
        Ok(sqlx::query_scalar(
            "SELECT bin FROM cards WHERE tenant_id = ?1 AND fingerprint >= ?2 AND honeytoken = 0 \
             ORDER BY fingerprint LIMIT 1",
        )
        .bind(tenant_id)
        .bind(from)
        .fetch_optional(&mut *self.conn().await?)
        .await?)
    }

    async fn fingerprint_in_use(
        &self,
        tenant_id: &str,
        fingerprint: &[u8],
    ) -> Result<bool, StoreError> {
        let found =
            sqlx::query("SELECT 1 FROM cards WHERE tenant_id = ?1 AND fingerprint = ?2 LIMIT 1")
                .bind(tenant_id)
                .bind(fingerprint)
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        Ok(found.is_some())
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        // IMMEDIATE takes the write lock now: a read-then-write transaction would otherwise
        // fail with SQLITE_BUSY when it tries to upgrade under concurrency.
        let tx = self.begin_immediate().await?;
        Ok(Box::new(SqliteTx { tx }))
    }

    async fn principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(principal_from_row)
        .transpose()
    }

    async fn principal_by_mtls_identity(
        &self,
        identity: &str,
    ) -> Result<Option<PrincipalRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE mtls_identity = ?1 AND revoked_at IS NULL"
        ))
        .bind(identity)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(principal_from_row)
        .transpose()
    }

    async fn principals(&self, tenant_id: Option<&str>) -> Result<Vec<PrincipalRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE (?1 IS NULL OR tenant_id = ?1) ORDER BY tenant_id, name, id"
        ))
        .bind(tenant_id)
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(principal_from_row)
        .collect()
    }

    async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(api_key_from_row)
        .transpose()
    }

    async fn api_keys_of(&self, principal_id: &str) -> Result<Vec<ApiKeyRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            api_key_columns!(),
            " FROM api_keys WHERE principal_id = ?1 ORDER BY created_at, id"
        ))
        .bind(principal_id)
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(api_key_from_row)
        .collect()
    }

    async fn audit_key(&self) -> Result<Option<AuditKeyRow>, StoreError> {
        let row = sqlx::query(
            "SELECT kek_version, wrapped_key, shards, created_at FROM audit_keys WHERE id = 1",
        )
        .fetch_optional(&mut *self.conn().await?)
        .await?;
        row.map(|row| {
            Ok(AuditKeyRow {
                kek_version: narrow(row.try_get("kek_version")?, "kek_version")?,
                wrapped_key: row.try_get("wrapped_key")?,
                shards: narrow(row.try_get("shards")?, "shards")?,
                created_at: from_micros(row.try_get("created_at")?)?,
            })
        })
        .transpose()
    }

    async fn audit_heads(&self) -> Result<Vec<AuditHeadRow>, StoreError> {
        sqlx::query("SELECT shard, seq, mac, head_mac FROM audit_heads ORDER BY shard")
            .fetch_all(&mut *self.conn().await?)
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
        sqlx::query(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_records WHERE shard = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        ))
        .bind(i64::from(shard))
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
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
        sqlx::query(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit_records WHERE at >= ?1 AND at < ?2 AND (?3 IS NULL OR tenant_id = ?3) \
             AND (at, shard, seq) > (?4, ?5, ?6) ORDER BY at, shard, seq LIMIT ?7"
        ))
        .bind(micros(from))
        .bind(micros(to))
        .bind(tenant_id)
        .bind(micros(at))
        .bind(shard)
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        // The cards and the CVC holds of their tokens in one transaction: the tokens the first
        // statement returns are the ones whose holds go.
        let mut tx = self.begin_immediate().await?;
        let tokens: Vec<String> = sqlx::query_scalar(
            "DELETE FROM cards WHERE token IN (SELECT token FROM cards \
             WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2) RETURNING token",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        delete_holds_of(&mut *tx, &tokens).await?;
        tx.commit().await?;
        Ok(u64::try_from(tokens.len()).unwrap_or(u64::MAX))
    }

    async fn kek_usage(&self) -> Result<Vec<KekUsage>, StoreError> {
        // One row per source and version, summed per version. Records count through the DEK
        // that sealed them, so a card counts under the version wrapping its DEK.
        sqlx::query(
            "SELECT version, sum(deks) AS deks, sum(secrets) AS secrets, \
             sum(audit_keys) AS audit_keys, sum(records) AS records FROM (\
               SELECT d.kek_version AS version, count(DISTINCT d.id) AS deks, 0 AS secrets, \
               0 AS audit_keys, count(c.dek_id) AS records \
               FROM data_keys d LEFT JOIN cards c ON c.dek_id = d.id GROUP BY d.kek_version \
               UNION ALL \
               SELECT secret_kek_version, 0, count(*), 0, 0 FROM tenants \
               WHERE shredded_at IS NULL GROUP BY secret_kek_version \
               UNION ALL \
               SELECT kek_version, 0, 0, count(*), 0 FROM audit_keys GROUP BY kek_version\
             ) AS per_source GROUP BY version ORDER BY version",
        )
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(kek_usage_from_row)
        .collect()
    }

    async fn dek_usage(&self, tenant_id: Option<&str>) -> Result<Vec<DekUsage>, StoreError> {
        // A count per DEK (a range of `cards_by_dek` each) rather than a join grouped over
        // every card: with a tenant given, only its DEKs' records are counted.
        sqlx::query(concat!(
            "SELECT ",
            dek_columns!(),
            ", (SELECT count(*) FROM cards WHERE cards.dek_id = data_keys.id) AS records \
             FROM data_keys WHERE (?1 IS NULL OR tenant_id = ?1) \
             ORDER BY tenant_id, active DESC, created_at DESC, id"
        ))
        .bind(tenant_id)
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(DekUsage {
                dek: dek_from_row(row)?,
                records: narrow(row.try_get::<i64, _>("records")?, "record count")?,
            })
        })
        .collect()
    }

    async fn deks_not_under(&self, version: u32, limit: u32) -> Result<Vec<DekRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE kek_version <> ?1 ORDER BY id LIMIT ?2"
        ))
        .bind(i64::from(version))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
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
        sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE secret_kek_version <> ?1 AND shredded_at IS NULL \
             ORDER BY id LIMIT ?2"
        ))
        .bind(i64::from(version))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(tenant_from_row)
        .collect()
    }

    async fn rewrap_deks(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError> {
        if rewraps.is_empty() {
            return Ok(0);
        }
        // In-process, one statement per key costs no round trip; one transaction makes the
        // batch one fsync.
        let mut tx = self.begin_immediate().await?;
        let mut replaced = 0;
        for r in rewraps {
            // An id that is not a UUID names no DEK; like one rewrapped meanwhile, it is skipped.
            let Ok(id) = Uuid::parse_str(&r.id) else {
                continue;
            };
            replaced += sqlx::query(
                "UPDATE data_keys SET kek_version = ?3, wrapped_key = ?4 \
                 WHERE id = ?1 AND kek_version = ?2",
            )
            .bind(id.as_bytes().as_slice())
            .bind(i64::from(r.old_version))
            .bind(i64::from(r.new_version))
            .bind(&r.wrapped)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(replaced)
    }

    async fn rewrap_tenant_secrets(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError> {
        if rewraps.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_immediate().await?;
        let mut replaced = 0;
        for r in rewraps {
            // A shredded tenant's erased secret is never given a wrapped one back.
            replaced += sqlx::query(
                "UPDATE tenants SET secret_kek_version = ?3, wrapped_secret = ?4 \
                 WHERE id = ?1 AND secret_kek_version = ?2 AND shredded_at IS NULL",
            )
            .bind(&r.id)
            .bind(i64::from(r.old_version))
            .bind(i64::from(r.new_version))
            .bind(&r.wrapped)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(replaced)
    }

    async fn rewrap_audit_key(&self, rewrap: &Rewrap) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE audit_keys SET kek_version = ?2, wrapped_key = ?3 \
             WHERE id = 1 AND kek_version = ?1",
        )
        .bind(i64::from(rewrap.old_version))
        .bind(i64::from(rewrap.new_version))
        .bind(&rewrap.wrapped)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotate_dek(
        &self,
        tenant_id: &str,
        old: Option<Uuid>,
        new: &DekRow,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        if let Some(old) = old {
            let done = sqlx::query(
                "UPDATE data_keys SET active = 0, retired_at = ?3 \
                 WHERE id = ?1 AND tenant_id = ?2 AND active = 1",
            )
            .bind(old.as_bytes().as_slice())
            .bind(tenant_id)
            .bind(micros(at))
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        // With `old` None, an active DEK that exists makes the insert do nothing: the same
        // answer as checking for one beforehand.
        if !insert_active_dek_row(&mut *tx, new).await? {
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
        sqlx::query(
            "UPDATE data_keys SET reserved = reserved + ?2 \
             WHERE id = ?1 AND active = 1 AND reserved <= ?3 RETURNING reserved",
        )
        .bind(dek_id.as_bytes().as_slice())
        .bind(int8_param(count, "encryption count out of range")?)
        .bind(i64::try_from(room).unwrap_or(i64::MAX))
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .map(|row| narrow(row.try_get::<i64, _>("reserved")?, "reserved"))
        .transpose()
    }

    async fn retired_deks(&self, tenant_id: Option<&str>) -> Result<Vec<DekRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            dek_columns!(),
            " FROM data_keys WHERE active = 0 AND (?1 IS NULL OR tenant_id = ?1) \
             ORDER BY created_at, id"
        ))
        .bind(tenant_id)
        .fetch_all(&mut *self.conn().await?)
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
        sqlx::query(
            "SELECT token, tenant_id, dek_id, ciphertext FROM cards \
             WHERE dek_id = ?1 AND token > ?2 ORDER BY token LIMIT ?3",
        )
        .bind(dek_id.as_bytes().as_slice())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(SealedRecord {
                token: row.try_get("token")?,
                tenant_id: row.try_get("tenant_id")?,
                dek_id: uuid_from_blob(row.try_get::<&[u8], _>("dek_id")?)?,
                ciphertext: row.try_get("ciphertext")?,
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
        let mut tx = self.begin_immediate().await?;
        let mut replaced = 0;
        for r in records {
            replaced += sqlx::query(
                "UPDATE cards SET dek_id = ?4, ciphertext = ?5 \
                 WHERE token = ?2 AND tenant_id = ?3 AND dek_id = ?1",
            )
            .bind(old_dek.as_bytes().as_slice())
            .bind(&r.token)
            .bind(&r.tenant_id)
            .bind(r.dek_id.as_bytes().as_slice())
            .bind(&r.ciphertext)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(replaced)
    }

    async fn destroy_dek(
        &self,
        id: Uuid,
        retired_before: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // Writes are serialized: no card can be committed between the check and the delete.
        let done = sqlx::query(
            "DELETE FROM data_keys WHERE id = ?1 AND active = 0 AND retired_at < ?2 \
             AND NOT EXISTS (SELECT 1 FROM cards WHERE dek_id = ?1)",
        )
        .bind(id.as_bytes().as_slice())
        .bind(micros(retired_before))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_key_job(&self, row: &KeyJobRow) -> Result<bool, StoreError> {
        // The conflict target is the partial index only: a clash on the primary key stays an
        // error.
        let done = sqlx::query(
            "INSERT INTO key_jobs (id, kind, state, tenant_id, done, total, requested_by, \
             lease_owner, lease_until, created_at, updated_at, finished_at, error) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (kind) WHERE state = 'running' DO NOTHING",
        )
        .bind(&row.id)
        .bind(row.kind.as_str())
        .bind(row.state.as_str())
        .bind(&row.tenant_id)
        .bind(int8_param(row.done, "job progress out of range")?)
        .bind(int8_param(row.total, "job total out of range")?)
        .bind(&row.requested_by)
        .bind(&row.lease_owner)
        .bind(row.lease_until.map(micros))
        .bind(micros(row.created_at))
        .bind(micros(row.updated_at))
        .bind(row.finished_at.map(micros))
        .bind(&row.error)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn key_jobs(&self, limit: u32) -> Result<Vec<KeyJobRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_job_columns!(),
            " FROM key_jobs WHERE state = 'running' OR id IN (SELECT id FROM key_jobs \
             WHERE state <> 'running' ORDER BY created_at DESC, id DESC LIMIT ?1) \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(key_job_from_row)
        .collect()
    }

    async fn claim_key_job(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Option<KeyJobRow>, StoreError> {
        // One statement, and SQLite serializes writers: two claims cannot both see the job
        // free.
        sqlx::query(concat!(
            "UPDATE key_jobs SET lease_owner = ?1, lease_until = ?3, updated_at = ?2 \
             WHERE id = (SELECT id FROM key_jobs WHERE state = 'running' \
               AND (lease_owner IS NULL OR lease_until < ?2 OR lease_owner = ?1) \
               ORDER BY created_at, id LIMIT 1) \
             RETURNING ",
            key_job_columns!()
        ))
        .bind(owner)
        .bind(micros(now))
        .bind(micros(lease_until))
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(key_job_from_row)
        .transpose()
    }

    async fn key_job_progress(
        &self,
        id: &str,
        owner: &str,
        done: u64,
        total: u64,
        lease_until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The trait passes no time for `updated_at`; the vault's clock stands in for it.
        let updated = sqlx::query(
            "UPDATE key_jobs SET done = ?3, total = ?4, lease_until = ?5, updated_at = ?6 \
             WHERE id = ?1 AND lease_owner = ?2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(int8_param(done, "job progress out of range")?)
        .bind(int8_param(total, "job total out of range")?)
        .bind(micros(lease_until))
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn finish_key_job(
        &self,
        id: &str,
        owner: &str,
        state: KeyJobState,
        error: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE key_jobs SET state = ?3, error = ?4, finished_at = ?5, updated_at = ?5, \
             lease_owner = NULL, lease_until = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(state.as_str())
        .bind(error)
        .bind(micros(at))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_request_columns!(),
            " FROM key_requests WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(key_request_from_row)
        .transpose()
    }

    async fn pending_key_requests(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<KeyRequestRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_request_columns!(),
            " FROM key_requests WHERE state = 'pending' AND expires_at > ?1 \
             ORDER BY requested_at, id"
        ))
        .bind(micros(now))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(key_request_from_row)
        .collect()
    }

    async fn claim_kek_rotation(
        &self,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The first claim ever creates the row; later ones take it over only from a lease
        // that ran out. SQLite runs one writer at a time, so claimants are serialized.
        let done = sqlx::query(
            "INSERT INTO kek_rotation (id, version, lease_owner, lease_until, updated_at) \
             VALUES (1, 0, ?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET lease_owner = ?1, lease_until = ?2, updated_at = ?3 \
             WHERE kek_rotation.lease_until IS NULL OR kek_rotation.lease_until <= ?3",
        )
        .bind(owner)
        .bind(micros(until))
        .bind(micros(now))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_kek_rotation(
        &self,
        owner: &str,
        version: Option<u32>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE kek_rotation SET version = COALESCE(?2, version), lease_owner = NULL, \
             lease_until = NULL, updated_at = ?3 WHERE id = 1 AND lease_owner = ?1",
        )
        .bind(owner)
        .bind(version.map(i64::from))
        .bind(micros(now))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotated_kek_version(&self) -> Result<Option<u32>, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM kek_rotation WHERE id = 1 AND version > 0")
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        version.map(|v| narrow(v, "kek_version")).transpose()
    }

    async fn insert_charge(&self, row: &ChargeRow) -> Result<Option<ChargeRow>, StoreError> {
        // The conflict target is the idempotency index only: a clash on the primary key stays
        // an error.
        let done = sqlx::query(
            "INSERT INTO charges (id, tenant_id, idempotency_key, request_hash, token, gateway, \
             amount, currency, capture, description, metadata, status, gateway_payment_id, \
             decline_code, message, attempts, sending_until, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.idempotency_key)
        .bind(&row.request_hash)
        .bind(&row.token)
        .bind(&row.gateway)
        .bind(int8_param(
            row.amount,
            "a charge amount is larger than the database holds",
        )?)
        .bind(&row.currency)
        .bind(row.capture.as_str())
        .bind(&row.description)
        .bind(metadata_to_json(&row.metadata))
        .bind(row.status.as_str())
        .bind(&row.gateway_payment_id)
        .bind(&row.decline_code)
        .bind(&row.message)
        .bind(i64::from(row.attempts))
        .bind(row.sending_until.map(micros))
        .bind(micros(row.created_at))
        .bind(micros(row.updated_at))
        .execute(&mut *self.conn().await?)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(None);
        }
        // Charges are never deleted, so the row that clashed is there to read.
        match self
            .charge_by_key(&row.tenant_id, &row.idempotency_key)
            .await?
        {
            Some(existing) => Ok(Some(existing)),
            None => Err(StoreError::Corrupt(
                "charge clashed on its key but is not there",
            )),
        }
    }

    async fn charge_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE tenant_id = ?1 AND idempotency_key = ?2"
        ))
        .bind(tenant_id)
        .bind(idempotency_key)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(charge_from_row)
        .transpose()
    }

    async fn charge(&self, id: &str) -> Result<Option<ChargeRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(charge_from_row)
        .transpose()
    }

    async fn claim_charge_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // One statement, and SQLite serializes writers: two claims cannot both see the charge
        // free.
        let done = sqlx::query(
            "UPDATE charges SET sending_until = ?3, attempts = attempts + 1, updated_at = ?2 \
             WHERE id = ?1 AND status IN ('pending', 'unknown') \
             AND (sending_until IS NULL OR sending_until < ?2)",
        )
        .bind(id)
        .bind(micros(now))
        .bind(micros(until))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn settle_charge(
        &self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        settle_charge_row(&mut *self.conn().await?, id, settlement, now).await
    }

    async fn unsettled_charges(
        &self,
        tenant_id: Option<&str>,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE (status = 'unknown' OR (status = 'pending' \
             AND (sending_until IS NULL OR sending_until < ?2))) \
             AND (?1 IS NULL OR tenant_id = ?1) ORDER BY created_at, id LIMIT ?3"
        ))
        .bind(tenant_id)
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(charge_from_row)
        .collect()
    }

    async fn charges_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE (status = 'unknown' OR (status = 'pending' \
             AND (sending_until IS NULL OR sending_until < ?1))) \
             AND (next_reconcile_at IS NULL OR next_reconcile_at <= ?1) \
             ORDER BY created_at, id LIMIT ?2"
        ))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(charge_from_row)
        .collect()
    }

    async fn defer_charge_reconcile(
        &self,
        id: &str,
        attempts: u32,
        next_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE charges SET reconcile_attempts = ?2, next_reconcile_at = ?3 \
             WHERE id = ?1 AND status IN ('pending', 'unknown')",
        )
        .bind(id)
        .bind(i64::from(attempts))
        .bind(micros(next_at))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn unknown_charge_counts(
        &self,
        overdue_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError> {
        let (all, overdue): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN created_at < ?1 THEN 1 ELSE 0 END), 0) \
             FROM charges WHERE status = 'unknown'",
        )
        .bind(micros(overdue_before))
        .fetch_one(&mut *self.conn().await?)
        .await?;
        Ok((
            narrow(all, "unknown charges")?,
            narrow(overdue, "overdue charges")?,
        ))
    }

    async fn mark_charge_alarmed(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE charges SET alarmed_at = ?2 WHERE id = ?1 AND alarmed_at IS NULL")
                .bind(id)
                .bind(micros(now))
                .execute(&mut *self.conn().await?)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim_job_lease(
        &self,
        name: &str,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // One statement: the insert, or the update of a lapsed or own lease. A lease another
        // owner holds makes the update's WHERE false, and nothing changes.
        let done = sqlx::query(
            "INSERT INTO job_leases (name, owner, lease_until) VALUES (?1, ?2, ?4) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, \
             lease_until = excluded.lease_until \
             WHERE job_leases.lease_until < ?3 OR job_leases.owner = excluded.owner",
        )
        .bind(name)
        .bind(owner)
        .bind(micros(now))
        .bind(micros(until))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_job_lease(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM job_leases WHERE name = ?1 AND owner = ?2")
            .bind(name)
            .bind(owner)
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    async fn attach_charge_cvc(
        &self,
        charge_id: &str,
        hold: &CvcHoldRow,
    ) -> Result<(), StoreError> {
        // Only to an unsettled charge of the hold's own tenant and token: a charge that
        // settled meanwhile must not get a CVC back (settling erased it), and a hold never
        // moves to another card. Otherwise nothing is stored.
        sqlx::query(
            "UPDATE charges SET cvc_dek_id = ?4, cvc_ciphertext = ?5, cvc_expires_at = ?6 \
             WHERE id = ?1 AND tenant_id = ?2 AND token = ?3 \
             AND status IN ('pending', 'unknown')",
        )
        .bind(charge_id)
        .bind(&hold.tenant_id)
        .bind(&hold.token)
        .bind(hold.dek_id.as_bytes().as_slice())
        .bind(&hold.ciphertext)
        .bind(micros(hold.expires_at))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    async fn charge_cvc(
        &self,
        charge_id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError> {
        sqlx::query(
            "SELECT token, tenant_id, cvc_dek_id AS dek_id, cvc_ciphertext AS ciphertext, \
             cvc_expires_at AS expires_at FROM charges \
             WHERE id = ?1 AND cvc_dek_id IS NOT NULL AND cvc_ciphertext IS NOT NULL \
             AND cvc_expires_at > ?2",
        )
        .bind(charge_id)
        .bind(micros(now))
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(cvc_hold_from_row)
        .transpose()
    }

    async fn erase_expired_charge_cvcs(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // Bounded per statement like the other sweeps. No index serves `cvc_expires_at`: the
        // subquery scans the charges.
        let done = sqlx::query(
            "UPDATE charges SET cvc_dek_id = NULL, cvc_ciphertext = NULL, cvc_expires_at = NULL \
             WHERE id IN (SELECT id FROM charges WHERE cvc_expires_at <= ?1 \
             ORDER BY cvc_expires_at LIMIT ?2)",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected())
    }

    async fn put_cvc_hold(&self, row: &CvcHoldRow) -> Result<(), StoreError> {
        // A token belongs to one tenant; the update's WHERE keeps a put naming another tenant
        // from replacing (and so destroying) that tenant's hold: it changes nothing instead.
        sqlx::query(
            "INSERT INTO cvc_holds (token, tenant_id, dek_id, ciphertext, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (token) DO UPDATE SET dek_id = excluded.dek_id, \
             ciphertext = excluded.ciphertext, expires_at = excluded.expires_at \
             WHERE cvc_holds.tenant_id = excluded.tenant_id",
        )
        .bind(&row.token)
        .bind(&row.tenant_id)
        .bind(row.dek_id.as_bytes().as_slice())
        .bind(&row.ciphertext)
        .bind(micros(row.expires_at))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(())
    }

    async fn take_cvc_hold(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError> {
        // The tenant's hold is deleted whether or not it is still live, and returned only if
        // it is: an expired CVC goes at the first chance rather than waiting for the sweeper.
        // One statement, and writers are serialized: of two takes, one gets the hold.
        let Some(row) = sqlx::query(concat!(
            "DELETE FROM cvc_holds WHERE token = ?1 AND tenant_id = ?2 RETURNING ",
            cvc_hold_columns!()
        ))
        .bind(token)
        .bind(tenant_id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        else {
            return Ok(None);
        };
        let hold = cvc_hold_from_row(&row)?;
        Ok((hold.expires_at > now).then_some(hold))
    }

    async fn delete_expired_cvc_holds(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM cvc_holds WHERE token IN (SELECT token FROM cvc_holds \
             WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected())
    }

    async fn charge_operation_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeOperationRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_operation_columns!(),
            " FROM charge_operations WHERE tenant_id = ?1 AND idempotency_key = ?2"
        ))
        .bind(tenant_id)
        .bind(idempotency_key)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(charge_operation_from_row)
        .transpose()
    }

    async fn charge_operation(&self, id: &str) -> Result<Option<ChargeOperationRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_operation_columns!(),
            " FROM charge_operations WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.conn().await?)
        .await?
        .as_ref()
        .map(charge_operation_from_row)
        .transpose()
    }

    async fn claim_charge_operation_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // One statement, and SQLite serializes writers: two claims cannot both see it free.
        let done = sqlx::query(
            "UPDATE charge_operations SET sending_until = ?3, attempts = attempts + 1, \
             updated_at = ?2 WHERE id = ?1 AND status IN ('pending', 'unknown') \
             AND (sending_until IS NULL OR sending_until < ?2)",
        )
        .bind(id)
        .bind(micros(now))
        .bind(micros(until))
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// One SQLite transaction (`BEGIN IMMEDIATE`).
struct SqliteTx {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
}

#[async_trait]
impl StoreTx for SqliteTx {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    async fn insert_tenant(&mut self, row: &TenantRow) -> Result<bool, StoreError> {
        insert_tenant_row(&mut *self.tx, row).await
    }

    async fn tenant_exists(&mut self, id: &str) -> Result<bool, StoreError> {
        let found = sqlx::query("SELECT 1 FROM tenants WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(found.is_some())
    }

    async fn insert_principal(&mut self, row: &PrincipalRow) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO principals (id, tenant_id, name, mtls_identity, permissions, created_at, \
             revoked_at, created_by, global_operator) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.name)
        .bind(&row.mtls_identity)
        .bind(row.permissions.join(" "))
        .bind(micros(row.created_at))
        .bind(row.revoked_at.map(micros))
        .bind(&row.created_by)
        .bind(row.global_operator)
        .execute(&mut *self.tx)
        .await;
        match result {
            Ok(_) => Ok(true),
            Err(err)
                if unique_violation_on(&err, "principals.tenant_id, principals.name")
                    || unique_violation_on(&err, "principals.mtls_identity") =>
            {
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn revoke_principal(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE principals SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(micros(at))
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = ?2 WHERE principal_id = ?1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(micros(at))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_api_key(&mut self, row: &ApiKeyRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, principal_id, secret_hash, created_at, expires_at, \
             revoked_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&row.id)
        .bind(&row.principal_id)
        .bind(&row.secret_hash)
        .bind(micros(row.created_at))
        .bind(row.expires_at.map(micros))
        .bind(row.revoked_at.map(micros))
        .bind(&row.created_by)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn revoke_api_key(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
                .bind(id)
                .bind(micros(at))
                .execute(&mut *self.tx)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_card(&mut self, row: &CardRow) -> Result<CardInsert, StoreError> {
        let result = bind_card(sqlx::query(insert_card_sql!("")), row)
            .execute(&mut *self.tx)
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

    async fn insert_cards(&mut self, rows: &[&CardRow]) -> Result<Vec<bool>, StoreError> {
        // SQLite runs in-process: one prepared statement per row costs no round trip, and a
        // multi-row VALUES list would only add parameter-limit bookkeeping.
        let first = super::first_of_each_token(rows);
        let mut stored = Vec::with_capacity(rows.len());
        for (row, first) in rows.iter().zip(first) {
            let inserted = first
                && bind_card(
                    sqlx::query(insert_card_sql!(" ON CONFLICT DO NOTHING")),
                    row,
                )
                .execute(&mut *self.tx)
                .await?
                .rows_affected()
                    == 1;
            stored.push(inserted);
        }
        Ok(stored)
    }

    async fn card(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        card_by_token(&mut *self.tx, tenant_id, token, now).await
    }

    async fn reusable_card(
        &mut self,
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
        .fetch_optional(&mut *self.tx)
        .await?
        .as_ref()
        .map(card_from_row)
        .transpose()
    }

    async fn delete_expired_canonical(
        &mut self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let tokens = bind_reuse_key(
            sqlx::query(
                "DELETE FROM cards WHERE tenant_id = ?1 AND fingerprint = ?2 AND exp_month = ?3 \
             AND exp_year = ?4 AND token_format = ?5 AND canonical = 1 AND expires_at <= ?6 \
             RETURNING token",
            ),
            key,
        )
        .bind(micros(now))
        .fetch_all(&mut *self.tx)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>("token"))
        .collect::<Result<Vec<_>, _>>()?;
        delete_holds_of(&mut *self.tx, &tokens).await
    }

    async fn delete_card(
        &mut self,
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
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() != 1 {
            // The hold goes only with the card: another tenant naming this token deletes
            // neither.
            return Ok(false);
        }
        sqlx::query("DELETE FROM cvc_holds WHERE token = ?1")
            .bind(token)
            .execute(&mut *self.tx)
            .await?;
        Ok(true)
    }

    async fn insert_audit_key(&mut self, row: &AuditKeyRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO audit_keys (id, kek_version, wrapped_key, shards, created_at) \
             VALUES (1, ?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(i64::from(row.kek_version))
        .bind(&row.wrapped_key)
        .bind(i64::from(row.shards))
        .bind(micros(row.created_at))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_audit_head(&mut self, head: &AuditHeadRow) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit_heads (shard, seq, mac, head_mac) VALUES (?1, ?2, ?3, ?4)")
            .bind(i64::from(head.shard))
            .bind(i64::try_from(head.seq).map_err(|_| StoreError::Corrupt("audit seq"))?)
            .bind(&head.mac)
            .bind(&head.head_mac)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn lock_audit_head(&mut self, shard: u32) -> Result<Option<AuditHeadRow>, StoreError> {
        // The IMMEDIATE transaction already holds SQLite's one write lock.
        sqlx::query("SELECT shard, seq, mac, head_mac FROM audit_heads WHERE shard = ?1")
            .bind(i64::from(shard))
            .fetch_optional(&mut *self.tx)
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
        for record in records {
            let seq = i64::try_from(record.seq).map_err(|_| StoreError::Corrupt("audit seq"))?;
            sqlx::query(
                "INSERT INTO audit_records (shard, seq, at, tenant_id, principal, action, token, \
                 outcome, alarm, peer, request_id, detail, mac) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .bind(i64::from(record.shard))
            .bind(seq)
            .bind(micros(record.at))
            .bind(&record.tenant_id)
            .bind(&record.principal)
            .bind(&record.action)
            .bind(&record.token)
            .bind(record.outcome.as_str())
            .bind(record.alarm)
            .bind(&record.peer)
            .bind(&record.request_id)
            .bind(&record.detail)
            .bind(&record.mac)
            .execute(&mut *self.tx)
            .await?;
        }
        let done = sqlx::query(
            "UPDATE audit_heads SET seq = ?2, mac = ?3, head_mac = ?4 WHERE shard = ?1",
        )
        .bind(i64::from(head.shard))
        .bind(i64::try_from(head.seq).map_err(|_| StoreError::Corrupt("audit seq"))?)
        .bind(&head.mac)
        .bind(&head.head_mac)
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Corrupt("audit chain head missing"));
        }
        Ok(())
    }

    async fn insert_key_request(&mut self, row: &KeyRequestRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO key_requests (id, kind, target, requested_by, requested_at, expires_at, \
             state, decided_by, decided_at, tenant_id, params) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(&row.id)
        .bind(row.kind.as_str())
        .bind(&row.target)
        .bind(&row.requested_by)
        .bind(micros(row.requested_at))
        .bind(micros(row.expires_at))
        .bind(row.state.as_str())
        .bind(&row.decided_by)
        .bind(row.decided_at.map(micros))
        .bind(&row.tenant_id)
        .bind(&row.params)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn decide_key_request(
        &mut self,
        id: &str,
        state: KeyRequestState,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE key_requests SET state = ?2, decided_by = ?3, decided_at = ?4 \
             WHERE id = ?1 AND state = 'pending'",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(by)
        .bind(micros(at))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn shred_tenant(
        &mut self,
        tenant_id: &str,
        at: OffsetDateTime,
    ) -> Result<Shredded, StoreError> {
        // Cards first: they reference the data keys. CVC holds are sealed by the data keys
        // too (without a foreign key): they go before the keys, like the cards.
        let cards = sqlx::query("DELETE FROM cards WHERE tenant_id = ?1")
            .bind(tenant_id)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM cvc_holds WHERE tenant_id = ?1")
            .bind(tenant_id)
            .execute(&mut *self.tx)
            .await?;
        // The tenant's charges stay: without their CVCs they hold no card data (token,
        // amounts, gateway ids and outcomes), and they are its financial record, which
        // outlives its cards (no foreign key ties a charge to a card). Their CVCs go.
        sqlx::query(
            "UPDATE charges SET cvc_dek_id = NULL, cvc_ciphertext = NULL, cvc_expires_at = NULL \
             WHERE tenant_id = ?1 AND cvc_ciphertext IS NOT NULL",
        )
        .bind(tenant_id)
        .execute(&mut *self.tx)
        .await?;
        let deks = sqlx::query("DELETE FROM data_keys WHERE tenant_id = ?1")
            .bind(tenant_id)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        // Shredding again keeps the time of the first.
        sqlx::query(
            "UPDATE tenants SET wrapped_secret = X'', shredded_at = COALESCE(shredded_at, ?2) \
             WHERE id = ?1",
        )
        .bind(tenant_id)
        .bind(micros(at))
        .execute(&mut *self.tx)
        .await?;
        let live: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM principals WHERE tenant_id = ?1 AND revoked_at IS NULL ORDER BY id",
        )
        .bind(tenant_id)
        .fetch_all(&mut *self.tx)
        .await?;
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

    async fn imported_cards(
        &mut self,
        tenant_id: &str,
        import_ids: &[&str],
    ) -> Result<Vec<ImportedCard>, StoreError> {
        if import_ids.is_empty() {
            return Ok(Vec::new());
        }
        // SQLite has no array parameters; a JSON array expanded by json_each keeps it one
        // statement with two parameters, however many ids there are (no parameter limit).
        let ids = serde_json::Value::from(import_ids.to_vec()).to_string();
        sqlx::query(
            "SELECT import_id, token, fingerprint FROM cards \
             WHERE tenant_id = ?1 AND import_id IN (SELECT value FROM json_each(?2)) \
             AND import_id IS NOT NULL",
        )
        .bind(tenant_id)
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await?
        .iter()
        .map(|row| {
            Ok(ImportedCard {
                import_id: row.try_get("import_id")?,
                token: row.try_get("token")?,
                fingerprint: row.try_get("fingerprint")?,
            })
        })
        .collect()
    }

    async fn settle_charge(
        &mut self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        settle_charge_row(&mut *self.tx, id, settlement, now).await
    }

    async fn lock_charge(&mut self, id: &str) -> Result<Option<ChargeRow>, StoreError> {
        // The transaction took the write lock when it began (`BEGIN IMMEDIATE`).
        sqlx::query(concat!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?
        .as_ref()
        .map(charge_from_row)
        .transpose()
    }

    async fn charge_operations(
        &mut self,
        charge_id: &str,
    ) -> Result<Vec<ChargeOperationRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            charge_operation_columns!(),
            " FROM charge_operations WHERE charge_id = ?1 ORDER BY created_at, id"
        ))
        .bind(charge_id)
        .fetch_all(&mut *self.tx)
        .await?
        .iter()
        .map(charge_operation_from_row)
        .collect()
    }

    async fn insert_charge_operation(
        &mut self,
        row: &ChargeOperationRow,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO charge_operations (id, tenant_id, charge_id, kind, idempotency_key, \
             request_hash, amount, status, gateway_id, amount_done, message, attempts, \
             sending_until, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.charge_id)
        .bind(row.kind.as_str())
        .bind(&row.idempotency_key)
        .bind(&row.request_hash)
        .bind(int8_param(
            row.amount,
            "an operation amount is out of range",
        )?)
        .bind(row.status.as_str())
        .bind(&row.gateway_id)
        .bind(
            row.amount_done
                .map(|a| int8_param(a, "an operation amount is out of range"))
                .transpose()?,
        )
        .bind(&row.message)
        .bind(i64::from(row.attempts))
        .bind(row.sending_until.map(micros))
        .bind(micros(row.created_at))
        .bind(micros(row.updated_at))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn settle_charge_operation(
        &mut self,
        id: &str,
        settlement: &OperationSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE charge_operations SET status = ?2, \
             gateway_id = COALESCE(?3, gateway_id), amount_done = COALESCE(?4, amount_done), \
             message = ?5, sending_until = NULL, updated_at = ?6 \
             WHERE id = ?1 AND status IN ('pending', 'unknown')",
        )
        .bind(id)
        .bind(settlement.status.as_str())
        .bind(&settlement.gateway_id)
        .bind(
            settlement
                .amount_done
                .map(|a| int8_param(a, "an operation amount is out of range"))
                .transpose()?,
        )
        .bind(&settlement.message)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn principal_from_row(row: &SqliteRow) -> Result<PrincipalRow, StoreError> {
    Ok(PrincipalRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        mtls_identity: row.try_get("mtls_identity")?,
        permissions: super::split_permissions(row.try_get("permissions")?),
        created_at: from_micros(row.try_get("created_at")?)?,
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_micros)
            .transpose()?,
        created_by: row.try_get("created_by")?,
        global_operator: row.try_get("global_operator")?,
    })
}

fn api_key_from_row(row: &SqliteRow) -> Result<ApiKeyRow, StoreError> {
    Ok(ApiKeyRow {
        id: row.try_get("id")?,
        principal_id: row.try_get("principal_id")?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: from_micros(row.try_get("created_at")?)?,
        expires_at: optional_time(row, "expires_at")?,
        revoked_at: optional_time(row, "revoked_at")?,
        created_by: row.try_get("created_by")?,
    })
}

fn head_from_row(row: &SqliteRow) -> Result<AuditHeadRow, StoreError> {
    Ok(AuditHeadRow {
        shard: narrow(row.try_get("shard")?, "audit shard")?,
        seq: narrow(row.try_get("seq")?, "audit seq")?,
        mac: row.try_get("mac")?,
        head_mac: row.try_get("head_mac")?,
    })
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditRow, StoreError> {
    Ok(AuditRow {
        shard: narrow(row.try_get("shard")?, "audit shard")?,
        seq: narrow(row.try_get("seq")?, "audit seq")?,
        at: from_micros(row.try_get("at")?)?,
        tenant_id: row.try_get("tenant_id")?,
        principal: row.try_get("principal")?,
        action: row.try_get("action")?,
        token: row.try_get("token")?,
        outcome: AuditOutcome::parse(row.try_get("outcome")?)?,
        alarm: row.try_get("alarm")?,
        peer: row.try_get("peer")?,
        request_id: row.try_get("request_id")?,
        detail: row.try_get("detail")?,
        mac: row.try_get("mac")?,
    })
}

fn kek_usage_from_row(row: &SqliteRow) -> Result<KekUsage, StoreError> {
    Ok(KekUsage {
        version: narrow(row.try_get("version")?, "kek_version")?,
        deks: narrow(row.try_get("deks")?, "usage count")?,
        tenant_secrets: narrow(row.try_get("secrets")?, "usage count")?,
        audit_keys: narrow(row.try_get("audit_keys")?, "usage count")?,
        records: narrow(row.try_get("records")?, "usage count")?,
    })
}

fn key_job_from_row(row: &SqliteRow) -> Result<KeyJobRow, StoreError> {
    Ok(KeyJobRow {
        id: row.try_get("id")?,
        kind: KeyJobKind::parse(row.try_get("kind")?)?,
        state: KeyJobState::parse(row.try_get("state")?)?,
        tenant_id: row.try_get("tenant_id")?,
        done: narrow(row.try_get("done")?, "job progress")?,
        total: narrow(row.try_get("total")?, "job total")?,
        requested_by: row.try_get("requested_by")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: optional_time(row, "lease_until")?,
        created_at: from_micros(row.try_get("created_at")?)?,
        updated_at: from_micros(row.try_get("updated_at")?)?,
        finished_at: optional_time(row, "finished_at")?,
        error: row.try_get("error")?,
    })
}

fn key_request_from_row(row: &SqliteRow) -> Result<KeyRequestRow, StoreError> {
    Ok(KeyRequestRow {
        id: row.try_get("id")?,
        kind: KeyRequestKind::parse(row.try_get("kind")?)?,
        target: row.try_get("target")?,
        requested_by: row.try_get("requested_by")?,
        requested_at: from_micros(row.try_get("requested_at")?)?,
        expires_at: from_micros(row.try_get("expires_at")?)?,
        state: KeyRequestState::parse(row.try_get("state")?)?,
        decided_by: row.try_get("decided_by")?,
        decided_at: optional_time(row, "decided_at")?,
        tenant_id: row.try_get("tenant_id")?,
        params: row.try_get("params")?,
    })
}

/// Columns of an operation row, as `charge_operation_from_row` reads them.
macro_rules! charge_operation_columns {
    () => {
        "id, tenant_id, charge_id, kind, idempotency_key, request_hash, amount, status, gateway_id, amount_done, message, attempts, sending_until, created_at, updated_at"
    };
}
use charge_operation_columns;

fn charge_operation_from_row(row: &SqliteRow) -> Result<ChargeOperationRow, StoreError> {
    let amount = |value: i64| narrow(value, "a stored operation amount is out of range");
    Ok(ChargeOperationRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        charge_id: row.try_get("charge_id")?,
        kind: ChargeOperationKind::parse(row.try_get("kind")?)?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_hash: row.try_get("request_hash")?,
        amount: amount(row.try_get("amount")?)?,
        status: ChargeOperationState::parse(row.try_get("status")?)?,
        gateway_id: row.try_get("gateway_id")?,
        amount_done: row
            .try_get::<Option<i64>, _>("amount_done")?
            .map(amount)
            .transpose()?,
        message: row.try_get("message")?,
        attempts: narrow(row.try_get::<i64, _>("attempts")?, "operation attempts")?,
        sending_until: optional_time(row, "sending_until")?,
        created_at: from_micros(row.try_get("created_at")?)?,
        updated_at: from_micros(row.try_get("updated_at")?)?,
    })
}
