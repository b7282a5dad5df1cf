//! The audit log: every action recorded, chains that verify, and tampering that does not.

use cardvault::{audit, server};
use tonic::Code;

use crate::{
    helpers::{AppState, Backend, spawn_app, spawn_on, spawn_with, unique_pan},
    on_both_backends,
};

on_both_backends!(
    every_card_action_is_recorded_without_card_data,
    tampering_with_the_audit_log_is_detected_and_located,
    an_anchor_vouches_for_an_untouched_log_and_an_edited_anchor_fails,
    restoring_an_older_copy_of_the_log_passes_verify_but_not_verify_with_an_anchor,
    the_vault_appends_anchors_at_its_interval_and_at_stop
);

async fn every_card_action_is_recorded_without_card_data(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let pan = unique_pan();
    let token = app.tokenize(&pan).await.token;
    use cardvault::pb::v1 as pb;
    app.client
        .get_card(pb::GetCardRequest {
            token: token.clone(),
        })
        .await
        .expect("get");
    app.client
        .reveal(pb::RevealRequest {
            token: token.clone(),
        })
        .await
        .expect("reveal");
    app.client
        .delete_card(pb::DeleteCardRequest {
            token: token.clone(),
        })
        .await
        .expect("delete");
    let err = app
        .client
        .get_card(pb::GetCardRequest {
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut bad = crate::helpers::tokenize_request(&pan);
    bad.card.as_mut().expect("card").exp_month = 13;
    app.client.tokenize(bad).await.unwrap_err();

    let state = &app.state;
    for (action, outcome, expected) in [
        ("tokenize", "ok", 1),
        ("get_card", "ok", 1),
        ("reveal", "ok", 1),
        ("delete_card", "ok", 1),
        ("get_card", "not_found", 1),
        ("tokenize", "invalid_argument", 1),
    ] {
        let sql: &'static str = Box::leak(
            format!(
                "SELECT COUNT(*) FROM audit_records WHERE action = '{action}' \
                 AND outcome = '{outcome}' AND tenant_id = 'dev'"
            )
            .into_boxed_str(),
        );
        assert_eq!(state.count(sql).await, expected, "{action} {outcome}");
    }
    let with_token: &'static str = Box::leak(
        format!("SELECT COUNT(*) FROM audit_records WHERE token = '{token}'").into_boxed_str(),
    );
    assert_eq!(state.count(with_token).await, 5);
    let report = verify(state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
    assert_eq!(report.records, 6);
}

pub(crate) async fn verify(state: &AppState) -> audit::Report {
    let vault = server::open_vault(&state.settings("dev"))
        .await
        .expect("open vault");
    let auditor = vault.auditor().await.expect("auditor");
    audit::verify(vault.store().as_ref(), auditor)
        .await
        .expect("verify runs")
}

async fn tampering_with_the_audit_log_is_detected_and_located(backend: Backend) {
    let mut app = spawn_app(backend).await;
    // 64 records over 16 round-robin chains: every chain holds exactly 4.
    for _ in 0..64 {
        app.tokenize(&unique_pan()).await;
    }
    let state = app.state.clone();
    let untouched = verify(&state).await;
    assert!(untouched.is_intact(), "{:?}", untouched.breaks);
    assert_eq!(untouched.records, 64);
    assert_eq!(
        state
            .count("SELECT COUNT(*) FROM audit_heads WHERE seq = 4")
            .await,
        16
    );

    // Chain 0: edit a record. Chain 1: delete one from the middle. Chain 2: swap two
    // records. Chain 3: cut the last record off.
    state
        .execute(
            "UPDATE audit_records SET outcome = 'not_found' WHERE shard = 0 AND seq = 2",
            &[],
        )
        .await;
    state
        .execute("DELETE FROM audit_records WHERE shard = 1 AND seq = 2", &[])
        .await;
    state
        .execute(
            "UPDATE audit_records SET seq = 100 WHERE shard = 2 AND seq = 2",
            &[],
        )
        .await;
    state
        .execute(
            "UPDATE audit_records SET seq = 2 WHERE shard = 2 AND seq = 3",
            &[],
        )
        .await;
    state
        .execute(
            "UPDATE audit_records SET seq = 3 WHERE shard = 2 AND seq = 100",
            &[],
        )
        .await;
    state
        .execute("DELETE FROM audit_records WHERE shard = 3 AND seq = 4", &[])
        .await;

    let report = verify(&state).await;
    let found: Vec<(u32, u64)> = report.breaks.iter().map(|b| (b.shard, b.seq)).collect();
    assert_eq!(
        found,
        vec![(0, 2), (1, 2), (2, 2), (3, 4)],
        "{:?}",
        report.breaks
    );
    assert!(report.breaks[0].reason.contains("MAC mismatch"));
    assert!(report.breaks[1].reason.contains("missing"));
    assert!(report.breaks[3].reason.contains("truncated"));

    // The CLI says the same and exits non-zero.
    app.stop().await;
    let settings_env = cli_env(&state);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cardvault"))
        .args(["audit", "verify"])
        .env_clear()
        .envs(settings_env)
        .output()
        .expect("run cardvault audit verify");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("chain 0 record 2: MAC mismatch"),
        "{stdout}"
    );
    assert!(stdout.contains("chain 3 record 4"), "{stdout}");
}

/// The environment that points the CLI at a test's database and keyring.
pub(crate) fn cli_env(state: &AppState) -> Vec<(String, String)> {
    vec![
        ("CARDVAULT_DATABASE_URL".into(), state.database_url.clone()),
        (
            "CARDVAULT_KEYS_KEYRING".into(),
            state.dir.path().join("keyring.toml").display().to_string(),
        ),
        ("CARDVAULT_DATABASE_TLS_MODE".into(), "disable".into()),
        ("CARDVAULT_LOG_LEVEL".into(), "warn".into()),
    ]
}

/// Runs the `cardvault` binary against the test's database and keyring, off the async
/// workers; returns its exit code, stdout and stderr.
async fn cardvault(state: &AppState, args: &[&str]) -> (Option<i32>, String, String) {
    let env = cli_env(state);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cardvault"))
            .args(&args)
            .env_clear()
            .envs(env)
            .output()
            .expect("run cardvault")
    })
    .await
    .expect("cli task");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

async fn an_anchor_vouches_for_an_untouched_log_and_an_edited_anchor_fails(backend: Backend) {
    let mut app = spawn_app(backend).await;
    // 32 records over 16 round-robin chains: every chain holds exactly 2.
    for _ in 0..32 {
        app.tokenize(&unique_pan()).await;
    }
    let state = app.state.clone();
    let file = state.dir.path().join("anchors.jsonl");
    let (code, _, stderr) = cardvault(&state, &["audit", "anchor", "--out", path_str(&file)]).await;
    assert_eq!(code, Some(0), "{stderr}");
    // Two more anchors after more records, into the same file: it is appended to.
    for _ in 0..16 {
        app.tokenize(&unique_pan()).await;
    }
    let (code, _, stderr) = cardvault(&state, &["audit", "anchor", "--out", path_str(&file)]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, printed, stderr) = cardvault(&state, &["audit", "anchor"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    app.stop().await;

    let text = std::fs::read_to_string(&file).expect("anchor file");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let first = audit::Anchor::parse(lines[0]).expect("an anchor");
    assert_eq!(first.seq, 32);
    assert!(first.heads.iter().all(|h| h.seq == 2), "{first:?}");
    assert_eq!(
        audit::Anchor::parse(printed.trim()).expect("printed").seq,
        48
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // An untouched log agrees with every anchor.
    let (code, stdout, _) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&file)]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("2 of 2 lines authentic"), "{stdout}");
    assert!(stdout.contains("0 chains disagree"), "{stdout}");

    // Edit the first anchor so that it claims chain 5 held only 1 record: the MAC no longer
    // verifies, whatever the log says.
    let edited_line = lines[0].replace(r#"{"shard":5,"seq":2,"#, r#"{"shard":5,"seq":1,"#);
    assert_ne!(edited_line, lines[0]);
    let edited = state.dir.path().join("edited.jsonl");
    std::fs::write(&edited, format!("{edited_line}\n{}\n", lines[1])).expect("write");
    let (code, stdout, _) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&edited)]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("anchor line 1: anchor MAC does not verify"),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 2 lines authentic"), "{stdout}");

    // A file that is not an anchor file at all fails too, and so does a missing one.
    let junk = state.dir.path().join("junk.jsonl");
    std::fs::write(&junk, "hello\n").expect("write");
    let (code, stdout, _) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&junk)]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("anchor line 1: not an anchor line"),
        "{stdout}"
    );
    let missing = state.dir.path().join("missing.jsonl");
    let (code, _, stderr) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&missing)]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("missing.jsonl"), "{stderr}");
}

async fn restoring_an_older_copy_of_the_log_passes_verify_but_not_verify_with_an_anchor(
    backend: Backend,
) {
    let mut app = spawn_app(backend).await;
    for _ in 0..32 {
        app.tokenize(&unique_pan()).await;
    }
    let state = app.state.clone();
    // The database writer saves a copy of the chain heads (every chain at record 2)…
    state
        .execute("CREATE TABLE saved_heads AS SELECT * FROM audit_heads", &[])
        .await;
    assert_eq!(
        state
            .count("SELECT COUNT(*) FROM saved_heads WHERE seq = 2")
            .await,
        16
    );
    // …the vault writes 32 more records and anchors the log (every chain at record 4)…
    for _ in 0..32 {
        app.tokenize(&unique_pan()).await;
    }
    let file = state.dir.path().join("anchors.jsonl");
    let (code, _, stderr) = cardvault(&state, &["audit", "anchor", "--out", path_str(&file)]).await;
    assert_eq!(code, Some(0), "{stderr}");
    // …and 32 more after the anchor.
    for _ in 0..32 {
        app.tokenize(&unique_pan()).await;
    }
    app.stop().await;

    // The rollback: delete every record after the saved heads and put the saved heads back.
    let deleted = state
        .execute(
            "DELETE FROM audit_records WHERE seq > \
             (SELECT s.seq FROM saved_heads s WHERE s.shard = audit_records.shard)",
            &[],
        )
        .await;
    assert_eq!(deleted, 64);
    state.execute("DELETE FROM audit_heads", &[]).await;
    state
        .execute("INSERT INTO audit_heads SELECT * FROM saved_heads", &[])
        .await;

    // Every chain is internally consistent: the chain check cannot tell. This is the gap
    // anchors close.
    let report = verify(&state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
    assert_eq!(report.records, 32);
    let (code, stdout, _) = cardvault(&state, &["audit", "verify"]).await;
    assert_eq!(code, Some(0), "{stdout}");

    // Against the anchor, every chain is named with the record it lost.
    let (code, stdout, _) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&file)]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "audit log ROLLED BACK: chain 0 rolled back: it ends at record 2, but anchor 64 of"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("(line 1) holds record 4"), "{stdout}");
    assert!(stdout.contains("chain 15 rolled back"), "{stdout}");
    assert!(stdout.contains("16 chains disagree"), "{stdout}");

    // The vault carries on from the restored heads: after 48 more records every chain is
    // past the anchor again, but the record at the anchored position is another one.
    let mut app = spawn_on(state.clone(), "dev").await;
    for _ in 0..48 {
        app.tokenize(&unique_pan()).await;
    }
    app.stop().await;
    let (code, stdout, _) = cardvault(&state, &["audit", "verify"]).await;
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&file)]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("audit log REWRITTEN: chain 0 record 4 is not the one anchor 64 of"),
        "{stdout}"
    );
    assert!(stdout.contains("16 chains disagree"), "{stdout}");
}

/// The anchors in `file` (none while it does not exist).
fn read_anchor_file(file: &std::path::Path) -> Vec<audit::Anchor> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| audit::Anchor::parse(l).expect("an anchor line"))
        .collect()
}

/// Polls `file` until its anchors satisfy `done`; fails after a minute.
async fn wait_for_anchors(
    file: &std::path::Path,
    what: &str,
    done: impl Fn(&[audit::Anchor]) -> bool,
) -> Vec<audit::Anchor> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let anchors = read_anchor_file(file);
        if done(&anchors) {
            return anchors;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within a minute: {anchors:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn the_vault_appends_anchors_at_its_interval_and_at_stop(backend: Backend) {
    let state = std::sync::Arc::new(AppState::new(backend).await);
    let file = state.dir.path().join("anchors").join("vault.jsonl");
    std::fs::create_dir(file.parent().expect("dir")).expect("mkdir");
    let mut settings = state.settings("dev");
    settings.audit.anchor_file = Some(file.clone());
    settings.audit.anchor_interval_secs = 1;
    let mut app = spawn_with(state.clone(), "dev", settings.clone()).await;

    // The first anchor comes at start, before any record.
    let first = wait_for_anchors(&file, "anchor at start", |a| !a.is_empty()).await;
    assert_eq!(first[0].seq, 0);
    for _ in 0..5 {
        app.tokenize(&unique_pan()).await;
    }
    // A later tick anchors the new records, with no request asking for it.
    let ticked = wait_for_anchors(&file, "anchor of the new records", |a| {
        a.iter().any(|anchor| anchor.seq == 5)
    })
    .await;
    assert!(ticked.len() >= 2);
    app.stop().await;
    let after_first_run = read_anchor_file(&file).len();

    // A replica whose interval is an hour anchors at start and at stop only: the anchor at
    // stop covers the records written since.
    settings.audit.anchor_interval_secs = 3600;
    let mut app = spawn_with(state.clone(), "dev", settings).await;
    wait_for_anchors(&file, "anchor at start", |a| a.len() > after_first_run).await;
    for _ in 0..3 {
        app.tokenize(&unique_pan()).await;
    }
    app.stop().await;
    let all = read_anchor_file(&file);
    assert_eq!(all.len(), after_first_run + 2, "{all:?}");
    assert_eq!(all[after_first_run].seq, 5);
    assert_eq!(all[after_first_run + 1].seq, 8);
    assert_eq!(state.count("SELECT COUNT(*) FROM audit_records").await, 8);
    assert!(
        all.windows(2)
            .all(|w| w[0].seq <= w[1].seq && w[0].at <= w[1].at)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Every line verifies, and the log agrees with all of them.
    let (code, stdout, _) =
        cardvault(&state, &["audit", "verify", "--anchor", path_str(&file)]).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("{0} of {0} lines authentic", all.len())),
        "{stdout}"
    );
}
