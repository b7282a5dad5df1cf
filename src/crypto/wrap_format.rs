//! The byte layout every KEK provider gives its wrapped keys, and the AAD it binds.
//!
//! A wrapped key is `[format u8][KEK version u32 BE][nonce 12][ciphertext ‖ tag 16]`. The
//! format byte names the provider (so a key wrapped by one is never handed to another), and
//! the AAD is `label ‖ version ‖ caller context`: the label keeps a wrapping of one provider
//! from authenticating under another even with the same key bytes, and binding the version
//! makes a header that names another KEK fail authentication rather than open.
//!
//! Kept in one place so the local keyring and the PKCS#11 provider cannot drift apart in how
//! strictly they parse what they read back from the database.

use super::aead::{NONCE_LEN, TAG_LEN};
use super::{CryptoError, KekVersion};

/// Bytes before the ciphertext: format, KEK version, nonce.
pub(super) const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

/// One provider's wrapping format.
#[derive(Debug, Clone, Copy)]
pub(super) struct WrapFormat {
    /// The first byte of every key this provider wraps.
    pub format: u8,
    /// Names the provider in errors, e.g. `"local wrapped key"`.
    pub what: &'static str,
    /// Domain-separates this provider's AAD.
    pub aad_label: &'static [u8; 16],
}

/// A parsed wrapped key, borrowing from its bytes.
#[derive(Debug)]
pub(super) struct ParsedWrap<'a> {
    /// The KEK version the header names (equal to the one the caller expected).
    pub version: KekVersion,
    /// The GCM nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// Ciphertext ‖ tag, at least a tag long.
    pub sealed: &'a [u8],
}

impl WrapFormat {
    /// The header of a new wrapping, with room reserved for `sealed_len` more bytes.
    pub fn header(
        &self,
        version: KekVersion,
        nonce: &[u8; NONCE_LEN],
        sealed_len: usize,
    ) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + sealed_len);
        bytes.push(self.format);
        bytes.extend_from_slice(&version.0.to_be_bytes());
        bytes.extend_from_slice(nonce);
        bytes
    }

    /// The AAD a wrapping under `version` binds: label ‖ version ‖ caller context.
    pub fn aad(&self, version: KekVersion, context: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.aad_label.len() + 4 + context.len());
        out.extend_from_slice(self.aad_label);
        out.extend_from_slice(&version.0.to_be_bytes());
        out.extend_from_slice(context);
        out
    }

    /// Parses a wrapped key, checking every length before slicing. A header version other
    /// than `expected` (the version the caller says wrapped it) is an authentication failure,
    /// like any other tampering.
    pub fn parse<'a>(
        &self,
        bytes: &'a [u8],
        expected: KekVersion,
    ) -> Result<ParsedWrap<'a>, CryptoError> {
        let (&format, rest) = bytes
            .split_first()
            .ok_or(CryptoError::Malformed("wrapped key is empty"))?;
        if format != self.format {
            return Err(CryptoError::UnknownFormat {
                what: self.what,
                version: format,
            });
        }
        let (version, rest) = rest.split_first_chunk::<4>().ok_or(CryptoError::Malformed(
            "wrapped key is shorter than its header",
        ))?;
        let (nonce, sealed) =
            rest.split_first_chunk::<NONCE_LEN>()
                .ok_or(CryptoError::Malformed(
                    "wrapped key is shorter than its header",
                ))?;
        if sealed.len() < TAG_LEN {
            return Err(CryptoError::Malformed(
                "wrapped key is shorter than its authentication tag",
            ));
        }
        let version = KekVersion(u32::from_be_bytes(*version));
        if version != expected {
            return Err(CryptoError::Unwrap);
        }
        Ok(ParsedWrap {
            version,
            nonce,
            sealed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: WrapFormat = WrapFormat {
        format: 9,
        what: "test wrapped key",
        aad_label: b"cardvault.test.1",
    };

    fn wrapped(version: u32) -> Vec<u8> {
        let mut bytes = FORMAT.header(KekVersion(version), &[5; NONCE_LEN], TAG_LEN + 3);
        bytes.extend_from_slice(&[1; TAG_LEN + 3]);
        bytes
    }

    #[test]
    fn a_header_written_parses_back() {
        let bytes = wrapped(7);
        assert_eq!(bytes.len(), HEADER_LEN + TAG_LEN + 3);
        let parsed = FORMAT.parse(&bytes, KekVersion(7)).unwrap();
        assert_eq!(parsed.version, KekVersion(7));
        assert_eq!(parsed.nonce, &[5; NONCE_LEN]);
        assert_eq!(parsed.sealed, &[1; TAG_LEN + 3]);
    }

    #[test]
    fn every_truncation_is_malformed_never_a_panic() {
        let bytes = wrapped(7);
        for len in 0..HEADER_LEN + TAG_LEN {
            assert!(
                matches!(
                    FORMAT.parse(&bytes[..len], KekVersion(7)),
                    Err(CryptoError::Malformed(_))
                ),
                "length {len}"
            );
        }
    }

    #[test]
    fn another_format_or_version_is_refused() {
        let mut bytes = wrapped(7);
        assert!(matches!(
            FORMAT.parse(&bytes, KekVersion(8)),
            Err(CryptoError::Unwrap)
        ));
        bytes[0] = 2;
        assert!(matches!(
            FORMAT.parse(&bytes, KekVersion(7)),
            Err(CryptoError::UnknownFormat { version: 2, .. })
        ));
    }

    #[test]
    fn the_aad_binds_label_version_and_context() {
        let aad = FORMAT.aad(KekVersion(0x0102_0304), b"ctx");
        assert_eq!(&aad[..16], b"cardvault.test.1");
        assert_eq!(&aad[16..20], &[1, 2, 3, 4]);
        assert_eq!(&aad[20..], b"ctx");
    }
}
