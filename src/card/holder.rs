//! The optional cardholder name: personal data, so treated like the PAN (zeroized,
//! redacted in `Debug`, stored only as ciphertext).

use std::fmt;

use zeroize::Zeroizing;

const MAX_CHARS: usize = 100;
/// Bounds storage whatever the script: 100 scalar values can take up to 400 bytes of UTF-8.
const MAX_BYTES: usize = 400;

/// A cardholder name: trimmed, 1 to 100 Unicode scalar values, at most 400 bytes, no
/// control characters. Zeroized on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct CardholderName(Zeroizing<String>);

/// Why a cardholder name was rejected. Messages never echo the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HolderError {
    /// More than 100 characters or 400 bytes.
    #[error("cardholder name must be at most 100 characters (400 bytes)")]
    TooLong,
    /// A control character (newline, tab inside the name, NUL, …): they have no place in
    /// a name and are how log and header injection starts.
    #[error("cardholder name must not contain control characters")]
    ControlCharacter,
}

impl CardholderName {
    /// Parses an optional name. Empty or whitespace-only input means "no name given" and
    /// is `Ok(None)`, because the field is optional in the API and proto3 sends `""`.
    pub fn parse(input: &str) -> Result<Option<CardholderName>, HolderError> {
        let name = input.trim();
        if name.is_empty() {
            return Ok(None);
        }
        // The byte check first bounds the cost of counting characters in hostile input.
        if name.len() > MAX_BYTES || name.chars().count() > MAX_CHARS {
            return Err(HolderError::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(HolderError::ControlCharacter);
        }
        // `to_owned` allocates exactly once, so no unzeroized copy is left behind.
        Ok(Some(CardholderName(Zeroizing::new(name.to_owned()))))
    }

    /// The name itself: call only to encrypt it or to send it to a payment gateway.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardholderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardholderName(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surrounding_whitespace_is_trimmed() {
        let name = CardholderName::parse("  Zoë Ørsted \n")
            .expect("valid")
            .expect("present");
        assert_eq!(name.expose(), "Zoë Ørsted");
    }

    #[test]
    fn empty_or_blank_input_means_no_name() {
        assert!(CardholderName::parse("").expect("ok").is_none());
        assert!(CardholderName::parse(" \t\u{3000} ").expect("ok").is_none());
    }

    #[test]
    fn one_hundred_characters_are_accepted_and_one_hundred_one_rejected() {
        assert!(CardholderName::parse(&"a".repeat(100)).is_ok());
        assert_eq!(
            CardholderName::parse(&"a".repeat(101)).unwrap_err(),
            HolderError::TooLong
        );
    }

    #[test]
    fn multibyte_names_are_counted_in_characters_up_to_four_hundred_bytes() {
        // 100 four-byte scalars: exactly at both limits.
        assert!(CardholderName::parse(&"😀".repeat(100)).is_ok());
        // 100 scalars but each is a base letter plus a combining mark: 150 bytes, fine.
        assert!(CardholderName::parse(&"e\u{301}".repeat(50)).is_ok());
        assert_eq!(
            CardholderName::parse(&"😀".repeat(101)).unwrap_err(),
            HolderError::TooLong
        );
    }

    #[test]
    fn control_characters_inside_the_name_are_rejected() {
        for input in [
            "Ann\nBee",
            "Ann\tBee",
            "Ann\u{0}",
            "Ann\u{7f}Bee",
            "A\u{85}B",
        ] {
            assert_eq!(
                CardholderName::parse(input).unwrap_err(),
                HolderError::ControlCharacter,
                "{input:?}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_name_and_errors_never_echo_it() {
        let name = CardholderName::parse("Jane Q Public")
            .expect("valid")
            .expect("present");
        assert_eq!(format!("{name:?}"), "CardholderName(<redacted>)");
        let err = CardholderName::parse("Jane\nQ Public").unwrap_err();
        assert!(!err.to_string().contains("Jane"));
        assert!(!format!("{err:?}").contains("Jane"));
    }
}
