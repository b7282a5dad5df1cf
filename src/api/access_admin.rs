//! `cardvault.v1.AccessAdmin`: tenants, principals, API keys and honeytokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    auth::RequestCredentials,
    convert::{self, to_timestamp},
    error::ApiError,
    key_admin::key_request,
    rpc,
};
use crate::{
    audit::Action,
    card::FieldViolation,
    pb::v1::{self as pb, access_admin_server::AccessAdmin},
    vault::{
        ApiKeyView, DualControlled, Metadata, NewPrincipal, Operator, Permission, Permissions,
        PrincipalName, PrincipalView, TenantId, Vault, admin,
    },
};

/// The operators' service for access control.
#[derive(Debug, Clone)]
pub struct AccessAdminService {
    vault: Arc<Vault>,
}

impl AccessAdminService {
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

fn tenant(field: &'static str, text: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(text).map_err(|e| invalid(field, e.to_string()))
}

fn api_key_info(row: &ApiKeyView) -> pb::ApiKeyInfo {
    pb::ApiKeyInfo {
        id: row.id.clone(),
        principal_id: row.principal_id.clone(),
        created_at: Some(to_timestamp(row.created_at)),
        expires_at: row.expires_at.map(to_timestamp),
        revoked_at: row.revoked_at.map(to_timestamp),
    }
}

fn principal(row: PrincipalView, keys: &[ApiKeyView]) -> pb::Principal {
    pb::Principal {
        created_by: row.created_by.unwrap_or_default(),
        global_operator: row.global_operator,
        id: row.id,
        tenant: row.tenant_id,
        name: row.name,
        permissions: row.permissions,
        mtls_identity: row.mtls_identity.unwrap_or_default(),
        created_at: Some(to_timestamp(row.created_at)),
        revoked_at: row.revoked_at.map(to_timestamp),
        api_keys: keys.iter().map(api_key_info).collect(),
    }
}

#[tonic::async_trait]
impl AccessAdmin for AccessAdminService {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::CreateTenant,
            credentials,
            |auth| async move {
                let id = tenant("tenant", &message.tenant)?;
                self.vault
                    .create_tenant(&Operator::from_authorized(&auth), &id)
                    .await?;
                Ok(pb::CreateTenantResponse {})
            },
        )
        .await
    }

    async fn create_principal(
        &self,
        request: Request<pb::CreatePrincipalRequest>,
    ) -> Result<Response<pb::CreatePrincipalResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::CreatePrincipal,
            credentials,
            |auth| async move {
                let mut violations = Vec::new();
                let tenant = TenantId::parse(&message.tenant)
                    .map_err(|e| violations.push(FieldViolation::new("tenant", &e)))
                    .ok();
                let name = PrincipalName::parse(&message.name)
                    .map_err(|e| violations.push(FieldViolation::new("name", &e)))
                    .ok();
                let permissions =
                    match Permissions::parse(message.permissions.iter().map(String::as_str)) {
                        Ok(p) if p.is_empty() => {
                            violations.push(FieldViolation::new(
                                "permissions",
                                &"at least one permission is required",
                            ));
                            None
                        }
                        Ok(p) => Some(p),
                        Err(e) => {
                            violations.push(FieldViolation::new("permissions", &e));
                            None
                        }
                    };
                let identity = message.mtls_identity.trim();
                if identity.len() > 1024 {
                    violations.push(FieldViolation::new(
                        "mtls_identity",
                        &"at most 1024 characters",
                    ));
                }
                if message.global_operator
                    && permissions.is_some_and(|p| !p.contains(Permission::KeysAdmin))
                {
                    violations.push(FieldViolation::new(
                        "global_operator",
                        &"a global operator needs the keys:admin permission",
                    ));
                }
                let (Some(tenant), Some(name), Some(permissions), true) =
                    (tenant, name, permissions, violations.is_empty())
                else {
                    return Err(ApiError::Invalid(violations));
                };
                let row = self
                    .vault
                    .create_principal(
                        &Operator::from_authorized(&auth),
                        NewPrincipal {
                            tenant,
                            name,
                            permissions,
                            mtls_identity: (!identity.is_empty()).then(|| identity.to_owned()),
                            global_operator: message.global_operator,
                        },
                    )
                    .await?;
                Ok(match row {
                    DualControlled::Done(row) => pb::CreatePrincipalResponse {
                        principal: Some(principal(row, &[])),
                        pending_request: None,
                    },
                    DualControlled::Pending(request) => pb::CreatePrincipalResponse {
                        principal: None,
                        pending_request: Some(key_request(*request)),
                    },
                })
            },
        )
        .await
    }

    async fn list_principals(
        &self,
        request: Request<pb::ListPrincipalsRequest>,
    ) -> Result<Response<pb::ListPrincipalsResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::ListPrincipals,
            credentials,
            |auth| async move {
                let filter = if message.tenant.is_empty() {
                    None
                } else {
                    Some(tenant("tenant", &message.tenant)?)
                };
                let rows = self
                    .vault
                    .list_principals(&Operator::from_authorized(&auth), filter.as_ref())
                    .await?;
                let mut principals = Vec::with_capacity(rows.len());
                for row in rows {
                    let keys = self.vault.api_keys_of(&row.id).await?;
                    principals.push(principal(row, &keys));
                }
                Ok(pb::ListPrincipalsResponse { principals })
            },
        )
        .await
    }

    async fn revoke_principal(
        &self,
        request: Request<pb::RevokePrincipalRequest>,
    ) -> Result<Response<pb::RevokePrincipalResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::RevokePrincipal,
            credentials,
            |auth| async move {
                if message.principal_id.is_empty() || message.principal_id.len() > 64 {
                    return Err(invalid("principal_id", "a principal id (p_…) is required"));
                }
                let revoked = self
                    .vault
                    .revoke_principal(&Operator::from_authorized(&auth), &message.principal_id)
                    .await?;
                Ok(pb::RevokePrincipalResponse {
                    pending_request: match revoked {
                        DualControlled::Done(()) => None,
                        DualControlled::Pending(request) => Some(key_request(*request)),
                    },
                })
            },
        )
        .await
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::CreateApiKey,
            credentials,
            |auth| async move {
                if message.principal_id.is_empty() || message.principal_id.len() > 64 {
                    return Err(invalid("principal_id", "a principal id (p_…) is required"));
                }
                let valid_for = match message.valid_for.as_ref().map(convert::duration) {
                    None => None,
                    Some(Some(d)) if d.is_positive() && d <= admin::MAX_API_KEY_VALIDITY => Some(d),
                    Some(_) => {
                        return Err(invalid(
                            "valid_for",
                            "must be a valid duration, positive and at most 100 years",
                        ));
                    }
                };
                let created = self
                    .vault
                    .create_api_key(
                        &Operator::from_authorized(&auth),
                        &message.principal_id,
                        valid_for,
                    )
                    .await?;
                Ok(match created {
                    DualControlled::Done(created) => pb::CreateApiKeyResponse {
                        // One of the two places a key leaves the vault: this RPC's purpose.
                        api_key: created.key.expose().to_owned(),
                        info: Some(api_key_info(&created.row)),
                        pending_request: None,
                    },
                    DualControlled::Pending(request) => pb::CreateApiKeyResponse {
                        api_key: String::new(),
                        info: None,
                        pending_request: Some(key_request(*request)),
                    },
                })
            },
        )
        .await
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::RevokeApiKey,
            credentials,
            |auth| async move {
                if message.key_id.is_empty() || message.key_id.len() > 64 {
                    return Err(invalid("key_id", "an API key id is required"));
                }
                self.vault
                    .revoke_api_key(&Operator::from_authorized(&auth), &message.key_id)
                    .await?;
                Ok(pb::RevokeApiKeyResponse {})
            },
        )
        .await
    }

    async fn mint_honeytoken(
        &self,
        request: Request<pb::MintHoneytokenRequest>,
    ) -> Result<Response<pb::MintHoneytokenResponse>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run(
            &self.vault,
            Action::MintHoneytoken,
            credentials,
            |auth| async move {
                let id = tenant("tenant", &message.tenant)?;
                let format = convert::token_format(message.token_format)
                    .map_err(|v| ApiError::Invalid(vec![v]))?;
                let metadata = Metadata::parse(message.metadata).map_err(ApiError::Invalid)?;
                let view = self
                    .vault
                    .mint_honeytoken(&Operator::from_authorized(&auth), &id, format, metadata)
                    .await?;
                Ok(pb::MintHoneytokenResponse {
                    token: view.token.as_str().to_owned(),
                    card: Some(convert::card(view)),
                })
            },
        )
        .await
    }
}
