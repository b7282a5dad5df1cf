//! Refusals recorded per source and window, so a flood of refused requests cannot grow the
//! audit log without bound.
//!
//! Every refused request used to write its own HMAC'd audit record: a client sending bad
//! tokens in a loop wrote rows as fast as it could send, each one a transaction. Now the first
//! refusal of a source (a peer address, an API key id, a principal) opens a window and is
//! recorded at once, so an alarm on it is never late; further refusals of that source in the
//! window are only counted (and in `cardvault_refusals_aggregated_total`), and the count goes
//! into one more record when the window closes ([`run`] looks every few seconds) or when the
//! source's next refusal after it arrives, whichever is first. A flood costs at most two
//! records per source per window.
//!
//! The windows held are bounded: past [`MAX_SOURCES`] open windows, new sources share one
//! window of their own, so cycling addresses costs bounded memory and bounded records too.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::Vault;
use crate::audit::{AuditEvent, Outcome};

/// Most sources with a window open at once.
pub const MAX_SOURCES: usize = 10_000;

/// The source that stands for every new one while [`MAX_SOURCES`] windows are open.
const OVERFLOW: &str = "*";

/// One source's open window: its first refusal went to the log, the rest are counted.
#[derive(Debug)]
struct Window {
    opened: Instant,
    /// The first refusal, the template of the summary record.
    first: AuditEvent,
    /// How the source is named in the summary (`127.0.0.1 (API key k_…)`).
    source: String,
    /// Refusals counted after the first, per outcome.
    counted: Vec<(Outcome, u64)>,
}

impl Window {
    fn count(&mut self, outcome: Outcome) {
        match self.counted.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, n)) => *n += 1,
            None => self.counted.push((outcome, 1)),
        }
    }

    /// The record of what was counted, if anything was.
    fn summary(self, window: Duration) -> Option<AuditEvent> {
        let total: u64 = self.counted.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return None;
        }
        let outcome = self
            .counted
            .iter()
            .max_by_key(|(_, n)| *n)
            .map_or(self.first.outcome, |(o, _)| *o);
        let breakdown = self
            .counted
            .iter()
            .map(|(o, n)| format!("{n} {}", o.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut event = AuditEvent::now(self.first.action, outcome);
        event.tenant = self.first.tenant;
        event.principal = self.first.principal;
        event.peer = self.first.peer;
        event.detail = Some(format!(
            "{total} more refusals from {} in {} s ({breakdown})",
            self.source,
            window.as_secs().max(1)
        ));
        Some(event)
    }
}

/// The open windows of one vault.
#[derive(Debug)]
pub(super) struct Refusals {
    window: Duration,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    windows: HashMap<String, Window>,
    /// When windows were last closed to make room: at most once a second, so a flood of new
    /// sources at the cap does not scan every window on every refusal.
    made_room: Option<Instant>,
}

impl Refusals {
    /// Windows of `window` each.
    pub(super) fn new(window: Duration) -> Refusals {
        Refusals {
            window: window.max(Duration::from_secs(1)),
            open: Mutex::new(Open::default()),
        }
    }

    /// How long a window stays open.
    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// Takes one refusal of `key` (named `source` in the summary) at `now`; returns the
    /// records to write now: none while its window is open, else the summary of the window
    /// that closed (if it counted anything) and this refusal, which opens the next.
    pub(super) fn note(
        &self,
        key: String,
        source: String,
        event: AuditEvent,
        now: Instant,
    ) -> Vec<AuditEvent> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut write = Vec::new();
        let mut key = key;
        let mut source = source;
        if !open.windows.contains_key(&key) && open.windows.len() >= MAX_SOURCES {
            if open
                .made_room
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
            {
                open.made_room = Some(now);
                write.extend(self.close(&mut open.windows, now, false));
            }
            if open.windows.len() >= MAX_SOURCES {
                key = OVERFLOW.to_owned();
                source = "many sources".to_owned();
            }
        }
        let open = &mut open.windows;
        match open.get_mut(&key) {
            Some(window) if now.saturating_duration_since(window.opened) < self.window => {
                window.count(event.outcome);
                metrics::counter!(
                    "cardvault_refusals_aggregated_total",
                    "action" => event.action.as_str(),
                    "outcome" => event.outcome.as_str(),
                )
                .increment(1);
                return write;
            }
            Some(_) => {
                if let Some(closed) = open.remove(&key) {
                    write.extend(closed.summary(self.window));
                }
            }
            None => {}
        }
        open.insert(
            key,
            Window {
                opened: now,
                first: event.clone(),
                source,
                counted: Vec::new(),
            },
        );
        write.push(event);
        write
    }

    /// Closes the windows that are over at `now` (every window when `all`); returns the
    /// summaries to write.
    pub(super) fn closed(&self, now: Instant, all: bool) -> Vec<AuditEvent> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        self.close(&mut open.windows, now, all)
    }

    fn close(
        &self,
        open: &mut HashMap<String, Window>,
        now: Instant,
        all: bool,
    ) -> Vec<AuditEvent> {
        let over: Vec<String> = open
            .iter()
            .filter(|(_, w)| all || now.saturating_duration_since(w.opened) >= self.window)
            .map(|(key, _)| key.clone())
            .collect();
        over.into_iter()
            .filter_map(|key| open.remove(&key))
            .filter_map(|window| window.summary(self.window))
            .collect()
    }
}

/// Writes the counts of closed windows every few seconds until `stop`, then the counts of
/// every window still open, so a count is never lost to a restart.
pub async fn run(vault: Arc<Vault>, mut stop: watch::Receiver<bool>) {
    let every =
        (vault.refusals.window() / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => vault.flush_refusals(false).await,
            _ = stop.changed() => break,
        }
    }
    vault.flush_refusals(true).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Action;

    fn refusal(outcome: Outcome) -> AuditEvent {
        let mut event = AuditEvent::now(Action::Authenticate, outcome);
        event.peer = Some("192.0.2.1:4000".to_owned());
        event
    }

    #[test]
    fn a_flood_is_one_record_at_once_and_one_count_at_the_end() {
        let refusals = Refusals::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let key = || "auth:192.0.2.1".to_owned();
        let source = || "192.0.2.1".to_owned();
        let first = refusals.note(key(), source(), refusal(Outcome::Unauthenticated), t0);
        assert_eq!(first.len(), 1, "the first refusal is recorded at once");
        for i in 0..499u64 {
            let outcome = if i < 9 {
                Outcome::Unauthenticated
            } else {
                Outcome::RateLimited
            };
            let at = t0 + Duration::from_millis(i);
            assert!(
                refusals
                    .note(key(), source(), refusal(outcome), at)
                    .is_empty()
            );
        }
        assert!(
            refusals
                .closed(t0 + Duration::from_secs(59), false)
                .is_empty()
        );
        let summary = refusals.closed(t0 + Duration::from_secs(60), false);
        assert_eq!(summary.len(), 1);
        let detail = summary[0].detail.as_deref().unwrap();
        assert_eq!(
            detail,
            "499 more refusals from 192.0.2.1 in 60 s (9 unauthenticated, 490 rate_limited)"
        );
        assert_eq!(summary[0].outcome, Outcome::RateLimited);
        assert_eq!(summary[0].peer.as_deref(), Some("192.0.2.1:4000"));
        // Nothing left to write.
        assert!(
            refusals
                .closed(t0 + Duration::from_secs(600), true)
                .is_empty()
        );
    }

    #[test]
    fn the_next_refusal_after_a_window_writes_its_count_and_opens_another() {
        let refusals = Refusals::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let note = |at| {
            refusals.note(
                "k".to_owned(),
                "s".to_owned(),
                refusal(Outcome::Unauthenticated),
                at,
            )
        };
        assert_eq!(note(t0).len(), 1);
        assert!(note(t0 + Duration::from_secs(1)).is_empty());
        let written = note(t0 + Duration::from_secs(11));
        assert_eq!(written.len(), 2);
        assert!(written[0].detail.as_deref().unwrap().starts_with("1 more"));
        assert!(written[1].detail.is_none(), "then the new first refusal");
        // A quiet window closes without a record.
        assert!(
            refusals
                .closed(t0 + Duration::from_secs(30), false)
                .is_empty()
        );
    }

    #[test]
    fn sources_past_the_cap_share_one_window() {
        let refusals = Refusals::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut written = 0;
        for i in 0..MAX_SOURCES + 500 {
            written += refusals
                .note(
                    format!("auth:{i}"),
                    format!("{i}"),
                    refusal(Outcome::Unauthenticated),
                    t0,
                )
                .len();
        }
        assert_eq!(
            written,
            MAX_SOURCES + 1,
            "one record per window, one overflow window"
        );
        assert_eq!(
            refusals.open.lock().unwrap().windows.len(),
            MAX_SOURCES + 1,
            "memory stays bounded"
        );
        let summaries = refusals.closed(t0, true);
        assert_eq!(summaries.len(), 1);
        assert!(
            summaries[0]
                .detail
                .as_deref()
                .unwrap()
                .starts_with("499 more refusals from many sources"),
            "{summaries:?}"
        );
    }
}
