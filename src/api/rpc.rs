//! The life of one RPC, shared by every service: request id, authentication, authorization,
//! a span, failure auditing, one log line with the outcome, and the status mapping. Streaming
//! calls ([`run_stream`]) get the same, once per stream.

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
    let call = Call::new(action);
    let result = async {
        let auth = call.authorize(vault, action, credentials).await?;
        match body(auth.clone()).await {
            Err(err) => Err(record_unaudited(vault, &auth, err).await),
            other => other,
        }
    }
    .instrument(call.span.clone())
    .await;
    call.respond(result)
}

/// Runs a streaming call: authentication and authorization once, for the whole stream, as
/// [`run`] does for one call; then `body` starts the response stream, handing the
/// [`StreamScope`] to whatever produces it, so the stream's end is logged, audited and
/// turned into a status the way [`run`] ends a call.
pub async fn run_stream<T, F>(
    vault: &Arc<Vault>,
    action: Action,
    credentials: RequestCredentials,
    body: F,
) -> Result<Response<T>, Status>
where
    F: FnOnce(StreamScope) -> T,
{
    let call = Call::new(action);
    let authorized = call
        .authorize(vault, action, credentials)
        .instrument(call.span.clone())
        .await;
    match authorized {
        Ok(auth) => {
            let scope = StreamScope {
                vault: vault.clone(),
                auth,
                request_id: call.request_id.clone(),
                span: call.span.clone(),
                started: call.started,
            };
            let stream = body(scope);
            let mut response = Response::new(stream);
            if let Some(id) = call.id_header() {
                response.metadata_mut().insert("x-request-id", id);
            }
            Ok(response)
        }
        Err(err) => call.respond(Err(err)),
    }
}

/// Why a stream ended early.
#[derive(Debug)]
pub enum StreamError {
    /// The vault refused or failed, or a message was malformed: as for a unary call.
    Api(ApiError),
    /// The transport ended it: the caller cancelled, or sent a message the server could not
    /// decode (e.g. larger than `grpc.max_message_bytes`). Passed on as it is.
    Transport(Status),
}

impl From<ApiError> for StreamError {
    fn from(err: ApiError) -> Self {
        StreamError::Api(err)
    }
}

/// An authorized stream in progress: the caller's authorization, the call's span, and what
/// is needed to end the stream as [`run`] ends a call.
#[derive(Debug)]
pub struct StreamScope {
    vault: Arc<Vault>,
    auth: Authorized,
    request_id: RequestId,
    span: tracing::Span,
    started: Instant,
}

impl StreamScope {
    /// The caller's authorization, checked once for the whole stream.
    pub fn auth(&self) -> &Authorized {
        &self.auth
    }

    /// The call's span (request id, tenant, principal); work spawned for the stream runs in
    /// it, so its log lines carry the request id.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Ends the stream after `messages` answered messages: records a failure the vault did
    /// not record, writes the call's one log line, and returns the status that must end the
    /// response stream, if any.
    pub async fn end(self, result: Result<(), StreamError>, messages: u64) -> Option<Status> {
        let StreamScope {
            vault,
            auth,
            request_id,
            span,
            started,
        } = self;
        let status = match result {
            Ok(()) => None,
            Err(StreamError::Api(err)) => {
                let err = record_unaudited(&vault, &auth, err)
                    .instrument(span.clone())
                    .await;
                let _entered = span.enter();
                Some(err.into_status(&request_id))
            }
            Err(StreamError::Transport(status)) => Some(status),
        };
        let _entered = span.enter();
        let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match &status {
            None => tracing::info!(code = "OK", elapsed_us, messages, "request"),
            Some(status) => tracing::info!(code = ?status.code(), elapsed_us, messages, "request"),
        }
        status.map(|mut status| {
            if let Ok(id) = MetadataValue::try_from(request_id.as_str()) {
                status.metadata_mut().insert("x-request-id", id);
            }
            status
        })
    }
}

/// One call's request id, span and clock.
struct Call {
    request_id: RequestId,
    span: tracing::Span,
    started: Instant,
}

impl Call {
    fn new(action: Action) -> Call {
        let request_id = RequestId::generate();
        let span = tracing::info_span!(
            "rpc",
            rpc = action.as_str(),
            request_id = %request_id,
            tenant = tracing::field::Empty,
            principal = tracing::field::Empty,
        );
        Call {
            request_id,
            span,
            started: Instant::now(),
        }
    }

    /// Authenticates the caller and authorizes `action`; run inside the call's span.
    async fn authorize(
        &self,
        vault: &Vault,
        action: Action,
        credentials: RequestCredentials,
    ) -> Result<Authorized, ApiError> {
        let caller = vault
            .authenticate(credentials.as_credentials(), Some(self.request_id.as_str()))
            .await?;
        drop(credentials);
        let span = tracing::Span::current();
        span.record("tenant", caller.tenant().as_str());
        span.record("principal", caller.principal.id.as_str());
        Ok(vault.authorize(caller, action).await?)
    }

    fn id_header(&self) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        MetadataValue::try_from(self.request_id.as_str()).ok()
    }

    /// The call's one log line, and the response or status.
    fn respond<T>(self, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
        let _entered = self.span.enter();
        let elapsed_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let id_header = self.id_header();
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
                let mut status = err.into_status(&self.request_id);
                tracing::info!(code = ?status.code(), elapsed_us, "request");
                if let Some(id) = id_header {
                    status.metadata_mut().insert("x-request-id", id);
                }
                Err(status)
            }
        }
    }
}

/// Records a failure of an authorized request unless the vault already did; returns it.
async fn record_unaudited(vault: &Vault, auth: &Authorized, err: ApiError) -> ApiError {
    if !err.is_audited() {
        vault.record_failure(auth, err.outcome()).await;
    }
    err
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
