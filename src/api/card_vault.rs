//! `cardvault.v1.CardVault`.

use std::{future::Future, sync::Arc, time::Instant};

use time::OffsetDateTime;
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use super::{
    Authenticator, convert,
    error::{ApiError, RequestId},
};
use crate::{
    pb::v1::{self as pb, card_vault_server::CardVault},
    vault::{Caller, Vault},
};

/// The checkout-facing service.
#[derive(Debug, Clone)]
pub struct CardVaultService {
    vault: Arc<Vault>,
    auth: Authenticator,
}

impl CardVaultService {
    /// A service over a vault.
    pub fn new(vault: Arc<Vault>, auth: Authenticator) -> Self {
        Self { vault, auth }
    }

    /// Runs one RPC: request id, caller, span, status mapping and one log line with the
    /// outcome. Request messages are never logged.
    async fn handle<T, F, Fut>(
        &self,
        rpc: &'static str,
        metadata: &tonic::metadata::MetadataMap,
        body: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Caller) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let request_id = RequestId::generate();
        let span = tracing::info_span!("rpc", rpc, request_id = %request_id, tenant = tracing::field::Empty);
        let started = Instant::now();
        let result = async {
            let caller = self.auth.caller(metadata).map_err(ApiError::Status)?;
            tracing::Span::current().record("tenant", caller.tenant.as_str());
            body(caller).await
        }
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
        let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let id_header = MetadataValue::try_from(request_id.as_str()).ok();
        match result {
            Ok(message) => {
                tracing::info!(code = "OK", elapsed_us, "request");
                let mut response = Response::new(message);
                if let Some(id) = id_header {
                    response.metadata_mut().insert("x-request-id", id);
                }
                Ok(response)
            }
            Err(err) => {
                let mut status = err.into_status(&request_id);
                tracing::info!(code = ?status.code(), elapsed_us, "request");
                if let Some(id) = id_header {
                    status.metadata_mut().insert("x-request-id", id);
                }
                Err(status)
            }
        }
    }
}

#[tonic::async_trait]
impl CardVault for CardVaultService {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.handle("Tokenize", &metadata, |caller| async move {
            let command = convert::tokenize_command(message, OffsetDateTime::now_utc())
                .map_err(ApiError::Invalid)?;
            let tokenized = self.vault.tokenize(&caller, command).await?;
            Ok(pb::TokenizeResponse {
                token: tokenized.card.token.as_str().to_owned(),
                created: tokenized.created,
                card: Some(convert::card(tokenized.card)),
            })
        })
        .await
    }

    async fn get_card(
        &self,
        request: Request<pb::GetCardRequest>,
    ) -> Result<Response<pb::GetCardResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.handle("GetCard", &metadata, |caller| async move {
            let token = convert::token(&message.token).map_err(ApiError::Invalid)?;
            let view = self.vault.get_card(&caller, &token).await?;
            Ok(pb::GetCardResponse {
                card: Some(convert::card(view)),
            })
        })
        .await
    }

    async fn reveal(
        &self,
        request: Request<pb::RevealRequest>,
    ) -> Result<Response<pb::RevealResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.handle("Reveal", &metadata, |caller| async move {
            let token = convert::token(&message.token).map_err(ApiError::Invalid)?;
            let revealed = self.vault.reveal(&caller, &token).await?;
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
        })
        .await
    }

    async fn delete_card(
        &self,
        request: Request<pb::DeleteCardRequest>,
    ) -> Result<Response<pb::DeleteCardResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        self.handle("DeleteCard", &metadata, |caller| async move {
            let token = convert::token(&message.token).map_err(ApiError::Invalid)?;
            self.vault.delete(&caller, &token).await?;
            Ok(pb::DeleteCardResponse {})
        })
        .await
    }
}
