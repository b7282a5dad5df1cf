//! How the store keeps a closed set of names (a charge's status, a key job's state, an audit
//! outcome…): as an enum whose variants each have one stored string.
//!
//! The strings are the column values the vault has always written; [`stored_enum`] gives each
//! enum `as_str` (what the backends bind) and `parse` (what they decode with), and a stored
//! value outside the set is a [`StoreError::Corrupt`] row, never a default: a status the code
//! does not know must stop the read, not pass for another one.

/// Defines a `Copy` enum with one stored name per variant:
///
/// ```ignore
/// stored_enum! {
///     /// Where a charge is.
///     pub enum ChargeState("charge status") {
///         /// Written, not sent yet.
///         Pending = "pending",
///     }
/// }
/// ```
///
/// generates the enum, `ALL` (every variant, in declaration order), `as_str`, `parse`
/// (unknown names are `StoreError::Corrupt` naming `what`) and a `Display` writing the name.
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($what:literal) {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $text:literal
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $(
                $(#[$vmeta])*
                $variant,
            )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant stored as `name`; any other name is a corrupt row.
            pub fn parse(name: &str) -> Result<$name, $crate::store::StoreError> {
                match name {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::store::StoreError::Corrupt(concat!(
                        "unknown stored ",
                        $what
                    ))),
                }
            }
        }

        // Read and bound as their stored names, so a repository reads a state column like
        // any other and an unknown name fails the read.
        impl $crate::store::dialect::Column for $name {
            fn read(
                row: &$crate::store::dialect::Row,
                name: &str,
            ) -> Result<Self, $crate::store::StoreError> {
                $name::parse(&<String as $crate::store::dialect::Column>::read(row, name)?)
            }
        }

        impl<'a> From<$name> for $crate::store::dialect::Arg<'a> {
            fn from(value: $name) -> Self {
                $crate::store::dialect::Arg::Str(Some(value.as_str()))
            }
        }

        impl<'a> From<&'a $name> for $crate::store::dialect::Arg<'a> {
            fn from(value: &'a $name) -> Self {
                $crate::store::dialect::Arg::Str(Some(value.as_str()))
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(super) use stored_enum;

#[cfg(test)]
mod tests {
    use super::super::{
        AuditOutcome, CaptureMethod, ChargeOperationKind, ChargeOperationState, ChargeState,
        KeyJobKind, KeyJobState, KeyRequestKind, KeyRequestState, StoreError,
    };

    /// Every variant parses back from its name, names are distinct, and a name outside the
    /// set (or one differing only in case or spacing) is a corrupt row.
    fn round_trips<T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display>(
        all: &[T],
        as_str: fn(T) -> &'static str,
        parse: fn(&str) -> Result<T, StoreError>,
        expected: &[&str],
    ) {
        let names: Vec<&str> = all.iter().map(|v| as_str(*v)).collect();
        assert_eq!(names, expected, "stored names changed");
        for (value, name) in all.iter().zip(&names) {
            assert_eq!(parse(name).expect("a stored name parses"), *value);
            assert_eq!(value.to_string(), *name);
        }
        for bad in ["", "nope", "PENDING", " ok", "unknown ", "Manual"] {
            if names.contains(&bad) {
                continue;
            }
            assert!(
                matches!(parse(bad), Err(StoreError::Corrupt(_))),
                "{bad:?} must be a corrupt row"
            );
        }
    }

    #[test]
    fn charge_states_round_trip() {
        round_trips(
            ChargeState::ALL,
            ChargeState::as_str,
            ChargeState::parse,
            &[
                "pending",
                "succeeded",
                "requires_action",
                "declined",
                "failed",
                "unknown",
            ],
        );
    }

    #[test]
    fn capture_methods_round_trip() {
        round_trips(
            CaptureMethod::ALL,
            CaptureMethod::as_str,
            CaptureMethod::parse,
            &["automatic", "manual"],
        );
        // What `capture_of` used to read as automatic is now refused.
        assert!(CaptureMethod::parse("auto").is_err());
    }

    #[test]
    fn charge_operation_kinds_and_states_round_trip() {
        round_trips(
            ChargeOperationKind::ALL,
            ChargeOperationKind::as_str,
            ChargeOperationKind::parse,
            &["capture", "refund", "cancel"],
        );
        round_trips(
            ChargeOperationState::ALL,
            ChargeOperationState::as_str,
            ChargeOperationState::parse,
            &["pending", "succeeded", "failed", "unknown"],
        );
    }

    #[test]
    fn key_job_kinds_and_states_round_trip() {
        round_trips(
            KeyJobKind::ALL,
            KeyJobKind::as_str,
            KeyJobKind::parse,
            &["rewrap", "reencrypt"],
        );
        round_trips(
            KeyJobState::ALL,
            KeyJobState::as_str,
            KeyJobState::parse,
            &["running", "done", "failed"],
        );
    }

    #[test]
    fn key_request_kinds_and_states_round_trip() {
        round_trips(
            KeyRequestKind::ALL,
            KeyRequestKind::as_str,
            KeyRequestKind::parse,
            &[
                "retire_kek",
                "shred_tenant",
                "create_principal",
                "revoke_principal",
                "create_api_key",
            ],
        );
        round_trips(
            KeyRequestState::ALL,
            KeyRequestState::as_str,
            KeyRequestState::parse,
            &["pending", "executed", "expired"],
        );
    }

    #[test]
    fn audit_outcomes_round_trip() {
        round_trips(
            AuditOutcome::ALL,
            AuditOutcome::as_str,
            AuditOutcome::parse,
            &[
                "ok",
                "not_found",
                "invalid_argument",
                "unauthenticated",
                "permission_denied",
                "rate_limited",
                "conflict",
                "error",
            ],
        );
    }
}
