//! The card verification code (CVC/CVV): sensitive authentication data under PCI DSS 3.3,
//! so it is never stored with the card, never logged and never returned. The vault keeps it
//! only as an encrypted, single-use hold for the card's next charge.

use std::fmt;

use zeroize::Zeroizing;

/// A CVC: 3 or 4 ASCII digits. Zeroized on drop; `Debug` never shows it; no `Display`.
#[derive(Clone)]
pub struct Cvc(Zeroizing<String>);

/// Why a CVC was rejected. Messages never echo the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CvcError {
    /// Not 3 or 4 digits.
    #[error("cvc must be 3 or 4 digits")]
    Malformed,
}

impl Cvc {
    /// Parses a CVC. Empty input means "none given" (`Ok(None)`), as proto3 sends `""`.
    pub fn parse(input: &str) -> Result<Option<Cvc>, CvcError> {
        if input.is_empty() {
            return Ok(None);
        }
        if !(3..=4).contains(&input.len()) || !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CvcError::Malformed);
        }
        Ok(Some(Cvc(Zeroizing::new(input.to_owned()))))
    }

    /// The digits: call only to seal the hold or to send them to a payment gateway.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_or_four_digits_are_a_cvc_and_empty_is_none() {
        assert_eq!(Cvc::parse("123").unwrap().unwrap().expose(), "123");
        assert_eq!(Cvc::parse("0042").unwrap().unwrap().expose(), "0042");
        assert!(Cvc::parse("").unwrap().is_none());
    }

    #[test]
    fn anything_else_is_refused_without_echoing_it() {
        for bad in ["12", "12345", "12a", " 123", "１２３", "-12"] {
            let err = Cvc::parse(bad).unwrap_err();
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn debug_never_shows_the_digits() {
        let cvc = Cvc::parse("987").unwrap().unwrap();
        assert_eq!(format!("{cvc:?}"), "Cvc(<redacted>)");
    }
}
