//! Card brand (scheme) recognised from the issuer identification number (IIN) prefix.
//!
//! The brand is informational (stored in clear, shown to callers). It is never used to
//! reject a card: schemes add ranges faster than any table is updated, so an unknown
//! prefix is [`Brand::Unknown`], not an error, and per-brand lengths are not enforced.

/// A payment-card scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Brand {
    /// Visa.
    Visa,
    /// Mastercard, including the 2-series.
    Mastercard,
    /// American Express.
    Amex,
    /// Discover, including 622126–622925 inside UnionPay's 62 range.
    Discover,
    /// JCB.
    Jcb,
    /// Diners Club International.
    DinersClub,
    /// China UnionPay.
    UnionPay,
    /// Maestro (debit).
    Maestro,
    /// A prefix this table does not know.
    Unknown,
}

/// One IIN range: every number whose first `digits` digits, read as an integer, lie in
/// `first..=last`.
struct IinRange {
    digits: usize,
    first: u32,
    last: u32,
    brand: Brand,
}

const fn range(digits: usize, first: u32, last: u32, brand: Brand) -> IinRange {
    IinRange {
        digits,
        first,
        last,
        brand,
    }
}

/// Sorted by prefix length, longest first, then by start: the first match is the most
/// specific one, which is how Discover's 622126–622925 beats UnionPay's 62. A test keeps
/// this order and checks that no two ranges of the same length overlap, so the answer
/// never depends on position among equals.
const IIN_RANGES: &[IinRange] = &[
    range(6, 622_126, 622_925, Brand::Discover),
    range(4, 2221, 2720, Brand::Mastercard),
    range(4, 3095, 3095, Brand::DinersClub),
    range(4, 3528, 3589, Brand::Jcb),
    range(4, 5018, 5018, Brand::Maestro),
    range(4, 5020, 5020, Brand::Maestro),
    range(4, 5038, 5038, Brand::Maestro),
    range(4, 5893, 5893, Brand::Maestro),
    range(4, 6011, 6011, Brand::Discover),
    range(4, 6304, 6304, Brand::Maestro),
    range(4, 6759, 6759, Brand::Maestro),
    range(4, 6761, 6763, Brand::Maestro),
    range(3, 300, 305, Brand::DinersClub),
    range(3, 639, 639, Brand::Maestro),
    range(3, 644, 649, Brand::Discover),
    range(2, 34, 34, Brand::Amex),
    range(2, 36, 36, Brand::DinersClub),
    range(2, 37, 37, Brand::Amex),
    range(2, 38, 39, Brand::DinersClub),
    range(2, 50, 50, Brand::Maestro),
    range(2, 51, 55, Brand::Mastercard),
    range(2, 56, 58, Brand::Maestro),
    range(2, 62, 62, Brand::UnionPay),
    range(2, 65, 65, Brand::Discover),
    range(2, 67, 67, Brand::Maestro),
    range(2, 81, 81, Brand::UnionPay),
    range(1, 4, 4, Brand::Visa),
];

const ALL: [Brand; 9] = [
    Brand::Visa,
    Brand::Mastercard,
    Brand::Amex,
    Brand::Discover,
    Brand::Jcb,
    Brand::DinersClub,
    Brand::UnionPay,
    Brand::Maestro,
    Brand::Unknown,
];

impl Brand {
    /// The brand of a card number given as ASCII digits; the most specific matching IIN
    /// range wins. Anything unmatched (including non-digits) is [`Brand::Unknown`].
    pub fn from_digits(digits: &str) -> Brand {
        let digits = digits.as_bytes();
        IIN_RANGES
            .iter()
            .find(|range| {
                prefix_value(digits, range.digits)
                    .is_some_and(|prefix| (range.first..=range.last).contains(&prefix))
            })
            .map_or(Brand::Unknown, |range| range.brand)
    }

    /// The stable upper-case name used in the database and in logs, e.g. `"DINERS_CLUB"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Brand::Visa => "VISA",
            Brand::Mastercard => "MASTERCARD",
            Brand::Amex => "AMEX",
            Brand::Discover => "DISCOVER",
            Brand::Jcb => "JCB",
            Brand::DinersClub => "DINERS_CLUB",
            Brand::UnionPay => "UNIONPAY",
            Brand::Maestro => "MAESTRO",
            Brand::Unknown => "UNKNOWN",
        }
    }

    /// The inverse of [`Brand::as_str`] (exact match), for reading stored rows back.
    pub fn from_name(name: &str) -> Option<Brand> {
        ALL.into_iter().find(|brand| brand.as_str() == name)
    }
}

/// The first `len` bytes read as a decimal number, if there are that many and all are
/// ASCII digits. `len` is at most 6 in the table, so the value always fits a u32.
fn prefix_value(digits: &[u8], len: usize) -> Option<u32> {
    digits.get(..len)?.iter().try_fold(0u32, |value, &byte| {
        byte.is_ascii_digit()
            .then(|| value * 10 + u32::from(byte - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::luhn;

    fn brand_of(number: &str) -> Brand {
        Brand::from_digits(number)
    }

    /// Appends the Luhn digit so boundary numbers are realistic card numbers.
    fn card_number(payload: &str) -> String {
        let mut number = payload.to_owned();
        number.push(char::from(luhn::check_digit(payload.as_bytes())));
        number
    }

    #[test]
    fn published_test_cards_of_every_brand_are_recognised() {
        let cases = [
            ("4242424242424242", Brand::Visa),
            ("4000056655665556", Brand::Visa),
            ("5555555555554444", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::Amex),
            ("6011111111111117", Brand::Discover),
            ("6011000990139424", Brand::Discover),
            ("3056930009020004", Brand::DinersClub),
            ("36227206271667", Brand::DinersClub),
            ("3566002020360505", Brand::Jcb),
            ("6200000000000005", Brand::UnionPay),
            ("6759649826438453", Brand::Maestro),
        ];
        for (number, brand) in cases {
            assert!(
                luhn::is_valid(number.as_bytes()),
                "{number} is not a valid test card"
            );
            assert_eq!(brand_of(number), brand, "{number}");
        }
    }

    #[test]
    fn mastercard_two_series_boundaries_are_inclusive() {
        assert_eq!(brand_of(&card_number("222099000000000")), Brand::Unknown);
        assert_eq!(brand_of(&card_number("222100000000000")), Brand::Mastercard);
        assert_eq!(brand_of(&card_number("272099999999999")), Brand::Mastercard);
        assert_eq!(brand_of(&card_number("272100000000000")), Brand::Unknown);
    }

    #[test]
    fn discover_range_inside_unionpay_62_wins_only_within_its_bounds() {
        assert_eq!(brand_of(&card_number("622125000000000")), Brand::UnionPay);
        assert_eq!(brand_of(&card_number("622126000000000")), Brand::Discover);
        assert_eq!(brand_of(&card_number("622925999999999")), Brand::Discover);
        assert_eq!(brand_of(&card_number("622926000000000")), Brand::UnionPay);
    }

    #[test]
    fn discover_644_to_649_and_65_are_discover_but_643_is_not() {
        assert_eq!(brand_of(&card_number("643900000000000")), Brand::Unknown);
        assert_eq!(brand_of(&card_number("644000000000000")), Brand::Discover);
        assert_eq!(brand_of(&card_number("649999999999999")), Brand::Discover);
        assert_eq!(brand_of(&card_number("650000000000000")), Brand::Discover);
    }

    #[test]
    fn more_specific_prefixes_beat_shorter_ones() {
        assert_eq!(brand_of(&card_number("352800000000000")), Brand::Jcb);
        assert_eq!(brand_of(&card_number("358999999999999")), Brand::Jcb);
        assert_eq!(brand_of(&card_number("359000000000000")), Brand::Unknown);
        assert_eq!(brand_of(&card_number("309500000000000")), Brand::DinersClub);
        assert_eq!(brand_of(&card_number("306000000000000")), Brand::Unknown);
        assert_eq!(brand_of(&card_number("676200000000000")), Brand::Maestro);
        assert_eq!(brand_of(&card_number("501800000000000")), Brand::Maestro);
        assert_eq!(brand_of(&card_number("810000000000000")), Brand::UnionPay);
    }

    #[test]
    fn unknown_prefixes_and_non_digits_are_unknown() {
        assert_eq!(brand_of(&card_number("123456789012345")), Brand::Unknown);
        assert_eq!(brand_of("9"), Brand::Unknown);
        assert_eq!(brand_of(""), Brand::Unknown);
        assert_eq!(brand_of("x4242424242424242"), Brand::Unknown);
    }

    #[test]
    fn iin_table_is_sorted_longest_first_and_ranges_of_one_length_never_overlap() {
        for range in IIN_RANGES {
            assert!(range.first <= range.last);
            let width = |n: u32| n.to_string().len();
            assert_eq!(width(range.first), range.digits);
            assert_eq!(width(range.last), range.digits);
        }
        for pair in IIN_RANGES.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(
                a.digits > b.digits || (a.digits == b.digits && a.last < b.first),
                "{}..={} and {}..={} out of order or overlapping",
                a.first,
                a.last,
                b.first,
                b.last
            );
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_rejected() {
        for brand in ALL {
            assert_eq!(Brand::from_name(brand.as_str()), Some(brand));
        }
        assert_eq!(Brand::from_name("DINERS_CLUB"), Some(Brand::DinersClub));
        assert_eq!(Brand::from_name("visa"), None);
        assert_eq!(Brand::from_name(""), None);
    }
}
