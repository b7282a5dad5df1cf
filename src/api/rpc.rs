//! The life of one RPC, shared by every service: request id, authentication, authorization,
//! a span, failure auditing, one log line with the outcome, and the status mapping. Streaming
//! calls ([`run_stream`], [`run_rechecked`]) get the same, and keep the credentials to check
//! them again while the stream runs ([`Recheck`]): a key revoked mid-stream stops it.

use std::{future::Future, sync::Arc, time::Instant};

use tonic::{Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use super::{
    auth::RequestCredentials,
    error::{ApiError, RequestId},
};
use crate::{
    audit::{Action, Outcome},
    vault::{Authorized, Vault, VaultError},
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
    // The credentials (a bearer token among them) are not kept past the check.
    serve(vault, action, credentials, |auth, credentials, _| {
        drop(credentials);
        body(auth)
    })
    .await
}

/// As [`run`], for a call whose response outlives its first check (a server stream produced
/// after `body` returns): `body` gets a [`Recheck`] holding the credentials, to check them
/// again as the stream goes on.
pub async fn run_rechecked<T, F, Fut>(
    vault: &Arc<Vault>,
    action: Action,
    credentials: RequestCredentials,
    body: F,
) -> Result<Response<T>, Status>
where
    F: FnOnce(Recheck) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    serve(vault, action, credentials, |auth, credentials, call| {
        body(Recheck {
            vault: vault.clone(),
            credentials,
            request_id: call.request_id.clone(),
            auth,
            checked: Instant::now(),
        })
    })
    .await
}

/// The life of a unary call: authorize, run `body` (handed the credentials, to drop or to
/// keep), record a failure the vault did not, and respond.
async fn serve<T, F, Fut>(
    vault: &Arc<Vault>,
    action: Action,
    credentials: RequestCredentials,
    body: F,
) -> Result<Response<T>, Status>
where
    F: FnOnce(Authorized, RequestCredentials, &Call) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let call = Call::new(action);
    let result = async {
        let auth = call.authorize(vault, action, &credentials).await?;
        match body(auth.clone(), credentials, &call).await {
            Err(err) => Err(record_unaudited(vault, &auth, err).await),
            other => other,
        }
    }
    .instrument(call.span.clone())
    .await;
    call.respond(result)
}

/// The credentials of a call in progress, to authenticate and authorize it again: a stream
/// outlives one check, and must end once its key is revoked or its principal is.
pub struct Recheck {
    vault: Arc<Vault>,
    credentials: RequestCredentials,
    request_id: RequestId,
    auth: Authorized,
    checked: Instant,
}

impl std::fmt::Debug for Recheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recheck")
            .field("credentials", &self.credentials)
            .field("request_id", &self.request_id)
            .field("checked", &self.checked)
            .finish_non_exhaustive()
    }
}

impl Recheck {
    /// The authorization of the last check.
    pub fn auth(&self) -> &Authorized {
        &self.auth
    }

    /// Checks the credentials again if the last check is older than the vault's credential
    /// cache time, through that cache: a revocation on this replica ends the stream at its
    /// next step after that time, one on another replica within twice that time. A refusal
    /// is recorded by the vault, as for any call.
    pub async fn recheck(&mut self) -> Result<&Authorized, ApiError> {
        if self.checked.elapsed() >= self.vault.credential_cache_ttl() {
            let caller = self
                .vault
                .authenticate(
                    self.credentials.as_credentials(),
                    Some(self.request_id.as_str()),
                )
                .await?;
            self.auth = self.vault.authorize(caller, self.auth.action()).await?;
            self.checked = Instant::now();
        }
        Ok(&self.auth)
    }

    /// The status that ends a stream with `err`, carrying the request id.
    pub fn status(&self, err: ApiError) -> Status {
        let mut status = err.into_status(&self.request_id);
        if let Ok(id) = MetadataValue::try_from(self.request_id.as_str()) {
            status.metadata_mut().insert("x-request-id", id);
        }
        status
    }
}

/// Runs a streaming call: authentication and authorization as [`run`] does for one call, and
/// again as the stream goes on ([`StreamScope::recheck`]); then `body` starts the response
/// stream, handing the [`StreamScope`] to whatever produces it, so the stream's end is
/// logged, audited and turned into a status the way [`run`] ends a call.
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
        .authorize(vault, action, &credentials)
        .instrument(call.span.clone())
        .await;
    match authorized {
        Ok(auth) => {
            let scope = StreamScope {
                vault: vault.clone(),
                recheck: Recheck {
                    vault: vault.clone(),
                    credentials,
                    request_id: call.request_id.clone(),
                    auth,
                    checked: Instant::now(),
                },
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
    recheck: Recheck,
    request_id: RequestId,
    span: tracing::Span,
    started: Instant,
}

impl StreamScope {
    /// Checks the caller's credentials again if the last check is older than the credential
    /// cache time (see [`Recheck::recheck`]); call it before each step of the stream.
    pub async fn recheck(&mut self) -> Result<&Authorized, ApiError> {
        self.recheck.recheck().instrument(self.span.clone()).await
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
            recheck,
            request_id,
            span,
            started,
        } = self;
        let auth = recheck.auth;
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
        // The server span of the observe layer, when the call came through it: one span per
        // RPC, so the request id, tenant and principal are on the exported span and every
        // log line of the call (with its trace id). Without the layer (a service called
        // directly) the call gets a span of its own, as before.
        let current = tracing::Span::current();
        let span = if current.metadata().map(|m| m.name()) == Some(super::observe::SPAN_NAME) {
            current.record("request_id", tracing::field::display(&request_id));
            current
        } else {
            tracing::info_span!(
                "rpc",
                rpc = action.as_str(),
                request_id = %request_id,
                tenant = tracing::field::Empty,
                principal = tracing::field::Empty,
            )
        };
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
        credentials: &RequestCredentials,
    ) -> Result<Authorized, ApiError> {
        let caller = vault
            .authenticate(credentials.as_credentials(), Some(self.request_id.as_str()))
            .await?;
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
///
/// Not when the database is unavailable or the caller's deadline passed: the record would
/// go to the very database that does not answer (holding the call for another acquire
/// timeout, past the caller's deadline), and an abandoned call changed nothing. The call's
/// log line still says how it ended.
async fn record_unaudited(vault: &Vault, auth: &Authorized, err: ApiError) -> ApiError {
    let nothing_happened = matches!(
        err,
        ApiError::Vault(VaultError::Unavailable(_) | VaultError::DeadlineExceeded)
    );
    if !err.is_audited() && !nothing_happened {
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
