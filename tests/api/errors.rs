//! Every error the API promises: field violations, NOT_FOUND, UNAVAILABLE, INTERNAL.

use std::sync::Arc;

use cardvault::pb::v1 as pb;
use secrecy::SecretString;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    helpers::{AppState, Backend, spawn_app, spawn_with, tokenize_request, violated_fields},
    on_both_backends,
};

on_both_backends!(
    invalid_cards_get_field_violations_without_their_values,
    malformed_and_unknown_tokens_are_refused,
    a_tampered_record_is_an_internal_error_with_a_request_id,
    nothing_stored_is_lost_when_bad_requests_arrive,
);

async fn invalid_cards_get_field_violations_without_their_values(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let cases: Vec<(pb::TokenizeRequest, Vec<&str>)> = vec![
        (tokenize_request("4242424242424241"), vec!["card.number"]),
        (tokenize_request("4242 42xx 4242 4242"), vec!["card.number"]),
        (tokenize_request("42424242424"), vec!["card.number"]),
        (
            tokenize_request("42424242424242424242"),
            vec!["card.number"],
        ),
        (
            {
                let mut r = tokenize_request("4242424242424242");
                let card = r.card.as_mut().expect("card");
                card.exp_month = 13;
                card.exp_year = 1999;
                r
            },
            vec!["card.exp_month", "card.exp_year"],
        ),
        (
            {
                let mut r = tokenize_request("4242424242424242");
                r.card.as_mut().expect("card").exp_year = 2020;
                r
            },
            vec!["card.exp_year"],
        ),
        (
            {
                let mut r = tokenize_request("4242424242424242");
                r.card.as_mut().expect("card").cardholder_name = "x".repeat(101);
                r
            },
            vec!["card.cardholder_name"],
        ),
        (
            {
                let mut r = tokenize_request("4242424242424242");
                r.metadata
                    .insert("note".to_owned(), "backup 4242424242424242".to_owned());
                r
            },
            vec!["metadata"],
        ),
        (pb::TokenizeRequest::default(), vec!["card"]),
    ];
    for (request, expected) in cases {
        let status = app.client.tokenize(request).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), expected);
        let everything = format!(
            "{} {:?} {:?}",
            status.message(),
            status.get_error_details(),
            status.metadata()
        );
        assert!(!everything.contains("4242424242424241"));
        assert!(!everything.contains("4242424242424242"));
        assert!(!everything.contains("42xx"));
    }
}

async fn malformed_and_unknown_tokens_are_refused(backend: Backend) {
    let mut app = spawn_app(backend).await;
    for token in [
        "",
        "tok_short",
        "4242424242424242",
        "tok_!!!!!!!!!!!!!!!!!!!!!!",
    ] {
        let status = app
            .client
            .get_card(pb::GetCardRequest {
                token: token.to_owned(),
            })
            .await
            .expect_err("malformed");
        assert_eq!(status.code(), Code::InvalidArgument, "{token:?}");
        assert_eq!(violated_fields(&status), ["token"]);
        assert!(!status.message().contains("4242424242424242"));
    }
    let status = app
        .client
        .reveal(pb::RevealRequest {
            token: "tok_AAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
}

async fn a_tampered_record_is_an_internal_error_with_a_request_id(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let victim = app.tokenize("6011111111111117").await.token;
    let donor = app.tokenize("3566002020360505").await.token;
    // Someone with database access moves one card's ciphertext onto another token.
    let sql = "UPDATE cards SET ciphertext = (SELECT ciphertext FROM cards WHERE token = $1) \
               WHERE token = $2";
    let moved = app.state.execute(sql, &[&donor, &victim]).await;
    assert_eq!(moved, 1);
    let status = app
        .client
        .reveal(pb::RevealRequest {
            token: victim.clone(),
        })
        .await
        .expect_err("tampered");
    assert_eq!(status.code(), Code::Internal);
    let request_id = status
        .get_details_request_info()
        .expect("RequestInfo detail")
        .request_id;
    assert!(status.message().contains(&request_id));
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(request_id.as_str())
    );
    // The cause is in the logs under the same request id, not in the status.
    assert!(!status.message().contains("authentication"));
    let logs = String::from_utf8_lossy(&crate::helpers::captured_logs()).into_owned();
    assert!(
        logs.lines()
            .any(|l| l.contains(&request_id) && l.contains("failed to open a card record")),
        "the log names the cause under the request id"
    );
    // The donor is untouched.
    app.client
        .reveal(pb::RevealRequest { token: donor })
        .await
        .expect("donor still opens");
}

async fn nothing_stored_is_lost_when_bad_requests_arrive(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let token = app.tokenize("2223003122003222").await.token;
    for _ in 0..20 {
        let _ = app
            .client
            .tokenize(tokenize_request("2223003122003223"))
            .await;
        let _ = app
            .client
            .reveal(pb::RevealRequest {
                token: "tok_".to_owned(),
            })
            .await;
    }
    let revealed = app
        .client
        .reveal(pb::RevealRequest { token })
        .await
        .expect("still there")
        .into_inner();
    assert_eq!(revealed.number, "2223003122003222");
}

/// With its database unreachable the vault answers UNAVAILABLE (retryable), not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_unavailable() {
    // A port that nothing listens on: bind, note, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let state = Arc::new(AppState::new(Backend::Sqlite).await);
    let mut settings = state.settings("dev");
    settings.database.url = Some(SecretString::from(format!(
        "postgres://postgres@127.0.0.1:{port}/nowhere"
    )));
    settings.database.migrate_on_start = false;
    settings.database.acquire_timeout_ms = 1_000;
    let mut app = spawn_with(state, "dev", settings).await;
    let status = app
        .client
        .tokenize(tokenize_request("4242424242424242"))
        .await
        .expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = app
        .client
        .get_card(pb::GetCardRequest {
            token: "tok_AAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        })
        .await
        .expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable);
    // And readiness says so.
    let ready = http_status(app.admin_addr, "/readyz").await;
    assert_eq!(ready, 503);
}

/// The whole response (status line, headers, body) to a plain-HTTP `GET path` on the admin
/// listener at `addr`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

/// The status code of a plain-HTTP `GET path` (the admin probes).
pub async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_get(addr, path)
        .await
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line")
}

/// Readiness (HTTP `/readyz` and gRPC health) turns on once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_with_a_working_database_becomes_ready() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let app = spawn_app(Backend::Sqlite).await;
    assert_eq!(http_status(app.admin_addr, "/healthz").await, 200);
    let mut health = HealthClient::new(app.channel().await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let serving = health
            .check(HealthCheckRequest {
                service: "cardvault.v1.CardVault".to_owned(),
            })
            .await
            .map(|r| r.into_inner().status() == ServingStatus::Serving)
            .unwrap_or(false);
        if serving && http_status(app.admin_addr, "/readyz").await == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
