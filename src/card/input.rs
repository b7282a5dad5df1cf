//! A whole card as a caller submits it, validated field by field.

use time::Date;

use super::{CardholderName, Expiry, FieldViolation, InvalidCard, Pan, expiry};

const NUMBER: &str = "card.number";
const EXP_MONTH: &str = "card.exp_month";
const EXP_YEAR: &str = "card.exp_year";
const CARDHOLDER_NAME: &str = "card.cardholder_name";

/// A validated card, ready to tokenize. `Debug` is safe: the PAN prints masked and the
/// name redacted.
#[derive(Debug, Clone)]
pub struct Card {
    /// The card number.
    pub pan: Pan,
    /// Expiry month and year, not expired on the day it was parsed.
    pub expiry: Expiry,
    /// The cardholder name, when one was given.
    pub holder: Option<CardholderName>,
}

/// The raw card fields of a request, borrowed from it.
///
/// Deliberately not `Debug`: `number` is the raw PAN.
#[derive(Clone, Copy)]
pub struct CardInput<'a> {
    /// The card number as typed (spaces and dashes allowed).
    pub number: &'a str,
    /// Expiry month, 1 to 12.
    pub exp_month: u32,
    /// Expiry year: two digits, or four from 2000 to 2099.
    pub exp_year: u32,
    /// Cardholder name; empty means none.
    pub cardholder_name: &'a str,
}

impl Card {
    /// Validates every field and reports all problems at once, so a caller fixes a
    /// request in one round trip. `today` is the current UTC date.
    pub fn parse(input: &CardInput<'_>, today: Date) -> Result<Card, InvalidCard> {
        let mut violations = Vec::new();
        let mut report = |field, error: &dyn std::fmt::Display| {
            violations.push(FieldViolation::new(field, error));
        };

        let pan = Pan::parse(input.number)
            .map_err(|e| report(NUMBER, &e))
            .ok();

        let month = expiry::month_from(input.exp_month).map_err(|e| report(EXP_MONTH, &e));
        let year = expiry::year_from(input.exp_year, today).map_err(|e| report(EXP_YEAR, &e));
        let expiry = match (month, year) {
            // Expiry is judged only once month and year are each valid; the only error
            // left is `Expired`. It goes on the year: that is the field a user corrects
            // most often (a new card usually changes the year), and one field keeps
            // client-side highlighting simple.
            (Ok(month), Ok(year)) => Expiry::unexpired(month, year, today)
                .map_err(|e| report(EXP_YEAR, &e))
                .ok(),
            _ => None,
        };

        let holder = CardholderName::parse(input.cardholder_name)
            .map_err(|e| report(CARDHOLDER_NAME, &e))
            .ok();

        match (pan, expiry, holder) {
            (Some(pan), Some(expiry), Some(holder)) => Ok(Card {
                pan,
                expiry,
                holder,
            }),
            _ => Err(InvalidCard { violations }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 05 - 15);

    fn input<'a>(number: &'a str, month: u32, year: u32, name: &'a str) -> CardInput<'a> {
        CardInput {
            number,
            exp_month: month,
            exp_year: year,
            cardholder_name: name,
        }
    }

    fn fields(err: &InvalidCard) -> Vec<&'static str> {
        err.violations.iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_valid_card_parses_with_every_field() {
        let card =
            Card::parse(&input("4242 4242 4242 4242", 12, 30, " Jane Doe "), TODAY).expect("valid");
        assert_eq!(card.pan.last4(), "4242");
        assert_eq!((card.expiry.month(), card.expiry.year()), (12, 2030));
        assert_eq!(card.holder.as_ref().map(|h| h.expose()), Some("Jane Doe"));
    }

    #[test]
    fn a_missing_name_is_fine() {
        let card = Card::parse(&input("4242424242424242", 1, 2027, ""), TODAY).expect("valid");
        assert!(card.holder.is_none());
    }

    #[test]
    fn every_broken_field_is_reported_at_once_with_exact_field_names() {
        let err = Card::parse(&input("4242424242424241", 13, 1999, "A\nB"), TODAY)
            .expect_err("all invalid");
        assert_eq!(
            fields(&err),
            [
                "card.number",
                "card.exp_month",
                "card.exp_year",
                "card.cardholder_name"
            ]
        );
    }

    #[test]
    fn an_expired_card_is_reported_on_the_year() {
        let err = Card::parse(&input("4242424242424242", 4, 2026, ""), TODAY).expect_err("expired");
        assert_eq!(
            err.violations,
            [FieldViolation {
                field: "card.exp_year",
                description: "card has expired".to_owned(),
            }]
        );
    }

    #[test]
    fn expiry_is_not_reported_as_expired_when_the_month_is_invalid() {
        let err = Card::parse(&input("4242424242424242", 0, 2020, ""), TODAY).expect_err("bad");
        assert_eq!(fields(&err), ["card.exp_month"]);
    }

    #[test]
    fn violations_and_messages_never_contain_the_inputs() {
        let number = "4242 4242 4242 4241";
        let name = "Zed\u{7}Zebulon";
        let err = Card::parse(&input(number, 77, 3050, name), TODAY).expect_err("invalid");
        let texts = [err.to_string(), format!("{err:?}")];
        for text in &texts {
            for secret in ["4242", "Zebulon", "77", "3050"] {
                assert!(!text.contains(secret), "{secret} leaked into {text}");
            }
        }
        assert!(texts[0].starts_with("invalid card: card.number: "));
    }

    #[test]
    fn a_valid_card_debug_masks_the_number_and_redacts_the_name() {
        let card =
            Card::parse(&input("4242424242424242", 12, 2030, "Jane Doe"), TODAY).expect("valid");
        let debug = format!("{card:?}");
        assert!(!debug.contains("4242424242424242"));
        assert!(!debug.contains("Jane"));
        assert!(debug.contains("424242******4242"));
    }
}
