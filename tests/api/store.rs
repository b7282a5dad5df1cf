//! The store's own contract, on both backends: insert outcomes the vault relies on.

use cardvault::store::{self, CardRow, DekRow, StoreOptions, TenantRow};
use time::OffsetDateTime;

use crate::{
    helpers::{AppState, Backend},
    on_both_backends,
};

on_both_backends!(token_and_canonical_conflicts_are_told_apart);

fn card(token: &str, canonical: bool, dek: uuid::Uuid) -> CardRow {
    CardRow {
        token: token.to_owned(),
        tenant_id: "t".to_owned(),
        token_format: "opaque".to_owned(),
        fingerprint: vec![7; 32],
        dek_id: dek,
        ciphertext: vec![1, 2, 3],
        brand: "VISA".to_owned(),
        last4: "4242".to_owned(),
        bin: "42424242".to_owned(),
        exp_month: 12,
        exp_year: 2030,
        metadata: vec![],
        canonical,
        created_at: OffsetDateTime::UNIX_EPOCH,
        expires_at: None,
        honeytoken: false,
    }
}

async fn token_and_canonical_conflicts_are_told_apart(backend: Backend) {
    let state = AppState::new(backend).await;
    let store = store::connect(&state.database_url, &StoreOptions::default())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let now = OffsetDateTime::now_utc();
    assert!(
        store
            .insert_tenant(&TenantRow {
                id: "t".to_owned(),
                wrapped_secret: vec![0; 8],
                secret_kek_version: 1,
                created_at: now,
            })
            .await
            .expect("tenant")
    );
    let dek = uuid::Uuid::new_v4();
    let dek_row = DekRow {
        id: dek,
        tenant_id: "t".to_owned(),
        kek_version: 1,
        wrapped_key: vec![0; 8],
        active: true,
        created_at: now,
    };
    assert!(store.insert_active_dek(&dek_row).await.expect("dek"));
    let second = DekRow {
        id: uuid::Uuid::new_v4(),
        ..dek_row
    };
    assert!(
        !store.insert_active_dek(&second).await.expect("second dek"),
        "one active DEK per tenant"
    );

    // All in one transaction: on PostgreSQL a unique violation would abort it, so this also
    // proves the savepoint keeps the transaction usable after a conflict.
    let mut tx = store.begin().await.expect("begin");
    for (token, canonical, expected) in [
        ("tok_a", true, "Inserted"),
        ("tok_a", false, "TokenTaken"),
        ("tok_b", true, "CanonicalExists"),
        ("tok_c", false, "Inserted"),
    ] {
        let outcome = tx
            .insert_card(&card(token, canonical, dek))
            .await
            .expect("insert");
        assert_eq!(format!("{outcome:?}"), expected, "{token}");
    }
    tx.commit().await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    let got = tx
        .card("t", "tok_a", now)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(got, card("tok_a", true, dek));
    assert!(
        tx.card("other", "tok_a", now)
            .await
            .expect("read")
            .is_none()
    );
    // A transaction dropped without commit leaves nothing behind.
    tx.insert_card(&card("tok_d", false, dek))
        .await
        .expect("insert");
    drop(tx);
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.card("t", "tok_d", now).await.expect("read").is_none());
}
