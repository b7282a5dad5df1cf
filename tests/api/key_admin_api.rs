//! The `KeyAdmin` service's surface: who may call it, what it refuses as malformed, what
//! `GetKeyStatus` reports, the answers of the rotations and of dual control, and the
//! `cardvault keys` CLI that calls it. (Rotation under load, crash recovery and shredding
//! are in `keys.rs`.)

use cardvault::pb::v1::{self as pb, key_admin_client::KeyAdminClient};
use tonic::{Code, transport::Channel};

use crate::{
    access::{Secure, secure},
    helpers::{Backend, spawn_app, tokenize_request, unique_pan, violated_fields, with_key},
    on_both_backends,
};

on_both_backends!(
    every_key_admin_call_needs_keys_admin,
    key_status_reports_the_provider_the_keks_and_one_data_key_per_tenant,
    rotating_the_kek_makes_version_2_primary_and_starts_a_rewrap_job,
    rotating_deks_retires_the_old_key_with_its_records,
    a_request_cannot_be_approved_by_its_requester,
);

async fn key_admin(s: &Secure) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(s.app.channel().await)
}

/// Tokenizes `cards` fresh cards as a principal of `tenant`.
async fn tokenize_in(s: &Secure, tenant: &str, cards: usize) {
    let (_, key) = s
        .api_key(tenant, &format!("shop-{tenant}"), &["tokenize"])
        .await;
    let mut client = s.vault().await;
    for _ in 0..cards {
        client
            .tokenize(with_key(tokenize_request(&unique_pan()), &key))
            .await
            .expect("tokenize");
    }
}

async fn every_key_admin_call_needs_keys_admin(backend: Backend) {
    let s = secure(backend).await;
    // Every other permission, but not keys:admin.
    let (_, key) = s
        .api_key(
            "acme",
            "everything-else",
            &[
                "tokenize",
                "read",
                "reveal",
                "charge",
                "delete",
                "audit:read",
            ],
        )
        .await;
    let mut keys = key_admin(&s).await;
    let codes = [
        keys.rotate_kek(with_key(pb::RotateKekRequest {}, &key))
            .await
            .map(drop),
        keys.rotate_deks(with_key(pb::RotateDeksRequest::default(), &key))
            .await
            .map(drop),
        keys.get_key_status(with_key(pb::GetKeyStatusRequest::default(), &key))
            .await
            .map(drop),
        keys.request_retire_kek(with_key(
            pb::RequestRetireKekRequest { kek_version: 1 },
            &key,
        ))
        .await
        .map(drop),
        keys.request_shred_tenant(with_key(
            pb::RequestShredTenantRequest {
                tenant: "acme".to_owned(),
            },
            &key,
        ))
        .await
        .map(drop),
        keys.approve_key_request(with_key(
            pb::ApproveKeyRequestRequest {
                request_id: "kr_0123456789abcdef".to_owned(),
            },
            &key,
        ))
        .await
        .map(drop),
    ]
    .map(|result| result.err().map(|status| status.code()));
    assert_eq!(codes, [Some(Code::PermissionDenied); 6]);

    // Without credentials at all, the caller is not even known.
    let refused = keys
        .get_key_status(pb::GetKeyStatusRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_key_admin_requests_are_invalid_arguments_naming_the_field() {
    // An operator holds keys:admin, so only the request itself is wrong.
    let app = spawn_app(Backend::Sqlite).await;
    let admin = app.operator_key().await;
    let mut keys = KeyAdminClient::new(app.channel().await);
    let bad_tenant = || "Not A Tenant!".to_owned();

    let refusals = [
        (
            keys.rotate_deks(with_key(
                pb::RotateDeksRequest {
                    tenant: bad_tenant(),
                    reencrypt: false,
                },
                &admin,
            ))
            .await
            .map(drop),
            "tenant",
        ),
        (
            keys.get_key_status(with_key(
                pb::GetKeyStatusRequest {
                    tenant: bad_tenant(),
                },
                &admin,
            ))
            .await
            .map(drop),
            "tenant",
        ),
        (
            keys.request_shred_tenant(with_key(
                pb::RequestShredTenantRequest {
                    tenant: bad_tenant(),
                },
                &admin,
            ))
            .await
            .map(drop),
            "tenant",
        ),
        (
            keys.request_shred_tenant(with_key(pb::RequestShredTenantRequest::default(), &admin))
                .await
                .map(drop),
            "tenant",
        ),
        (
            keys.request_retire_kek(with_key(
                pb::RequestRetireKekRequest { kek_version: 0 },
                &admin,
            ))
            .await
            .map(drop),
            "kek_version",
        ),
        (
            keys.approve_key_request(with_key(pb::ApproveKeyRequestRequest::default(), &admin))
                .await
                .map(drop),
            "request_id",
        ),
    ];
    for (i, (result, field)) in refusals.into_iter().enumerate() {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "#{i}: {status:?}");
        assert_eq!(violated_fields(&status), [field], "#{i}");
    }
}

async fn key_status_reports_the_provider_the_keks_and_one_data_key_per_tenant(backend: Backend) {
    let s = secure(backend).await;
    let (_, admin) = s.global_operator("acme", "ops").await;
    tokenize_in(&s, "acme", 2).await;
    tokenize_in(&s, "globex", 1).await;
    let mut keys = key_admin(&s).await;

    let status = keys
        .get_key_status(with_key(pb::GetKeyStatusRequest::default(), &admin))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.provider, "local");
    assert_eq!(status.primary_kek_version, 1);
    assert_eq!(status.kek_versions.len(), 1, "{:?}", status.kek_versions);
    let v1 = &status.kek_versions[0];
    assert_eq!((v1.version, v1.primary), (1, true));
    assert_eq!(v1.records, 3);
    assert!(v1.data_keys >= 2 && v1.tenant_secrets >= 2, "{v1:?}");
    assert_eq!(v1.audit_keys, 1);
    assert!(status.dek_max_encryptions > 0);
    assert!(status.dek_max_age.is_some_and(|age| age.seconds > 0));
    assert!(status.jobs.is_empty() && status.pending_requests.is_empty());

    let mut records: Vec<(String, u64)> = status
        .deks
        .iter()
        .filter(|dek| dek.active)
        .map(|dek| (dek.tenant.clone(), dek.records))
        .collect();
    records.sort();
    assert_eq!(records, [("acme".to_owned(), 2), ("globex".to_owned(), 1)]);
    for dek in &status.deks {
        assert!(uuid::Uuid::parse_str(&dek.id).is_ok(), "{}", dek.id);
        assert_eq!(dek.kek_version, 1);
        assert!(dek.encryptions_reserved >= dek.records);
        assert!(dek.created_at.is_some() && dek.retired_at.is_none());
    }

    // A tenant filter narrows the data keys only.
    let acme = keys
        .get_key_status(with_key(
            pb::GetKeyStatusRequest {
                tenant: "acme".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(acme.deks.len(), 1);
    assert_eq!(
        (acme.deks[0].tenant.as_str(), acme.deks[0].records),
        ("acme", 2)
    );
    assert_eq!(acme.kek_versions, status.kek_versions);
}

async fn rotating_the_kek_makes_version_2_primary_and_starts_a_rewrap_job(backend: Backend) {
    let s = secure(backend).await;
    let (admin_id, admin) = s.global_operator("acme", "ops").await;
    tokenize_in(&s, "acme", 1).await;
    let mut keys = key_admin(&s).await;

    let rotated = keys
        .rotate_kek(with_key(pb::RotateKekRequest {}, &admin))
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.kek_version, 2);
    let job = rotated.job.expect("a job");
    assert!(job.id.starts_with("kj_"), "{}", job.id);
    assert_eq!(job.kind(), pb::key_job::Kind::Rewrap);
    assert_ne!(job.state(), pb::key_job::State::Failed, "{}", job.error);
    assert_eq!(job.requested_by, admin_id);
    assert!(job.total >= 1, "at least acme's data key: {job:?}");
    assert!(job.created_at.is_some());

    // It may still be running, or done already; either way the status shows it.
    let status = keys
        .get_key_status(with_key(pb::GetKeyStatusRequest::default(), &admin))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.primary_kek_version, 2);
    let versions: Vec<(u32, bool)> = status
        .kek_versions
        .iter()
        .map(|kek| (kek.version, kek.primary))
        .collect();
    assert_eq!(versions, [(1, false), (2, true)]);
    let shown = status
        .jobs
        .iter()
        .find(|shown| shown.id == job.id)
        .expect("the job is listed");
    assert_eq!(shown.kind(), pb::key_job::Kind::Rewrap);
    assert!(
        matches!(
            shown.state(),
            pb::key_job::State::Running | pb::key_job::State::Done
        ),
        "{shown:?}"
    );
}

async fn rotating_deks_retires_the_old_key_with_its_records(backend: Backend) {
    let s = secure(backend).await;
    let (_, admin) = s.global_operator("acme", "ops").await;
    tokenize_in(&s, "acme", 2).await;
    tokenize_in(&s, "globex", 1).await;
    let mut keys = key_admin(&s).await;
    let acme_status = async |keys: &mut KeyAdminClient<Channel>| {
        keys.get_key_status(with_key(
            pb::GetKeyStatusRequest {
                tenant: "acme".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("status")
        .into_inner()
    };
    let old = acme_status(&mut keys).await.deks;
    assert_eq!(old.len(), 1);

    let rotated = keys
        .rotate_deks(with_key(
            pb::RotateDeksRequest {
                tenant: "acme".to_owned(),
                reencrypt: false,
            },
            &admin,
        ))
        .await
        .expect("rotate")
        .into_inner();
    assert!(rotated.job.is_none(), "no re-encryption was asked for");
    assert_eq!(rotated.deks.len(), 1, "only acme's: {:?}", rotated.deks);
    let new = &rotated.deks[0];
    assert_eq!(new.tenant, "acme");
    assert!(new.active && new.retired_at.is_none());
    assert_eq!(new.records, 0);
    assert_ne!(new.id, old[0].id);

    let deks = acme_status(&mut keys).await.deks;
    assert_eq!(deks.len(), 2, "{deks:?}");
    let active: Vec<&pb::DataKeyInfo> = deks.iter().filter(|dek| dek.active).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, new.id);
    let retired = deks
        .iter()
        .find(|dek| dek.id == old[0].id)
        .expect("the old key is kept");
    assert!(!retired.active);
    assert!(retired.retired_at.is_some());
    assert_eq!(retired.records, 2, "its records stay sealed under it");

    // Every tenant, with re-encryption: a new key each and a job.
    let all = keys
        .rotate_deks(with_key(
            pb::RotateDeksRequest {
                tenant: String::new(),
                reencrypt: true,
            },
            &admin,
        ))
        .await
        .expect("rotate all")
        .into_inner();
    let mut tenants: Vec<&str> = all.deks.iter().map(|dek| dek.tenant.as_str()).collect();
    tenants.sort_unstable();
    assert_eq!(tenants, ["acme", "globex"]);
    let job = all.job.expect("a re-encryption job");
    assert_eq!(job.kind(), pb::key_job::Kind::Reencrypt);
    assert!(job.tenant.is_empty());

    // An unknown tenant is NOT_FOUND.
    let missing = keys
        .rotate_deks(with_key(
            pb::RotateDeksRequest {
                tenant: "initech".to_owned(),
                reencrypt: false,
            },
            &admin,
        ))
        .await
        .expect_err("refused");
    assert_eq!(missing.code(), Code::NotFound);
}

async fn a_request_cannot_be_approved_by_its_requester(backend: Backend) {
    let s = secure(backend).await;
    let (alice_id, alice) = s.global_operator("acme", "alice").await;
    let mut keys = key_admin(&s).await;

    let request = keys
        .request_shred_tenant(with_key(
            pb::RequestShredTenantRequest {
                tenant: "globex".to_owned(),
            },
            &alice,
        ))
        .await
        .expect("request")
        .into_inner()
        .request
        .expect("a request");
    assert!(request.id.starts_with("kr_"), "{}", request.id);
    assert_eq!(request.kind(), pb::key_request::Kind::ShredTenant);
    assert_eq!(request.target, "globex");
    assert_eq!(request.state(), pb::key_request::State::Pending);
    assert_eq!(request.requested_by, alice_id);
    assert!(request.approved_by.is_empty() && request.decided_at.is_none());
    let (Some(asked), Some(expires)) = (request.requested_at, request.expires_at) else {
        panic!("times are set: {request:?}");
    };
    assert!(expires.seconds > asked.seconds);

    let status = keys
        .get_key_status(with_key(pb::GetKeyStatusRequest::default(), &alice))
        .await
        .expect("status")
        .into_inner();
    let pending: Vec<&str> = status
        .pending_requests
        .iter()
        .map(|pending| pending.id.as_str())
        .collect();
    assert_eq!(pending, [request.id.as_str()]);

    let own = keys
        .approve_key_request(with_key(
            pb::ApproveKeyRequestRequest {
                request_id: request.id.clone(),
            },
            &alice,
        ))
        .await
        .expect_err("refused");
    assert_eq!(own.code(), Code::PermissionDenied);
    assert!(own.message().contains("dual control"), "{}", own.message());

    let unknown = keys
        .approve_key_request(with_key(
            pb::ApproveKeyRequestRequest {
                request_id: "kr_0000000000000000".to_owned(),
            },
            &alice,
        ))
        .await
        .expect_err("refused");
    assert_eq!(unknown.code(), Code::NotFound);

    // What could never be approved is refused at once.
    let primary = keys
        .request_retire_kek(with_key(
            pb::RequestRetireKekRequest { kek_version: 1 },
            &alice,
        ))
        .await
        .expect_err("refused");
    assert_eq!(primary.code(), Code::FailedPrecondition);
    let absent = keys
        .request_retire_kek(with_key(
            pb::RequestRetireKekRequest { kek_version: 9 },
            &alice,
        ))
        .await
        .expect_err("refused");
    assert_eq!(absent.code(), Code::NotFound);
    let nobody = keys
        .request_shred_tenant(with_key(
            pb::RequestShredTenantRequest {
                tenant: "initech".to_owned(),
            },
            &alice,
        ))
        .await
        .expect_err("refused");
    assert_eq!(nobody.code(), Code::NotFound);
}

/// Runs the `cardvault` binary with `args` and no environment but `api_key`; returns (exit
/// code, stdout, stderr). Off the async workers, so the server in this process keeps answering.
async fn cardvault(args: Vec<String>, api_key: &str) -> (Option<i32>, String, String) {
    let api_key = api_key.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_cardvault"))
            .args(&args)
            .env_clear()
            .env("CARDVAULT_API_KEY", api_key)
            .output()
            .expect("run cardvault");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("cardvault ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_cli_shows_the_status_of_a_running_vault_and_its_refusals() {
    let mut app = spawn_app(Backend::Sqlite).await;
    app.tokenize(&unique_pan()).await;
    let admin = app.operator_key().await;
    let target = format!("http://{}", app.grpc_addr);
    let args = |extra: &[&str]| -> Vec<String> {
        ["keys"]
            .iter()
            .chain(extra)
            .map(|a| (*a).to_owned())
            .chain(["--target".to_owned(), target.clone()])
            .collect()
    };

    let (code, stdout, stderr) = cardvault(args(&["status"]), &admin).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("provider: local"), "{stdout}");
    assert!(stdout.contains("primary KEK: v1"), "{stdout}");
    let v1 = stdout
        .lines()
        .find(|line| line.starts_with("v1 "))
        .expect("a row for KEK v1");
    assert_eq!(v1.split_whitespace().nth(1), Some("yes"), "{v1}");
    assert!(
        stdout
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some("dev")),
        "a data key of tenant dev: {stdout}"
    );

    let (code, stdout, stderr) = cardvault(args(&["status", "--json"]), &admin).await;
    assert_eq!(code, Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(json["provider"], "local");
    assert_eq!(json["primary_kek_version"], 1);
    assert_eq!(json["deks"][0]["records"], 1);

    // A refusal exits 1 with the gRPC status.
    let (code, _, stderr) = cardvault(args(&["approve", "kr_0000000000000000"]), &admin).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("NotFound: key request not found"),
        "{stderr}"
    );
    let (code, _, stderr) =
        cardvault(args(&["request-shred-tenant", "Not A Tenant"]), &admin).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(stderr.contains("tenant:"), "{stderr}");
}
