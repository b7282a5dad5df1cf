//! PostgreSQL backend: the production store. Its connection set-up, and the statements only
//! PostgreSQL can run: batches as column arrays (`UNNEST`), one round trip each, where SQLite
//! runs one in-process statement per row.

use async_trait::async_trait;
use sqlx::{
    PgPool, Postgres, Row, Transaction,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    AuditHeadRow, AuditRow, CardRow, Rewrap, SealedRecord, Store, StoreError, StoreOptions,
    StoreTls, StoreTx,
    audit::{seq_param, shard_param},
    dialect::{Pool, Pooled, WriteTx},
    metadata_to_json,
    pool::{Acquires, PoolStats},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

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

#[async_trait]
impl Pool for PgStore {
    async fn pooled(&self) -> Result<Pooled, sqlx::Error> {
        Ok(Pooled::Pg(self.conn().await?))
    }

    async fn write_tx(&self) -> Result<WriteTx, sqlx::Error> {
        Ok(WriteTx::Pg(self.begin_tx().await?))
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        Some(super::pool::stats(&self.pool, &self.acquires))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(super::migrate_error)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        super::ping(&mut self.pooled().await?).await
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        super::pending_migrations(&mut self.pooled().await?, &MIGRATOR).await
    }

    async fn commit_batch(
        &self,
        cards: &[&CardRow],
        records: &[AuditRow],
        expected: &AuditHeadRow,
        head: &AuditHeadRow,
    ) -> Result<bool, StoreError> {
        if super::cards::first_of_each_token(cards).contains(&false) {
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

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        Ok(Box::new(WriteTx::Pg(self.begin_tx().await?)))
    }
}

type ArgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

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
            c.outcome.push(r.outcome.as_str().to_owned());
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

/// [`DataKeyRepo::rewrap_deks`](super::DataKeyRepo::rewrap_deks) on PostgreSQL: one
/// `UPDATE … FROM UNNEST(…)`.
pub(super) async fn rewrap_deks(
    conn: &mut sqlx::PgConnection,
    rewraps: &[Rewrap],
) -> Result<u64, StoreError> {
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
    Ok(c.bind(query).execute(&mut *conn).await?.rows_affected())
}

/// [`DataKeyRepo::rewrap_tenant_secrets`](super::DataKeyRepo::rewrap_tenant_secrets) on
/// PostgreSQL: one `UPDATE … FROM UNNEST(…)`.
pub(super) async fn rewrap_tenant_secrets(
    conn: &mut sqlx::PgConnection,
    rewraps: &[Rewrap],
) -> Result<u64, StoreError> {
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
    Ok(c.bind(query).execute(&mut *conn).await?.rows_affected())
}

/// [`DataKeyRepo::replace_records`](super::DataKeyRepo::replace_records) on PostgreSQL: one
/// `UPDATE … FROM UNNEST(…)`.
pub(super) async fn replace_records(
    conn: &mut sqlx::PgConnection,
    old_dek: Uuid,
    records: &[SealedRecord],
) -> Result<u64, StoreError> {
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
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// [`CardTx::insert_cards`](super::CardTx::insert_cards) on PostgreSQL: the rows whose token
/// is the `first` of its kind, in one `INSERT … SELECT * FROM UNNEST(…)`.
pub(super) async fn insert_cards(
    conn: &mut sqlx::PgConnection,
    rows: &[&CardRow],
    first: Vec<bool>,
) -> Result<Vec<bool>, StoreError> {
    let sent: Vec<&CardRow> = rows
        .iter()
        .zip(&first)
        .filter_map(|(row, first)| first.then_some(*row))
        .collect();
    if sent.is_empty() {
        return Ok(first);
    }
    let columns = CardColumns::of(&sent);
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
    let stored = columns.bind(query).fetch_all(&mut *conn).await?;
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

/// The records of [`AuditTx::append_audit`](super::AuditTx::append_audit) on PostgreSQL:
/// one `INSERT … SELECT * FROM UNNEST(…)`.
pub(super) async fn insert_audit_records(
    conn: &mut sqlx::PgConnection,
    records: &[AuditRow],
) -> Result<(), StoreError> {
    let c = AuditColumns::of(records)?;
    let query = sqlx::query(
        "INSERT INTO audit_records (shard, seq, at, tenant_id, principal, action, token, \
         outcome, alarm, peer, request_id, detail, mac) \
         SELECT * FROM UNNEST($1::int4[], $2::int8[], $3::timestamptz[], $4::text[], \
         $5::text[], $6::text[], $7::text[], $8::text[], $9::bool[], $10::text[], $11::text[], \
         $12::text[], $13::bytea[])",
    );
    c.bind(query).execute(&mut *conn).await?;
    Ok(())
}
