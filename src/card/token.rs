//! Vault tokens: the public stand-ins for card numbers that the rest of the shop handles.
//!
//! A token is never derived from the PAN. Every random character comes from the CSPRNG
//! through rejection sampling, so each is uniform: `byte % n` alone would favour small
//! values whenever 256 is not a multiple of `n`.

use std::fmt;

use ring::{error::Unspecified, rand::SecureRandom};

use super::{Pan, luhn};

const OPAQUE_PREFIX: &str = "tok_";
/// 22 base62 characters carry 22 × log2(62) ≈ 131 bits, above the 128 the token format promises.
const OPAQUE_RANDOM_CHARS: usize = 22;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PAN_SHAPED_LEN: std::ops::RangeInclusive<usize> = 12..=19;
/// The PAN digits a PAN-shaped token keeps, so receipts and support still show them.
const KEPT_TRAILING: usize = 4;

/// Which shape of token to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenFormat {
    /// `tok_` followed by 22 random base62 characters. The default.
    #[default]
    Opaque,
    /// Digits only, as long as the PAN, keeping its last four, and always failing the
    /// Luhn check so it can never be taken for a card. For legacy systems that insist on
    /// a numeric card field.
    PanShaped,
}

/// A vault token. Public, not secret, but never derived from the PAN: all of its random
/// part comes from the CSPRNG.
///
/// ```
/// use cardvault::card::{Pan, Token, TokenFormat, luhn};
///
/// let pan = Pan::parse("378282246310005").expect("a valid test card");
/// let rng = ring::rand::SystemRandom::new();
/// let token = Token::generate(TokenFormat::PanShaped, &pan, &rng).expect("randomness");
/// assert_eq!(token.as_str().len(), 15);
/// assert!(token.as_str().ends_with("0005"));
/// assert!(!luhn::is_valid(token.as_str().as_bytes()), "never mistaken for a card");
/// // A card number sent where a token belongs is refused.
/// assert!(Token::parse(pan.expose_digits()).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

/// A caller-supplied string is not a token. Messages never echo the input, since a
/// confused caller may have put a card number in the token field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Nothing given.
    #[error("token is required")]
    Empty,
    /// Neither `tok_` plus 22 base62 characters nor 12 to 19 digits.
    #[error("token must be `tok_` followed by 22 letters or digits, or 12 to 19 digits")]
    Malformed,
    /// Digits that pass the Luhn check: that is a card number, and no token ever is one.
    #[error("this looks like a card number, not a token: tokens never pass the Luhn check")]
    LooksLikeCardNumber,
}

impl Token {
    /// Generates a fresh token for `pan` in `format`. Fails only if the random generator
    /// fails (or keeps returning unusable bytes), which callers treat as an internal error.
    pub fn generate(
        format: TokenFormat,
        pan: &Pan,
        rng: &dyn SecureRandom,
    ) -> Result<Token, Unspecified> {
        let mut random = UniformDraws::new(rng);
        match format {
            TokenFormat::Opaque => {
                let mut token = String::with_capacity(OPAQUE_PREFIX.len() + OPAQUE_RANDOM_CHARS);
                token.push_str(OPAQUE_PREFIX);
                for _ in 0..OPAQUE_RANDOM_CHARS {
                    let index = usize::from(random.below(62)?);
                    token.push(char::from(BASE62[index]));
                }
                Ok(Token(token))
            }
            TokenFormat::PanShaped => {
                let random_len = pan.len() - KEPT_TRAILING;
                let mut digits = Vec::with_capacity(pan.len());
                // A leading 0 is avoided so the token survives systems that store the
                // number as an integer.
                digits.push(b'1' + random.below(9)?);
                for _ in 1..random_len {
                    digits.push(b'0' + random.below(10)?);
                }
                digits.extend_from_slice(pan.last4().as_bytes());
                break_luhn(&mut digits, random_len, &mut random)?;
                // Only ASCII digits were pushed, so this conversion cannot fail.
                String::from_utf8(digits)
                    .map(Token)
                    .map_err(|_| Unspecified)
            }
        }
    }

    /// Strictly parses a caller-supplied (or stored) token: either the opaque shape, or 12
    /// to 19 ASCII digits that fail the Luhn check. Nothing is trimmed or normalised, so a
    /// token has exactly one spelling.
    pub fn parse(input: &str) -> Result<Token, TokenError> {
        if input.is_empty() {
            return Err(TokenError::Empty);
        }
        if let Some(random) = input.strip_prefix(OPAQUE_PREFIX) {
            return if random.len() == OPAQUE_RANDOM_CHARS
                && random.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                Ok(Token(input.to_owned()))
            } else {
                Err(TokenError::Malformed)
            };
        }
        let bytes = input.as_bytes();
        if !PAN_SHAPED_LEN.contains(&bytes.len()) || !bytes.iter().all(u8::is_ascii_digit) {
            return Err(TokenError::Malformed);
        }
        if luhn::is_valid(bytes) {
            return Err(TokenError::LooksLikeCardNumber);
        }
        Ok(Token(input.to_owned()))
    }

    /// The token text, as stored and returned to callers.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The format this token was generated in, read from its shape.
    pub fn format(&self) -> TokenFormat {
        if self.0.starts_with(OPAQUE_PREFIX) {
            TokenFormat::Opaque
        } else {
            TokenFormat::PanShaped
        }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// If `digits` happen to pass Luhn (one time in ten), replaces one random digit among the
/// first `random_len` with a different random digit. Changing a single digit always
/// changes the Luhn sum mod 10, because a position's contribution (`d`, or `2d` with its
/// digits summed) takes a different value mod 10 for each digit; so the result is certain
/// to fail, and the kept last four are untouched.
fn break_luhn(
    digits: &mut [u8],
    random_len: usize,
    random: &mut UniformDraws<'_>,
) -> Result<(), Unspecified> {
    if !luhn::is_valid(digits) {
        return Ok(());
    }
    // random_len is at most 15, so it fits a u8.
    let bound = u8::try_from(random_len).map_err(|_| Unspecified)?;
    let position = usize::from(random.below(bound)?);
    let (lowest, choices) = if position == 0 { (1, 9) } else { (0, 10) };
    let current = digits[position] - b'0';
    // Draw among the other choices - 1 values, then skip over the current digit.
    let mut replacement = lowest + random.below(choices - 1)?;
    if replacement >= current {
        replacement += 1;
    }
    digits[position] = b'0' + replacement;
    Ok(())
}

/// Uniform small integers from a CSPRNG, buffered to call the OS once per token.
struct UniformDraws<'a> {
    rng: &'a dyn SecureRandom,
    buffer: [u8; 64],
    next: usize,
}

/// A working CSPRNG rejects a byte with probability under 1/32 for every bound used here,
/// so this many rejections in a row means the generator is broken, not unlucky.
const MAX_CONSECUTIVE_REJECTIONS: u32 = 64;

impl<'a> UniformDraws<'a> {
    fn new(rng: &'a dyn SecureRandom) -> Self {
        UniformDraws {
            rng,
            buffer: [0; 64],
            next: 64,
        }
    }

    fn byte(&mut self) -> Result<u8, Unspecified> {
        if self.next == self.buffer.len() {
            self.rng.fill(&mut self.buffer)?;
            self.next = 0;
        }
        let byte = self.buffer[self.next];
        self.next += 1;
        Ok(byte)
    }

    /// A uniform value in `0..bound` (`bound` in 1..=255), by rejecting the bytes at or
    /// above the largest multiple of `bound` that fits in a byte.
    fn below(&mut self, bound: u8) -> Result<u8, Unspecified> {
        if bound == 0 {
            return Err(Unspecified);
        }
        let bound = u16::from(bound);
        let limit = 256 - 256 % bound;
        for _ in 0..MAX_CONSECUTIVE_REJECTIONS {
            let byte = u16::from(self.byte()?);
            if byte < limit {
                // byte % bound < bound <= 255, so it fits a u8.
                return u8::try_from(byte % bound).map_err(|_| Unspecified);
            }
        }
        Err(Unspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    fn pan(digits: &str) -> Pan {
        Pan::parse(digits).expect("valid test PAN")
    }

    fn valid_pan_digits() -> impl Strategy<Value = String> {
        (12usize..=19)
            .prop_flat_map(|len| proptest::collection::vec(b'0'..=b'9', len - 1))
            .prop_map(|mut digits| {
                digits.push(luhn::check_digit(&digits));
                digits.into_iter().map(char::from).collect()
            })
    }

    #[test]
    fn opaque_tokens_are_the_prefix_and_22_base62_characters() {
        let token = Token::generate(
            TokenFormat::Opaque,
            &pan("4242424242424242"),
            &SystemRandom::new(),
        )
        .expect("rng works");
        let text = token.as_str();
        assert_eq!(text.len(), 26);
        assert!(text.starts_with("tok_"));
        assert!(text[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(token.format(), TokenFormat::Opaque);
        assert!(!text.contains("4242"));
    }

    #[test]
    fn two_generated_tokens_differ() {
        let rng = SystemRandom::new();
        let card = pan("4242424242424242");
        for format in [TokenFormat::Opaque, TokenFormat::PanShaped] {
            let a = Token::generate(format, &card, &rng).expect("rng works");
            let b = Token::generate(format, &card, &rng).expect("rng works");
            assert_ne!(a, b);
        }
    }

    #[test]
    fn opaque_tokens_use_the_whole_alphabet_roughly_evenly() {
        let rng = SystemRandom::new();
        let card = pan("4242424242424242");
        let mut counts = [0u32; 62];
        for _ in 0..2000 {
            let token = Token::generate(TokenFormat::Opaque, &card, &rng).expect("rng works");
            for b in token.as_str()[4..].bytes() {
                let index = BASE62.iter().position(|&c| c == b).expect("base62");
                counts[index] += 1;
            }
        }
        // 44,000 draws: about 710 per symbol; these bounds are many standard deviations wide.
        assert!(
            counts.iter().all(|&n| (550..=870).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn parse_accepts_generated_tokens_of_both_formats() {
        let rng = SystemRandom::new();
        for digits in ["4242424242424242", "378282246310005", "36227206271667"] {
            for format in [TokenFormat::Opaque, TokenFormat::PanShaped] {
                let token = Token::generate(format, &pan(digits), &rng).expect("rng works");
                let parsed = Token::parse(token.as_str()).expect("own tokens parse");
                assert_eq!(parsed, token);
                assert_eq!(parsed.format(), format);
            }
        }
    }

    #[test]
    fn parse_rejects_a_card_number() {
        assert_eq!(
            Token::parse("4242424242424242"),
            Err(TokenError::LooksLikeCardNumber)
        );
    }

    #[test]
    fn parse_rejects_garbage_empty_wrong_prefix_and_wrong_lengths() {
        assert_eq!(Token::parse(""), Err(TokenError::Empty));
        for input in [
            "hello",
            "tok_",
            "tok_abcdefghijklmnopqrstu",   // 21
            "tok_abcdefghijklmnopqrstuvw", // 23
            "tok_abcdefghijklmnopqrst-v",  // punctuation
            "tok_abcdefghijklmnopqrstüv",  // non-ASCII
            "TOK_abcdefghijklmnopqrstuv",  // prefix is case-sensitive
            "tk_abcdefghijklmnopqrstuv",   // wrong prefix
            " tok_abcdefghijklmnopqrstuv", // not trimmed
            "4242424242424241 ",
            "4242-4242-4242-4241",
            "42424242421",          // 11 digits
            "42424242424242424241", // 20 digits
        ] {
            assert_eq!(Token::parse(input), Err(TokenError::Malformed), "{input:?}");
        }
        assert!(Token::parse("tok_abcdefghijklmnopqrstuv").is_ok());
        assert!(Token::parse("4242424242424241").is_ok());
    }

    #[test]
    fn parse_errors_never_echo_the_input() {
        for input in [
            "4242424242424242",
            "424242424242424242424242",
            "tok_4242424242",
        ] {
            let err = Token::parse(input).unwrap_err();
            assert!(!err.to_string().contains("424242"));
            assert!(!format!("{err:?}").contains("424242"));
        }
    }

    #[test]
    fn a_luhn_passing_draw_is_repaired_by_one_digit_outside_the_last_four() {
        let rng = SystemRandom::new();
        for _ in 0..200 {
            let original = b"4242424242424242".to_vec();
            let mut digits = original.clone();
            let mut random = UniformDraws::new(&rng);
            break_luhn(&mut digits, 12, &mut random).expect("rng works");
            assert!(!luhn::is_valid(&digits));
            assert_eq!(&digits[12..], b"4242");
            assert_ne!(digits[0], b'0');
            let changed = original.iter().zip(&digits).filter(|(a, b)| a != b).count();
            assert_eq!(changed, 1);
        }
    }

    #[test]
    fn uniform_draws_reject_a_zero_bound_instead_of_dividing_by_zero() {
        let rng = SystemRandom::new();
        assert!(UniformDraws::new(&rng).below(0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn pan_shaped_tokens_keep_length_and_last_four_and_never_pass_luhn(
            digits in valid_pan_digits(),
        ) {
            let card = pan(&digits);
            let token = Token::generate(TokenFormat::PanShaped, &card, &SystemRandom::new())
                .expect("rng works");
            let text = token.as_str();
            prop_assert_eq!(text.len(), card.len());
            prop_assert!(text.ends_with(card.last4()));
            prop_assert!(text.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_ne!(text.as_bytes()[0], b'0');
            prop_assert!(!luhn::is_valid(text.as_bytes()));
            prop_assert_ne!(text, card.expose_digits());
            prop_assert_eq!(Token::parse(text), Ok(token.clone()));
        }
    }
}
