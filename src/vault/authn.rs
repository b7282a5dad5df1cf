//! Authentication (credentials → [`Caller`]) and authorization (caller + action →
//! [`Authorized`]), with the abuse limits and audit records both need.
//!
//! Limits throttle failures, never successes: a request with valid credentials is always let
//! in, however many failures its address or its key id has piled up. Key ids are public and
//! many callers can share one address (an ingress, a sidecar), so a limit that refused valid
//! credentials would let anyone lock anyone out. Checking the secret first costs one
//! constant-time hash compare; with 190-bit secrets that gives a guesser nothing.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use time::OffsetDateTime;

use super::{
    Authorized, Caller, Credentials, Permission, Permissions, Principal, TenantId, Vault,
    VaultError, peer::Origin,
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

    /// Forgets every key of a tenant's principals (the tenant was shredded).
    pub(super) fn forget_tenant(&self, tenant: &TenantId) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (_, p, _)| p.tenant_id != tenant.as_str());
    }
}

/// Why credentials were refused; goes to the audit log only, never to the caller.
struct Refusal {
    reason: &'static str,
    /// The public id of the API key presented, if one parsed.
    key_id: Option<String>,
    /// Whether that key exists: failures against a real key are counted and recorded per
    /// key, those with made-up ids only per address (or a guesser cycling ids would open a
    /// window each).
    key_exists: bool,
}

impl Refusal {
    fn new(reason: &'static str) -> Refusal {
        Refusal {
            reason,
            key_id: None,
            key_exists: false,
        }
    }

    fn of_key(reason: &'static str, id: &str, exists: bool) -> Refusal {
        Refusal {
            reason,
            key_id: Some(id.to_owned()),
            key_exists: exists,
        }
    }
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
        global_operator: row.global_operator,
    })
}

/// What the unauthenticated `--dev` caller may do: everything but `keys:admin`. Key
/// administration (rotations, dual-controlled retirement and shredding, principals and API
/// keys) needs a real principal even in development, so nothing reachable without
/// credentials can mint credentials, approve its own dual-control request, or shred.
fn unauthenticated_permissions() -> Permissions {
    Permission::ALL
        .into_iter()
        .filter(|p| *p != Permission::KeysAdmin)
        .collect()
}

impl Vault {
    /// Establishes who a request acts for: an API key (`bearer`), else a verified client
    /// certificate's identity, else — in `--dev`, for a loopback peer — the unauthenticated
    /// tenant. Valid credentials always get through. Failures are counted against the
    /// client's address and the API key id; past the limit, failures are answered
    /// `RateLimited` instead of `Unauthenticated`. Refusals are recorded (aggregated per
    /// source, see [`super::refusals`]). The caller learns nothing about why it was refused.
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        request_id: Option<&str>,
    ) -> Result<Caller, VaultError> {
        let now = Instant::now();
        let origin = Origin::of(
            credentials.peer,
            credentials.forwarded_for,
            &self.options.trusted_proxies,
        );
        let refusal = match self.resolve(credentials).await? {
            Ok(principal) => {
                return Ok(Caller {
                    principal,
                    peer: origin.shown,
                    request_id: request_id.map(str::to_owned),
                });
            }
            Err(refusal) => refusal,
        };
        let peer_bucket = origin.bucket();
        let buckets = [
            peer_bucket.as_ref().map(|ip| format!("peer:{ip}")),
            refusal.key_id.as_ref().map(|id| format!("key:{id}")),
        ];
        let throttled = buckets
            .iter()
            .flatten()
            .any(|bucket| !self.failed_auth.has_capacity(bucket, now));
        for bucket in buckets.iter().flatten() {
            self.failed_auth.take(bucket, now);
        }

        let mut source = peer_bucket.unwrap_or_else(|| "an unknown address".to_owned());
        let mut key = format!("auth:{source}");
        let mut detail = refusal.reason.to_owned();
        if let Some(id) = &refusal.key_id {
            detail = format!("{detail} (API key {id})");
            if refusal.key_exists {
                source = format!("{source} (API key {id})");
                key = format!("{key}:{id}");
            }
        }
        let (outcome, err) = if throttled {
            metrics::counter!("cardvault_rate_limited_total", "limit" => "failed_auth")
                .increment(1);
            detail = format!("{detail}; too many failed authentications");
            (Outcome::RateLimited, VaultError::RateLimited)
        } else {
            metrics::counter!("cardvault_auth_failures_total").increment(1);
            (Outcome::Unauthenticated, VaultError::Unauthenticated)
        };
        let mut event = AuditEvent::now(Action::Authenticate, outcome);
        event.peer = origin.shown;
        event.request_id = request_id.map(str::to_owned);
        event.detail = Some(detail);
        self.record_refusal(key, source, event).await;
        Err(err)
    }

    async fn resolve(
        &self,
        credentials: Credentials<'_>,
    ) -> Result<Result<Principal, Refusal>, VaultError> {
        if let Some(bearer) = credentials.bearer {
            let Ok(key) = ApiKey::parse(bearer) else {
                return Ok(Err(Refusal::new("malformed API key")));
            };
            let id = key.id();
            let ttl = self.options.credential_cache_ttl;
            let (row, principal) = match self.credentials.get(id, ttl) {
                Some(found) => found,
                None => {
                    let Some(row) = self.store.api_key(id).await? else {
                        return Ok(Err(Refusal::of_key("unknown API key", id, false)));
                    };
                    let Some(principal) = self.store.principal(&row.principal_id).await? else {
                        return Ok(Err(Refusal::of_key(
                            "API key of a missing principal",
                            id,
                            true,
                        )));
                    };
                    self.credentials.put(row.clone(), principal.clone());
                    (row, principal)
                }
            };
            if !key.matches(&row.secret_hash) {
                return Ok(Err(Refusal::of_key("wrong API key secret", id, true)));
            }
            if row.revoked_at.is_some() {
                return Ok(Err(Refusal::of_key("API key revoked", id, true)));
            }
            if row
                .expires_at
                .is_some_and(|at| at <= OffsetDateTime::now_utc())
            {
                return Ok(Err(Refusal::of_key("API key expired", id, true)));
            }
            return Ok(principal_of(&principal).map_err(|why| Refusal::of_key(why, id, true)));
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
                    Some(row) => principal_of(&row).map_err(Refusal::new),
                    None => Err(Refusal::new(
                        "client certificate identity is not a principal",
                    )),
                },
            );
        }
        if let Some(tenant) = &self.options.unauthenticated_tenant {
            // The TCP peer itself, never an address a proxy header claims: only a process on
            // this host gets in without credentials.
            if credentials.peer.is_some_and(|peer| is_loopback(peer.ip())) {
                return Ok(Ok(Principal {
                    id: "unauthenticated".to_owned(),
                    tenant: tenant.clone(),
                    name: "unauthenticated".to_owned(),
                    permissions: unauthenticated_permissions(),
                    // Without keys:admin it is no operator of any scope.
                    global_operator: false,
                }));
            }
            return Ok(Err(Refusal::new(
                "no credentials, and not from a loopback address",
            )));
        }
        Ok(Err(Refusal::new("no credentials")))
    }

    /// Checks that `caller` may perform `action` now: it holds the permission, and for
    /// `Reveal` it is within its rate. Refusals are recorded, aggregated per principal and
    /// action (see [`super::refusals`]).
    pub async fn authorize(
        &self,
        caller: Caller,
        action: Action,
    ) -> Result<Authorized, VaultError> {
        let auth = Authorized { caller, action };
        let principal = &auth.caller.principal.id;
        if !auth
            .caller
            .principal
            .permissions
            .contains(Permission::for_action(action))
        {
            self.record_refusal(
                format!("denied:{principal}:{}", action.as_str()),
                format!("principal {principal}"),
                super::event(&auth, Outcome::PermissionDenied, None),
            )
            .await;
            metrics::counter!("cardvault_permission_denied_total", "action" => action.as_str())
                .increment(1);
            return Err(VaultError::PermissionDenied);
        }
        if action == Action::Reveal && !self.reveals.take(principal, Instant::now()) {
            self.record_refusal(
                format!("reveal:{principal}"),
                format!("principal {principal}"),
                super::event(&auth, Outcome::RateLimited, None),
            )
            .await;
            metrics::counter!("cardvault_rate_limited_total", "limit" => "reveal").increment(1);
            return Err(VaultError::RateLimited);
        }
        Ok(auth)
    }

    /// Records a refusal of source `key` (named `source`), aggregated per window.
    async fn record_refusal(&self, key: String, source: String, event: AuditEvent) {
        for event in self.refusals.note(key, source, event, Instant::now()) {
            self.record(&event).await;
        }
    }

    /// Writes the counts of refusal windows that are over (every window when `all`).
    pub async fn flush_refusals(&self, all: bool) {
        for event in self.refusals.closed(Instant::now(), all) {
            self.record(&event).await;
        }
    }

    /// How long verified credentials are trusted before they are checked again, here and in
    /// streams that outlive one check.
    pub fn credential_cache_ttl(&self) -> Duration {
        self.options.credential_cache_ttl
    }
}

/// Loopback, counting `::ffff:127.0.0.1` (a dual-stack listener's view of IPv4 loopback).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
    }
}
