//! One place where failures become `tonic::Status`.

use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{card::FieldViolation, crypto, vault::VaultError};

/// Per-request id: returned to the caller (`x-request-id` header, and `RequestInfo` in
/// `INTERNAL` errors) and attached to every log line of the request, so an operator can find
/// the cause of a failure a caller reports.
#[derive(Debug, Clone)]
pub struct RequestId(String);

impl RequestId {
    /// A fresh random id (UUID v4 shape, from the OS CSPRNG).
    pub fn generate() -> RequestId {
        let mut bytes = [0u8; 16];
        // If the OS generator fails, ids only lose uniqueness; the request still proceeds.
        let _ = crypto::fill_random(&mut bytes);
        RequestId(
            uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .to_string(),
        )
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A failure of one request, before it becomes a `Status`.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed; one violation per bad field.
    Invalid(Vec<FieldViolation>),
    /// The vault refused or failed.
    Vault(VaultError),
}

impl From<VaultError> for ApiError {
    fn from(err: VaultError) -> Self {
        ApiError::Vault(err)
    }
}

impl ApiError {
    /// The status for the caller. Unexpected errors are logged here with their whole cause
    /// chain and leave as an opaque `INTERNAL` carrying only the request id.
    pub fn into_status(self, request_id: &RequestId) -> Status {
        match self {
            ApiError::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field, v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, "invalid request", details)
            }
            ApiError::Vault(VaultError::NotFound) => Status::not_found("token not found"),
            // One message per status, whatever the reason: the audit log tells operators
            // why; the caller learns nothing that would help an attacker.
            ApiError::Vault(VaultError::Unauthenticated) => {
                Status::unauthenticated("authentication required")
            }
            ApiError::Vault(VaultError::PermissionDenied) => {
                Status::permission_denied("permission denied")
            }
            ApiError::Vault(VaultError::RateLimited) => {
                Status::resource_exhausted("rate limit exceeded; retry later")
            }
            ApiError::Vault(VaultError::Missing(what)) => Status::not_found(what),
            ApiError::Vault(VaultError::Conflict(what)) => Status::already_exists(what),
            ApiError::Vault(VaultError::Precondition(what)) => Status::failed_precondition(what),
            ApiError::Vault(VaultError::SeparationOfDuties(what)) => {
                Status::permission_denied(what)
            }
            ApiError::Vault(VaultError::DeadlineExceeded) => {
                Status::deadline_exceeded("deadline exceeded; nothing was stored")
            }
            ApiError::Vault(err @ VaultError::Unavailable(_)) => {
                tracing::warn!(error = %crate::telemetry::error_chain(&err), "database unavailable");
                Status::unavailable("the vault's database is unavailable; retry later")
            }
            ApiError::Vault(err @ VaultError::Internal { .. }) => {
                tracing::error!(error = %crate::telemetry::error_chain(&err), "request failed");
                let mut details = ErrorDetails::new();
                details.set_request_info(request_id.as_str(), "");
                Status::with_error_details(
                    Code::Internal,
                    format!("internal error (request id {request_id})"),
                    details,
                )
            }
        }
    }
}
