//! Caller metadata: a small string map stored in clear beside the token.
//!
//! Because it is stored in clear, it must not become a side door for card data: values and
//! keys that contain a card number (as [`crate::card::detect`] finds them: any brand, any
//! grouping, any script's digits) are refused.

use crate::card::{FieldViolation, contains_card_number};

/// Most entries a card may carry.
pub const MAX_ENTRIES: usize = 50;
/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 40;
/// Longest value, in characters.
pub const MAX_VALUE_CHARS: usize = 500;

const FIELD: &str = "metadata";

/// Validated metadata, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    /// Validates caller metadata, reporting every problem. Descriptions name a key only when
    /// the key itself is well-formed, so an error never echoes something card-shaped.
    pub fn parse(
        entries: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Metadata, Vec<FieldViolation>> {
        let mut entries: Vec<(String, String)> = entries.into_iter().collect();
        entries.sort();
        let mut violations = Vec::new();
        if entries.len() > MAX_ENTRIES {
            violations.push(violation(format!(
                "at most {MAX_ENTRIES} metadata entries are allowed"
            )));
        }
        for (key, value) in &entries {
            let key_ok = !key.is_empty()
                && key.len() <= MAX_KEY_CHARS
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                && !contains_card_number(key);
            if !key_ok {
                violations.push(violation(format!(
                    "metadata keys must be 1 to {MAX_KEY_CHARS} characters of A-Z, a-z, 0-9, \
                     '_', '.' or '-' and must not contain a card number"
                )));
                continue;
            }
            if value.chars().count() > MAX_VALUE_CHARS {
                violations.push(violation(format!(
                    "metadata value of key {key:?} is longer than {MAX_VALUE_CHARS} characters"
                )));
            } else if contains_card_number(value) {
                violations.push(violation(format!(
                    "metadata value of key {key:?} contains a card number; metadata is stored \
                     in clear, so card data belongs in the card fields"
                )));
            }
        }
        if violations.is_empty() {
            Ok(Metadata(entries))
        } else {
            Err(violations)
        }
    }

    /// The entries, sorted by key.
    pub fn entries(&self) -> &[(String, String)] {
        &self.0
    }

    /// Takes the entries out.
    pub fn into_entries(self) -> Vec<(String, String)> {
        self.0
    }
}

fn violation(description: String) -> FieldViolation {
    FieldViolation {
        field: FIELD,
        description,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Result<Metadata, Vec<FieldViolation>> {
        Metadata::parse(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn ordinary_metadata_is_accepted_and_sorted() {
        let m = md(&[("order_id", "A-1001"), ("customer", "c_42")]).expect("valid");
        assert_eq!(m.entries()[0].0, "customer");
    }

    #[test]
    fn a_card_number_in_a_value_is_refused_without_echoing_it() {
        for value in [
            "4242424242424242",
            "card 4242 4242 4242 4242 exp 12/30",
            "5555-5555-5555-4444",
            "x378282246310005y",
            // Unknown brand, and digits of other scripts: still card numbers.
            "0004242424242424242",
            "４２４２４２４２４２４２４２４２",
            "٤٢٤٢ ٤٢٤٢ ٤٢٤٢ ٤٢٤٢",
            "४२४२-४२४२-४२४२-४२४२",
        ] {
            let err = md(&[("note", value)]).expect_err(value);
            let text = format!("{err:?}");
            assert!(!text.contains("4242424242424242") && !text.contains("4242 4242"));
            assert!(!text.contains("5555") && !text.contains("378282"));
            assert!(!text.contains("٤٢٤٢") && !text.contains("४२४२") && !text.contains("４２"));
        }
    }

    #[test]
    fn a_card_number_as_a_key_is_refused_and_not_named() {
        let err = md(&[("4242424242424242", "x")]).expect_err("refused");
        assert!(!format!("{err:?}").contains("4242424242424242"));
    }

    #[test]
    fn numbers_that_are_not_cards_are_accepted() {
        // Too short, failing Luhn, a date.
        md(&[
            ("order", "10000000009"),
            ("ref", "4242424242424241"),
            ("on", "2026-11-25"),
        ])
        .expect("not cards");
    }

    #[test]
    fn a_luhn_valid_number_of_no_known_brand_is_refused() {
        // Stored as metadata before the detector ignored the brand.
        md(&[("note", "0004242424242424242")]).expect_err("a card number");
        md(&[("order", "1000000000009")]).expect_err("13 digits passing Luhn");
    }

    #[test]
    fn size_limits_are_enforced() {
        assert!(md(&[("k", &"v".repeat(MAX_VALUE_CHARS))]).is_ok());
        assert!(md(&[("k", &"v".repeat(MAX_VALUE_CHARS + 1))]).is_err());
        assert!(md(&[(&"k".repeat(MAX_KEY_CHARS + 1), "v")]).is_err());
        assert!(md(&[("", "v")]).is_err());
        assert!(md(&[("bad key", "v")]).is_err());
        let many: Vec<(String, String)> = (0..=MAX_ENTRIES)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        assert!(Metadata::parse(many).is_err());
    }
}
