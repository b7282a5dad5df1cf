//! Guess budgets: how many answers a principal gets, per hour, that compare a card number it
//! sends with one the vault stores. Without `reveal` a caller must never learn a stored PAN,
//! yet two answers do compare: `ImportCards` tells a resend of an import id with the same
//! number (`ALREADY_IMPORTED`) from one with another number (`CONFLICT`), and `Tokenize` with
//! `reuse_existing` tells a stored card (`created: false`) from a new one. Knowing a stored
//! card's BIN and last 4 leaves about 1000 Luhn-valid candidates for a 16-digit PAN, so an
//! unbounded number of such answers finds the PAN in minutes.
//!
//! Each budget is a token bucket per principal (per replica, like the other abuse limits).
//! The rule that keeps an exhausted budget from becoming an oracle of its own: whether a
//! request is refused depends only on the budget and on what the caller already knows, never
//! on the comparison the request asks for.

use std::time::Instant;

use super::{Authorized, Vault, VaultError, event, limits::RateLimiter};
use crate::audit::Outcome;

/// The budgets' buckets.
#[derive(Debug)]
pub(super) struct Guesses {
    /// Conflicting import resends, per principal.
    pub import_conflicts: RateLimiter,
    /// `reuse_existing` hits, per principal.
    pub reuse_hits: RateLimiter,
    /// `reuse_existing` misses, per principal, BIN and last 4.
    pub reuse_misses: RateLimiter,
}

impl Guesses {
    pub(super) fn new(budgets: super::limits::GuessBudgets) -> Guesses {
        Guesses {
            import_conflicts: RateLimiter::hourly(budgets.import_conflicts_per_hour),
            reuse_hits: RateLimiter::hourly(budgets.reuse_hits_per_hour),
            reuse_misses: RateLimiter::hourly(budgets.reuse_misses_per_hour),
        }
    }
}

/// Which budget ran out: the `kind` label of `cardvault_guess_budget_exceeded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GuessKind {
    /// `ImportCards` conflicts.
    ImportConflicts,
    /// `reuse_existing` hits.
    ReuseHits,
    /// `reuse_existing` misses for one BIN and last 4.
    ReuseMisses,
}

impl GuessKind {
    fn as_str(self) -> &'static str {
        match self {
            GuessKind::ImportConflicts => "import_conflicts",
            GuessKind::ReuseHits => "reuse_hits",
            GuessKind::ReuseMisses => "reuse_misses",
        }
    }
}

/// A `reuse_existing` request's reserved budget: one hit of its principal and one miss of
/// its principal, BIN and last 4 (kept by its key).
#[derive(Debug)]
pub(super) struct ReuseReservation {
    miss: String,
}

/// The key of a principal's `reuse_existing` miss budget for one BIN and last 4.
fn miss_key(principal: &str, bin: &str, last4: &str) -> String {
    format!("{principal}\u{0}{bin}\u{0}{last4}")
}

impl Vault {
    /// Reserves what a `reuse_existing` request for a card with this BIN and last 4 may
    /// cost: one hit and one miss for its BIN and last 4, taken before the lookup, so a
    /// refusal says nothing about whether the card is stored, and concurrent requests cannot
    /// all pass on the same remaining token. [`Vault::settle_reuse_budget`] gives back the
    /// one the answer did not use.
    pub(super) async fn reserve_reuse_budget(
        &self,
        auth: &Authorized,
        bin: &str,
        last4: &str,
    ) -> Result<ReuseReservation, VaultError> {
        let principal = &auth.caller().principal.id;
        let miss = miss_key(principal, bin, last4);
        let now = Instant::now();
        let exhausted = if !self.guesses.reuse_hits.take(principal, now) {
            Some(GuessKind::ReuseHits)
        } else if !self.guesses.reuse_misses.take(&miss, now) {
            self.guesses.reuse_hits.give_back(principal, now);
            Some(GuessKind::ReuseMisses)
        } else {
            None
        };
        match exhausted {
            Some(kind) => Err(self
                .refuse_guess(
                    auth,
                    kind,
                    "reuse_existing refused until the budget refills".to_owned(),
                )
                .await),
            None => Ok(ReuseReservation { miss }),
        }
    }

    /// Gives back the part of a reservation the answer did not use: the miss when an
    /// existing token was returned (`Some(false)`), the hit when a card was stored
    /// (`Some(true)`), both when the request failed before answering (`None`).
    pub(super) fn settle_reuse_budget(
        &self,
        auth: &Authorized,
        reservation: ReuseReservation,
        created: Option<bool>,
    ) {
        let principal = &auth.caller().principal.id;
        let now = Instant::now();
        if created != Some(false) {
            self.guesses.reuse_hits.give_back(principal, now);
        }
        if created != Some(true) {
            self.guesses.reuse_misses.give_back(&reservation.miss, now);
        }
    }

    /// Records a request refused for an exhausted guess budget as an alarm (audit record
    /// marked `alarm`, an error-level log line without card data, a metric) and returns the
    /// error to answer with.
    pub(super) async fn refuse_guess(
        &self,
        auth: &Authorized,
        kind: GuessKind,
        detail: String,
    ) -> VaultError {
        let mut refused = event(auth, Outcome::RateLimited, None);
        refused.alarm = true;
        refused.detail = Some(format!("guess budget {} exceeded: {detail}", kind.as_str()));
        self.record(&refused).await;
        let caller = auth.caller();
        tracing::error!(
            alarm = "guess_budget",
            kind = kind.as_str(),
            action = auth.action().as_str(),
            tenant = %caller.tenant(),
            principal = %caller.principal.id,
            peer = caller.peer.as_deref().unwrap_or(""),
            "GUESS BUDGET EXCEEDED: a caller keeps comparing card numbers with stored ones; \
             check this principal"
        );
        metrics::counter!("cardvault_guess_budget_exceeded_total", "kind" => kind.as_str())
            .increment(1);
        VaultError::RateLimited
    }
}
