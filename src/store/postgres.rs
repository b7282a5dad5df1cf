//! PostgreSQL backend: the production store.

use async_trait::async_trait;
use sqlx::{
    PgPool, Postgres, Row, Transaction,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgSslMode},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiKeyRow, AuditCursor, AuditHeadRow, AuditKeyRow, AuditOutcome, AuditRow, CaptureMethod,
    CardInsert, CardRow, ChargeOperationKind, ChargeOperationRow, ChargeOperationState, ChargeRow,
    ChargeSettlement, ChargeState, CvcHoldRow, DekRow, DekUsage, ImportedCard, KekUsage,
    KeyJobKind, KeyJobRow, KeyJobState, KeyRequestKind, KeyRequestRow, KeyRequestState,
    OperationSettlement, PrincipalRow, ReuseKey, Rewrap, SealedRecord, Shredded, Store, StoreError,
    StoreOptions, StoreTls, StoreTx, TenantRow, action_from_parts, metadata_from_json,
    metadata_to_json, narrow,
    pool::{Acquires, PoolStats},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Columns of a card row, in the order `card_from_row` reads them by name.
macro_rules! card_columns {
    () => {
        "token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin, exp_month, exp_year, metadata::text AS metadata, canonical, created_at, expires_at, honeytoken, import_id"
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
        "id, tenant_id, idempotency_key, request_hash, token, gateway, amount, currency, capture, description, metadata::text AS metadata, status, gateway_payment_id, decline_code, message, attempts, sending_until, created_at, updated_at, action_client_secret, action_type, action_redirect_url, action_json, reconcile_attempts, next_reconcile_at"
    };
}

/// Columns of a CVC hold row, as `cvc_hold_from_row` reads them (the sealed CVC is never
/// selected with a charge: only `charge_cvc` reads it, under these names).
macro_rules! cvc_hold_columns {
    () => {
        "token, tenant_id, dek_id, ciphertext, expires_at"
    };
}

/// One statement that deletes the cards matching `$cards` (a `WHERE` condition on `cards`)
/// and the CVC holds of their tokens, so no hold outlives its card, and selects how many
/// cards it deleted. Data-modifying CTEs run whether or not the final SELECT reads them;
/// `held` sees the tokens `gone` returns.
macro_rules! delete_cards_and_holds {
    ($cards:expr) => {
        concat!(
            "WITH gone AS (DELETE FROM cards WHERE ",
            $cards,
            " RETURNING token), \
             held AS (DELETE FROM cvc_holds WHERE token IN (SELECT token FROM gone)) \
             SELECT count(*) FROM gone"
        )
    };
}

/// A pool of connections to one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    acquires: Acquires,
}

impl PgStore {
    /// Creates the pool without connecting: the vault starts (and reports not ready) while the
    /// database is down, and requests fail with `UNAVAILABLE` instead of the process exiting.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect: PgConnectOptions = url.parse().map_err(|_| StoreError::UnsupportedUrl)?;
        let with_ca = |c: PgConnectOptions, ca: &Option<std::path::PathBuf>| match ca {
            Some(path) => c.ssl_root_cert(path),
            None => c,
        };
        let connect = match &options.tls {
            StoreTls::Disable => connect.ssl_mode(PgSslMode::Disable),
            StoreTls::Require => connect.ssl_mode(PgSslMode::Require),
            StoreTls::VerifyCa(ca) => with_ca(connect.ssl_mode(PgSslMode::VerifyCa), ca),
            StoreTls::VerifyFull(ca) => with_ca(connect.ssl_mode(PgSslMode::VerifyFull), ca),
        };
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.application_name("cardvault"));
        Ok(Self {
            pool,
            acquires: Acquires::new("postgres"),
        })
    }

    /// A pooled connection, its wait counted and timed.
    async fn conn(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        self.acquires.timed(self.pool.acquire()).await
    }

    /// A transaction on a connection from [`PgStore::conn`]. `Transaction::begin` is what
    /// `Pool::begin` runs once it has a connection; calling it here keeps the wait measured.
    async fn begin_tx(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        Transaction::begin(self.conn().await?, None).await
    }

    /// The underlying pool, for tests and tools that inspect the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A live card of one tenant by token, through the pool or inside a transaction.
async fn card_by_token<'e, E>(
    executor: E,
    tenant_id: &str,
    token: &str,
    now: OffsetDateTime,
) -> Result<Option<CardRow>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    sqlx::query(concat!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE token = $1 AND tenant_id = $2 \
         AND (expires_at IS NULL OR expires_at > $3)"
    ))
    .bind(token)
    .bind(tenant_id)
    .bind(now)
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(card_from_row)
    .transpose()
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
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    // A payment id learnt by an earlier send is kept when this one brought none. A final
    // status ends the re-sends, and with them the need for the attached CVC. The action is
    // the latest outcome's: a charge that no longer waits for the cardholder has none.
    let action = settlement.action.as_ref();
    let done = sqlx::query(
        "UPDATE charges SET status = $2, gateway_payment_id = COALESCE($3, gateway_payment_id), \
         decline_code = $4, message = $5, sending_until = NULL, updated_at = $6, \
         cvc_dek_id = CASE WHEN $7 THEN NULL ELSE cvc_dek_id END, \
         cvc_ciphertext = CASE WHEN $7 THEN NULL ELSE cvc_ciphertext END, \
         cvc_expires_at = CASE WHEN $7 THEN NULL ELSE cvc_expires_at END, \
         action_client_secret = $8, action_type = $9, action_redirect_url = $10, \
         action_json = $11 \
         WHERE id = $1 AND status IN ('pending', 'unknown')",
    )
    .bind(id)
    .bind(settlement.status.as_str())
    .bind(&settlement.gateway_payment_id)
    .bind(&settlement.decline_code)
    .bind(&settlement.message)
    .bind(now)
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
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let done = sqlx::query(
        "INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at, shredded_at) \
         VALUES ($1, $2, $3, $4, NULL) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&row.id)
    .bind(&row.wrapped_secret)
    .bind(i64::from(row.secret_kek_version))
    .bind(row.created_at)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts `row` as its tenant's active DEK (not retired, `reserved` as given) unless the
/// tenant has one; the partial unique index `data_keys_one_active` decides, so of two
/// replicas racing, one inserts. A clash on the primary key is an error.
async fn insert_active_dek_row<'e, E>(executor: E, row: &DekRow) -> Result<bool, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let done = sqlx::query(
        "INSERT INTO data_keys (id, tenant_id, kek_version, wrapped_key, active, created_at, \
         reserved, retired_at) VALUES ($1, $2, $3, $4, TRUE, $5, $6, NULL) \
         ON CONFLICT (tenant_id) WHERE active DO NOTHING",
    )
    .bind(row.id)
    .bind(&row.tenant_id)
    .bind(i64::from(row.kek_version))
    .bind(&row.wrapped_key)
    .bind(row.created_at)
    .bind(int8_param(row.reserved, "reserved out of range")?)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

fn tenant_from_row(row: &PgRow) -> Result<TenantRow, StoreError> {
    Ok(TenantRow {
        id: row.try_get("id")?,
        wrapped_secret: row.try_get("wrapped_secret")?,
        secret_kek_version: narrow(
            row.try_get::<i64, _>("secret_kek_version")?,
            "secret_kek_version",
        )?,
        created_at: row.try_get("created_at")?,
        shredded_at: row.try_get("shredded_at")?,
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
        reserved: narrow(row.try_get::<i64, _>("reserved")?, "reserved")?,
        retired_at: row.try_get("retired_at")?,
    })
}

fn charge_from_row(row: &PgRow) -> Result<ChargeRow, StoreError> {
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
        attempts: narrow(
            i64::from(row.try_get::<i32, _>("attempts")?),
            "charge attempts",
        )?,
        sending_until: row.try_get("sending_until")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        action: action_from_parts(
            row.try_get("action_client_secret")?,
            row.try_get("action_type")?,
            row.try_get("action_redirect_url")?,
            row.try_get("action_json")?,
        ),
        reconcile_attempts: narrow(
            i64::from(row.try_get::<i32, _>("reconcile_attempts")?),
            "charge reconcile attempts",
        )?,
        next_reconcile_at: row.try_get("next_reconcile_at")?,
    })
}

fn cvc_hold_from_row(row: &PgRow) -> Result<CvcHoldRow, StoreError> {
    Ok(CvcHoldRow {
        token: row.try_get("token")?,
        tenant_id: row.try_get("tenant_id")?,
        dek_id: row.try_get("dek_id")?,
        ciphertext: row.try_get("ciphertext")?,
        expires_at: row.try_get("expires_at")?,
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

/// A batch of card rows as one array per column, for `INSERT … SELECT * FROM UNNEST(…)`.
struct CardColumns {
    token: Vec<String>,
    tenant_id: Vec<String>,
    token_format: Vec<String>,
    fingerprint: Vec<Vec<u8>>,
    dek_id: Vec<Uuid>,
    ciphertext: Vec<Vec<u8>>,
    brand: Vec<String>,
    last4: Vec<String>,
    bin: Vec<String>,
    exp_month: Vec<i32>,
    exp_year: Vec<i32>,
    metadata: Vec<String>,
    canonical: Vec<bool>,
    created_at: Vec<OffsetDateTime>,
    expires_at: Vec<Option<OffsetDateTime>>,
    honeytoken: Vec<bool>,
    import_id: Vec<Option<String>>,
}

impl CardColumns {
    fn of(rows: &[&CardRow]) -> Self {
        let mut c = CardColumns {
            token: Vec::with_capacity(rows.len()),
            tenant_id: Vec::with_capacity(rows.len()),
            token_format: Vec::with_capacity(rows.len()),
            fingerprint: Vec::with_capacity(rows.len()),
            dek_id: Vec::with_capacity(rows.len()),
            ciphertext: Vec::with_capacity(rows.len()),
            brand: Vec::with_capacity(rows.len()),
            last4: Vec::with_capacity(rows.len()),
            bin: Vec::with_capacity(rows.len()),
            exp_month: Vec::with_capacity(rows.len()),
            exp_year: Vec::with_capacity(rows.len()),
            metadata: Vec::with_capacity(rows.len()),
            canonical: Vec::with_capacity(rows.len()),
            created_at: Vec::with_capacity(rows.len()),
            expires_at: Vec::with_capacity(rows.len()),
            honeytoken: Vec::with_capacity(rows.len()),
            import_id: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            c.token.push(row.token.clone());
            c.tenant_id.push(row.tenant_id.clone());
            c.token_format.push(row.token_format.clone());
            c.fingerprint.push(row.fingerprint.clone());
            c.dek_id.push(row.dek_id);
            c.ciphertext.push(row.ciphertext.clone());
            c.brand.push(row.brand.clone());
            c.last4.push(row.last4.clone());
            c.bin.push(row.bin.clone());
            c.exp_month.push(i32::from(row.exp_month));
            c.exp_year.push(i32::from(row.exp_year));
            c.metadata.push(metadata_to_json(&row.metadata));
            c.canonical.push(row.canonical);
            c.created_at.push(row.created_at);
            c.expires_at.push(row.expires_at);
            c.honeytoken.push(row.honeytoken);
            c.import_id.push(row.import_id.clone());
        }
        c
    }
}

impl CardColumns {
    /// Binds the 17 arrays, in the table's column order.
    fn bind(self, query: ArgQuery<'_>) -> ArgQuery<'_> {
        query
            .bind(self.token)
            .bind(self.tenant_id)
            .bind(self.token_format)
            .bind(self.fingerprint)
            .bind(self.dek_id)
            .bind(self.ciphertext)
            .bind(self.brand)
            .bind(self.last4)
            .bind(self.bin)
            .bind(self.exp_month)
            .bind(self.exp_year)
            .bind(self.metadata)
            .bind(self.canonical)
            .bind(self.created_at)
            .bind(self.expires_at)
            .bind(self.honeytoken)
            .bind(self.import_id)
    }
}

/// A batch of audit records as one array per column.
struct AuditColumns {
    shard: Vec<i32>,
    seq: Vec<i64>,
    at: Vec<OffsetDateTime>,
    tenant_id: Vec<Option<String>>,
    principal: Vec<Option<String>>,
    action: Vec<String>,
    token: Vec<Option<String>>,
    outcome: Vec<&'static str>,
    alarm: Vec<bool>,
    peer: Vec<Option<String>>,
    request_id: Vec<Option<String>>,
    detail: Vec<Option<String>>,
    mac: Vec<Vec<u8>>,
}

impl AuditColumns {
    fn of(records: &[AuditRow]) -> Result<Self, StoreError> {
        let n = records.len();
        let mut c = AuditColumns {
            shard: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            at: Vec::with_capacity(n),
            tenant_id: Vec::with_capacity(n),
            principal: Vec::with_capacity(n),
            action: Vec::with_capacity(n),
            token: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            alarm: Vec::with_capacity(n),
            peer: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            detail: Vec::with_capacity(n),
            mac: Vec::with_capacity(n),
        };
        for r in records {
            c.shard.push(shard_param(r.shard)?);
            c.seq.push(seq_param(r.seq)?);
            c.at.push(r.at);
            c.tenant_id.push(r.tenant_id.clone());
            c.principal.push(r.principal.clone());
            c.action.push(r.action.clone());
            c.token.push(r.token.clone());
            c.outcome.push(r.outcome.as_str());
            c.alarm.push(r.alarm);
            c.peer.push(r.peer.clone());
            c.request_id.push(r.request_id.clone());
            c.detail.push(r.detail.clone());
            c.mac.push(r.mac.clone());
        }
        Ok(c)
    }

    /// Binds the 13 arrays, in the table's column order.
    fn bind(self, query: ArgQuery<'_>) -> ArgQuery<'_> {
        query
            .bind(self.shard)
            .bind(self.seq)
            .bind(self.at)
            .bind(self.tenant_id)
            .bind(self.principal)
            .bind(self.action)
            .bind(self.token)
            .bind(self.outcome)
            .bind(self.alarm)
            .bind(self.peer)
            .bind(self.request_id)
            .bind(self.detail)
            .bind(self.mac)
    }
}

/// A batch of rewraps as one array per column, for `UPDATE … FROM UNNEST(…)`; `Id` is the
/// key's id as its table stores it (a DEK's UUID, a tenant's text id).
struct RewrapColumns<'a, Id> {
    id: Vec<Id>,
    old_version: Vec<i64>,
    new_version: Vec<i64>,
    wrapped: Vec<&'a [u8]>,
}

impl<'a, Id> RewrapColumns<'a, Id> {
    /// The rewraps whose id `parse` accepts.
    fn of(rewraps: &'a [Rewrap], parse: impl Fn(&'a str) -> Option<Id>) -> Self {
        let mut c = RewrapColumns {
            id: Vec::with_capacity(rewraps.len()),
            old_version: Vec::with_capacity(rewraps.len()),
            new_version: Vec::with_capacity(rewraps.len()),
            wrapped: Vec::with_capacity(rewraps.len()),
        };
        for r in rewraps {
            if let Some(id) = parse(&r.id) {
                c.id.push(id);
                c.old_version.push(i64::from(r.old_version));
                c.new_version.push(i64::from(r.new_version));
                c.wrapped.push(&r.wrapped);
            }
        }
        c
    }

    /// Binds the four arrays: id, old version, new version, wrapped key.
    fn bind(self, query: ArgQuery<'_>) -> ArgQuery<'_>
    where
        Vec<Id>: for<'t> sqlx::Encode<'t, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        query
            .bind(self.id)
            .bind(self.old_version)
            .bind(self.new_version)
            .bind(self.wrapped)
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
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
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
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
            " FROM tenants WHERE id = $1"
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
            " FROM data_keys WHERE tenant_id = $1 AND active"
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
            " FROM data_keys WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
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

    async fn commit_batch(
        &self,
        cards: &[&CardRow],
        records: &[AuditRow],
        expected: &AuditHeadRow,
        head: &AuditHeadRow,
    ) -> Result<bool, StoreError> {
        if super::first_of_each_token(cards).contains(&false) {
            return Ok(false);
        }
        let c = CardColumns::of(cards);
        let a = AuditColumns::of(records)?;
        let expected_cards = i64::try_from(cards.len()).unwrap_or(i64::MAX);
        // One autocommit statement: data-modifying CTEs all run to completion, and the final
        // SELECT divides by zero — aborting the whole statement, so nothing is written —
        // unless every card was inserted and the head was still where this writer left it
        // (another replica may have appended since). The chain's primary key rejects a
        // record another replica wrote at the same position.
        let query = sqlx::query(
            "WITH new_cards AS (\
               INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
               brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, \
               expires_at, honeytoken, import_id) \
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], \
               $5::uuid[], $6::bytea[], $7::text[], $8::text[], $9::text[], $10::int4[], \
               $11::int4[], $12::text[]::jsonb[], $13::bool[], $14::timestamptz[], \
               $15::timestamptz[], $16::bool[], $17::text[]) \
               ON CONFLICT DO NOTHING RETURNING 1), \
             new_records AS (\
               INSERT INTO audit_records (shard, seq, at, tenant_id, principal, action, token, \
               outcome, alarm, peer, request_id, detail, mac) \
               SELECT * FROM UNNEST($18::int4[], $19::int8[], $20::timestamptz[], $21::text[], \
               $22::text[], $23::text[], $24::text[], $25::text[], $26::bool[], $27::text[], \
               $28::text[], $29::text[], $30::bytea[])), \
             moved AS (\
               UPDATE audit_heads SET seq = $31, mac = $32, head_mac = $33 \
               WHERE shard = $34 AND seq = $35 AND mac = $36 RETURNING 1) \
             SELECT 1 / ((SELECT count(*) FROM new_cards) = $37 \
                         AND (SELECT count(*) FROM moved) = 1)::int",
        );
        let result = a
            .bind(c.bind(query))
            .bind(seq_param(head.seq)?)
            .bind(&head.mac)
            .bind(&head.head_mac)
            .bind(shard_param(expected.shard)?)
            .bind(seq_param(expected.seq)?)
            .bind(&expected.mac)
            .bind(expected_cards)
            .fetch_one(&mut *self.conn().await?)
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(db))
                if db.code().as_deref() == Some("22012")
                    || (db.is_unique_violation()
                        && db.constraint() == Some("audit_records_pkey")) =>
            {
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn card_bin_at(
        &self,
        tenant_id: &str,
        from: &[u8],
    ) -> Result<Option<String>, StoreError> {
        // A range scan of `cards_by_fingerprint`, one row.
        Ok(sqlx::query_scalar(
            "SELECT bin FROM cards WHERE tenant_id = $1 AND fingerprint >= $2 AND NOT honeytoken \
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
            sqlx::query("SELECT 1 FROM cards WHERE tenant_id = $1 AND fingerprint = $2 LIMIT 1")
                .bind(tenant_id)
                .bind(fingerprint)
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        Ok(found.is_some())
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let tx = self.begin_tx().await?;
        Ok(Box::new(PgTx { tx }))
    }

    async fn principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE id = $1"
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
            " FROM principals WHERE mtls_identity = $1 AND revoked_at IS NULL"
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
            " FROM principals WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY tenant_id, name, id"
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
            " FROM api_keys WHERE id = $1"
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
            " FROM api_keys WHERE principal_id = $1 ORDER BY created_at, id"
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
                kek_version: narrow(row.try_get::<i64, _>("kek_version")?, "kek_version")?,
                wrapped_key: row.try_get("wrapped_key")?,
                shards: narrow(i64::from(row.try_get::<i32, _>("shards")?), "shards")?,
                created_at: row.try_get("created_at")?,
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
            " FROM audit_records WHERE shard = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(shard_param(shard)?)
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
            " FROM audit_records WHERE at >= $1 AND at < $2 AND ($3::text IS NULL OR tenant_id = $3) \
             AND (at, shard, seq) > ($4, $5, $6) ORDER BY at, shard, seq LIMIT $7"
        ))
        .bind(from)
        .bind(to)
        .bind(tenant_id)
        .bind(at)
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
        // SKIP LOCKED lets several replicas sweep at once without waiting on each other. The
        // CVC holds of the deleted tokens go in the same statement.
        let deleted: i64 = sqlx::query_scalar(delete_cards_and_holds!(
            "token IN (SELECT token FROM cards \
             WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_one(&mut *self.conn().await?)
        .await?;
        narrow(deleted, "deleted card count")
    }

    async fn kek_usage(&self) -> Result<Vec<KekUsage>, StoreError> {
        // One row per source and version, summed per version. Records count through the DEK
        // that sealed them, so a card counts under the version wrapping its DEK.
        sqlx::query(
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
             ) AS per_source GROUP BY version ORDER BY version",
        )
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(kek_usage_from_row)
        .collect()
    }

    async fn dek_usage(&self, tenant_id: Option<&str>) -> Result<Vec<DekUsage>, StoreError> {
        // A count per DEK (an index-only range of `cards_by_dek` each) rather than a join
        // grouped over every card: with a tenant given, only its DEKs' records are counted.
        sqlx::query(concat!(
            "SELECT ",
            dek_columns!(),
            ", (SELECT count(*) FROM cards WHERE cards.dek_id = data_keys.id) AS records \
             FROM data_keys WHERE ($1::text IS NULL OR tenant_id = $1) \
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
            " FROM data_keys WHERE kek_version <> $1 ORDER BY id LIMIT $2"
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
            " FROM tenants WHERE secret_kek_version <> $1 AND shredded_at IS NULL \
             ORDER BY id LIMIT $2"
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
        // An id that is not a UUID names no DEK; like one rewrapped meanwhile, it is skipped.
        let c = RewrapColumns::of(rewraps, |id| Uuid::parse_str(id).ok());
        if c.id.is_empty() {
            return Ok(0);
        }
        let query = sqlx::query(
            "UPDATE data_keys SET kek_version = r.new_version, wrapped_key = r.wrapped \
             FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::bytea[]) \
             AS r(id, old_version, new_version, wrapped) \
             WHERE data_keys.id = r.id AND data_keys.kek_version = r.old_version",
        );
        let done = c.bind(query).execute(&mut *self.conn().await?).await?;
        Ok(done.rows_affected())
    }

    async fn rewrap_tenant_secrets(&self, rewraps: &[Rewrap]) -> Result<u64, StoreError> {
        let c = RewrapColumns::of(rewraps, Some);
        if c.id.is_empty() {
            return Ok(0);
        }
        // A shredded tenant's erased secret is never given a wrapped one back.
        let query = sqlx::query(
            "UPDATE tenants SET secret_kek_version = r.new_version, wrapped_secret = r.wrapped \
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::bytea[]) \
             AS r(id, old_version, new_version, wrapped) \
             WHERE tenants.id = r.id AND tenants.secret_kek_version = r.old_version \
             AND tenants.shredded_at IS NULL",
        );
        let done = c.bind(query).execute(&mut *self.conn().await?).await?;
        Ok(done.rows_affected())
    }

    async fn rewrap_audit_key(&self, rewrap: &Rewrap) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE audit_keys SET kek_version = $2, wrapped_key = $3 \
             WHERE id = 1 AND kek_version = $1",
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
        let mut tx = self.begin_tx().await?;
        if let Some(old) = old {
            // A replica that rotated first holds the row lock until it commits; this UPDATE
            // then re-reads the row, finds it inactive and retires nothing.
            let done = sqlx::query(
                "UPDATE data_keys SET active = FALSE, retired_at = $3 \
                 WHERE id = $1 AND tenant_id = $2 AND active",
            )
            .bind(old)
            .bind(tenant_id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        // With `old` None, an active DEK that exists (or that a racing replica inserts first)
        // makes the insert do nothing: the same answer as checking for one beforehand.
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
            "UPDATE data_keys SET reserved = reserved + $2 \
             WHERE id = $1 AND active AND reserved <= $3 RETURNING reserved",
        )
        .bind(dek_id)
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
            " FROM data_keys WHERE NOT active AND ($1::text IS NULL OR tenant_id = $1) \
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
             WHERE dek_id = $1 AND token > $2 ORDER BY token LIMIT $3",
        )
        .bind(dek_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.conn().await?)
        .await?
        .iter()
        .map(|row| {
            Ok(SealedRecord {
                token: row.try_get("token")?,
                tenant_id: row.try_get("tenant_id")?,
                dek_id: row.try_get("dek_id")?,
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
        let token: Vec<&str> = records.iter().map(|r| r.token.as_str()).collect();
        let tenant_id: Vec<&str> = records.iter().map(|r| r.tenant_id.as_str()).collect();
        let dek_id: Vec<Uuid> = records.iter().map(|r| r.dek_id).collect();
        let ciphertext: Vec<&[u8]> = records.iter().map(|r| r.ciphertext.as_slice()).collect();
        let done = sqlx::query(
            "UPDATE cards SET dek_id = r.dek_id, ciphertext = r.ciphertext \
             FROM UNNEST($2::text[], $3::text[], $4::uuid[], $5::bytea[]) \
             AS r(token, tenant_id, dek_id, ciphertext) \
             WHERE cards.token = r.token AND cards.tenant_id = r.tenant_id \
             AND cards.dek_id = $1",
        )
        .bind(old_dek)
        .bind(token)
        .bind(tenant_id)
        .bind(dek_id)
        .bind(ciphertext)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected())
    }

    async fn destroy_dek(
        &self,
        id: Uuid,
        retired_before: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "DELETE FROM data_keys WHERE id = $1 AND NOT active AND retired_at < $2 \
             AND NOT EXISTS (SELECT 1 FROM cards WHERE dek_id = $1)",
        )
        .bind(id)
        .bind(retired_before)
        .execute(&mut *self.conn().await?)
        .await;
        match result {
            Ok(done) => Ok(done.rows_affected() == 1),
            // A card sealed under it was committed while this DELETE ran (NOT EXISTS looked
            // at an older snapshot): the foreign key refuses, and the DEK stays.
            Err(sqlx::Error::Database(db))
                if db.is_foreign_key_violation()
                    && db.constraint() == Some("cards_dek_id_fkey") =>
            {
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn insert_key_job(&self, row: &KeyJobRow) -> Result<bool, StoreError> {
        // The arbiter is the partial index only: a clash on the primary key stays an error.
        let done = sqlx::query(
            "INSERT INTO key_jobs (id, kind, state, tenant_id, done, total, requested_by, \
             lease_owner, lease_until, created_at, updated_at, finished_at, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
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
        .bind(row.lease_until)
        .bind(row.created_at)
        .bind(row.updated_at)
        .bind(row.finished_at)
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
             WHERE state <> 'running' ORDER BY created_at DESC, id DESC LIMIT $1) \
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
        // The subquery picks a candidate without locking it; the outer WHERE repeats the lease
        // test so that, when another replica claimed the same row first, READ COMMITTED
        // re-checks it on the updated row and this replica takes nothing.
        sqlx::query(concat!(
            "UPDATE key_jobs SET lease_owner = $1, lease_until = $3, updated_at = $2 \
             WHERE id = (SELECT id FROM key_jobs WHERE state = 'running' \
               AND (lease_owner IS NULL OR lease_until < $2 OR lease_owner = $1) \
               ORDER BY created_at, id LIMIT 1) \
             AND state = 'running' \
             AND (lease_owner IS NULL OR lease_until < $2 OR lease_owner = $1) \
             RETURNING ",
            key_job_columns!()
        ))
        .bind(owner)
        .bind(now)
        .bind(lease_until)
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
            "UPDATE key_jobs SET done = $3, total = $4, lease_until = $5, updated_at = $6 \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(int8_param(done, "job progress out of range")?)
        .bind(int8_param(total, "job total out of range")?)
        .bind(lease_until)
        .bind(OffsetDateTime::now_utc())
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
            "UPDATE key_jobs SET state = $3, error = $4, finished_at = $5, updated_at = $5, \
             lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(state.as_str())
        .bind(error)
        .bind(at)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            key_request_columns!(),
            " FROM key_requests WHERE id = $1"
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
            " FROM key_requests WHERE state = 'pending' AND expires_at > $1 \
             ORDER BY requested_at, id"
        ))
        .bind(now)
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
        // that ran out. The row lock of the upsert serializes claimants.
        let done = sqlx::query(
            "INSERT INTO kek_rotation (id, version, lease_owner, lease_until, updated_at) \
             VALUES (1, 0, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET lease_owner = $1, lease_until = $2, updated_at = $3 \
             WHERE kek_rotation.lease_until IS NULL OR kek_rotation.lease_until <= $3",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
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
            "UPDATE kek_rotation SET version = COALESCE($2, version), lease_owner = NULL, \
             lease_until = NULL, updated_at = $3 WHERE id = 1 AND lease_owner = $1",
        )
        .bind(owner)
        .bind(version.map(i64::from))
        .bind(now)
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
        // The arbiter is the idempotency index only: a clash on the primary key stays an
        // error. Of two requests racing with one key, the second waits for the first to
        // commit and then does nothing.
        let done = sqlx::query(
            "INSERT INTO charges (id, tenant_id, idempotency_key, request_hash, token, gateway, \
             amount, currency, capture, description, metadata, status, gateway_payment_id, \
             decline_code, message, attempts, sending_until, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, \
             $16, $17, $18, $19) \
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
        .bind(int4_param(row.attempts, "charge attempts out of range")?)
        .bind(row.sending_until)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(&mut *self.conn().await?)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(None);
        }
        // A second statement, not a CTE of the first: one statement reads one snapshot, taken
        // before a racing insert it waited for committed, so it would not see that row.
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
            " FROM charges WHERE tenant_id = $1 AND idempotency_key = $2"
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
            " FROM charges WHERE id = $1"
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
        // Of two claims at once, the second waits on the row lock of the first; READ
        // COMMITTED then re-checks the WHERE on the updated row, finds `sending_until` in the
        // future and changes nothing.
        let done = sqlx::query(
            "UPDATE charges SET sending_until = $3, attempts = attempts + 1, updated_at = $2 \
             WHERE id = $1 AND status IN ('pending', 'unknown') \
             AND (sending_until IS NULL OR sending_until < $2)",
        )
        .bind(id)
        .bind(now)
        .bind(until)
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
             AND (sending_until IS NULL OR sending_until < $2))) \
             AND ($1::text IS NULL OR tenant_id = $1) ORDER BY created_at, id LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(now)
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
             AND (sending_until IS NULL OR sending_until < $1))) \
             AND (next_reconcile_at IS NULL OR next_reconcile_at <= $1) \
             ORDER BY created_at, id LIMIT $2"
        ))
        .bind(now)
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
            "UPDATE charges SET reconcile_attempts = $2, next_reconcile_at = $3 \
             WHERE id = $1 AND status IN ('pending', 'unknown')",
        )
        .bind(id)
        .bind(int4_param(
            attempts,
            "charge reconcile attempts out of range",
        )?)
        .bind(next_at)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn unknown_charge_counts(
        &self,
        overdue_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError> {
        let (all, overdue): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN created_at < $1 THEN 1 ELSE 0 END), 0) \
             FROM charges WHERE status = 'unknown'",
        )
        .bind(overdue_before)
        .fetch_one(&mut *self.conn().await?)
        .await?;
        Ok((
            narrow(all, "unknown charges")?,
            narrow(overdue, "overdue charges")?,
        ))
    }

    async fn mark_charge_alarmed(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE charges SET alarmed_at = $2 WHERE id = $1 AND alarmed_at IS NULL")
                .bind(id)
                .bind(now)
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
            "INSERT INTO job_leases (name, owner, lease_until) VALUES ($1, $2, $4) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, \
             lease_until = excluded.lease_until \
             WHERE job_leases.lease_until < $3 OR job_leases.owner = excluded.owner",
        )
        .bind(name)
        .bind(owner)
        .bind(now)
        .bind(until)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_job_lease(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM job_leases WHERE name = $1 AND owner = $2")
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
            "UPDATE charges SET cvc_dek_id = $4, cvc_ciphertext = $5, cvc_expires_at = $6 \
             WHERE id = $1 AND tenant_id = $2 AND token = $3 \
             AND status IN ('pending', 'unknown')",
        )
        .bind(charge_id)
        .bind(&hold.tenant_id)
        .bind(&hold.token)
        .bind(hold.dek_id)
        .bind(&hold.ciphertext)
        .bind(hold.expires_at)
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
             WHERE id = $1 AND cvc_dek_id IS NOT NULL AND cvc_ciphertext IS NOT NULL \
             AND cvc_expires_at > $2",
        )
        .bind(charge_id)
        .bind(now)
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
             WHERE id IN (SELECT id FROM charges WHERE cvc_expires_at <= $1 \
             ORDER BY cvc_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
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
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (token) DO UPDATE SET dek_id = EXCLUDED.dek_id, \
             ciphertext = EXCLUDED.ciphertext, expires_at = EXCLUDED.expires_at \
             WHERE cvc_holds.tenant_id = EXCLUDED.tenant_id",
        )
        .bind(&row.token)
        .bind(&row.tenant_id)
        .bind(row.dek_id)
        .bind(&row.ciphertext)
        .bind(row.expires_at)
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
        // Of two takes at once, the second finds the row deleted and gets nothing.
        let Some(row) = sqlx::query(concat!(
            "DELETE FROM cvc_holds WHERE token = $1 AND tenant_id = $2 RETURNING ",
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
        // As for cards: bounded per statement, SKIP LOCKED so replicas sweep side by side.
        let done = sqlx::query(
            "DELETE FROM cvc_holds WHERE token IN (SELECT token FROM cvc_holds \
             WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
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
            " FROM charge_operations WHERE tenant_id = $1 AND idempotency_key = $2"
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
            " FROM charge_operations WHERE id = $1"
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
        // As for a charge: the second of two claims re-checks the WHERE on the updated row.
        let done = sqlx::query(
            "UPDATE charge_operations SET sending_until = $3, attempts = attempts + 1, \
             updated_at = $2 WHERE id = $1 AND status IN ('pending', 'unknown') \
             AND (sending_until IS NULL OR sending_until < $2)",
        )
        .bind(id)
        .bind(now)
        .bind(until)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// One PostgreSQL transaction (READ COMMITTED).
struct PgTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
}

fn shard_param(shard: u32) -> Result<i32, StoreError> {
    i32::try_from(shard).map_err(|_| StoreError::Corrupt("audit shard out of range"))
}

fn seq_param(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt("audit seq out of range"))
}

/// A count or size for a BIGINT column.
fn int8_param(value: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(what))
}

/// A count for an INTEGER column.
fn int4_param(value: u32, what: &'static str) -> Result<i32, StoreError> {
    i32::try_from(value).map_err(|_| StoreError::Corrupt(what))
}

/// Ends a savepoint opened before one statement: releases it when the statement's work is
/// kept, else rolls back to it, which also clears the aborted state a failed statement leaves.
/// An error of the statement itself wins over one from ending the savepoint, so the caller
/// sees the cause rather than "current transaction is aborted".
async fn end_savepoint<T>(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    keep: bool,
    release: &'static str,
    rollback: &'static str,
    outcome: Result<T, StoreError>,
) -> Result<T, StoreError> {
    let ended = sqlx::query(if keep { release } else { rollback })
        .execute(&mut **tx)
        .await;
    match (outcome, ended) {
        (Err(err), _) => Err(err),
        (Ok(_), Err(err)) => Err(err.into()),
        (Ok(value), Ok(_)) => Ok(value),
    }
}

#[async_trait]
impl StoreTx for PgTx {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    async fn insert_tenant(&mut self, row: &TenantRow) -> Result<bool, StoreError> {
        insert_tenant_row(&mut *self.tx, row).await
    }

    async fn tenant_exists(&mut self, id: &str) -> Result<bool, StoreError> {
        let found = sqlx::query("SELECT 1 FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(found.is_some())
    }

    async fn insert_principal(&mut self, row: &PrincipalRow) -> Result<bool, StoreError> {
        // Not `ON CONFLICT DO NOTHING`: that would also swallow a primary-key collision and
        // report it as a taken name. Only the two live-uniqueness indexes mean "taken"; the
        // savepoint keeps the transaction usable for the audit record after one of them.
        sqlx::query("SAVEPOINT principal_insert")
            .execute(&mut *self.tx)
            .await?;
        let result = sqlx::query(
            "INSERT INTO principals (id, tenant_id, name, mtls_identity, permissions, created_at, \
             revoked_at, created_by, global_operator) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.name)
        .bind(&row.mtls_identity)
        .bind(row.permissions.join(" "))
        .bind(row.created_at)
        .bind(row.revoked_at)
        .bind(&row.created_by)
        .bind(row.global_operator)
        .execute(&mut *self.tx)
        .await;
        let outcome = match result {
            Ok(_) => Ok(true),
            Err(err)
                if is_unique_violation(&err, "principals_live_name")
                    || is_unique_violation(&err, "principals_live_mtls_identity") =>
            {
                Ok(false)
            }
            Err(err) => Err(err.into()),
        };
        let keep = matches!(outcome, Ok(true));
        end_savepoint(
            &mut self.tx,
            keep,
            "RELEASE SAVEPOINT principal_insert",
            "ROLLBACK TO SAVEPOINT principal_insert",
            outcome,
        )
        .await
    }

    async fn revoke_principal(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE principals SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(at)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $2 WHERE principal_id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(at)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_api_key(&mut self, row: &ApiKeyRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (id, principal_id, secret_hash, created_at, expires_at, \
             revoked_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&row.id)
        .bind(&row.principal_id)
        .bind(&row.secret_hash)
        .bind(row.created_at)
        .bind(row.expires_at)
        .bind(row.revoked_at)
        .bind(&row.created_by)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn revoke_api_key(&mut self, id: &str, at: OffsetDateTime) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(at)
                .execute(&mut *self.tx)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_card(&mut self, row: &CardRow) -> Result<CardInsert, StoreError> {
        sqlx::query("SAVEPOINT card_insert")
            .execute(&mut *self.tx)
            .await?;
        let result = sqlx::query(
            "INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
             brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at, \
             honeytoken, import_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15, $16, $17)",
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
        .bind(row.honeytoken)
        .bind(&row.import_id)
        .execute(&mut *self.tx)
        .await;
        // A unique violation aborts a PostgreSQL transaction; the savepoint keeps it usable
        // for the retry with a fresh token and for the audit record.
        let outcome = match result {
            Ok(_) => Ok(CardInsert::Inserted),
            Err(err) if is_unique_violation(&err, "cards_pkey") => Ok(CardInsert::TokenTaken),
            Err(err) if is_unique_violation(&err, "cards_canonical") => {
                Ok(CardInsert::CanonicalExists)
            }
            Err(err) => Err(err.into()),
        };
        let keep = matches!(outcome, Ok(CardInsert::Inserted));
        end_savepoint(
            &mut self.tx,
            keep,
            "RELEASE SAVEPOINT card_insert",
            "ROLLBACK TO SAVEPOINT card_insert",
            outcome,
        )
        .await
    }

    async fn insert_cards(&mut self, rows: &[&CardRow]) -> Result<Vec<bool>, StoreError> {
        let first = super::first_of_each_token(rows);
        let sent: Vec<&CardRow> = rows
            .iter()
            .zip(&first)
            .filter_map(|(row, first)| first.then_some(*row))
            .collect();
        if sent.is_empty() {
            return Ok(first);
        }
        let columns = CardColumns::of(&sent);
        // One statement for the whole batch: UNNEST turns the column arrays back into rows,
        // and ON CONFLICT DO NOTHING skips clashes on any unique index without aborting the
        // transaction, so no savepoint round trips are needed.
        let query = sqlx::query(
            "INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
             brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at, \
             honeytoken, import_id) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::uuid[], \
             $6::bytea[], $7::text[], $8::text[], $9::text[], $10::int4[], $11::int4[], \
             $12::text[]::jsonb[], $13::bool[], $14::timestamptz[], $15::timestamptz[], \
             $16::bool[], $17::text[]) \
             ON CONFLICT DO NOTHING RETURNING token",
        );
        let stored = columns.bind(query).fetch_all(&mut *self.tx).await?;
        let stored = stored
            .iter()
            .map(|row| row.try_get::<&str, _>(0))
            .collect::<Result<std::collections::HashSet<&str>, _>>()?;
        Ok(rows
            .iter()
            .zip(first)
            .map(|(row, first)| first && stored.contains(row.token.as_str()))
            .collect())
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
                " FROM cards WHERE tenant_id = $1 AND fingerprint = $2 \
             AND exp_month = $3 AND exp_year = $4 AND token_format = $5 \
             AND (expires_at IS NULL OR expires_at > $6) \
             ORDER BY canonical DESC, created_at, token LIMIT 1"
            )),
            key,
        )
        .bind(now)
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
        bind_reuse_key(
            sqlx::query(delete_cards_and_holds!(
                "tenant_id = $1 AND fingerprint = $2 AND exp_month = $3 \
                 AND exp_year = $4 AND token_format = $5 AND canonical AND expires_at <= $6"
            )),
            key,
        )
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn delete_card(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The hold goes only with the card: another tenant naming this token deletes neither.
        let deleted: i64 = sqlx::query_scalar(delete_cards_and_holds!(
            "token = $1 AND tenant_id = $2 AND (expires_at IS NULL OR expires_at > $3)"
        ))
        .bind(token)
        .bind(tenant_id)
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(deleted == 1)
    }

    async fn insert_audit_key(&mut self, row: &AuditKeyRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO audit_keys (id, kek_version, wrapped_key, shards, created_at) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(i64::from(row.kek_version))
        .bind(&row.wrapped_key)
        .bind(shard_param(row.shards)?)
        .bind(row.created_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_audit_head(&mut self, head: &AuditHeadRow) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit_heads (shard, seq, mac, head_mac) VALUES ($1, $2, $3, $4)")
            .bind(shard_param(head.shard)?)
            .bind(seq_param(head.seq)?)
            .bind(&head.mac)
            .bind(&head.head_mac)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn lock_audit_head(&mut self, shard: u32) -> Result<Option<AuditHeadRow>, StoreError> {
        sqlx::query("SELECT shard, seq, mac, head_mac FROM audit_heads WHERE shard = $1 FOR UPDATE")
            .bind(shard_param(shard)?)
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
        let c = AuditColumns::of(records)?;
        let query = sqlx::query(
            "INSERT INTO audit_records (shard, seq, at, tenant_id, principal, action, token, \
             outcome, alarm, peer, request_id, detail, mac) \
             SELECT * FROM UNNEST($1::int4[], $2::int8[], $3::timestamptz[], $4::text[], \
             $5::text[], $6::text[], $7::text[], $8::text[], $9::bool[], $10::text[], $11::text[], \
             $12::text[], $13::bytea[])",
        );
        c.bind(query).execute(&mut *self.tx).await?;
        let done = sqlx::query(
            "UPDATE audit_heads SET seq = $2, mac = $3, head_mac = $4 WHERE shard = $1",
        )
        .bind(shard_param(head.shard)?)
        .bind(seq_param(head.seq)?)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&row.id)
        .bind(row.kind.as_str())
        .bind(&row.target)
        .bind(&row.requested_by)
        .bind(row.requested_at)
        .bind(row.expires_at)
        .bind(row.state.as_str())
        .bind(&row.decided_by)
        .bind(row.decided_at)
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
            "UPDATE key_requests SET state = $2, decided_by = $3, decided_at = $4 \
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(by)
        .bind(at)
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
        let cards = sqlx::query("DELETE FROM cards WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM cvc_holds WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(&mut *self.tx)
            .await?;
        // The tenant's charges stay: without their CVCs they hold no card data (token,
        // amounts, gateway ids and outcomes), and they are its financial record, which
        // outlives its cards (no foreign key ties a charge to a card). Their CVCs go.
        sqlx::query(
            "UPDATE charges SET cvc_dek_id = NULL, cvc_ciphertext = NULL, cvc_expires_at = NULL \
             WHERE tenant_id = $1 AND cvc_ciphertext IS NOT NULL",
        )
        .bind(tenant_id)
        .execute(&mut *self.tx)
        .await?;
        let deks = sqlx::query("DELETE FROM data_keys WHERE tenant_id = $1")
            .bind(tenant_id)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        // Shredding again keeps the time of the first.
        sqlx::query(
            "UPDATE tenants SET wrapped_secret = ''::bytea, \
             shredded_at = COALESCE(shredded_at, $2) WHERE id = $1",
        )
        .bind(tenant_id)
        .bind(at)
        .execute(&mut *self.tx)
        .await?;
        let live: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM principals WHERE tenant_id = $1 AND revoked_at IS NULL ORDER BY id",
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
        // One round trip for the whole chunk: the ids travel as one text[] parameter.
        sqlx::query(
            "SELECT import_id, token, fingerprint FROM cards \
             WHERE tenant_id = $1 AND import_id = ANY($2) AND import_id IS NOT NULL",
        )
        .bind(tenant_id)
        .bind(import_ids)
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
        sqlx::query(concat!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE id = $1 FOR UPDATE"
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
            " FROM charge_operations WHERE charge_id = $1 ORDER BY created_at, id"
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
        // The arbiter is the idempotency index only: a clash on the primary key stays an
        // error.
        let done = sqlx::query(
            "INSERT INTO charge_operations (id, tenant_id, charge_id, kind, idempotency_key, \
             request_hash, amount, status, gateway_id, amount_done, message, attempts, \
             sending_until, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
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
        .bind(int4_param(row.attempts, "operation attempts out of range")?)
        .bind(row.sending_until)
        .bind(row.created_at)
        .bind(row.updated_at)
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
            "UPDATE charge_operations SET status = $2, \
             gateway_id = COALESCE($3, gateway_id), amount_done = COALESCE($4, amount_done), \
             message = $5, sending_until = NULL, updated_at = $6 \
             WHERE id = $1 AND status IN ('pending', 'unknown')",
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
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn principal_from_row(row: &PgRow) -> Result<PrincipalRow, StoreError> {
    Ok(PrincipalRow {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        mtls_identity: row.try_get("mtls_identity")?,
        permissions: super::split_permissions(row.try_get("permissions")?),
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_by: row.try_get("created_by")?,
        global_operator: row.try_get("global_operator")?,
    })
}

fn api_key_from_row(row: &PgRow) -> Result<ApiKeyRow, StoreError> {
    Ok(ApiKeyRow {
        id: row.try_get("id")?,
        principal_id: row.try_get("principal_id")?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_by: row.try_get("created_by")?,
    })
}

fn head_from_row(row: &PgRow) -> Result<AuditHeadRow, StoreError> {
    Ok(AuditHeadRow {
        shard: narrow(i64::from(row.try_get::<i32, _>("shard")?), "audit shard")?,
        seq: narrow(row.try_get::<i64, _>("seq")?, "audit seq")?,
        mac: row.try_get("mac")?,
        head_mac: row.try_get("head_mac")?,
    })
}

fn audit_from_row(row: &PgRow) -> Result<AuditRow, StoreError> {
    Ok(AuditRow {
        shard: narrow(i64::from(row.try_get::<i32, _>("shard")?), "audit shard")?,
        seq: narrow(row.try_get::<i64, _>("seq")?, "audit seq")?,
        at: row.try_get("at")?,
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

fn kek_usage_from_row(row: &PgRow) -> Result<KekUsage, StoreError> {
    Ok(KekUsage {
        version: narrow(row.try_get::<i64, _>("version")?, "kek_version")?,
        deks: narrow(row.try_get::<i64, _>("deks")?, "usage count")?,
        tenant_secrets: narrow(row.try_get::<i64, _>("secrets")?, "usage count")?,
        audit_keys: narrow(row.try_get::<i64, _>("audit_keys")?, "usage count")?,
        records: narrow(row.try_get::<i64, _>("records")?, "usage count")?,
    })
}

fn key_job_from_row(row: &PgRow) -> Result<KeyJobRow, StoreError> {
    Ok(KeyJobRow {
        id: row.try_get("id")?,
        kind: KeyJobKind::parse(row.try_get("kind")?)?,
        state: KeyJobState::parse(row.try_get("state")?)?,
        tenant_id: row.try_get("tenant_id")?,
        done: narrow(row.try_get::<i64, _>("done")?, "job progress")?,
        total: narrow(row.try_get::<i64, _>("total")?, "job total")?,
        requested_by: row.try_get("requested_by")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: row.try_get("lease_until")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        error: row.try_get("error")?,
    })
}

fn key_request_from_row(row: &PgRow) -> Result<KeyRequestRow, StoreError> {
    Ok(KeyRequestRow {
        id: row.try_get("id")?,
        kind: KeyRequestKind::parse(row.try_get("kind")?)?,
        target: row.try_get("target")?,
        requested_by: row.try_get("requested_by")?,
        requested_at: row.try_get("requested_at")?,
        expires_at: row.try_get("expires_at")?,
        state: KeyRequestState::parse(row.try_get("state")?)?,
        decided_by: row.try_get("decided_by")?,
        decided_at: row.try_get("decided_at")?,
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

fn charge_operation_from_row(row: &PgRow) -> Result<ChargeOperationRow, StoreError> {
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
        attempts: narrow(
            i64::from(row.try_get::<i32, _>("attempts")?),
            "operation attempts",
        )?,
        sending_until: row.try_get("sending_until")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
