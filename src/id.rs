//! The vault's own ids: a prefix naming what the id is for and 16 base62 characters from the
//! OS CSPRNG (95 bits), unguessable and safe to show in logs and audit records.
//!
//! Charges and charge operations get types of their own because their ids also go to the
//! payment gateway as its idempotency keys: a [`ChargeId`] can be made only here or parsed
//! from a well-formed id, so the caller's idempotency key (a free-form string the vault
//! stores beside it) can never be sent in its place.

use std::fmt;

use crate::crypto::{self, CryptoError};

/// Length of the random part of every id.
const RANDOM_LEN: usize = 16;

/// A fresh id: `prefix` and 16 base62 characters from the OS CSPRNG.
pub fn new_id(prefix: &str) -> Result<String, CryptoError> {
    let mut id = String::with_capacity(prefix.len() + RANDOM_LEN);
    id.push_str(prefix);
    id.push_str(&crypto::random_base62(RANDOM_LEN)?);
    Ok(id)
}

/// Whether `id` is `prefix` and 16 ASCII letters or digits.
fn well_formed(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == RANDOM_LEN && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// A string that is not a well-formed id of the expected kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a well-formed {kind} id ({prefix} and 16 letters or digits)")]
pub struct MalformedId {
    /// What the id should have named.
    pub kind: &'static str,
    /// The prefix it should have had.
    pub prefix: &'static str,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// The prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id.
            pub fn generate() -> Result<Self, CryptoError> {
                new_id(Self::PREFIX).map(Self)
            }

            /// Accepts only a well-formed id of this kind.
            pub fn parse(id: &str) -> Result<Self, MalformedId> {
                if well_formed(id, Self::PREFIX) {
                    Ok(Self(id.to_owned()))
                } else {
                    Err(MalformedId {
                        kind: $kind,
                        prefix: Self::PREFIX,
                    })
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string, for storage.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

typed_id!(
    /// A charge's id (`ch_…`): also the gateway's idempotency key for the charge, stable
    /// across re-sends.
    ChargeId,
    "ch_",
    "charge"
);

typed_id!(
    /// A capture, refund or cancel's id (`op_…`): also the gateway's idempotency key for it.
    OperationId,
    "op_",
    "charge operation"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back_and_differ() {
        let a = ChargeId::generate().unwrap();
        let b = ChargeId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(ChargeId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.as_str().len(), 19);
        let op = OperationId::generate().unwrap();
        assert!(op.as_str().starts_with("op_"));
        assert_eq!(OperationId::parse(op.as_str()).unwrap(), op);
    }

    #[test]
    fn only_well_formed_ids_of_the_right_kind_parse() {
        let op = OperationId::generate().unwrap();
        assert!(
            ChargeId::parse(op.as_str()).is_err(),
            "an operation id is no charge id"
        );
        for bad in [
            "",
            "ch_",
            "ch_abc",
            "ch_0123456789abcdefX",
            "ch_0123456789abcde!",
            "CH_0123456789abcdef",
            "ch_0123456789abcdé",
            "my-idempotency-key",
        ] {
            let err = ChargeId::parse(bad).unwrap_err();
            assert_eq!(err.prefix, "ch_", "{bad}");
        }
        assert!(ChargeId::parse("ch_0123456789abcdef").is_ok());
    }

    #[test]
    fn new_id_has_the_prefix_and_sixteen_base62_characters() {
        let id = new_id("kr_rotate_").unwrap();
        assert!(well_formed(&id, "kr_rotate_"), "{id}");
    }
}
