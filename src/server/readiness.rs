//! Readiness: gRPC health and `/readyz` follow what the vault needs to serve — a database
//! that answers, a key provider that can unwrap, a schema not behind the binary — checked
//! every [`READINESS_INTERVAL`], each check bounded by [`CHECK_TIMEOUT`], so readiness
//! follows a failure within about two seconds. Shutting down makes the vault not ready at
//! once, whatever the checks say.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use super::{READINESS_INTERVAL, SERVICE_NAME};
use crate::{crypto::KeyProvider, store::Store};

/// Longest one check may take before it counts as failed: a database or HSM that takes
/// longer than this is not one to send traffic to.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// One check's last outcome.
#[derive(Debug, Clone)]
struct Check {
    name: &'static str,
    /// `None` when it passed; else why not (never secrets, never URLs).
    failure: Option<String>,
}

/// What `/readyz`, gRPC health and admission read.
#[derive(Debug)]
pub(super) struct Readiness {
    ready: AtomicBool,
    draining: AtomicBool,
    /// Shared with admission, which refuses calls at once while it is set.
    database_down: Arc<AtomicBool>,
    checks: Mutex<Vec<Check>>,
}

impl Readiness {
    /// Not ready until the first round of checks passes. The database counts as up until a
    /// check says otherwise, so calls are not refused before anything was checked.
    pub(super) fn new() -> Arc<Readiness> {
        Arc::new(Readiness {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            database_down: Arc::new(AtomicBool::new(false)),
            checks: Mutex::new(vec![Check {
                name: "startup",
                failure: Some("not checked yet".to_owned()),
            }]),
        })
    }

    /// The flag admission reads.
    pub(super) fn database_down(&self) -> Arc<AtomicBool> {
        self.database_down.clone()
    }

    /// Whether `/readyz` answers 200.
    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// From now on not ready, whatever the checks find: the vault is shutting down.
    pub(super) fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    /// `/readyz`'s body: one line per check, `name: ok` or `name: failing: reason`.
    pub(super) fn report(&self) -> String {
        let mut body = String::from(if self.is_ready() {
            "ready\n"
        } else {
            "not ready\n"
        });
        if self.draining.load(Ordering::SeqCst) {
            body.push_str("shutdown: failing: the vault is shutting down\n");
        }
        for check in self
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = match &check.failure {
                None => writeln!(body, "{}: ok", check.name),
                Some(why) => writeln!(body, "{}: failing: {why}", check.name),
            };
        }
        body
    }

    fn set(&self, checks: Vec<Check>) -> bool {
        let ok = checks.iter().all(|c| c.failure.is_none());
        *self.checks.lock().unwrap_or_else(PoisonError::into_inner) = checks;
        self.ready.store(ok, Ordering::SeqCst);
        // A drain that raced this round wins.
        if self.draining.load(Ordering::SeqCst) {
            self.ready.store(false, Ordering::SeqCst);
            return false;
        }
        ok
    }
}

/// Runs the checks every [`READINESS_INTERVAL`] until `stop`, keeping gRPC health in step.
pub(super) async fn readiness(
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyProvider>,
    health: HealthReporter,
    state: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(READINESS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ready = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let checks = run_checks(store.as_ref(), keys.as_ref(), &state.database_down).await;
        for check in &checks {
            if let Some(why) = &check.failure {
                tracing::debug!(check = check.name, reason = %why, "readiness check failing");
            }
        }
        let ready = state.set(checks);
        if ready != was_ready {
            tracing::info!(ready, report = %state.report().trim_end(), "readiness changed");
            was_ready = ready;
        }
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(SERVICE_NAME, status).await;
    }
}

/// One round: the database first (the schema check needs it), the key provider alongside.
async fn run_checks(
    store: &dyn Store,
    keys: &dyn KeyProvider,
    database_down: &AtomicBool,
) -> Vec<Check> {
    let (database, keys) = tokio::join!(
        bounded(async { store.ping().await.map_err(|e| e.to_string()) }),
        bounded(async { keys.check().await.map_err(|e| e.to_string()) }),
    );
    database_down.store(database.is_err(), Ordering::SeqCst);
    let migrations = if database.is_ok() {
        bounded(async {
            match store.pending_migrations().await {
                Ok(pending) if pending.is_empty() => Ok(()),
                Ok(pending) => Err(format!(
                    "{} migration(s) of this binary not applied (first {}); run `cardvault \
                     migrate`",
                    pending.len(),
                    pending[0]
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    } else {
        Err("not checked: the database does not answer".to_owned())
    };
    vec![
        Check {
            name: "database",
            failure: database.err(),
        },
        Check {
            name: "keys",
            failure: keys
                .err()
                .map(|why| format!("the key provider cannot unwrap: {why}")),
        },
        Check {
            name: "migrations",
            failure: migrations.err(),
        },
    ]
}

/// `check`, failed when it takes longer than [`CHECK_TIMEOUT`].
async fn bounded(check: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passing() -> Vec<Check> {
        ["database", "keys", "migrations"]
            .into_iter()
            .map(|name| Check {
                name,
                failure: None,
            })
            .collect()
    }

    #[test]
    fn ready_only_when_every_check_passes_and_the_body_says_why_not() {
        let state = Readiness::new();
        assert!(!state.is_ready(), "not ready before the first round");
        assert!(state.set(passing()));
        assert!(state.is_ready());
        assert!(state.report().starts_with("ready\n"));

        let mut checks = passing();
        checks[1].failure = Some("the key provider cannot unwrap: HSM logged out".to_owned());
        assert!(!state.set(checks));
        let report = state.report();
        assert!(report.starts_with("not ready\n"), "{report}");
        assert!(report.contains("keys: failing: the key provider cannot unwrap"));
        assert!(report.contains("database: ok"));
    }

    #[test]
    fn a_drain_makes_it_not_ready_for_good() {
        let state = Readiness::new();
        assert!(state.set(passing()));
        state.drain();
        assert!(!state.is_ready());
        assert!(
            !state.set(passing()),
            "checks passing after a drain do not undo it"
        );
        assert!(!state.is_ready());
        assert!(state.report().contains("shutdown: failing"));
    }
}
