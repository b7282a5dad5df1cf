//! The background reconciler: settles unknown charges (and pending ones whose sender went
//! away) of every tenant without an operator, by asking their gateways (see
//! the `settle` module). One replica at a time runs it, under the `charges.reconcile`
//! job lease; each charge it cannot settle waits longer before its next turn (the interval, 30 s
//! by default, doubling, at most an hour). A charge unknown for longer than the alarm age raises an alarm: an error
//! log line on every run and an audit record once.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::{
    Vault, VaultError,
    settle::{Actor, RECONCILER_PRINCIPAL, is_unsettled},
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    store::{ChargeRow, ChargeState},
};

/// The name of the reconciler's job lease.
pub const JOB_NAME: &str = "charges.reconcile";

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

/// Runs until `stop` turns true: every `interval`, one [`reconcile_once`] as `owner`; then
/// gives up the lease.
pub async fn run(vault: Arc<Vault>, owner: String, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(vault.options.reconcile.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        if let Err(err) = reconcile_once(&vault, &owner, OffsetDateTime::now_utc()).await {
            tracing::warn!(error = %err, "reconciling charges failed; will retry");
        }
    }
    // Another replica takes over at its next run rather than after the lease.
    if let Err(err) = vault.store.release_job_lease(JOB_NAME, &owner).await {
        tracing::debug!(error = %err, "could not release the reconciler's lease");
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
    // Longer than one charge's turn (bounded by the send lease) and than the interval.
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
        // Renewed before each charge, whose turn the send lease bounds; lost, the run ends.
        let renewed_at = OffsetDateTime::now_utc();
        let Some(until) = renewed_at.checked_add(lease) else {
            break;
        };
        if !vault
            .store
            .claim_job_lease(JOB_NAME, owner, renewed_at, until)
            .await?
        {
            break;
        }
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
            .checked_add(backoff(options.interval, attempts))
            .ok_or_else(|| VaultError::internal("reconcile backoff out of range", "overflow"))?;
        vault
            .store
            .defer_charge_reconcile(&current.id, attempts, next)
            .await?;
    }
    let overdue_before = now
        .checked_sub(alarm_age)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    // Every overdue charge, whether or not its backoff made it due in this run; oldest first,
    // so the overdue ones come before the rest.
    for charge in vault
        .store
        .unsettled_charges(None, now, options.batch)
        .await?
    {
        if charge.created_at >= overdue_before {
            break;
        }
        if charge.status != ChargeState::Unknown {
            continue;
        }
        run.alarmed += 1;
        alarm(vault, &charge, now).await?;
    }
    let (unknown, overdue) = vault.store.unknown_charge_counts(overdue_before).await?;
    metrics::gauge!("cardvault_charges_unknown").set(unknown as f64);
    metrics::gauge!("cardvault_charges_unknown_overdue").set(overdue as f64);
    Ok(run)
}

/// Raises the alarm for a charge unknown for too long: the log line every time, the audit
/// record once.
async fn alarm(vault: &Vault, charge: &ChargeRow, now: OffsetDateTime) -> Result<(), VaultError> {
    let age = now - charge.created_at;
    tracing::error!(
        alarm = "charge_unknown",
        charge = %charge.id,
        tenant = %charge.tenant_id,
        gateway = %charge.gateway,
        age_secs = age.whole_seconds(),
        "CHARGE UNKNOWN TOO LONG: the gateway's outcome of this charge is still not known; \
         settle it at the gateway"
    );
    if vault.store.mark_charge_alarmed(&charge.id, now).await? {
        let mut alarm = AuditEvent::now(Action::ReconcileCharges, Outcome::Ok);
        alarm.tenant = Some(charge.tenant_id.clone());
        alarm.principal = Some(RECONCILER_PRINCIPAL.to_owned());
        alarm.token = Some(charge.token.clone());
        alarm.alarm = true;
        alarm.detail = Some(super::settle::charge_detail(
            charge,
            &format!(
                "unknown for {} s, past the alarm age: settle it at the gateway",
                age.whole_seconds()
            ),
        ));
        vault.record(&alarm).await;
    }
    Ok(())
}

/// The wait before the `attempts`-th next try: the interval (30 s by default) doubling, at
/// most an hour.
fn backoff(interval: Duration, attempts: u32) -> time::Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    let wait = interval.saturating_mul(1 << doublings).min(MAX_BACKOFF);
    time::Duration::try_from(wait).unwrap_or(time::Duration::HOUR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_up_to_an_hour() {
        let thirty = Duration::from_secs(30);
        let secs: Vec<i64> = (1..=9)
            .map(|n| backoff(thirty, n).whole_seconds())
            .collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(backoff(thirty, u32::MAX).whole_seconds(), 3600);
        assert_eq!(backoff(Duration::from_secs(1), 3).whole_seconds(), 4);
    }
}
