//! The Luhn (mod 10) checksum that every payment card number carries in its last digit.
//!
//! Both functions work on ASCII digit bytes because that is how a [`Pan`](super::Pan) holds
//! its digits: no conversion, no temporary copy of the secret.

/// Whether `digits` (ASCII `b'0'..=b'9'`) pass the Luhn check.
///
/// An empty slice or any non-digit byte is invalid: a checksum over nothing, or over
/// something that is not a number, must not vouch for it.
pub fn is_valid(digits: &[u8]) -> bool {
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) && weighted_sum(digits, false) == 0
}

/// The ASCII check digit that, appended to `payload`, makes it pass [`is_valid`].
///
/// `payload` should be ASCII digits. Any other byte counts as `0` rather than panicking,
/// because a panic here would be a denial of service for a caller's typo; callers that
/// need to reject such input validate it first, as [`Pan::parse`](super::Pan::parse) does.
pub fn check_digit(payload: &[u8]) -> u8 {
    // The check digit is the rightmost, undoubled digit, so the payload's own rightmost
    // digit is doubled.
    let sum = weighted_sum(payload, true);
    b'0' + (10 - sum) % 10
}

/// Luhn sum mod 10, walking from the right. `double_rightmost` says whether the rightmost
/// byte sits at a doubled position (it does for a payload still missing its check digit).
fn weighted_sum(digits: &[u8], double_rightmost: bool) -> u8 {
    digits
        .iter()
        .rev()
        .enumerate()
        .fold(0u8, |sum, (position, &byte)| {
            let digit = if byte.is_ascii_digit() {
                byte - b'0'
            } else {
                0
            };
            let doubled = (position % 2 == 0) == double_rightmost;
            let contribution = match (doubled, digit) {
                (false, d) => d,
                (true, d @ 0..=4) => d * 2,
                (true, d) => d * 2 - 9,
            };
            // Reducing at every step keeps the sum in a u8 for inputs of any length.
            (sum + contribution) % 10
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn published_test_card_numbers_pass() {
        for number in [
            "4242424242424242",
            "5555555555554444",
            "378282246310005",
            "6011111111111117",
            "79927398713",
            "0",
        ] {
            assert!(is_valid(number.as_bytes()), "{number} should pass");
        }
    }

    #[test]
    fn numbers_with_a_wrong_digit_fail() {
        for number in ["4242424242424241", "378282246310006", "79927398710", "1"] {
            assert!(!is_valid(number.as_bytes()), "{number} should fail");
        }
    }

    #[test]
    fn empty_input_and_non_digits_never_pass() {
        assert!(!is_valid(b""));
        assert!(!is_valid(b"4242 4242 4242 4242"));
        assert!(!is_valid(b"42424242424242a2"));
    }

    #[test]
    fn check_digit_of_a_known_payload_is_the_published_one() {
        assert_eq!(check_digit(b"424242424242424"), b'2');
        assert_eq!(check_digit(b"7992739871"), b'3');
        assert_eq!(check_digit(b""), b'0');
    }

    proptest! {
        #[test]
        fn check_digit_makes_any_payload_valid(payload in "[0-9]{0,30}") {
            let mut number = payload.into_bytes();
            number.push(check_digit(&number));
            prop_assert!(is_valid(&number));
        }

        #[test]
        fn changing_any_single_digit_breaks_a_valid_number(
            payload in "[0-9]{1,25}",
            position in any::<prop::sample::Index>(),
            bump in 1u8..=9,
        ) {
            let mut number = payload.into_bytes();
            number.push(check_digit(&number));
            let i = position.index(number.len());
            number[i] = b'0' + (number[i] - b'0' + bump) % 10;
            prop_assert!(!is_valid(&number));
        }
    }
}
