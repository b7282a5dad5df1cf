//! Caller-supplied text: card numbers, tokens, cardholder names and metadata. No input may
//! panic the parsers, and no rejection may echo its input.

#![no_main]

use cardvault::card::{
    CardholderName, Pan, Token,
    detect::{contains_card_number, find_card_numbers, mask_digits, replace_card_numbers},
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
    let found = find_card_numbers(text);
    assert_eq!(contains_card_number(text), !found.is_empty());
    for range in found {
        assert!(text.is_char_boundary(range.start) && text.is_char_boundary(range.end));
    }
    let masked = replace_card_numbers(text, |digits| Some(mask_digits(digits)));
    // Each digit becomes one ASCII character and separators go: never longer.
    assert!(masked.len() <= text.len());
});
