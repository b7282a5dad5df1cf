//! Per-tenant fingerprints: HMAC-SHA256 under a key derived from a wrapped tenant secret.

use ring::{hkdf, hmac};
use zeroize::ZeroizeOnDrop;

use super::CryptoError;
use super::hex;
use super::secret::{KEY_LEN, Key32};

/// HKDF salt for fingerprint keys; changing it changes every fingerprint.
const FINGERPRINT_SALT: &[u8] = b"cardvault/fingerprint/v1";

/// Random per-tenant secret, stored only wrapped by the KEK; the fingerprint key is derived
/// from it with HKDF-SHA256 (salt `"cardvault/fingerprint/v1"`, info = tenant).
///
/// Zeroized on drop; Debug prints nothing secret.
pub struct TenantSecret(Key32);

impl TenantSecret {
    /// A fresh secret from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        Key32::random().map(TenantSecret)
    }

    /// A secret from exactly 32 bytes (e.g. just unwrapped by a KEK).
    pub fn from_bytes(b: &[u8]) -> Result<Self, CryptoError> {
        Key32::from_slice(b, "tenant secret must be 32 bytes").map(TenantSecret)
    }

    /// The raw secret, for wrapping by a KEK. Never log or store it unwrapped.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.expose()
    }

    /// Derives the fingerprint key of `tenant`: HKDF-SHA256 with salt
    /// `"cardvault/fingerprint/v1"` and info = the tenant's bytes.
    pub fn fingerprint_key(&self, tenant: &str) -> FingerprintKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, FINGERPRINT_SALT).extract(self.0.expose());
        let info = [tenant.as_bytes()];
        let okm = prk
            .expand(&info, hmac::HMAC_SHA256)
            // ring only refuses outputs longer than 255 hash blocks; this one is one block.
            .expect("HKDF-SHA256 can always expand to 32 bytes");
        FingerprintKey(hmac::Key::from(okm))
    }
}

impl ZeroizeOnDrop for TenantSecret {}

impl std::fmt::Debug for TenantSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSecret").finish_non_exhaustive()
    }
}

/// A tenant's HMAC-SHA256 fingerprint key. Never stored; Debug prints nothing secret.
///
/// (`ring::hmac::Key` keeps its expanded key state private and offers no zeroization; it
/// never exposes the key bytes.)
pub struct FingerprintKey(hmac::Key);

impl FingerprintKey {
    /// The fingerprint of `data` (the caller normalizes it first, e.g. digits of a PAN).
    pub fn fingerprint(&self, data: &[u8]) -> Fingerprint {
        let tag = hmac::sign(&self.0, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        Fingerprint(out)
    }
}

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FingerprintKey").finish_non_exhaustive()
    }
}

/// A keyed, irreversible 256-bit fingerprint; equal within one tenant for equal inputs, never
/// comparable across tenants. Not secret, so Debug prints its hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The 32 bytes, as stored.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fingerprint read back from storage: exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CryptoError::Malformed("fingerprint must be 32 bytes"))?;
        Ok(Fingerprint(bytes))
    }

    /// Lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Fingerprint").field(&self.to_hex()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAN: &[u8] = b"4111111111111111";

    #[test]
    fn fingerprint_is_deterministic_for_the_same_tenant_and_secret() {
        let secret = TenantSecret::from_bytes(&[1; 32]).unwrap();
        let a = secret.fingerprint_key("acme").fingerprint(PAN);
        let b = TenantSecret::from_bytes(&[1; 32])
            .unwrap()
            .fingerprint_key("acme")
            .fingerprint(PAN);
        assert_eq!(a, b);
        assert_ne!(
            a,
            secret
                .fingerprint_key("acme")
                .fingerprint(b"4111111111111112")
        );
    }

    #[test]
    fn fingerprint_differs_across_tenants_with_the_same_secret() {
        let secret = TenantSecret::generate().unwrap();
        let a = secret.fingerprint_key("acme").fingerprint(PAN);
        let b = secret.fingerprint_key("globex").fingerprint(PAN);
        assert_ne!(a, b);
    }

    #[test]
    fn fingerprint_differs_across_secrets() {
        let a = TenantSecret::generate().unwrap();
        let b = TenantSecret::generate().unwrap();
        assert_ne!(
            a.fingerprint_key("acme").fingerprint(PAN),
            b.fingerprint_key("acme").fingerprint(PAN)
        );
    }

    #[test]
    fn fingerprint_key_is_hkdf_sha256_of_the_secret() {
        // Independent derivation with ring's HMAC: HKDF-Extract then one HKDF-Expand block.
        let secret = [0x42u8; 32];
        let salt = hmac::Key::new(hmac::HMAC_SHA256, FINGERPRINT_SALT);
        let prk = hmac::sign(&salt, &secret);
        let prk = hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref());
        let okm = hmac::sign(&prk, b"acme\x01");
        let expected = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, okm.as_ref()), PAN);
        let got = TenantSecret::from_bytes(&secret)
            .unwrap()
            .fingerprint_key("acme")
            .fingerprint(PAN);
        assert_eq!(got.as_bytes().as_slice(), expected.as_ref());
    }

    #[test]
    fn fingerprint_round_trips_through_bytes_and_prints_hex() {
        let fp = TenantSecret::generate()
            .unwrap()
            .fingerprint_key("t")
            .fingerprint(PAN);
        assert_eq!(Fingerprint::from_bytes(fp.as_bytes()).unwrap(), fp);
        assert!(Fingerprint::from_bytes(&[0; 31]).is_err());
        assert!(Fingerprint::from_bytes(&[0; 33]).is_err());
        let hex = fp.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(format!("{fp:?}"), format!("Fingerprint(\"{hex}\")"));
    }

    #[test]
    fn tenant_secret_from_bytes_requires_exactly_32_bytes() {
        assert!(TenantSecret::from_bytes(&[0; 16]).is_err());
        assert_eq!(
            TenantSecret::from_bytes(&[3; 32]).unwrap().expose_bytes(),
            &[3; 32]
        );
    }

    #[test]
    fn secret_and_fingerprint_key_debug_print_no_key_bytes() {
        let secret = TenantSecret::from_bytes(&[0xcd; 32]).unwrap();
        let key = secret.fingerprint_key("acme");
        for debug in [format!("{secret:?}"), format!("{key:?}")] {
            assert!(!debug.contains("cd"), "{debug}");
            assert!(!debug.contains("205"), "{debug}");
            assert!(debug.ends_with("{ .. }"), "{debug}");
        }
    }
}
