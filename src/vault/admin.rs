//! Administration: tenants, principals, API keys and honeytokens. Each change commits with
//! its audit record; refusals (a duplicate, a missing target, an operator outside its scope)
//! are recorded too. Changes that hand out operator or card-data power go through dual
//! control (see `key_control`) unless made by the CLI on the vault's host.

use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::{
    ApiKeyView, CardView, KeyOperation, KeyRequestView, Metadata, Operator, OperatorScope,
    Permission, Permissions, PrincipalName, PrincipalView, TenantId, TokenizeCommand, Vault,
    VaultError, needs_dual_control,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    card::{Brand, Card, Expiry, Pan, TokenFormat, luhn},
    crypto::{self, ApiKey, FingerprintKey},
    id,
    store::{ApiKeyRow, PrincipalRow, StoreTx},
};

/// The longest validity an API key may be given: far beyond any rotation schedule, and
/// short of a time the vault cannot represent.
pub const MAX_API_KEY_VALIDITY: Duration = Duration::days(366 * 100);

/// A principal to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPrincipal {
    /// Its tenant, which must exist.
    pub tenant: TenantId,
    /// Name, unique among the tenant's live principals.
    pub name: PrincipalName,
    /// What it may do; at least one permission.
    pub permissions: Permissions,
    /// SPIFFE ID or certificate CN it authenticates as over mTLS, if any.
    pub mtls_identity: Option<String>,
    /// With `keys:admin`: an operator of every tenant, not only of `tenant`.
    pub global_operator: bool,
}

impl NewPrincipal {
    /// The tenant whose operators may create it; `None` for a global operator, which only a
    /// global operator may create.
    pub fn scope_tenant(&self) -> Option<&TenantId> {
        (!self.global_operator).then_some(&self.tenant)
    }
}

/// A new API key: the key itself, shown once, and what is stored.
#[derive(Debug)]
pub struct CreatedApiKey {
    /// The whole key. The vault keeps only its hash: show it to the operator once.
    pub key: ApiKey,
    /// What the vault keeps of it, as it shows it (no hash).
    pub row: ApiKeyView,
}

/// What an administrative change that may need dual control did.
#[derive(Debug)]
pub enum DualControlled<T> {
    /// Done at once.
    Done(T),
    /// Recorded as a request that another operator must approve (`ApproveKeyRequest`); the
    /// approval carries it out.
    Pending(Box<KeyRequestView>),
}

pub(super) fn admin_event(op: &Operator, action: Action, outcome: Outcome) -> AuditEvent {
    let mut event = AuditEvent::now(action, outcome);
    event.principal = Some(op.principal.clone());
    event.peer = op.peer.clone();
    event.request_id = op.request_id.clone();
    event
}

/// The tenant whose operators manage a stored principal; `None` for a global operator (or a
/// row whose tenant id is malformed, which only a global operator may then touch).
pub(super) fn scope_of(row: &PrincipalRow) -> Option<TenantId> {
    if row.global_operator {
        None
    } else {
        TenantId::parse(&row.tenant_id).ok()
    }
}

/// The permissions of a stored principal (unknown names count as none).
pub(super) fn permissions_of(row: &PrincipalRow) -> Permissions {
    row.permissions
        .iter()
        .filter_map(|name| Permission::parse(name).ok())
        .collect()
}

impl Vault {
    /// Refuses, and records, an action on `tenant` (`None`: something vault-wide) that lies
    /// outside the operator's scope.
    pub(super) async fn within_scope(
        &self,
        op: &Operator,
        tenant: Option<&TenantId>,
        event: &AuditEvent,
    ) -> Result<(), VaultError> {
        if op.scope.covers(tenant) {
            return Ok(());
        }
        let mut event = event.clone();
        event.outcome = Outcome::PermissionDenied;
        let why = match tenant {
            Some(_) => "operator scope: a tenant's operator manages its own tenant only",
            None => "operator scope: only a global operator may do this",
        };
        event.detail = Some(match &event.detail {
            Some(detail) => format!("{detail}; refused: {why}"),
            None => format!("refused: {why}"),
        });
        self.record(&event).await;
        Err(VaultError::SeparationOfDuties(why))
    }

    /// Creates a tenant and its key material. Global operators only.
    pub async fn create_tenant(&self, op: &Operator, tenant: &TenantId) -> Result<(), VaultError> {
        let mut event = admin_event(op, Action::CreateTenant, Outcome::Ok);
        event.tenant = Some(tenant.to_string());
        self.within_scope(op, None, &event).await?;
        let row = self.keys.new_tenant_row(tenant).await?;
        let mut tx = self.begin().await?;
        let created = tx.insert_tenant(&row).await?;
        if !created {
            event.outcome = Outcome::Conflict;
        }
        self.commit_with(tx, &event).await?;
        if created {
            Ok(())
        } else {
            Err(VaultError::Conflict("tenant already exists"))
        }
    }

    /// Creates a principal of an existing tenant. Over the API, a principal that would hold
    /// `keys:admin` or a card-data permission (see
    /// [`needs_dual_control`](super::needs_dual_control)) is not created but requested: a
    /// second operator's approval creates it. The CLI creates it at once.
    pub async fn create_principal(
        &self,
        op: &Operator,
        new: NewPrincipal,
    ) -> Result<DualControlled<PrincipalView>, VaultError> {
        let mut event = admin_event(op, Action::CreatePrincipal, Outcome::Ok);
        event.tenant = Some(new.tenant.to_string());
        event.detail = Some(format!(
            "principal {} permissions {}{}",
            new.name,
            new.permissions.names().join(","),
            if new.global_operator {
                " (global operator)"
            } else {
                ""
            }
        ));
        self.within_scope(op, new.scope_tenant(), &event).await?;
        if new.global_operator && !new.permissions.contains(Permission::KeysAdmin) {
            event.outcome = Outcome::Conflict;
            self.record(&event).await;
            return Err(VaultError::Precondition(
                "a global operator must hold keys:admin".to_owned(),
            ));
        }
        if !op.local && needs_dual_control(&new.permissions) {
            return self
                .request_key_operation(op, KeyOperation::CreatePrincipal(new))
                .await
                .map(|request| DualControlled::Pending(Box::new(request)));
        }
        let row = new_principal_row(new, &op.principal)?;
        let mut tx = self.begin().await?;
        event.detail = Some(format!(
            "principal {} name {} permissions {}{}",
            row.id,
            row.name,
            row.permissions.join(","),
            if row.global_operator {
                " (global operator)"
            } else {
                ""
            }
        ));
        let result = self.insert_principal(tx.as_mut(), row, &mut event).await;
        self.commit_with(tx, &event).await?;
        result.map(|row| DualControlled::Done(row.into()))
    }

    /// Inserts a principal in `tx`, noting a refusal in `event`.
    pub(super) async fn insert_principal(
        &self,
        tx: &mut dyn StoreTx,
        row: PrincipalRow,
        event: &mut AuditEvent,
    ) -> Result<PrincipalRow, VaultError> {
        if !tx.tenant_exists(&row.tenant_id).await? {
            event.outcome = Outcome::NotFound;
            Err(VaultError::Missing("tenant not found"))
        } else if !tx.insert_principal(&row).await? {
            event.outcome = Outcome::Conflict;
            Err(VaultError::Conflict(
                "a live principal of this tenant has that name, or one has that mTLS identity",
            ))
        } else {
            Ok(row)
        }
    }

    /// Principals of one tenant, or of every tenant the operator manages (a tenant's
    /// operator: its own).
    pub async fn list_principals(
        &self,
        op: &Operator,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<PrincipalView>, VaultError> {
        let tenant = match (tenant, &op.scope) {
            (None, OperatorScope::Tenant(own)) => Some(own),
            (tenant, _) => tenant,
        };
        let mut event = admin_event(op, Action::ListPrincipals, Outcome::Ok);
        event.tenant = tenant.map(TenantId::to_string);
        self.within_scope(op, tenant, &event).await?;
        self.commit_with(self.begin().await?, &event).await?;
        Ok(self
            .store
            .principals(tenant.map(TenantId::as_str))
            .await?
            .into_iter()
            .map(PrincipalView::from)
            .collect())
    }

    /// The API keys of a principal (never the keys, nor their hashes).
    pub async fn api_keys_of(&self, principal_id: &str) -> Result<Vec<ApiKeyView>, VaultError> {
        Ok(self
            .store
            .api_keys_of(principal_id)
            .await?
            .iter()
            .map(ApiKeyView::from)
            .collect())
    }

    /// A live principal the operator manages, or the refusal (recorded).
    async fn managed_principal(
        &self,
        op: &Operator,
        id: &str,
        event: &mut AuditEvent,
    ) -> Result<PrincipalRow, VaultError> {
        let Some(row) = self
            .store
            .principal(id)
            .await?
            .filter(|p| p.revoked_at.is_none())
        else {
            event.outcome = Outcome::NotFound;
            self.record(event).await;
            return Err(VaultError::Missing("no live principal with that id"));
        };
        event.tenant = Some(row.tenant_id.clone());
        self.within_scope(op, scope_of(&row).as_ref(), event)
            .await?;
        Ok(row)
    }

    /// Revokes a principal and all its API keys. Over the API, revoking another operator
    /// (a principal holding `keys:admin`) is requested, and a second operator's approval
    /// revokes it; revoking oneself, or anyone through the CLI, happens at once.
    pub async fn revoke_principal(
        &self,
        op: &Operator,
        id: &str,
    ) -> Result<DualControlled<()>, VaultError> {
        let mut event = admin_event(op, Action::RevokePrincipal, Outcome::Ok);
        event.detail = Some(format!("principal {id}"));
        let row = self.managed_principal(op, id, &mut event).await?;
        if !op.local
            && row.id != op.principal
            && permissions_of(&row).contains(Permission::KeysAdmin)
        {
            return self
                .request_key_operation(op, KeyOperation::revoke_principal(&row))
                .await
                .map(|request| DualControlled::Pending(Box::new(request)));
        }
        let mut tx = self.begin().await?;
        let revoked = tx.revoke_principal(id, OffsetDateTime::now_utc()).await?;
        if !revoked {
            event.outcome = Outcome::NotFound;
        }
        self.commit_with(tx, &event).await?;
        self.credentials.forget(None, Some(id));
        if revoked {
            Ok(DualControlled::Done(()))
        } else {
            Err(VaultError::Missing("no live principal with that id"))
        }
    }

    /// Creates an API key for a live principal, valid for `valid_for` if given. Over the API,
    /// a key for a principal that holds `keys:admin` or a card-data permission is requested:
    /// whoever holds the key acts as that principal, so minting one is as much an act of two
    /// operators as creating the principal. The approval creates it and shows it to the
    /// approver, once.
    pub async fn create_api_key(
        &self,
        op: &Operator,
        principal_id: &str,
        valid_for: Option<Duration>,
    ) -> Result<DualControlled<CreatedApiKey>, VaultError> {
        let mut event = admin_event(op, Action::CreateApiKey, Outcome::Ok);
        event.detail = Some(format!("API key for principal {principal_id}"));
        let principal = self.managed_principal(op, principal_id, &mut event).await?;
        if !op.local && needs_dual_control(&permissions_of(&principal)) {
            return self
                .request_key_operation(
                    op,
                    KeyOperation::CreateApiKey {
                        principal: principal_id.to_owned(),
                        tenant: scope_of(&principal),
                        valid_for,
                    },
                )
                .await
                .map(|request| DualControlled::Pending(Box::new(request)));
        }
        let (key, row) = new_api_key(principal_id, valid_for, &op.principal)?;
        let mut tx = self.begin().await?;
        event.detail = Some(format!("API key {} for principal {principal_id}", row.id));
        tx.insert_api_key(&row).await?;
        self.commit_with(tx, &event).await?;
        Ok(DualControlled::Done(CreatedApiKey {
            key,
            row: ApiKeyView::from(&row),
        }))
    }

    /// Revokes an API key of a principal the operator manages.
    pub async fn revoke_api_key(&self, op: &Operator, key_id: &str) -> Result<(), VaultError> {
        let mut event = admin_event(op, Action::RevokeApiKey, Outcome::Ok);
        event.detail = Some(format!("API key {key_id}"));
        if let Some(key) = self.store.api_key(key_id).await?
            && let Some(owner) = self.store.principal(&key.principal_id).await?
        {
            event.tenant = Some(owner.tenant_id.clone());
            self.within_scope(op, scope_of(&owner).as_ref(), &event)
                .await?;
        } else if !op.scope.covers(None) {
            // A tenant's operator learns nothing of keys outside its tenant, and a key whose
            // principal is gone is no tenant's.
            self.within_scope(op, None, &event).await?;
        }
        let mut tx = self.begin().await?;
        let revoked = tx.revoke_api_key(key_id, OffsetDateTime::now_utc()).await?;
        if !revoked {
            event.outcome = Outcome::NotFound;
        }
        self.commit_with(tx, &event).await?;
        self.credentials.forget(Some(key_id), None);
        if revoked {
            Ok(())
        } else {
            Err(VaultError::Missing("no live API key with that id"))
        }
    }

    /// Mints a honeytoken: a card stored like any other card of the tenant and
    /// indistinguishable from one to callers, whose every access raises an alarm. Its number
    /// has the BIN of one of the tenant's own cards, drawn at random (so the tenant's common
    /// BINs come up often), or a Visa number for a tenant without cards; it is never the
    /// number of a card the tenant holds.
    pub async fn mint_honeytoken(
        &self,
        op: &Operator,
        tenant: &TenantId,
        format: TokenFormat,
        metadata: Metadata,
    ) -> Result<CardView, VaultError> {
        let mut event = admin_event(op, Action::MintHoneytoken, Outcome::Ok);
        event.tenant = Some(tenant.to_string());
        self.within_scope(op, Some(tenant), &event).await?;
        if self.store.tenant(tenant.as_str()).await?.is_none() {
            event.outcome = Outcome::NotFound;
            self.record(&event).await;
            return Err(VaultError::Missing("tenant not found"));
        }
        let keys = match self.keys.tenant(tenant).await {
            Ok(keys) => keys,
            Err(VaultError::Precondition(why)) => {
                // A crypto-shredded tenant.
                event.outcome = Outcome::Conflict;
                event.detail = Some(why.clone());
                self.record(&event).await;
                return Err(VaultError::Precondition(why));
            }
            Err(err) => return Err(err),
        };
        let bin = self.random_bin(tenant).await?;
        let card = unused_honeytoken(bin.as_deref(), &keys.fingerprint, |fingerprint| {
            let store = self.store.clone();
            let tenant = tenant.clone();
            async move {
                Ok(store
                    .fingerprint_in_use(tenant.as_str(), &fingerprint)
                    .await?)
            }
        })
        .await?;
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

    /// The BIN of one of the tenant's cards, picked at random; `None` when it has none.
    async fn random_bin(&self, tenant: &TenantId) -> Result<Option<String>, VaultError> {
        let mut from = [0u8; 32];
        crypto::fill_random(&mut from)
            .map_err(|e| VaultError::internal("failed to draw a honeytoken", e))?;
        if let Some(bin) = self.store.card_bin_at(tenant.as_str(), &from).await? {
            return Ok(Some(bin));
        }
        // Past the highest fingerprint: wrap around to the lowest.
        Ok(self.store.card_bin_at(tenant.as_str(), &[]).await?)
    }
}

/// The row of a principal to create, drawing its id; `created_by` is recorded with it.
pub(super) fn new_principal_row(
    new: NewPrincipal,
    created_by: &str,
) -> Result<PrincipalRow, VaultError> {
    let id =
        id::new_id("p_").map_err(|e| VaultError::internal("failed to draw a principal id", e))?;
    Ok(PrincipalRow {
        id,
        tenant_id: new.tenant.to_string(),
        name: new.name.to_string(),
        mtls_identity: new.mtls_identity,
        permissions: new.permissions.owned_names(),
        created_at: OffsetDateTime::now_utc(),
        revoked_at: None,
        created_by: Some(created_by.to_owned()),
        global_operator: new.global_operator,
    })
}

/// A fresh API key for a principal; `created_by` is whoever is shown the key.
pub(super) fn new_api_key(
    principal_id: &str,
    valid_for: Option<Duration>,
    created_by: &str,
) -> Result<(ApiKey, ApiKeyRow), VaultError> {
    let key =
        ApiKey::generate().map_err(|e| VaultError::internal("failed to generate an API key", e))?;
    let now = OffsetDateTime::now_utc();
    // Checked: a validity from a caller is never left to overflow (and panic) here.
    let expires_at = match valid_for {
        Some(d) => Some(
            Some(d)
                .filter(|d| d.is_positive() && *d <= MAX_API_KEY_VALIDITY)
                .and_then(|d| now.checked_add(d))
                .ok_or_else(|| {
                    VaultError::Precondition("the API key's validity is out of range".to_owned())
                })?,
        ),
        None => None,
    };
    let row = ApiKeyRow {
        id: key.id().to_owned(),
        principal_id: principal_id.to_owned(),
        secret_hash: key.hash(),
        created_at: now,
        expires_at,
        revoked_at: None,
        created_by: Some(created_by.to_owned()),
    };
    Ok((key, row))
}

/// Numbers drawn for a honeytoken before giving up: each is a stored card's number with a
/// chance of at most (cards with its BIN) / 10^7, so a second draw is already rare.
const HONEYTOKEN_DRAWS: usize = 8;

/// Draws honeytoken cards (see [`honeytoken_card`]) until one's number is no stored card's:
/// `taken` says whether a PAN fingerprint is in use in the tenant.
async fn unused_honeytoken<F, Taken>(
    bin: Option<&str>,
    key: &FingerprintKey,
    mut taken: F,
) -> Result<Card, VaultError>
where
    F: FnMut([u8; 32]) -> Taken,
    Taken: Future<Output = Result<bool, VaultError>>,
{
    for _ in 0..HONEYTOKEN_DRAWS {
        let card = honeytoken_card(bin)?;
        let fingerprint = key.fingerprint(card.pan.expose_digits().as_bytes());
        if !taken(*fingerprint.as_bytes()).await? {
            return Ok(card);
        }
    }
    Err(VaultError::internal(
        "failed to draw a honeytoken",
        "every number drawn is a stored card's",
    ))
}

/// A random card number with a valid check digit, expiring one to four years from now,
/// shaped like a real card so nothing tells a caller it is a canary. It starts with `bin`
/// (a stored card's BIN: its first 8 digits for 16-digit numbers, else its first 6) and
/// has that card's likely length, or is a 16-digit Visa number.
fn honeytoken_card(bin: Option<&str>) -> Result<Card, VaultError> {
    let prefix = bin
        .filter(|b| matches!(b.len(), 6 | 8) && b.bytes().all(|c| c.is_ascii_digit()))
        .unwrap_or("4");
    let length = match (prefix.len(), Brand::from_digits(prefix)) {
        // A 6-digit BIN is stored for numbers of fewer than 16 digits.
        (6, Brand::DinersClub) => 14,
        (6, _) => 15,
        _ => 16,
    };
    let mut random = Zeroizing::new([0u8; 32]);
    crypto::fill_random(&mut random[..])
        .map_err(|e| VaultError::internal("failed to draw a honeytoken", e))?;
    let mut digits = Zeroizing::new(Vec::with_capacity(length));
    digits.extend_from_slice(prefix.as_bytes());
    // 256 is not a multiple of 10, so bytes ≥ 250 would favour small digits; the bias left
    // by `% 10` over the accepted range is zero. The last two bytes are the expiry's.
    for &b in random[..30]
        .iter()
        .filter(|&&b| b < 250)
        .take(length - 1 - prefix.len())
    {
        digits.push(b'0' + b % 10);
    }
    if digits.len() != length - 1 {
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
        let a = honeytoken_card(None).unwrap();
        let b = honeytoken_card(None).unwrap();
        assert_eq!(a.pan.len(), 16);
        assert!(a.pan.expose_digits().starts_with('4'));
        assert!(luhn::is_valid(a.pan.expose_digits().as_bytes()));
        assert_ne!(a.pan.expose_digits(), b.pan.expose_digits());
    }

    #[test]
    fn honeytoken_cards_take_a_stored_bin_and_its_length() {
        for (bin, length, brand) in [
            ("55555555", 16, Brand::Mastercard),
            ("378282", 15, Brand::Amex),
            ("305693", 14, Brand::DinersClub),
        ] {
            let card = honeytoken_card(Some(bin)).unwrap();
            let digits = card.pan.expose_digits();
            assert_eq!(card.pan.bin(), bin);
            assert_eq!(digits.len(), length, "{bin}");
            assert_eq!(Brand::from_digits(digits), brand);
            assert!(luhn::is_valid(digits.as_bytes()));
        }
        // Anything that is not a stored BIN's shape falls back to Visa.
        let card = honeytoken_card(Some("12a4")).unwrap();
        assert!(card.pan.expose_digits().starts_with('4'));
    }

    #[tokio::test]
    async fn a_honeytoken_number_that_is_a_stored_cards_is_drawn_again() {
        let key = crypto::TenantSecret::generate()
            .unwrap()
            .fingerprint_key("t");
        let mut seen = Vec::new();
        // The first three numbers drawn are stored cards' numbers.
        let card = unused_honeytoken(Some("55555555"), &key, |fingerprint| {
            seen.push(fingerprint);
            std::future::ready(Ok(seen.len() <= 3))
        })
        .await
        .expect("a fourth draw");
        assert_eq!(seen.len(), 4);
        let drawn = key.fingerprint(card.pan.expose_digits().as_bytes());
        assert_eq!(seen[3], *drawn.as_bytes());
        assert!(!seen[..3].contains(drawn.as_bytes()));
        // A tenant where every number is taken gets an error, never a stored card's number.
        let refused = unused_honeytoken(None, &key, |_| std::future::ready(Ok(true))).await;
        assert!(matches!(refused, Err(VaultError::Internal { .. })));
    }
}
