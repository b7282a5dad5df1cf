//! Rows of follow-ups on charges: captures, refunds and cancellations, one per tenant and
//! idempotency key.

use time::OffsetDateTime;

/// A capture, refund or cancellation as stored. `kind` is `"capture"`, `"refund"` or
/// `"cancel"`; `status` is `"pending"`, `"succeeded"`, `"failed"` or `"unknown"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOperationRow {
    /// `op_` and 16 letters or digits; also the gateway's idempotency key for it.
    pub id: String,
    /// Owning tenant (the charge's).
    pub tenant_id: String,
    /// The charge it applies to.
    pub charge_id: String,
    /// What it does.
    pub kind: String,
    /// The caller's idempotency key, unique per tenant.
    pub idempotency_key: String,
    /// SHA-256 of the request's parameters.
    pub request_hash: Vec<u8>,
    /// Minor units asked of the gateway; 0 for a cancellation.
    pub amount: u64,
    /// Where it is.
    pub status: String,
    /// The gateway's id of what it made or changed, once known.
    pub gateway_id: Option<String>,
    /// Minor units the gateway reports done, when it says.
    pub amount_done: Option<u64>,
    /// The gateway's message, or ours (never card data: operations carry none).
    pub message: Option<String>,
    /// How many times it was sent to the gateway.
    pub attempts: u32,
    /// While in the future, a request is sending it to the gateway.
    pub sending_until: Option<OffsetDateTime>,
    /// When it was first asked for.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

/// How a send of an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationSettlement {
    /// `"succeeded"`, `"failed"` or `"unknown"`.
    pub status: String,
    /// The gateway's id, if it gave one.
    pub gateway_id: Option<String>,
    /// Minor units the gateway reports done, if it says.
    pub amount_done: Option<u64>,
    /// The gateway's message, or ours.
    pub message: Option<String>,
}
