//! Rows of follow-ups on charges: captures, refunds and cancellations, one per tenant and
//! idempotency key.

use time::OffsetDateTime;

use super::state::stored_enum;

stored_enum! {
    /// What a follow-up on a charge does.
    pub enum ChargeOperationKind("charge operation kind") {
        /// Captures an authorization, in full or in part.
        Capture = "capture",
        /// Refunds a captured payment, in full or in part.
        Refund = "refund",
        /// Cancels (voids) an uncaptured payment.
        Cancel = "cancel",
    }
}

stored_enum! {
    /// Where a follow-up on a charge is.
    pub enum ChargeOperationState("charge operation status") {
        /// Written before it goes out; not settled yet.
        Pending = "pending",
        /// The gateway did it.
        Succeeded = "succeeded",
        /// The gateway refused it, or it was never sent; nothing changed.
        Failed = "failed",
        /// The gateway may or may not have done it: re-sent under the same key.
        Unknown = "unknown",
    }
}

impl ChargeOperationState {
    /// Whether it still waits for its outcome (`pending` or `unknown`).
    pub fn is_unsettled(self) -> bool {
        matches!(
            self,
            ChargeOperationState::Pending | ChargeOperationState::Unknown
        )
    }
}

/// A capture, refund or cancellation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOperationRow {
    /// `op_` and 16 letters or digits; also the gateway's idempotency key for it.
    pub id: String,
    /// Owning tenant (the charge's).
    pub tenant_id: String,
    /// The charge it applies to.
    pub charge_id: String,
    /// What it does.
    pub kind: ChargeOperationKind,
    /// The caller's idempotency key, unique per tenant.
    pub idempotency_key: String,
    /// SHA-256 of the request's parameters.
    pub request_hash: Vec<u8>,
    /// Minor units asked of the gateway; 0 for a cancellation.
    pub amount: u64,
    /// Where it is.
    pub status: ChargeOperationState,
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
    /// Where the send left it: any state but [`ChargeOperationState::Pending`].
    pub status: ChargeOperationState,
    /// The gateway's id, if it gave one.
    pub gateway_id: Option<String>,
    /// Minor units the gateway reports done, if it says.
    pub amount_done: Option<u64>,
    /// The gateway's message, or ours.
    pub message: Option<String>,
}
