//! `cardvault audit verify`: walks every chain from genesis to head, and checks the chains
//! against anchors when given.

use std::{collections::BTreeMap, fmt};

use super::{
    AuditError, Auditor,
    anchor::{AnchorRef, Anchors, Point},
    chain,
};
use crate::store::AuditRepo;

/// Records read per query while walking a chain.
const PAGE: u32 = 1_000;

/// Where a chain is broken, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The chain.
    pub shard: u32,
    /// The first record that is missing or fails verification (for a bad head: the
    /// sequence number the head claims).
    pub seq: u64,
    /// What is wrong, for operators.
    pub reason: &'static str,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chain {} record {}: {}",
            self.shard, self.seq, self.reason
        )
    }
}

/// Where a chain disagrees with an anchor: the log was rolled back to an older copy, or
/// rewritten since the anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorBreak {
    /// The chain.
    pub shard: u32,
    /// The anchored record that is gone or different.
    pub seq: u64,
    /// The chain's last record now.
    pub head_seq: u64,
    /// The anchor that holds the record.
    pub anchor: AnchorRef,
    /// Whether the chain ends before the anchored record (rolled back) rather than holding
    /// another record in its place (rewritten).
    pub rolled_back: bool,
}

impl fmt::Display for AnchorBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rolled_back {
            write!(
                f,
                "chain {} rolled back: it ends at record {}, but {} holds record {}",
                self.shard, self.head_seq, self.anchor, self.seq
            )
        } else {
            write!(
                f,
                "chain {} record {} is not the one {} holds: the log was rolled back and \
                 written again, or rewritten",
                self.shard, self.seq, self.anchor
            )
        }
    }
}

/// The result of [`verify`] and [`verify_anchored`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Chains checked.
    pub shards: u32,
    /// Records that verified.
    pub records: u64,
    /// The first break of each broken chain, by chain; empty when everything verifies.
    pub breaks: Vec<Break>,
    /// Anchored heads (distinct chain, seq and MAC) found in the chains as anchored.
    pub anchored: u64,
    /// The first disagreement with the anchors of each chain that verified, by chain.
    pub anchor_breaks: Vec<AnchorBreak>,
}

impl Report {
    /// Whether every chain verified end to end and agrees with every anchor checked.
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty() && self.anchor_breaks.is_empty()
    }
}

/// Checks every chain: gap-free sequence numbers from 1, each record's MAC over the previous
/// one, and a head that is intact and points at the last record. Reports the first break of
/// each chain (later records of a broken chain cannot be trusted to tell more).
///
/// An older copy of the heads and records passes: that takes [`verify_anchored`].
pub async fn verify(store: &dyn AuditRepo, auditor: &Auditor) -> Result<Report, AuditError> {
    verify_anchored(store, auditor, &Anchors::default()).await
}

/// [`verify`], and for every record an anchor holds: the chain reaches it, and the record
/// there has the anchored MAC. Checked on the same walk (no query per anchor), so a file of
/// many anchors costs little more than the walk. Reports the first disagreement of each chain
/// that otherwise verifies; [`Anchors::bad_lines`] are the caller's to report.
pub async fn verify_anchored(
    store: &dyn AuditRepo,
    auditor: &Auditor,
    anchors: &Anchors,
) -> Result<Report, AuditError> {
    let key = auditor.key();
    let heads = store.audit_heads().await?;
    let mut report = Report {
        shards: auditor.shards(),
        ..Report::default()
    };
    let none = BTreeMap::new();
    for shard in 0..auditor.shards() {
        let head = heads.iter().find(|h| h.shard == shard);
        let mut prev_mac = chain::genesis_mac(key, shard).to_vec();
        let pinned = anchors.of_chain(shard).unwrap_or(&none);
        let mut anchor_break = None;
        let mut check = |seq: u64, mac: &[u8], report: &mut Report| {
            if anchor_break.is_some() {
                return;
            }
            for point in pinned.get(&seq).into_iter().flatten() {
                if point.mac.as_slice() == mac {
                    report.anchored += 1;
                } else {
                    anchor_break = Some(AnchorBreak {
                        shard,
                        seq,
                        head_seq: 0,
                        anchor: point.from,
                        rolled_back: false,
                    });
                    return;
                }
            }
        };
        // Anchors made before the chain's first record hold its genesis MAC.
        check(0, &prev_mac, &mut report);
        let mut last_seq = 0u64;
        let mut broken = None;
        'walk: loop {
            let page = store.audit_chain(shard, last_seq, PAGE).await?;
            if page.is_empty() {
                break;
            }
            for row in page {
                let expected = last_seq + 1;
                if row.seq != expected {
                    broken = Some(Break {
                        shard,
                        seq: expected,
                        reason: "record missing (deleted from the middle of the chain)",
                    });
                    break 'walk;
                }
                if !chain::record_is_intact(key, &row, &prev_mac) {
                    broken = Some(Break {
                        shard,
                        seq: row.seq,
                        reason: "MAC mismatch: record altered, reordered or replaced",
                    });
                    break 'walk;
                }
                report.records += 1;
                check(row.seq, &row.mac, &mut report);
                last_seq = row.seq;
                prev_mac = row.mac;
            }
        }
        if broken.is_none() {
            broken = match head {
                None => Some(Break {
                    shard,
                    seq: last_seq,
                    reason: "chain head missing",
                }),
                Some(head) if !chain::head_is_intact(key, head) => Some(Break {
                    shard,
                    seq: head.seq,
                    reason: "chain head altered",
                }),
                Some(head) if head.seq > last_seq => Some(Break {
                    shard,
                    seq: last_seq + 1,
                    reason: "records missing at the end of the chain (tail truncated)",
                }),
                Some(head) if head.seq < last_seq || head.mac != prev_mac => Some(Break {
                    shard,
                    seq: head.seq + 1,
                    reason: "records after the chain head were not written by the vault",
                }),
                Some(_) => None,
            };
        }
        // A broken chain is reported as such; its anchors cannot tell more.
        if broken.is_none() {
            let mut anchor_break = anchor_break.or_else(|| rolled_back(shard, last_seq, pinned));
            if let Some(found) = &mut anchor_break {
                found.head_seq = last_seq;
            }
            report.anchor_breaks.extend(anchor_break);
        }
        report.breaks.extend(broken);
    }
    if !report.is_intact() {
        metrics::counter!(super::VERIFY_FAILURES, "check" => "chain").increment(1);
    }
    Ok(report)
}

/// The first record anchored past the chain's end, if any: the chain was wound back to an
/// older copy.
fn rolled_back(
    shard: u32,
    last_seq: u64,
    pinned: &BTreeMap<u64, Vec<Point>>,
) -> Option<AnchorBreak> {
    let (&seq, points) = pinned.range(last_seq + 1..).next()?;
    Some(AnchorBreak {
        shard,
        seq,
        head_seq: last_seq,
        anchor: points.first()?.from,
        rolled_back: true,
    })
}
