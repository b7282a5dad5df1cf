//! Operations end to end: a vault whose PostgreSQL stops and comes back, and the real binary
//! stopped by SIGTERM in the middle of a steady stream of calls.

use cardvault_test_support::{postgres, serve};

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use cardvault::{
    config::{DatabaseTlsMode, Settings},
    crypto::LocalKeyring,
    pb::v1::{self as pb, card_vault_client::CardVaultClient},
    server,
};
use secrecy::SecretString;
use sqlx::Connection;
use std::error::Error as _;
use tonic::{Code, transport::Channel};

use crate::postgres::{PgServer, PrivateCluster};

/// A random, valid, 16-digit Visa-range PAN.
fn unique_pan() -> String {
    let id = uuid::Uuid::new_v4();
    let mut digits: Vec<u8> = vec![b'4'];
    digits.extend(id.as_bytes().iter().take(14).map(|b| b'0' + b % 10));
    digits.push(cardvault::card::luhn::check_digit(&digits));
    String::from_utf8(digits).expect("ASCII digits")
}

fn tokenize_request(number: &str) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        card: Some(pb::CardInput {
            number: number.to_owned(),
            exp_month: 12,
            exp_year: 2030,
            cardholder_name: "Ada Lovelace".to_owned(),
        }),
        ..Default::default()
    }
}

async fn readyz(admin: SocketAddr) -> (u16, String) {
    // reqwest is built without a crypto provider of its own (plain HTTP here anyway).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Polls `/readyz` until it answers `code`; how long that took, and the body.
async fn readyz_turns(admin: SocketAddr, code: u16, within: Duration) -> (Duration, String) {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(admin).await;
        if status == code {
            return (started.elapsed(), body);
        }
        assert!(
            started.elapsed() < within,
            "/readyz still {status} after {within:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn client(addr: SocketAddr) -> CardVaultClient<Channel> {
    CardVaultClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    )
}

/// PostgreSQL stops under a running vault: `/readyz` turns 503 naming the database within
/// about two seconds, a Tokenize fails UNAVAILABLE within the acquire timeout (and at once
/// once readiness knows), never hanging until the request timeout. PostgreSQL comes back:
/// the same vault is ready again and tokenizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_fails_calls_fast_and_readiness_follows_it_both_ways() {
    let cluster = PrivateCluster::start();
    let dir = tempfile::tempdir().expect("temp dir");
    LocalKeyring::init(&dir.path().join("keyring.toml")).expect("keyring");
    let mut s = Settings::load(None).expect("default settings");
    s.grpc.addr = "127.0.0.1:0".parse().expect("addr");
    s.admin.addr = "127.0.0.1:0".parse().expect("addr");
    s.grpc.drain_period_ms = 0;
    s.data.dir = dir.path().to_owned();
    s.database.url = Some(SecretString::from(cluster.url()));
    s.database.tls_mode = DatabaseTlsMode::Disable;
    s.database.acquire_timeout_ms = 1_000;
    s.grpc.request_timeout_ms = 10_000;
    s.keys.keyring = Some(dir.path().join("keyring.toml"));
    s.dev = true;
    s.auth.unauthenticated_tenant = Some("dev".to_owned());
    let acquire_timeout = Duration::from_millis(s.database.acquire_timeout_ms);

    let app = server::build(s).await.expect("vault builds");
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    readyz_turns(admin, 200, Duration::from_secs(10)).await;
    let mut vault = client(grpc).await;
    vault
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("tokenize while the database is up");

    cluster.stop();
    let stopped_at = Instant::now();
    // Straight after the stop, before readiness may have noticed: the call's own wait for a
    // connection bounds it.
    let mut request = tonic::Request::new(tokenize_request(&unique_pan()));
    request.set_timeout(Duration::from_secs(20));
    let status = vault
        .tokenize(request)
        .await
        .expect_err("tokenize with the database stopped");
    let first = stopped_at.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        first < acquire_timeout + Duration::from_millis(1_500),
        "UNAVAILABLE only after {first:?}"
    );

    let (_, body) = readyz_turns(admin, 503, Duration::from_secs(5)).await;
    let to_503 = stopped_at.elapsed();
    assert!(to_503 < Duration::from_secs(3), "503 only after {to_503:?}");
    assert!(body.contains("database: failing"), "{body}");
    assert!(!body.contains("postgres://"), "no URL in the body: {body}");

    let started = Instant::now();
    let status = vault
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect_err("tokenize while not ready");
    let at_once = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        at_once < Duration::from_millis(500),
        "UNAVAILABLE after {at_once:?} although readiness knew"
    );
    eprintln!(
        "database stopped: first Tokenize UNAVAILABLE after {first:?}; /readyz 503 after \
         {to_503:?}; Tokenize while not ready UNAVAILABLE after {at_once:?}"
    );

    cluster.resume();
    let resumed_at = Instant::now();
    let (_, body) = readyz_turns(admin, 200, Duration::from_secs(5)).await;
    assert!(body.contains("database: ok"), "{body}");
    eprintln!(
        "database back: /readyz 200 after {:?}",
        resumed_at.elapsed()
    );
    vault
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("tokenize once the database is back, without a restart");

    let _ = stop.send(());
    serving.await.expect("task").expect("vault serves");
}

/// The vault as a child process on a config file.
struct Child {
    process: std::process::Child,
    grpc: SocketAddr,
    admin: SocketAddr,
}

fn start_vault(config: &std::path::Path, dir: &std::path::Path) -> Child {
    let log = dir.join(format!("serve-{}.out", uuid::Uuid::new_v4().simple()));
    let mut process = Command::new(env!("CARGO_BIN_EXE_cardvault"))
        .arg("--config")
        .arg(config)
        .args(["serve", "--dev", "--data-dir"])
        .arg(dir)
        .env_clear()
        .envs(serve::ANY_PORT)
        .stdout(std::fs::File::create(&log).expect("stdout file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start cardvault serve");
    let (grpc, admin) = serve::listening(&mut process, &log);
    Child {
        process,
        grpc,
        admin,
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// What one call ended as.
enum Outcome {
    Stored { token: String, pan: String },
    NeverStarted,
}

/// SIGTERM while six callers tokenize back to back: the vault goes not ready at once, keeps
/// serving through its drain period, finishes what it accepted and exits 0. Every call was
/// either answered OK — and its card is there after a restart, with its PAN's last four — or
/// refused as UNAVAILABLE (the listener had closed: it never started). The card rows are
/// exactly the acknowledged tokens plus the warm-up card: a card stored without its answer
/// reaching the caller would be one too many, a lost acknowledgement one too few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_a_steady_stream_loses_no_acknowledged_card_and_exits_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = format!("cardvault_test_{}", uuid::Uuid::new_v4().simple());
    let server = PgServer::get();
    let mut admin_conn = sqlx::PgConnection::connect(&server.admin_url)
        .await
        .expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin_conn)
        .await
        .expect("create database");
    let url = server.url_for(&name);
    let config = dir.path().join("cardvault.toml");
    std::fs::write(
        &config,
        format!(
            "[grpc]\ndrain_period_ms = 1000\n\n[database]\nurl = \"{url}\"\ntls_mode = \
             \"disable\"\n\n[keys]\nkeyring = \"{}\"\n\n[log]\nlevel = \"warn\"\n",
            dir.path().join("keyring.toml").display()
        ),
    )
    .expect("write config");

    let mut vault = start_vault(&config, dir.path());
    readyz_turns(vault.admin, 200, Duration::from_secs(20)).await;
    let warm = client(vault.grpc)
        .await
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("warm-up tokenize")
        .into_inner()
        .card
        .expect("card")
        .token;

    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..6 {
        let mut caller = client(vault.grpc).await;
        let outcomes = outcomes.clone();
        let done = done.clone();
        callers.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let pan = unique_pan();
                let outcome = match caller.tokenize(tokenize_request(&pan)).await {
                    Ok(response) => Outcome::Stored {
                        token: response.into_inner().card.expect("card").token,
                        pan,
                    },
                    Err(status) => {
                        // Refused connections are UNAVAILABLE; a request the client had
                        // queued on a connection the server was closing (HTTP/2 GOAWAY) is
                        // reported CANCELLED by the client's transport, never by the vault.
                        // That neither wrote anything is checked against the card rows below.
                        let transport = status
                            .source()
                            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
                        assert!(
                            status.code() == Code::Unavailable
                                || (status.code() == Code::Cancelled && transport),
                            "a call failed otherwise than never started: {status:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Outcome::NeverStarted
                    }
                };
                outcomes.lock().expect("lock").push(outcome);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Command::new("kill")
        .args(["-TERM", &vault.process.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let termed_at = Instant::now();
    // Not ready at once, while the drain period still serves.
    let (_, body) = readyz_turns(vault.admin, 503, Duration::from_secs(1)).await;
    assert!(body.contains("shutting down"), "{body}");
    let during_drain = client(vault.grpc)
        .await
        .tokenize(tokenize_request(&unique_pan()))
        .await;
    assert!(
        during_drain.is_ok(),
        "the drain period still serves: {during_drain:?}"
    );

    let status = loop {
        if let Some(status) = vault.process.try_wait().expect("wait") {
            break status;
        }
        assert!(
            termed_at.elapsed() < Duration::from_secs(30),
            "the vault did not exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    done.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.expect("caller");
    }
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));
    let acknowledged: Vec<(String, String)> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Stored { token, pan } => Some((token.clone(), pan.clone())),
            Outcome::NeverStarted => None,
        })
        .collect();
    let refused = outcomes.len() - acknowledged.len();
    eprintln!(
        "SIGTERM under load: {} calls acknowledged, {refused} refused as never started, \
         exit 0 after {:?}",
        acknowledged.len(),
        termed_at.elapsed()
    );
    assert!(acknowledged.len() > 10, "the load was not steady");

    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    let stored: HashSet<String> = sqlx::query_scalar("SELECT token FROM cards")
        .fetch_all(&mut db)
        .await
        .expect("tokens")
        .into_iter()
        .collect();
    let mut expected: HashSet<String> = acknowledged.iter().map(|(t, _)| t.clone()).collect();
    expected.insert(warm);
    let during_token = during_drain
        .expect("checked")
        .into_inner()
        .card
        .expect("card")
        .token;
    expected.insert(during_token);
    assert_eq!(
        stored, expected,
        "card rows are exactly the acknowledged tokens"
    );

    // Restarted on the same data, every acknowledged token is there with its card.
    drop(vault);
    let vault = start_vault(&config, dir.path());
    readyz_turns(vault.admin, 200, Duration::from_secs(20)).await;
    let mut reader = client(vault.grpc).await;
    for (token, pan) in &acknowledged {
        let card = reader
            .get_card(pb::GetCardRequest {
                token: token.clone(),
            })
            .await
            .expect("an acknowledged card after the restart")
            .into_inner()
            .card
            .expect("card");
        assert_eq!(card.last4, pan[pan.len() - 4..]);
    }
    drop(vault);
    drop(db);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin_conn)
    .await;
}
