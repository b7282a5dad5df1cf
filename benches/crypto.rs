//! Micro-benchmarks of the per-card crypto on the tokenize and reveal paths: sealing and
//! opening one card record under a DEK taken from the cache, and the fingerprint HMAC.
//!
//! Run with `cargo bench --bench crypto`; docs/benchmarks.md says what each number means.

use std::hint::black_box;
use std::time::Duration;

use cardvault::card::{Pan, Token, TokenFormat};
use cardvault::crypto::{self, DataKey, DekCache, DekId, TenantSecret};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TENANT: &str = "dev";
const PAN: &str = "4242424242424242";
const HOLDER: &str = "Ada Lovelace";

/// Short runs: the whole set finishes in about a minute on two cores, and these functions
/// take microseconds, so three seconds is still hundreds of thousands of samples.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// Bytes as long as the vault's record plaintext for a 16-digit PAN and [`HOLDER`]
/// (version, PAN length, digits, name length u16, name). The vault's encoder is private
/// (`vault::record`), and AES-GCM's cost depends on the length alone, not the contents.
fn record_plaintext() -> Vec<u8> {
    vec![0x5a; 1 + 1 + PAN.len() + 2 + HOLDER.len()]
}

/// A DEK as the vault holds one: unwrapped once, then shared out of the [`DekCache`].
fn cached_dek() -> (DekCache, DekId) {
    let cache = DekCache::new(1024);
    let id = DekId::generate().expect("the OS random generator works");
    cache.insert(
        "bench",
        id,
        DataKey::generate().expect("the OS random generator works"),
    );
    (cache, id)
}

fn token() -> Token {
    let pan = Pan::parse(PAN).expect("a valid test card");
    Token::generate(TokenFormat::Opaque, &pan, crypto::system_random())
        .expect("the OS random generator works")
}

fn record(c: &mut Criterion) {
    let (cache, dek_id) = cached_dek();
    let token = token();
    let plaintext = record_plaintext();
    let sealed = {
        let dek = cache.get("bench", &dek_id).expect("just inserted");
        crypto::seal_record(&dek, dek_id, TENANT, token.as_str(), &plaintext)
            .expect("sealing works")
    };

    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    // The vault's tokenize path: look the active DEK up, then seal under a fresh nonce
    // (which includes one getrandom call).
    group.bench_function("seal", |b| {
        b.iter(|| {
            let dek = cache.get("bench", &dek_id).expect("cached");
            crypto::seal_record(
                &dek,
                dek_id,
                TENANT,
                black_box(token.as_str()),
                black_box(&plaintext),
            )
            .expect("sealing works")
        });
    });
    // The reveal path: read the DEK id from the header, look that DEK up, open.
    group.bench_function("open", |b| {
        b.iter(|| {
            let id = crypto::record_dek_id(black_box(&sealed)).expect("well-formed");
            let dek = cache.get("bench", &id).expect("cached");
            crypto::open_record(&dek, TENANT, black_box(token.as_str()), black_box(&sealed))
                .expect("opens")
        });
    });
    group.finish();
}

fn fingerprint(c: &mut Criterion) {
    let key = TenantSecret::generate()
        .expect("the OS random generator works")
        .fingerprint_key(TENANT);
    let pan = Pan::parse(PAN).expect("a valid test card");

    let mut group = c.benchmark_group("fingerprint");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hmac_sha256_pan16", |b| {
        b.iter(|| key.fingerprint(black_box(pan.expose_digits().as_bytes())));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = record, fingerprint
}
criterion_main!(benches);
