//! Card numbers in free text: the one detector behind every screen and scrubber of text the
//! vault stores in clear or logs (metadata, import ids, charge descriptions, gateway
//! messages).
//!
//! A card number here is what a person or a system would write for one, whatever its brand:
//! 12 to 19 decimal digits passing the Luhn check, written together or in groups split by
//! *one* separator each (space, tab, no-break and thin spaces, dashes, dot, slash). Digits of
//! any Unicode script count: `４２４２…` (fullwidth) or `٤٢٤٢…` (Arabic-Indic) is as much a
//! card number to whoever reads it back as `4242…`.
//!
//! The brand is deliberately not consulted: issuers keep adding ranges, and a Luhn-valid
//! number in a range we do not know is still likely a card. The price is that one random
//! 12–19 digit number in ten (an order number, say) is taken for a card; callers keep such
//! identifiers shorter or put a letter in them.

use std::ops::Range;

use zeroize::Zeroizing;

use super::luhn;

/// Fewest and most digits of a card number.
const MIN_DIGITS: usize = 12;
const MAX_DIGITS: usize = 19;

/// The zero of every block of Unicode decimal digits (general category Nd, Unicode 14): each
/// block is ten consecutive code points, zero to nine, so a table of zeros maps every
/// decimal digit to its value without a Unicode data dependency. Sorted.
const ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650,
    0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50,
    0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// The value of a decimal digit of any script (`'7'`, `'７'`, `'٧'`, `'७'` → 7); `None` for
/// anything else. Unlike `char::is_numeric` this leaves out fractions, Roman numerals and
/// other characters that are numbers but not digits.
pub fn digit_value(c: char) -> Option<u8> {
    let code = u32::from(c);
    let block = ZEROS.partition_point(|&zero| zero <= code).checked_sub(1)?;
    let value = code - ZEROS[block];
    // Below 10 by the check; the cast cannot truncate.
    (value < 10).then_some(value as u8)
}

/// Whether `c` may stand, once, between two groups of digits of one card number.
fn is_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t'
            | '-'
            | '.'
            | '/'
            | '\u{A0}' // no-break space
            | '\u{2007}' // figure space
            | '\u{2009}' // thin space
            | '\u{202F}' // narrow no-break space
            | '\u{3000}' // ideographic space
            | '\u{2010}'
            ..='\u{2014}' // hyphens and dashes
            | '\u{2212}' // minus sign
            | '\u{FF0D}' // fullwidth hyphen-minus
            | '\u{FF0E}' // fullwidth full stop
            | '\u{FF0F}' // fullwidth solidus
    )
}

/// A group of consecutive digits: its byte range in the text.
#[derive(Debug, Clone, Copy)]
struct Group {
    start: usize,
    end: usize,
}

/// The byte ranges of every card number in `text`, in order of their start; ranges may
/// overlap (`4111 1111 1111 1111 1111` holds two). Each range starts at the first digit and
/// ends after the last one of the number, separators inside included.
pub fn find_card_numbers(text: &str) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    // Digits of the current run, as ASCII, one entry per digit: a run may be a card number,
    // so it is zeroized like one.
    let mut digits: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::new());
    // Where each group of the run starts in `digits`, and where it lies in `text`.
    let mut groups: Vec<(usize, Group)> = Vec::new();
    // The previous character: a digit, one separator after a digit, or anything else.
    #[derive(PartialEq)]
    enum Prev {
        Digit,
        Separator,
        Other,
    }
    let mut prev = Prev::Other;
    for (at, c) in text.char_indices() {
        if let Some(value) = digit_value(c) {
            let end = at + c.len_utf8();
            match prev {
                Prev::Digit => {
                    if let Some((_, group)) = groups.last_mut() {
                        group.end = end;
                    }
                }
                Prev::Separator => groups.push((digits.len(), Group { start: at, end })),
                Prev::Other => {
                    check_run(&digits, &groups, &mut found);
                    digits.clear();
                    groups.clear();
                    groups.push((0, Group { start: at, end }));
                }
            }
            digits.push(b'0' + value);
            prev = Prev::Digit;
        } else if prev == Prev::Digit && is_separator(c) {
            prev = Prev::Separator;
        } else {
            prev = Prev::Other;
        }
    }
    check_run(&digits, &groups, &mut found);
    found.sort_by_key(|range| (range.start, range.end));
    found
}

/// Adds every card number of one run: each sequence of whole consecutive groups holding 12
/// to 19 digits that pass Luhn.
fn check_run(digits: &[u8], groups: &[(usize, Group)], found: &mut Vec<Range<usize>>) {
    if digits.len() < MIN_DIGITS {
        return;
    }
    for (first, (from, start)) in groups.iter().enumerate() {
        for (next, (_, end)) in groups.iter().enumerate().skip(first) {
            let to = groups.get(next + 1).map_or(digits.len(), |(at, _)| *at);
            let count = to - from;
            if count > MAX_DIGITS {
                break;
            }
            if count >= MIN_DIGITS && luhn::is_valid(&digits[*from..to]) {
                found.push(start.start..end.end);
            }
        }
    }
}

/// Whether `text` holds a card number (see the [module docs](self)).
pub fn contains_card_number(text: &str) -> bool {
    !find_card_numbers(text).is_empty()
}

/// `text` with every card number replaced by what `mask` returns for its digits (as ASCII,
/// separators dropped), or left as it is where `mask` returns `None`. Overlapping numbers
/// are replaced together, as one run of digits.
pub fn replace_card_numbers(text: &str, mut mask: impl FnMut(&str) -> Option<String>) -> String {
    let mut merged: Vec<Range<usize>> = Vec::new();
    for range in find_card_numbers(text) {
        match merged.last_mut() {
            Some(last) if range.start < last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for range in merged {
        let digits: Zeroizing<String> = Zeroizing::new(
            text[range.clone()]
                .chars()
                .filter_map(digit_value)
                .map(|d| char::from(b'0' + d))
                .collect(),
        );
        if let Some(replacement) = mask(&digits) {
            out.push_str(&text[copied..range.start]);
            out.push_str(&replacement);
            copied = range.end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// ASCII digits masked as PCI DSS allows them to be shown: the first 6 and last 4 kept, a
/// `*` for each digit in between (`424242******4242`). Shorter input is masked whole.
pub fn mask_digits(digits: &str) -> String {
    let len = digits.chars().count();
    if len < 10 {
        return "*".repeat(len);
    }
    digits
        .chars()
        .enumerate()
        .map(|(i, c)| if i < 6 || i >= len - 4 { c } else { '*' })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `digits` (ASCII) written in the digits of the script whose zero is `zero`.
    fn in_script(digits: &str, zero: u32) -> String {
        digits
            .bytes()
            .map(|b| char::from_u32(zero + u32::from(b - b'0')).expect("a digit"))
            .collect()
    }

    #[test]
    fn digits_of_every_script_have_their_value_and_nothing_else_is_a_digit() {
        for zero in ZEROS {
            for value in 0..10u8 {
                let c = char::from_u32(zero + u32::from(value)).expect("char");
                assert_eq!(digit_value(c), Some(value), "{c:?}");
            }
        }
        for c in ['a', ' ', '½', 'Ⅻ', '²', '①', '/', '\u{65F}', '\u{FF1A}'] {
            assert_eq!(digit_value(c), None, "{c:?}");
        }
    }

    #[test]
    fn card_numbers_are_found_in_any_grouping_script_and_brand() {
        for text in [
            "4242424242424242",
            "card 4242 4242 4242 4242 exp 12/30",
            "5555-5555-5555-4444",
            "x378282246310005y",
            "0004242424242424242", // unknown brand, 19 digits
            "1000000000009",       // unknown brand, 13 digits
            "4242.4242.4242.4242",
            "4242/4242/4242/4242",
            "4242\t4242\u{A0}4242\u{202F}4242",
            "４２４２４２４２４２４２４２４２",
            "٤٢٤٢ ٤٢٤٢ ٤٢٤٢ ٤٢٤٢",
            "۴۲۴۲۴۲۴۲۴۲۴۲۴۲۴۲",
            "४२४२-४२४२-४२४२-४२४२",
            "42४२४२४२४२४२४२४२", // mixed scripts
            "order 12345 4242424242424242",
        ] {
            assert!(contains_card_number(text), "{text:?}");
        }
    }

    #[test]
    fn text_without_a_card_number_is_not_flagged() {
        for text in [
            "",
            "order A-1001",
            "4242424242424241",        // fails Luhn
            "+44 20 7946 0958",        // a phone number that fails Luhn
            "2026-11-25",              // a date
            "42424242424",             // 11 digits
            "42424242424242424242",    // 20 digits
            "4242  4242  4242  4242",  // two separators are a gap
            "4242-/4242-/4242-/4242",  // so are two different ones
            "4242,4242,4242,4242",     // commas separate numbers
            "½½½½½½½½½½½½½½½½",        // numbers, not digits
            "Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ Ⅳ", // likewise
        ] {
            assert!(!contains_card_number(text), "{text:?}");
        }
    }

    #[test]
    fn ranges_cover_the_number_with_its_separators() {
        let text = "pay ٤٢٤٢ 4242-4242 4242 now";
        let found: Vec<&str> = find_card_numbers(text)
            .into_iter()
            .map(|range| &text[range])
            .collect();
        // The 16 digits, and the two 12-digit runs inside that pass Luhn too.
        assert_eq!(
            found,
            ["٤٢٤٢ 4242-4242", "٤٢٤٢ 4242-4242 4242", "4242-4242 4242"]
        );
    }

    #[test]
    fn replacing_masks_numbers_and_keeps_the_rest() {
        let text = "card ４２４２ ４２４２ ４２４２ ４２４２, ref 4242424242424241.";
        assert_eq!(
            replace_card_numbers(text, |d| Some(mask_digits(d))),
            "card 424242******4242, ref 4242424242424241."
        );
        assert_eq!(replace_card_numbers(text, |_| None), text);
        assert_eq!(mask_digits("378282246310005"), "378282*****0005");
    }

    /// A random Luhn-valid number of 12 to 19 ASCII digits, any leading digits (any brand).
    fn card_digits() -> impl Strategy<Value = String> {
        (MIN_DIGITS..=MAX_DIGITS)
            .prop_flat_map(|len| proptest::collection::vec(b'0'..=b'9', len - 1))
            .prop_map(|mut digits| {
                digits.push(luhn::check_digit(&digits));
                digits.into_iter().map(char::from).collect()
            })
    }

    /// A number written in groups of 1 to 6 digits with one separator between groups, in
    /// one script.
    fn written(digits: String) -> impl Strategy<Value = String> {
        let script = prop::sample::select(vec![0x30, 0xFF10, 0x660, 0x6F0, 0x966, 0x1D7CE]);
        let separator = prop::sample::select(vec![
            " ", "-", ".", "/", "\t", "\u{A0}", "\u{202F}", "\u{2013}",
        ]);
        let len = digits.len();
        (
            script,
            separator,
            proptest::collection::vec(1..=6usize, len),
        )
            .prop_map(move |(zero, separator, sizes)| {
                let shown = in_script(&digits, zero);
                let chars: Vec<char> = shown.chars().collect();
                let mut out = String::new();
                let mut at = 0;
                for size in sizes {
                    if at >= chars.len() {
                        break;
                    }
                    if at > 0 {
                        out.push_str(separator);
                    }
                    let end = (at + size).min(chars.len());
                    out.extend(&chars[at..end]);
                    at = end;
                }
                out
            })
    }

    /// Text that cannot join digits to a neighbouring number: words, punctuation, and
    /// digit groups of at most 4 separated by letters.
    fn prose() -> impl Strategy<Value = String> {
        "([a-zA-Zé]{1,8}[ ,:;!?()]{1,2}([0-9]{1,4}[a-z]{1,3})?){0,6}"
    }

    proptest! {
        #[test]
        fn every_embedded_card_number_is_found_and_masked(
            text in card_digits().prop_flat_map(|d| (Just(d.clone()), written(d))),
            before in prose(),
            after in prose(),
        ) {
            let (digits, shown) = text;
            let embedded = format!("{before} {shown} {after}");
            prop_assert!(contains_card_number(&embedded));
            let masked = replace_card_numbers(&embedded, |d| Some(mask_digits(d)));
            let normalized: String = masked
                .chars()
                .filter(|c| !is_separator(*c))
                .map(|c| digit_value(c).map_or(c, |d| char::from(b'0' + d)))
                .collect();
            prop_assert!(!normalized.contains(&digits), "{masked}");
        }

        #[test]
        fn prose_and_short_numbers_are_not_flagged(text in prose()) {
            prop_assert!(!contains_card_number(&text));
            prop_assert_eq!(replace_card_numbers(&text, |_| Some(String::new())), text);
        }

        #[test]
        fn a_number_failing_luhn_is_not_a_card(
            digits in card_digits().prop_map(|d| {
                // Changing the check digit breaks Luhn.
                let mut bytes = d.into_bytes();
                let last = bytes.len() - 1;
                bytes[last] = b'0' + (bytes[last] - b'0' + 1) % 10;
                String::from_utf8(bytes).expect("ASCII")
            }),
            before in prose(),
            after in prose(),
        ) {
            let text = format!("{before} {digits} {after}");
            prop_assert!(!contains_card_number(&text), "{text}");
        }

        #[test]
        fn dates_and_times_are_not_card_numbers(
            y in 1900..2100u32, m in 1..=12u32, d in 1..=28u32, h in 0..24u32, min in 0..60u32,
        ) {
            for text in [
                format!("{y}-{m:02}-{d:02}"),
                format!("{d:02}/{m:02}/{y} {h:02}:{min:02}"),
                format!("{y}-{m:02}-{d:02}T{h:02}:{min:02}:00Z"),
            ] {
                prop_assert!(!contains_card_number(&text), "{text}");
            }
        }

        #[test]
        fn any_text_is_scanned_without_panicking(text in "\\PC{0,80}") {
            for range in find_card_numbers(&text) {
                prop_assert!(text.is_char_boundary(range.start));
                prop_assert!(text.is_char_boundary(range.end));
            }
            let _ = replace_card_numbers(&text, |d| Some(mask_digits(d)));
        }
    }
}
