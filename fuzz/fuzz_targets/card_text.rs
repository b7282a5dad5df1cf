//! Caller-supplied text: card numbers, tokens, cardholder names and metadata. No input may
//! panic the parsers, and no rejection may echo its input.

#![no_main]

use cardvault::{
    card::{CardholderName, Pan, Token},
    vault::metadata::contains_card_number,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Pan::parse(text) {
        Ok(pan) => {
            assert_eq!(pan.expose_digits().len(), pan.len());
            assert!(!format!("{pan:?}").contains(pan.expose_digits()));
        }
        Err(err) => {
            let digits: String = text.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 4 {
                assert!(!err.to_string().contains(&digits));
            }
        }
    }
    if let Ok(token) = Token::parse(text) {
        assert!(Pan::parse(token.as_str()).is_err(), "a token never parses as a card");
    }
    let _ = CardholderName::parse(text);
    let _ = contains_card_number(text);
});
