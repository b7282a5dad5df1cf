//! What the vault answers with: plain structs it owns, holding what its callers are shown and
//! nothing else (no wrapped key, no secret hash, no request hash, no lease bookkeeping).
//!
//! The store's rows stay behind the vault: the API edge and the CLI build their answers from
//! these views, so a change to a row or to how it is stored never reaches them. Each view is
//! made from its row here, in one place; the states in them are the store's enums, which the
//! vault re-exports as its own vocabulary.

use std::fmt;

use time::OffsetDateTime;
use uuid::Uuid;

use super::KeyOperation;
use crate::{
    audit::{AuditRecord, Outcome},
    store::{
        ApiKeyRow, AuditCursor, CaptureMethod, ChargeActionRow, ChargeOperationKind,
        ChargeOperationRow, ChargeOperationState, ChargeRow, ChargeState, DekRow, DekUsage,
        KekUsage, KeyJobKind, KeyJobRow, KeyJobState, KeyRequestKind, KeyRequestRow,
        KeyRequestState, PrincipalRow, Shredded,
    },
};

/// A charge as the vault shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeView {
    /// `ch_` and 16 letters or digits.
    pub id: String,
    /// The caller's idempotency key.
    pub idempotency_key: String,
    /// The charged card's token.
    pub token: String,
    /// The configured gateway's name.
    pub gateway: String,
    /// Minor units.
    pub amount: u64,
    /// ISO 4217, upper case.
    pub currency: String,
    /// Automatic or manual capture.
    pub capture: CaptureMethod,
    /// Where the charge is.
    pub status: ChargeState,
    /// The gateway's id of the payment, once known.
    pub gateway_payment_id: Option<String>,
    /// The gateway's decline code.
    pub decline_code: Option<String>,
    /// The gateway's message (never card data).
    pub message: Option<String>,
    /// For a `requires_action` charge: what the shop's front end needs to finish it.
    pub action: Option<ChargeActionView>,
    /// How many times it was sent to the gateway, or the gateway asked about it.
    pub attempts: u32,
    /// When it was first asked for.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

impl From<ChargeRow> for ChargeView {
    fn from(row: ChargeRow) -> ChargeView {
        ChargeView {
            id: row.id,
            idempotency_key: row.idempotency_key,
            token: row.token,
            gateway: row.gateway,
            amount: row.amount,
            currency: row.currency,
            capture: row.capture,
            status: row.status,
            gateway_payment_id: row.gateway_payment_id,
            decline_code: row.decline_code,
            message: row.message,
            action: row.action.map(ChargeActionView::from),
            attempts: row.attempts,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// A charge's next action for the cardholder (3-D Secure). Not card data; `Debug` still
/// leaves the client secret out, since it lets a browser finish the payment.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ChargeActionView {
    /// The gateway's client secret for the payment.
    pub client_secret: Option<String>,
    /// The kind of action, in the gateway's words.
    pub kind: Option<String>,
    /// Where to send the cardholder, for a redirect.
    pub redirect_url: Option<String>,
    /// The gateway's whole action object as JSON.
    pub details_json: Option<String>,
}

impl fmt::Debug for ChargeActionView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeActionView")
            .field("has_client_secret", &self.client_secret.is_some())
            .field("kind", &self.kind)
            .field("redirect_url", &self.redirect_url)
            .finish_non_exhaustive()
    }
}

impl From<ChargeActionRow> for ChargeActionView {
    fn from(row: ChargeActionRow) -> ChargeActionView {
        ChargeActionView {
            client_secret: row.client_secret,
            kind: row.kind,
            redirect_url: row.redirect_url,
            details_json: row.details_json,
        }
    }
}

/// A capture, refund or cancellation as the vault shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOperationView {
    /// `op_` and 16 letters or digits; also the gateway's idempotency key for it.
    pub id: String,
    /// The charge it applies to.
    pub charge_id: String,
    /// What it does.
    pub kind: ChargeOperationKind,
    /// The caller's idempotency key.
    pub idempotency_key: String,
    /// Minor units asked of the gateway; 0 for a cancellation.
    pub amount: u64,
    /// Where it is.
    pub status: ChargeOperationState,
    /// The gateway's id of what it made or changed, once known.
    pub gateway_id: Option<String>,
    /// Minor units the gateway reports done, when it says.
    pub amount_done: Option<u64>,
    /// The gateway's message, or ours.
    pub message: Option<String>,
    /// How many times it was sent to the gateway.
    pub attempts: u32,
    /// When it was first asked for.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

impl From<ChargeOperationRow> for ChargeOperationView {
    fn from(row: ChargeOperationRow) -> ChargeOperationView {
        ChargeOperationView {
            id: row.id,
            charge_id: row.charge_id,
            kind: row.kind,
            idempotency_key: row.idempotency_key,
            amount: row.amount,
            status: row.status,
            gateway_id: row.gateway_id,
            amount_done: row.amount_done,
            message: row.message,
            attempts: row.attempts,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// A principal as the vault shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalView {
    /// Principal id (`p_…`).
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Its name, unique among the tenant's live principals.
    pub name: String,
    /// The mTLS identity it authenticates as, if any.
    pub mtls_identity: Option<String>,
    /// Permission names, sorted.
    pub permissions: Vec<String>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// The operator that created it, when recorded.
    pub created_by: Option<String>,
    /// A `keys:admin` principal that manages every tenant.
    pub global_operator: bool,
}

impl From<PrincipalRow> for PrincipalView {
    fn from(row: PrincipalRow) -> PrincipalView {
        PrincipalView {
            id: row.id,
            tenant_id: row.tenant_id,
            name: row.name,
            mtls_identity: row.mtls_identity,
            permissions: row.permissions,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            created_by: row.created_by,
            global_operator: row.global_operator,
        }
    }
}

/// An API key as the vault shows it: never the key, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyView {
    /// Public key id, the middle part of `cv_<id>_<secret>`.
    pub id: String,
    /// The principal the key authenticates as.
    pub principal_id: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// The operator that created it (and was shown it), when recorded.
    pub created_by: Option<String>,
}

impl From<&ApiKeyRow> for ApiKeyView {
    fn from(row: &ApiKeyRow) -> ApiKeyView {
        ApiKeyView {
            id: row.id.clone(),
            principal_id: row.principal_id.clone(),
            created_at: row.created_at,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
            created_by: row.created_by.clone(),
        }
    }
}

/// What one KEK version wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KekUsageView {
    /// Data keys wrapped under it.
    pub deks: u64,
    /// Tenant secrets wrapped under it.
    pub tenant_secrets: u64,
    /// Audit keys wrapped under it (0 or 1).
    pub audit_keys: u64,
    /// Card records sealed by the data keys it wraps.
    pub records: u64,
}

impl From<KekUsage> for KekUsageView {
    fn from(usage: KekUsage) -> KekUsageView {
        KekUsageView {
            deks: usage.deks,
            tenant_secrets: usage.tenant_secrets,
            audit_keys: usage.audit_keys,
            records: usage.records,
        }
    }
}

/// A data-encryption key as the vault shows it: never the key, wrapped or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyView {
    /// The DEK's id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: String,
    /// KEK version that wraps it.
    pub kek_version: u32,
    /// Whether new records are sealed with it.
    pub active: bool,
    /// Card records it seals (0 for a key just made).
    pub records: u64,
    /// Encryptions reserved under it so far.
    pub reserved: u64,
    /// When it was generated.
    pub created_at: OffsetDateTime,
    /// When it stopped being active.
    pub retired_at: Option<OffsetDateTime>,
}

impl DataKeyView {
    /// The view of `dek`, which seals `records` card records.
    pub(super) fn of(dek: DekRow, records: u64) -> DataKeyView {
        DataKeyView {
            id: dek.id,
            tenant_id: dek.tenant_id,
            kek_version: dek.kek_version,
            active: dek.active,
            records,
            reserved: dek.reserved,
            created_at: dek.created_at,
            retired_at: dek.retired_at,
        }
    }
}

impl From<DekUsage> for DataKeyView {
    fn from(usage: DekUsage) -> DataKeyView {
        DataKeyView::of(usage.dek, usage.records)
    }
}

/// A background key job as the vault shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyJobView {
    /// `kj_` and 16 letters or digits.
    pub id: String,
    /// What the job does.
    pub kind: KeyJobKind,
    /// Where it is.
    pub state: KeyJobState,
    /// Re-encryption of one tenant only; `None` for all tenants (and for rewraps).
    pub tenant_id: Option<String>,
    /// Items processed so far.
    pub done: u64,
    /// Items to process.
    pub total: u64,
    /// The operator who started it.
    pub requested_by: String,
    /// The replica working on it, while its lease lasts.
    pub lease_owner: Option<String>,
    /// When that lease ends unless renewed.
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

impl KeyJobView {
    /// The replica working on the job at `now`: none once its lease has lapsed (the replica
    /// named is then no longer at it) or when the job is not running.
    pub fn worker_at(&self, now: OffsetDateTime) -> Option<&str> {
        match (&self.lease_owner, self.lease_until) {
            (Some(owner), Some(until)) if self.state == KeyJobState::Running && until > now => {
                Some(owner)
            }
            _ => None,
        }
    }
}

impl From<KeyJobRow> for KeyJobView {
    fn from(row: KeyJobRow) -> KeyJobView {
        KeyJobView {
            id: row.id,
            kind: row.kind,
            state: row.state,
            tenant_id: row.tenant_id,
            done: row.done,
            total: row.total,
            requested_by: row.requested_by,
            lease_owner: row.lease_owner,
            lease_until: row.lease_until,
            created_at: row.created_at,
            updated_at: row.updated_at,
            finished_at: row.finished_at,
            error: row.error,
        }
    }
}

/// A dual-control request as the vault shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequestView {
    /// `kr_` and 16 letters or digits.
    pub id: String,
    /// What is to be done.
    pub kind: KeyRequestKind,
    /// To what (see [`KeyRequestKind`]).
    pub target: String,
    /// The operation in full, as the approver is asked to approve it; `None` when the stored
    /// request cannot be read back as one (it can then not be approved either).
    pub operation: Option<KeyOperation>,
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
    /// The tenant it acts on; `None` for a vault-wide operation.
    pub tenant_id: Option<String>,
}

impl From<KeyRequestRow> for KeyRequestView {
    fn from(row: KeyRequestRow) -> KeyRequestView {
        KeyRequestView {
            operation: KeyOperation::of(&row).ok(),
            id: row.id,
            kind: row.kind,
            target: row.target,
            requested_by: row.requested_by,
            requested_at: row.requested_at,
            expires_at: row.expires_at,
            state: row.state,
            decided_by: row.decided_by,
            decided_at: row.decided_at,
            tenant_id: row.tenant_id,
        }
    }
}

/// What shredding a tenant removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShreddedView {
    /// Card rows deleted.
    pub cards: u64,
    /// Data keys destroyed.
    pub deks: u64,
    /// Principals revoked (with their API keys).
    pub principals: u64,
}

impl From<Shredded> for ShreddedView {
    fn from(shredded: Shredded) -> ShreddedView {
        ShreddedView {
            cards: shredded.cards,
            deks: shredded.deks,
            principals: shredded.principals,
        }
    }
}

/// One audit record as a reader is shown it, MAC included (so it can be checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecordView {
    /// The chain it belongs to.
    pub chain: u32,
    /// Its position in that chain, from 1.
    pub seq: u64,
    /// When the action happened.
    pub at: OffsetDateTime,
    /// Tenant acted on.
    pub tenant_id: Option<String>,
    /// Principal that acted.
    pub principal: Option<String>,
    /// Action name, e.g. `reveal`.
    pub action: String,
    /// Token acted on, if any.
    pub token: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// An event an operator must look at.
    pub alarm: bool,
    /// Caller's network address.
    pub peer: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Extra non-secret context.
    pub detail: Option<String>,
    /// The record's MAC.
    pub mac: Vec<u8>,
}

impl AuditRecordView {
    /// Where a read that ended with this record resumes.
    pub fn position(&self) -> AuditPosition {
        AuditPosition {
            at: self.at,
            chain: self.chain,
            seq: self.seq,
        }
    }
}

impl From<AuditRecord> for AuditRecordView {
    fn from(row: AuditRecord) -> AuditRecordView {
        AuditRecordView {
            chain: row.shard,
            seq: row.seq,
            at: row.at,
            tenant_id: row.tenant_id,
            principal: row.principal,
            action: row.action,
            token: row.token,
            outcome: row.outcome,
            alarm: row.alarm,
            peer: row.peer,
            request_id: row.request_id,
            detail: row.detail,
            mac: row.mac,
        }
    }
}

/// Where a time-ordered read of the audit log resumes: just after this record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditPosition {
    /// Time of the last record read.
    pub at: OffsetDateTime,
    /// Its chain.
    pub chain: u32,
    /// Its sequence number.
    pub seq: u64,
}

impl From<AuditPosition> for AuditCursor {
    fn from(position: AuditPosition) -> AuditCursor {
        AuditCursor {
            at: position.at,
            shard: position.chain,
            seq: position.seq,
        }
    }
}
