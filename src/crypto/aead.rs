//! Record encryption: AES-256-GCM into a self-describing blob.
//!
//! A record blob is
//!
//! ```text
//! [format 0x01][dek id 16][nonce 12][ciphertext ‖ tag 16]
//! ```
//!
//! and its AAD is the canonical, length-prefixed encoding of (format version, tenant, token,
//! DEK id), so a blob copied to another row, token or tenant, or with a rewritten header,
//! fails to open.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use zeroize::Zeroizing;

use super::aad::AadBuilder;
use super::secret::KEY_LEN;
use super::{CryptoError, DataKey, DekId, fill_random};

/// Format version byte of record blobs written by [`seal_record`].
pub const RECORD_FORMAT_V1: u8 = 1;

/// AES-GCM nonce length (96 bits, random per message).
pub(crate) const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub(crate) const TAG_LEN: usize = 16;

const DEK_ID_LEN: usize = 16;
const RECORD_HEADER_LEN: usize = 1 + DEK_ID_LEN + NONCE_LEN;

/// Seals `plaintext` under `key` (whose id is `dek_id`) for `token` of `tenant`.
///
/// Returns `[0x01][dek_id 16][nonce 12][ciphertext ‖ tag 16]`; the nonce is fresh from the
/// OS CSPRNG.
pub fn seal_record(
    key: &DataKey,
    dek_id: DekId,
    tenant: &str,
    token: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let mut blob = Vec::with_capacity(RECORD_HEADER_LEN + plaintext.len() + TAG_LEN);
    blob.push(RECORD_FORMAT_V1);
    blob.extend_from_slice(dek_id.as_bytes());
    blob.extend_from_slice(&nonce);
    let aad = record_aad(RECORD_FORMAT_V1, tenant, token, dek_id);
    gcm_seal_append(key.expose_bytes(), &nonce, &aad, plaintext, &mut blob)?;
    Ok(blob)
}

/// Reads which DEK sealed `blob`, checking the header strictly, without decrypting.
pub fn record_dek_id(blob: &[u8]) -> Result<DekId, CryptoError> {
    parse_record(blob).map(|record| record.dek_id)
}

/// Opens a blob sealed by [`seal_record`] for `token` of `tenant`.
///
/// The DEK id in the header is bound through the AAD, so a rewritten header fails like any
/// other tampering, with [`CryptoError::Open`].
pub fn open_record(
    key: &DataKey,
    tenant: &str,
    token: &str,
    blob: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let record = parse_record(blob)?;
    let aad = record_aad(record.format, tenant, token, record.dek_id);
    gcm_open(
        key.expose_bytes(),
        record.nonce,
        &aad,
        record.sealed,
        CryptoError::Open,
    )
}

struct RecordParts<'a> {
    format: u8,
    dek_id: DekId,
    nonce: &'a [u8; NONCE_LEN],
    sealed: &'a [u8],
}

fn parse_record(blob: &[u8]) -> Result<RecordParts<'_>, CryptoError> {
    let (&format, rest) = blob
        .split_first()
        .ok_or(CryptoError::Malformed("record blob is empty"))?;
    if format != RECORD_FORMAT_V1 {
        return Err(CryptoError::UnknownFormat {
            what: "record",
            version: format,
        });
    }
    let (dek_id, rest) = rest
        .split_first_chunk::<DEK_ID_LEN>()
        .ok_or(CryptoError::Malformed(
            "record blob is shorter than its header",
        ))?;
    let (nonce, sealed) = rest
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(CryptoError::Malformed(
            "record blob is shorter than its header",
        ))?;
    if sealed.len() < TAG_LEN {
        return Err(CryptoError::Malformed(
            "record blob is shorter than its authentication tag",
        ));
    }
    Ok(RecordParts {
        format,
        dek_id: DekId(uuid::Uuid::from_bytes(*dek_id)),
        nonce,
        sealed,
    })
}

fn record_aad(format: u8, tenant: &str, token: &str, dek_id: DekId) -> Vec<u8> {
    AadBuilder::new("cardvault.record")
        .field(&[format])
        .field(tenant.as_bytes())
        .field(token.as_bytes())
        .field(dek_id.as_bytes())
        .finish()
}

/// Encrypts `plaintext` with AES-256-GCM and appends `ciphertext ‖ tag` to `out`.
pub(crate) fn gcm_seal_append(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CryptoError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| CryptoError::Seal)?;
    let start = out.len();
    // Reserve first so the plaintext copy is never left behind by a reallocation.
    out.reserve(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    let tag = match cipher.encrypt_inout_detached(
        &Nonce::from(*nonce),
        aad,
        (&mut out[start..]).into(),
    ) {
        Ok(tag) => tag,
        Err(_) => {
            zeroize::Zeroize::zeroize(&mut out[start..]);
            out.truncate(start);
            return Err(CryptoError::Seal);
        }
    };
    out.extend_from_slice(&tag);
    Ok(())
}

/// Verifies and decrypts `sealed` (`ciphertext ‖ tag`, at least `TAG_LEN` bytes); any
/// failure is `failure`.
pub(crate) fn gcm_open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
    failure: CryptoError,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let Some(split) = sealed.len().checked_sub(TAG_LEN) else {
        return Err(failure);
    };
    let (ciphertext, tag) = sealed.split_at(split);
    let Ok(tag) = Tag::try_from(tag) else {
        return Err(failure);
    };
    let Ok(cipher) = Aes256Gcm::new_from_slice(key) else {
        return Err(failure);
    };
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    match cipher.decrypt_inout_detached(
        &Nonce::from(*nonce),
        aad,
        buffer.as_mut_slice().into(),
        &tag,
    ) {
        Ok(()) => Ok(buffer),
        Err(_) => Err(failure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sealed_card() -> (DataKey, DekId, Vec<u8>) {
        let key = DataKey::generate().unwrap();
        let id = DekId::generate().unwrap();
        let blob = seal_record(&key, id, "acme", "tok_123", b"4111111111111111").unwrap();
        (key, id, blob)
    }

    #[test]
    fn sealed_record_opens_to_the_same_plaintext() {
        let (key, _, blob) = sealed_card();
        let plain = open_record(&key, "acme", "tok_123", &blob).unwrap();
        assert_eq!(plain.as_slice(), b"4111111111111111");
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let key = DataKey::generate().unwrap();
        let id = DekId::generate().unwrap();
        let blob = seal_record(&key, id, "t", "k", b"").unwrap();
        assert_eq!(blob.len(), RECORD_HEADER_LEN + TAG_LEN);
        assert!(open_record(&key, "t", "k", &blob).unwrap().is_empty());
    }

    #[test]
    fn blob_layout_is_version_then_dek_id_then_nonce_then_sealed() {
        let (_, id, blob) = sealed_card();
        assert_eq!(blob[0], RECORD_FORMAT_V1);
        assert_eq!(&blob[1..17], id.as_bytes());
        assert_eq!(blob.len(), RECORD_HEADER_LEN + 16 + TAG_LEN);
    }

    #[test]
    fn sealing_twice_uses_fresh_nonces() {
        let key = DataKey::generate().unwrap();
        let id = DekId::generate().unwrap();
        let a = seal_record(&key, id, "t", "k", b"same").unwrap();
        let b = seal_record(&key, id, "t", "k", b"same").unwrap();
        assert_ne!(a[17..29], b[17..29]);
        assert_ne!(a, b);
    }

    #[test]
    fn record_dek_id_reads_the_header_without_the_key() {
        let (_, id, blob) = sealed_card();
        assert_eq!(record_dek_id(&blob).unwrap(), id);
    }

    #[test]
    fn record_for_another_tenant_fails_to_open() {
        let (key, _, blob) = sealed_card();
        let err = open_record(&key, "globex", "tok_123", &blob).unwrap_err();
        assert!(matches!(err, CryptoError::Open));
    }

    #[test]
    fn record_moved_to_another_token_fails_to_open() {
        let (key, _, blob) = sealed_card();
        let err = open_record(&key, "acme", "tok_456", &blob).unwrap_err();
        assert!(matches!(err, CryptoError::Open));
    }

    #[test]
    fn tenant_and_token_cannot_trade_bytes() {
        let key = DataKey::generate().unwrap();
        let id = DekId::generate().unwrap();
        let blob = seal_record(&key, id, "ab", "c", b"x").unwrap();
        assert!(open_record(&key, "a", "bc", &blob).is_err());
    }

    #[test]
    fn record_with_a_rewritten_dek_id_fails_to_open() {
        let (key, _, mut blob) = sealed_card();
        let other = DekId::generate().unwrap();
        blob[1..17].copy_from_slice(other.as_bytes());
        assert_eq!(record_dek_id(&blob).unwrap(), other);
        let err = open_record(&key, "acme", "tok_123", &blob).unwrap_err();
        assert!(matches!(err, CryptoError::Open));
    }

    #[test]
    fn record_under_the_wrong_key_fails_to_open() {
        let (_, _, blob) = sealed_card();
        let other = DataKey::generate().unwrap();
        let err = open_record(&other, "acme", "tok_123", &blob).unwrap_err();
        assert!(matches!(err, CryptoError::Open));
    }

    #[test]
    fn unknown_version_byte_is_rejected() {
        let (key, _, mut blob) = sealed_card();
        for version in [0u8, 2, 0xff] {
            blob[0] = version;
            let err = open_record(&key, "acme", "tok_123", &blob).unwrap_err();
            assert!(
                matches!(err, CryptoError::UnknownFormat { what: "record", version: v } if v == version)
            );
            assert!(record_dek_id(&blob).is_err());
        }
    }

    #[test]
    fn every_truncation_shorter_than_header_and_tag_is_an_error() {
        let (key, _, blob) = sealed_card();
        for len in 0..RECORD_HEADER_LEN + TAG_LEN {
            let short = &blob[..len];
            assert!(
                matches!(
                    open_record(&key, "acme", "tok_123", short),
                    Err(CryptoError::Malformed(_))
                ),
                "length {len}"
            );
            assert!(record_dek_id(short).is_err(), "length {len}");
        }
    }

    #[test]
    fn every_truncation_of_the_ciphertext_fails_to_open() {
        let (key, _, blob) = sealed_card();
        for len in RECORD_HEADER_LEN + TAG_LEN..blob.len() {
            assert!(open_record(&key, "acme", "tok_123", &blob[..len]).is_err());
        }
    }

    #[test]
    fn appended_bytes_fail_to_open() {
        let (key, _, mut blob) = sealed_card();
        blob.push(0);
        assert!(open_record(&key, "acme", "tok_123", &blob).is_err());
    }

    proptest! {
        #[test]
        fn a_flipped_bit_anywhere_fails_to_open(position in 0usize..(RECORD_HEADER_LEN + 16 + TAG_LEN) * 8) {
            let (key, _, mut blob) = sealed_card();
            blob[position / 8] ^= 1 << (position % 8);
            prop_assert!(open_record(&key, "acme", "tok_123", &blob).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let key = DataKey::from_bytes(&[7u8; 32]).unwrap();
            let _ = record_dek_id(&bytes);
            prop_assert!(open_record(&key, "t", "k", &bytes).is_err());
        }

        #[test]
        fn any_plaintext_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = DataKey::generate().unwrap();
            let id = DekId::generate().unwrap();
            let blob = seal_record(&key, id, "t", "k", &plain).unwrap();
            let opened = open_record(&key, "t", "k", &blob).unwrap();
            prop_assert_eq!(opened.as_slice(), plain.as_slice());
        }
    }
}
