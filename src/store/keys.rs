//! Rows of key management: how much each KEK version and DEK protects, background key jobs,
//! dual-control requests, and sealed records in transit through re-encryption.

use std::fmt;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{DekRow, state::stored_enum};

stored_enum! {
    /// What a background key job does.
    pub enum KeyJobKind("key job kind") {
        /// Rewrap DEKs, tenant secrets and the audit key under the primary KEK version.
        Rewrap = "rewrap",
        /// Re-encrypt records of retired DEKs under active DEKs, then destroy the retired DEKs.
        Reencrypt = "reencrypt",
    }
}

stored_enum! {
    /// Where a background key job is.
    pub enum KeyJobState("key job state") {
        /// Started and not finished; at most one per kind.
        Running = "running",
        /// Finished.
        Done = "done",
        /// Stopped by an error (see [`KeyJobRow::error`]).
        Failed = "failed",
    }
}

stored_enum! {
    /// What a dual-control request asks for.
    pub enum KeyRequestKind("key request kind") {
        /// Destroy a KEK version (target: the version number).
        RetireKek = "retire_kek",
        /// Crypto-shred a tenant (target: the tenant id).
        ShredTenant = "shred_tenant",
        /// Create a principal (target: its tenant; `params`: what to create).
        CreatePrincipal = "create_principal",
        /// Revoke a principal (target: the principal id).
        RevokePrincipal = "revoke_principal",
        /// Create an API key (target: the principal id; `params`: its lifetime).
        CreateApiKey = "create_api_key",
    }
}

stored_enum! {
    /// Where a dual-control request is.
    pub enum KeyRequestState("key request state") {
        /// Waiting for approval (a failed execution leaves it so).
        Pending = "pending",
        /// Approved and carried out.
        Executed = "executed",
        /// Approval came too late.
        Expired = "expired",
    }
}

/// What one KEK version wraps, as counted by [`Store::kek_usage`](super::Store::kek_usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KekUsage {
    /// The KEK version.
    pub version: u32,
    /// Data keys wrapped under it.
    pub deks: u64,
    /// Tenant secrets wrapped under it (shredded tenants have none).
    pub tenant_secrets: u64,
    /// Audit keys wrapped under it (0 or 1).
    pub audit_keys: u64,
    /// Card records sealed by the data keys it wraps.
    pub records: u64,
}

impl KekUsage {
    /// Whether anything stored is still wrapped under this version.
    pub fn in_use(&self) -> bool {
        self.deks + self.tenant_secrets + self.audit_keys > 0
    }
}

/// A DEK with the number of records it seals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekUsage {
    /// The DEK.
    pub dek: DekRow,
    /// Card rows whose record it sealed.
    pub records: u64,
}

/// A key to rewrap under a new KEK version: compare-and-set on the version it had when read.
#[derive(Clone, PartialEq, Eq)]
pub struct Rewrap {
    /// The DEK's id (hyphenated UUID) or the tenant's id.
    pub id: String,
    /// The KEK version the key was read under; the update applies only if it still is.
    pub old_version: u32,
    /// The KEK version of `wrapped`.
    pub new_version: u32,
    /// The key wrapped under `new_version`.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for Rewrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rewrap")
            .field("id", &self.id)
            .field("old_version", &self.old_version)
            .field("new_version", &self.new_version)
            .finish_non_exhaustive()
    }
}

/// One card's sealed record, read for or written by re-encryption.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// The card's token (bound into the record's AAD).
    pub token: String,
    /// Its tenant (bound into the AAD).
    pub tenant_id: String,
    /// The DEK that sealed `ciphertext`.
    pub dek_id: Uuid,
    /// The self-describing sealed record.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedRecord")
            .field("token", &self.token)
            .field("tenant_id", &self.tenant_id)
            .field("dek_id", &self.dek_id)
            .finish_non_exhaustive()
    }
}

/// A background key job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyJobRow {
    /// `kj_` and 16 letters or digits.
    pub id: String,
    /// What the job does.
    pub kind: KeyJobKind,
    /// Where it is.
    pub state: KeyJobState,
    /// Re-encryption of one tenant only; `None` for all tenants (and for rewraps).
    pub tenant_id: Option<String>,
    /// Items (keys or records) processed so far.
    pub done: u64,
    /// Items to process, as counted when the job started (grows if more appear).
    pub total: u64,
    /// The operator who started it.
    pub requested_by: String,
    /// The replica working on it, while its lease lasts.
    pub lease_owner: Option<String>,
    /// When the lease ends unless renewed.
    pub lease_until: Option<OffsetDateTime>,
    /// When it was started.
    pub created_at: OffsetDateTime,
    /// Last progress.
    pub updated_at: OffsetDateTime,
    /// When it ended.
    pub finished_at: Option<OffsetDateTime>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A dual-control request as stored ([`KeyRequestKind`] says what its target and params
/// are). A request whose execution fails stays pending (it can be approved again once the
/// cause is fixed, until it expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequestRow {
    /// `kr_` and 16 letters or digits.
    pub id: String,
    /// What is to be done.
    pub kind: KeyRequestKind,
    /// To what.
    pub target: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: OffsetDateTime,
    /// Approval after this instant is refused.
    pub expires_at: OffsetDateTime,
    /// Where it is.
    pub state: KeyRequestState,
    /// Who approved it.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<OffsetDateTime>,
    /// The tenant it acts on; `None` for a vault-wide operation, which only a global
    /// operator may request or approve.
    pub tenant_id: Option<String>,
    /// What a `create_principal` request creates (JSON); `None` for the other kinds.
    pub params: Option<String>,
}

/// What shredding a tenant removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shredded {
    /// Card rows deleted.
    pub cards: u64,
    /// Data keys destroyed (rows deleted).
    pub deks: u64,
    /// Principals revoked (with their API keys).
    pub principals: u64,
}
