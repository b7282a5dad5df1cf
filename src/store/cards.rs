//! Cards: the stored card rows, their reads and writes, and the deletions that take a card's
//! CVC hold with it.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    StoreError,
    dialect::{Conn, Db, Pool, Row, end_savepoint, query, savepoint, sql, unique_violation},
    metadata_from_json, metadata_to_json, narrow,
};

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

/// Card reads outside a transaction, and the expiry sweep.
#[async_trait]
pub trait CardRepo: Send + Sync {
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

    /// Deletes up to `limit` cards whose token expired at or before `now` (and their CVC
    /// holds); returns how many cards.
    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError>;
}

/// Card writes (and the reads they decide on) inside a transaction.
#[async_trait]
pub trait CardTx: Send {
    /// Inserts a card. A canonical insert reports [`CardInsert::CanonicalExists`] instead of
    /// storing a second canonical copy.
    async fn insert_card(&mut self, row: &CardRow) -> Result<CardInsert, StoreError>;
    /// Inserts many cards at once (one statement on PostgreSQL) and says, row by row,
    /// whether each was stored. A row that clashes with a unique key (its token, a canonical
    /// copy of the same card, its import id) is skipped rather than failing the others; the
    /// caller resolves those with [`CardTx::insert_card`] or by reading the existing row.
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
    /// The tenant's cards with any of these import ids (expired ones included: the import id
    /// stays taken until the row is deleted), in no particular order; one query. Read in the
    /// transaction of an import whose rows clashed, so it sees what the clash was with.
    async fn imported_cards(
        &mut self,
        tenant_id: &str,
        import_ids: &[&str],
    ) -> Result<Vec<ImportedCard>, StoreError>;
}

/// Columns of a card row, as `card_from_row` reads them (PostgreSQL's JSONB metadata as text).
macro_rules! card_columns {
    () => {
        "token, tenant_id, token_format, fingerprint, dek_id, ciphertext, brand, last4, bin, exp_month, exp_year, metadata::text AS metadata, canonical, created_at, expires_at, honeytoken, import_id"
    };
}

/// Inserts one card row (17 parameters, in [`bind_card`] order), followed by `$conflict`.
macro_rules! insert_card_sql {
    ($conflict:literal) => {
        sql!(
            "INSERT INTO cards (token, tenant_id, token_format, fingerprint, dek_id, ciphertext, \
             brand, last4, bin, exp_month, exp_year, metadata, canonical, created_at, expires_at, \
             honeytoken, import_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15, \
             $16, $17)",
            $conflict
        )
    };
}

/// Binds a card row's 17 columns in `insert_card_sql!` order.
fn bind_card<'a>(query: super::dialect::Query<'a>, row: &'a CardRow) -> super::dialect::Query<'a> {
    query
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
}

/// Binds the five `ReuseKey` columns as the first parameters, in the order the reuse
/// queries name them (tenant, fingerprint, expiry month, expiry year, token format).
fn bind_reuse_key<'a>(
    query: super::dialect::Query<'a>,
    key: ReuseKey<'a>,
) -> super::dialect::Query<'a> {
    query
        .bind(key.tenant_id)
        .bind(key.fingerprint)
        .bind(i32::from(key.exp_month))
        .bind(i32::from(key.exp_year))
        .bind(key.token_format)
}

/// A live card of one tenant by token, through the pool or inside a transaction.
async fn card_by_token<D: Db + ?Sized>(
    db: &mut D,
    tenant_id: &str,
    token: &str,
    now: OffsetDateTime,
) -> Result<Option<CardRow>, StoreError> {
    query(sql!(
        "SELECT ",
        card_columns!(),
        " FROM cards WHERE token = $1 AND tenant_id = $2 \
         AND (expires_at IS NULL OR expires_at > $3)"
    ))
    .bind(token)
    .bind(tenant_id)
    .bind(now)
    .fetch_optional(db)
    .await?
    .as_ref()
    .map(card_from_row)
    .transpose()
}

fn card_from_row(row: &Row) -> Result<CardRow, StoreError> {
    Ok(CardRow {
        token: row.get("token")?,
        tenant_id: row.get("tenant_id")?,
        token_format: row.get("token_format")?,
        fingerprint: row.get("fingerprint")?,
        dek_id: row.get("dek_id")?,
        ciphertext: row.get("ciphertext")?,
        brand: row.get("brand")?,
        last4: row.get("last4")?,
        bin: row.get("bin")?,
        exp_month: narrow(row.int4("exp_month")?, "exp_month")?,
        exp_year: narrow(row.int4("exp_year")?, "exp_year")?,
        metadata: metadata_from_json(&row.get::<String>("metadata")?)?,
        canonical: row.get("canonical")?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        honeytoken: row.get("honeytoken")?,
        import_id: row.get("import_id")?,
    })
}

/// For each row, whether its token is the first of its kind in the slice. A batch insert
/// reports stored rows by token, so it cannot tell two rows with one token apart; only the
/// first is sent and the others count as clashes.
pub(super) fn first_of_each_token(rows: &[&CardRow]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    rows.iter()
        .map(|row| seen.insert(row.token.as_str()))
        .collect()
}

/// Deletes the CVC holds of these tokens (cards just deleted in the same SQLite
/// transaction), so no hold outlives its card. One statement however many tokens: they
/// travel as one JSON array, as in `imported_cards`.
async fn delete_holds_of<D: Db + ?Sized>(db: &mut D, tokens: &[String]) -> Result<(), StoreError> {
    if tokens.is_empty() {
        return Ok(());
    }
    query(sql!(
        "DELETE FROM cvc_holds WHERE token IN (SELECT value FROM json_each($1))"
    ))
    .bind(serde_json::Value::from(tokens.to_vec()).to_string())
    .execute(db)
    .await?;
    Ok(())
}

#[async_trait]
impl<S: Pool> CardRepo for S {
    async fn card(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        card_by_token(&mut self.pooled().await?, tenant_id, token, now).await
    }

    async fn card_bin_at(
        &self,
        tenant_id: &str,
        from: &[u8],
    ) -> Result<Option<String>, StoreError> {
        // A range scan of `cards_by_fingerprint`, one row.
        query(sql!(
            "SELECT bin FROM cards WHERE tenant_id = $1 AND fingerprint >= $2 \
             AND {NOT honeytoken} ORDER BY fingerprint LIMIT 1"
        ))
        .bind(tenant_id)
        .bind(from)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .map(|row| row.get("bin"))
        .transpose()
    }

    async fn fingerprint_in_use(
        &self,
        tenant_id: &str,
        fingerprint: &[u8],
    ) -> Result<bool, StoreError> {
        let found = query(sql!(
            "SELECT 1 FROM cards WHERE tenant_id = $1 AND fingerprint = $2 LIMIT 1"
        ))
        .bind(tenant_id)
        .bind(fingerprint)
        .fetch_optional(&mut self.pooled().await?)
        .await?;
        Ok(found.is_some())
    }

    async fn delete_expired(&self, now: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        let mut db = self.pooled().await?;
        // PostgreSQL deletes the cards and their holds in one statement (data-modifying
        // CTEs), with SKIP LOCKED so several replicas sweep at once without waiting on each
        // other. SQLite has no data-modifying CTEs: one transaction, the tokens the first
        // statement returns being the ones whose holds go.
        if let Conn::Pg(_) = db.conn() {
            let deleted: i64 = query(sql!(
                "WITH gone AS (DELETE FROM cards WHERE token IN (SELECT token FROM cards \
                 WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING token), \
                 held AS (DELETE FROM cvc_holds WHERE token IN (SELECT token FROM gone)) \
                 SELECT count(*) AS deleted FROM gone"
            ))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_one(&mut db)
            .await?
            .get("deleted")?;
            return narrow(deleted, "deleted card count");
        }
        drop(db);
        let mut tx = self.write_tx().await?;
        let tokens = query(sql!(
            "DELETE FROM cards WHERE token IN (SELECT token FROM cards \
             WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2) RETURNING token"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut tx)
        .await?
        .iter()
        .map(|row| row.get::<String>("token"))
        .collect::<Result<Vec<_>, _>>()?;
        delete_holds_of(&mut tx, &tokens).await?;
        tx.commit().await?;
        Ok(u64::try_from(tokens.len()).unwrap_or(u64::MAX))
    }
}

#[async_trait]
impl<T: super::dialect::TxDb> CardTx for T {
    async fn insert_card(&mut self, row: &CardRow) -> Result<CardInsert, StoreError> {
        savepoint(self, "card_insert").await?;
        let result = bind_card(query(insert_card_sql!("")), row)
            .execute(self)
            .await;
        let outcome = match result {
            Ok(_) => Ok(CardInsert::Inserted),
            Err(err) if unique_violation(&err, "cards_pkey", "cards.token") => {
                Ok(CardInsert::TokenTaken)
            }
            Err(err)
                if unique_violation(
                    &err,
                    "cards_canonical",
                    "cards.tenant_id, cards.fingerprint, cards.exp_month, cards.exp_year, \
                     cards.token_format",
                ) =>
            {
                Ok(CardInsert::CanonicalExists)
            }
            Err(err) => Err(err.into()),
        };
        // A unique violation aborts a PostgreSQL transaction; the savepoint keeps it usable
        // for the retry with a fresh token and for the audit record.
        let keep = matches!(outcome, Ok(CardInsert::Inserted));
        end_savepoint(self, "card_insert", keep, outcome).await
    }

    async fn insert_cards(&mut self, rows: &[&CardRow]) -> Result<Vec<bool>, StoreError> {
        let first = first_of_each_token(rows);
        if let Conn::Pg(conn) = self.conn() {
            // One statement for the whole batch: UNNEST turns column arrays back into rows
            // (SQLite has no arrays), and ON CONFLICT DO NOTHING skips clashes on any unique
            // index without aborting the transaction, so no savepoints are needed.
            return super::postgres::insert_cards(conn, rows, first).await;
        }
        // SQLite runs in-process: one prepared statement per row costs no round trip, and a
        // multi-row VALUES list would only add parameter-limit bookkeeping.
        let mut stored = Vec::with_capacity(rows.len());
        for (row, first) in rows.iter().zip(first) {
            let inserted = first
                && bind_card(query(insert_card_sql!(" ON CONFLICT DO NOTHING")), row)
                    .execute(self)
                    .await?
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
        card_by_token(self, tenant_id, token, now).await
    }

    async fn reusable_card(
        &mut self,
        key: ReuseKey<'_>,
        now: OffsetDateTime,
    ) -> Result<Option<CardRow>, StoreError> {
        bind_reuse_key(
            query(sql!(
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
        .fetch_optional(self)
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
        // As in `delete_expired`: one statement with data-modifying CTEs on PostgreSQL; on
        // SQLite, the tokens the delete returns name the holds to delete after it.
        if self.dialect() == super::dialect::Dialect::Postgres {
            bind_reuse_key(
                query(sql!(
                    "WITH gone AS (DELETE FROM cards WHERE tenant_id = $1 AND fingerprint = $2 \
                     AND exp_month = $3 AND exp_year = $4 AND token_format = $5 AND {canonical} \
                     AND expires_at <= $6 RETURNING token), \
                     held AS (DELETE FROM cvc_holds WHERE token IN (SELECT token FROM gone)) \
                     SELECT count(*) FROM gone"
                )),
                key,
            )
            .bind(now)
            .fetch_one(self)
            .await?;
            return Ok(());
        }
        let tokens = bind_reuse_key(
            query(sql!(
                "DELETE FROM cards WHERE tenant_id = $1 AND fingerprint = $2 AND exp_month = $3 \
                 AND exp_year = $4 AND token_format = $5 AND {canonical} AND expires_at <= $6 \
                 RETURNING token"
            )),
            key,
        )
        .bind(now)
        .fetch_all(self)
        .await?
        .iter()
        .map(|row| row.get::<String>("token"))
        .collect::<Result<Vec<_>, _>>()?;
        delete_holds_of(self, &tokens).await
    }

    async fn delete_card(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The hold goes only with the card: another tenant naming this token deletes neither.
        // Both statements run in this transaction, so the pair is atomic on both backends.
        let deleted = query(sql!(
            "DELETE FROM cards WHERE token = $1 AND tenant_id = $2 \
             AND (expires_at IS NULL OR expires_at > $3)"
        ))
        .bind(token)
        .bind(tenant_id)
        .bind(now)
        .execute(self)
        .await?;
        if deleted != 1 {
            return Ok(false);
        }
        query(sql!("DELETE FROM cvc_holds WHERE token = $1"))
            .bind(token)
            .execute(self)
            .await?;
        Ok(true)
    }

    async fn imported_cards(
        &mut self,
        tenant_id: &str,
        import_ids: &[&str],
    ) -> Result<Vec<ImportedCard>, StoreError> {
        if import_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for the whole chunk. PostgreSQL takes the ids as one text[]
        // parameter; SQLite has no array parameters, so they travel as one JSON array
        // expanded by json_each (two parameters however many ids: no parameter limit).
        let rows = if let Conn::Pg(conn) = self.conn() {
            sqlx::query(
                "SELECT import_id, token, fingerprint FROM cards \
                 WHERE tenant_id = $1 AND import_id = ANY($2) AND import_id IS NOT NULL",
            )
            .bind(tenant_id)
            .bind(import_ids)
            .fetch_all(conn)
            .await?
            .into_iter()
            .map(Row::Pg)
            .collect::<Vec<_>>()
        } else {
            query(sql!(
                "SELECT import_id, token, fingerprint FROM cards \
                 WHERE tenant_id = $1 AND import_id IN (SELECT value FROM json_each($2)) \
                 AND import_id IS NOT NULL"
            ))
            .bind(tenant_id)
            .bind(serde_json::Value::from(import_ids.to_vec()).to_string())
            .fetch_all(self)
            .await?
        };
        rows.iter()
            .map(|row| {
                Ok(ImportedCard {
                    import_id: row.get("import_id")?,
                    token: row.get("token")?,
                    fingerprint: row.get("fingerprint")?,
                })
            })
            .collect()
    }
}
