//! `reuse_existing`: one token per card when asked, even under concurrency.

use std::sync::Arc;

use cardvault::pb::v1 as pb;

use crate::{
    helpers::{AppState, Backend, spaced, spawn_app, spawn_with, tokenize_request, unique_pan},
    on_both_backends,
};

on_both_backends!(
    reuse_existing_returns_the_same_token_for_the_same_card,
    concurrent_reuse_requests_store_one_card,
);

async fn reuse_existing_returns_the_same_token_for_the_same_card(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let pan = unique_pan();
    let reuse = |number: &str| {
        let mut r = tokenize_request(number);
        r.reuse_existing = true;
        r
    };
    let first = app
        .client
        .tokenize(reuse(&pan))
        .await
        .expect("first")
        .into_inner();
    assert!(first.created);
    // Same card, formatted differently: same token.
    let spaced = spaced(&pan);
    let second = app
        .client
        .tokenize(reuse(&spaced))
        .await
        .expect("second")
        .into_inner();
    assert_eq!(second.token, first.token);
    assert!(!second.created);

    // Without reuse_existing a second copy is stored.
    let copy = app.tokenize(&pan).await;
    assert_ne!(copy.token, first.token);
    assert!(copy.created);

    // A new expiry or another token format is another token.
    let mut renewed = reuse(&pan);
    renewed.card.as_mut().expect("card").exp_year = 2031;
    let renewed = app
        .client
        .tokenize(renewed)
        .await
        .expect("renewed")
        .into_inner();
    assert_ne!(renewed.token, first.token);
    let mut shaped = reuse(&pan);
    shaped.token_format = pb::TokenFormat::PanShaped.into();
    let shaped = app
        .client
        .tokenize(shaped)
        .await
        .expect("shaped")
        .into_inner();
    assert_ne!(shaped.token, first.token);

    // Once deleted, reuse stores the card anew.
    app.client
        .delete_card(pb::DeleteCardRequest {
            token: first.token.clone(),
        })
        .await
        .expect("delete");
    app.client
        .delete_card(pb::DeleteCardRequest { token: copy.token })
        .await
        .expect("delete");
    let fresh = app
        .client
        .tokenize(reuse(&pan))
        .await
        .expect("fresh")
        .into_inner();
    assert!(fresh.created);
    assert_ne!(fresh.token, first.token);
}

async fn concurrent_reuse_requests_store_one_card(backend: Backend) {
    // Each `reuse_existing` request in flight holds one of its principal's guess-budget
    // tokens for the card's BIN and last 4 (10 an hour by default) until it is answered;
    // this test is about dedup under concurrency, so the budget is out of its way.
    let state = Arc::new(AppState::new(backend).await);
    let mut settings = state.settings("dev");
    settings.limits.reuse_misses_per_hour = 100;
    let app = spawn_with(state, "dev", settings).await;
    let pan = unique_pan();
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut client = app.client.clone();
        let mut request = tokenize_request(&pan);
        request.reuse_existing = true;
        calls.push(tokio::spawn(async move {
            client.tokenize(request).await.map(|r| r.into_inner())
        }));
    }
    let mut tokens = Vec::new();
    let mut created = 0;
    for call in calls {
        let response = call.await.expect("task").expect("tokenize");
        created += usize::from(response.created);
        tokens.push(response.token);
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "one token for one card: {tokens:?}");
    assert_eq!(created, 1, "exactly one call stored the card");
}
