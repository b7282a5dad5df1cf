//! The audit MAC key: HMAC-SHA256 over the audit chains, stored only wrapped by a KEK.

use ring::hmac;
use zeroize::ZeroizeOnDrop;

use super::CryptoError;
use super::aad::AadBuilder;
use super::secret::{KEY_LEN, Key32};

/// Length of every audit MAC.
pub const AUDIT_MAC_LEN: usize = 32;

/// The vault's audit key. Zeroized on drop; Debug prints nothing secret.
///
/// Whoever can write the database but does not hold the KEK cannot compute a MAC under it,
/// so cannot forge, cut or reorder an audit chain unnoticed.
pub struct AuditKey {
    raw: Key32,
    hmac: hmac::Key,
}

impl AuditKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<AuditKey, CryptoError> {
        Ok(Self::from_key(Key32::random()?))
    }

    /// A key from exactly 32 bytes (e.g. just unwrapped by a KEK).
    pub fn from_bytes(bytes: &[u8]) -> Result<AuditKey, CryptoError> {
        Ok(Self::from_key(Key32::from_slice(
            bytes,
            "audit key must be 32 bytes",
        )?))
    }

    fn from_key(raw: Key32) -> AuditKey {
        let hmac = hmac::Key::new(hmac::HMAC_SHA256, raw.expose());
        AuditKey { raw, hmac }
    }

    /// The raw key, for wrapping by a KEK. Never log or store it unwrapped.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        self.raw.expose()
    }

    /// HMAC-SHA256 over `label` and `fields`, each length-prefixed, so no two different
    /// field lists (or contexts) produce the same input.
    pub fn mac(&self, label: &'static str, fields: &[&[u8]]) -> [u8; AUDIT_MAC_LEN] {
        let input = fields
            .iter()
            .fold(AadBuilder::new(label), |b, f| b.field(f))
            .finish();
        let tag = hmac::sign(&self.hmac, &input);
        let mut out = [0u8; AUDIT_MAC_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `expected` is the MAC of `label` and `fields`, compared in constant time.
    pub fn verify(&self, label: &'static str, fields: &[&[u8]], expected: &[u8]) -> bool {
        let input = fields
            .iter()
            .fold(AadBuilder::new(label), |b, f| b.field(f))
            .finish();
        hmac::verify(&self.hmac, &input, expected).is_ok()
    }
}

impl ZeroizeOnDrop for AuditKey {}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").finish_non_exhaustive()
    }
}

/// AAD for wrapping the audit key: binds its purpose and the number of audit chains, so the
/// stored shard count cannot be lowered to hide a chain.
pub fn audit_key_wrap_aad(shards: u32) -> Vec<u8> {
    AadBuilder::new("cardvault/audit-key-wrap/v1")
        .field(&shards.to_be_bytes())
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_verifies_only_for_the_same_label_fields_and_key() {
        let key = AuditKey::generate().unwrap();
        let mac = key.mac("l", &[b"a", b"bc"]);
        assert!(key.verify("l", &[b"a", b"bc"], &mac));
        assert!(!key.verify("l", &[b"ab", b"c"], &mac));
        assert!(!key.verify("m", &[b"a", b"bc"], &mac));
        let other = AuditKey::generate().unwrap();
        assert!(!other.verify("l", &[b"a", b"bc"], &mac));
    }

    #[test]
    fn a_key_round_trips_through_its_bytes() {
        let key = AuditKey::generate().unwrap();
        let copy = AuditKey::from_bytes(key.expose_bytes()).unwrap();
        assert_eq!(key.mac("l", &[b"x"]), copy.mac("l", &[b"x"]));
        assert!(AuditKey::from_bytes(&[0; 31]).is_err());
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let key = AuditKey::from_bytes(&[0xab; 32]).unwrap();
        let text = format!("{key:?}");
        assert!(!text.contains("ab") && !text.contains("171"), "{text}");
    }

    #[test]
    fn the_wrap_context_binds_the_shard_count() {
        assert_ne!(audit_key_wrap_aad(16), audit_key_wrap_aad(15));
    }
}
