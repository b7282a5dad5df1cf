//! Bulk import (`ImportCards`): chunks answered in order with a result per card, resending
//! is idempotent by the caller's import ids, bad cards fail alone and are never echoed, one
//! audit record per chunk, permissions and tenants as for `Tokenize`.

use std::{collections::HashSet, sync::Arc};

use cardvault::pb::v1::{self as pb, card_vault_client::CardVaultClient};
use tokio_stream::StreamExt;
use tonic::{Code, Status, transport::Channel};

use crate::{
    access::secure,
    audit::verify,
    helpers::{
        AppState, Backend, TestApp, captured_logs, spawn_with, unique_pan, violated_fields,
        with_key,
    },
    on_both_backends,
};

on_both_backends!(
    a_stream_of_chunks_stores_every_card_and_answers_each_in_order,
    resending_an_import_returns_the_original_tokens_and_changes_nothing,
    import_ids_are_validated_and_a_repeat_in_a_chunk_is_refused_unread,
    a_chunk_over_the_limit_ends_the_stream_after_the_chunks_before_it,
    importing_needs_the_tokenize_permission_and_import_ids_are_per_tenant,
    a_token_clash_without_an_import_clash_is_resealed_under_a_fresh_token,
);

/// A vault for tenant `dev` whose reveal limit does not get in the way of checking every
/// imported card.
async fn spawn(backend: Backend) -> TestApp {
    let state = Arc::new(AppState::new(backend).await);
    spawn_tenant(state, "dev").await
}

async fn spawn_tenant(state: Arc<AppState>, tenant: &str) -> TestApp {
    let mut settings = state.settings(tenant);
    settings.limits.reveal_per_minute = 1_000_000;
    settings.limits.reveal_burst = 10_000;
    spawn_with(state, tenant, settings).await
}

pub(crate) fn card(import_id: &str, number: &str) -> pb::ImportCard {
    pb::ImportCard {
        import_id: import_id.to_owned(),
        card: Some(pb::CardInput {
            number: number.to_owned(),
            exp_month: 12,
            exp_year: 2030,
            cardholder_name: "Grace Hopper".to_owned(),
        }),
        ..Default::default()
    }
}

/// `n` fresh cards with ids `<prefix>-0` … and their PANs.
fn cards(prefix: &str, n: usize) -> Vec<pb::ImportCard> {
    (0..n)
        .map(|i| card(&format!("{prefix}-{i}"), &unique_pan()))
        .collect()
}

pub(crate) fn chunk(cards: Vec<pb::ImportCard>) -> pb::ImportCardsRequest {
    pb::ImportCardsRequest { cards }
}

/// Sends `chunks` as one stream; returns the responses received and the status that ended
/// the stream, if it failed.
pub(crate) async fn import_as(
    client: &mut CardVaultClient<Channel>,
    chunks: Vec<pb::ImportCardsRequest>,
    key: Option<&str>,
) -> Result<(Vec<pb::ImportCardsResponse>, Option<Status>), Status> {
    let stream = tokio_stream::iter(chunks);
    let request = match key {
        Some(key) => with_key(stream, key),
        None => tonic::Request::new(stream),
    };
    let mut responses = client.import_cards(request).await?.into_inner();
    let mut received = Vec::new();
    while let Some(item) = responses.next().await {
        match item {
            Ok(response) => received.push(response),
            Err(status) => return Ok((received, Some(status))),
        }
    }
    Ok((received, None))
}

/// Sends `chunks` and expects the stream to succeed.
pub(crate) async fn import(
    client: &mut CardVaultClient<Channel>,
    chunks: Vec<pb::ImportCardsRequest>,
) -> Vec<pb::ImportCardsResponse> {
    let (responses, failure) = import_as(client, chunks, None)
        .await
        .expect("import starts");
    assert!(failure.is_none(), "the import stream failed: {failure:?}");
    responses
}

fn statuses(response: &pb::ImportCardsResponse) -> Vec<pb::ImportStatus> {
    response.results.iter().map(|r| r.status()).collect()
}

async fn reveal(client: &mut CardVaultClient<Channel>, token: &str) -> pb::RevealResponse {
    client
        .reveal(pb::RevealRequest {
            token: token.to_owned(),
        })
        .await
        .expect("reveal an imported card")
        .into_inner()
}

fn number_of(card: &pb::ImportCard) -> &str {
    &card.card.as_ref().expect("card").number
}

/// Three chunks, one holding an invalid card: every valid card is created and reveals to its
/// PAN, the invalid one is named by field and never echoed, its neighbours are stored, and
/// each chunk left one audit record with its counts.
async fn a_stream_of_chunks_stores_every_card_and_answers_each_in_order(backend: Backend) {
    let mut app = spawn(backend).await;
    let mut chunks: Vec<Vec<pb::ImportCard>> = vec![cards("a", 40), cards("b", 40), cards("c", 40)];
    let bad_pan = "4242424242424241"; // fails Luhn
    chunks[1][7] = card("b-7", bad_pan);
    chunks[1][7].card.as_mut().expect("card").exp_month = 13;
    chunks[2][3].token_format = pb::TokenFormat::PanShaped.into();
    chunks[2][4]
        .metadata
        .insert("customer".to_owned(), "C-1004".to_owned());
    let sent = chunks.clone();

    let responses = import(&mut app.client, chunks.into_iter().map(chunk).collect()).await;
    assert_eq!(responses.len(), 3, "one response per request message");
    let mut tokens = HashSet::new();
    for (request, response) in sent.iter().zip(&responses) {
        assert_eq!(response.results.len(), request.len());
        for (i, (card, result)) in request.iter().zip(&response.results).enumerate() {
            assert_eq!(
                result.import_id, card.import_id,
                "results follow request order"
            );
            if card.import_id == "b-7" {
                assert_eq!(result.status(), pb::ImportStatus::Invalid);
                assert!(result.token.is_empty());
                let fields: Vec<&str> =
                    result.violations.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(
                    fields,
                    [
                        format!("cards[{i}].card.number"),
                        format!("cards[{i}].card.exp_month")
                    ]
                );
                assert!(!format!("{result:?}").contains(bad_pan), "{result:?}");
                continue;
            }
            assert_eq!(
                result.status(),
                pb::ImportStatus::Created,
                "{}",
                card.import_id
            );
            assert!(result.violations.is_empty());
            assert!(
                tokens.insert(result.token.clone()),
                "every card has its own token"
            );
            let revealed = reveal(&mut app.client, &result.token).await;
            assert_eq!(revealed.number, number_of(card));
            assert_eq!(revealed.cardholder_name, "Grace Hopper");
            assert_eq!((revealed.exp_month, revealed.exp_year), (12, 2030));
        }
    }
    assert_eq!(tokens.len(), 119);

    let shaped = &responses[2].results[3].token;
    assert!(shaped.bytes().all(|b| b.is_ascii_digit()), "{shaped}");
    assert!(shaped.ends_with(&number_of(&sent[2][3])[12..]));
    let with_metadata = app
        .client
        .get_card(pb::GetCardRequest {
            token: responses[2].results[4].token.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .card
        .expect("card");
    assert_eq!(
        with_metadata.metadata.get("customer").map(String::as_str),
        Some("C-1004")
    );

    let state = &app.state;
    assert_eq!(state.count("SELECT COUNT(*) FROM cards").await, 119);
    assert_eq!(
        state
            .count("SELECT COUNT(*) FROM cards WHERE import_id IS NOT NULL AND tenant_id = 'dev'")
            .await,
        119
    );
    assert_eq!(
        state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' \
                 AND outcome = 'ok'"
            )
            .await,
        3,
        "one record per chunk, not per card"
    );
    assert_eq!(
        state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' AND detail = \
                 'chunk 2: 40 cards: 39 created, 0 already imported, 0 conflicting, 1 invalid'"
            )
            .await,
        1
    );
    let report = verify(state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);

    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    for card in sent.iter().flatten() {
        assert!(
            !logs.contains(number_of(card)),
            "a card number reached the logs"
        );
    }
}

/// A card's stored form, to prove a resend changes nothing.
type StoredCard = (String, String, Vec<u8>, String);

async fn stored_cards(state: &AppState) -> Vec<StoredCard> {
    let sql = "SELECT token, import_id, ciphertext, CAST(metadata AS TEXT) FROM cards \
               ORDER BY import_id";
    match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open");
            sqlx::query_as(sql).fetch_all(&pool).await.expect("cards")
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&state.database_url)
                .await
                .expect("open");
            sqlx::query_as(sql).fetch_all(&pool).await.expect("cards")
        }
    }
}

/// Resending a whole import, then an overlapping one: cards already imported come back with
/// their original tokens, the rest are created, nothing is stored twice, and the stored rows
/// are untouched — even when the resend carries other metadata. An id reused for another
/// card number is a conflict.
async fn resending_an_import_returns_the_original_tokens_and_changes_nothing(backend: Backend) {
    let mut app = spawn(backend).await;
    let first = cards("r", 20);
    let original = import(
        &mut app.client,
        vec![chunk(first[..10].to_vec()), chunk(first[10..].to_vec())],
    )
    .await;
    let tokens: Vec<String> = original
        .iter()
        .flat_map(|r| r.results.iter().map(|r| r.token.clone()))
        .collect();
    let before = stored_cards(&app.state).await;
    assert_eq!(before.len(), 20);

    // The same import again, in other chunk boundaries and with changed metadata.
    let mut again = first.clone();
    for card in &mut again {
        card.metadata.insert("note".to_owned(), "resent".to_owned());
    }
    let resent = import(
        &mut app.client,
        vec![chunk(again[..15].to_vec()), chunk(again[15..].to_vec())],
    )
    .await;
    let results: Vec<&pb::ImportResult> = resent.iter().flat_map(|r| &r.results).collect();
    assert_eq!(results.len(), 20);
    for (result, token) in results.iter().zip(&tokens) {
        assert_eq!(result.status(), pb::ImportStatus::AlreadyImported);
        assert_eq!(&result.token, token, "the original token");
    }
    assert_eq!(
        stored_cards(&app.state).await,
        before,
        "nothing was overwritten"
    );

    // Overlapping: ids r-10 … r-19 were imported, r-20 … r-29 are new.
    let mut overlapping = first[10..].to_vec();
    overlapping.extend(cards("r", 30).split_off(20));
    let answer = import(&mut app.client, vec![chunk(overlapping.clone())]).await;
    let statuses = statuses(&answer[0]);
    assert_eq!(statuses[..10], [pb::ImportStatus::AlreadyImported; 10]);
    assert_eq!(statuses[10..], [pb::ImportStatus::Created; 10]);
    for (result, token) in answer[0].results[..10].iter().zip(&tokens[10..]) {
        assert_eq!(&result.token, token);
    }
    for (result, card) in answer[0].results[10..].iter().zip(&overlapping[10..]) {
        assert_eq!(
            reveal(&mut app.client, &result.token).await.number,
            number_of(card)
        );
    }
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 30);

    // r-0 again, but with another card number: refused, nothing changes.
    let reused = card("r-0", &unique_pan());
    let answer = import(&mut app.client, vec![chunk(vec![reused])]).await;
    let result = &answer[0].results[0];
    assert_eq!(result.status(), pb::ImportStatus::Conflict);
    assert!(
        result.token.is_empty(),
        "no token of the other card is handed out"
    );
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 30);
    assert_eq!(
        reveal(&mut app.client, &tokens[0]).await.number,
        number_of(&first[0])
    );
    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' \
                 AND outcome = 'conflict'"
            )
            .await,
        1
    );
    let report = verify(&app.state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
}

/// Import ids are required, at most 128 printable ASCII characters and never card numbers;
/// a bad id fails only its card. Within a chunk the first valid card with an id is stored and
/// later ones with the same id are refused as invalid without being compared with it — the
/// same card again or another one, the answer is the same.
async fn import_ids_are_validated_and_a_repeat_in_a_chunk_is_refused_unread(backend: Backend) {
    let mut app = spawn(backend).await;
    let pan = unique_pan();
    let other = unique_pan();
    let id_pan = unique_pan();
    let mut no_card = card("no-card", &pan);
    no_card.card = None;
    let batch = vec![
        card("", &unique_pan()),                        // 0: missing id
        card(&"x".repeat(129), &unique_pan()),          // 1: too long
        card("caf\u{e9}", &unique_pan()),               // 2: not ASCII
        card(&format!("cust {id_pan}"), &unique_pan()), // 3: holds a card number
        card("tab\there", &unique_pan()),               // 4: control character
        card("dup", "4242424242424241"),                // 5: invalid card, does not claim "dup"
        card("dup", &pan),                              // 6: the first valid "dup": stored
        card("dup", &pan),                              // 7: same card again
        card("dup", &other),                            // 8: another card under "dup"
        no_card,                                        // 9: no card
        card(&"y".repeat(128), &unique_pan()),          // 10: longest id
        card(" ~!", &unique_pan()),                     // 11: printable edge characters
    ];
    let answer = import(&mut app.client, vec![chunk(batch)]).await;
    let results = &answer[0].results;
    use pb::ImportStatus::{Created, Invalid};
    assert_eq!(
        statuses(&answer[0]),
        [
            Invalid, Invalid, Invalid, Invalid, Invalid, Invalid, Created, Invalid, Invalid,
            Invalid, Created, Created
        ]
    );
    for i in [0, 1, 2, 3, 4] {
        let fields: Vec<&str> = results[i]
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, [format!("cards[{i}].import_id")], "card {i}");
        assert!(
            results[i].import_id.is_empty(),
            "a refused id is not echoed"
        );
    }
    assert_eq!(results[5].violations[0].field, "cards[5].card.number");
    assert_eq!(results[9].violations[0].field, "cards[9].card");
    // The same number and another number under the repeated id: answered alike.
    for i in [7, 8] {
        assert!(results[i].token.is_empty());
        assert_eq!(results[i].import_id, "dup");
        let fields: Vec<&str> = results[i]
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, [format!("cards[{i}].import_id")]);
    }
    assert_eq!(
        results[7].violations[0].description,
        results[8].violations[0].description
    );
    assert_eq!(results[10].import_id, "y".repeat(128));
    let text = format!("{answer:?}");
    assert!(!text.contains(&id_pan) && !text.contains("4242424242424241"));
    assert_eq!(reveal(&mut app.client, &results[6].token).await.number, pan);
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 3);
    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' AND detail = \
                 'chunk 1: 12 cards: 3 created, 0 already imported, 0 conflicting, 9 invalid'"
            )
            .await,
        1
    );

    // A chunk of nothing but invalid cards is answered too, and recorded as such; an empty
    // chunk is answered with an empty response.
    let answer = import(
        &mut app.client,
        vec![chunk(vec![card("", &pan)]), chunk(Vec::new())],
    )
    .await;
    assert_eq!(statuses(&answer[0]), [Invalid]);
    assert!(answer[1].results.is_empty());
    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' \
                 AND outcome = 'invalid_argument'"
            )
            .await,
        1
    );
}

/// More than 1000 cards in one message ends the stream with INVALID_ARGUMENT naming
/// `cards`, after the chunks before it were answered; those stay stored.
async fn a_chunk_over_the_limit_ends_the_stream_after_the_chunks_before_it(backend: Backend) {
    let mut app = spawn(backend).await;
    let first = cards("ok", 5);
    let pan = unique_pan();
    let oversized: Vec<pb::ImportCard> =
        (0..1001).map(|i| card(&format!("big-{i}"), &pan)).collect();
    let (answered, failure) = import_as(
        &mut app.client,
        vec![chunk(first), chunk(oversized), chunk(cards("late", 5))],
        None,
    )
    .await
    .expect("the stream starts");
    assert_eq!(
        answered.len(),
        1,
        "the chunk before the bad one is answered"
    );
    assert_eq!(statuses(&answered[0]), [pb::ImportStatus::Created; 5]);
    let status = failure.expect("the stream fails");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["cards"]);
    assert!(!format!("{status:?}").contains(&pan));
    assert!(status.metadata().get("x-request-id").is_some());

    let state = &app.state;
    assert_eq!(
        state
            .count("SELECT COUNT(*) FROM cards WHERE import_id LIKE 'ok-%'")
            .await,
        5
    );
    assert_eq!(
        state
            .count("SELECT COUNT(*) FROM cards WHERE import_id LIKE 'big-%'")
            .await,
        0
    );
    assert_eq!(
        state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' \
                 AND outcome = 'invalid_argument'"
            )
            .await,
        1,
        "the refused stream is recorded"
    );
}

/// A principal without `tokenize` is refused before any card is read; import ids of one
/// tenant do not clash with another's.
async fn importing_needs_the_tokenize_permission_and_import_ids_are_per_tenant(backend: Backend) {
    let s = secure(backend).await;
    let (_, reader) = s.api_key("acme", "reader", &["read", "reveal"]).await;
    let (_, importer) = s.api_key("acme", "importer", &["tokenize"]).await;
    let (_, globex) = s
        .api_key("globex", "importer", &["tokenize", "reveal"])
        .await;
    let mut client = s.vault().await;

    let status = import_as(&mut client, vec![chunk(cards("p", 2))], Some(&reader))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(s.state.count("SELECT COUNT(*) FROM cards").await, 0);
    assert_eq!(
        s.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'import_cards' \
                 AND outcome = 'permission_denied'"
            )
            .await,
        1
    );

    let shared = card("customer-1", &unique_pan());
    let (acme_answer, failure) = import_as(
        &mut client,
        vec![chunk(vec![shared.clone()])],
        Some(&importer),
    )
    .await
    .expect("acme imports");
    assert!(failure.is_none());
    let (globex_answer, failure) = import_as(
        &mut client,
        vec![chunk(vec![shared.clone()])],
        Some(&globex),
    )
    .await
    .expect("globex imports");
    assert!(failure.is_none());
    let acme_result = &acme_answer[0].results[0];
    let globex_result = &globex_answer[0].results[0];
    assert_eq!(acme_result.status(), pb::ImportStatus::Created);
    assert_eq!(
        globex_result.status(),
        pb::ImportStatus::Created,
        "ids are per tenant"
    );
    assert_ne!(acme_result.token, globex_result.token);
    assert_eq!(
        s.state
            .count("SELECT COUNT(*) FROM cards WHERE import_id = 'customer-1'")
            .await,
        2
    );
    let revealed = client
        .reveal(with_key(
            pb::RevealRequest {
                token: acme_result.token.clone(),
            },
            &globex,
        ))
        .await
        .expect_err("another tenant's card");
    assert_eq!(revealed.code(), Code::NotFound);

    // The dev harness's tenants behave alike.
    let mut dev = spawn(backend).await;
    let mut other = spawn_tenant(dev.state.clone(), "globex").await;
    let a = import(&mut dev.client, vec![chunk(vec![shared.clone()])]).await;
    let b = import(&mut other.client, vec![chunk(vec![shared])]).await;
    assert_eq!(statuses(&a[0]), [pb::ImportStatus::Created]);
    assert_eq!(statuses(&b[0]), [pb::ImportStatus::Created]);
}

/// A row the database skips although its import id is free is a token collision (the PAN-
/// shaped tokens of short PANs can collide): the card is sealed again under a fresh token and
/// stored in the same transaction. A trigger skips the first insert of one card to force it.
async fn a_token_clash_without_an_import_clash_is_resealed_under_a_fresh_token(backend: Backend) {
    let mut app = spawn(backend).await;
    import(&mut app.client, vec![chunk(cards("warm", 1))]).await;
    app.state
        .execute("CREATE TABLE skipped (token TEXT)", &[])
        .await;
    match backend {
        Backend::Sqlite => {
            app.state
                .execute(
                    "CREATE TRIGGER skip_once BEFORE INSERT ON cards \
                     WHEN NEW.import_id = 'clash' AND (SELECT COUNT(*) FROM skipped) = 0 \
                     BEGIN INSERT INTO skipped VALUES (NEW.token); SELECT RAISE(IGNORE); END",
                    &[],
                )
                .await;
        }
        Backend::Postgres => {
            app.state
                .execute(
                    "CREATE FUNCTION skip_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.import_id = 'clash' AND NOT EXISTS (SELECT 1 FROM skipped) THEN \
                     INSERT INTO skipped VALUES (NEW.token); RETURN NULL; END IF; \
                     RETURN NEW; END $$",
                    &[],
                )
                .await;
            app.state
                .execute(
                    "CREATE TRIGGER skip_once BEFORE INSERT ON cards \
                     FOR EACH ROW EXECUTE FUNCTION skip_once()",
                    &[],
                )
                .await;
        }
    }
    let mut batch = cards("n", 3);
    batch.insert(1, card("clash", &unique_pan()));
    let answer = import(&mut app.client, vec![chunk(batch.clone())]).await;
    assert_eq!(statuses(&answer[0]), [pb::ImportStatus::Created; 4]);
    assert_eq!(app.state.count("SELECT COUNT(*) FROM skipped").await, 1);
    assert_eq!(
        app.state
            .count("SELECT COUNT(*) FROM skipped JOIN cards ON cards.token = skipped.token")
            .await,
        0,
        "the card is stored under another token than the one first drawn"
    );
    for (result, card) in answer[0].results.iter().zip(&batch) {
        // Opening the record proves it was sealed for the token it is stored under.
        assert_eq!(
            reveal(&mut app.client, &result.token).await.number,
            number_of(card)
        );
    }
}
