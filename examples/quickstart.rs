//! Tokenizes a test card, reads its masked metadata, reveals it and deletes it, against a
//! vault started with `cargo run --release -- serve --dev`.
//!
//! ```sh
//! cargo run --example quickstart            # talks to http://127.0.0.1:50051
//! cargo run --example quickstart -- http://127.0.0.1:6000
//! ```

use cardvault::pb::v1::{
    CardInput, DeleteCardRequest, GetCardRequest, RevealRequest, TokenizeRequest,
    card_vault_client::CardVaultClient,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let mut vault = CardVaultClient::connect(addr).await?;

    // A public test card number (Visa); never put a real card into a dev vault.
    let tokenized = vault
        .tokenize(TokenizeRequest {
            card: Some(CardInput {
                number: "4242 4242 4242 4242".to_owned(),
                exp_month: 12,
                exp_year: 2030,
                cardholder_name: "Ada Lovelace".to_owned(),
            }),
            metadata: [("order_id".to_owned(), "A-1001".to_owned())].into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("token:       {}", tokenized.token);

    let card = vault
        .get_card(GetCardRequest {
            token: tokenized.token.clone(),
        })
        .await?
        .into_inner()
        .card
        .ok_or("GetCard returned no card")?;
    println!(
        "metadata:    {:?} {}…{} exp {:02}/{} fingerprint {}",
        card.brand(),
        card.bin,
        card.last4,
        card.exp_month,
        card.exp_year,
        card.fingerprint
    );

    let revealed = vault
        .reveal(RevealRequest {
            token: tokenized.token.clone(),
        })
        .await?
        .into_inner();
    println!(
        "revealed:    {} ({})",
        revealed.number, revealed.cardholder_name
    );

    vault
        .delete_card(DeleteCardRequest {
            token: tokenized.token.clone(),
        })
        .await?;
    let gone = vault
        .get_card(GetCardRequest {
            token: tokenized.token,
        })
        .await
        .expect_err("a deleted token no longer resolves");
    println!("after delete: {:?}", gone.code());
    Ok(())
}
