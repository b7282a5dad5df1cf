//! Sealing one card: a fresh token, the card's record encrypted for that token, and the row
//! that stores both. Shared by `Tokenize` (one card) and `ImportCards` (a chunk of cards), so
//! there is one place where a card becomes ciphertext.

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{Metadata, TenantId, VaultError};
use crate::{
    card::{Card, Token, TokenFormat},
    crypto::{self, DataKey, DekId, Fingerprint},
    store::CardRow,
};

/// Everything needed to seal one card under fresh tokens. The plaintext record is encoded
/// once and zeroized on drop; each [`Sealer::row`] draws a new token and seals it for that
/// token (the token is part of the AAD), so a token collision costs one more seal.
pub(super) struct Sealer<'a> {
    /// Owning tenant (bound into the AAD).
    pub tenant: &'a TenantId,
    /// The validated card.
    pub card: &'a Card,
    /// Shape of the token to draw.
    pub format: TokenFormat,
    /// Caller metadata, stored in clear.
    pub metadata: &'a Metadata,
    /// Whether `reuse_existing` resolves to this row.
    pub canonical: bool,
    /// When the token stops resolving, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// The importer's id, for cards stored by `ImportCards`.
    pub import_id: Option<&'a str>,
    /// The PAN's keyed fingerprint.
    pub fingerprint: Fingerprint,
    /// The tenant's active data key.
    pub dek: &'a DataKey,
    /// Its id, written in the record header and the row.
    pub dek_id: DekId,
    /// The encoded secret fields (see `record::encode`).
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Creation time, already truncated to microseconds.
    pub now: OffsetDateTime,
    /// A canary card minted by an operator.
    pub honeytoken: bool,
}

impl Sealer<'_> {
    /// The card's row under a freshly drawn token, its record sealed for that token.
    pub fn row(&self) -> Result<CardRow, VaultError> {
        let card = self.card;
        let token = Token::generate(self.format, &card.pan, crypto::system_random())
            .map_err(|_| VaultError::internal("the OS random generator failed", "ring"))?;
        let ciphertext = crypto::seal_record(
            self.dek,
            self.dek_id,
            self.tenant.as_str(),
            token.as_str(),
            &self.plaintext,
        )
        .map_err(|e| VaultError::internal("failed to seal a card record", e))?;
        Ok(CardRow {
            token: token.as_str().to_owned(),
            tenant_id: self.tenant.as_str().to_owned(),
            token_format: format_name(self.format).to_owned(),
            fingerprint: self.fingerprint.as_bytes().to_vec(),
            dek_id: self.dek_id.0,
            ciphertext,
            brand: card.pan.brand().as_str().to_owned(),
            last4: card.pan.last4().to_owned(),
            bin: card.pan.bin().to_owned(),
            exp_month: card.expiry.month(),
            exp_year: card.expiry.year(),
            metadata: self.metadata.entries().to_vec(),
            canonical: self.canonical,
            created_at: self.now,
            expires_at: self.expires_at,
            honeytoken: self.honeytoken,
            import_id: self.import_id.map(str::to_owned),
        })
    }
}

/// The stored name of a token format.
pub(super) fn format_name(format: TokenFormat) -> &'static str {
    match format {
        TokenFormat::Opaque => "opaque",
        TokenFormat::PanShaped => "pan_shaped",
    }
}
