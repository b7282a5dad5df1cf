//! The life of one RPC, shared by every service: request id, authentication, authorization,
//! a span, failure auditing, one log line with the outcome, and the status mapping.

use std::{future::Future, sync::Arc, time::Instant};

use tonic::{Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use super::{
    auth::RequestCredentials,
    error::{ApiError, RequestId},
};
use crate::{
    audit::{Action, Outcome},
    vault::{Authorized, Vault},
};

/// Runs `body` for an authenticated caller authorized for `action`. Request messages are
/// never logged; failures the vault did not record itself are recorded here.
pub async fn run<T, F, Fut>(
    vault: &Arc<Vault>,
    action: Action,
    credentials: RequestCredentials,
    body: F,
) -> Result<Response<T>, Status>
where
    F: FnOnce(Authorized) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let request_id = RequestId::generate();
    let rpc = action.as_str();
    let span = tracing::info_span!(
        "rpc",
        rpc,
        request_id = %request_id,
        tenant = tracing::field::Empty,
        principal = tracing::field::Empty,
    );
    let started = Instant::now();
    let result = async {
        let caller = vault
            .authenticate(credentials.as_credentials(), Some(request_id.as_str()))
            .await?;
        drop(credentials);
        let span = tracing::Span::current();
        span.record("tenant", caller.tenant().as_str());
        span.record("principal", caller.principal.id.as_str());
        let auth = vault.authorize(caller, action).await?;
        match body(auth.clone()).await {
            Err(err) if !err.is_audited() => {
                vault.record_failure(&auth, err.outcome()).await;
                Err(err)
            }
            other => other,
        }
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

impl ApiError {
    /// Whether the vault already recorded this failure.
    fn is_audited(&self) -> bool {
        match self {
            ApiError::Invalid(_) => false,
            ApiError::Vault(err) => err.is_audited(),
        }
    }

    /// The audit outcome of a failure the vault did not record.
    fn outcome(&self) -> Outcome {
        match self {
            ApiError::Invalid(_) => Outcome::InvalidArgument,
            _ => Outcome::Error,
        }
    }
}
