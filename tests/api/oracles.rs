//! Card-number oracles, each test written as the attack: a caller without `reveal` who knows
//! a stored card's BIN and last 4 (from `GetCard`, a receipt) tries the ~1000 Luhn-valid
//! 16-digit numbers that fit them and must not learn which one is stored — not by resending
//! import ids, not by comparing fingerprints, not by `reuse_existing`. And card numbers are
//! kept out of clear-text fields whatever their brand, grouping or script.

use std::sync::Arc;

use cardvault::{card::luhn, pb::v1 as pb};
use tonic::Code;

use crate::{
    access::secure,
    helpers::{
        AppState, Backend, TestApp, captured_logs, spawn_app, spawn_with, tokenize_request,
        unique_pan, violated_fields, with_key,
    },
    import::{card, chunk, import, import_as},
    on_both_backends,
};

on_both_backends!(
    a_chunk_of_candidates_under_a_stored_import_id_does_not_single_out_the_stored_number,
    conflicting_resends_past_the_budget_are_refused_alike_and_raise_the_alarm,
    the_reuse_existing_guessing_loop_is_cut_off_by_the_budget_and_alarms,
    concurrent_reuse_existing_guesses_cannot_share_the_last_tokens_of_the_budget,
    reuse_existing_hits_past_the_budget_are_refused_whether_or_not_the_card_is_stored,
    card_numbers_in_any_script_or_brand_are_kept_out_of_clear_text_fields,
);

/// Every Luhn-valid 16-digit number with `pan`'s first 8 and last 4 digits, in numeric
/// order: what a caller who sees BIN and last 4 must search. `pan` is among them.
fn candidates(pan: &str) -> Vec<String> {
    (0..10_000)
        .map(|middle| format!("{}{middle:04}{}", &pan[..8], &pan[12..]))
        .filter(|number| luhn::is_valid(number.as_bytes()))
        .collect()
}

/// `candidates(pan)` with `pan` moved to position `at`.
fn candidates_with_stored_at(pan: &str, at: usize) -> Vec<String> {
    let mut all = candidates(pan);
    let found = all
        .iter()
        .position(|n| n == pan)
        .expect("the PAN is a candidate");
    all.swap(found, at);
    all
}

fn reuse(number: &str) -> pb::TokenizeRequest {
    let mut request = tokenize_request(number);
    request.reuse_existing = true;
    request
}

/// A dev vault (tenant `dev`, one principal) with its settings adjusted.
async fn spawn(backend: Backend, adjust: impl FnOnce(&mut cardvault::config::Settings)) -> TestApp {
    let state = Arc::new(AppState::new(backend).await);
    let mut settings = state.settings("dev");
    adjust(&mut settings);
    spawn_with(state, "dev", settings).await
}

/// The Prometheus text of a dev vault's (plain-text) admin listener.
async fn metrics(app: &TestApp) -> String {
    crate::errors::http_get(app.admin_addr, "/metrics").await
}

/// Whether the guess-budget alarm metric of `kind` has counted at least once.
fn alarmed(metrics: &str, kind: &str) -> bool {
    let label = format!("cardvault_guess_budget_exceeded_total{{kind=\"{kind}\"}}");
    metrics.lines().any(|line| {
        line.strip_prefix(&label)
            .and_then(|value| value.trim().parse::<f64>().ok())
            .is_some_and(|count| count >= 1.0)
    })
}

/// The attack: one 1000-card chunk under the import id of a stored card, holding every
/// candidate. Before, each repeat was compared with the stored card: 999 `CONFLICT` and one
/// `ALREADY_IMPORTED` with the token — the stored number. Now only the first card of the id
/// is compared; every other candidate, the stored number included, gets the same answer.
async fn a_chunk_of_candidates_under_a_stored_import_id_does_not_single_out_the_stored_number(
    backend: Backend,
) {
    let mut app = spawn_app(backend).await;
    let stored = unique_pan();
    let original = import(&mut app.client, vec![chunk(vec![card("victim", &stored)])]).await;
    let token = original[0].results[0].token.clone();
    assert_eq!(original[0].results[0].status(), pb::ImportStatus::Created);

    let at = 617;
    let guesses = candidates_with_stored_at(&stored, at);
    assert_eq!(guesses.len(), 1000, "one Luhn-valid number in ten");
    let attack = guesses.iter().map(|n| card("victim", n)).collect();
    let answer = import(&mut app.client, vec![chunk(attack)]).await;
    let results = &answer[0].results;
    assert_eq!(results.len(), 1000);
    assert_eq!(results[0].status(), pb::ImportStatus::Conflict);
    let shape = |r: &pb::ImportResult| {
        let descriptions: Vec<String> =
            r.violations.iter().map(|v| v.description.clone()).collect();
        (
            r.status(),
            r.import_id.clone(),
            r.token.clone(),
            descriptions,
        )
    };
    for (i, result) in results.iter().enumerate().skip(1) {
        assert_eq!(shape(result), shape(&results[1]), "candidate {i}");
    }
    assert_eq!(results[at].status(), pb::ImportStatus::Invalid);
    assert!(
        !format!("{answer:?}").contains(&token),
        "the stored card's token is not handed out"
    );
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 1);
}

/// The attack spread over chunks: resend a stored import id with one candidate per chunk.
/// Before, every resend was compared. Now `CONFLICT` answers are budgeted per principal (3
/// here); past the budget a chunk resending any existing id is refused with
/// `RESOURCE_EXHAUSTED` — the right number exactly like a wrong one — and raises the alarm. A
/// legitimate resend with the same numbers still gets `ALREADY_IMPORTED` and its token.
async fn conflicting_resends_past_the_budget_are_refused_alike_and_raise_the_alarm(
    backend: Backend,
) {
    let mut app = spawn(backend, |s| s.limits.import_conflicts_per_hour = 3).await;
    let stored: Vec<String> = (0..6).map(|_| unique_pan()).collect();
    let id = |i: usize| format!("v-{i}");
    let all = || {
        chunk(
            stored
                .iter()
                .enumerate()
                .map(|(i, n)| card(&id(i), n))
                .collect(),
        )
    };
    let original = import(&mut app.client, vec![all()]).await;
    let tokens: Vec<String> = original[0]
        .results
        .iter()
        .map(|r| r.token.clone())
        .collect();

    // Resending the same numbers is what a recovering importer does, as often as it needs.
    for _ in 0..3 {
        let again = import(&mut app.client, vec![all()]).await;
        for (result, token) in again[0].results.iter().zip(&tokens) {
            assert_eq!(result.status(), pb::ImportStatus::AlreadyImported);
            assert_eq!(&result.token, token);
        }
    }

    // Three wrong guesses are answered as conflicts...
    let wrong = |i: usize| {
        let guess = candidates(&stored[i])
            .into_iter()
            .find(|n| *n != stored[i])
            .expect("a wrong candidate");
        chunk(vec![card(&id(i), &guess)])
    };
    let answered = import(&mut app.client, vec![wrong(0), wrong(1), wrong(2)]).await;
    for response in &answered {
        assert_eq!(response.results[0].status(), pb::ImportStatus::Conflict);
    }
    // ...the fourth is refused, and so is the stored number: right and wrong look alike.
    let (none, wrong_guess) = import_as(&mut app.client, vec![wrong(3)], None)
        .await
        .expect("the import starts");
    let (nothing, right_guess) = import_as(
        &mut app.client,
        vec![chunk(vec![card(&id(4), &stored[4])])],
        None,
    )
    .await
    .expect("the import starts");
    assert!(none.is_empty() && nothing.is_empty());
    let (wrong_guess, right_guess) = (wrong_guess.expect("refused"), right_guess.expect("refused"));
    assert_eq!(
        wrong_guess.code(),
        Code::ResourceExhausted,
        "{wrong_guess:?}"
    );
    assert_eq!(right_guess.code(), wrong_guess.code());
    assert_eq!(right_guess.message(), wrong_guess.message());

    // New cards are still imported: only resends are budgeted.
    let fresh = import(
        &mut app.client,
        vec![chunk(vec![card("new-1", &unique_pan())])],
    )
    .await;
    assert_eq!(fresh[0].results[0].status(), pb::ImportStatus::Created);

    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE alarm AND action = 'import_cards' \
                 AND outcome = 'rate_limited'"
            )
            .await,
        2
    );
    assert!(alarmed(&metrics(&app).await, "import_conflicts"));
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(logs.contains("GUESS BUDGET EXCEEDED"));
    for pan in &stored {
        assert!(
            !logs.contains(pan.as_str()),
            "a card number reached the logs"
        );
    }
}

/// The attack through `reuse_existing`: tokenize each candidate and watch for
/// `created: false`. Before, nothing stopped the loop from reaching the stored number. Now
/// misses per BIN and last 4 are budgeted (5 here, one spent storing the card itself): the
/// loop is refused with `RESOURCE_EXHAUSTED` long before the stored number, every refusal
/// is an alarm, and cards of other BINs and last 4s go on as before.
async fn the_reuse_existing_guessing_loop_is_cut_off_by_the_budget_and_alarms(backend: Backend) {
    let mut app = spawn(backend, |s| s.limits.reuse_misses_per_hour = 5).await;
    let stored = unique_pan();
    let victim = app
        .client
        .tokenize(reuse(&stored))
        .await
        .expect("the customer's card")
        .into_inner();
    assert!(victim.created);

    let at = 20;
    let guesses = candidates_with_stored_at(&stored, at);
    let (mut misses, mut refused) = (0, 0);
    for number in &guesses[..=at] {
        match app.client.tokenize(reuse(number)).await {
            Ok(answer) => {
                assert!(
                    answer.into_inner().created,
                    "the loop found the stored card"
                );
                misses += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((misses, refused), (4, 17));

    let other = app
        .client
        .tokenize(reuse(&unique_pan()))
        .await
        .expect("another BIN and last 4 is not affected");
    assert!(other.into_inner().created);
    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE alarm AND action = 'tokenize' \
                 AND outcome = 'rate_limited'"
            )
            .await,
        17
    );
    assert!(alarmed(&metrics(&app).await, "reuse_misses"));
}

/// The same loop sent all at once: before, the budget was checked before the lookup and
/// spent after it, so 200 concurrent guesses all saw the same unspent tokens and were all
/// answered. Now each request takes its tokens before the lookup: exactly what is left is
/// answered (4 of the 5 misses; the customer's own card spent one), the rest are refused.
async fn concurrent_reuse_existing_guesses_cannot_share_the_last_tokens_of_the_budget(
    backend: Backend,
) {
    let app = spawn(backend, |s| s.limits.reuse_misses_per_hour = 5).await;
    let stored = unique_pan();
    let mut client = app.client.clone();
    assert!(
        client
            .tokenize(reuse(&stored))
            .await
            .expect("card")
            .into_inner()
            .created
    );

    let mut guesses = tokio::task::JoinSet::new();
    for number in candidates(&stored)
        .into_iter()
        .filter(|n| *n != stored)
        .take(200)
    {
        let mut client = app.client.clone();
        guesses.spawn(async move { client.tokenize(reuse(&number)).await });
    }
    let (mut answered, mut refused) = (0, 0);
    for answer in guesses.join_all().await {
        match answer {
            Ok(answer) => {
                assert!(
                    answer.into_inner().created,
                    "a guess is not the stored card"
                );
                answered += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((answered, refused), (4, 196));
}

/// Confirming stored cards with `reuse_existing`, for a caller that holds full numbers: hits
/// are budgeted per principal (3 here). The same customer re-adding a card is answered with
/// its token until then; past it every `reuse_existing` request is refused — a stored card
/// and a new one alike — with an alarm, while plain `Tokenize` goes on.
async fn reuse_existing_hits_past_the_budget_are_refused_whether_or_not_the_card_is_stored(
    backend: Backend,
) {
    let mut app = spawn(backend, |s| s.limits.reuse_hits_per_hour = 3).await;
    let stored: Vec<String> = (0..2).map(|_| unique_pan()).collect();
    let mut tokens = Vec::new();
    for pan in &stored {
        let first = app.client.tokenize(reuse(pan)).await.expect("store");
        tokens.push(first.into_inner().token);
    }
    for _ in 0..3 {
        let again = app
            .client
            .tokenize(reuse(&stored[0]))
            .await
            .expect("re-added")
            .into_inner();
        assert!(!again.created);
        assert_eq!(again.token, tokens[0]);
    }
    let known = app
        .client
        .tokenize(reuse(&stored[1]))
        .await
        .expect_err("over the budget");
    let unknown = app
        .client
        .tokenize(reuse(&unique_pan()))
        .await
        .expect_err("over the budget");
    assert_eq!(known.code(), Code::ResourceExhausted);
    assert_eq!(
        (unknown.code(), unknown.message()),
        (known.code(), known.message())
    );
    assert!(
        app.tokenize(&stored[1]).await.created,
        "plain tokenize goes on"
    );
    assert_eq!(
        app.state
            .count("SELECT COUNT(*) FROM audit_records WHERE alarm AND action = 'tokenize'")
            .await,
        2
    );
    assert!(alarmed(&metrics(&app).await, "reuse_hits"));
}

/// The attack with `tokenize` + `read`: read the stored card's BIN and last 4, tokenize the
/// candidates and compare fingerprints. Before, every answer carried the fingerprint and the
/// stored number's matched. Now only callers holding `fingerprint` see one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenize_and_read_caller_without_fingerprint_cannot_compare_fingerprints() {
    let s = secure(Backend::Sqlite).await;
    let (_, owner) = s
        .api_key("acme", "owner", &["tokenize", "read", "fingerprint"])
        .await;
    let (_, stolen) = s.api_key("acme", "checkout", &["tokenize", "read"]).await;
    let (_, support) = s.api_key("acme", "support", &["read", "reveal"]).await;
    let mut client = s.vault().await;
    let stored = unique_pan();
    let victim = client
        .tokenize(with_key(tokenize_request(&stored), &owner))
        .await
        .expect("stored")
        .into_inner();
    let fingerprint = victim.card.expect("card").fingerprint;
    assert_eq!(fingerprint.len(), 64, "the owner sees fingerprints");

    let seen = client
        .get_card(with_key(
            pb::GetCardRequest {
                token: victim.token.clone(),
            },
            &stolen,
        ))
        .await
        .expect("read")
        .into_inner()
        .card
        .expect("card");
    assert_eq!(
        (seen.bin.as_str(), seen.last4.as_str()),
        (&stored[..8], &stored[12..])
    );
    assert!(seen.fingerprint.is_empty());

    let mut guesses = candidates_with_stored_at(&stored, 25);
    guesses.truncate(40);
    for number in &guesses {
        let answer = client
            .tokenize(with_key(tokenize_request(number), &stolen))
            .await
            .expect("tokenize")
            .into_inner();
        assert!(
            answer.card.expect("card").fingerprint.is_empty(),
            "a fingerprint to compare"
        );
    }
    let revealed = client
        .reveal(with_key(
            pb::RevealRequest {
                token: victim.token.clone(),
            },
            &support,
        ))
        .await
        .expect("reveal")
        .into_inner();
    assert!(revealed.card.expect("card").fingerprint.is_empty());

    // With the permission, fingerprints still do their job.
    let again = client
        .tokenize(with_key(tokenize_request(&stored), &owner))
        .await
        .expect("stored again")
        .into_inner();
    assert_eq!(again.card.expect("card").fingerprint, fingerprint);
}

/// Card numbers the old screen let through — of no known brand, or in other scripts'
/// digits — are refused in metadata, charge descriptions, idempotency keys and import ids,
/// and never echoed.
async fn card_numbers_in_any_script_or_brand_are_kept_out_of_clear_text_fields(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let hidden = [
        "0004242424242424242",
        "order 1234567812345670",
        "４２４２ ４２４２ ４２４２ ４２４２",
        "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢",
        "۴۲۴۲-۴۲۴۲-۴۲۴۲-۴۲۴۲",
        "४२४२.४२४२.४२४२.४२४२",
        "4242\u{A0}4242\u{A0}4242\u{A0}4242",
    ];
    for text in hidden {
        let mut request = tokenize_request(&unique_pan());
        request.metadata.insert("note".to_owned(), text.to_owned());
        let status = app.client.tokenize(request).await.expect_err(text);
        assert_eq!(status.code(), Code::InvalidArgument, "{text}");
        assert_eq!(violated_fields(&status), ["metadata"], "{text}");
        assert!(!format!("{status:?}").contains(text));

        let charge = pb::ChargeRequest {
            token: "tok_0000000000000000000000".to_owned(),
            amount: 100,
            currency: "EUR".to_owned(),
            idempotency_key: "k-1".to_owned(),
            description: format!("for {text}"),
            ..Default::default()
        };
        let status = app.client.charge(charge).await.expect_err(text);
        assert!(
            violated_fields(&status).contains(&"description".to_owned()),
            "{text}: {status:?}"
        );
        assert!(!format!("{status:?}").contains(text));
    }
    let keyed = pb::ChargeRequest {
        idempotency_key: "order-4242424242424242".to_owned(),
        ..Default::default()
    };
    let status = app.client.charge(keyed).await.expect_err("a card number");
    assert!(violated_fields(&status).contains(&"idempotency_key".to_owned()));
    assert!(!format!("{status:?}").contains("4242424242424242"));
    let ascii = hidden.iter().filter(|t| t.is_ascii());
    let cards: Vec<pb::ImportCard> = ascii.map(|id| card(id, &unique_pan())).collect();
    let answer = import(&mut app.client, vec![chunk(cards)]).await;
    for (i, result) in answer[0].results.iter().enumerate() {
        assert_eq!(result.status(), pb::ImportStatus::Invalid);
        assert_eq!(result.violations[0].field, format!("cards[{i}].import_id"));
        assert!(result.import_id.is_empty(), "a refused id is not echoed");
    }
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 0);
}
