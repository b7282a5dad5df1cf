//! API keys: high-entropy bearer credentials that the vault stores only as a SHA-256 hash.
//!
//! A key reads `cv_<id>_<secret>`: the 16-character id is public (it names the key in lists,
//! audit records and revocations, and finds its row), the 32-character secret carries
//! 32 × log2(62) ≈ 190 bits. A slow password hash would add nothing at that entropy, so the
//! stored form is SHA-256 of the whole key, compared in constant time.

use ring::digest;
use zeroize::Zeroizing;

use super::{CryptoError, fill_random};

const PREFIX: &str = "cv_";
const ID_CHARS: usize = 16;
const SECRET_CHARS: usize = 32;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A whole API key, as shown once at creation. Zeroized on drop; Debug shows the id only.
pub struct ApiKey {
    id: String,
    text: Zeroizing<String>,
}

impl ApiKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<ApiKey, CryptoError> {
        let id = random_base62(ID_CHARS)?;
        let secret = Zeroizing::new(random_base62(SECRET_CHARS)?);
        let mut text = Zeroizing::new(String::with_capacity(
            PREFIX.len() + ID_CHARS + 1 + SECRET_CHARS,
        ));
        text.push_str(PREFIX);
        text.push_str(&id);
        text.push('_');
        text.push_str(&secret);
        Ok(ApiKey { id, text })
    }

    /// Parses a presented key. Fails (without echoing it) unless it has the exact shape.
    pub fn parse(presented: &str) -> Result<ApiKey, CryptoError> {
        let malformed = CryptoError::Malformed("API key must be cv_<16 chars>_<32 chars>");
        let rest = presented.strip_prefix(PREFIX).ok_or(malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(CryptoError::Malformed(
            "API key must be cv_<16 chars>_<32 chars>",
        ))?;
        let base62 = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
        if id.len() != ID_CHARS || secret.len() != SECRET_CHARS || !base62(id) || !base62(secret) {
            return Err(CryptoError::Malformed(
                "API key must be cv_<16 chars>_<32 chars>",
            ));
        }
        Ok(ApiKey {
            id: id.to_owned(),
            text: Zeroizing::new(presented.to_owned()),
        })
    }

    /// The public key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The whole key, to show its owner once. Never log or store it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The stored form: SHA-256 of the whole key.
    pub fn hash(&self) -> Vec<u8> {
        digest::digest(&digest::SHA256, self.text.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// Whether this key hashes to `stored`, compared in constant time.
    pub fn matches(&self, stored: &[u8]) -> bool {
        // HMAC-verify with a fixed key is ring's public constant-time comparison of two
        // digests: both sides are hashed again, so timing depends on nothing secret.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"cardvault/api-key-compare");
        let tag = ring::hmac::sign(&key, stored);
        ring::hmac::verify(&key, &self.hash(), tag.as_ref()).is_ok()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `n` uniform base62 characters from the OS CSPRNG: bytes ≥ 248 (= 4 × 62) are redrawn, so
/// `b % 62` has no bias. Also used for public ids (principal ids).
pub fn random_base62(n: usize) -> Result<String, CryptoError> {
    let mut out = String::with_capacity(n);
    let mut buf = Zeroizing::new([0u8; 64]);
    while out.len() < n {
        fill_random(&mut buf[..])?;
        for &b in buf.iter() {
            if b < 248 && out.len() < n {
                out.push(char::from(BASE62[usize::from(b % 62)]));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_with_the_same_id_and_hash() {
        let key = ApiKey::generate().unwrap();
        assert!(key.expose().starts_with("cv_"));
        assert_eq!(key.expose().len(), 3 + 16 + 1 + 32);
        let parsed = ApiKey::parse(key.expose()).unwrap();
        assert_eq!(parsed.id(), key.id());
        assert!(parsed.matches(&key.hash()));
    }

    #[test]
    fn a_key_with_another_secret_does_not_match() {
        let key = ApiKey::generate().unwrap();
        let mut forged = key.expose().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == 'a' { 'b' } else { 'a' });
        let forged = ApiKey::parse(&forged).unwrap();
        assert_eq!(forged.id(), key.id());
        assert!(!forged.matches(&key.hash()));
    }

    #[test]
    fn malformed_keys_are_refused_without_echo() {
        for bad in [
            "",
            "cv_",
            "Bearer cv_x",
            "cv_0123456789abcdef",
            "cv_0123456789abcde_0123456789abcdef0123456789abcdef",
            "cv_0123456789abcdef_0123456789abcdef0123456789abcde!",
            "xx_0123456789abcdef_0123456789abcdef0123456789abcdef",
        ] {
            let err = ApiKey::parse(bad).expect_err(bad);
            if bad.len() > 8 {
                assert!(!err.to_string().contains(bad), "{err}");
            }
        }
    }

    #[test]
    fn debug_shows_the_id_but_not_the_secret() {
        let key = ApiKey::generate().unwrap();
        let text = format!("{key:?}");
        assert!(text.contains(key.id()));
        assert!(!text.contains(&key.expose()[20..]), "{text}");
    }
}
