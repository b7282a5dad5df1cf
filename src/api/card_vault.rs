//! `cardvault.v1.CardVault`.

use std::sync::Arc;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{auth::RequestCredentials, convert, error::ApiError, rpc};
use crate::{
    audit::Action,
    pb::v1::{self as pb, card_vault_server::CardVault},
    vault::Vault,
};

/// The checkout-facing service.
#[derive(Debug, Clone)]
pub struct CardVaultService {
    vault: Arc<Vault>,
}

impl CardVaultService {
    /// A service over a vault.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

#[tonic::async_trait]
impl CardVault for CardVaultService {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::Tokenize,
            credentials,
            |auth| async move {
                let command = convert::tokenize_command(message, OffsetDateTime::now_utc())
                    .map_err(ApiError::Invalid)?;
                let tokenized = self.vault.tokenize(&auth, command).await?;
                Ok(pb::TokenizeResponse {
                    token: tokenized.card.token.as_str().to_owned(),
                    created: tokenized.created,
                    card: Some(convert::card(tokenized.card)),
                })
            },
        )
        .await
    }

    async fn get_card(
        &self,
        request: Request<pb::GetCardRequest>,
    ) -> Result<Response<pb::GetCardResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::GetCard,
            credentials,
            |auth| async move {
                let token = convert::token(&message.token).map_err(ApiError::Invalid)?;
                let view = self.vault.get_card(&auth, &token).await?;
                Ok(pb::GetCardResponse {
                    card: Some(convert::card(view)),
                })
            },
        )
        .await
    }

    async fn reveal(
        &self,
        request: Request<pb::RevealRequest>,
    ) -> Result<Response<pb::RevealResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::Reveal,
            credentials,
            |auth| async move {
                let token = convert::token(&message.token).map_err(ApiError::Invalid)?;
                let revealed = self.vault.reveal(&auth, &token).await?;
                // Returning the PAN is this RPC's purpose; prost needs owned Strings, which the
                // vault cannot zeroize once handed to the transport.
                Ok(pb::RevealResponse {
                    number: revealed.pan.expose_digits().to_owned(),
                    exp_month: u32::from(revealed.card.exp_month),
                    exp_year: u32::from(revealed.card.exp_year),
                    cardholder_name: revealed
                        .holder
                        .as_ref()
                        .map(|h| h.expose().to_owned())
                        .unwrap_or_default(),
                    card: Some(convert::card(revealed.card)),
                })
            },
        )
        .await
    }

    async fn delete_card(
        &self,
        request: Request<pb::DeleteCardRequest>,
    ) -> Result<Response<pb::DeleteCardResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::DeleteCard,
            credentials,
            |auth| async move {
                let token = convert::token(&message.token).map_err(ApiError::Invalid)?;
                self.vault.delete(&auth, &token).await?;
                Ok(pb::DeleteCardResponse {})
            },
        )
        .await
    }
}
