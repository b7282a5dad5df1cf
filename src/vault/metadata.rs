//! Caller metadata: a small string map stored in clear beside the token.
//!
//! Because it is stored in clear, it must not become a side door for card data: values and
//! keys that contain something shaped like a card number are refused.

use crate::card::{Brand, FieldViolation, Pan};

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

/// Whether `text` holds 12–19 digits, written together or in groups split by spaces or
/// dashes, that pass Luhn and fall in a known card range. Unknown ranges are let through:
/// a random 13-digit order number passes Luhn one time in ten and must not be refused.
pub fn contains_card_number(text: &str) -> bool {
    let groups: Vec<&str> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .collect();
    // Only groups that were adjacent (separated by one space or dash) can form one number;
    // checking every run of consecutive groups is a superset of that, and cheap.
    for start in 0..groups.len() {
        let mut candidate = String::new();
        for group in &groups[start..] {
            candidate.push_str(group);
            if candidate.len() > 19 {
                break;
            }
            if candidate.len() >= 12
                && Pan::parse(&candidate).is_ok_and(|pan| pan.brand() != Brand::Unknown)
            {
                return true;
            }
        }
    }
    false
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
        ] {
            let err = md(&[("note", value)]).expect_err(value);
            let text = format!("{err:?}");
            assert!(!text.contains("4242424242424242") && !text.contains("4242 4242"));
            assert!(!text.contains("5555") && !text.contains("378282"));
        }
    }

    #[test]
    fn a_card_number_as_a_key_is_refused_and_not_named() {
        let err = md(&[("4242424242424242", "x")]).expect_err("refused");
        assert!(!format!("{err:?}").contains("4242424242424242"));
    }

    #[test]
    fn numbers_that_are_not_cards_are_accepted() {
        // 13 digits, passes Luhn, no known IIN range; and a 16-digit run that fails Luhn.
        md(&[("order", "1000000000009"), ("ref", "4242424242424241")]).expect("not cards");
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
