//! Establishes who a request acts for.

use tonic::{Status, metadata::MetadataMap};

use crate::vault::{Caller, TenantId};

/// Resolves the [`Caller`] of each request.
///
/// Today the only way in is the configured unauthenticated tenant, which configuration
/// allows only on a loopback listener (and `serve --dev` sets to `dev`). Credentials
/// (mTLS principals and API keys) plug in here.
#[derive(Debug, Clone)]
pub struct Authenticator {
    unauthenticated_tenant: Option<TenantId>,
}

impl Authenticator {
    /// An authenticator that lets callers without credentials act as `unauthenticated_tenant`
    /// when it is set, and refuses them otherwise.
    pub fn new(unauthenticated_tenant: Option<TenantId>) -> Self {
        Self {
            unauthenticated_tenant,
        }
    }

    /// The caller of a request, or `UNAUTHENTICATED`.
    pub fn caller(&self, _metadata: &MetadataMap) -> Result<Caller, Status> {
        match &self.unauthenticated_tenant {
            Some(tenant) => Ok(Caller {
                tenant: tenant.clone(),
            }),
            None => Err(Status::unauthenticated("credentials required")),
        }
    }
}
