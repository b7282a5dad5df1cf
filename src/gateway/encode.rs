//! Encoders that write card data into request bodies without leaving copies behind.
//!
//! Every body is built twice over the same inputs: once into a [`Len`] counter, then into a
//! `Zeroizing<Vec<u8>>` allocated with exactly that capacity, so the buffer never grows and
//! no reallocation leaves an unzeroized copy of a card number in freed memory.

use zeroize::Zeroizing;

/// Where encoded bytes go.
pub(crate) trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);
}

/// Counts bytes instead of storing them.
struct Len(usize);

impl Sink for Len {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// A buffer with its final capacity already reserved.
struct Exact(Zeroizing<Vec<u8>>);

impl Sink for Exact {
    fn put(&mut self, bytes: &[u8]) {
        debug_assert!(
            self.0.len() + bytes.len() <= self.0.capacity(),
            "the counting pass and the writing pass disagree"
        );
        self.0.extend_from_slice(bytes);
    }
}

/// Runs `write` twice, counting then writing, and returns the zeroizing buffer. `write` must
/// produce the same bytes both times (it only reads its inputs).
pub(crate) fn build(write: impl Fn(&mut dyn Sink)) -> Zeroizing<Vec<u8>> {
    let mut len = Len(0);
    write(&mut len);
    let mut out = Exact(Zeroizing::new(Vec::with_capacity(len.0)));
    write(&mut out);
    out.0
}

/// `application/x-www-form-urlencoded` encoding of one key or value (the WHATWG URL
/// standard's byte serializer): ASCII letters, digits and `*-._` stay, space becomes `+`,
/// every other byte becomes `%XX`. So `card[number]` is sent as `card%5Bnumber%5D`, which
/// form decoders (Stripe's included) read back as `card[number]`.
pub(crate) fn form_component(value: &str, sink: &mut dyn Sink) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_') {
            continue;
        }
        sink.put(&bytes[start..i]);
        if b == b' ' {
            sink.put(b"+");
        } else {
            sink.put(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
        start = i + 1;
    }
    sink.put(&bytes[start..]);
}

/// A form body from key/value pairs, in order: `k1=v1&k2=v2`, both sides encoded with
/// [`form_component`]. Nested Stripe parameters are flat keys here (`card[number]`).
pub(crate) fn form_body(pairs: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    build(|sink| {
        for (i, (key, value)) in pairs.iter().enumerate() {
            if i > 0 {
                sink.put(b"&");
            }
            form_component(key, sink);
            sink.put(b"=");
            form_component(value, sink);
        }
    })
}

/// The content of a JSON string for `value`, without the surrounding quotes: `"` and `\`
/// are backslash-escaped, control characters become `\n`, `\r`, `\t` or `\u00XX`, and
/// everything else (UTF-8 included) is copied.
pub(crate) fn json_string_content(value: &str, sink: &mut dyn Sink) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        sink.put(&bytes[start..i]);
        sink.put(escaped);
        start = i + 1;
    }
    sink.put(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(value: &str) -> String {
        String::from_utf8(build(|s| form_component(value, s)).to_vec()).unwrap()
    }

    fn json(value: &str) -> String {
        String::from_utf8(build(|s| json_string_content(value, s)).to_vec()).unwrap()
    }

    #[test]
    fn form_encoding_keeps_unreserved_characters_and_encodes_the_rest() {
        assert_eq!(form("AZaz09*-._"), "AZaz09*-._");
        assert_eq!(form("card[number]"), "card%5Bnumber%5D");
        assert_eq!(form("a b&c=d+e%f/g?h#i"), "a+b%26c%3Dd%2Be%25f%2Fg%3Fh%23i");
        assert_eq!(form("é€"), "%C3%A9%E2%82%AC");
        assert_eq!(form(""), "");
    }

    #[test]
    fn form_encoding_agrees_with_the_url_crate() {
        let samples = ["metadata[order id]", "a&b=c", "100% ~ ü\n\"'<>", "tilde~"];
        for sample in samples {
            let ours = form(sample);
            let theirs = reqwest::Url::parse_with_params("http://x/", [("k", sample)])
                .unwrap()
                .query()
                .unwrap()
                .trim_start_matches("k=")
                .to_owned();
            assert_eq!(ours, theirs, "{sample:?}");
        }
    }

    #[test]
    fn a_form_body_joins_encoded_pairs_in_order() {
        let body = form_body(&[
            ("type", "card"),
            ("card[number]", "4242424242424242"),
            ("metadata[note]", "a&b"),
        ]);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "type=card&card%5Bnumber%5D=4242424242424242&metadata%5Bnote%5D=a%26b"
        );
        assert_eq!(body.len(), body.capacity(), "built at its exact size");
        assert!(form_body(&[]).is_empty());
    }

    #[test]
    fn json_escaping_round_trips_through_serde_json() {
        for sample in [
            "plain",
            "quote\" back\\slash",
            "nl\ncr\rtab\t",
            "\u{1}\u{1f}",
            "ü€😀",
            "",
        ] {
            let quoted = format!("\"{}\"", json(sample));
            let back: String = serde_json::from_str(&quoted).unwrap();
            assert_eq!(back, sample);
        }
        assert_eq!(json("a\"b"), "a\\\"b");
        assert_eq!(json("\u{1}"), "\\u0001");
    }
}
