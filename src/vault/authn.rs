//! Authentication (credentials → [`Caller`]) and authorization (caller + action →
//! [`Authorized`]), with the abuse limits and audit records both need.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use time::OffsetDateTime;

use super::{
    Authorized, Caller, Credentials, Permission, Permissions, Principal, TenantId, Vault,
    VaultError,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    crypto::ApiKey,
    store::{ApiKeyRow, PrincipalRow},
};

/// Verified API-key rows, so a busy caller does not cost two reads per request.
#[derive(Debug, Default)]
pub(super) struct CredentialCache {
    entries: Mutex<HashMap<String, (ApiKeyRow, PrincipalRow, Instant)>>,
}

impl CredentialCache {
    fn get(&self, key_id: &str, ttl: Duration) -> Option<(ApiKeyRow, PrincipalRow)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key_id)
            .filter(|(_, _, at)| at.elapsed() < ttl)
            .map(|(k, p, _)| (k.clone(), p.clone()))
    }

    fn put(&self, key: ApiKeyRow, principal: PrincipalRow) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a flood of distinct keys only ever replaces the cache.
        if entries.len() >= 10_000 {
            entries.clear();
        }
        entries.insert(key.id.clone(), (key, principal, Instant::now()));
    }

    /// Forgets a key, or every key of a principal.
    pub(super) fn forget(&self, key_id: Option<&str>, principal_id: Option<&str>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|id, (_, p, _)| {
            Some(id.as_str()) != key_id && Some(p.id.as_str()) != principal_id
        });
    }
}

/// Why credentials were refused; goes to the audit log only, never to the caller.
enum Refusal {
    /// Refused, with the reason and, for API keys, the public key id.
    Invalid(&'static str, Option<String>),
    /// The key id has used up its failed attempts.
    Locked(String),
}

/// The row of a stored principal as a [`Principal`], unless it is unusable.
fn principal_of(row: &PrincipalRow) -> Result<Principal, &'static str> {
    if row.revoked_at.is_some() {
        return Err("principal revoked");
    }
    let tenant = TenantId::parse(&row.tenant_id).map_err(|_| "principal has a bad tenant")?;
    let permissions = Permissions::parse(row.permissions.iter().map(String::as_str))
        .map_err(|_| "principal has an unknown permission")?;
    Ok(Principal {
        id: row.id.clone(),
        tenant,
        name: row.name.clone(),
        permissions,
    })
}

impl Vault {
    /// Establishes who a request acts for: an API key (`bearer`), else a verified client
    /// certificate's identity, else — only where configured, on loopback — the
    /// unauthenticated tenant. Failures are recorded and counted against the peer address
    /// and the API key id; past the limit, even valid credentials get `RateLimited` for a
    /// while. The caller learns nothing about why it was refused.
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        request_id: Option<&str>,
    ) -> Result<Caller, VaultError> {
        let now = Instant::now();
        let peer = credentials.peer.map(|p| p.to_string());
        let peer_bucket = credentials.peer.map(|p| format!("peer:{}", p.ip()));
        let refuse = |outcome: Outcome, detail: String| {
            let mut event = AuditEvent::now(Action::Authenticate, outcome);
            event.peer = peer.clone();
            event.request_id = request_id.map(str::to_owned);
            event.detail = Some(detail);
            event
        };
        if let Some(bucket) = &peer_bucket
            && !self.failed_auth.has_capacity(bucket, now)
        {
            self.record(&refuse(
                Outcome::RateLimited,
                "too many failed authentications from this address".to_owned(),
            ))
            .await;
            metrics::counter!("cardvault_rate_limited_total", "limit" => "failed_auth")
                .increment(1);
            return Err(VaultError::RateLimited);
        }
        match self.resolve(credentials, now).await? {
            Ok(principal) => Ok(Caller {
                principal,
                peer,
                request_id: request_id.map(str::to_owned),
            }),
            Err(Refusal::Locked(key_id)) => {
                self.record(&refuse(
                    Outcome::RateLimited,
                    format!("too many failed authentications with API key {key_id}"),
                ))
                .await;
                metrics::counter!("cardvault_rate_limited_total", "limit" => "failed_auth")
                    .increment(1);
                Err(VaultError::RateLimited)
            }
            Err(Refusal::Invalid(reason, key_id)) => {
                if let Some(bucket) = &peer_bucket {
                    self.failed_auth.take(bucket, now);
                }
                let mut detail = reason.to_owned();
                if let Some(id) = key_id {
                    self.failed_auth.take(&format!("key:{id}"), now);
                    detail = format!("{reason} (API key {id})");
                }
                self.record(&refuse(Outcome::Unauthenticated, detail)).await;
                metrics::counter!("cardvault_auth_failures_total").increment(1);
                Err(VaultError::Unauthenticated)
            }
        }
    }

    async fn resolve(
        &self,
        credentials: Credentials<'_>,
        now: Instant,
    ) -> Result<Result<Principal, Refusal>, VaultError> {
        if let Some(bearer) = credentials.bearer {
            let Ok(key) = ApiKey::parse(bearer) else {
                return Ok(Err(Refusal::Invalid("malformed API key", None)));
            };
            let id = key.id().to_owned();
            if !self.failed_auth.has_capacity(&format!("key:{id}"), now) {
                return Ok(Err(Refusal::Locked(id)));
            }
            let ttl = self.options.credential_cache_ttl;
            let (row, principal) = match self.credentials.get(&id, ttl) {
                Some(found) => found,
                None => {
                    let Some(row) = self.store.api_key(&id).await? else {
                        return Ok(Err(Refusal::Invalid("unknown API key", Some(id))));
                    };
                    let Some(principal) = self.store.principal(&row.principal_id).await? else {
                        return Ok(Err(Refusal::Invalid(
                            "API key of a missing principal",
                            Some(id),
                        )));
                    };
                    self.credentials.put(row.clone(), principal.clone());
                    (row, principal)
                }
            };
            if !key.matches(&row.secret_hash) {
                return Ok(Err(Refusal::Invalid("wrong API key secret", Some(id))));
            }
            if row.revoked_at.is_some() {
                return Ok(Err(Refusal::Invalid("API key revoked", Some(id))));
            }
            if row
                .expires_at
                .is_some_and(|at| at <= OffsetDateTime::now_utc())
            {
                return Ok(Err(Refusal::Invalid("API key expired", Some(id))));
            }
            return Ok(principal_of(&principal).map_err(|why| Refusal::Invalid(why, Some(id))));
        }
        if let Some(identity) = credentials.mtls_identity {
            if let Some(declared) = self
                .options
                .config_principals
                .iter()
                .find(|p| p.mtls_identity == identity)
            {
                return Ok(Ok(declared.principal.clone()));
            }
            return Ok(
                match self.store.principal_by_mtls_identity(identity).await? {
                    Some(row) => principal_of(&row).map_err(|why| Refusal::Invalid(why, None)),
                    None => Err(Refusal::Invalid(
                        "client certificate identity is not a principal",
                        None,
                    )),
                },
            );
        }
        if let Some(tenant) = &self.options.unauthenticated_tenant {
            return Ok(Ok(Principal {
                id: "unauthenticated".to_owned(),
                tenant: tenant.clone(),
                name: "unauthenticated".to_owned(),
                permissions: Permissions::all(),
            }));
        }
        Ok(Err(Refusal::Invalid("no credentials", None)))
    }

    /// Checks that `caller` may perform `action` now: it holds the permission, and for
    /// `Reveal` it is within its rate. Refusals are recorded.
    pub async fn authorize(
        &self,
        caller: Caller,
        action: Action,
    ) -> Result<Authorized, VaultError> {
        let auth = Authorized { caller, action };
        if !auth
            .caller
            .principal
            .permissions
            .contains(Permission::for_action(action))
        {
            self.record(&super::event(&auth, Outcome::PermissionDenied, None))
                .await;
            metrics::counter!("cardvault_permission_denied_total", "action" => action.as_str())
                .increment(1);
            return Err(VaultError::PermissionDenied);
        }
        if action == Action::Reveal && !self.reveals.take(&auth.caller.principal.id, Instant::now())
        {
            self.record(&super::event(&auth, Outcome::RateLimited, None))
                .await;
            metrics::counter!("cardvault_rate_limited_total", "limit" => "reveal").increment(1);
            return Err(VaultError::RateLimited);
        }
        Ok(auth)
    }
}
