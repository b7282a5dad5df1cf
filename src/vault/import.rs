//! Bulk import (`ImportCards`): a chunk of cards, each under the caller's own import id,
//! stored in one transaction with one audit record.
//!
//! Throughput comes from doing per chunk what `Tokenize` does per card: one transaction, one
//! multi-row insert, one audit record, and the CPU work (fingerprints, tokens, AES-GCM) of
//! the whole chunk in one go off the async workers. Idempotence comes from the database: the
//! import id is unique per tenant, so a resent card clashes with the row of its first import
//! and is answered with that row's token; nothing stored is ever overwritten.
//!
//! Answering a resend compares its number with the stored one, which is an oracle for a
//! caller without `reveal`. So an import id is answered once per chunk (a repeat in the same
//! chunk is refused unread), and resends with another number are budgeted per principal
//! (see [`super::guess`]).

use std::{collections::HashMap, fmt, sync::Arc, time::Instant};

use time::OffsetDateTime;

use super::{
    Authorized, Metadata, TOKEN_ATTEMPTS, TenantId, Vault, VaultError, event, expect_action,
    guess::GuessKind, now_micros, record, seal::Sealer, tenant_keys::TenantKeys,
};
use crate::{
    audit::{Action, Outcome},
    card::{Card, FieldViolation, Token, TokenFormat, contains_card_number},
    crypto::{DataKey, DekId, Fingerprint},
    store::{CardRow, ImportedCard},
};

/// Most cards in one chunk: bounds a chunk's transaction, memory and sealing time.
pub const MAX_IMPORT_CHUNK: usize = 1000;

/// The caller's id of an imported card: 1 to 128 printable ASCII characters (space to
/// tilde), compared exactly, unique per tenant. Stored in clear beside the token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImportId(String);

impl ImportId {
    /// Longest import id, in characters (= bytes: ASCII only).
    pub const MAX_LEN: usize = 128;

    /// Validates an import id. It is stored in clear, so one that contains a card number
    /// (an importer keying its rows by PAN) is refused like card-shaped metadata is. The
    /// violation, on field `import_id`, never repeats the value.
    pub fn parse(text: String) -> Result<ImportId, FieldViolation> {
        let refuse = |description: &str| FieldViolation {
            field: "import_id",
            description: description.to_owned(),
        };
        if text.is_empty() {
            return Err(refuse("import_id is required"));
        }
        if text.len() > Self::MAX_LEN || !text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(refuse(
                "import_id must be 1 to 128 printable ASCII characters (space to tilde)",
            ));
        }
        if contains_card_number(&text) {
            return Err(refuse(
                "import_id contains a card number; it is stored in clear, so use another id",
            ));
        }
        Ok(ImportId(text))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One valid card of a chunk.
#[derive(Debug)]
pub struct ImportCommand {
    /// The caller's id of the card.
    pub import_id: ImportId,
    /// The validated card.
    pub card: Card,
    /// Shape of the token to issue.
    pub format: TokenFormat,
    /// Caller metadata.
    pub metadata: Metadata,
}

/// One card of a chunk as the API layer parsed it. Invalid cards travel through the vault
/// so that the chunk's audit record counts them and results stay in request order.
#[derive(Debug)]
pub enum ImportEntry {
    /// A card to store.
    Valid(ImportCommand),
    /// A card refused by validation, with every bad field.
    Invalid(Vec<FieldViolation>),
}

/// A chunk of an import stream.
#[derive(Debug)]
pub struct ImportChunk {
    /// Position of the chunk in its stream, from 1, for the audit record.
    pub seq: u64,
    /// The cards, at most [`MAX_IMPORT_CHUNK`].
    pub entries: Vec<ImportEntry>,
}

/// What happened to one card of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// Stored under this new token.
    Created(Token),
    /// The import id was already taken, by an earlier chunk, by the same card number: its
    /// existing token.
    AlreadyImported(Token),
    /// The import id is taken by a different card number; nothing was stored.
    Conflict,
    /// Refused by validation, or a repeat of an import id earlier in the chunk; nothing was
    /// stored.
    Invalid(Vec<FieldViolation>),
}

/// What a repeat of an import id within one chunk is answered with. It is not compared with
/// anything: answering each repeat by whether its number matches the card holding the id
/// would let one chunk test 1000 candidate numbers against a stored card.
fn repeated_id() -> FieldViolation {
    FieldViolation {
        field: "import_id",
        description: "import_id appears earlier in this chunk; each import id may appear once \
                      per chunk"
            .to_owned(),
    }
}

/// A chunk's cards after sealing, position by position; the rows to insert are kept apart.
enum Slot {
    /// The first valid card with its import id in the chunk; its row goes to the insert.
    First { fingerprint: Fingerprint },
    /// Refused by validation, or a repeated import id.
    Invalid(Vec<FieldViolation>),
}

/// A sealed chunk: a slot per card in chunk order, and the rows to insert with their
/// positions.
struct Sealed {
    slots: Vec<Slot>,
    rows: Vec<(usize, CardRow)>,
}

/// The card that holds an import id once the chunk's insert has run.
struct Holder {
    token: String,
    fingerprint: Vec<u8>,
    /// Stored by this chunk (else by an earlier import).
    created: bool,
}

/// Keys and time shared by every card of a chunk.
struct ChunkKeys {
    tenant: TenantId,
    keys: Arc<TenantKeys>,
    dek: Arc<DataKey>,
    dek_id: DekId,
    now: OffsetDateTime,
}

impl ChunkKeys {
    fn sealer<'a>(&'a self, command: &'a ImportCommand) -> Sealer<'a> {
        let card = &command.card;
        Sealer {
            tenant: &self.tenant,
            card,
            format: command.format,
            metadata: &command.metadata,
            canonical: false,
            expires_at: None,
            import_id: Some(command.import_id.as_str()),
            fingerprint: self.fingerprint(card),
            dek: &self.dek,
            dek_id: self.dek_id,
            plaintext: record::encode(&card.pan, card.holder.as_ref()),
            now: self.now,
            honeytoken: false,
        }
    }

    fn fingerprint(&self, card: &Card) -> Fingerprint {
        self.keys
            .fingerprint
            .fingerprint(card.pan.expose_digits().as_bytes())
    }

    /// Seals every first use of an import id; later uses are refused unread.
    fn seal_all(&self, entries: &mut [ImportEntry]) -> Result<Sealed, VaultError> {
        let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
        let mut slots = Vec::with_capacity(entries.len());
        let mut rows = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter_mut().enumerate() {
            slots.push(match entry {
                ImportEntry::Invalid(violations) => Slot::Invalid(std::mem::take(violations)),
                ImportEntry::Valid(command) => {
                    let command = &*command;
                    match first_of.get(command.import_id.as_str()) {
                        Some(_) => Slot::Invalid(vec![repeated_id()]),
                        None => {
                            first_of.insert(command.import_id.as_str(), i);
                            let sealer = self.sealer(command);
                            rows.push((i, sealer.row()?));
                            Slot::First {
                                fingerprint: sealer.fingerprint,
                            }
                        }
                    }
                }
            });
        }
        Ok(Sealed { slots, rows })
    }
}

/// How many cards of a chunk ended each way, for its audit record and metrics.
#[derive(Default)]
struct Tally {
    created: usize,
    already: usize,
    conflict: usize,
    invalid: usize,
}

impl Tally {
    fn of(outcomes: &[ImportOutcome]) -> Tally {
        let mut t = Tally::default();
        for outcome in outcomes {
            match outcome {
                ImportOutcome::Created(_) => t.created += 1,
                ImportOutcome::AlreadyImported(_) => t.already += 1,
                ImportOutcome::Conflict => t.conflict += 1,
                ImportOutcome::Invalid(_) => t.invalid += 1,
            }
        }
        t
    }

    /// A chunk is a success when any card in it is now stored; otherwise it is recorded by
    /// why nothing was.
    fn outcome(&self) -> Outcome {
        if self.created + self.already > 0 {
            Outcome::Ok
        } else if self.invalid > 0 {
            Outcome::InvalidArgument
        } else {
            Outcome::Conflict
        }
    }
}

impl Vault {
    /// Stores a chunk of imported cards in one transaction with one audit record, and says
    /// per card what happened, in chunk order. Returns once the transaction has committed,
    /// so every `Created` and `AlreadyImported` card is durable. A chunk that fails (the
    /// database, a key) stores nothing.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant(), chunk = chunk.seq))]
    pub async fn import_cards(
        &self,
        auth: &Authorized,
        chunk: ImportChunk,
    ) -> Result<Vec<ImportOutcome>, VaultError> {
        expect_action(auth, Action::ImportCards)?;
        let ImportChunk { seq, mut entries } = chunk;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        if entries.len() > MAX_IMPORT_CHUNK {
            return Err(VaultError::internal(
                "an import chunk exceeds the chunk limit",
                "the API layer lets only valid chunk sizes through",
            ));
        }
        let tenant = auth.caller().tenant().clone();
        let keys = self.keys.tenant(&tenant).await;
        let keys = self.recorded(auth, None, keys).await?;
        let reserved = self
            .keys
            .encryptions(&tenant, &keys, entries.len() as u64)
            .await;
        let (dek_id, dek) = self.recorded(auth, None, reserved).await?;
        let chunk_keys = Arc::new(ChunkKeys {
            dek,
            tenant,
            keys,
            dek_id,
            now: now_micros(),
        });

        // Sealing a full chunk takes milliseconds of CPU: too long to hold an async worker,
        // which would stall every other request on it meanwhile.
        let sealing = chunk_keys.clone();
        let (entries, sealed) = tokio::task::spawn_blocking(move || {
            let sealed = sealing.seal_all(&mut entries);
            (entries, sealed)
        })
        .await
        .map_err(|e| VaultError::internal("the sealing task failed", e))?;
        let Sealed { slots, rows } = sealed?;
        self.store_chunk(auth, seq, &chunk_keys, &entries, slots, rows)
            .await
    }

    /// The chunk's transaction: insert, resolve clashes, record, commit.
    async fn store_chunk(
        &self,
        auth: &Authorized,
        seq: u64,
        keys: &ChunkKeys,
        entries: &[ImportEntry],
        slots: Vec<Slot>,
        mut pending: Vec<(usize, CardRow)>,
    ) -> Result<Vec<ImportOutcome>, VaultError> {
        // Rows go in in import-id order: two transactions inserting overlapping ids then
        // wait on each other's ids in the same order and cannot deadlock (PostgreSQL makes
        // an insert that clashes with an uncommitted row wait for that row's transaction).
        pending.sort_unstable_by(|(_, a), (_, b)| a.import_id.cmp(&b.import_id));
        // What holds each position's import id, once known (`First` positions only).
        let mut holders: Vec<Option<Holder>> =
            std::iter::repeat_with(|| None).take(slots.len()).collect();
        let mut tx = self.begin().await?;
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            if attempt > TOKEN_ATTEMPTS {
                return Err(VaultError::internal(
                    "could not store an imported card under a fresh token",
                    "every attempt collided",
                ));
            }
            let rows: Vec<&CardRow> = pending.iter().map(|(_, row)| row).collect();
            let stored = tx.insert_cards(&rows).await?;
            drop(rows);
            if stored.len() != pending.len() {
                return Err(VaultError::internal(
                    "the store answered a batch insert for another number of rows",
                    "row count mismatch",
                ));
            }
            let mut clashed = Vec::new();
            for ((i, row), stored) in pending.drain(..).zip(stored) {
                if stored {
                    let holder = Holder {
                        token: row.token,
                        fingerprint: row.fingerprint,
                        created: true,
                    };
                    holders[i] = Some(holder);
                } else {
                    clashed.push((i, row));
                }
            }
            if clashed.is_empty() {
                break;
            }
            // A clash is either the import id (an earlier import: answer from its row) or,
            // for a card whose id is free, the token (a PAN-shaped token already taken:
            // reseal under a fresh one and insert again, in this same transaction).
            let ids: Vec<&str> = clashed
                .iter()
                .map(|(_, row)| row.import_id.as_deref().unwrap_or_default())
                .collect();
            let mut existing: HashMap<String, ImportedCard> = tx
                .imported_cards(keys.tenant.as_str(), &ids)
                .await?
                .into_iter()
                .map(|card| (card.import_id.clone(), card))
                .collect();
            drop(ids);
            for (i, row) in clashed {
                let id = row.import_id.as_deref().unwrap_or_default();
                // Import ids are unique among the pending rows (repeats are not inserted).
                if let Some(found) = existing.remove(id) {
                    let holder = Holder {
                        token: found.token,
                        fingerprint: found.fingerprint,
                        created: false,
                    };
                    holders[i] = Some(holder);
                    continue;
                }
                tracing::debug!(attempt, "imported card's token collided; redrawing");
                let Some(ImportEntry::Valid(command)) = entries.get(i) else {
                    return Err(VaultError::internal(
                        "an import row lost its card",
                        "sealed and parsed entries out of step",
                    ));
                };
                pending.push((i, keys.sealer(command).row()?));
            }
        }

        let outcomes = resolve(slots, &holders)?;
        let tally = Tally::of(&outcomes);
        // Resends compare numbers: answered only within the principal's conflict budget.
        // Whether the chunk is refused depends on the budget and, once it holds a token, on
        // the chunk's conflicts: a refusal tells at most that they outnumber what was left,
        // and empties the budget, so the next chunk with a resend is refused whatever it
        // holds.
        let resends = tally.already + tally.conflict;
        if resends > 0
            && !self.guesses.import_conflicts.take_or_drain(
                &auth.caller().principal.id,
                tally.conflict as u64,
                Instant::now(),
            )
        {
            drop(tx);
            return Err(self
                .refuse_guess(
                    auth,
                    GuessKind::ImportConflicts,
                    format!(
                        "chunk {seq}: {} cards refused: {resends} resent import ids, {} with \
                         another card number",
                        outcomes.len(),
                        tally.conflict
                    ),
                )
                .await);
        }
        let mut audit = event(auth, tally.outcome(), None);
        audit.detail = Some(format!(
            "chunk {seq}: {} cards: {} created, {} already imported, {} conflicting, {} invalid",
            outcomes.len(),
            tally.created,
            tally.already,
            tally.conflict,
            tally.invalid
        ));
        self.commit_with(tx, &audit).await?;
        for (outcome, count) in [
            ("created", tally.created),
            ("already_imported", tally.already),
            ("conflict", tally.conflict),
            ("invalid", tally.invalid),
        ] {
            metrics::counter!("cardvault_imported_cards_total", "outcome" => outcome)
                .increment(count as u64);
        }
        Ok(outcomes)
    }
}

/// Each card's outcome, from what holds its import id now.
fn resolve(slots: Vec<Slot>, holders: &[Option<Holder>]) -> Result<Vec<ImportOutcome>, VaultError> {
    let held = |i: usize, fingerprint: &Fingerprint| -> Result<ImportOutcome, VaultError> {
        let holder = holders.get(i).and_then(Option::as_ref).ok_or_else(|| {
            VaultError::internal("an imported card was left unresolved", "missing holder")
        })?;
        if holder.fingerprint != fingerprint.as_bytes() {
            return Ok(ImportOutcome::Conflict);
        }
        let token = Token::parse(&holder.token)
            .map_err(|_| VaultError::internal("a stored token is malformed", "corrupt row"))?;
        Ok(if holder.created {
            ImportOutcome::Created(token)
        } else {
            ImportOutcome::AlreadyImported(token)
        })
    };
    slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| match slot {
            Slot::Invalid(violations) => Ok(ImportOutcome::Invalid(violations)),
            Slot::First { fingerprint } => held(i, &fingerprint),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(byte: u8) -> Fingerprint {
        Fingerprint::from_bytes(&[byte; 32]).expect("32 bytes")
    }

    fn holder(token: &str, byte: u8, created: bool) -> Option<Holder> {
        Some(Holder {
            token: token.to_owned(),
            fingerprint: vec![byte; 32],
            created,
        })
    }

    #[test]
    fn import_ids_are_printable_ascii_of_1_to_128_characters() {
        for ok in ["a", " ~", "cust-1001/2024", &"x".repeat(128)] {
            assert_eq!(ImportId::parse(ok.to_owned()).expect(ok).as_str(), ok);
        }
        for bad in ["", &"x".repeat(129), "café", "tab\there", "nul\0"] {
            let v = ImportId::parse(bad.to_owned()).expect_err(bad);
            assert_eq!(v.field, "import_id");
        }
    }

    #[test]
    fn an_import_id_holding_a_card_number_is_refused_without_echo() {
        let v = ImportId::parse("customer 4242 4242 4242 4242".to_owned()).expect_err("PAN");
        assert!(v.description.contains("card number"), "{}", v.description);
        assert!(!format!("{v:?}").contains("4242"));
        // Whatever the brand: a Luhn-valid 16-digit number is a card number.
        assert!(ImportId::parse("order 1234567812345670".to_owned()).is_err());
        assert!(ImportId::parse("order 1234567812345671".to_owned()).is_ok());
    }

    #[test]
    fn each_card_is_answered_from_whatever_holds_its_import_id() {
        let slots = vec![
            Slot::First {
                fingerprint: fingerprint(1),
            },
            Slot::Invalid(vec![repeated_id()]),
            Slot::First {
                fingerprint: fingerprint(3),
            },
            Slot::First {
                fingerprint: fingerprint(4),
            },
        ];
        let a = "tok_AAAAAAAAAAAAAAAAAAAAAA";
        let b = "tok_BBBBBBBBBBBBBBBBBBBBBB";
        let c = "tok_CCCCCCCCCCCCCCCCCCCCCC";
        // Stored by this chunk; by an earlier import with another number; and with the same.
        let holders = [
            holder(a, 1, true),
            None,
            holder(b, 9, false),
            holder(c, 4, false),
        ];
        let token = |t: &str| Token::parse(t).expect("token");
        assert_eq!(
            resolve(slots, &holders).expect("resolved"),
            [
                ImportOutcome::Created(token(a)),
                ImportOutcome::Invalid(vec![repeated_id()]),
                ImportOutcome::Conflict,
                ImportOutcome::AlreadyImported(token(c)),
            ]
        );
    }

    #[test]
    fn a_repeated_import_id_is_refused_without_its_number() {
        let v = repeated_id();
        assert_eq!(v.field, "import_id");
        assert!(
            v.description.contains("once per chunk"),
            "{}",
            v.description
        );
    }

    #[test]
    fn a_chunk_is_recorded_as_ok_when_any_card_is_stored() {
        let tally = |created, already, conflict, invalid| Tally {
            created,
            already,
            conflict,
            invalid,
        };
        assert_eq!(tally(1, 0, 5, 5).outcome(), Outcome::Ok);
        assert_eq!(tally(0, 1, 0, 0).outcome(), Outcome::Ok);
        assert_eq!(tally(0, 0, 1, 1).outcome(), Outcome::InvalidArgument);
        assert_eq!(tally(0, 0, 2, 0).outcome(), Outcome::Conflict);
    }
}
