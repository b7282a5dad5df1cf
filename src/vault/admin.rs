//! Administration: tenants, principals, API keys and honeytokens. Each change commits with
//! its audit record; refusals (a duplicate, a missing target) are recorded too.

use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::{
    CardView, Metadata, Operator, Permissions, TenantId, TokenizeCommand, Vault, VaultError,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    card::{Card, Expiry, Pan, TokenFormat, luhn},
    crypto::{self, ApiKey},
    store::{ApiKeyRow, PrincipalRow},
};

/// A principal to create.
#[derive(Debug, Clone)]
pub struct NewPrincipal {
    /// Its tenant, which must exist.
    pub tenant: TenantId,
    /// Name, unique among the tenant's live principals: 1 to 64 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// What it may do; at least one permission.
    pub permissions: Permissions,
    /// SPIFFE ID or certificate CN it authenticates as over mTLS, if any.
    pub mtls_identity: Option<String>,
}

/// A new API key: the key itself, shown once, and what is stored.
#[derive(Debug)]
pub struct CreatedApiKey {
    /// The whole key. The vault keeps only its hash: show it to the operator once.
    pub key: ApiKey,
    /// The stored row.
    pub row: ApiKeyRow,
}

pub(super) fn admin_event(op: &Operator, action: Action, outcome: Outcome) -> AuditEvent {
    let mut event = AuditEvent::now(action, outcome);
    event.principal = Some(op.principal.clone());
    event.peer = op.peer.clone();
    event.request_id = op.request_id.clone();
    event
}

/// Whether a principal name is acceptable: it appears in logs and audit records, so it is
/// kept to a plain alphabet.
pub fn valid_principal_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl Vault {
    /// Creates a tenant and its key material.
    pub async fn create_tenant(&self, op: &Operator, tenant: &TenantId) -> Result<(), VaultError> {
        let row = self.keys.new_tenant_row(tenant).await?;
        let mut tx = self.begin().await?;
        let created = tx.insert_tenant(&row).await?;
        let outcome = if created {
            Outcome::Ok
        } else {
            Outcome::Conflict
        };
        let mut event = admin_event(op, Action::CreateTenant, outcome);
        event.tenant = Some(tenant.to_string());
        self.commit_with(tx, &event).await?;
        if created {
            Ok(())
        } else {
            Err(VaultError::Conflict("tenant already exists"))
        }
    }

    /// Creates a principal of an existing tenant.
    pub async fn create_principal(
        &self,
        op: &Operator,
        new: NewPrincipal,
    ) -> Result<PrincipalRow, VaultError> {
        let mut id = String::from("p_");
        id.push_str(
            &crypto::random_base62(16)
                .map_err(|e| VaultError::internal("failed to draw a principal id", e))?,
        );
        let row = PrincipalRow {
            id,
            tenant_id: new.tenant.to_string(),
            name: new.name,
            mtls_identity: new.mtls_identity,
            permissions: new
                .permissions
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            created_at: OffsetDateTime::now_utc(),
            revoked_at: None,
        };
        let mut tx = self.begin().await?;
        let mut event = admin_event(op, Action::CreatePrincipal, Outcome::Ok);
        event.tenant = Some(row.tenant_id.clone());
        event.detail = Some(format!(
            "principal {} name {} permissions {}",
            row.id,
            row.name,
            row.permissions.join(",")
        ));
        let result = if !tx.tenant_exists(&row.tenant_id).await? {
            event.outcome = Outcome::NotFound;
            Err(VaultError::Missing("tenant not found"))
        } else if !tx.insert_principal(&row).await? {
            event.outcome = Outcome::Conflict;
            Err(VaultError::Conflict(
                "a live principal of this tenant has that name, or one has that mTLS identity",
            ))
        } else {
            Ok(row)
        };
        self.commit_with(tx, &event).await?;
        result
    }

    /// Principals of one tenant, or of every tenant.
    pub async fn list_principals(
        &self,
        op: &Operator,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<PrincipalRow>, VaultError> {
        let mut event = admin_event(op, Action::ListPrincipals, Outcome::Ok);
        event.tenant = tenant.map(TenantId::to_string);
        self.commit_with(self.begin().await?, &event).await?;
        Ok(self.store.principals(tenant.map(TenantId::as_str)).await?)
    }

    /// The API keys of a principal (hashes only).
    pub async fn api_keys_of(&self, principal_id: &str) -> Result<Vec<ApiKeyRow>, VaultError> {
        Ok(self.store.api_keys_of(principal_id).await?)
    }

    /// Revokes a principal and all its API keys.
    pub async fn revoke_principal(&self, op: &Operator, id: &str) -> Result<(), VaultError> {
        let mut tx = self.begin().await?;
        let revoked = tx.revoke_principal(id, OffsetDateTime::now_utc()).await?;
        let outcome = if revoked {
            Outcome::Ok
        } else {
            Outcome::NotFound
        };
        let mut event = admin_event(op, Action::RevokePrincipal, outcome);
        event.detail = Some(format!("principal {id}"));
        self.commit_with(tx, &event).await?;
        self.credentials.forget(None, Some(id));
        if revoked {
            Ok(())
        } else {
            Err(VaultError::Missing("no live principal with that id"))
        }
    }

    /// Creates an API key for a live principal, valid for `valid_for` if given.
    pub async fn create_api_key(
        &self,
        op: &Operator,
        principal_id: &str,
        valid_for: Option<Duration>,
    ) -> Result<CreatedApiKey, VaultError> {
        let principal = self
            .store
            .principal(principal_id)
            .await?
            .filter(|p| p.revoked_at.is_none());
        let key = ApiKey::generate()
            .map_err(|e| VaultError::internal("failed to generate an API key", e))?;
        let now = OffsetDateTime::now_utc();
        let row = ApiKeyRow {
            id: key.id().to_owned(),
            principal_id: principal_id.to_owned(),
            secret_hash: key.hash(),
            created_at: now,
            expires_at: valid_for.map(|d| now + d),
            revoked_at: None,
        };
        let mut tx = self.begin().await?;
        let mut event = admin_event(op, Action::CreateApiKey, Outcome::Ok);
        event.detail = Some(format!("API key {} for principal {principal_id}", row.id));
        let result = match &principal {
            Some(p) => {
                event.tenant = Some(p.tenant_id.clone());
                tx.insert_api_key(&row).await?;
                Ok(CreatedApiKey {
                    key,
                    row: row.clone(),
                })
            }
            None => {
                event.outcome = Outcome::NotFound;
                Err(VaultError::Missing("no live principal with that id"))
            }
        };
        self.commit_with(tx, &event).await?;
        result
    }

    /// Revokes an API key.
    pub async fn revoke_api_key(&self, op: &Operator, key_id: &str) -> Result<(), VaultError> {
        let mut tx = self.begin().await?;
        let revoked = tx.revoke_api_key(key_id, OffsetDateTime::now_utc()).await?;
        let outcome = if revoked {
            Outcome::Ok
        } else {
            Outcome::NotFound
        };
        let mut event = admin_event(op, Action::RevokeApiKey, outcome);
        event.detail = Some(format!("API key {key_id}"));
        self.commit_with(tx, &event).await?;
        self.credentials.forget(Some(key_id), None);
        if revoked {
            Ok(())
        } else {
            Err(VaultError::Missing("no live API key with that id"))
        }
    }

    /// Mints a honeytoken: a card with a random, valid-looking Visa number, stored like any
    /// other card of the tenant and indistinguishable from one to callers, whose every access
    /// raises an alarm.
    pub async fn mint_honeytoken(
        &self,
        op: &Operator,
        tenant: &TenantId,
        format: TokenFormat,
        metadata: Metadata,
    ) -> Result<CardView, VaultError> {
        if self.store.tenant(tenant.as_str()).await?.is_none() {
            let mut event = admin_event(op, Action::MintHoneytoken, Outcome::NotFound);
            event.tenant = Some(tenant.to_string());
            self.record(&event).await;
            return Err(VaultError::Missing("tenant not found"));
        }
        let card = honeytoken_card()?;
        let mut event = admin_event(op, Action::MintHoneytoken, Outcome::Ok);
        event.tenant = Some(tenant.to_string());
        let command = TokenizeCommand {
            card,
            cvc: None,
            format,
            reuse_existing: false,
            metadata,
            expires_at: None,
        };
        let stored = self.store_card(tenant, command, true, event).await?;
        tracing::info!(tenant = %tenant, token = stored.card.token.as_str(), "minted a honeytoken");
        Ok(stored.card)
    }
}

/// A random 16-digit Visa number (IIN 4) with a valid check digit, expiring one to four
/// years from now: shaped like a real card, so nothing tells a caller it is a canary.
fn honeytoken_card() -> Result<Card, VaultError> {
    let mut random = Zeroizing::new([0u8; 32]);
    crypto::fill_random(&mut random[..])
        .map_err(|e| VaultError::internal("failed to draw a honeytoken", e))?;
    let mut digits = Zeroizing::new(Vec::with_capacity(16));
    digits.push(b'4');
    // 256 is not a multiple of 10, so bytes ≥ 250 would favour small digits; the bias left
    // by `% 10` over the accepted range is zero.
    for &b in random.iter().filter(|&&b| b < 250).take(14) {
        digits.push(b'0' + b % 10);
    }
    if digits.len() != 15 {
        return Err(VaultError::internal(
            "failed to draw a honeytoken",
            "too many rejected bytes",
        ));
    }
    let check = luhn::check_digit(&digits);
    digits.push(check);
    let text = Zeroizing::new(String::from_utf8_lossy(&digits).into_owned());
    let pan = Pan::parse(&text).map_err(|e| VaultError::internal("minted an invalid PAN", e))?;
    let today = OffsetDateTime::now_utc().date();
    let month = u32::from(random[30] % 12) + 1;
    let year = u32::try_from(today.year()).unwrap_or(2026) + 1 + u32::from(random[31] % 4);
    let expiry = Expiry::new(month, year, today)
        .map_err(|e| VaultError::internal("minted an invalid expiry", e))?;
    Ok(Card {
        pan,
        expiry,
        holder: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honeytoken_cards_are_valid_visa_numbers_that_differ() {
        let a = honeytoken_card().unwrap();
        let b = honeytoken_card().unwrap();
        assert_eq!(a.pan.len(), 16);
        assert!(a.pan.expose_digits().starts_with('4'));
        assert!(luhn::is_valid(a.pan.expose_digits().as_bytes()));
        assert_ne!(a.pan.expose_digits(), b.pan.expose_digits());
    }

    #[test]
    fn principal_names_are_plain() {
        assert!(valid_principal_name("checkout-eu.1"));
        assert!(!valid_principal_name(""));
        assert!(!valid_principal_name("a b"));
        assert!(!valid_principal_name(&"a".repeat(65)));
    }
}
