//! The deadline of the call a task is serving, so work deep in the vault (the group commit)
//! can tell that the caller has already given up and abandon the call's writes before they
//! start, rather than store a card nobody will ever learn the token of.

use std::future::Future;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `work` with `deadline` as its call's deadline.
pub async fn within<F: Future>(deadline: Instant, work: F) -> F::Output {
    DEADLINE.scope(deadline, work).await
}

/// The deadline of the call this task serves, if it has one.
pub(crate) fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}
