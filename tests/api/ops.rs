//! Operability: admission limits refuse at once and per class, an expired deadline leaves
//! nothing written, and readiness follows the key provider.

use std::time::{Duration, Instant};

use cardvault::pb::v1::{self as pb};
use sqlx::Connection;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::helpers::{AppState, Backend, TestApp, spawn_with, tokenize_request, unique_pan};

/// Settings with small admission limits.
fn limited(state: &AppState, max_in_flight: usize) -> cardvault::config::Settings {
    let mut s = state.settings("dev");
    s.grpc.max_in_flight = max_in_flight;
    s.grpc.max_in_flight_reveal = 1;
    s.grpc.max_in_flight_admin = 1;
    s.grpc.max_import_streams = 1;
    s.database.batch_writers = 2;
    s.limits.reveal_per_minute = 1_000_000;
    s.limits.reveal_burst = 100_000;
    s
}

/// Holds `LOCK TABLE cards` in an open transaction: every group commit that stores a card
/// waits on it, so tokenize calls stay in flight for real until it is released.
struct CardsLock {
    conn: sqlx::PgConnection,
}

impl CardsLock {
    async fn take(url: &str) -> CardsLock {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query("BEGIN")
            .execute(&mut conn)
            .await
            .expect("begin");
        sqlx::query("LOCK TABLE cards IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .expect("lock cards");
        CardsLock { conn }
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .expect("release the lock");
    }
}

/// Waits until `n` sessions of the vault wait on a lock (its group-commit writers, blocked
/// by [`CardsLock`]).
async fn writers_blocked(url: &str, n: i64) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE application_name = 'cardvault' AND wait_event_type = 'Lock' \
             AND datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} vault sessions never blocked on the lock ({waiting} did)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn spawn_limited(max_in_flight: usize) -> TestApp {
    let state = std::sync::Arc::new(AppState::new(Backend::Postgres).await);
    let settings = limited(&state, max_in_flight);
    let mut app = spawn_with(state, "dev", settings).await;
    // Warm: keys and audit chains loaded, so held calls wait only on the lock.
    app.tokenize(&unique_pan()).await;
    app
}

/// With every slot held by a tokenize blocked on a real table lock, one more call is refused
/// with RESOURCE_EXHAUSTED at once, naming the limit; the admitted calls complete once the
/// lock goes, and the slots are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_vault_refuses_at_once_while_admitted_calls_complete() {
    let app = spawn_limited(4).await;
    let url = app.state.database_url.clone();
    let lock = CardsLock::take(&url).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut client = app.client.clone();
        held.push(tokio::spawn(async move {
            client.tokenize(tokenize_request(&unique_pan())).await
        }));
        // One at a time, so the two writers each block on a batch of their own.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writers_blocked(&url, 1).await;

    let mut client = app.client.clone();
    let started = Instant::now();
    let refused = client
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect_err("a fifth call past max_in_flight = 4");
    let took = started.elapsed();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("grpc.max_in_flight"),
        "{}",
        refused.message()
    );
    assert!(
        took < Duration::from_secs(1),
        "refused after {took:?}, not at once"
    );
    // Health is never shed.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health answers while the vault is full");

    lock.release().await;
    for call in held {
        let response = call.await.expect("task").expect("admitted call completes");
        assert!(!response.into_inner().card.expect("card").token.is_empty());
    }
    client
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("the slots are free again");
}

/// Imports and reveals have limits of their own: with the one import slot held by an open
/// stream, a second import is refused at once, a flood of reveals is shed past its one slot,
/// and tokenize goes on untouched throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_and_reveals_cannot_starve_tokenize() {
    // 16 in all, at most 3 of them reveals, imports and admin calls: tokenize always has 13,
    // more than the 10 it makes at once below.
    let app = spawn_limited(16).await;
    let token = app
        .client
        .clone()
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("tokenize")
        .into_inner()
        .card
        .expect("card")
        .token;

    // An import stream that sends nothing yet: it holds the import slot while open.
    let (sender, requests) = tokio::sync::mpsc::channel::<pb::ImportCardsRequest>(1);
    let mut importer = app.client.clone();
    let open =
        tokio::spawn(async move { importer.import_cards(ReceiverStream::new(requests)).await });

    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let (_probe_sender, probe) = tokio::sync::mpsc::channel::<pb::ImportCardsRequest>(1);
        let mut request = tonic::Request::new(ReceiverStream::new(probe));
        request.set_timeout(Duration::from_millis(300));
        let started = Instant::now();
        match app.client.clone().import_cards(request).await {
            Err(status) if status.code() == Code::ResourceExhausted => {
                break (status, started.elapsed());
            }
            // The first stream had not reached the vault yet.
            _ => assert!(
                Instant::now() < deadline,
                "a second import was never refused"
            ),
        }
    };
    assert!(refused.0.message().contains("grpc.max_import_streams"));
    assert!(
        refused.1 < Duration::from_secs(1),
        "refused after {:?}",
        refused.1
    );

    // A flood of reveals: past the one reveal slot they are shed, while tokenize calls made
    // at the same time all succeed.
    let mut reveals = Vec::new();
    for _ in 0..60 {
        let mut client = app.client.clone();
        let token = token.clone();
        reveals.push(tokio::spawn(async move {
            client.reveal(pb::RevealRequest { token }).await
        }));
    }
    let mut tokenizes = Vec::new();
    for _ in 0..10 {
        let mut client = app.client.clone();
        tokenizes.push(tokio::spawn(async move {
            client.tokenize(tokenize_request(&unique_pan())).await
        }));
    }
    for call in tokenizes {
        call.await
            .expect("task")
            .expect("tokenize is not starved by imports or reveals");
    }
    let mut shed = 0;
    for call in reveals {
        match call.await.expect("task") {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("grpc.max_in_flight_reveal"));
                shed += 1;
            }
        }
    }
    assert!(shed > 0, "60 concurrent reveals never exceeded one slot");

    drop(sender);
    let _ = open.await;
}

/// Tokenize calls whose `grpc-timeout` passes while they wait for the group commit (both
/// writers blocked on a real lock) are abandoned before their write: no card, no audit
/// record, nothing half-written; the calls admitted before them complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_leaves_nothing_written() {
    let app = spawn_limited(64).await;
    let url = app.state.database_url.clone();
    let cards = "SELECT COUNT(*) FROM cards";
    let records = "SELECT COUNT(*) FROM audit_records WHERE action = 'tokenize'";
    let cards_before = app.state.count(cards).await;
    let records_before = app.state.count(records).await;

    let lock = CardsLock::take(&url).await;
    // Two blockers, one per writer.
    let mut blockers = Vec::new();
    for n in 1..=2 {
        let mut client = app.client.clone();
        blockers.push(tokio::spawn(async move {
            client.tokenize(tokenize_request(&unique_pan())).await
        }));
        writers_blocked(&url, n).await;
    }

    let mut late = Vec::new();
    for _ in 0..5 {
        let mut client = app.client.clone();
        late.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(tokenize_request(&unique_pan()));
            request.set_timeout(Duration::from_millis(200));
            client.tokenize(request).await
        }));
    }
    for call in late {
        let status = call
            .await
            .expect("task")
            .expect_err("the deadline passed while the writers were blocked");
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    lock.release().await;
    for call in blockers {
        call.await.expect("task").expect("blocker completes");
    }
    // The writers are free again; a call after them is answered, so every queued write was
    // either committed or dropped by now.
    app.client
        .clone()
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("tokenize after");

    assert_eq!(
        app.state.count(cards).await,
        cards_before + 3,
        "only the two blockers and the last call stored a card"
    );
    assert_eq!(
        app.state.count(records).await,
        records_before + 3,
        "the abandoned calls left no audit record"
    );
    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM cards c WHERE NOT EXISTS (SELECT 1 FROM audit_records a \
                 WHERE a.token = c.token AND a.action = 'tokenize')"
            )
            .await,
        0,
        "every card has the audit record of its tokenize"
    );
}

/// `GET /readyz` on `app`: status code and body.
async fn readyz(app: &TestApp) -> (u16, String) {
    let response = reqwest::get(format!("http://{}/readyz", app.admin_addr))
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Polls `/readyz` until it answers `code`, within `within`.
async fn readyz_turns(app: &TestApp, code: u16, within: Duration) -> (Duration, String) {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(app).await;
        if status == code {
            return (started.elapsed(), body);
        }
        assert!(
            started.elapsed() < within,
            "/readyz still {status} after {within:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A local keyring that disappears under a running vault makes it not ready within about
/// two seconds, with the reason in `/readyz` and gRPC health NOT_SERVING; put back, the
/// vault is ready again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_key_provider() {
    let state = std::sync::Arc::new(AppState::new(Backend::Sqlite).await);
    let app = spawn_with(state.clone(), "dev", state.settings("dev")).await;
    let (_, body) = readyz_turns(&app, 200, Duration::from_secs(10)).await;
    assert!(body.contains("keys: ok"), "{body}");
    assert!(body.contains("database: ok"), "{body}");
    assert!(body.contains("migrations: ok"), "{body}");

    let keyring = state.dir.path().join("keyring.toml");
    let aside = state.dir.path().join("keyring.toml.aside");
    std::fs::rename(&keyring, &aside).expect("move the keyring away");
    let (took, body) = readyz_turns(&app, 503, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(3),
        "not ready only after {took:?}"
    );
    assert!(
        body.contains("keys: failing: the key provider cannot unwrap"),
        "{body}"
    );
    assert!(
        body.contains("keyring.toml"),
        "the reason names the file: {body}"
    );
    assert!(body.contains("database: ok"), "{body}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    std::fs::rename(&aside, &keyring).expect("put the keyring back");
    let (_, body) = readyz_turns(&app, 200, Duration::from_secs(5)).await;
    assert!(body.contains("keys: ok"), "{body}");
}

/// A schema behind the binary (a migration it embeds not applied) makes the vault not ready,
/// naming the migration and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_schema() {
    let state = std::sync::Arc::new(AppState::new(Backend::Sqlite).await);
    let app = spawn_with(state.clone(), "dev", state.settings("dev")).await;
    readyz_turns(&app, 200, Duration::from_secs(10)).await;
    let latest: i64 = state
        .count("SELECT MAX(version) FROM _sqlx_migrations")
        .await;
    let forgotten = state
        .execute(
            "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM \
             _sqlx_migrations)",
            &[],
        )
        .await;
    assert_eq!(forgotten, 1);
    let (took, body) = readyz_turns(&app, 503, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(3),
        "not ready only after {took:?}"
    );
    assert!(
        body.contains(&format!(
            "migrations: failing: 1 migration(s) of this binary not applied (first {latest})"
        )),
        "{body}"
    );
    assert!(body.contains("cardvault migrate"), "{body}");
    assert!(body.contains("database: ok"), "{body}");
}
