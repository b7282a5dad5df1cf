//! Caller-chosen names the vault stores in clear and shows in logs and audit records, each
//! checked once, here, so the API, the admin CLI and start-up provisioning cannot drift apart.

use std::fmt;

use crate::card::contains_card_number;

/// Longest idempotency key a caller may choose. The gateway never sees it (it gets the
/// charge's or operation's own id), so the limit is the API's, not a gateway's.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Longest principal name.
pub const MAX_PRINCIPAL_NAME_LEN: usize = 64;

/// The caller's key for one charge or one capture/refund/cancel: 1 to 255 printable ASCII
/// characters, never containing a card number (it is stored in clear and its end is logged).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why an idempotency key was refused. The messages never echo the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdempotencyKey {
    /// Empty, too long, or not printable ASCII.
    #[error("idempotency_key is required: 1 to 255 printable ASCII characters")]
    Form,
    /// It holds something that looks like a card number.
    #[error("idempotency_key contains a card number; it is stored in clear, so use another key")]
    CardNumber,
}

impl IdempotencyKey {
    /// Accepts a well-formed key that carries no card number.
    pub fn parse(key: &str) -> Result<IdempotencyKey, InvalidIdempotencyKey> {
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(InvalidIdempotencyKey::Form);
        }
        if contains_card_number(key) {
            return Err(InvalidIdempotencyKey::CardNumber);
        }
        Ok(IdempotencyKey(key.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A principal's name: 1 to 64 of `A-Z a-z 0-9 . _ -`, a plain alphabet because it appears in
/// logs and audit records.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrincipalName(String);

/// A name outside the principal-name alphabet or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("name must be 1 to 64 of A-Z a-z 0-9 . _ -")]
pub struct InvalidPrincipalName;

impl PrincipalName {
    /// Accepts a name in the alphabet and length.
    pub fn parse(name: &str) -> Result<PrincipalName, InvalidPrincipalName> {
        let plain = (1..=MAX_PRINCIPAL_NAME_LEN).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if plain {
            Ok(PrincipalName(name.to_owned()))
        } else {
            Err(InvalidPrincipalName)
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PrincipalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_printable_ascii_of_bounded_length() {
        assert_eq!(
            IdempotencyKey::parse("order-42").unwrap().as_str(),
            "order-42"
        );
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", "a b", "tab\there", "é", &"k".repeat(256)] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(InvalidIdempotencyKey::Form),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_idempotency_key_holding_a_card_number_is_refused_without_echoing_it() {
        let err = IdempotencyKey::parse("order-4111111111111111").unwrap_err();
        assert_eq!(err, InvalidIdempotencyKey::CardNumber);
        assert!(!err.to_string().contains("4111"));
    }

    #[test]
    fn principal_names_use_a_plain_alphabet() {
        assert!(PrincipalName::parse("checkout-eu.1").is_ok());
        assert!(PrincipalName::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "ünï", "a/b", &"a".repeat(65)] {
            assert_eq!(
                PrincipalName::parse(bad),
                Err(InvalidPrincipalName),
                "{bad:?}"
            );
        }
    }
}
