//! `cardvault.v1.CardVault`.

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use time::OffsetDateTime;
use tokio::{
    sync::mpsc,
    task::{JoinError, JoinHandle},
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{
    auth::RequestCredentials,
    convert, deadline,
    error::ApiError,
    rpc::{self, StreamError, StreamScope},
};
use crate::{
    audit::Action,
    card::{Cvc, FieldViolation},
    gateway::OperationKind,
    pb::v1::{self as pb, card_vault_server::CardVault},
    vault::{Authorized, ChargeState, ImportChunk, MAX_IMPORT_CHUNK, Vault, VaultError, action_of},
};

/// Chunks of one import stream in progress at once. While one chunk's transaction commits,
/// the next ones are being parsed and sealed, so neither the vault's CPU nor the database
/// waits for the other; more would only hold more database connections per stream.
const IMPORT_CHUNKS_IN_FLIGHT: usize = 4;

/// The message of a charge answered before its outcome was known.
const PENDING_MESSAGE: &str = "the gateway has not answered within the request's deadline; the \
                               charge is being settled — retry with the same idempotency key or \
                               reconcile";

/// Most charges one ReconcileCharges call settles.
const MAX_RECONCILE: u32 = 100;

type ImportStream = Pin<Box<dyn Stream<Item = Result<pb::ImportCardsResponse, Status>> + Send>>;

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

    /// CaptureCharge, RefundCharge and CancelCharge: one call shape, `(charge id,
    /// idempotency key, amount)`.
    async fn operate(
        &self,
        credentials: RequestCredentials,
        kind: OperationKind,
        (charge_id, idempotency_key, amount): (String, String, u64),
    ) -> Result<Response<pb::ChargeOperationResponse>, Status> {
        rpc::run(
            &self.vault,
            action_of(kind),
            credentials,
            |auth| async move {
                let command =
                    convert::operation_command(kind, &charge_id, &idempotency_key, amount)
                        .map_err(ApiError::Invalid)?;
                // Once the operation is on record as sending, it runs to its settlement even
                // if the caller goes away (a deadline, a dropped connection): a call cut short
                // would leave it pending until its send lease lapsed.
                let vault = self.vault.clone();
                let operated = tokio::spawn(
                    async move { vault.operate_charge(&auth, command).await }.in_current_span(),
                )
                .await
                .map_err(|e| VaultError::internal("a charge operation task failed", e))??;
                Ok(convert::operation_response(operated))
            },
        )
        .await
    }
}

#[tonic::async_trait]
impl CardVault for CardVaultService {
    type ImportCardsStream = ImportStream;

    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        // The gateway work must not die with the call: it runs in a task of its own, and the
        // call answers by its deadline with whatever is known then.
        let answer_by = tokio::time::Instant::now()
            + deadline::budget(request.metadata(), self.vault.request_timeout());
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::Charge,
            credentials,
            |auth| async move {
                let command = convert::charge_command(message, &self.vault.gateway_names())
                    .map_err(ApiError::Invalid)?;
                let token = command.token.clone();
                let key = command.idempotency_key.clone();
                let work = tokio::spawn({
                    let vault = self.vault.clone();
                    let auth = auth.clone();
                    async move { vault.charge(&auth, command, Some(answer_by)).await }
                        .instrument(tracing::Span::current())
                });
                let charged = match tokio::time::timeout_at(answer_by, work).await {
                    Ok(Ok(charged)) => charged?,
                    Ok(Err(failed)) => {
                        return Err(VaultError::internal("a charge task failed", failed).into());
                    }
                    Err(_) => self.vault.charge_in_progress(&auth, &token, &key).await?,
                };
                let charge = charged.charge;
                let message = if charge.status == ChargeState::Pending {
                    tracing::warn!(
                        charge = %charge.id,
                        "the gateway has not answered within the request's deadline; the \
                         charge is being settled in the background"
                    );
                    PENDING_MESSAGE.to_owned()
                } else {
                    charge.message.unwrap_or_default()
                };
                Ok(pb::ChargeResponse {
                    status: convert::charge_status(charge.status).into(),
                    charge_id: charge.id,
                    gateway_payment_id: charge.gateway_payment_id.unwrap_or_default(),
                    decline_code: charge.decline_code.unwrap_or_default(),
                    message,
                    card: Some(convert::card(charged.card)),
                    created: charged.created,
                    action: charge.action.map(convert::charge_action),
                })
            },
        )
        .await
    }

    async fn hold_cvc(
        &self,
        request: Request<pb::HoldCvcRequest>,
    ) -> Result<Response<pb::HoldCvcResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::HoldCvc,
            credentials,
            |auth| async move {
                let token = convert::token(&message.token);
                let cvc = match Cvc::parse(&message.cvc) {
                    Ok(Some(cvc)) => Ok(cvc),
                    Ok(None) => Err(FieldViolation::new("cvc", &"cvc is required")),
                    Err(e) => Err(FieldViolation::new("cvc", &e)),
                };
                let (token, cvc) = match (token, cvc) {
                    (Ok(token), Ok(cvc)) => (token, cvc),
                    (token, cvc) => {
                        let mut violations = token.err().unwrap_or_default();
                        violations.extend(cvc.err());
                        return Err(ApiError::Invalid(violations));
                    }
                };
                let expires_at = self.vault.hold_cvc(&auth, &token, &cvc).await?;
                Ok(pb::HoldCvcResponse {
                    expires_at: Some(convert::to_timestamp(expires_at)),
                })
            },
        )
        .await
    }

    async fn reconcile_charges(
        &self,
        request: Request<pb::ReconcileChargesRequest>,
    ) -> Result<Response<pb::ReconcileChargesResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::ReconcileCharges,
            credentials,
            |auth| async move {
                let limit = match message.limit {
                    0 => MAX_RECONCILE,
                    n => n.min(MAX_RECONCILE),
                };
                let charges = self.vault.reconcile_charges(&auth, limit).await?;
                Ok(pb::ReconcileChargesResponse {
                    charges: charges
                        .into_iter()
                        .map(|charge| pb::ReconciledCharge {
                            status: convert::charge_status(charge.status).into(),
                            charge_id: charge.id,
                            idempotency_key: charge.idempotency_key,
                            gateway_payment_id: charge.gateway_payment_id.unwrap_or_default(),
                            message: charge.message.unwrap_or_default(),
                        })
                        .collect(),
                })
            },
        )
        .await
    }

    async fn capture_charge(
        &self,
        request: Request<pb::CaptureChargeRequest>,
    ) -> Result<Response<pb::ChargeOperationResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let m = request.into_inner();
        self.operate(
            credentials,
            OperationKind::Capture,
            (m.charge_id, m.idempotency_key, m.amount),
        )
        .await
    }

    async fn refund_charge(
        &self,
        request: Request<pb::RefundChargeRequest>,
    ) -> Result<Response<pb::ChargeOperationResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let m = request.into_inner();
        self.operate(
            credentials,
            OperationKind::Refund,
            (m.charge_id, m.idempotency_key, m.amount),
        )
        .await
    }

    async fn cancel_charge(
        &self,
        request: Request<pb::CancelChargeRequest>,
    ) -> Result<Response<pb::ChargeOperationResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let m = request.into_inner();
        self.operate(
            credentials,
            OperationKind::Cancel,
            (m.charge_id, m.idempotency_key, 0),
        )
        .await
    }

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

    async fn import_cards(
        &self,
        request: Request<Streaming<pb::ImportCardsRequest>>,
    ) -> Result<Response<Self::ImportCardsStream>, Status> {
        let credentials = RequestCredentials::of(&request);
        let requests = request.into_inner();
        let vault = self.vault.clone();
        rpc::run_stream(&self.vault, Action::ImportCards, credentials, |scope| {
            // Room for every chunk in flight: a caller that reads responses slowly stops the
            // vault reading its requests, and HTTP/2 flow control pushes back from there.
            let (responses, stream) = mpsc::channel(IMPORT_CHUNKS_IN_FLIGHT);
            tokio::spawn(async move {
                let mut scope = scope;
                let (result, answered) = import(&vault, &mut scope, requests, &responses).await;
                if let Some(status) = scope.end(result, answered).await {
                    // Nobody to tell if the caller is gone.
                    let _ = responses.send(Err(status)).await;
                }
            });
            Box::pin(ReceiverStream::new(stream)) as ImportStream
        })
        .await
    }
}

/// Reads an import stream and answers it chunk by chunk, in order, with up to
/// [`IMPORT_CHUNKS_IN_FLIGHT`] chunks processed at once. Returns how the stream ended and how
/// many chunks were answered. A chunk is answered only after its transaction committed; when
/// the stream fails, chunks still in flight go unanswered (each commits whole or not at all,
/// and a caller resending them gets `ALREADY_IMPORTED` for those that did). Each chunk is
/// taken only while the caller's credentials hold: they are checked again once the last
/// check is older than the credential cache time.
async fn import(
    vault: &Arc<Vault>,
    scope: &mut StreamScope,
    mut requests: Streaming<pb::ImportCardsRequest>,
    responses: &mpsc::Sender<Result<pb::ImportCardsResponse, Status>>,
) -> (Result<(), StreamError>, u64) {
    let mut in_flight: VecDeque<JoinHandle<Result<pb::ImportCardsResponse, ApiError>>> =
        VecDeque::with_capacity(IMPORT_CHUNKS_IN_FLIGHT);
    let mut received = 0u64;
    let mut answered = 0u64;
    let mut reading = true;
    let result = loop {
        tokio::select! {
            // Answer finished chunks before taking more: answers go out as early as they can,
            // and the chunks held in memory stay bounded.
            biased;
            done = oldest(&mut in_flight), if !in_flight.is_empty() => {
                in_flight.pop_front();
                let response = match done {
                    Ok(Ok(response)) => response,
                    Ok(Err(err)) => break Err(err.into()),
                    Err(panicked) => break Err(chunk_task_failed(panicked).into()),
                };
                if responses.send(Ok(response)).await.is_err() {
                    let gone = Status::cancelled("the caller went away");
                    break Err(StreamError::Transport(gone));
                }
                answered += 1;
            }
            message = requests.next(), if reading && in_flight.len() < IMPORT_CHUNKS_IN_FLIGHT => {
                match message {
                    Some(Ok(request)) => {
                        let auth = match scope.recheck().await {
                            Ok(auth) => auth.clone(),
                            Err(err) => break Err(err.into()),
                        };
                        received += 1;
                        let chunk = import_chunk(vault.clone(), auth, received, request)
                            .instrument(scope.span().clone());
                        in_flight.push_back(tokio::spawn(chunk));
                    }
                    None => reading = false,
                    Some(Err(status)) => break Err(StreamError::Transport(status)),
                }
            }
            else => break Ok(()),
        }
    };
    // Chunks still in flight finish on their own, unanswered: aborting one mid-statement
    // would gain little and leave its connection for the pool to clean up.
    drop(in_flight);
    (result, answered)
}

/// The oldest chunk in flight, once it is done.
async fn oldest<T>(in_flight: &mut VecDeque<JoinHandle<T>>) -> Result<T, JoinError> {
    match in_flight.front_mut() {
        Some(chunk) => chunk.await,
        None => std::future::pending().await,
    }
}

fn chunk_task_failed(err: JoinError) -> ApiError {
    ApiError::Vault(VaultError::internal("an import chunk task failed", err))
}

/// Parses, stores and answers one chunk.
async fn import_chunk(
    vault: Arc<Vault>,
    auth: Authorized,
    seq: u64,
    request: pb::ImportCardsRequest,
) -> Result<pb::ImportCardsResponse, ApiError> {
    if request.cards.len() > MAX_IMPORT_CHUNK {
        return Err(ApiError::Invalid(vec![FieldViolation {
            field: "cards",
            description: format!("at most {MAX_IMPORT_CHUNK} cards per message"),
        }]));
    }
    let today = OffsetDateTime::now_utc().date();
    // Parsing a full chunk (Luhn, metadata scans) is CPU work for the blocking pool, as the
    // vault's sealing is.
    let (echoes, entries) =
        tokio::task::spawn_blocking(move || convert::import_entries(request.cards, today))
            .await
            .map_err(chunk_task_failed)?;
    let outcomes = vault
        .import_cards(&auth, ImportChunk { seq, entries })
        .await?;
    Ok(convert::import_response(echoes, outcomes))
}
