//! The background reconciler: settles unknown charges (and pending ones whose sender went
//! away) of every tenant without an operator, by asking their gateways (see
//! [`settle`](super::settle)). One replica at a time runs it, under the `charges.reconcile`
//! job lease; each charge it cannot settle waits longer before its next turn (30 s, doubling,
//! at most an hour). A charge unknown for longer than the alarm age raises an alarm: an error
//! log line on every run and an audit record once.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::{
    Vault, VaultError,
    settle::{Actor, RECONCILER_PRINCIPAL, is_unsettled},
};
use crate::audit::{Action, AuditEvent, Outcome};

/// The name of the reconciler's job lease.
pub const JOB_NAME: &str = "charges.reconcile";

/// The first wait after a reconciliation that left a charge unsettled.
const FIRST_BACKOFF: Duration = Duration::from_secs(30);

/// The longest wait between two reconciliations of one charge.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How the reconciler runs.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Between two runs.
    pub interval: Duration,
    /// A charge unknown for longer raises the alarm.
    pub unknown_alarm: Duration,
    /// Most charges settled in one run.
    pub batch: u32,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            interval: Duration::from_secs(30),
            unknown_alarm: Duration::from_secs(3600),
            batch: 100,
        }
    }
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileRun {
    /// Whether this replica held the lease (else it did nothing).
    pub leader: bool,
    /// Charges it looked at.
    pub examined: usize,
    /// Of those, how many it settled to a final status.
    pub settled: usize,
    /// Charges past the alarm age it raised the alarm for in this run.
    pub alarmed: usize,
}

/// Runs until `stop` turns true: every `interval`, one [`reconcile_once`] as `owner`.
pub async fn run(vault: Arc<Vault>, owner: String, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(vault.options.reconcile.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if let Err(err) = reconcile_once(&vault, &owner, OffsetDateTime::now_utc()).await {
            tracing::warn!(error = %err, "reconciling charges failed; will retry");
        }
    }
}

/// One run as `owner` at `now`: takes the job lease (or returns, another replica has it),
/// settles the due charges, raises the alarms and updates the gauges.
pub async fn reconcile_once(
    vault: &Vault,
    owner: &str,
    now: OffsetDateTime,
) -> Result<ReconcileRun, VaultError> {
    let options = &vault.options.reconcile;
    // Longer than a run can take: every charge's turn is bounded by the send lease.
    let lease = time::Duration::try_from(
        vault
            .options
            .charge_send_lease
            .saturating_mul(2)
            .max(options.interval.saturating_mul(2)),
    )
    .map_err(|e| VaultError::internal("reconcile lease out of range", e))?;
    let until = now
        .checked_add(lease)
        .ok_or_else(|| VaultError::internal("reconcile lease out of range", "overflow"))?;
    if !vault
        .store
        .claim_job_lease(JOB_NAME, owner, now, until)
        .await?
    {
        return Ok(ReconcileRun::default());
    }
    let mut run = ReconcileRun {
        leader: true,
        ..ReconcileRun::default()
    };
    let alarm_age = time::Duration::try_from(options.unknown_alarm)
        .map_err(|e| VaultError::internal("charge alarm age out of range", e))?;
    for charge in vault.store.charges_due(now, options.batch).await? {
        run.examined += 1;
        let current = match vault.settle(Actor::Reconciler, &charge, None).await {
            Ok(done) => done.charge,
            // A gateway only another replica has: left for that replica.
            Err(VaultError::Precondition(why)) => {
                tracing::debug!(charge = %charge.id, %why, "charge left for another replica");
                charge
            }
            Err(err) => {
                tracing::warn!(charge = %charge.id, error = %err, "settling a charge failed");
                charge
            }
        };
        if !is_unsettled(&current) {
            run.settled += 1;
            continue;
        }
        let attempts = current.reconcile_attempts.saturating_add(1);
        let next = now
            .checked_add(backoff(attempts))
            .ok_or_else(|| VaultError::internal("reconcile backoff out of range", "overflow"))?;
        vault
            .store
            .defer_charge_reconcile(&current.id, attempts, next)
            .await?;
        let age = now - current.created_at;
        if current.status == "unknown" && age > alarm_age {
            run.alarmed += 1;
            tracing::error!(
                alarm = "charge_unknown",
                charge = %current.id,
                tenant = %current.tenant_id,
                gateway = %current.gateway,
                age_secs = age.whole_seconds(),
                "CHARGE UNKNOWN TOO LONG: the gateway's outcome of this charge is still not \
                 known; settle it at the gateway"
            );
            if vault.store.mark_charge_alarmed(&current.id, now).await? {
                let mut alarm = AuditEvent::now(Action::ReconcileCharges, Outcome::Ok);
                alarm.tenant = Some(current.tenant_id.clone());
                alarm.principal = Some(RECONCILER_PRINCIPAL.to_owned());
                alarm.token = Some(current.token.clone());
                alarm.alarm = true;
                alarm.detail = Some(super::settle::charge_detail(
                    &current,
                    &format!(
                        "unknown for {} s, past the alarm age: settle it at the gateway",
                        age.whole_seconds()
                    ),
                ));
                vault.record(&alarm).await;
            }
        }
    }
    let overdue_before = now
        .checked_sub(alarm_age)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let (unknown, overdue) = vault.store.unknown_charge_counts(overdue_before).await?;
    metrics::gauge!("cardvault_charges_unknown").set(unknown as f64);
    metrics::gauge!("cardvault_charges_unknown_overdue").set(overdue as f64);
    Ok(run)
}

/// The wait before the `attempts`-th next try: 30 s doubling, at most an hour.
fn backoff(attempts: u32) -> time::Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    let wait = FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF);
    time::Duration::try_from(wait).unwrap_or(time::Duration::HOUR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_thirty_seconds_up_to_an_hour() {
        let secs: Vec<i64> = (1..=9).map(|n| backoff(n).whole_seconds()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(backoff(u32::MAX).whole_seconds(), 3600);
    }
}
