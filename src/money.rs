//! Currency codes, checked once: a [`Currency`] is always three upper-case ASCII letters, so
//! the API, the vault and the connectors need not check (or disagree about) it again.

use std::fmt;

/// An ISO 4217 alphabetic code, upper-case (`EUR`). Whether the gateway supports it is the
/// gateway's to say; the vault only guarantees the form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

/// Text that is not three ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("currency must be a three-letter ISO 4217 code")]
pub struct InvalidCurrency;

impl Currency {
    /// Accepts three ASCII letters in either case (callers send `eur` as often as `EUR`).
    pub fn parse(code: &str) -> Result<Currency, InvalidCurrency> {
        match <[u8; 3]>::try_from(code.as_bytes()) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_alphabetic) => {
                Ok(Currency(bytes.map(|b| b.to_ascii_uppercase())))
            }
            _ => Err(InvalidCurrency),
        }
    }

    /// The code, upper-case.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored, so this cannot fail; a failure would be a bug
        // in `parse`, shown as an empty code rather than a panic on a request path.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_letters_in_either_case_parse_to_upper_case() {
        assert_eq!(Currency::parse("eur").unwrap().as_str(), "EUR");
        assert_eq!(Currency::parse("JpY").unwrap().to_string(), "JPY");
        assert_eq!(
            format!("{:?}", Currency::parse("usd").unwrap()),
            "Currency(USD)"
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in ["", "EU", "EURO", "E1R", "€UR", "EU ", "ÉUR"] {
            assert_eq!(Currency::parse(bad), Err(InvalidCurrency), "{bad:?}");
        }
    }
}
