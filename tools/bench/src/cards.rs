//! Random, valid, distinct cards for the load generator.
//!
//! Every card is a fresh random PAN in a real network's IIN range with a correct Luhn check
//! digit, a random expiry in the future and, for most cards, a cardholder name — so the
//! vault does its full validation, brand lookup, fingerprinting and encryption work, and no
//! request collides with another. The cards exist only inside request messages: nothing
//! here prints, logs or `Debug`s them.

use ring::rand::{SecureRandom, SystemRandom};

use cardvault::{card::luhn, pb::v1 as pb};

/// A small, fast, non-cryptographic PRNG (wyrand) seeded from the OS CSPRNG.
///
/// The load generator draws a few dozen numbers per request from it on a machine it shares
/// with the vault, so speed matters and unpredictability does not: these cards are test
/// data, never secrets. The vault itself only ever uses the CSPRNG.
#[derive(Debug, Clone)]
pub struct FastRng(u64);

impl FastRng {
    /// A generator seeded with 64 bits from the OS CSPRNG.
    pub fn from_os(system: &SystemRandom) -> Result<FastRng, ring::error::Unspecified> {
        let mut seed = [0u8; 8];
        system.fill(&mut seed)?;
        Ok(FastRng(u64::from_le_bytes(seed)))
    }

    /// A generator with a fixed seed, for reproducible tests.
    pub fn seeded(seed: u64) -> FastRng {
        FastRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let product = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        // Folding the high half onto the low half is the wyrand mix step.
        ((product >> 64) as u64) ^ (product as u64)
    }

    /// A number in `0..n` (`n` > 0). Multiply-and-shift instead of `%`: no division, and a
    /// bias of at most n / 2^64, far below anything a benchmark can notice.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The card networks the generator draws from, weighted roughly like real card traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// IIN 4, 16 digits.
    Visa,
    /// IIN 51–55 or 2221–2720, 16 digits.
    Mastercard,
    /// IIN 34 or 37, 15 digits.
    Amex,
    /// IIN 6011 or 65, 16 digits.
    Discover,
}

impl Network {
    /// Visa 50 %, Mastercard 30 % (a quarter of it 2-series), Amex 12 %, Discover 8 %.
    fn pick(rng: &mut FastRng) -> (Network, u32, usize) {
        let roll = rng.below(100);
        // (network, IIN prefix, PAN length)
        match roll {
            0..50 => (Network::Visa, 4, 16),
            50..72 => (Network::Mastercard, 51 + rng.below(5) as u32, 16),
            72..80 => (Network::Mastercard, 2221 + rng.below(500) as u32, 16),
            80..92 => (Network::Amex, if rng.below(2) == 0 { 34 } else { 37 }, 15),
            _ => (
                Network::Discover,
                if rng.below(2) == 0 { 6011 } else { 65 },
                16,
            ),
        }
    }
}

const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Alan",
    "Grace",
    "Edsger",
    "Barbara",
    "Donald",
    "Margaret",
    "Dennis",
    "Frances",
    "Ken",
    "Radia",
    "Tony",
    "Hedy",
    "John",
    "Katherine",
    "Niklaus",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Ritchie", "Allen",
    "Thompson", "Perlman", "Hoare", "Lamarr", "Backus", "Johnson", "Wirth",
];

/// Percentage of cards that carry a cardholder name (the rest leave it empty, as a wallet
/// or a card-on-file import often does).
const WITH_NAME_PERCENT: u64 = 70;

/// How many years ahead expiries are drawn from (next year up to this many years out), so
/// every card is valid whatever month the run happens in.
const EXPIRY_YEARS_AHEAD: u32 = 8;

/// Makes random valid cards. One per worker: it holds a PRNG, not a lock.
pub struct CardGenerator {
    rng: FastRng,
    this_year: u32,
}

impl std::fmt::Debug for CardGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardGenerator")
            .field("this_year", &self.this_year)
            .finish_non_exhaustive()
    }
}

impl CardGenerator {
    /// A generator drawing from `rng`; expiries lie after `this_year`.
    pub fn new(rng: FastRng, this_year: u32) -> CardGenerator {
        CardGenerator { rng, this_year }
    }

    /// The PRNG, for the worker's other random choices (which RPC, which pooled token).
    pub fn rng(&mut self) -> &mut FastRng {
        &mut self.rng
    }

    /// An independent generator seeded from this one, for a task of its own.
    pub fn split(&mut self) -> CardGenerator {
        CardGenerator::new(FastRng::seeded(self.rng.next_u64()), self.this_year)
    }

    /// A fresh random card, ready to be moved into a `TokenizeRequest`.
    pub fn card(&mut self) -> pb::CardInput {
        let mut number = String::with_capacity(19);
        self.fill_pan(&mut number);
        let cardholder_name = if self.rng.below(100) < WITH_NAME_PERCENT {
            let first = FIRST_NAMES[self.rng.below(FIRST_NAMES.len() as u64) as usize];
            let last = LAST_NAMES[self.rng.below(LAST_NAMES.len() as u64) as usize];
            let mut name = String::with_capacity(first.len() + 1 + last.len());
            name.push_str(first);
            name.push(' ');
            name.push_str(last);
            name
        } else {
            String::new()
        };
        pb::CardInput {
            number,
            exp_month: 1 + self.rng.below(12) as u32,
            exp_year: self.this_year + 1 + self.rng.below(u64::from(EXPIRY_YEARS_AHEAD)) as u32,
            cardholder_name,
        }
    }

    /// Writes a random Luhn-valid PAN into `out` (cleared first) and returns its network.
    pub fn fill_pan(&mut self, out: &mut String) -> Network {
        let (network, prefix, len) = Network::pick(&mut self.rng);
        let mut digits = [0u8; 19];
        let prefix_len = write_decimal(prefix, &mut digits);
        for digit in &mut digits[prefix_len..len - 1] {
            *digit = b'0' + self.rng.below(10) as u8;
        }
        digits[len - 1] = luhn::check_digit(&digits[..len - 1]);
        out.clear();
        out.extend(digits[..len].iter().map(|&b| char::from(b)));
        network
    }
}

/// Writes `value`'s decimal digits at the start of `out`; returns how many.
fn write_decimal(value: u32, out: &mut [u8]) -> usize {
    let mut scratch = [0u8; 10];
    let mut rest = value;
    let mut len = 0;
    loop {
        scratch[len] = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for (i, digit) in scratch[..len].iter().rev().enumerate() {
        out[i] = *digit;
    }
    len
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use cardvault::card::{Brand, Expiry, Pan};

    fn generator(seed: u64) -> CardGenerator {
        CardGenerator::new(FastRng::seeded(seed), 2026)
    }

    #[test]
    fn every_generated_pan_passes_luhn_and_has_its_networks_length_and_brand() {
        let mut cards = generator(1);
        let mut pan = String::new();
        let mut seen = HashSet::new();
        for _ in 0..20_000 {
            let network = cards.fill_pan(&mut pan);
            assert!(luhn::is_valid(pan.as_bytes()));
            let parsed = Pan::parse(&pan).expect("the vault accepts the generated PAN");
            let (brand, len) = match network {
                Network::Visa => (Brand::Visa, 16),
                Network::Mastercard => (Brand::Mastercard, 16),
                Network::Amex => (Brand::Amex, 15),
                Network::Discover => (Brand::Discover, 16),
            };
            assert_eq!(pan.len(), len, "{network:?} length");
            assert_eq!(parsed.brand(), brand, "{network:?} brand");
            seen.insert(network as u8);
        }
        assert_eq!(seen.len(), 4, "all four networks are drawn");
    }

    #[test]
    fn mastercard_draws_both_the_51_to_55_and_the_2_series_ranges() {
        let mut cards = generator(2);
        let mut pan = String::new();
        let (mut classic, mut two_series) = (false, false);
        for _ in 0..5_000 {
            if cards.fill_pan(&mut pan) == Network::Mastercard {
                let iin4: u32 = pan[..4].parse().expect("digits");
                match iin4 {
                    5100..=5599 => classic = true,
                    2221..=2720 => two_series = true,
                    other => panic!("Mastercard IIN out of range: {other}"),
                }
            }
        }
        assert!(classic && two_series);
    }

    #[test]
    fn generated_cards_are_distinct() {
        let mut cards = generator(3);
        let mut pans = HashSet::new();
        for _ in 0..50_000 {
            assert!(pans.insert(cards.card().number), "a PAN repeated");
        }
    }

    #[test]
    fn expiries_are_in_the_future_and_most_cards_carry_a_name() {
        let mut cards = generator(4);
        let today = time::macros::date!(2026 - 12 - 31);
        let mut named = 0;
        for _ in 0..1_000 {
            let card = cards.card();
            let expiry = Expiry::new(card.exp_month, card.exp_year, today).expect("valid expiry");
            assert!(expiry.year() > 2026 && expiry.year() <= 2026 + 8);
            if !card.cardholder_name.is_empty() {
                named += 1;
                assert!(card.cardholder_name.len() <= 100);
            }
        }
        assert!((600..800).contains(&named), "{named} of 1000 named");
    }

    #[test]
    fn generators_seeded_from_the_os_differ() {
        let system = SystemRandom::new();
        let mut a = FastRng::from_os(&system).expect("seed");
        let mut b = FastRng::from_os(&system).expect("seed");
        assert_ne!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn below_stays_in_range_and_reaches_both_ends() {
        let mut rng = FastRng::seeded(5);
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            let n = rng.below(10);
            assert!(n < 10);
            hits[n as usize] += 1;
        }
        // Each bucket expects 1000; a broken generator is far off.
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    }

    #[test]
    fn write_decimal_writes_the_digits_in_order() {
        let mut out = [0u8; 19];
        assert_eq!(write_decimal(2720, &mut out), 4);
        assert_eq!(&out[..4], b"2720");
        assert_eq!(write_decimal(4, &mut out), 1);
        assert_eq!(&out[..1], b"4");
    }
}
