//! Tokenize → get → reveal → delete, restart, tenants.

use cardvault::pb::v1 as pb;
use tonic::Code;

use crate::{
    helpers::{Backend, spawn_app, spawn_on, tokenize_request},
    on_both_backends,
};

on_both_backends!(
    a_card_is_tokenized_read_revealed_and_deleted,
    a_restarted_vault_still_reveals_its_cards,
    pan_shaped_tokens_keep_length_and_last4,
    another_tenants_token_is_indistinguishable_from_a_missing_one,
);

async fn a_card_is_tokenized_read_revealed_and_deleted(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let mut request = tokenize_request("4242 4242-4242 4242");
    request
        .metadata
        .insert("order_id".to_owned(), "A-1001".to_owned());
    let created = app
        .client
        .tokenize(request)
        .await
        .expect("tokenize")
        .into_inner();
    assert!(created.token.starts_with("tok_"), "{}", created.token);
    assert!(created.created);
    let card = created.card.expect("card");
    assert_eq!(card.brand(), pb::CardBrand::Visa);
    assert_eq!(
        (card.last4.as_str(), card.bin.as_str()),
        ("4242", "42424242")
    );
    assert_eq!((card.exp_month, card.exp_year), (12, 2030));
    assert_eq!(card.fingerprint.len(), 64);
    assert_eq!(
        card.metadata.get("order_id").map(String::as_str),
        Some("A-1001")
    );

    let token = created.token.clone();
    let got = app
        .client
        .get_card(pb::GetCardRequest {
            token: token.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .card
        .expect("card");
    assert_eq!(got, card, "get returns what tokenize returned");

    let revealed = app
        .client
        .reveal(pb::RevealRequest {
            token: token.clone(),
        })
        .await
        .expect("reveal")
        .into_inner();
    assert_eq!(revealed.number, "4242424242424242");
    assert_eq!(revealed.cardholder_name, "Ada Lovelace");
    assert_eq!((revealed.exp_month, revealed.exp_year), (12, 2030));

    app.client
        .delete_card(pb::DeleteCardRequest {
            token: token.clone(),
        })
        .await
        .expect("delete");
    for status in [
        app.client
            .get_card(pb::GetCardRequest {
                token: token.clone(),
            })
            .await
            .expect_err("deleted"),
        app.client
            .reveal(pb::RevealRequest {
                token: token.clone(),
            })
            .await
            .expect_err("deleted"),
        app.client
            .delete_card(pb::DeleteCardRequest { token })
            .await
            .expect_err("deleted"),
    ] {
        assert_eq!(status.code(), Code::NotFound);
    }
}

async fn a_restarted_vault_still_reveals_its_cards(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let token = app.tokenize("5555555555554444").await.token;
    let mut app = app.restart().await;
    let revealed = app
        .client
        .reveal(pb::RevealRequest { token })
        .await
        .expect("reveal after restart")
        .into_inner();
    assert_eq!(revealed.number, "5555555555554444");
}

async fn pan_shaped_tokens_keep_length_and_last4(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let mut request = tokenize_request("378282246310005");
    request.token_format = pb::TokenFormat::PanShaped.into();
    let created = app
        .client
        .tokenize(request)
        .await
        .expect("tokenize")
        .into_inner();
    assert_eq!(created.token.len(), 15);
    assert!(created.token.ends_with("0005"));
    assert!(created.token.bytes().all(|b| b.is_ascii_digit()));
    assert_ne!(created.token, "378282246310005");
    let card = created.card.expect("card");
    assert_eq!(card.token_format(), pb::TokenFormat::PanShaped);
    assert_eq!(card.brand(), pb::CardBrand::Amex);
    let revealed = app
        .client
        .reveal(pb::RevealRequest {
            token: created.token,
        })
        .await
        .expect("reveal")
        .into_inner();
    assert_eq!(revealed.number, "378282246310005");
}

async fn another_tenants_token_is_indistinguishable_from_a_missing_one(backend: Backend) {
    let mut acme = spawn_app(backend).await;
    let mut globex = spawn_on(acme.state.clone(), "globex").await;
    let token = acme.tokenize("4000056655665556").await.token;
    let missing = "tok_0000000000000000000000".to_owned();

    let foreign = globex
        .client
        .reveal(pb::RevealRequest {
            token: token.clone(),
        })
        .await
        .expect_err("other tenant");
    let absent = globex
        .client
        .reveal(pb::RevealRequest { token: missing })
        .await
        .expect_err("missing");
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(
        (foreign.code(), foreign.message()),
        (absent.code(), absent.message())
    );
    assert_eq!(foreign.details(), absent.details());

    let status = globex
        .client
        .get_card(pb::GetCardRequest {
            token: token.clone(),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(status.code(), Code::NotFound);
    let status = globex
        .client
        .delete_card(pb::DeleteCardRequest {
            token: token.clone(),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(status.code(), Code::NotFound);

    // The same PAN in the other tenant has an unrelated fingerprint.
    let a = acme.tokenize("4000056655665556").await.card.expect("card");
    let b = globex
        .tokenize("4000056655665556")
        .await
        .card
        .expect("card");
    assert_ne!(a.fingerprint, b.fingerprint);

    // And the owner still has it.
    acme.client
        .reveal(pb::RevealRequest { token })
        .await
        .expect("owner reveals");
}
