//! `cardvault.v1.KeyAdmin`: KEK and DEK rotation, key status, and the dual-controlled
//! retire / shred requests and their approval.

use std::sync::Arc;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{auth::RequestCredentials, convert::to_timestamp, error::ApiError, rpc};
use crate::{
    audit::Action,
    card::FieldViolation,
    crypto::KekVersion,
    pb::v1::{self as pb, key_admin_server::KeyAdmin},
    vault::{
        DataKeyView, KekStatus, KeyJobKind, KeyJobState, KeyJobView, KeyOperation, KeyRequestKind,
        KeyRequestState, KeyRequestView, KeyStatus, Operator, ShreddedView, TenantId, Vault,
    },
};

/// Longest request id accepted; real ones are `kr_` and 16 characters.
const MAX_REQUEST_ID_LEN: usize = 64;

/// The operators' service for key management.
#[derive(Debug, Clone)]
pub struct KeyAdminService {
    vault: Arc<Vault>,
}

impl KeyAdminService {
    /// A service over a vault.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

fn invalid(field: &'static str, description: impl Into<String>) -> ApiError {
    ApiError::Invalid(vec![FieldViolation {
        field,
        description: description.into(),
    }])
}

/// A tenant filter: `None` when empty.
fn tenant_filter(text: &str) -> Result<Option<TenantId>, ApiError> {
    if text.is_empty() {
        Ok(None)
    } else {
        tenant(text).map(Some)
    }
}

fn tenant(text: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(text).map_err(|e| ApiError::Invalid(vec![FieldViolation::new("tenant", &e)]))
}

fn kek_version_info(kek: KekStatus) -> pb::KekVersionInfo {
    pb::KekVersionInfo {
        version: kek.version.0,
        primary: kek.primary,
        data_keys: kek.usage.deks,
        tenant_secrets: kek.usage.tenant_secrets,
        audit_keys: kek.usage.audit_keys,
        records: kek.usage.records,
    }
}

fn data_key_info(dek: DataKeyView) -> pb::DataKeyInfo {
    pb::DataKeyInfo {
        id: dek.id.to_string(),
        tenant: dek.tenant_id,
        kek_version: dek.kek_version,
        active: dek.active,
        records: dek.records,
        encryptions_reserved: dek.reserved,
        created_at: Some(to_timestamp(dek.created_at)),
        retired_at: dek.retired_at.map(to_timestamp),
    }
}

fn key_job(row: KeyJobView, now: OffsetDateTime) -> pb::KeyJob {
    use pb::key_job::{Kind, State};
    let kind = match row.kind {
        KeyJobKind::Rewrap => Kind::Rewrap,
        KeyJobKind::Reencrypt => Kind::Reencrypt,
    };
    let state = match row.state {
        KeyJobState::Running => State::Running,
        KeyJobState::Done => State::Done,
        KeyJobState::Failed => State::Failed,
    };
    // A lapsed lease names a replica that is no longer working on the job.
    let worker = row.worker_at(now).unwrap_or_default().to_owned();
    pb::KeyJob {
        id: row.id,
        kind: kind.into(),
        state: state.into(),
        tenant: row.tenant_id.unwrap_or_default(),
        done: row.done,
        total: row.total,
        requested_by: row.requested_by,
        worker,
        created_at: Some(to_timestamp(row.created_at)),
        updated_at: Some(to_timestamp(row.updated_at)),
        finished_at: row.finished_at.map(to_timestamp),
        error: row.error.unwrap_or_default(),
    }
}

pub(super) fn key_request(row: KeyRequestView) -> pb::KeyRequest {
    use pb::key_request::{Kind, State};
    let kind = match row.kind {
        KeyRequestKind::RetireKek => Kind::RetireKek,
        KeyRequestKind::ShredTenant => Kind::ShredTenant,
        KeyRequestKind::CreatePrincipal => Kind::CreatePrincipal,
        KeyRequestKind::RevokePrincipal => Kind::RevokePrincipal,
        KeyRequestKind::CreateApiKey => Kind::CreateApiKey,
    };
    // What the approver is asked to approve, in full.
    let (principal, api_key_valid_for) = match row.operation {
        Some(KeyOperation::CreatePrincipal(new)) => (
            Some(pb::RequestedPrincipal {
                name: new.name.to_string(),
                permissions: new.permissions.owned_names(),
                mtls_identity: new.mtls_identity.unwrap_or_default(),
                global_operator: new.global_operator,
            }),
            None,
        ),
        Some(KeyOperation::CreateApiKey { valid_for, .. }) => (
            None,
            valid_for.and_then(|d| prost_types::Duration::try_from(d.unsigned_abs()).ok()),
        ),
        _ => (None, None),
    };
    let state = match row.state {
        KeyRequestState::Pending => State::Pending,
        KeyRequestState::Executed => State::Executed,
        KeyRequestState::Expired => State::Expired,
    };
    pb::KeyRequest {
        id: row.id,
        kind: kind.into(),
        target: row.target,
        requested_by: row.requested_by,
        requested_at: Some(to_timestamp(row.requested_at)),
        expires_at: Some(to_timestamp(row.expires_at)),
        state: state.into(),
        approved_by: row.decided_by.unwrap_or_default(),
        decided_at: row.decided_at.map(to_timestamp),
        tenant: row.tenant_id.unwrap_or_default(),
        principal,
        api_key_valid_for,
    }
}

fn shred_result(shredded: ShreddedView) -> pb::ShredResult {
    pb::ShredResult {
        cards: shredded.cards,
        data_keys: shredded.deks,
        principals: shredded.principals,
    }
}

fn key_status(status: KeyStatus, now: OffsetDateTime) -> pb::GetKeyStatusResponse {
    pb::GetKeyStatusResponse {
        provider: status.provider.to_owned(),
        primary_kek_version: status.primary.0,
        kek_versions: status.keks.into_iter().map(kek_version_info).collect(),
        deks: status.deks.into_iter().map(data_key_info).collect(),
        jobs: status
            .jobs
            .into_iter()
            .map(|job| key_job(job, now))
            .collect(),
        pending_requests: status.requests.into_iter().map(key_request).collect(),
        dek_max_encryptions: status.policy.max_encryptions,
        // Configured in days, so always in range; unset rather than wrong if it ever is not.
        dek_max_age: prost_types::Duration::try_from(status.policy.max_age).ok(),
    }
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminService {
    async fn rotate_kek(
        &self,
        request: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        rpc::run(
            &self.vault,
            Action::RotateKek,
            credentials,
            |auth| async move {
                let (version, job) = self
                    .vault
                    .rotate_kek(&Operator::from_authorized(&auth))
                    .await?;
                Ok(pb::RotateKekResponse {
                    kek_version: version.0,
                    job: Some(key_job(job, OffsetDateTime::now_utc())),
                })
            },
        )
        .await
    }

    async fn rotate_deks(
        &self,
        request: Request<pb::RotateDeksRequest>,
    ) -> Result<Response<pb::RotateDeksResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::RotateDeks,
            credentials,
            |auth| async move {
                let filter = tenant_filter(&message.tenant)?;
                let rotated = self
                    .vault
                    .rotate_deks(
                        &Operator::from_authorized(&auth),
                        filter.as_ref(),
                        message.reencrypt,
                    )
                    .await?;
                let now = OffsetDateTime::now_utc();
                Ok(pb::RotateDeksResponse {
                    // New keys: nothing is sealed under them yet (the vault says 0 records).
                    deks: rotated.deks.into_iter().map(data_key_info).collect(),
                    job: rotated.job.map(|job| key_job(job, now)),
                })
            },
        )
        .await
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::KeyStatus,
            credentials,
            |auth| async move {
                let filter = tenant_filter(&message.tenant)?;
                let status = self
                    .vault
                    .key_status(&Operator::from_authorized(&auth), filter.as_ref())
                    .await?;
                Ok(key_status(status, OffsetDateTime::now_utc()))
            },
        )
        .await
    }

    async fn request_retire_kek(
        &self,
        request: Request<pb::RequestRetireKekRequest>,
    ) -> Result<Response<pb::KeyRequestResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::RequestKeyOperation,
            credentials,
            |auth| async move {
                if message.kek_version == 0 {
                    return Err(invalid("kek_version", "a KEK version (from 1) is required"));
                }
                let row = self
                    .vault
                    .request_key_operation(
                        &Operator::from_authorized(&auth),
                        KeyOperation::RetireKek(KekVersion(message.kek_version)),
                    )
                    .await?;
                Ok(pb::KeyRequestResponse {
                    request: Some(key_request(row)),
                })
            },
        )
        .await
    }

    async fn request_shred_tenant(
        &self,
        request: Request<pb::RequestShredTenantRequest>,
    ) -> Result<Response<pb::KeyRequestResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::RequestKeyOperation,
            credentials,
            |auth| async move {
                let tenant = tenant(&message.tenant)?;
                let row = self
                    .vault
                    .request_key_operation(
                        &Operator::from_authorized(&auth),
                        KeyOperation::ShredTenant(tenant),
                    )
                    .await?;
                Ok(pb::KeyRequestResponse {
                    request: Some(key_request(row)),
                })
            },
        )
        .await
    }

    async fn approve_key_request(
        &self,
        request: Request<pb::ApproveKeyRequestRequest>,
    ) -> Result<Response<pb::ApproveKeyRequestResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::ApproveKeyOperation,
            credentials,
            |auth| async move {
                if message.request_id.is_empty() || message.request_id.len() > MAX_REQUEST_ID_LEN {
                    return Err(invalid("request_id", "a key request id (kr_…) is required"));
                }
                let approved = self
                    .vault
                    .approve_key_request(&Operator::from_authorized(&auth), &message.request_id)
                    .await?;
                let (api_key, api_key_id) = match approved.api_key {
                    // One of the two places an API key leaves the vault: shown to the approver
                    // of its creation.
                    Some(created) => (created.key.expose().to_owned(), created.row.id),
                    None => (String::new(), String::new()),
                };
                Ok(pb::ApproveKeyRequestResponse {
                    request: Some(key_request(approved.request)),
                    shredded: approved.shredded.map(shred_result),
                    principal_id: approved.principal.map(|p| p.id).unwrap_or_default(),
                    api_key,
                    api_key_id,
                })
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use uuid::Uuid;

    use super::*;

    fn job(lease_until: Option<OffsetDateTime>) -> KeyJobView {
        KeyJobView {
            id: "kj_0123456789abcdef".to_owned(),
            kind: KeyJobKind::Reencrypt,
            state: KeyJobState::Running,
            tenant_id: Some("acme".to_owned()),
            done: 3,
            total: 10,
            requested_by: "p_admin".to_owned(),
            lease_owner: Some("pod-1".to_owned()),
            lease_until,
            created_at: datetime!(2026-01-01 0:00 UTC),
            updated_at: datetime!(2026-01-01 0:01 UTC),
            finished_at: None,
            error: None,
        }
    }

    #[test]
    fn a_job_names_its_worker_only_while_the_lease_lasts() {
        let now = datetime!(2026-01-01 0:02 UTC);
        let live = key_job(job(Some(datetime!(2026-01-01 0:03 UTC))), now);
        assert_eq!(live.worker, "pod-1");
        assert_eq!(live.kind(), pb::key_job::Kind::Reencrypt);
        assert_eq!(live.state(), pb::key_job::State::Running);
        assert_eq!(
            (live.tenant.as_str(), live.done, live.total),
            ("acme", 3, 10)
        );
        let lapsed = key_job(job(Some(datetime!(2026-01-01 0:01 UTC))), now);
        assert_eq!(lapsed.worker, "");
        assert_eq!(key_job(job(None), now).worker, "");
    }

    #[test]
    fn request_kinds_and_states_map_to_their_enums() {
        let row = KeyRequestView {
            id: "kr_0123456789abcdef".to_owned(),
            kind: KeyRequestKind::ShredTenant,
            target: "acme".to_owned(),
            operation: Some(KeyOperation::ShredTenant(
                TenantId::parse("acme").expect("tenant"),
            )),
            requested_by: "p_a".to_owned(),
            requested_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: datetime!(2026-01-01 1:00 UTC),
            state: KeyRequestState::Expired,
            decided_by: Some("p_b".to_owned()),
            decided_at: Some(datetime!(2026-01-01 1:01 UTC)),
            tenant_id: Some("acme".to_owned()),
        };
        let request = key_request(row.clone());
        assert_eq!(request.kind(), pb::key_request::Kind::ShredTenant);
        assert_eq!(request.state(), pb::key_request::State::Expired);
        assert_eq!(request.approved_by, "p_b");
        let retire = key_request(KeyRequestView {
            kind: KeyRequestKind::RetireKek,
            operation: Some(KeyOperation::RetireKek(KekVersion(1))),
            state: KeyRequestState::Pending,
            decided_by: None,
            decided_at: None,
            ..row
        });
        assert_eq!(retire.kind(), pb::key_request::Kind::RetireKek);
        assert_eq!(retire.state(), pb::key_request::State::Pending);
        assert_eq!(retire.approved_by, "");
        assert!(retire.decided_at.is_none());
    }

    #[test]
    fn a_data_key_shows_its_id_as_a_uuid_and_never_its_wrapped_bytes() {
        let id = Uuid::new_v4();
        let info = data_key_info(DataKeyView {
            id,
            tenant_id: "acme".to_owned(),
            kek_version: 2,
            active: false,
            records: 12,
            reserved: 1024,
            created_at: datetime!(2026-01-01 0:00 UTC),
            retired_at: Some(datetime!(2026-02-01 0:00 UTC)),
        });
        assert_eq!(info.id, id.to_string());
        assert_eq!((info.kek_version, info.records), (2, 12));
        assert_eq!(info.encryptions_reserved, 1024);
        assert!(!info.active && info.retired_at.is_some());
    }
}
