//! The vault core: tokenize, look up, reveal and delete cards.
//!
//! This layer orchestrates the others — validated domain values in (`card`), keys and
//! ciphertext from `crypto`, rows to and from `store` — and knows nothing of gRPC or SQL
//! dialects. Every operation is scoped by the caller's tenant.

mod error;
mod keys;
pub mod metadata;
mod record;
pub mod sweeper;
mod tenant;

use std::sync::Arc;

use time::OffsetDateTime;

use self::keys::KeyManager;
pub use self::{
    error::VaultError,
    metadata::Metadata,
    tenant::{Caller, InvalidTenantId, TenantId},
};
use crate::{
    card::{Brand, Card, CardholderName, Pan, Token, TokenFormat},
    crypto::{self, DekId, Fingerprint, KeyProvider},
    store::{CardInsert, CardRow, ReuseKey, Store},
};

/// How many fresh tokens to draw when the first ones collide with existing cards. Opaque
/// tokens never collide in practice; PAN-shaped tokens of short PANs have as few as 10^8
/// values per last-4, so a collision is rare but possible.
const TOKEN_ATTEMPTS: usize = 8;

/// A request to store a card.
#[derive(Debug)]
pub struct TokenizeCommand {
    /// The validated card.
    pub card: Card,
    /// Shape of the token to issue.
    pub format: TokenFormat,
    /// Return an existing live token for the same PAN, expiry and format instead of
    /// storing a second copy.
    pub reuse_existing: bool,
    /// Caller metadata.
    pub metadata: Metadata,
    /// When the token stops resolving, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

/// What the vault shows about a stored card: no PAN, no cardholder name.
#[derive(Debug, Clone)]
pub struct CardView {
    /// The token.
    pub token: Token,
    /// Brand.
    pub brand: Brand,
    /// Last 4 digits.
    pub last4: String,
    /// First 6 or 8 digits.
    pub bin: String,
    /// Expiry month.
    pub exp_month: u8,
    /// Expiry year.
    pub exp_year: u16,
    /// Keyed PAN fingerprint (per tenant).
    pub fingerprint: Fingerprint,
    /// Caller metadata, sorted by key.
    pub metadata: Vec<(String, String)>,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Token expiry, if any.
    pub expires_at: Option<OffsetDateTime>,
}

/// Result of [`Vault::tokenize`].
#[derive(Debug)]
pub struct Tokenized {
    /// The stored card.
    pub card: CardView,
    /// False when an existing token was returned.
    pub created: bool,
}

/// Result of [`Vault::reveal`]: the card's secret fields. Debug masks them.
#[derive(Debug)]
pub struct RevealedCard {
    /// The PAN.
    pub pan: Pan,
    /// The cardholder name, if stored.
    pub holder: Option<CardholderName>,
    /// The card's public view.
    pub card: CardView,
}

/// The vault. Cheap to share behind an `Arc`; all state lives in the store, apart from
/// caches of unwrapped keys.
#[derive(Debug)]
pub struct Vault {
    store: Arc<dyn Store>,
    keys: KeyManager,
}

fn format_name(format: TokenFormat) -> &'static str {
    match format {
        TokenFormat::Opaque => "opaque",
        TokenFormat::PanShaped => "pan_shaped",
    }
}

impl Vault {
    /// A vault over a store and a key provider, caching up to `dek_cache_size` data keys.
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn KeyProvider>,
        dek_cache_size: usize,
    ) -> Vault {
        Vault {
            keys: KeyManager::new(provider, store.clone(), dek_cache_size),
            store,
        }
    }

    /// The store, for readiness checks and the sweeper.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Loads (or creates) a tenant's keys, so the first request does not pay for it.
    pub async fn warm_up(&self, tenant: &TenantId) -> Result<(), VaultError> {
        self.keys.tenant(tenant).await.map(|_| ())
    }

    /// Validates nothing (the command is already valid), encrypts and stores the card.
    #[tracing::instrument(skip_all, fields(tenant = %caller.tenant))]
    pub async fn tokenize(
        &self,
        caller: &Caller,
        command: TokenizeCommand,
    ) -> Result<Tokenized, VaultError> {
        let tenant = &caller.tenant;
        let keys = self.keys.tenant(tenant).await?;
        let card = &command.card;
        let fingerprint = keys
            .fingerprint
            .fingerprint(card.pan.expose_digits().as_bytes());
        let now = now_micros();
        let reuse_key = ReuseKey {
            tenant_id: tenant.as_str(),
            fingerprint: fingerprint.as_bytes(),
            exp_month: card.expiry.month(),
            exp_year: card.expiry.year(),
            token_format: format_name(command.format),
        };
        if command.reuse_existing
            && let Some(row) = self.store.reusable_card(reuse_key, now).await?
        {
            return Ok(Tokenized {
                card: view_of(row)?,
                created: false,
            });
        }

        let dek_id = keys.active_dek;
        let dek = self.keys.dek(tenant, dek_id).await?;
        let plaintext = record::encode(&card.pan, card.holder.as_ref());
        let mut retried_expired_canonical = false;
        let mut attempt = 0;
        while attempt < TOKEN_ATTEMPTS {
            attempt += 1;
            let token = Token::generate(command.format, &card.pan, crypto::system_random())
                .map_err(|_| VaultError::internal("the OS random generator failed", "ring"))?;
            let ciphertext =
                crypto::seal_record(&dek, dek_id, tenant.as_str(), token.as_str(), &plaintext)
                    .map_err(|e| VaultError::internal("failed to seal a card record", e))?;
            let row = CardRow {
                token: token.as_str().to_owned(),
                tenant_id: tenant.as_str().to_owned(),
                token_format: format_name(command.format).to_owned(),
                fingerprint: fingerprint.as_bytes().to_vec(),
                dek_id: dek_id.0,
                ciphertext,
                brand: card.pan.brand().as_str().to_owned(),
                last4: card.pan.last4().to_owned(),
                bin: card.pan.bin().to_owned(),
                exp_month: card.expiry.month(),
                exp_year: card.expiry.year(),
                metadata: command.metadata.entries().to_vec(),
                canonical: command.reuse_existing,
                created_at: now,
                expires_at: command.expires_at,
            };
            match self.store.insert_card(&row).await? {
                CardInsert::Inserted => {
                    return Ok(Tokenized {
                        card: view_of(row)?,
                        created: true,
                    });
                }
                CardInsert::TokenTaken => {
                    tracing::debug!(attempt, "token collided with an existing card; redrawing");
                }
                CardInsert::CanonicalExists => {
                    // A concurrent reuse_existing call stored the same card first: answer
                    // with its token. If the holder of the slot has expired, free it once.
                    if let Some(row) = self.store.reusable_card(reuse_key, now).await? {
                        return Ok(Tokenized {
                            card: view_of(row)?,
                            created: false,
                        });
                    }
                    if retried_expired_canonical {
                        break;
                    }
                    retried_expired_canonical = true;
                    self.store.delete_expired_canonical(reuse_key, now).await?;
                    attempt -= 1;
                }
            }
        }
        Err(VaultError::internal(
            "could not store the card under a fresh token",
            "every attempt collided",
        ))
    }

    /// The card's public view.
    #[tracing::instrument(skip_all, fields(tenant = %caller.tenant))]
    pub async fn get_card(&self, caller: &Caller, token: &Token) -> Result<CardView, VaultError> {
        let row = self.live_row(caller, token).await?;
        view_of(row)
    }

    /// The card's secret fields, decrypted inside the vault.
    #[tracing::instrument(skip_all, fields(tenant = %caller.tenant))]
    pub async fn reveal(&self, caller: &Caller, token: &Token) -> Result<RevealedCard, VaultError> {
        let tenant = &caller.tenant;
        let row = self.live_row(caller, token).await?;
        let sealed_by = crypto::record_dek_id(&row.ciphertext)
            .map_err(|e| VaultError::internal("a card record has a malformed header", e))?;
        if sealed_by != DekId(row.dek_id) {
            return Err(VaultError::internal(
                "a card record's header names another DEK than its row",
                "dek id mismatch",
            ));
        }
        let dek = self.keys.dek(tenant, sealed_by).await?;
        let plaintext = crypto::open_record(&dek, tenant.as_str(), token.as_str(), &row.ciphertext)
            .map_err(|e| {
                // Authentication failure means the row was altered, moved or the wrong key
                // is in use: an operator must look at this one.
                tracing::error!(token = token.as_str(), "card record failed authentication");
                VaultError::internal("failed to open a card record", e)
            })?;
        let secret = record::decode(&plaintext)
            .map_err(|e| VaultError::internal("failed to decode a card record", e))?;
        Ok(RevealedCard {
            pan: secret.pan,
            holder: secret.holder,
            card: view_of(row)?,
        })
    }

    /// Deletes a live card; the token stops resolving at once.
    #[tracing::instrument(skip_all, fields(tenant = %caller.tenant))]
    pub async fn delete(&self, caller: &Caller, token: &Token) -> Result<(), VaultError> {
        let now = OffsetDateTime::now_utc();
        if self
            .store
            .delete_card(caller.tenant.as_str(), token.as_str(), now)
            .await?
        {
            Ok(())
        } else {
            Err(VaultError::NotFound)
        }
    }

    async fn live_row(&self, caller: &Caller, token: &Token) -> Result<CardRow, VaultError> {
        let now = OffsetDateTime::now_utc();
        self.store
            .card(caller.tenant.as_str(), token.as_str(), now)
            .await?
            .ok_or(VaultError::NotFound)
    }
}

/// Now, truncated to the microsecond precision both backends store, so what tokenize
/// returns is exactly what a later read returns.
fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

fn view_of(row: CardRow) -> Result<CardView, VaultError> {
    let corrupt = |what: &'static str| VaultError::internal(what, "corrupt row");
    Ok(CardView {
        token: Token::parse(&row.token).map_err(|_| corrupt("a stored token is malformed"))?,
        brand: Brand::from_name(&row.brand).ok_or_else(|| corrupt("a stored brand is unknown"))?,
        last4: row.last4,
        bin: row.bin,
        exp_month: row.exp_month,
        exp_year: row.exp_year,
        fingerprint: Fingerprint::from_bytes(&row.fingerprint)
            .map_err(|_| corrupt("a stored fingerprint is malformed"))?,
        metadata: row.metadata,
        created_at: row.created_at,
        expires_at: row.expires_at,
    })
}
