//! Key-management benchmark on PostgreSQL (issue 6; docs/benchmarks.md "Key rotation").
//!
//! ```sh
//! cargo bench --bench keys                                  # 1000 tenants × 1000 cards
//! cargo bench --bench keys -- --tenants 100 --cards 100     # a quick run
//! DATABASE_URL=postgres://postgres@db:5432/postgres cargo bench --bench keys
//! ```
//!
//! In one run, on a scratch database it creates and drops: loads `tenants × cards` cards
//! through `ImportCards`' code path, then measures
//! 1. tokenize throughput with no key job running (32 concurrent callers), after a warm-up
//!    window, and again at the end;
//! 2. KEK rotation: the time until every DEK, tenant secret and the audit key is rewrapped
//!    under the new version (unthrottled);
//! 3. tokenize throughput while a throttled KEK rewrap runs (the default 5,000 keys/s would
//!    finish before a measurement; this one is slowed down to last the whole window);
//! 4. DEK rotation with re-encryption of every record (unthrottled): records per second;
//! 5. tokenize throughput while a re-encryption job runs at the default throttle
//!    (`keys.job_rate` = 5,000 records/s).
//!
//! The vault runs in this process (no gRPC), with a local ephemeral keyring, so the numbers
//! are the vault core and PostgreSQL; `cardvault-bench` measures the whole stack.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cardvault::{
    audit::Action,
    card::{Card, CardInput, TokenFormat},
    crypto::LocalKeyring,
    store::{self, StoreOptions},
    vault::{
        ConfigPrincipal, Credentials, DekPolicy, ImportChunk, ImportCommand, ImportEntry, ImportId,
        ImportOutcome, KeyJobOptions, Metadata, Operator, Permissions, Principal, TenantId,
        TokenizeCommand, Vault, VaultOptions,
    },
};
use cardvault_bench::cards::{CardGenerator, FastRng};
use sqlx::Connection;
use tokio::sync::watch;

struct Args {
    tenants: usize,
    cards: usize,
    window: Duration,
    callers: usize,
}

fn args() -> Args {
    let mut args = Args {
        tenants: 1000,
        cards: 1000,
        window: Duration::from_secs(5),
        callers: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--tenants" => args.tenants = value(),
            "--cards" => args.cards = value(),
            "--window" => args.window = Duration::from_secs(value() as u64),
            "--callers" => args.callers = value(),
            // `cargo bench` passes --bench; filters make no sense here.
            _ => {}
        }
    }
    args
}

fn tenant(i: usize) -> TenantId {
    TenantId::parse(&format!("t{i:04}")).expect("tenant id")
}

fn card(generator: &mut CardGenerator) -> Card {
    let input = generator.card();
    let today = time::OffsetDateTime::now_utc().date();
    Card::parse(
        &CardInput {
            number: &input.number,
            exp_month: input.exp_month,
            exp_year: input.exp_year,
            cardholder_name: &input.cardholder_name,
        },
        today,
    )
    .expect("generated cards are valid")
}

async fn authorized(vault: &Vault, i: usize, action: Action) -> cardvault::vault::Authorized {
    let identity = format!("bench-{i}");
    let caller = vault
        .authenticate(
            Credentials {
                bearer: None,
                mtls_identity: Some(&identity),
                peer: None,
                forwarded_for: None,
            },
            None,
        )
        .await
        .expect("authenticate");
    vault.authorize(caller, action).await.expect("authorize")
}

/// Tokenizes from `callers` tasks for `window`; returns tokenizations per second.
async fn tokenize_for(vault: &Arc<Vault>, args: &Args) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..args.callers {
        let (vault, stop, done) = (vault.clone(), stop.clone(), done.clone());
        let tenants = args.tenants;
        tasks.push(tokio::spawn(async move {
            let mut generator = CardGenerator::new(FastRng::seeded(c as u64 + 7), 2026);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = (c + n * args_stride()) % tenants;
                let auth = authorized(&vault, i, Action::Tokenize).await;
                vault
                    .tokenize(
                        &auth,
                        TokenizeCommand {
                            card: card(&mut generator),
                            cvc: None,
                            format: TokenFormat::Opaque,
                            reuse_existing: false,
                            metadata: Metadata::default(),
                            expires_at: None,
                        },
                    )
                    .await
                    .expect("tokenize");
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(args.window).await;
    let count = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("tokenize task");
    }
    count as f64 / elapsed.as_secs_f64()
}

/// Callers spread over tenants by a stride co-prime with any tenant count of interest.
fn args_stride() -> usize {
    37
}

/// Runs key jobs in this task until none is left.
async fn run_jobs(vault: &Vault) {
    let (_tx, stop) = watch::channel(false);
    while vault
        .work_on_key_jobs("bench", &stop)
        .await
        .expect("key job")
    {}
}

async fn vault_with(
    store: Arc<dyn store::Store>,
    keyring: Arc<LocalKeyring>,
    args: &Args,
    rate: u32,
) -> Arc<Vault> {
    let defaults = VaultOptions::default();
    let options = VaultOptions {
        dek_cache_size: 2 * args.tenants + 16,
        // Retired DEKs are destroyed 2 × this after rotation: short, so the run does not wait.
        dek_policy: DekPolicy {
            reservation: Duration::from_secs(1),
            ..defaults.dek_policy.clone()
        },
        key_jobs: KeyJobOptions {
            rate,
            batch: 500,
            ..defaults.key_jobs.clone()
        },
        config_principals: (0..args.tenants)
            .map(|i| ConfigPrincipal {
                principal: Principal {
                    id: format!("config:bench-{i}"),
                    tenant: tenant(i),
                    name: format!("bench-{i}"),
                    permissions: Permissions::all(),
                    global_operator: false,
                },
                mtls_identity: format!("bench-{i}"),
            })
            .collect(),
        ..defaults
    };
    Arc::new(Vault::new(store, keyring, options))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("cardvault_keybench_{}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to PostgreSQL (set DATABASE_URL to an admin URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create scratch database");
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("DATABASE_URL must name a database"),
    };

    let store = store::connect(
        &url,
        &StoreOptions {
            max_connections: 16,
            ..StoreOptions::default()
        },
    )
    .await
    .expect("open store");
    store.migrate().await.expect("migrate");
    let keyring = Arc::new(LocalKeyring::ephemeral().expect("keyring"));
    let vault = vault_with(store.clone(), keyring.clone(), &args, 0).await;
    let op = Operator::local("bench");

    // Load: every tenant's cards through the import path, 1000 per chunk, 2 tenants at a time.
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for l in 0..2u64 {
        let (vault, next) = (vault.clone(), next.clone());
        let (tenants, cards) = (args.tenants, args.cards);
        loaders.push(tokio::spawn(async move {
            let mut generator = CardGenerator::new(FastRng::seeded(1000 + l), 2026);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= tenants {
                    return;
                }
                let auth = authorized(&vault, i, Action::ImportCards).await;
                for (seq, start) in (0..cards).step_by(1000).enumerate() {
                    let entries = (start..cards.min(start + 1000))
                        .map(|j| {
                            ImportEntry::Valid(ImportCommand {
                                import_id: ImportId::parse(format!("c{j}")).expect("id"),
                                card: card(&mut generator),
                                format: TokenFormat::Opaque,
                                metadata: Metadata::default(),
                            })
                        })
                        .collect();
                    let outcomes = vault
                        .import_cards(
                            &auth,
                            ImportChunk {
                                seq: seq as u64 + 1,
                                entries,
                            },
                        )
                        .await
                        .expect("import");
                    assert!(
                        outcomes
                            .iter()
                            .all(|o| matches!(o, ImportOutcome::Created(_)))
                    );
                }
            }
        }));
    }
    for loader in loaders {
        loader.await.expect("loader");
    }
    let total = args.tenants * args.cards;
    let load_secs = started.elapsed().as_secs_f64();
    println!(
        "loaded {total} cards over {} tenants in {load_secs:.1} s ({:.0} cards/s)",
        args.tenants,
        total as f64 / load_secs
    );

    // 1. Tokenize with no job running, after a warm-up (the load leaves PostgreSQL busy with
    // checkpoints and autovacuum for a while; this window is measured again at the end).
    tokenize_for(&vault, &args).await;
    let idle = tokenize_for(&vault, &args).await;
    println!(
        "tokenize, no key job:            {idle:>9.0} /s ({} callers, {} s)",
        args.callers,
        args.window.as_secs()
    );

    // 2. KEK rotation, unthrottled.
    let started = Instant::now();
    let (version, job) = vault.rotate_kek(&op).await.expect("rotate KEK");
    run_jobs(&vault).await;
    let rotation = started.elapsed();
    let usage = store.kek_usage().await.expect("usage");
    let left: u64 = usage
        .iter()
        .filter(|u| u.version != version.0)
        .map(|u| u.deks + u.tenant_secrets + u.audit_keys)
        .sum();
    assert_eq!(left, 0, "keys left under old KEK versions: {usage:?}");
    println!(
        "KEK rotation to {version}:            {:>9.2} s  ({} keys rewrapped for {total} cards; job {})",
        rotation.as_secs_f64(),
        job.total,
        job.id
    );

    // 3. Tokenize while a throttled rewrap runs the whole window.
    let keys = (2 * args.tenants + 1) as u64;
    let slow_rate = (keys / (args.window.as_secs() + 2)).max(1) as u32;
    let throttled = vault_with(store.clone(), keyring.clone(), &args, slow_rate).await;
    throttled.rotate_kek(&op).await.expect("rotate KEK again");
    let worker = {
        let throttled = throttled.clone();
        tokio::spawn(async move { run_jobs(&throttled).await })
    };
    let during_rewrap = tokenize_for(&vault, &args).await;
    worker.await.expect("rewrap worker");
    println!(
        "tokenize during a KEK rewrap:    {during_rewrap:>9.0} /s ({:.0} % of idle; rewrap throttled to {slow_rate} keys/s)",
        100.0 * during_rewrap / idle
    );

    // 4. DEK rotation with re-encryption of every record, unthrottled.
    let started = Instant::now();
    let rotated = vault
        .rotate_deks(&op, None, true)
        .await
        .expect("rotate DEKs");
    let rotate_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    run_jobs(&vault).await;
    let reencrypt = started.elapsed();
    // The job waits out the DEK reservation grace (2 s here) before destroying old DEKs.
    println!(
        "DEK rotation:                    {rotate_secs:>9.2} s  ({} tenants)",
        rotated.deks.len()
    );
    println!(
        "re-encryption:                   {:>9.0} records/s ({total} records in {:.1} s, old DEKs destroyed)",
        total as f64 / reencrypt.as_secs_f64(),
        reencrypt.as_secs_f64()
    );

    // 5. Tokenize while a re-encryption runs at the default throttle.
    let default_rate = cardvault::vault::KeyJobOptions::default().rate;
    let throttled = vault_with(store.clone(), keyring, &args, default_rate).await;
    throttled
        .rotate_deks(&op, None, true)
        .await
        .expect("rotate DEKs again");
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = {
        let throttled = throttled.clone();
        tokio::spawn(async move {
            let _ = throttled.work_on_key_jobs("bench", &stop_rx).await;
        })
    };
    let during_reencrypt = tokenize_for(&vault, &args).await;
    let _ = stop_tx.send(true);
    worker.await.expect("re-encryption worker");
    println!(
        "tokenize during re-encryption:   {during_reencrypt:>9.0} /s ({:.0} % of idle; re-encryption at {default_rate} records/s)",
        100.0 * during_reencrypt / idle
    );

    let idle_again = tokenize_for(&vault, &args).await;
    println!("tokenize, no key job (again):    {idle_again:>9.0} /s");

    drop((vault, throttled, store));
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await;
}
