//! `cardvault-bench` against a real vault: the load generator's library entry point, run
//! in-process with small `--requests` counts, must get every request answered OK and leave
//! the cards it tokenized in the vault's database.

use std::{future::pending, path::Path, sync::Arc};

use cardvault_bench::{Bench, BenchArgs, BenchError, Progress, Report, Rpc};
use clap::Parser;

use crate::{
    access::{secure, secure_with},
    helpers::{AppState, Backend, TestApp, spawn_with},
    on_both_backends,
};

/// A dev-mode vault whose reveal limit does not get in the way of a benchmark.
async fn roomy_app(backend: Backend) -> TestApp {
    let state = Arc::new(AppState::new(backend).await);
    let mut settings = state.settings("dev");
    raise_reveal_limit(&mut settings);
    spawn_with(state, "dev", settings).await
}

fn raise_reveal_limit(settings: &mut cardvault::config::Settings) {
    settings.limits.reveal_per_minute = 1_000_000;
    settings.limits.reveal_burst = 10_000;
}

/// Arguments for a small run against `target`: 4 workers on 2 connections, no warm-up
/// (so every request is measured and rows can be counted exactly), then `extra`.
fn args(target: &str, extra: &[&str]) -> BenchArgs {
    let base = [
        "bench",
        "--target",
        target,
        "--concurrency",
        "4",
        "--connections",
        "2",
        "--warmup",
        "0s",
    ];
    BenchArgs::try_parse_from(base.iter().chain(extra).copied()).expect("valid arguments")
}

async fn bench(args: &BenchArgs) -> Result<Report, BenchError> {
    Bench::prepare(args)?.run(Progress::Off, pending()).await
}

fn plain_target(app: &TestApp) -> String {
    format!("http://{}", app.grpc_addr)
}

/// Every one of `requests` measured requests answered OK, none failed.
fn assert_all_ok(report: &Report, requests: u64) {
    let total = report.total();
    assert_eq!(total.requests, requests, "{}", report.to_text());
    assert_eq!(total.ok, requests, "{}", report.to_text());
    assert!(total.errors().is_empty(), "{}", report.to_text());
    assert!(total.latency_ms().is_some());
    assert!(!report.interrupted);
}

on_both_backends!(
    tokenize_stores_every_card,
    reveal_reads_the_pool,
    mixed_sends_all_three,
    import_streams_every_card_in_chunks
);

async fn tokenize_stores_every_card(backend: Backend) {
    let app = roomy_app(backend).await;
    let report = bench(&args(
        &plain_target(&app),
        &["--rpc", "tokenize", "--requests", "200"],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 200);
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 200);
}

async fn reveal_reads_the_pool(backend: Backend) {
    let app = roomy_app(backend).await;
    let report = bench(&args(
        &plain_target(&app),
        &["--rpc", "reveal", "--requests", "200", "--pool", "25"],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 200);
    assert_eq!(report.rpc(Rpc::Reveal).expect("reveal stats").ok, 200);
    // The pool is in the vault, and every reveal really opened one of its cards.
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 25);
    assert_eq!(
        app.state
            .count("SELECT COUNT(*) FROM audit_records WHERE action = 'reveal' AND outcome = 'ok'")
            .await,
        200
    );
}

async fn mixed_sends_all_three(backend: Backend) {
    let app = roomy_app(backend).await;
    let report = bench(&args(
        &plain_target(&app),
        &[
            "--rpc",
            "mixed",
            "--requests",
            "300",
            "--pool",
            "20",
            "--json",
        ],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 300);
    let ok = |rpc| report.rpc(rpc).expect("stats of each RPC").ok;
    assert!(ok(Rpc::Tokenize) > 0 && ok(Rpc::Get) > 0 && ok(Rpc::Reveal) > 0);
    let stored = app.state.count("SELECT COUNT(*) FROM cards").await;
    assert_eq!(
        stored,
        20 + i64::try_from(ok(Rpc::Tokenize)).expect("small")
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("JSON");
    assert_eq!(json["rpc"], "mixed");
    assert_eq!(json["ok"], 300);
    assert_eq!(json["by_rpc"]["get"]["ok"], ok(Rpc::Get));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pan_shaped_tokens_are_asked_for_when_chosen() {
    let app = roomy_app(Backend::Sqlite).await;
    let report = bench(&args(
        &plain_target(&app),
        &["--requests", "50", "--token-format", "pan-shaped"],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 50);
    assert_eq!(
        app.state
            .count("SELECT COUNT(*) FROM cards WHERE token NOT LIKE 'tok%'")
            .await,
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_sends_its_requests_on_schedule() {
    let app = roomy_app(Backend::Sqlite).await;
    let report = bench(&args(
        &plain_target(&app),
        &["--rate", "200", "--requests", "60"],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 60);
    assert_eq!(report.rate, Some(200.0));
    // 60 slots at 200/s: the last falls due after 295 ms.
    assert!(report.duration.as_millis() >= 290, "{:?}", report.duration);
    assert_eq!(report.missed_sends, Some(0));
    assert!(report.late_sends.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_run_measures_after_its_warm_up() {
    let app = roomy_app(Backend::Sqlite).await;
    let base = args(&plain_target(&app), &["--duration", "600ms"]);
    let with_warmup = BenchArgs {
        warmup: std::time::Duration::from_millis(300),
        ..base
    };
    let report = bench(&with_warmup).await.expect("bench runs");
    let total = report.total();
    assert!(total.ok > 0);
    assert_eq!(total.ok, total.requests);
    assert!(report.duration.as_millis() >= 600, "{:?}", report.duration);
    // Warm-up requests reach the vault but are not counted.
    let stored = app.state.count("SELECT COUNT(*) FROM cards").await;
    assert!(stored > i64::try_from(total.ok).expect("small"), "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_an_api_key_every_request_is_authenticated() {
    let s = secure_with(Backend::Sqlite, raise_reveal_limit).await;
    let (_, key) = s
        .api_key("acme", "bench", &["tokenize", "read", "reveal"])
        .await;
    let key_file = s.state.dir.path().join("bench.key");
    std::fs::write(&key_file, format!("{key}\n")).expect("write key file");
    let target = format!("https://127.0.0.1:{}", s.app.grpc_addr.port());
    let report = bench(&args(
        &target,
        &[
            "--rpc",
            "mixed",
            "--requests",
            "150",
            "--pool",
            "10",
            "--ca-file",
            path(&s.pki.ca_file),
            "--tls-server-name",
            "localhost",
            "--api-key-file",
            path(&key_file),
        ],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 150);
    let tokenized = report.rpc(Rpc::Tokenize).expect("tokenize stats").ok;
    assert_eq!(
        s.state
            .count("SELECT COUNT(*) FROM cards WHERE tenant_id = 'acme'")
            .await,
        10 + i64::try_from(tokenized).expect("small")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_the_client_certificate_names_the_principal() {
    let s = secure_with(Backend::Sqlite, raise_reveal_limit).await;
    s.principal(
        "acme",
        "bench",
        &["tokenize", "reveal"],
        Some("spiffe://acme.test/bench"),
    )
    .await;
    let (cert, key) = s
        .pki
        .client_cert("bench", Some("spiffe://acme.test/bench"), "bench");
    let target = format!("https://127.0.0.1:{}", s.app.grpc_addr.port());
    let report = bench(&args(
        &target,
        &[
            "--rpc",
            "reveal",
            "--requests",
            "40",
            "--pool",
            "5",
            "--ca-file",
            path(&s.pki.ca_file),
            "--cert-file",
            path(&cert),
            "--key-file",
            path(&key),
        ],
    ))
    .await
    .expect("bench runs");
    assert_all_ok(&report, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_the_vault_refuses_fails_the_run_with_the_status() {
    let s = secure(Backend::Sqlite).await;
    let target = format!("https://127.0.0.1:{}", s.app.grpc_addr.port());
    let err = bench(&args(
        &target,
        &[
            "--rpc",
            "reveal",
            "--requests",
            "10",
            "--pool",
            "5",
            "--ca-file",
            path(&s.pki.ca_file),
        ],
    ))
    .await
    .expect_err("no credentials, no pool");
    assert!(
        matches!(&err, BenchError::Pool(m) if m.contains("UNAUTHENTICATED")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_certificate_or_a_closed_port_fails_to_connect() {
    let s = secure(Backend::Sqlite).await;
    let target = format!("https://127.0.0.1:{}", s.app.grpc_addr.port());
    let err = bench(&args(
        &target,
        &["--requests", "1", "--ca-file", path(&s.pki.other_ca_file)],
    ))
    .await
    .expect_err("untrusted certificate");
    assert!(matches!(err, BenchError::Connect { .. }), "{err}");

    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let err = bench(&args(
        &format!("http://127.0.0.1:{port}"),
        &["--requests", "1"],
    ))
    .await
    .expect_err("nothing listens");
    assert!(matches!(err, BenchError::Connect { .. }), "{err}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// `--rpc import`: 2,500 cards over 2 streams in chunks of 1000 (1,250 per stream: 2 chunks
/// each), every card created and in the database, one audit record per chunk.
async fn import_streams_every_card_in_chunks(backend: Backend) {
    let app = roomy_app(backend).await;
    let args = args(
        &plain_target(&app),
        &["--rpc", "import", "--requests", "2500", "--chunk", "1000"],
    );
    let report = Bench::prepare(&args)
        .expect("valid")
        .run_import()
        .await
        .expect("import runs");
    assert_eq!(report.cards, 2500);
    assert_eq!(
        report.outcomes.get("created").copied(),
        Some(2500),
        "{}",
        report.to_text()
    );
    assert_eq!(report.outcomes.len(), 1, "{}", report.to_text());
    assert_eq!(report.chunks.ok, 4);
    assert!(report.chunks.errors().is_empty());
    assert!(report.cards_per_second() > 0.0);
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("JSON");
    assert_eq!(json["outcomes"]["created"], 2500);
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 2500);
    assert_eq!(
        app.state
            .count("SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards'")
            .await,
        4
    );
}
