//! Charge forwarding: charges (one per tenant and idempotency key), the CVC holds a charge
//! takes, the reconciler's lease, and captures, refunds and cancellations (charge
//! operations, one per tenant and idempotency key).

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    StoreError,
    dialect::{Db, Pool, Row, TxDb, query, sql},
    int4, int8, metadata_from_json, metadata_to_json, narrow,
    state::stored_enum,
};

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

/// Charges, their CVCs, and the reconciler's lease.
#[async_trait]
pub trait ChargeRepo: Send + Sync {
    /// Inserts a charge unless the tenant already has one with that idempotency key; returns
    /// `None` when it inserted, else the existing row.
    async fn insert_charge(&self, row: &ChargeRow) -> Result<Option<ChargeRow>, StoreError>;
    /// The tenant's charge with this idempotency key.
    async fn charge_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRow>, StoreError>;
    /// A charge by id.
    async fn charge(&self, id: &str) -> Result<Option<ChargeRow>, StoreError>;
    /// Takes the right to send a `pending` or `unknown` charge to the gateway until `until`:
    /// sets `sending_until` and counts an attempt, only if no other request holds that right
    /// (`sending_until` unset or before `now`). Returns whether it took it. Of concurrent
    /// callers exactly one gets it.
    async fn claim_charge_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Records how a send ended and clears `sending_until`; only a `pending` or `unknown`
    /// charge changes. A final status (anything but `unknown`) also erases the CVC attached
    /// to the charge (`cvc_*` columns set to NULL). Returns whether it did.
    async fn settle_charge(
        &self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Up to `limit` charges (of one tenant or all) that are `unknown`, or `pending` with no
    /// live send (`sending_until` unset or before `now`), oldest first.
    async fn unsettled_charges(
        &self,
        tenant_id: Option<&str>,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError>;
    /// Up to `limit` unsettled charges (as [`ChargeRepo::unsettled_charges`], of every
    /// tenant) whose `next_reconcile_at` is unset or not after `now`, oldest first: the
    /// background reconciler's work.
    async fn charges_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError>;
    /// Records a reconciliation that left a charge unsettled: its count of attempts and when
    /// the reconciler may try again. Only an unsettled charge changes; returns whether it did.
    async fn defer_charge_reconcile(
        &self,
        id: &str,
        attempts: u32,
        next_at: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// How many charges are `unknown`, and how many of those were created before
    /// `overdue_before`.
    async fn unknown_charge_counts(
        &self,
        overdue_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError>;
    /// Marks the alarm of a charge unknown for too long as raised; true only the first time.
    async fn mark_charge_alarmed(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError>;
    /// Takes (or renews) the lease of the background job `name` (the reconciler) for `owner`
    /// until `until`, if no other owner holds it at `now`. Of concurrent callers at most one
    /// gets it.
    async fn claim_job_lease(
        &self,
        name: &str,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Gives up `owner`'s lease of `name`, if it holds it.
    async fn release_job_lease(&self, name: &str, owner: &str) -> Result<(), StoreError>;

    /// The CVC attached to a charge, as a hold row (token and tenant from the charge), if
    /// it has one that has not expired at `now`.
    async fn charge_cvc(
        &self,
        charge_id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError>;
    /// Erases CVCs attached to charges that expired at `now` (sets the `cvc_*` columns to
    /// NULL), up to `limit`; returns how many.
    async fn erase_expired_charge_cvcs(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError>;
    /// Stores (or replaces) the CVC hold of a token.
    async fn put_cvc_hold(&self, row: &CvcHoldRow) -> Result<(), StoreError>;
    /// Removes and returns the tenant's live (not expired at `now`) CVC hold of a token, so
    /// it is used at most once. A hold taken for a charge moves to it with
    /// [`ChargeTx::take_cvc_hold`] and [`ChargeTx::attach_charge_cvc`] in one transaction.
    async fn take_cvc_hold(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError>;
    /// Deletes up to `limit` holds expired at `now`; returns how many.
    async fn delete_expired_cvc_holds(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// The tenant's operation with this idempotency key.
    async fn charge_operation_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeOperationRow>, StoreError>;
    /// An operation by id.
    async fn charge_operation(&self, id: &str) -> Result<Option<ChargeOperationRow>, StoreError>;
    /// Takes the right to send a `pending` or `unknown` operation until `until`, as
    /// [`ChargeRepo::claim_charge_send`] does for a charge (counting an attempt); returns
    /// whether it took it.
    async fn claim_charge_operation_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
}

/// Charge writes inside a transaction: settlement with its audit record, the CVC hold a
/// charge takes, and captures, refunds and cancellations.
#[async_trait]
pub trait ChargeTx: Send {
    /// As [`ChargeRepo::settle_charge`], inside this transaction: a send's outcome commits
    /// with its audit record, or neither does.
    async fn settle_charge(
        &mut self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// As [`ChargeRepo::take_cvc_hold`], inside this transaction: with
    /// [`ChargeTx::attach_charge_cvc`] after it, the hold moves to the charge or stays where
    /// it was, never lost between the two.
    async fn take_cvc_hold(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError>;
    /// Attaches a taken CVC hold to a charge (its `cvc_dek_id`, `cvc_ciphertext`,
    /// `cvc_expires_at` from the hold), for the charge's own re-sends.
    async fn attach_charge_cvc(
        &mut self,
        charge_id: &str,
        hold: &CvcHoldRow,
    ) -> Result<(), StoreError>;
    /// A charge by id, locked until this transaction ends (PostgreSQL: `FOR UPDATE`; SQLite
    /// transactions hold the write lock from their start), so the operations checked against
    /// it and the one inserted after the check cannot interleave with another request's.
    async fn lock_charge(&mut self, id: &str) -> Result<Option<ChargeRow>, StoreError>;
    /// A charge's operations, oldest first.
    async fn charge_operations(
        &mut self,
        charge_id: &str,
    ) -> Result<Vec<ChargeOperationRow>, StoreError>;
    /// Inserts an operation unless the tenant already has one with that idempotency key;
    /// returns whether it inserted.
    async fn insert_charge_operation(
        &mut self,
        row: &ChargeOperationRow,
    ) -> Result<bool, StoreError>;
    /// Records how a send of a `pending` or `unknown` operation ended and clears
    /// `sending_until`; a gateway id or amount learnt before is kept when this send brought
    /// none. Returns whether the operation changed.
    async fn settle_charge_operation(
        &mut self,
        id: &str,
        settlement: &OperationSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;
}

/// Columns of a charge row, as `charge_from_row` reads them (JSONB metadata as text). The
/// sealed CVC is never selected with a charge: only `charge_cvc` reads it.
macro_rules! charge_columns {
    () => {
        "id, tenant_id, idempotency_key, request_hash, token, gateway, amount, currency, capture, description, metadata::text AS metadata, status, gateway_payment_id, decline_code, message, attempts, sending_until, created_at, updated_at, action_client_secret, action_type, action_redirect_url, action_json, reconcile_attempts, next_reconcile_at"
    };
}

/// Columns of a CVC hold row, as `cvc_hold_from_row` reads them.
macro_rules! cvc_hold_columns {
    () => {
        "token, tenant_id, dek_id, ciphertext, expires_at"
    };
}

/// Columns of an operation row, as `charge_operation_from_row` reads them.
macro_rules! charge_operation_columns {
    () => {
        "id, tenant_id, charge_id, kind, idempotency_key, request_hash, amount, status, gateway_id, amount_done, message, attempts, sending_until, created_at, updated_at"
    };
}

/// A stored action from its four nullable columns: none when all are NULL.
fn action_from_parts(
    client_secret: Option<String>,
    kind: Option<String>,
    redirect_url: Option<String>,
    details_json: Option<String>,
) -> Option<ChargeActionRow> {
    let action = ChargeActionRow {
        client_secret,
        kind,
        redirect_url,
        details_json,
    };
    (action != ChargeActionRow::default()).then_some(action)
}

fn charge_from_row(row: &Row) -> Result<ChargeRow, StoreError> {
    Ok(ChargeRow {
        id: row.get("id")?,
        tenant_id: row.get("tenant_id")?,
        idempotency_key: row.get("idempotency_key")?,
        request_hash: row.get("request_hash")?,
        token: row.get("token")?,
        gateway: row.get("gateway")?,
        amount: narrow(
            row.get::<i64>("amount")?,
            "a stored charge amount is out of range (negative)",
        )?,
        currency: row.get("currency")?,
        capture: row.get("capture")?,
        description: row.get("description")?,
        metadata: metadata_from_json(&row.get::<String>("metadata")?)?,
        status: row.get("status")?,
        gateway_payment_id: row.get("gateway_payment_id")?,
        decline_code: row.get("decline_code")?,
        message: row.get("message")?,
        attempts: narrow(row.int4("attempts")?, "charge attempts")?,
        sending_until: row.get("sending_until")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
        action: action_from_parts(
            row.get("action_client_secret")?,
            row.get("action_type")?,
            row.get("action_redirect_url")?,
            row.get("action_json")?,
        ),
        reconcile_attempts: narrow(row.int4("reconcile_attempts")?, "charge reconcile attempts")?,
        next_reconcile_at: row.get("next_reconcile_at")?,
    })
}

fn cvc_hold_from_row(row: &Row) -> Result<CvcHoldRow, StoreError> {
    Ok(CvcHoldRow {
        token: row.get("token")?,
        tenant_id: row.get("tenant_id")?,
        dek_id: row.get("dek_id")?,
        ciphertext: row.get("ciphertext")?,
        expires_at: row.get("expires_at")?,
    })
}

fn charge_operation_from_row(row: &Row) -> Result<ChargeOperationRow, StoreError> {
    let amount = |value: i64| narrow(value, "a stored operation amount is out of range");
    Ok(ChargeOperationRow {
        id: row.get("id")?,
        tenant_id: row.get("tenant_id")?,
        charge_id: row.get("charge_id")?,
        kind: row.get("kind")?,
        idempotency_key: row.get("idempotency_key")?,
        request_hash: row.get("request_hash")?,
        amount: amount(row.get("amount")?)?,
        status: row.get("status")?,
        gateway_id: row.get("gateway_id")?,
        amount_done: row
            .get::<Option<i64>>("amount_done")?
            .map(amount)
            .transpose()?,
        message: row.get("message")?,
        attempts: narrow(row.int4("attempts")?, "operation attempts")?,
        sending_until: row.get("sending_until")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

/// An operation amount for a `BIGINT` column.
fn op_amount(value: u64) -> Result<i64, StoreError> {
    int8(value, "an operation amount is out of range")
}

/// Records how a send of a `pending` or `unknown` charge ended, through the pool or inside a
/// transaction (with the outcome's audit record); returns whether the charge changed.
async fn settle_charge_row<D: Db + ?Sized>(
    db: &mut D,
    id: &str,
    settlement: &ChargeSettlement,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    // A payment id learnt by an earlier send is kept when this one brought none. A final
    // status ends the re-sends, and with them the need for the attached CVC. The action is
    // the latest outcome's: a charge that no longer waits for the cardholder has none.
    let action = settlement.action.as_ref();
    let done = query(sql!(
        "UPDATE charges SET status = $2, gateway_payment_id = COALESCE($3, gateway_payment_id), \
         decline_code = $4, message = $5, sending_until = NULL, updated_at = $6, \
         cvc_dek_id = CASE WHEN $7 THEN NULL ELSE cvc_dek_id END, \
         cvc_ciphertext = CASE WHEN $7 THEN NULL ELSE cvc_ciphertext END, \
         cvc_expires_at = CASE WHEN $7 THEN NULL ELSE cvc_expires_at END, \
         action_client_secret = $8, action_type = $9, action_redirect_url = $10, \
         action_json = $11 \
         WHERE id = $1 AND status IN ('pending', 'unknown')"
    ))
    .bind(id)
    .bind(settlement.status)
    .bind(&settlement.gateway_payment_id)
    .bind(&settlement.decline_code)
    .bind(&settlement.message)
    .bind(now)
    .bind(settlement.status != ChargeState::Unknown)
    .bind(action.and_then(|a| a.client_secret.as_deref()))
    .bind(action.and_then(|a| a.kind.as_deref()))
    .bind(action.and_then(|a| a.redirect_url.as_deref()))
    .bind(action.and_then(|a| a.details_json.as_deref()))
    .execute(db)
    .await?;
    Ok(done == 1)
}

/// Removes the tenant's hold of a token and returns it if it is live at `now`, through the
/// pool or inside a transaction.
async fn take_cvc_hold_row<D: Db + ?Sized>(
    db: &mut D,
    tenant_id: &str,
    token: &str,
    now: OffsetDateTime,
) -> Result<Option<CvcHoldRow>, StoreError> {
    // The tenant's hold is deleted whether or not it is still live, and returned only if it
    // is: an expired CVC goes at the first chance rather than waiting for the sweeper. Of two
    // takes at once, the second finds the row deleted (PostgreSQL) or runs after the first
    // (SQLite serializes writers) and gets nothing.
    let Some(row) = query(sql!(
        "DELETE FROM cvc_holds WHERE token = $1 AND tenant_id = $2 RETURNING ",
        cvc_hold_columns!()
    ))
    .bind(token)
    .bind(tenant_id)
    .fetch_optional(db)
    .await?
    else {
        return Ok(None);
    };
    let hold = cvc_hold_from_row(&row)?;
    Ok((hold.expires_at > now).then_some(hold))
}

#[async_trait]
impl<S: Pool> ChargeRepo for S {
    async fn insert_charge(&self, row: &ChargeRow) -> Result<Option<ChargeRow>, StoreError> {
        // The arbiter is the idempotency index only: a clash on the primary key stays an
        // error. Of two requests racing with one key, the second waits for the first to
        // commit and then does nothing.
        let done = query(sql!(
            "INSERT INTO charges (id, tenant_id, idempotency_key, request_hash, token, gateway, \
             amount, currency, capture, description, metadata, status, gateway_payment_id, \
             decline_code, message, attempts, sending_until, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15, \
             $16, $17, $18, $19) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING"
        ))
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.idempotency_key)
        .bind(&row.request_hash)
        .bind(&row.token)
        .bind(&row.gateway)
        .bind(int8(
            row.amount,
            "a charge amount is larger than the database holds",
        )?)
        .bind(&row.currency)
        .bind(row.capture)
        .bind(&row.description)
        .bind(metadata_to_json(&row.metadata))
        .bind(row.status)
        .bind(&row.gateway_payment_id)
        .bind(&row.decline_code)
        .bind(&row.message)
        .bind(int4(row.attempts, "charge attempts out of range")?)
        .bind(row.sending_until)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(&mut self.pooled().await?)
        .await?;
        if done == 1 {
            return Ok(None);
        }
        // A second statement, not a CTE of the first: one statement reads one snapshot, taken
        // before a racing insert it waited for committed, so it would not see that row.
        // Charges are never deleted, so the row that clashed is there to read.
        match self
            .charge_by_key(&row.tenant_id, &row.idempotency_key)
            .await?
        {
            Some(existing) => Ok(Some(existing)),
            None => Err(StoreError::Corrupt(
                "charge clashed on its key but is not there",
            )),
        }
    }

    async fn charge_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE tenant_id = $1 AND idempotency_key = $2"
        ))
        .bind(tenant_id)
        .bind(idempotency_key)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(charge_from_row)
        .transpose()
    }

    async fn charge(&self, id: &str) -> Result<Option<ChargeRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(charge_from_row)
        .transpose()
    }

    async fn claim_charge_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // One statement. Of two claims at once, on PostgreSQL the second waits on the row
        // lock of the first; READ COMMITTED then re-checks the WHERE on the updated row, finds
        // `sending_until` in the future and changes nothing. SQLite serializes writers.
        let done = query(sql!(
            "UPDATE charges SET sending_until = $3, attempts = attempts + 1, updated_at = $2 \
             WHERE id = $1 AND status IN ('pending', 'unknown') \
             AND (sending_until IS NULL OR sending_until < $2)"
        ))
        .bind(id)
        .bind(now)
        .bind(until)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn settle_charge(
        &self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        settle_charge_row(&mut self.pooled().await?, id, settlement, now).await
    }

    async fn unsettled_charges(
        &self,
        tenant_id: Option<&str>,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE (status = 'unknown' OR (status = 'pending' \
             AND (sending_until IS NULL OR sending_until < $2))) \
             AND ($1::text IS NULL OR tenant_id = $1) ORDER BY created_at, id LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(charge_from_row)
        .collect()
    }

    async fn charges_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE (status = 'unknown' OR (status = 'pending' \
             AND (sending_until IS NULL OR sending_until < $1))) \
             AND (next_reconcile_at IS NULL OR next_reconcile_at <= $1) \
             ORDER BY created_at, id LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(charge_from_row)
        .collect()
    }

    async fn defer_charge_reconcile(
        &self,
        id: &str,
        attempts: u32,
        next_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE charges SET reconcile_attempts = $2, next_reconcile_at = $3 \
             WHERE id = $1 AND status IN ('pending', 'unknown')"
        ))
        .bind(id)
        .bind(int4(attempts, "charge reconcile attempts out of range")?)
        .bind(next_at)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn unknown_charge_counts(
        &self,
        overdue_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError> {
        let row = query(sql!(
            "SELECT COUNT(*) AS unknown, \
             COALESCE(SUM(CASE WHEN created_at < $1 THEN 1 ELSE 0 END), 0) AS overdue \
             FROM charges WHERE status = 'unknown'"
        ))
        .bind(overdue_before)
        .fetch_one(&mut self.pooled().await?)
        .await?;
        Ok((
            narrow(row.get::<i64>("unknown")?, "unknown charges")?,
            narrow(row.get::<i64>("overdue")?, "overdue charges")?,
        ))
    }

    async fn mark_charge_alarmed(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE charges SET alarmed_at = $2 WHERE id = $1 AND alarmed_at IS NULL"
        ))
        .bind(id)
        .bind(now)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn claim_job_lease(
        &self,
        name: &str,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // One statement: the insert, or the update of a lapsed or own lease. A lease another
        // owner holds makes the update's WHERE false, and nothing changes.
        let done = query(sql!(
            "INSERT INTO job_leases (name, owner, lease_until) VALUES ($1, $2, $4) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, \
             lease_until = excluded.lease_until \
             WHERE job_leases.lease_until < $3 OR job_leases.owner = excluded.owner"
        ))
        .bind(name)
        .bind(owner)
        .bind(now)
        .bind(until)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn release_job_lease(&self, name: &str, owner: &str) -> Result<(), StoreError> {
        query(sql!(
            "DELETE FROM job_leases WHERE name = $1 AND owner = $2"
        ))
        .bind(name)
        .bind(owner)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(())
    }

    async fn charge_cvc(
        &self,
        charge_id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError> {
        query(sql!(
            "SELECT token, tenant_id, cvc_dek_id AS dek_id, cvc_ciphertext AS ciphertext, \
             cvc_expires_at AS expires_at FROM charges \
             WHERE id = $1 AND cvc_dek_id IS NOT NULL AND cvc_ciphertext IS NOT NULL \
             AND cvc_expires_at > $2"
        ))
        .bind(charge_id)
        .bind(now)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(cvc_hold_from_row)
        .transpose()
    }

    async fn erase_expired_charge_cvcs(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // Bounded per statement like the other sweeps, SKIP LOCKED (PostgreSQL) so replicas
        // sweep side by side. No index serves `cvc_expires_at`: the subquery scans the charges.
        Ok(query(sql!(
            "UPDATE charges SET cvc_dek_id = NULL, cvc_ciphertext = NULL, cvc_expires_at = NULL \
             WHERE id IN (SELECT id FROM charges WHERE cvc_expires_at <= $1 \
             ORDER BY cvc_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .execute(&mut self.pooled().await?)
        .await?)
    }

    async fn put_cvc_hold(&self, row: &CvcHoldRow) -> Result<(), StoreError> {
        // A token belongs to one tenant; the update's WHERE keeps a put naming another tenant
        // from replacing (and so destroying) that tenant's hold: it changes nothing instead.
        query(sql!(
            "INSERT INTO cvc_holds (token, tenant_id, dek_id, ciphertext, expires_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (token) DO UPDATE SET dek_id = EXCLUDED.dek_id, \
             ciphertext = EXCLUDED.ciphertext, expires_at = EXCLUDED.expires_at \
             WHERE cvc_holds.tenant_id = EXCLUDED.tenant_id"
        ))
        .bind(&row.token)
        .bind(&row.tenant_id)
        .bind(row.dek_id)
        .bind(&row.ciphertext)
        .bind(row.expires_at)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(())
    }

    async fn take_cvc_hold(
        &self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError> {
        take_cvc_hold_row(&mut self.pooled().await?, tenant_id, token, now).await
    }

    async fn delete_expired_cvc_holds(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // As for cards: bounded per statement, SKIP LOCKED so replicas sweep side by side.
        Ok(query(sql!(
            "DELETE FROM cvc_holds WHERE token IN (SELECT token FROM cvc_holds \
             WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .execute(&mut self.pooled().await?)
        .await?)
    }

    async fn charge_operation_by_key(
        &self,
        tenant_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<ChargeOperationRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_operation_columns!(),
            " FROM charge_operations WHERE tenant_id = $1 AND idempotency_key = $2"
        ))
        .bind(tenant_id)
        .bind(idempotency_key)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(charge_operation_from_row)
        .transpose()
    }

    async fn charge_operation(&self, id: &str) -> Result<Option<ChargeOperationRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_operation_columns!(),
            " FROM charge_operations WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(charge_operation_from_row)
        .transpose()
    }

    async fn claim_charge_operation_send(
        &self,
        id: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // As for a charge: the second of two claims re-checks the WHERE on the updated row.
        let done = query(sql!(
            "UPDATE charge_operations SET sending_until = $3, attempts = attempts + 1, \
             updated_at = $2 WHERE id = $1 AND status IN ('pending', 'unknown') \
             AND (sending_until IS NULL OR sending_until < $2)"
        ))
        .bind(id)
        .bind(now)
        .bind(until)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }
}

#[async_trait]
impl<T: TxDb> ChargeTx for T {
    async fn settle_charge(
        &mut self,
        id: &str,
        settlement: &ChargeSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        settle_charge_row(self, id, settlement, now).await
    }

    async fn take_cvc_hold(
        &mut self,
        tenant_id: &str,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<Option<CvcHoldRow>, StoreError> {
        take_cvc_hold_row(self, tenant_id, token, now).await
    }

    async fn attach_charge_cvc(
        &mut self,
        charge_id: &str,
        hold: &CvcHoldRow,
    ) -> Result<(), StoreError> {
        // Only to an unsettled charge of the hold's own tenant and token: a charge that
        // settled meanwhile must not get a CVC back (settling erased it), and a hold never
        // moves to another card. Otherwise nothing is stored.
        query(sql!(
            "UPDATE charges SET cvc_dek_id = $4, cvc_ciphertext = $5, cvc_expires_at = $6 \
             WHERE id = $1 AND tenant_id = $2 AND token = $3 \
             AND status IN ('pending', 'unknown')"
        ))
        .bind(charge_id)
        .bind(&hold.tenant_id)
        .bind(&hold.token)
        .bind(hold.dek_id)
        .bind(&hold.ciphertext)
        .bind(hold.expires_at)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn lock_charge(&mut self, id: &str) -> Result<Option<ChargeRow>, StoreError> {
        // FOR UPDATE on PostgreSQL; a SQLite transaction took the write lock when it began
        // (`BEGIN IMMEDIATE`), and the dialect drops the clause.
        query(sql!(
            "SELECT ",
            charge_columns!(),
            " FROM charges WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(charge_from_row)
        .transpose()
    }

    async fn charge_operations(
        &mut self,
        charge_id: &str,
    ) -> Result<Vec<ChargeOperationRow>, StoreError> {
        query(sql!(
            "SELECT ",
            charge_operation_columns!(),
            " FROM charge_operations WHERE charge_id = $1 ORDER BY created_at, id"
        ))
        .bind(charge_id)
        .fetch_all(self)
        .await?
        .iter()
        .map(charge_operation_from_row)
        .collect()
    }

    async fn insert_charge_operation(
        &mut self,
        row: &ChargeOperationRow,
    ) -> Result<bool, StoreError> {
        // The arbiter is the idempotency index only: a clash on the primary key stays an
        // error.
        let done = query(sql!(
            "INSERT INTO charge_operations (id, tenant_id, charge_id, kind, idempotency_key, \
             request_hash, amount, status, gateway_id, amount_done, message, attempts, \
             sending_until, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING"
        ))
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.charge_id)
        .bind(row.kind)
        .bind(&row.idempotency_key)
        .bind(&row.request_hash)
        .bind(op_amount(row.amount)?)
        .bind(row.status)
        .bind(&row.gateway_id)
        .bind(row.amount_done.map(op_amount).transpose()?)
        .bind(&row.message)
        .bind(int4(row.attempts, "operation attempts out of range")?)
        .bind(row.sending_until)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(self)
        .await?;
        Ok(done == 1)
    }

    async fn settle_charge_operation(
        &mut self,
        id: &str,
        settlement: &OperationSettlement,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE charge_operations SET status = $2, \
             gateway_id = COALESCE($3, gateway_id), amount_done = COALESCE($4, amount_done), \
             message = $5, sending_until = NULL, updated_at = $6 \
             WHERE id = $1 AND status IN ('pending', 'unknown')"
        ))
        .bind(id)
        .bind(settlement.status)
        .bind(&settlement.gateway_id)
        .bind(settlement.amount_done.map(op_amount).transpose()?)
        .bind(&settlement.message)
        .bind(now)
        .execute(self)
        .await?;
        Ok(done == 1)
    }
}
