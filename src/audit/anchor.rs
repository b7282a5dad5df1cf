//! Anchors: MAC'd statements of every chain's head at one moment, written out of the
//! database so that restoring an older copy of the audit log shows.
//!
//! The chains catch every change a database writer makes *within* one history, but an older
//! copy of the head rows and the records up to them is a history too: internally consistent,
//! it verifies. An anchor records each chain's head (shard, seq, MAC of the record there)
//! under the anchor key (HKDF of the audit key), and [`super::verify_anchored`] checks that
//! every chain still reaches each anchored record and that the record there is the anchored
//! one. Anchors only help where the database writer cannot rewrite them: append them to WORM
//! storage, an object-lock bucket or a log pipeline.
//!
//! The format is one JSON object per line:
//!
//! ```text
//! {"kind":"cardvault.audit_anchor","version":1,"seq":64,"at":"2026-12-04T10:00:00.123456Z",
//!  "shards":16,"heads":[{"shard":0,"seq":4,"mac":"<hex>"},…],"mac":"<hex>"}
//! ```

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{AuditError, Auditor, chain};
use crate::{crypto::AUDIT_MAC_LEN, crypto::hex, store::AuditRepo};

/// The only anchor format so far.
pub const ANCHOR_FORMAT_V1: u32 = 1;

/// The `kind` of every anchor line, so a log pipeline can route anchors written to standard
/// output (among the vault's log lines) to their own store.
pub const ANCHOR_KIND: &str = "cardvault.audit_anchor";

/// MAC label of anchors.
const ANCHOR: &str = "cardvault/audit-anchor/v1";

/// One chain's head, as anchored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchoredHead {
    /// The chain.
    pub shard: u32,
    /// Sequence number of its last record (0: none yet).
    pub seq: u64,
    /// MAC of that record (the chain's genesis MAC when `seq` is 0).
    pub mac: [u8; AUDIT_MAC_LEN],
}

/// A MAC'd statement of every chain's head at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Format version ([`ANCHOR_FORMAT_V1`]).
    pub version: u32,
    /// The anchor's sequence number: the number of records it covers (the sum of its heads'
    /// seqs). It grows with the log, needs no counter a database writer could reset, and two
    /// replicas anchoring the same state give the same number.
    pub seq: u64,
    /// When it was made, to the microsecond.
    pub at: OffsetDateTime,
    /// Every chain's head, by shard.
    pub heads: Vec<AnchoredHead>,
    /// HMAC-SHA256 under the anchor key over all of the above.
    pub mac: [u8; AUDIT_MAC_LEN],
}

/// An anchor line as JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAnchor {
    kind: String,
    version: u32,
    seq: u64,
    at: String,
    shards: u32,
    heads: Vec<WireHead>,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHead {
    shard: u32,
    seq: u64,
    mac: String,
}

fn bad(reason: impl Into<String>) -> AuditError {
    AuditError::BadAnchor(reason.into())
}

fn decode_mac(text: &str, what: &str) -> Result<[u8; AUDIT_MAC_LEN], AuditError> {
    let mut mac = [0u8; AUDIT_MAC_LEN];
    if hex::decode_into(text, &mut mac) {
        Ok(mac)
    } else {
        Err(bad(format!("{what} is not {AUDIT_MAC_LEN} bytes of hex")))
    }
}

impl Anchor {
    /// The anchor as one JSON line (without the line break).
    pub fn to_line(&self) -> String {
        let wire = WireAnchor {
            kind: ANCHOR_KIND.to_owned(),
            version: self.version,
            seq: self.seq,
            // RFC 3339 never fails for a UTC time within years 0..=9999.
            at: self.at.format(&Rfc3339).unwrap_or_default(),
            shards: u32::try_from(self.heads.len()).unwrap_or(u32::MAX),
            heads: self
                .heads
                .iter()
                .map(|h| WireHead {
                    shard: h.shard,
                    seq: h.seq,
                    mac: hex::encode(&h.mac),
                })
                .collect(),
            mac: hex::encode(&self.mac),
        };
        // A struct of strings and integers always serializes.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses one anchor line, strictly: the kind, a known version, every chain once and in
    /// order, MACs of the right length. Does not check the MAC (see
    /// [`Auditor::anchor_is_authentic`]).
    pub fn parse(line: &str) -> Result<Anchor, AuditError> {
        let wire: WireAnchor =
            serde_json::from_str(line).map_err(|e| bad(format!("not an anchor line: {e}")))?;
        if wire.kind != ANCHOR_KIND {
            return Err(bad(format!("kind is not {ANCHOR_KIND}")));
        }
        if wire.version != ANCHOR_FORMAT_V1 {
            return Err(bad(format!(
                "unknown anchor format version {}",
                wire.version
            )));
        }
        let at = OffsetDateTime::parse(&wire.at, &Rfc3339)
            .map_err(|_| bad("`at` is not an RFC 3339 time"))?;
        if usize::try_from(wire.shards).ok() != Some(wire.heads.len()) {
            return Err(bad("`shards` and the number of heads differ"));
        }
        let mut heads = Vec::with_capacity(wire.heads.len());
        for (expected, head) in (0u32..).zip(&wire.heads) {
            if head.shard != expected {
                return Err(bad("heads are not chains 0, 1, 2, … in order"));
            }
            heads.push(AnchoredHead {
                shard: head.shard,
                seq: head.seq,
                mac: decode_mac(&head.mac, "a head's `mac`")?,
            });
        }
        Ok(Anchor {
            version: wire.version,
            seq: wire.seq,
            at,
            heads,
            mac: decode_mac(&wire.mac, "`mac`")?,
        })
    }
}

/// Runs `f` over the MAC input of an anchor: version, seq, time (µs), number of chains, then
/// each head's shard, seq and MAC.
fn with_anchor_input<T>(
    version: u32,
    seq: u64,
    at: OffsetDateTime,
    heads: &[AnchoredHead],
    f: impl FnOnce(&[&[u8]]) -> T,
) -> T {
    let micros = i64::try_from(at.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX);
    let shards = u32::try_from(heads.len()).unwrap_or(u32::MAX);
    let fixed = [
        version.to_be_bytes().to_vec(),
        seq.to_be_bytes().to_vec(),
        micros.to_be_bytes().to_vec(),
        shards.to_be_bytes().to_vec(),
    ];
    let positions: Vec<[u8; 12]> = heads
        .iter()
        .map(|h| {
            let mut position = [0u8; 12];
            position[..4].copy_from_slice(&h.shard.to_be_bytes());
            position[4..].copy_from_slice(&h.seq.to_be_bytes());
            position
        })
        .collect();
    let mut input: Vec<&[u8]> = fixed.iter().map(Vec::as_slice).collect();
    for (position, head) in positions.iter().zip(heads) {
        input.push(position);
        input.push(&head.mac);
    }
    f(&input)
}

impl Auditor {
    /// An anchor of every chain's head as it is now: one read of the head rows (no lock, so
    /// writers never wait for it). Refuses when a head is missing or fails its own MAC: an
    /// anchor must never vouch for a forged head.
    pub async fn anchor(&self, store: &dyn AuditRepo) -> Result<Anchor, AuditError> {
        let rows = store.audit_heads().await?;
        let mut heads = Vec::with_capacity(rows.len());
        for shard in 0..self.shards() {
            let row = rows
                .iter()
                .find(|h| h.shard == shard)
                .ok_or(AuditError::Corrupt("audit chain head missing"))?;
            if !chain::head_is_intact(self.key(), row) {
                return Err(AuditError::Corrupt(
                    "audit chain head altered; not anchoring it (run `cardvault audit verify`)",
                ));
            }
            heads.push(AnchoredHead {
                shard,
                seq: row.seq,
                mac: row
                    .mac
                    .as_slice()
                    .try_into()
                    .map_err(|_| AuditError::Corrupt("audit chain head MAC has a bad length"))?,
            });
        }
        Ok(self.sign_anchor(OffsetDateTime::now_utc(), heads))
    }

    /// The anchor of `heads` at `at` (truncated to microseconds, as the MAC covers them: the
    /// time read back from the line is the one MAC'd).
    fn sign_anchor(&self, at: OffsetDateTime, heads: Vec<AnchoredHead>) -> Anchor {
        let at = at
            .replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
            .unwrap_or(at);
        let seq = heads.iter().map(|h| h.seq).sum();
        let mac = with_anchor_input(ANCHOR_FORMAT_V1, seq, at, &heads, |input| {
            self.anchor_key().mac(ANCHOR, input)
        });
        Anchor {
            version: ANCHOR_FORMAT_V1,
            seq,
            at,
            heads,
            mac,
        }
    }

    /// Whether `anchor`'s MAC verifies under this vault's anchor key: it was made by this
    /// vault and not changed since.
    pub fn anchor_is_authentic(&self, anchor: &Anchor) -> bool {
        with_anchor_input(
            anchor.version,
            anchor.seq,
            anchor.at,
            &anchor.heads,
            |input| self.anchor_key().verify(ANCHOR, input, &anchor.mac),
        )
    }

    /// Reads an anchor file: every line must be an anchor this vault made for its chains.
    /// Lines that are not are listed in [`Anchors::bad_lines`] (the file is still read to
    /// the end); a file without a single anchor is an error.
    pub fn read_anchors(&self, path: &Path) -> Result<Anchors, AuditError> {
        let io = |source| AuditError::AnchorFile {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut anchors = Anchors::default();
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io)?;
            if line.trim().is_empty() {
                continue;
            }
            let number = index + 1;
            anchors.lines += 1;
            match Anchor::parse(line.trim()) {
                Err(err) => anchors.bad_lines.push(BadAnchorLine {
                    line: number,
                    reason: err.to_string(),
                }),
                Ok(anchor) if !self.anchor_is_authentic(&anchor) => {
                    anchors.bad_lines.push(BadAnchorLine {
                        line: number,
                        reason: "anchor MAC does not verify: the line was edited, or another \
                                 vault wrote it"
                            .to_owned(),
                    });
                }
                Ok(anchor) if anchor.heads.len() != self.shards() as usize => {
                    anchors.bad_lines.push(BadAnchorLine {
                        line: number,
                        reason: format!(
                            "the anchor covers {} chains, the vault has {}",
                            anchor.heads.len(),
                            self.shards()
                        ),
                    });
                }
                Ok(anchor) => anchors.add(number, &anchor),
            }
        }
        if anchors.lines == 0 {
            return Err(bad(format!("{} holds no anchor line", path.display())));
        }
        Ok(anchors)
    }
}

/// Which anchor a check came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnchorRef {
    /// Its line in the anchor file, from 1.
    pub line: usize,
    /// Its sequence number.
    pub seq: u64,
    /// When it was made.
    pub at: OffsetDateTime,
}

impl std::fmt::Display for AnchorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.at.format(&Rfc3339).unwrap_or_default();
        write!(f, "anchor {} of {at} (line {})", self.seq, self.line)
    }
}

/// An anchor line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnchorLine {
    /// The line, from 1.
    pub line: usize,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for BadAnchorLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "anchor line {}: {}", self.line, self.reason)
    }
}

/// One anchored record: its MAC and the anchor that says so.
#[derive(Debug, Clone)]
pub(super) struct Point {
    pub(super) mac: [u8; AUDIT_MAC_LEN],
    pub(super) from: AnchorRef,
}

/// The authentic anchors of a file, as the records they pin down; see
/// [`super::verify_anchored`].
#[derive(Debug, Default)]
pub struct Anchors {
    /// Anchor lines read (blank lines aside).
    pub lines: usize,
    /// Lines that are not authentic anchors of this vault.
    pub bad_lines: Vec<BadAnchorLine>,
    /// The anchor covering the most records (the latest of those), if any line was good.
    pub newest: Option<AnchorRef>,
    /// By chain, then anchored seq: the MACs anchors hold for that record (one, unless the
    /// log was rewritten between two anchors).
    points: BTreeMap<u32, BTreeMap<u64, Vec<Point>>>,
}

impl Anchors {
    fn add(&mut self, line: usize, anchor: &Anchor) {
        let from = AnchorRef {
            line,
            seq: anchor.seq,
            at: anchor.at,
        };
        if self
            .newest
            .is_none_or(|newest| (from.seq, from.at) > (newest.seq, newest.at))
        {
            self.newest = Some(from);
        }
        for head in &anchor.heads {
            let points = self
                .points
                .entry(head.shard)
                .or_default()
                .entry(head.seq)
                .or_default();
            // Anchors of an idle log repeat the same heads: keep one point per MAC.
            if points.iter().all(|p| p.mac != head.mac) {
                points.push(Point {
                    mac: head.mac,
                    from,
                });
            }
        }
    }

    /// Anchors that verified.
    pub fn authentic(&self) -> usize {
        self.lines - self.bad_lines.len()
    }

    /// The anchored records of one chain, by seq.
    pub(super) fn of_chain(&self, shard: u32) -> Option<&BTreeMap<u64, Vec<Point>>> {
        self.points.get(&shard)
    }
}

/// Where anchors are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorSink {
    /// Standard output, one line per anchor among the log lines (a log shipper routes them
    /// by their `kind`).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl AnchorSink {
    /// `-` is standard output; anything else a file.
    pub fn from_path(path: &Path) -> AnchorSink {
        if path == Path::new("-") {
            AnchorSink::Stdout
        } else {
            AnchorSink::File(path.to_owned())
        }
    }

    /// Appends `anchor` as one line and returns once it is durable: a file is opened for
    /// appending (created with mode 0600), written with one `write`, and fsynced (its
    /// directory too when the file is new). The blocking I/O runs off the async workers.
    pub async fn append(&self, anchor: &Anchor) -> Result<(), AuditError> {
        let mut line = anchor.to_line();
        line.push('\n');
        let sink = self.clone();
        let path = match self {
            AnchorSink::Stdout => PathBuf::from("-"),
            AnchorSink::File(path) => path.clone(),
        };
        tokio::task::spawn_blocking(move || match sink {
            AnchorSink::Stdout => {
                // One locked write: a log line cannot land in the middle of it.
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            AnchorSink::File(path) => append_line(&path, &line),
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written)
        .map_err(|source| AuditError::AnchorFile { path, source })
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let existed = path.exists();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_data()?;
    if !existed {
        // A new file's name is durable only once its directory is.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::AuditKey;

    fn auditor() -> Auditor {
        Auditor::new(AuditKey::from_bytes(&[9; 32]).unwrap(), 3)
    }

    fn heads() -> Vec<AnchoredHead> {
        (0..3)
            .map(|shard| AnchoredHead {
                shard,
                seq: u64::from(shard) * 10,
                mac: [u8::try_from(shard).unwrap(); AUDIT_MAC_LEN],
            })
            .collect()
    }

    fn anchor() -> Anchor {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).unwrap();
        auditor().sign_anchor(at, heads())
    }

    #[test]
    fn an_anchor_round_trips_through_its_line_and_verifies() {
        let anchor = anchor();
        assert_eq!(anchor.seq, 30, "the sum of the heads' seqs");
        assert_eq!(anchor.at.nanosecond() % 1_000, 0, "microseconds");
        let line = anchor.to_line();
        assert!(!line.contains('\n'));
        assert!(line.starts_with(r#"{"kind":"cardvault.audit_anchor","version":1,"seq":30,"#));
        let parsed = Anchor::parse(&line).unwrap();
        assert_eq!(parsed, anchor);
        assert!(auditor().anchor_is_authentic(&parsed));
    }

    #[test]
    fn every_field_is_covered_by_the_mac() {
        let auditor = auditor();
        let good = anchor();
        let mut edits: Vec<Anchor> = Vec::new();
        let mut a = good.clone();
        a.seq += 1;
        edits.push(a);
        let mut a = good.clone();
        a.at += time::Duration::microseconds(1);
        edits.push(a);
        let mut a = good.clone();
        a.heads[1].seq -= 1;
        edits.push(a);
        let mut a = good.clone();
        a.heads[2].mac[0] ^= 1;
        edits.push(a);
        let mut a = good.clone();
        a.heads.pop();
        edits.push(a);
        let mut a = good.clone();
        a.version = 2;
        edits.push(a);
        for edited in &edits {
            assert!(!auditor.anchor_is_authentic(edited), "{edited:?}");
        }
        // Another vault's key: the anchor does not verify either.
        let other = Auditor::new(AuditKey::from_bytes(&[10; 32]).unwrap(), 3);
        assert!(!other.anchor_is_authentic(&good));
    }

    #[test]
    fn lines_that_are_not_anchors_are_refused_with_a_reason() {
        let line = anchor().to_line();
        let cases = [
            ("", "not an anchor line"),
            ("{}", "not an anchor line"),
            (
                &line.replace("cardvault.audit_anchor", "something.else"),
                "kind",
            ),
            (
                &line.replace(r#""version":1"#, r#""version":2"#),
                "version 2",
            ),
            (&line.replace(r#""shards":3"#, r#""shards":4"#), "shards"),
            (&line.replace(r#""shard":1"#, r#""shard":2"#), "in order"),
            (
                &line.replace(r#""seq":30,"#, r#""seq":30,"extra":1,"#),
                "extra",
            ),
            (
                &line.replace(&"01".repeat(AUDIT_MAC_LEN), &"01".repeat(31)),
                "hex",
            ),
            (&line.replace(r#""at":""#, r#""at":"x"#), "RFC 3339"),
        ];
        for (text, expected) in cases {
            let err = Anchor::parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{err} / {text}");
        }
    }

    #[tokio::test]
    async fn a_file_sink_appends_lines_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchors.jsonl");
        let sink = AnchorSink::from_path(&path);
        assert_eq!(AnchorSink::from_path(Path::new("-")), AnchorSink::Stdout);
        let anchor = anchor();
        sink.append(&anchor).await.unwrap();
        sink.append(&anchor).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{0}\n{0}\n", anchor.to_line()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Read back: both lines authentic; a blank line is skipped; a bad line is named.
        std::fs::write(&path, format!("{0}\n\n{0}\nnot json\n", anchor.to_line())).unwrap();
        let anchors = auditor().read_anchors(&path).unwrap();
        assert_eq!((anchors.lines, anchors.authentic()), (3, 2));
        assert_eq!(anchors.bad_lines[0].line, 4);
        assert_eq!(anchors.newest.map(|n| n.seq), Some(30));
        std::fs::write(&path, "\n").unwrap();
        let err = auditor().read_anchors(&path).unwrap_err();
        assert!(err.to_string().contains("no anchor line"), "{err}");
    }
}
