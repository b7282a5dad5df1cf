//! Micro-benchmarks of the card domain on the tokenize path: PAN parsing with its Luhn
//! check, validation of a whole card as a request carries it, and token generation.
//!
//! Run with `cargo bench --bench card`; docs/benchmarks.md says what each number means.

use std::hint::black_box;
use std::time::Duration;

use cardvault::card::{Card, CardInput, Pan, PanError, Token, TokenFormat, luhn};
use cardvault::crypto;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const PAN_16: &str = "4242424242424242";
/// The same card as a person types it: separators are stripped while parsing.
const PAN_16_TYPED: &str = "4242 4242 4242 4242";
/// One mistyped check digit: the whole number is scanned before it is refused, so this is
/// the most expensive rejection.
const PAN_16_FAILS_LUHN: &str = "4242424242424241";

/// Short runs: the whole set finishes in about a minute on two cores, and these functions
/// take nanoseconds to microseconds, so three seconds is still millions of iterations.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// A valid 19-digit number (the longest a PAN may be), built with the crate's own check
/// digit so the bench cannot drift from the validator.
fn pan_19() -> String {
    let mut digits = b"622126000000000000".to_vec();
    digits.push(luhn::check_digit(&digits));
    String::from_utf8(digits).expect("ASCII digits")
}

fn pan_parse(c: &mut Criterion) {
    let pan_19 = pan_19();
    assert!(
        Pan::parse(&pan_19).is_ok(),
        "the 19-digit sample must be valid"
    );
    assert_eq!(
        Pan::parse(PAN_16_FAILS_LUHN).err(),
        Some(PanError::FailsLuhn),
        "the rejected sample must fail on Luhn, after a full scan"
    );

    let mut group = c.benchmark_group("pan_parse");
    group.throughput(Throughput::Elements(1));
    group.bench_function("valid_16", |b| b.iter(|| Pan::parse(black_box(PAN_16))));
    group.bench_function("valid_16_typed", |b| {
        b.iter(|| Pan::parse(black_box(PAN_16_TYPED)));
    });
    group.bench_function("valid_19", |b| {
        b.iter(|| Pan::parse(black_box(pan_19.as_str())));
    });
    group.bench_function("rejected_luhn_16", |b| {
        b.iter(|| Pan::parse(black_box(PAN_16_FAILS_LUHN)));
    });
    group.finish();

    let mut group = c.benchmark_group("luhn");
    group.throughput(Throughput::Elements(1));
    group.bench_function("is_valid_16", |b| {
        b.iter(|| luhn::is_valid(black_box(PAN_16.as_bytes())));
    });
    group.bench_function("is_valid_19", |b| {
        b.iter(|| luhn::is_valid(black_box(pan_19.as_bytes())));
    });
    group.finish();
}

fn card_parse(c: &mut Criterion) {
    let today = time::OffsetDateTime::now_utc().date();
    let input = CardInput {
        number: PAN_16_TYPED,
        exp_month: 12,
        exp_year: 2030,
        cardholder_name: "Ada Lovelace",
    };
    assert!(
        Card::parse(&input, today).is_ok(),
        "the sample card must be valid"
    );

    let mut group = c.benchmark_group("card_parse");
    group.throughput(Throughput::Elements(1));
    // Everything Tokenize validates before it touches a key: number, expiry and name.
    group.bench_function("valid_with_name", |b| {
        b.iter(|| Card::parse(black_box(&input), today));
    });
    group.finish();
}

fn token_generate(c: &mut Criterion) {
    let pan_16 = Pan::parse(PAN_16).expect("a valid test card");
    let pan_19 = Pan::parse(&pan_19()).expect("a valid test card");
    // The generator the vault uses: the process-wide OS CSPRNG, one getrandom per token.
    let rng = crypto::system_random();

    let mut group = c.benchmark_group("token_generate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("opaque", |b| {
        b.iter(|| Token::generate(TokenFormat::Opaque, black_box(&pan_16), rng));
    });
    group.bench_function("pan_shaped_16", |b| {
        b.iter(|| Token::generate(TokenFormat::PanShaped, black_box(&pan_16), rng));
    });
    group.bench_function("pan_shaped_19", |b| {
        b.iter(|| Token::generate(TokenFormat::PanShaped, black_box(&pan_19), rng));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = pan_parse, card_parse, token_generate
}
criterion_main!(benches);
