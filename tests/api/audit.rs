//! The audit log: every action recorded, chains that verify, and tampering that does not.

use cardvault::{audit, server};
use tonic::Code;

use crate::{
    helpers::{AppState, Backend, spawn_app, unique_pan},
    on_both_backends,
};

on_both_backends!(
    every_card_action_is_recorded_without_card_data,
    tampering_with_the_audit_log_is_detected_and_located
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
