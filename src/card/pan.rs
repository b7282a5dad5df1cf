//! The primary account number: the one secret every other type in this module protects.

use std::fmt;

use zeroize::Zeroizing;

use super::{Brand, luhn};

const MIN_LEN: usize = 12;
const MAX_LEN: usize = 19;
/// Digits PCI DSS lets us show in clear at each end of a masked number.
const SHOWN_LEADING: usize = 6;
const SHOWN_TRAILING: usize = 4;

/// A validated primary account number: 12 to 19 ASCII digits passing the Luhn check.
///
/// There is deliberately no `Display`, `AsRef<str>` or `Deref`: the digits come out only
/// through [`Pan::expose_digits`], so every use of the secret is greppable. `Debug` prints
/// the masked form. The digits are zeroized when the value is dropped (clones included).
///
/// ```
/// use cardvault::card::{Brand, Pan};
///
/// let pan = Pan::parse("4242 4242-4242 4242").expect("a valid test card");
/// assert_eq!(pan.brand(), Brand::Visa);
/// assert_eq!((pan.bin(), pan.last4()), ("42424242", "4242"));
/// // Debug masks: a Pan logged by accident shows first 6 and last 4 only.
/// assert_eq!(format!("{pan:?}"), "Pan(424242******4242)");
/// // Errors describe the rule and never echo the input.
/// let err = Pan::parse("4242 4242 4242 4241").unwrap_err();
/// assert!(!err.to_string().contains("4241"));
/// ```
#[derive(Clone)]
pub struct Pan(Zeroizing<String>);

/// Why a card number was rejected. Messages describe the rule and never echo the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PanError {
    /// Nothing but separators (or nothing at all) was given.
    #[error("card number is required")]
    Empty,
    /// Something other than digits, spaces and dashes.
    #[error("card number may contain only digits, spaces and dashes")]
    InvalidCharacters,
    /// Fewer than 12 or more than 19 digits.
    #[error("card number must be 12 to 19 digits")]
    InvalidLength,
    /// The check digit does not match.
    #[error("card number fails the Luhn check (mistyped digit?)")]
    FailsLuhn,
}

impl Pan {
    /// Parses a card number as people type it: ASCII spaces and `-` are dropped, every
    /// other non-digit (including tabs and non-ASCII digits) is rejected.
    pub fn parse(input: &str) -> Result<Pan, PanError> {
        // Sized once for the longest valid number and never grown: a reallocation would
        // leave an unzeroized copy of the digits in the freed buffer.
        let mut digits = Zeroizing::new(String::with_capacity(MAX_LEN));
        let mut count = 0usize;
        for c in input.chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => {
                    count += 1;
                    if count <= MAX_LEN {
                        digits.push(c);
                    }
                }
                _ => return Err(PanError::InvalidCharacters),
            }
        }
        if count == 0 {
            return Err(PanError::Empty);
        }
        if !(MIN_LEN..=MAX_LEN).contains(&count) {
            return Err(PanError::InvalidLength);
        }
        if !luhn::is_valid(digits.as_bytes()) {
            return Err(PanError::FailsLuhn);
        }
        Ok(Pan(digits))
    }

    /// Number of digits (12 to 19).
    #[allow(
        clippy::len_without_is_empty,
        reason = "a Pan always has at least 12 digits, so is_empty would be constant false"
    )]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The last four digits, which PCI DSS allows to store and display.
    pub fn last4(&self) -> &str {
        // In bounds: parse guarantees at least 12 ASCII digits.
        &self.0[self.0.len() - SHOWN_TRAILING..]
    }

    /// The BIN / IIN to store in clear: the first 8 digits for numbers of 16 digits or
    /// more, else the first 6 (the most PCI DSS allows for each).
    pub fn bin(&self) -> &str {
        let len = if self.0.len() >= 16 { 8 } else { 6 };
        // In bounds: parse guarantees at least 12 ASCII digits.
        &self.0[..len]
    }

    /// First 6 and last 4 digits with `*` for each digit in between, e.g.
    /// `424242******4242`: safe for logs and user interfaces.
    pub fn masked(&self) -> String {
        let len = self.0.len();
        // In bounds: parse guarantees at least 12 > 6 + 4 ASCII digits.
        let head = &self.0[..SHOWN_LEADING];
        let tail = &self.0[len - SHOWN_TRAILING..];
        let hidden = len - SHOWN_LEADING - SHOWN_TRAILING;
        format!("{head}{}{tail}", "*".repeat(hidden))
    }

    /// The card brand from the IIN ranges.
    pub fn brand(&self) -> Brand {
        Brand::from_digits(&self.0)
    }

    /// The full digits. This is the one explicit door to the secret: call it only to
    /// encrypt the number or to fingerprint it, and never keep the result beyond that.
    pub fn expose_digits(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pan")
            .field(&format_args!("{}", self.masked()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A random valid PAN of every allowed length.
    fn valid_pan_digits() -> impl Strategy<Value = String> {
        (MIN_LEN..=MAX_LEN)
            .prop_flat_map(|len| proptest::collection::vec(b'0'..=b'9', len - 1))
            .prop_map(|mut digits| {
                digits.push(luhn::check_digit(&digits));
                digits.into_iter().map(char::from).collect()
            })
    }

    #[test]
    fn spaces_and_dashes_are_removed() {
        let pan = Pan::parse(" 4242 4242-4242--4242 ").expect("valid");
        assert_eq!(pan.expose_digits(), "4242424242424242");
        assert_eq!(pan.len(), 16);
    }

    #[test]
    fn letters_and_other_punctuation_are_rejected() {
        for input in [
            "4242 4242 4242 424a",
            "4242.4242.4242.4242",
            "4242\t4242424242424242",
            "4242_4242_4242_4242",
            "+4242424242424242",
            "４２４２４２４２４２４２４２４２", // full-width digits are not ASCII digits
        ] {
            assert_eq!(
                Pan::parse(input).unwrap_err(),
                PanError::InvalidCharacters,
                "{input:?}"
            );
        }
    }

    #[test]
    fn empty_or_separator_only_input_is_empty() {
        assert_eq!(Pan::parse("").unwrap_err(), PanError::Empty);
        assert_eq!(Pan::parse(" - -").unwrap_err(), PanError::Empty);
    }

    #[test]
    fn eleven_and_twenty_digits_are_rejected_even_with_a_valid_check_digit() {
        for payload in ["4242424242", "4242424242424242424"] {
            let mut number = payload.to_owned();
            number.push(char::from(luhn::check_digit(payload.as_bytes())));
            assert!(luhn::is_valid(number.as_bytes()));
            assert_eq!(Pan::parse(&number).unwrap_err(), PanError::InvalidLength);
        }
    }

    #[test]
    fn twelve_and_nineteen_digits_with_a_valid_check_digit_are_accepted() {
        for payload in ["42424242424", "424242424242424242"] {
            let mut number = payload.to_owned();
            number.push(char::from(luhn::check_digit(payload.as_bytes())));
            let pan = Pan::parse(&number).expect("valid");
            assert_eq!(pan.len(), number.len());
        }
    }

    #[test]
    fn a_mistyped_digit_fails_luhn() {
        assert_eq!(
            Pan::parse("4242424242424241").unwrap_err(),
            PanError::FailsLuhn
        );
    }

    #[test]
    fn bin_is_eight_digits_from_sixteen_digits_and_six_below() {
        let sixteen = Pan::parse("4242424242424242").expect("valid");
        assert_eq!(sixteen.bin(), "42424242");
        let fifteen = Pan::parse("378282246310005").expect("valid");
        assert_eq!(fifteen.bin(), "378282");
        assert_eq!(fifteen.last4(), "0005");
    }

    /// PCI DSS 3.4.1 allows BIN 8 + last 4 in clear only for PANs of 16 or more digits;
    /// shorter ones show at most the first 6 and the last 4.
    #[test]
    fn bin_is_eight_digits_only_from_sixteen_digits_at_every_length() {
        for len in MIN_LEN..=MAX_LEN {
            let mut digits = b"1234567890123456789"[..len - 1].to_vec();
            digits.push(luhn::check_digit(&digits));
            let number = String::from_utf8(digits).expect("ASCII");
            let pan = Pan::parse(&number).expect("valid");
            let shown = if len >= 16 { 8 } else { 6 };
            assert_eq!(pan.bin(), &number[..shown], "{len} digits");
            assert_eq!(pan.last4(), &number[len - 4..], "{len} digits");
        }
        // The boundary, with real cards: 15-digit Amex 6, 16-digit Visa 8.
        assert_eq!(Pan::parse("371449635398431").expect("amex").bin().len(), 6);
        assert_eq!(Pan::parse("4000056655665556").expect("visa").bin().len(), 8);
    }

    #[test]
    fn masked_keeps_first_six_and_last_four() {
        let pan = Pan::parse("4242424242424242").expect("valid");
        assert_eq!(pan.masked(), "424242******4242");
        assert_eq!(format!("{pan:?}"), "Pan(424242******4242)");
        let amex = Pan::parse("378282246310005").expect("valid");
        assert_eq!(amex.masked(), "378282*****0005");
    }

    #[test]
    fn brand_comes_from_the_digits() {
        let pan = Pan::parse("5555 5555 5555 4444").expect("valid");
        assert_eq!(pan.brand(), Brand::Mastercard);
    }

    #[test]
    fn clones_keep_the_same_digits() {
        let pan = Pan::parse("4242424242424242").expect("valid");
        assert_eq!(pan.clone().expose_digits(), pan.expose_digits());
    }

    proptest! {
        #[test]
        fn debug_and_masked_never_contain_the_full_number(digits in valid_pan_digits()) {
            let pan = Pan::parse(&digits).expect("generated PANs are valid");
            prop_assert_eq!(pan.expose_digits(), digits.as_str());
            let debug = format!("{pan:?}");
            let pretty = format!("{pan:#?}");
            prop_assert!(!debug.contains(pan.expose_digits()));
            prop_assert!(!pretty.contains(pan.expose_digits()));
            prop_assert!(!pan.masked().contains(pan.expose_digits()));
            prop_assert_eq!(pan.masked().len(), pan.len());
        }

        #[test]
        fn errors_never_echo_the_input_digits(
            digits in "[0-9]{6,30}",
            noise in "[ \\-a-z.]{0,3}",
        ) {
            let input = format!("{digits}{noise}");
            if let Err(err) = Pan::parse(&input) {
                // Six digits are enough to be a BIN; no run of them may leak.
                let (display, debug) = (err.to_string(), format!("{err:?}"));
                for window in digits.as_bytes().windows(6) {
                    let window = std::str::from_utf8(window).expect("ASCII");
                    prop_assert!(!display.contains(window));
                    prop_assert!(!debug.contains(window));
                }
            }
        }
    }
}
