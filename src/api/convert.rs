//! Proto messages ⇄ domain values. Parsing collects every field violation so a caller fixes
//! a request in one round trip; no violation ever contains the value it rejects.

use time::{Date, Duration, OffsetDateTime};

use crate::{
    card::{Brand, Card, CardInput, Cvc, FieldViolation, Token, TokenFormat, contains_card_number},
    gateway::{Capture, OperationKind},
    id::ChargeId,
    money::Currency,
    pb::v1 as pb,
    vault::{
        CardView, ChargeActionView, ChargeCommand, ChargeOperationKind, ChargeOperationState,
        ChargeState, IdempotencyKey, ImportCommand, ImportEntry, ImportId, ImportOutcome,
        MAX_CHARGE_AMOUNT, MAX_CHARGE_METADATA, Metadata, Operated, OperationCommand,
        RESERVED_METADATA_KEY, TokenizeCommand,
    },
};

/// Longest token lifetime accepted: far beyond any card's validity, short of nonsense.
const MAX_TOKEN_LIFETIME: Duration = Duration::days(366 * 100);

fn violation(field: &'static str, description: &str) -> FieldViolation {
    FieldViolation {
        field,
        description: description.to_owned(),
    }
}

/// Parses a `TokenizeRequest` into a command for the vault.
pub fn tokenize_command(
    request: pb::TokenizeRequest,
    now: OffsetDateTime,
) -> Result<TokenizeCommand, Vec<FieldViolation>> {
    let mut violations = Vec::new();

    let card = match &request.card {
        None => {
            violations.push(violation("card", "card is required"));
            None
        }
        Some(input) => {
            let input = CardInput {
                number: &input.number,
                exp_month: input.exp_month,
                exp_year: input.exp_year,
                cardholder_name: &input.cardholder_name,
            };
            match Card::parse(&input, now.date()) {
                Ok(card) => Some(card),
                Err(invalid) => {
                    violations.extend(invalid.violations);
                    None
                }
            }
        }
    };

    let cvc = Cvc::parse(&request.cvc)
        .map_err(|e| violations.push(violation("cvc", &e.to_string())))
        .ok()
        .flatten();

    let format = token_format(request.token_format)
        .map_err(|v| violations.push(v))
        .ok();

    let metadata = match Metadata::parse(request.metadata) {
        Ok(m) => Some(m),
        Err(v) => {
            violations.extend(v);
            None
        }
    };

    let expires_at = match request.expiration {
        None => Ok(None),
        Some(pb::tokenize_request::Expiration::ExpiresAt(ts)) => timestamp(&ts)
            .filter(|at| *at > now && *at - now <= MAX_TOKEN_LIFETIME)
            .map(Some)
            .ok_or_else(|| {
                violation(
                    "expires_at",
                    "expires_at must be a valid timestamp, in the future and at most 100 years \
                     away",
                )
            }),
        Some(pb::tokenize_request::Expiration::Ttl(ttl)) => duration(&ttl)
            .filter(|ttl| ttl.is_positive() && *ttl <= MAX_TOKEN_LIFETIME)
            .and_then(|ttl| now.checked_add(ttl))
            .map(Some)
            .ok_or_else(|| {
                violation(
                    "ttl",
                    "ttl must be a valid duration, positive and at most 100 years",
                )
            }),
    };
    let expires_at = expires_at.map_err(|v| violations.push(v)).ok().flatten();

    match (card, format, metadata) {
        (Some(card), Some(format), Some(metadata)) if violations.is_empty() => {
            Ok(TokenizeCommand {
                card,
                cvc,
                format,
                reuse_existing: request.reuse_existing,
                metadata,
                expires_at,
            })
        }
        _ => Err(violations),
    }
}

/// Parses the cards of one `ImportCardsRequest`. Each card is parsed on its own: a bad card
/// becomes an [`ImportEntry::Invalid`] naming every bad field, never a failed chunk. Also
/// returns each card's `import_id` to echo in its result (empty when the id is invalid, so an
/// id that is refused for holding a card number is not sent back either).
pub fn import_entries(cards: Vec<pb::ImportCard>, today: Date) -> (Vec<String>, Vec<ImportEntry>) {
    let mut echoes = Vec::with_capacity(cards.len());
    let mut entries = Vec::with_capacity(cards.len());
    for card in cards {
        let (echo, entry) = import_entry(card, today);
        echoes.push(echo);
        entries.push(entry);
    }
    (echoes, entries)
}

fn import_entry(request: pb::ImportCard, today: Date) -> (String, ImportEntry) {
    let mut violations = Vec::new();
    let import_id = ImportId::parse(request.import_id)
        .map_err(|v| violations.push(v))
        .ok();
    let card = match &request.card {
        None => {
            violations.push(violation("card", "card is required"));
            None
        }
        Some(input) => {
            let input = CardInput {
                number: &input.number,
                exp_month: input.exp_month,
                exp_year: input.exp_year,
                cardholder_name: &input.cardholder_name,
            };
            Card::parse(&input, today)
                .map_err(|invalid| violations.extend(invalid.violations))
                .ok()
        }
    };
    let format = token_format(request.token_format)
        .map_err(|v| violations.push(v))
        .ok();
    let metadata = Metadata::parse(request.metadata)
        .map_err(|v| violations.extend(v))
        .ok();
    let echo = import_id
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    let entry = match (import_id, card, format, metadata) {
        (Some(import_id), Some(card), Some(format), Some(metadata)) if violations.is_empty() => {
            ImportEntry::Valid(ImportCommand {
                import_id,
                card,
                format,
                metadata,
            })
        }
        _ => ImportEntry::Invalid(violations),
    };
    (echo, entry)
}

/// The response to one chunk: result `i` answers card `i`. Violations are named by their
/// path in the request message (`cards[i].card.number`).
pub fn import_response(
    echoes: Vec<String>,
    outcomes: Vec<ImportOutcome>,
) -> pb::ImportCardsResponse {
    let results = echoes
        .into_iter()
        .zip(outcomes)
        .enumerate()
        .map(|(i, (import_id, outcome))| {
            let (status, token, violations) = match outcome {
                ImportOutcome::Created(token) => (
                    pb::ImportStatus::Created,
                    token.as_str().to_owned(),
                    Vec::new(),
                ),
                ImportOutcome::AlreadyImported(token) => (
                    pb::ImportStatus::AlreadyImported,
                    token.as_str().to_owned(),
                    Vec::new(),
                ),
                ImportOutcome::Conflict => (pb::ImportStatus::Conflict, String::new(), Vec::new()),
                ImportOutcome::Invalid(violations) => (
                    pb::ImportStatus::Invalid,
                    String::new(),
                    violations
                        .into_iter()
                        .map(|v| pb::FieldViolation {
                            field: format!("cards[{i}].{}", v.field),
                            description: v.description,
                        })
                        .collect(),
                ),
            };
            pb::ImportResult {
                import_id,
                token,
                status: status.into(),
                violations,
            }
        })
        .collect();
    pb::ImportCardsResponse { results }
}

/// Parses a `token_format` field; unset means opaque.
pub fn token_format(value: i32) -> Result<TokenFormat, FieldViolation> {
    match pb::TokenFormat::try_from(value) {
        Ok(pb::TokenFormat::Unspecified | pb::TokenFormat::Opaque) => Ok(TokenFormat::Opaque),
        Ok(pb::TokenFormat::PanShaped) => Ok(TokenFormat::PanShaped),
        Err(_) => Err(violation("token_format", "unknown token format")),
    }
}

/// Parses the `token` field of get/reveal/delete requests.
pub fn token(text: &str) -> Result<Token, Vec<FieldViolation>> {
    Token::parse(text).map_err(|_| {
        vec![violation(
            "token",
            "not a cardvault token (tok_… or a PAN-shaped token that fails the Luhn check)",
        )]
    })
}

/// Nanoseconds in a second: the bound of a proto `nanos` field.
const NANOS_PER_SECOND: i32 = 1_000_000_000;

/// The most seconds a `google.protobuf.Duration` may hold (about 10,000 years either way).
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// A `google.protobuf.Timestamp` as a time, if it is a valid one: `nanos` in
/// `0..1_000_000_000` (a caller's `seconds: i64::MAX` or `nanos: 2e9` is refused here, not
/// normalised or overflowed) and the instant within the years this crate represents.
pub(super) fn timestamp(ts: &prost_types::Timestamp) -> Option<OffsetDateTime> {
    if !(0..NANOS_PER_SECOND).contains(&ts.nanos) {
        return None;
    }
    // i64 seconds times 10^9 plus a bounded nanos stays far inside an i128.
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// A `google.protobuf.Duration` as a duration, if it is a valid one: `|nanos|` below one
/// second and of the same sign as `seconds`, and `seconds` within the type's ±10,000 years.
/// Checked before any arithmetic, so no caller's value can overflow (or panic) later.
pub(super) fn duration(d: &prost_types::Duration) -> Option<Duration> {
    let same_sign = d.seconds == 0 || d.nanos == 0 || (d.seconds < 0) == (d.nanos < 0);
    let valid = d.nanos.unsigned_abs() < NANOS_PER_SECOND.unsigned_abs()
        && same_sign
        && d.seconds.unsigned_abs() <= MAX_DURATION_SECONDS.unsigned_abs();
    // In range and of one sign, `Duration::new` neither carries nor overflows.
    valid.then(|| Duration::new(d.seconds, d.nanos))
}

pub(super) fn to_timestamp(at: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        // Always 0..1e9, which fits an i32.
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
    }
}

fn brand(brand: Brand) -> pb::CardBrand {
    match brand {
        Brand::Visa => pb::CardBrand::Visa,
        Brand::Mastercard => pb::CardBrand::Mastercard,
        Brand::Amex => pb::CardBrand::Amex,
        Brand::Discover => pb::CardBrand::Discover,
        Brand::Jcb => pb::CardBrand::Jcb,
        Brand::DinersClub => pb::CardBrand::DinersClub,
        Brand::UnionPay => pb::CardBrand::Unionpay,
        Brand::Maestro => pb::CardBrand::Maestro,
        Brand::Unknown => pb::CardBrand::Unknown,
    }
}

/// The public view of a card as a proto message.
pub fn card(view: CardView) -> pb::Card {
    let token_format = match view.token.format() {
        TokenFormat::Opaque => pb::TokenFormat::Opaque,
        TokenFormat::PanShaped => pb::TokenFormat::PanShaped,
    };
    pb::Card {
        token: view.token.as_str().to_owned(),
        brand: brand(view.brand).into(),
        last4: view.last4,
        bin: view.bin,
        exp_month: u32::from(view.exp_month),
        exp_year: u32::from(view.exp_year),
        // Empty unless the caller holds `fingerprint` (the vault leaves it out otherwise).
        fingerprint: view
            .fingerprint
            .map(|fingerprint| fingerprint.to_hex())
            .unwrap_or_default(),
        created_at: Some(to_timestamp(view.created_at)),
        metadata: view.metadata.into_iter().collect(),
        token_format: token_format.into(),
        expires_at: view.expires_at.map(to_timestamp),
    }
}

/// Parses a `ChargeRequest`, reporting every bad field; `gateways` are the configured
/// gateway names.
pub fn charge_command(
    request: pb::ChargeRequest,
    gateways: &[&str],
) -> Result<ChargeCommand, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let token = token(&request.token).map_err(|v| violations.extend(v)).ok();
    if request.amount == 0 || request.amount > MAX_CHARGE_AMOUNT {
        violations.push(violation(
            "amount",
            &format!("amount must be 1 to {MAX_CHARGE_AMOUNT} (minor units)"),
        ));
    }
    let currency = Currency::parse(&request.currency)
        .map_err(|e| violations.push(violation("currency", &e.to_string())))
        .ok();
    if !gateways.contains(&request.gateway.as_str()) {
        violations.push(violation(
            "gateway",
            &format!(
                "gateway must be one of the configured gateways: {}",
                gateways.join(", ")
            ),
        ));
    }
    // Stored in clear with the charge: the key refuses a card number too.
    let idempotency_key = IdempotencyKey::parse(&request.idempotency_key)
        .map_err(|e| violations.push(violation("idempotency_key", &e.to_string())))
        .ok();
    let capture = match pb::Capture::try_from(request.capture) {
        Ok(pb::Capture::Unspecified | pb::Capture::Automatic) => Some(Capture::Automatic),
        Ok(pb::Capture::Manual) => Some(Capture::Manual),
        Err(_) => {
            violations.push(violation("capture", "capture must be AUTOMATIC or MANUAL"));
            None
        }
    };
    if request.description.chars().count() > 500 || contains_card_number(&request.description) {
        violations.push(violation(
            "description",
            "description must be at most 500 characters and must not contain a card number",
        ));
    }
    if request.metadata.len() > MAX_CHARGE_METADATA {
        violations.push(violation(
            "metadata",
            &format!("a charge takes at most {MAX_CHARGE_METADATA} metadata entries"),
        ));
    }
    if request.metadata.contains_key(RESERVED_METADATA_KEY) {
        violations.push(violation(
            "metadata",
            &format!("metadata key {RESERVED_METADATA_KEY:?} is reserved for the vault"),
        ));
    }
    let metadata = match Metadata::parse(request.metadata) {
        Ok(m) => Some(m),
        Err(v) => {
            violations.extend(v);
            None
        }
    };
    match (token, currency, idempotency_key, capture, metadata) {
        (Some(token), Some(currency), Some(idempotency_key), Some(capture), Some(metadata))
            if violations.is_empty() =>
        {
            Ok(ChargeCommand {
                token,
                amount: request.amount,
                currency,
                gateway: request.gateway,
                idempotency_key,
                capture,
                description: request.description,
                metadata,
            })
        }
        _ => Err(violations),
    }
}

/// The API form of a stored next action.
pub fn charge_action(action: ChargeActionView) -> pb::ChargeAction {
    pb::ChargeAction {
        client_secret: action.client_secret.unwrap_or_default(),
        r#type: action.kind.unwrap_or_default(),
        redirect_url: action.redirect_url.unwrap_or_default(),
        next_action_json: action.details_json.unwrap_or_default(),
    }
}

/// The API status of a stored charge status.
pub fn charge_status(status: ChargeState) -> pb::ChargeStatus {
    match status {
        ChargeState::Succeeded => pb::ChargeStatus::Succeeded,
        ChargeState::RequiresAction => pb::ChargeStatus::RequiresAction,
        ChargeState::Declined => pb::ChargeStatus::Declined,
        ChargeState::Failed => pb::ChargeStatus::Failed,
        // `pending` is only seen while another request sends it: its outcome is not known.
        ChargeState::Pending | ChargeState::Unknown => pb::ChargeStatus::Unknown,
    }
}

/// Parses a capture, refund or cancellation request (a cancellation's `amount` is 0),
/// reporting every bad field.
pub fn operation_command(
    kind: OperationKind,
    charge_id: &str,
    idempotency_key: &str,
    amount: u64,
) -> Result<OperationCommand, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let charge_id = ChargeId::parse(charge_id)
        .map_err(|_| {
            violations.push(violation(
                "charge_id",
                "charge_id is required: the charge's id as Charge returned it (ch_ and 16 letters or digits)",
            ));
        })
        .ok();
    // Stored in clear with the operation: the key refuses a card number too.
    let idempotency_key = IdempotencyKey::parse(idempotency_key)
        .map_err(|e| violations.push(violation("idempotency_key", &e.to_string())))
        .ok();
    if amount > MAX_CHARGE_AMOUNT {
        violations.push(violation(
            "amount",
            &format!("amount must be 0 (all) to {MAX_CHARGE_AMOUNT} (minor units)"),
        ));
    }
    match (charge_id, idempotency_key) {
        (Some(charge_id), Some(idempotency_key)) if violations.is_empty() => Ok(OperationCommand {
            kind,
            charge_id,
            idempotency_key,
            amount,
        }),
        _ => Err(violations),
    }
}

/// The answer to a capture, refund or cancellation.
pub fn operation_response(operated: Operated) -> pb::ChargeOperationResponse {
    let op = operated.operation;
    let kind = match op.kind {
        ChargeOperationKind::Capture => pb::ChargeOperationKind::Capture,
        ChargeOperationKind::Refund => pb::ChargeOperationKind::Refund,
        ChargeOperationKind::Cancel => pb::ChargeOperationKind::Cancel,
    };
    let status = match op.status {
        ChargeOperationState::Succeeded => pb::ChargeOperationStatus::Succeeded,
        ChargeOperationState::Failed => pb::ChargeOperationStatus::Failed,
        // `pending` is only seen while another request sends it: its outcome is not known.
        ChargeOperationState::Pending | ChargeOperationState::Unknown => {
            pb::ChargeOperationStatus::Unknown
        }
    };
    let amount = if kind == pb::ChargeOperationKind::Cancel {
        0
    } else {
        op.amount_done.unwrap_or(op.amount)
    };
    pb::ChargeOperationResponse {
        operation_id: op.id,
        charge_id: op.charge_id,
        kind: kind.into(),
        status: status.into(),
        amount,
        gateway_id: op.gateway_id.unwrap_or_default(),
        message: op.message.unwrap_or_default(),
        created: operated.created,
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-11-25 12:00 UTC);

    fn request(number: &str) -> pb::TokenizeRequest {
        pb::TokenizeRequest {
            card: Some(pb::CardInput {
                number: number.to_owned(),
                exp_month: 12,
                exp_year: 2030,
                cardholder_name: String::new(),
            }),
            ..Default::default()
        }
    }

    fn fields(v: &[FieldViolation]) -> Vec<&'static str> {
        v.iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_valid_request_parses_with_opaque_as_the_default_format() {
        let cmd = tokenize_command(request("4242 4242 4242 4242"), NOW).expect("valid");
        assert_eq!(cmd.format, TokenFormat::Opaque);
        assert!(cmd.expires_at.is_none());
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let mut req = request("4242424242424241");
        req.cvc = "12a".to_owned();
        req.token_format = 42;
        req.expiration = Some(pb::tokenize_request::Expiration::Ttl(
            prost_types::Duration {
                seconds: -1,
                nanos: 0,
            },
        ));
        let v = tokenize_command(req, NOW).expect_err("invalid");
        assert_eq!(fields(&v), ["card.number", "cvc", "token_format", "ttl"]);
        assert!(!format!("{v:?}").contains("4242424242424241"));
    }

    #[test]
    fn a_cvc_is_parsed_and_kept_apart_from_the_card() {
        let mut req = request("4242 4242 4242 4242");
        req.cvc = "123".to_owned();
        let cmd = tokenize_command(req, NOW).expect("valid");
        assert_eq!(cmd.cvc.as_ref().map(Cvc::expose), Some("123"));
        assert!(!format!("{cmd:?}").contains("123"));
    }

    #[test]
    fn a_missing_card_is_reported() {
        let v = tokenize_command(pb::TokenizeRequest::default(), NOW).expect_err("no card");
        assert_eq!(fields(&v), ["card"]);
    }

    #[test]
    fn ttl_and_expires_at_become_an_absolute_expiry() {
        let mut req = request("4242424242424242");
        req.expiration = Some(pb::tokenize_request::Expiration::Ttl(
            prost_types::Duration {
                seconds: 60,
                nanos: 0,
            },
        ));
        let cmd = tokenize_command(req, NOW).expect("valid");
        assert_eq!(cmd.expires_at, Some(NOW + Duration::seconds(60)));

        let mut req = request("4242424242424242");
        req.expiration = Some(pb::tokenize_request::Expiration::ExpiresAt(to_timestamp(
            NOW - Duration::seconds(1),
        )));
        let v = tokenize_command(req, NOW).expect_err("past");
        assert_eq!(fields(&v), ["expires_at"]);
    }

    /// The attack: durations and timestamps at the ends of their fields' ranges, nanos out
    /// of range or of the other sign. Each is refused naming its field; none panics.
    #[test]
    fn overflowing_ttls_and_expiries_are_refused_naming_the_field() {
        let ttls = [
            (i64::MAX, 2_000_000_000),
            (i64::MAX, 0),
            (i64::MAX, 999_999_999),
            (i64::MIN, -2_000_000_000),
            (i64::MIN, 0),
            (60, 2_000_000_000),
            (60, -2_000_000_000),
            (60, -1),
            (-60, 1),
            (MAX_DURATION_SECONDS + 1, 0),
        ];
        for (seconds, nanos) in ttls {
            let mut req = request("4242424242424242");
            req.expiration = Some(pb::tokenize_request::Expiration::Ttl(
                prost_types::Duration { seconds, nanos },
            ));
            let v = tokenize_command(req, NOW).expect_err("refused");
            assert_eq!(fields(&v), ["ttl"], "ttl {seconds}s {nanos}ns");
        }
        let expiries = [
            (i64::MAX, 2_000_000_000),
            (i64::MAX, 0),
            (i64::MIN, -2_000_000_000),
            (i64::MIN, 0),
            (NOW.unix_timestamp() + 60, 2_000_000_000),
            (NOW.unix_timestamp() + 60, -2_000_000_000),
            (NOW.unix_timestamp() + 60, -1),
        ];
        for (seconds, nanos) in expiries {
            let mut req = request("4242424242424242");
            req.expiration = Some(pb::tokenize_request::Expiration::ExpiresAt(
                prost_types::Timestamp { seconds, nanos },
            ));
            let v = tokenize_command(req, NOW).expect_err("refused");
            assert_eq!(
                fields(&v),
                ["expires_at"],
                "expires_at {seconds}s {nanos}ns"
            );
        }
        // The largest valid values are still accepted.
        let mut req = request("4242424242424242");
        req.expiration = Some(pb::tokenize_request::Expiration::Ttl(
            prost_types::Duration {
                seconds: 59,
                nanos: 999_999_999,
            },
        ));
        let cmd = tokenize_command(req, NOW).expect("valid");
        assert_eq!(cmd.expires_at, Some(NOW + Duration::new(59, 999_999_999)));
    }

    #[test]
    fn durations_and_timestamps_follow_the_proto_rules() {
        let d = |seconds, nanos| duration(&prost_types::Duration { seconds, nanos });
        assert_eq!(d(-1, -500), Some(-Duration::new(1, 500)));
        assert_eq!(d(0, -5), Some(Duration::nanoseconds(-5)));
        assert_eq!(
            d(MAX_DURATION_SECONDS, 999_999_999),
            Some(Duration::new(MAX_DURATION_SECONDS, 999_999_999))
        );
        for (seconds, nanos) in [(1, -1), (-1, 1), (0, 1_000_000_000), (0, -1_000_000_000)] {
            assert_eq!(d(seconds, nanos), None, "{seconds}s {nanos}ns");
        }
        let t = |seconds, nanos| timestamp(&prost_types::Timestamp { seconds, nanos });
        assert_eq!(
            t(0, 999_999_999),
            Some(OffsetDateTime::UNIX_EPOCH + Duration::nanoseconds(999_999_999))
        );
        for (seconds, nanos) in [(0, -1), (0, 1_000_000_000), (i64::MAX, 0), (i64::MIN, 0)] {
            assert_eq!(t(seconds, nanos), None, "{seconds}s {nanos}ns");
        }
    }

    #[test]
    fn an_amount_beyond_what_is_stored_is_refused_at_the_edge() {
        let charge = |amount| pb::ChargeRequest {
            token: "tok_0000000000000000000000".to_owned(),
            amount,
            currency: "EUR".to_owned(),
            gateway: "stripe".to_owned(),
            idempotency_key: "k".to_owned(),
            ..Default::default()
        };
        for amount in [0, MAX_CHARGE_AMOUNT + 1, u64::MAX] {
            let v = charge_command(charge(amount), &["stripe"]).expect_err("refused");
            assert_eq!(fields(&v), ["amount"], "{amount}");
        }
        let cmd = charge_command(charge(MAX_CHARGE_AMOUNT), &["stripe"]).expect("the largest");
        assert_eq!(cmd.amount, MAX_CHARGE_AMOUNT);
    }

    fn import_card(import_id: &str, number: &str) -> pb::ImportCard {
        pb::ImportCard {
            import_id: import_id.to_owned(),
            card: request(number).card,
            ..Default::default()
        }
    }

    #[test]
    fn each_imported_card_is_parsed_alone_and_named_by_its_position() {
        let mut bad = import_card("row-2", "4242424242424241");
        bad.token_format = 42;
        let (echoes, entries) = import_entries(
            vec![
                import_card("row-1", "4242 4242 4242 4242"),
                bad,
                import_card("", "5555555555554444"),
            ],
            NOW.date(),
        );
        assert_eq!(echoes, ["row-1", "row-2", ""], "a refused id is not echoed");
        assert!(matches!(&entries[0], ImportEntry::Valid(c) if c.import_id.as_str() == "row-1"));
        let ImportEntry::Invalid(v) = &entries[1] else {
            panic!("invalid card");
        };
        assert_eq!(fields(v), ["card.number", "token_format"]);

        let outcomes = entries
            .into_iter()
            .map(|entry| match entry {
                ImportEntry::Valid(_) => ImportOutcome::Conflict,
                ImportEntry::Invalid(v) => ImportOutcome::Invalid(v),
            })
            .collect();
        let response = import_response(echoes, outcomes);
        let named: Vec<Vec<&str>> = response
            .results
            .iter()
            .map(|r| r.violations.iter().map(|v| v.field.as_str()).collect())
            .collect();
        assert_eq!(
            named,
            [
                vec![],
                vec!["cards[1].card.number", "cards[1].token_format"],
                vec!["cards[2].import_id"]
            ]
        );
        assert!(!format!("{response:?}").contains("4242424242424241"));
    }

    #[test]
    fn a_card_number_sent_as_a_token_is_refused_without_echo() {
        let v = token("4242424242424242").expect_err("a PAN is not a token");
        assert_eq!(fields(&v), ["token"]);
        assert!(!format!("{v:?}").contains("4242424242424242"));
    }
}
