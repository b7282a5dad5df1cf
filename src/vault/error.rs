//! Errors of the vault core, one variant per thing a caller can act on.

use crate::{audit::AuditError, crypto::CryptoError, store::StoreError};

/// Why a vault operation did not succeed. Messages never contain card data.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No live card with that token in the caller's tenant (missing, expired, deleted or
    /// another tenant's — deliberately indistinguishable).
    #[error("token not found")]
    NotFound,
    /// No valid credentials. Deliberately says nothing of why (the audit log does).
    #[error("authentication required")]
    Unauthenticated,
    /// The principal lacks the permission the action needs.
    #[error("permission denied")]
    PermissionDenied,
    /// Over an abuse limit (reveals, failed authentications).
    #[error("rate limit exceeded")]
    RateLimited,
    /// An administrative target does not exist, e.g. `"tenant not found"`.
    #[error("{0}")]
    Missing(&'static str),
    /// An administrative change conflicts with what exists, e.g. `"tenant already exists"`.
    #[error("{0}")]
    Conflict(&'static str),
    /// The system is not in a state that allows the operation, e.g. a KEK version still
    /// wraps keys, or a dual-control request has expired. The text says what to do.
    #[error("{0}")]
    Precondition(String),
    /// Dual control or operator scope: the operation needs another principal than this one
    /// (approving one's own request, or that of one's creator; a tenant's operator acting on
    /// another tenant or on something vault-wide).
    #[error("{0}")]
    SeparationOfDuties(&'static str),
    /// The caller gave up (its deadline passed or it hung up) before the work was done; the
    /// work was abandoned before it wrote anything.
    #[error("deadline exceeded before the work started")]
    DeadlineExceeded,
    /// The database cannot be reached; retrying later may succeed.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Anything else: a bug, a corrupt row, a key that does not open. Callers get an opaque
    /// error with a request id; the cause chain goes to the logs.
    #[error("{context}")]
    Internal {
        /// What the vault was doing, e.g. "failed to open the record of a card".
        context: &'static str,
        /// The underlying cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl VaultError {
    /// Wraps an unexpected failure with what the vault was doing.
    pub fn internal(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        VaultError::Internal {
            context,
            source: source.into(),
        }
    }

    /// The OS random generator failed while making an id.
    pub(super) fn no_randomness(source: CryptoError) -> Self {
        VaultError::internal("the OS random generator failed", source)
    }
}

impl VaultError {
    /// Whether the vault already wrote this failure to the audit log (the API layer records
    /// the others).
    pub fn is_audited(&self) -> bool {
        matches!(
            self,
            VaultError::NotFound
                | VaultError::Unauthenticated
                | VaultError::PermissionDenied
                | VaultError::RateLimited
                | VaultError::Missing(_)
                | VaultError::Conflict(_)
                | VaultError::Precondition(_)
                | VaultError::SeparationOfDuties(_)
        )
    }
}

impl From<AuditError> for VaultError {
    fn from(err: AuditError) -> Self {
        match err {
            AuditError::Store(store) => store.into(),
            other => VaultError::internal("failed to write the audit log", other),
        }
    }
}

impl From<StoreError> for VaultError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => VaultError::Unavailable(Box::new(err)),
            other => VaultError::internal("database operation failed", other),
        }
    }
}
