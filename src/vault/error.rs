//! Errors of the vault core, one variant per thing a caller can act on.

use crate::store::StoreError;

/// Why a vault operation did not succeed. Messages never contain card data.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No live card with that token in the caller's tenant (missing, expired, deleted or
    /// another tenant's — deliberately indistinguishable).
    #[error("token not found")]
    NotFound,
    /// The database cannot be reached; retrying later may succeed.
    #[error("database unavailable")]
    Unavailable(#[source] StoreError),
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
}

impl From<StoreError> for VaultError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(_) => VaultError::Unavailable(err),
            other => VaultError::internal("database operation failed", other),
        }
    }
}
