//! The canary: after a run of tokenize, reveal and failing calls with one unique card number
//! and cardholder name, neither appears in the captured logs, the error messages, or the raw
//! bytes of the database (SQLite files; a `pg_dump` of the PostgreSQL database), audit
//! records included; nor does the key-encryption key. The CVC sent along is refused and
//! never stored (`cvc` stays refused until charge forwarding holds it).

use cardvault::pb::v1 as pb;
use tonic_types::StatusExt;

use crate::{
    helpers::{Backend, captured_logs, spaced, spawn_app, tokenize_request, unique_pan},
    on_both_backends,
    postgres::PgServer,
};

on_both_backends!(the_canary_card_never_leaves_the_vault);

/// Reads the SQLite database with its WAL and shared-memory files. SQLite checkpoints and
/// deletes the WAL when its last connection closes, so a file listed a moment ago can be gone;
/// its pages are then in the main file, and the whole set is read again.
pub(crate) fn read_sqlite_files(list: impl Fn() -> Vec<std::path::PathBuf>) -> Vec<u8> {
    'again: for _ in 0..10 {
        let files = list();
        assert!(!files.is_empty(), "the SQLite database exists");
        let mut stored = Vec::new();
        for file in files {
            match std::fs::read(&file) {
                Ok(bytes) => stored.extend(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'again,
                Err(e) => panic!("read {}: {e}", file.display()),
            }
        }
        return stored;
    }
    panic!("the SQLite files kept vanishing while being read");
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn the_canary_card_never_leaves_the_vault(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let pan = unique_pan();
    let holder = format!("Canary {}", uuid::Uuid::new_v4().simple());
    let spaced = spaced(&pan);
    // What must never be seen: the PAN in any spelling, any 12-digit prefix of it (the
    // stored BIN is 8 digits), and the cardholder name.
    let forbidden = [
        pan.clone(),
        spaced.clone(),
        pan[..12].to_owned(),
        holder.clone(),
    ];

    let mut request = tokenize_request(&spaced);
    request.card.as_mut().expect("card").cardholder_name = holder.clone();
    request.reuse_existing = true;
    let token = app
        .client
        .tokenize(request.clone())
        .await
        .expect("tokenize")
        .into_inner()
        .token;
    app.client.tokenize(request.clone()).await.expect("dedup");
    let mut shaped = request.clone();
    shaped.token_format = pb::TokenFormat::PanShaped.into();
    let shaped = app
        .client
        .tokenize(shaped)
        .await
        .expect("shaped")
        .into_inner()
        .token;
    app.client
        .get_card(pb::GetCardRequest {
            token: token.clone(),
        })
        .await
        .expect("get");
    let revealed = app
        .client
        .reveal(pb::RevealRequest {
            token: token.clone(),
        })
        .await
        .expect("reveal")
        .into_inner();
    assert_eq!(
        revealed.number, pan,
        "reveal is the one place the PAN comes back"
    );
    assert_eq!(revealed.cardholder_name, holder);

    // Failing calls that carry the canary.
    let mut failures = Vec::new();
    let mut bad_month = request.clone();
    bad_month.card.as_mut().expect("card").exp_month = 0;
    let mut bad_luhn = request.clone();
    let last = pan.as_bytes()[15];
    let broken = format!(
        "{}{}",
        &pan[..15],
        char::from(b'0' + (last - b'0' + 1) % 10)
    );
    bad_luhn.card.as_mut().expect("card").number = broken;
    let mut in_metadata = request.clone();
    in_metadata
        .metadata
        .insert("note".to_owned(), spaced.clone());
    // A well-formed CVC is held for a charge (tests/api/charge.rs scans for it); a malformed
    // one is refused without being echoed.
    let mut with_cvc = request.clone();
    with_cvc.cvc = "73x".to_owned();
    for bad in [bad_month, bad_luhn, in_metadata, with_cvc] {
        failures.push(app.client.tokenize(bad).await.expect_err("refused"));
    }
    failures.push(
        app.client
            .reveal(pb::RevealRequest { token: pan.clone() })
            .await
            .expect_err("a PAN is not a token"),
    );
    failures.push(
        app.client
            .get_card(pb::GetCardRequest {
                token: spaced.clone(),
            })
            .await
            .expect_err("a PAN is not a token"),
    );
    app.client
        .delete_card(pb::DeleteCardRequest { token: shaped })
        .await
        .expect("delete");
    app.stop().await;

    let errors: Vec<u8> = failures
        .iter()
        .flat_map(|s| {
            format!(
                "{} {:?} {:?} {:?}",
                s.message(),
                s.get_error_details(),
                s.metadata(),
                s
            )
            .into_bytes()
        })
        .collect();
    let logs = captured_logs();
    assert!(!logs.is_empty(), "logs were captured");
    let stored = match backend {
        Backend::Sqlite => read_sqlite_files(|| app.state.sqlite_files()),
        Backend::Postgres => {
            let db = app.state.pg_database.as_deref().expect("pg database");
            let dump = PgServer::get().dump(db);
            assert!(contains(&dump, &token), "the dump holds the vault's rows");
            dump
        }
    };
    assert!(
        contains(&stored, &pan[pan.len() - 4..]),
        "last 4 is stored in clear"
    );

    // The audit log recorded the run (and is part of what was scanned) ...
    let audited: &'static str = Box::leak(
        format!("SELECT COUNT(*) FROM audit_records WHERE token = '{token}'").into_boxed_str(),
    );
    assert!(
        app.state.count(audited).await >= 3,
        "tokenize, get and reveal are audited"
    );
    // ... and no key-encryption key shows anywhere either (hex, as the keyring holds it).
    let keyring =
        std::fs::read_to_string(app.state.dir.path().join("keyring.toml")).expect("read keyring");
    let keks: Vec<String> = keyring
        .lines()
        .filter_map(|l| l.trim().strip_prefix("key = \""))
        .map(|k| k.trim_end_matches('"').to_owned())
        .collect();
    assert!(!keks.is_empty(), "the keyring holds a KEK");
    for kek in &keks {
        for needle in [kek.as_str(), &kek[..16]] {
            assert!(!contains(&logs, needle), "logs leak a KEK");
            assert!(!contains(&errors, needle), "errors leak a KEK");
            assert!(!contains(&stored, needle), "the database holds a KEK");
        }
    }

    for needle in &forbidden {
        assert!(!contains(&logs, needle), "logs leak card data");
        assert!(!contains(&errors, needle), "errors leak card data");
        assert!(
            !contains(&stored, needle),
            "the database holds card data in clear"
        );
    }
}
