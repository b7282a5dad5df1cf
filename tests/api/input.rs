//! Input that must not crash or mislead: times at the ends of their ranges, refusals that
//! reach the audit log, and database files no other local user can read.

use std::{os::unix::fs::PermissionsExt, sync::Arc};

use cardvault::{
    pb::v1::{self as pb, access_admin_client::AccessAdminClient},
    server,
    vault::{KeyOperation, Operator, TenantId},
};
use tonic::Code;

use crate::{
    access::secure,
    helpers::{
        AppState, Backend, spawn_app, spawn_on, tokenize_request, unique_pan, violated_fields,
        with_key,
    },
    on_both_backends,
};

on_both_backends!(
    times_at_the_ends_of_their_ranges_are_invalid_arguments,
    a_tokenize_refused_for_a_shredded_tenant_is_recorded,
);

/// Durations and timestamps whose arithmetic overflows, or whose nanos are out of range
/// or of the other sign.
const HOSTILE: [(i64, i32); 6] = [
    (i64::MAX, 2_000_000_000),
    (i64::MAX, 0),
    (i64::MIN, -2_000_000_000),
    (i64::MIN, 0),
    (60, 2_000_000_000),
    (60, -2_000_000_000),
];

async fn times_at_the_ends_of_their_ranges_are_invalid_arguments(backend: Backend) {
    let s = secure(backend).await;
    let (_, admin) = s.api_key("acme", "ops", &["keys:admin"]).await;
    let (_, shop) = s.api_key("acme", "shop", &["tokenize"]).await;
    let reader = s.principal("acme", "reader", &["read"], None).await;
    let mut cards = s.vault().await;
    let mut access = AccessAdminClient::new(s.app.channel().await);
    for (seconds, nanos) in HOSTILE {
        let mut request = tokenize_request(&unique_pan());
        request.expiration = Some(pb::tokenize_request::Expiration::Ttl(
            prost_types::Duration { seconds, nanos },
        ));
        let err = cards
            .tokenize(with_key(request, &shop))
            .await
            .expect_err("a hostile ttl");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "ttl {seconds} {nanos}: {err:?}"
        );
        assert_eq!(violated_fields(&err), ["ttl"]);

        let mut request = tokenize_request(&unique_pan());
        request.expiration = Some(pb::tokenize_request::Expiration::ExpiresAt(
            prost_types::Timestamp {
                seconds: if seconds == 60 {
                    4_102_444_800
                } else {
                    seconds
                },
                nanos,
            },
        ));
        let err = cards
            .tokenize(with_key(request, &shop))
            .await
            .expect_err("a hostile expires_at");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "expires_at {seconds} {nanos}: {err:?}"
        );
        assert_eq!(violated_fields(&err), ["expires_at"]);

        let err = access
            .create_api_key(with_key(
                pb::CreateApiKeyRequest {
                    principal_id: reader.clone(),
                    valid_for: Some(prost_types::Duration { seconds, nanos }),
                },
                &admin,
            ))
            .await
            .expect_err("a hostile validity");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "valid_for {seconds} {nanos}: {err:?}"
        );
        assert_eq!(violated_fields(&err), ["valid_for"]);
    }
    // The server is alive and serves the same calls with sane values.
    let mut request = tokenize_request(&unique_pan());
    request.expiration = Some(pb::tokenize_request::Expiration::Ttl(
        prost_types::Duration {
            seconds: 3_600,
            nanos: 0,
        },
    ));
    cards
        .tokenize(with_key(request, &shop))
        .await
        .expect("a sane ttl");
    let key = access
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                principal_id: reader,
                valid_for: Some(prost_types::Duration {
                    seconds: 86_400,
                    nanos: 0,
                }),
            },
            &admin,
        ))
        .await
        .expect("a sane validity")
        .into_inner();
    assert!(key.info.and_then(|i| i.expires_at).is_some());
    // Every refusal is on record as a malformed request.
    for (action, expected) in [
        ("tokenize", 2 * HOSTILE.len()),
        ("admin.create_api_key", HOSTILE.len()),
    ] {
        let sql: &'static str = Box::leak(
            format!(
                "SELECT COUNT(*) FROM audit_records WHERE action = '{action}' \
                 AND outcome = 'invalid_argument'"
            )
            .into_boxed_str(),
        );
        assert_eq!(s.state.count(sql).await, expected as i64, "{action}");
    }
}

async fn a_tokenize_refused_for_a_shredded_tenant_is_recorded(backend: Backend) {
    let mut app = spawn_app(backend).await;
    app.tokenize(&unique_pan()).await;
    app.stop().await;
    let state = app.state.clone();
    // Two operators shred the tenant while this replica is down.
    {
        let ops = server::open_vault(&state.settings("dev"))
            .await
            .expect("operator vault");
        let dev = TenantId::parse("dev").expect("tenant");
        let request = ops
            .request_key_operation(&Operator::local("alice"), KeyOperation::ShredTenant(dev))
            .await
            .expect("request shred");
        ops.approve_key_request(&Operator::local("bob"), &request.id)
            .await
            .expect("approve shred");
    }
    let mut app = spawn_on(state.clone(), "dev").await;
    let err = app
        .client
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect_err("a shredded tenant takes no cards");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let refused = state
        .count(
            "SELECT COUNT(*) FROM audit_records WHERE action = 'tokenize' \
             AND outcome = 'conflict' AND tenant_id = 'dev' AND detail LIKE '%shredded%'",
        )
        .await;
    assert_eq!(refused, 1, "the refusal is not in the audit log");
    app.stop().await;
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_are_owner_only_whatever_the_directory_mode() {
    let state = Arc::new(AppState::new(Backend::Sqlite).await);
    std::fs::set_permissions(state.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let mut app = spawn_on(state.clone(), "dev").await;
    app.tokenize(&unique_pan()).await;
    let files = state.sqlite_files();
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .collect();
    for name in ["cardvault.db", "cardvault.db-wal", "cardvault.db-shm"] {
        assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
    }
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    app.stop().await;

    // Files left readable by an earlier version (or a copy) are made owner-only at start.
    for file in state.sqlite_files() {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let mut app = spawn_on(state.clone(), "dev").await;
    app.tokenize(&unique_pan()).await;
    let files = state.sqlite_files();
    assert!(!files.is_empty());
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    app.stop().await;
}
