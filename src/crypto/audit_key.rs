//! The audit MAC key: HMAC-SHA256 over the audit chains, stored only wrapped by a KEK; and
//! the anchor key derived from it, which MACs the chain-head anchors exported out of the
//! database.

use ring::{hkdf, hmac};
use zeroize::ZeroizeOnDrop;

use super::CryptoError;
use super::aad::AadBuilder;
use super::secret::{KEY_LEN, Key32};

/// Length of every audit MAC.
pub const AUDIT_MAC_LEN: usize = 32;

/// HKDF salt of the anchor key; changing it invalidates every anchor ever written.
const ANCHOR_KEY_SALT: &[u8] = b"cardvault/audit-anchor-key/v1";

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
        sign(&self.hmac, label, fields)
    }

    /// Whether `expected` is the MAC of `label` and `fields`, compared in constant time.
    pub fn verify(&self, label: &'static str, fields: &[&[u8]], expected: &[u8]) -> bool {
        hmac::verify(&self.hmac, &mac_input(label, fields), expected).is_ok()
    }

    /// The key that MACs chain-head anchors: HKDF-SHA256 of this key (salt
    /// `"cardvault/audit-anchor-key/v1"`, no info). A key of its own rather than a label under
    /// this one, so no anchor MAC can ever stand in for a chain MAC, and code that checks
    /// anchors never needs the chain key's operations.
    pub fn anchor_key(&self) -> AnchorKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, ANCHOR_KEY_SALT).extract(self.raw.expose());
        let okm = prk
            .expand(&[], hmac::HMAC_SHA256)
            // ring only refuses outputs longer than 255 hash blocks; this one is one block.
            .expect("HKDF-SHA256 can always expand to 32 bytes");
        AnchorKey(hmac::Key::from(okm))
    }
}

/// The HMAC-SHA256 key of audit anchors, derived from the audit key by
/// [`AuditKey::anchor_key`]; never stored. Debug prints nothing secret.
///
/// (`ring::hmac::Key` keeps its expanded key state private and offers no zeroization; it
/// never exposes the key bytes.)
pub struct AnchorKey(hmac::Key);

impl AnchorKey {
    /// HMAC-SHA256 over `label` and `fields`, each length-prefixed (as [`AuditKey::mac`]).
    pub fn mac(&self, label: &'static str, fields: &[&[u8]]) -> [u8; AUDIT_MAC_LEN] {
        sign(&self.0, label, fields)
    }

    /// Whether `expected` is the MAC of `label` and `fields`, compared in constant time.
    pub fn verify(&self, label: &'static str, fields: &[&[u8]], expected: &[u8]) -> bool {
        hmac::verify(&self.0, &mac_input(label, fields), expected).is_ok()
    }
}

impl std::fmt::Debug for AnchorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorKey").finish_non_exhaustive()
    }
}

/// `label` and `fields`, each length-prefixed.
fn mac_input(label: &'static str, fields: &[&[u8]]) -> Vec<u8> {
    fields
        .iter()
        .fold(AadBuilder::new(label), |b, f| b.field(f))
        .finish()
}

fn sign(key: &hmac::Key, label: &'static str, fields: &[&[u8]]) -> [u8; AUDIT_MAC_LEN] {
    let tag = hmac::sign(key, &mac_input(label, fields));
    let mut out = [0u8; AUDIT_MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
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
    fn the_anchor_key_is_hkdf_of_the_audit_key_and_not_the_audit_key() {
        let key = AuditKey::from_bytes(&[7; 32]).unwrap();
        let anchor = key.anchor_key();
        // The same label and fields give another MAC under the anchor key than under the
        // chain key: an anchor MAC can never pass as a chain MAC, nor the other way round.
        let chain_mac = key.mac("l", &[b"x"]);
        assert_ne!(anchor.mac("l", &[b"x"]), chain_mac);
        assert!(!anchor.verify("l", &[b"x"], &chain_mac));
        // It is HKDF-SHA256(salt, audit key) expanded with no info: recompute by hand.
        let prk = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, ANCHOR_KEY_SALT),
            key.expose_bytes(),
        );
        let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &[1]);
        let by_hand = hmac::Key::new(hmac::HMAC_SHA256, okm.as_ref());
        let mac = anchor.mac("l", &[b"x"]);
        assert_eq!(
            hmac::sign(&by_hand, &mac_input("l", &[b"x"])).as_ref(),
            mac.as_slice()
        );
        assert!(anchor.verify("l", &[b"x"], &mac));
        // Stable for the same audit key, different for another.
        assert_eq!(
            AuditKey::from_bytes(&[7; 32])
                .unwrap()
                .anchor_key()
                .mac("l", &[b"x"]),
            mac
        );
        let other = AuditKey::from_bytes(&[8; 32]).unwrap().anchor_key();
        assert!(!other.verify("l", &[b"x"], &mac));
        assert_eq!(format!("{anchor:?}"), "AnchorKey { .. }");
    }

    #[test]
    fn the_wrap_context_binds_the_shard_count() {
        assert_ne!(audit_key_wrap_aad(16), audit_key_wrap_aad(15));
    }
}
