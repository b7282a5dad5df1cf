//! Small hex helpers (no dependency, nothing left behind in unzeroized buffers).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends the lowercase hex of `bytes` to `out`. Callers holding secrets reserve capacity
/// first so `out` never reallocates (which would leave a copy in freed memory).
pub(crate) fn encode_into(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    encode_into(bytes, &mut out);
    out
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes `text` into `out`, which must be exactly half its length. Returns `false` (and
/// leaves `out` partly written; callers own a zeroizing buffer) on any bad length or digit.
pub(crate) fn decode_into(text: &str, out: &mut [u8]) -> bool {
    let text = text.as_bytes();
    if text.len() != out.len() * 2 {
        return false;
    }
    for (pair, byte) in text.chunks_exact(2).zip(out.iter_mut()) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => *byte = (hi << 4) | lo,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_every_byte_value() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = encode(&bytes);
        assert_eq!(&text[..4], "0001");
        let mut back = vec![0u8; 256];
        assert!(decode_into(&text, &mut back));
        assert_eq!(back, bytes);
    }

    #[test]
    fn hex_decode_rejects_bad_digits_and_lengths() {
        let mut out = [0u8; 2];
        assert!(!decode_into("abc", &mut out));
        assert!(!decode_into("abcdef", &mut out));
        assert!(!decode_into("zz00", &mut out));
        assert!(!decode_into("é0", &mut out[..1]));
        assert!(decode_into("ABcd", &mut out));
        assert_eq!(out, [0xab, 0xcd]);
    }
}
