//! PostgreSQL backend: the production store.

use async_trait::async_trait;
use sqlx::{
    PgPool, Row,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgSslMode},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiKeyRow, AuditCursor, AuditHeadRow, AuditKeyRow, AuditRow, CardInsert, CardRow, DekRow,
    ImportedCard, PrincipalRow, ReuseKey, Store, StoreError, StoreOptions, StoreTls, StoreTx,
    TenantRow, metadata_from_json, metadata_to_json, narrow,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Columns of a card row, in the order `card_from_row` reads them by name.
macro_rules! card_columns {
    () => {
        "token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin, exp_month, exp_year, metadata::text AS metadata, canonical, created_at, expires_at, honeytoken, import_id"
    };
}

macro_rules! principal_columns {
    () => {
        "id, tenant_id, name, mtls_identity, permissions, created_at, revoked_at"
    };
}

macro_rules! api_key_columns {
    () => {
        "id, principal_id, secret_hash, created_at, expires_at, revoked_at"
    };
}

macro_rules! audit_columns {
    () => {
        "shard, seq, at, tenant_id, principal, action, token, outcome, alarm, peer, request_id, detail, mac"
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
        Ok(Self { pool })
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
    outcome: Vec<String>,
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
            c.outcome.push(r.outcome.clone());
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

    async fn card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        card_by_token(&self.pool, tenant_id, token, now).await
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
            .fetch_one(&self.pool)
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

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let tx = self.pool.begin().await?;
        Ok(Box::new(PgTx { tx }))
    }

    async fn principal(&self, id: &str) -> Result<Option<PrincipalRow>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            principal_columns!(),
            " FROM principals WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
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
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
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
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(api_key_from_row)
        .collect()
    }

    async fn audit_key(&self) -> Result<Option<AuditKeyRow>, StoreError> {
        let row = sqlx::query(
            "SELECT kek_version, wrapped_key, shards, created_at FROM audit_keys WHERE id = 1",
        )
        .fetch_optional(&self.pool)
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
            .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
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
        let done = sqlx::query(
            "INSERT INTO tenants (id, wrapped_secret, secret_kek_version, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.wrapped_secret)
        .bind(i64::from(row.secret_kek_version))
        .bind(row.created_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
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
             revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.name)
        .bind(&row.mtls_identity)
        .bind(row.permissions.join(" "))
        .bind(row.created_at)
        .bind(row.revoked_at)
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
             revoked_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&row.id)
        .bind(&row.principal_id)
        .bind(&row.secret_hash)
        .bind(row.created_at)
        .bind(row.expires_at)
        .bind(row.revoked_at)
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
            sqlx::query(
                "DELETE FROM cards WHERE tenant_id = $1 AND fingerprint = $2 AND exp_month = $3 \
             AND exp_year = $4 AND token_format = $5 AND canonical AND expires_at <= $6",
            ),
            key,
        )
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn delete_card(
        &mut self,
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
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
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
        outcome: row.try_get("outcome")?,
        alarm: row.try_get("alarm")?,
        peer: row.try_get("peer")?,
        request_id: row.try_get("request_id")?,
        detail: row.try_get("detail")?,
        mac: row.try_get("mac")?,
    })
}
