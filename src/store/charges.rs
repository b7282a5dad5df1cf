//! Rows of charge forwarding: charges (one per tenant and idempotency key) and CVC holds.

use std::fmt;

use time::OffsetDateTime;
use uuid::Uuid;

use super::state::stored_enum;

stored_enum! {
    /// Where a charge is.
    pub enum ChargeState("charge status") {
        /// Written before anything goes out; not settled yet.
        Pending = "pending",
        /// Charged (or, with manual capture, authorized).
        Succeeded = "succeeded",
        /// The cardholder must act (3-D Secure); see [`ChargeRow::action`].
        RequiresAction = "requires_action",
        /// The issuer or the gateway declined the card.
        Declined = "declined",
        /// Nothing was charged.
        Failed = "failed",
        /// The gateway may or may not have charged: to be settled by asking it.
        Unknown = "unknown",
    }
}

impl ChargeState {
    /// Whether the charge still waits for its outcome (`pending` or `unknown`): the states a
    /// send or a settlement may still change.
    pub fn is_unsettled(self) -> bool {
        matches!(self, ChargeState::Pending | ChargeState::Unknown)
    }
}

stored_enum! {
    /// When the gateway takes a charge's money.
    pub enum CaptureMethod("capture method") {
        /// Authorize and capture in one step.
        Automatic = "automatic",
        /// Authorize only; captured later by `CaptureCharge`.
        Manual = "manual",
    }
}

/// A charge as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRow {
    /// `ch_` and 16 letters or digits.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// The caller's idempotency key, unique per tenant.
    pub idempotency_key: String,
    /// SHA-256 of the charge's parameters.
    pub request_hash: Vec<u8>,
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
    /// The description sent to the gateway (re-sent identical).
    pub description: String,
    /// The metadata sent to the gateway, sorted by key (re-sent identical).
    pub metadata: Vec<(String, String)>,
    /// Where the charge is.
    pub status: ChargeState,
    /// The gateway's id of the payment, once known.
    pub gateway_payment_id: Option<String>,
    /// The gateway's decline code.
    pub decline_code: Option<String>,
    /// The gateway's message (never card data: connectors pass gateway text only).
    pub message: Option<String>,
    /// How many times a request took the charge's send lease (to send it, or to ask the gateway
    /// about it): more than 0 means it may have been sent.
    pub attempts: u32,
    /// While in the future, a request is sending this charge to the gateway.
    pub sending_until: Option<OffsetDateTime>,
    /// When the charge was first asked for.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
    /// For a `requires_action` charge: what the shop's front end needs to finish it.
    pub action: Option<ChargeActionRow>,
    /// How many times the background reconciler tried to settle the charge.
    pub reconcile_attempts: u32,
    /// The reconciler leaves the charge alone until then (`None`: it is due now).
    pub next_reconcile_at: Option<OffsetDateTime>,
}

/// A charge's next action for the cardholder (3-D Secure), as stored. Not card data; `Debug`
/// still leaves the client secret out, since it lets a browser finish the payment.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ChargeActionRow {
    /// The gateway's client secret for the payment (Stripe's PaymentIntent `client_secret`).
    pub client_secret: Option<String>,
    /// The kind of action, in the gateway's words.
    pub kind: Option<String>,
    /// Where to send the cardholder, for a redirect.
    pub redirect_url: Option<String>,
    /// The gateway's whole action object as JSON.
    pub details_json: Option<String>,
}

impl fmt::Debug for ChargeActionRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeActionRow")
            .field("has_client_secret", &self.client_secret.is_some())
            .field("kind", &self.kind)
            .field("redirect_url", &self.redirect_url)
            .finish_non_exhaustive()
    }
}

/// How a send to the gateway ended, to settle a charge with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeSettlement {
    /// Where the send left the charge: any state but [`ChargeState::Pending`].
    pub status: ChargeState,
    /// The gateway's payment id, if it gave one.
    pub gateway_payment_id: Option<String>,
    /// The gateway's decline code.
    pub decline_code: Option<String>,
    /// The gateway's message.
    pub message: Option<String>,
    /// The next action of a `requires_action` outcome; `None` clears a stored one.
    pub action: Option<ChargeActionRow>,
}

/// A sealed CVC waiting for the next charge of its token.
#[derive(Clone, PartialEq, Eq)]
pub struct CvcHoldRow {
    /// The card's token.
    pub token: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The DEK that sealed `ciphertext`.
    pub dek_id: Uuid,
    /// The sealed CVC.
    pub ciphertext: Vec<u8>,
    /// When the hold lapses.
    pub expires_at: OffsetDateTime,
}

impl fmt::Debug for CvcHoldRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CvcHoldRow")
            .field("token", &self.token)
            .field("tenant_id", &self.tenant_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}
