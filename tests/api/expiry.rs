//! Token lifetimes: expired tokens read as NOT_FOUND at once; the sweeper reclaims rows.

use std::time::Duration;

use cardvault::pb::v1 as pb;
use tonic::Code;

use crate::{
    helpers::{AppState, Backend, spawn_with, tokenize_request},
    on_both_backends,
};

on_both_backends!(an_expired_token_is_not_found_and_then_swept);

const TTL_SECS: i64 = 2;

async fn an_expired_token_is_not_found_and_then_swept(backend: Backend) {
    let state = std::sync::Arc::new(AppState::new(backend).await);
    let mut settings = state.settings("dev");
    settings.tokens.sweep_interval_secs = 1;
    settings.tokens.sweep_batch = 2;
    let mut app = spawn_with(state.clone(), "dev", settings).await;

    let keeper = app.tokenize("4242424242424242").await.token;
    let mut short_lived = Vec::new();
    for _ in 0..5 {
        let mut request = tokenize_request("5555555555554444");
        request.expiration = Some(pb::tokenize_request::Expiration::Ttl(
            prost_types::Duration {
                seconds: TTL_SECS,
                nanos: 0,
            },
        ));
        let response = app
            .client
            .tokenize(request)
            .await
            .expect("tokenize")
            .into_inner();
        assert!(response.card.expect("card").expires_at.is_some());
        // Read each one back at once, well inside its lifetime even on a loaded machine.
        app.client
            .get_card(pb::GetCardRequest {
                token: response.token.clone(),
            })
            .await
            .expect("alive before its ttl");
        short_lived.push(response.token);
    }

    tokio::time::sleep(Duration::from_millis(TTL_SECS.unsigned_abs() * 1_000 + 200)).await;
    for token in &short_lived {
        let status = app
            .client
            .reveal(pb::RevealRequest {
                token: token.clone(),
            })
            .await
            .expect_err("expired");
        assert_eq!(status.code(), Code::NotFound);
    }

    // The sweeper deletes the 5 expired rows, 2 per statement, and keeps the live one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state.count("SELECT COUNT(*) FROM cards").await != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "expired rows were not swept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.client
        .reveal(pb::RevealRequest { token: keeper })
        .await
        .expect("the live card is kept");
}
