//! The MACs that chain records: genesis, record and head.

use crate::{
    crypto::{AUDIT_MAC_LEN, AuditKey},
    store::{AuditHeadRow, AuditRow},
};

const GENESIS: &str = "cardvault/audit-genesis/v1";
const RECORD: &str = "cardvault/audit-record/v1";
const HEAD: &str = "cardvault/audit-head/v1";

/// The MAC a chain starts from: a record 1 copied from another chain or another vault
/// does not verify.
pub(super) fn genesis_mac(key: &AuditKey, shard: u32) -> [u8; AUDIT_MAC_LEN] {
    key.mac(GENESIS, &[&shard.to_be_bytes()])
}

/// The head of an empty chain.
pub(super) fn genesis_head(key: &AuditKey, shard: u32) -> AuditHeadRow {
    head(key, shard, 0, &genesis_mac(key, shard))
}

/// A head pointing at record `seq` with MAC `mac`.
pub(super) fn head(key: &AuditKey, shard: u32, seq: u64, mac: &[u8]) -> AuditHeadRow {
    AuditHeadRow {
        shard,
        seq,
        mac: mac.to_vec(),
        head_mac: key
            .mac(HEAD, &[&shard.to_be_bytes(), &seq.to_be_bytes(), mac])
            .to_vec(),
    }
}

/// Whether a head row's own MAC is intact.
pub(super) fn head_is_intact(key: &AuditKey, head: &AuditHeadRow) -> bool {
    key.verify(
        HEAD,
        &[
            &head.shard.to_be_bytes(),
            &head.seq.to_be_bytes(),
            &head.mac,
        ],
        &head.head_mac,
    )
}

/// `Some(text)` and `None` encode differently, and so do `Some("")` and `None`.
fn optional(value: &Option<String>) -> Vec<u8> {
    match value {
        None => vec![0],
        Some(text) => {
            let mut out = Vec::with_capacity(text.len() + 1);
            out.push(1);
            out.extend_from_slice(text.as_bytes());
            out
        }
    }
}

/// Every MAC'd field of a record after its position: time (µs), tenant, principal, action,
/// token, outcome, alarm, peer, request id, detail.
fn fields(row: &AuditRow) -> [Vec<u8>; 10] {
    let micros = i64::try_from(row.at.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX);
    [
        micros.to_be_bytes().to_vec(),
        optional(&row.tenant_id),
        optional(&row.principal),
        row.action.as_bytes().to_vec(),
        optional(&row.token),
        row.outcome.as_str().as_bytes().to_vec(),
        vec![u8::from(row.alarm)],
        optional(&row.peer),
        optional(&row.request_id),
        optional(&row.detail),
    ]
}

/// Runs `f` over the MAC input of a record: shard, seq, previous MAC, then [`fields`].
fn with_record_input<T>(row: &AuditRow, prev_mac: &[u8], f: impl FnOnce(&[&[u8]]) -> T) -> T {
    let (shard, seq, fields) = (row.shard.to_be_bytes(), row.seq.to_be_bytes(), fields(row));
    let mut input: Vec<&[u8]> = vec![&shard, &seq, prev_mac];
    input.extend(fields.iter().map(Vec::as_slice));
    f(&input)
}

/// The MAC of a record: its position, the previous record's MAC and every field.
pub(super) fn record_mac(key: &AuditKey, row: &AuditRow, prev_mac: &[u8]) -> [u8; AUDIT_MAC_LEN] {
    with_record_input(row, prev_mac, |input| key.mac(RECORD, input))
}

/// Whether a record's stored MAC is right given the previous record's MAC.
pub(super) fn record_is_intact(key: &AuditKey, row: &AuditRow, prev_mac: &[u8]) -> bool {
    with_record_input(row, prev_mac, |input| key.verify(RECORD, input, &row.mac))
}
