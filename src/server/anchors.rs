//! Audit anchors: the chains' heads written outside the database, on a timer and at stop.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    audit::{self, AnchorSink, AuditError},
    vault::Vault,
};

/// Appends an anchor of the audit chains' heads to `sink` at start, every `interval`, and
/// once more at stop (after the last request drained, so it covers every record this replica
/// wrote). Anchoring reads the head rows without locking them, in a task of its own, so it
/// never holds up a request; a failure is logged, counted, and retried at the next tick.
pub(super) async fn audit_anchors(
    vault: Arc<Vault>,
    sink: AnchorSink,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => *stop.borrow(),
            _ = stop.changed() => true,
        };
        write_anchor(&vault, &sink).await;
        if stopping {
            return;
        }
    }
}

async fn write_anchor(vault: &Vault, sink: &AnchorSink) {
    let written = match vault.auditor().await {
        Ok(auditor) => match auditor.anchor(vault.store().as_ref()).await {
            Ok(anchor) => sink.append(&anchor).await.map(|()| anchor),
            Err(err) => Err(err),
        },
        Err(err) => {
            tracing::warn!(error = %err, "cannot anchor the audit log yet; will retry");
            metrics::counter!("cardvault_audit_anchors_total", "outcome" => "failed").increment(1);
            return;
        }
    };
    match written {
        Ok(anchor) => {
            tracing::debug!(seq = anchor.seq, "audit anchor written");
            metrics::counter!("cardvault_audit_anchors_total", "outcome" => "written").increment(1);
        }
        Err(err) => {
            if matches!(err, AuditError::Corrupt(_)) {
                metrics::counter!(audit::VERIFY_FAILURES, "check" => "head").increment(1);
            }
            tracing::error!(error = %err, "writing an audit anchor failed; will retry");
            metrics::counter!("cardvault_audit_anchors_total", "outcome" => "failed").increment(1);
        }
    }
}
