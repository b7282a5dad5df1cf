//! The plaintext of a sealed card record: what only the vault ever sees in clear.
//!
//! Layout v1: `[1][pan_len u8][pan digits][name_len u16 BE][name UTF-8]`. The encoding is
//! ours (not serde) so that every byte lives in one zeroizing buffer and parsing is strict.

use zeroize::Zeroizing;

use crate::card::{CardholderName, Pan};

const RECORD_V1: u8 = 1;

/// A decoded record.
pub struct CardSecret {
    /// The PAN.
    pub pan: Pan,
    /// The cardholder name, if one was stored.
    pub holder: Option<CardholderName>,
}

/// A record's bytes do not decode: the vault wrote something else, or it was tampered with
/// in a way AES-GCM could not see (which would mean a key compromise).
#[derive(Debug, thiserror::Error)]
#[error("malformed card record: {0}")]
pub struct MalformedRecord(&'static str);

/// Encodes a card's secret fields into a zeroizing buffer.
pub fn encode(pan: &Pan, holder: Option<&CardholderName>) -> Zeroizing<Vec<u8>> {
    let digits = pan.expose_digits().as_bytes();
    let name = holder.map_or(&[][..], |h| h.expose().as_bytes());
    let mut out = Zeroizing::new(Vec::with_capacity(4 + digits.len() + name.len()));
    out.push(RECORD_V1);
    // Both lengths are bounded by the domain types (19 digits, 400 bytes).
    out.push(u8::try_from(digits.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(digits);
    out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// Decodes a record produced by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<CardSecret, MalformedRecord> {
    let (&version, rest) = bytes.split_first().ok_or(MalformedRecord("empty"))?;
    if version != RECORD_V1 {
        return Err(MalformedRecord("unknown record version"));
    }
    let (&pan_len, rest) = rest.split_first().ok_or(MalformedRecord("truncated"))?;
    let pan_len = usize::from(pan_len);
    if rest.len() < pan_len + 2 {
        return Err(MalformedRecord("truncated"));
    }
    let (digits, rest) = rest.split_at(pan_len);
    let (name_len, name) = rest.split_at(2);
    let name_len = usize::from(u16::from_be_bytes([name_len[0], name_len[1]]));
    if name.len() != name_len {
        return Err(MalformedRecord("length mismatch"));
    }
    let digits = std::str::from_utf8(digits).map_err(|_| MalformedRecord("PAN not ASCII"))?;
    let pan = Pan::parse(digits).map_err(|_| MalformedRecord("PAN does not validate"))?;
    let name = std::str::from_utf8(name).map_err(|_| MalformedRecord("name not UTF-8"))?;
    let holder = CardholderName::parse(name).map_err(|_| MalformedRecord("name invalid"))?;
    Ok(CardSecret { pan, holder })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_and_without_a_name() {
        let pan = Pan::parse("4242424242424242").expect("valid");
        let name = CardholderName::parse("Zoë Ørsted").expect("valid");
        let back = decode(&encode(&pan, name.as_ref())).expect("decodes");
        assert_eq!(back.pan.expose_digits(), "4242424242424242");
        assert_eq!(back.holder.as_ref().map(|h| h.expose()), Some("Zoë Ørsted"));

        let back = decode(&encode(&pan, None)).expect("decodes");
        assert!(back.holder.is_none());
    }

    #[test]
    fn every_truncation_of_a_record_is_an_error_not_a_panic() {
        let pan = Pan::parse("378282246310005").expect("valid");
        let name = CardholderName::parse("A B").expect("valid");
        let bytes = encode(&pan, name.as_ref());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "length {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(b'x');
        assert!(decode(&longer).is_err());
    }
}
