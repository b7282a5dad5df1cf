//! How card problems are reported to callers: one violation per field, all at once, in the
//! shape of `google.rpc.BadRequest` so the api layer can map them without interpretation.

/// One field's problem, for a `google.rpc.BadRequest.FieldViolation`.
///
/// `description` explains the rule that was broken and never contains the value given:
/// these travel back to callers and into logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field, e.g. `"card.number"`.
    pub field: &'static str,
    /// What the rule is, for a human fixing the request.
    pub description: String,
}

impl FieldViolation {
    /// A violation on `field` described by a card error's message.
    pub fn new(field: &'static str, error: &dyn std::fmt::Display) -> Self {
        FieldViolation {
            field,
            description: error.to_string(),
        }
    }
}

/// A card failed validation; every broken field is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid card: {}", describe(.violations))]
pub struct InvalidCard {
    /// At least one violation, in field order.
    pub violations: Vec<FieldViolation>,
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}
