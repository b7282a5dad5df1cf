//! `application/x-www-form-urlencoded` bodies as Stripe reads them: `key=value` pairs joined
//! by `&`, `+` for a space, `%XX` escapes in keys and values, and nested parameters written
//! with brackets (`card[number]`, `metadata[order]`).
//!
//! Values are card data (`card[number]`, `card[cvc]`), so they are held in [`Zeroizing`]
//! strings and [`Form`]'s `Debug` shows the keys only.

use std::fmt;

use ring::digest;
use zeroize::Zeroizing;

/// Why a body is not a form. Messages never repeat the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding in the request body")]
    BadEscape,
    /// A key or value that is not UTF-8 once decoded.
    #[error("the request body is not UTF-8 once decoded")]
    NotUtf8,
    /// A key whose brackets do not nest as `name[a][b]`.
    #[error("invalid parameter name: {0}")]
    BadKey(String),
}

/// A parsed form body: its pairs in order, keys percent-decoded and checked for bracket
/// syntax.
#[derive(Default)]
pub struct Form {
    pairs: Vec<(String, Zeroizing<String>)>,
}

impl fmt::Debug for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Form")
            .field("keys", &self.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Form {
    /// Parses a body. Empty pieces (`a=1&&b=2`, a trailing `&`) are skipped; a piece without
    /// `=` is a key with an empty value.
    pub fn parse(body: &[u8]) -> Result<Form, FormError> {
        let mut pairs = Vec::new();
        for piece in body.split(|&b| b == b'&') {
            if piece.is_empty() {
                continue;
            }
            let (key, value) = match piece.iter().position(|&b| b == b'=') {
                Some(at) => (&piece[..at], &piece[at + 1..]),
                None => (piece, &[][..]),
            };
            let key = String::from_utf8(decode(key)?.to_vec()).map_err(|_| FormError::NotUtf8)?;
            if segments(&key).is_none() {
                return Err(FormError::BadKey(key));
            }
            let value = decode(value)?;
            let value = std::str::from_utf8(&value).map_err(|_| FormError::NotUtf8)?;
            pairs.push((key, Zeroizing::new(value.to_owned())));
        }
        Ok(Form { pairs })
    }

    /// The value of `key` (decoded, e.g. `card[number]`); the last one when repeated, as
    /// Rack-style parsers do.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|(k, _)| k.as_str())
    }

    /// The one-level children of `name`: `metadata[order]=7` gives `("order", "7")` for
    /// `name = "metadata"`. Later values win; deeper nesting is not a child.
    pub fn children(&self, name: &str) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for (key, value) in &self.pairs {
            if let Some(segs) = segments(key)
                && segs.len() == 2
                && segs[0] == name
            {
                match out.iter_mut().find(|(k, _)| *k == segs[1]) {
                    Some(slot) => slot.1 = value.as_str(),
                    None => out.push((segs[1], value.as_str())),
                }
            }
        }
        out
    }

    /// The values of list parameter `name`, in order: `name[]=a&name[]=b` or
    /// `name[0]=a&name[1]=b`.
    pub fn list(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(key, _)| {
                segments(key).is_some_and(|segs| {
                    segs.len() == 2
                        && segs[0] == name
                        && segs[1].bytes().all(|b| b.is_ascii_digit())
                })
            })
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// A digest of the parameters, independent of their order, for comparing a repeated
    /// idempotent request with the first without keeping the card data it carried.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut sorted: Vec<(&str, &str)> = self
            .pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        sorted.sort_unstable();
        let mut ctx = digest::Context::new(&digest::SHA256);
        for (key, value) in sorted {
            for part in [key, value] {
                ctx.update(&(part.len() as u64).to_be_bytes());
                ctx.update(part.as_bytes());
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// The parts of a parameter name: `card[number]` → `["card", "number"]`, `expand[]` →
/// `["expand", ""]`. `None` when the brackets do not nest as `name[a][b]…` or the name is
/// empty.
pub fn segments(key: &str) -> Option<Vec<&str>> {
    let (head, mut rest) = match key.find('[') {
        Some(at) => (&key[..at], &key[at..]),
        None => (key, ""),
    };
    if head.is_empty() || head.contains(']') {
        return None;
    }
    let mut out = vec![head];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        let segment = &inner[..close];
        if segment.contains('[') {
            return None;
        }
        out.push(segment);
        rest = &inner[close + 1..];
    }
    Some(out)
}

/// Percent-decodes one key or value, `+` meaning a space.
fn decode(raw: &[u8]) -> Result<Zeroizing<Vec<u8>>, FormError> {
    let mut out = Zeroizing::new(Vec::with_capacity(raw.len()));
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = raw.get(i + 1).and_then(|&b| hex(b));
                let lo = raw.get(i + 2).and_then(|&b| hex(b));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(FormError::BadEscape),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_keys_are_percent_decoded() {
        let form =
            Form::parse(b"type=card&card%5Bnumber%5D=4242424242424242&card[exp_month]=12").unwrap();
        assert_eq!(form.get("type"), Some("card"));
        assert_eq!(form.get("card[number]"), Some("4242424242424242"));
        assert_eq!(form.get("card[exp_month]"), Some("12"));
    }

    #[test]
    fn plus_is_a_space_and_escapes_decode_to_utf8() {
        let form = Form::parse(b"description=Order+%2342+%E2%82%AC+caf%C3%A9").unwrap();
        assert_eq!(form.get("description"), Some("Order #42 € café"));
    }

    #[test]
    fn the_last_of_repeated_keys_wins() {
        let form = Form::parse(b"amount=1&amount=2&&").unwrap();
        assert_eq!(form.get("amount"), Some("2"));
    }

    #[test]
    fn children_are_one_level_below_a_name() {
        let form = Form::parse(b"metadata[order]=7&metadata[shop]=a%26b&metadata[a][b]=x&other=1")
            .unwrap();
        assert_eq!(
            form.children("metadata"),
            vec![("order", "7"), ("shop", "a&b")]
        );
    }

    #[test]
    fn lists_take_empty_or_numeric_brackets_in_order() {
        let form = Form::parse(b"t[]=card&t[]=link&u[0]=a&u[1]=b&u[x]=no&t=bare").unwrap();
        assert_eq!(form.list("t"), vec!["card", "link"]);
        assert_eq!(form.list("u"), vec!["a", "b"]);
    }

    #[test]
    fn broken_escapes_and_brackets_are_refused() {
        assert_eq!(Form::parse(b"a=%4").unwrap_err(), FormError::BadEscape);
        assert_eq!(Form::parse(b"a=%zz").unwrap_err(), FormError::BadEscape);
        assert_eq!(Form::parse(b"a=%FF").unwrap_err(), FormError::NotUtf8);
        assert!(matches!(
            Form::parse(b"card[number=1").unwrap_err(),
            FormError::BadKey(_)
        ));
        assert!(matches!(
            Form::parse(b"[x]=1").unwrap_err(),
            FormError::BadKey(_)
        ));
    }

    #[test]
    fn fingerprints_ignore_order_but_not_values() {
        let a = Form::parse(b"amount=100&currency=usd").unwrap();
        let b = Form::parse(b"currency=usd&amount=100").unwrap();
        let c = Form::parse(b"currency=usd&amount=101").unwrap();
        // "ab"+"c" and "a"+"bc" must differ: lengths are part of the digest.
        let d = Form::parse(b"ab=c").unwrap();
        let e = Form::parse(b"a=bc").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_ne!(d.fingerprint(), e.fingerprint());
    }

    #[test]
    fn debug_shows_keys_but_never_values() {
        let form = Form::parse(b"card[number]=4242424242424242&card[cvc]=123").unwrap();
        let text = format!("{form:?}");
        assert!(text.contains("card[number]"));
        assert!(!text.contains("4242") && !text.contains("123"));
    }
}
