//! `cardvault audit verify`: walks every chain from genesis to head.

use std::fmt;

use super::{AuditError, Auditor, chain};
use crate::store::Store;

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

/// The result of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Chains checked.
    pub shards: u32,
    /// Records that verified.
    pub records: u64,
    /// The first break of each broken chain, by chain; empty when everything verifies.
    pub breaks: Vec<Break>,
}

impl Report {
    /// Whether every chain verified end to end.
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Checks every chain: gap-free sequence numbers from 1, each record's MAC over the previous
/// one, and a head that is intact and points at the last record. Reports the first break of
/// each chain (later records of a broken chain cannot be trusted to tell more).
pub async fn verify(store: &dyn Store, auditor: &Auditor) -> Result<Report, AuditError> {
    let key = auditor.key();
    let heads = store.audit_heads().await?;
    let mut report = Report {
        shards: auditor.shards(),
        ..Report::default()
    };
    for shard in 0..auditor.shards() {
        let head = heads.iter().find(|h| h.shard == shard);
        let mut prev_mac = chain::genesis_mac(key, shard).to_vec();
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
        report.breaks.extend(broken);
    }
    Ok(report)
}
