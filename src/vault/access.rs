//! Who may do what: permissions, principals, callers, and the proof that a caller was
//! authorized for an action.
//!
//! A request becomes a [`Caller`] through [`Vault::authenticate`](super::Vault::authenticate)
//! (API key, mTLS identity, or the loopback-only unauthenticated tenant of `--dev`), then an
//! [`Authorized`] through [`Vault::authorize`](super::Vault::authorize), which checks the
//! permission the action needs and the abuse limits. Every vault operation takes an
//! `Authorized`, and only `authorize` makes one, so no operation can run unchecked.

use std::fmt;

use super::TenantId;
use crate::audit::Action;

/// One permission a principal can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Store cards.
    Tokenize,
    /// Read masked card metadata.
    Read,
    /// Read the PAN.
    Reveal,
    /// Charge a stored card.
    Charge,
    /// Delete cards.
    Delete,
    /// Administer keys, tenants, principals, API keys and honeytokens.
    KeysAdmin,
    /// Read the audit log.
    AuditRead,
    /// See card fingerprints (the keyed PAN hash that tells two tokens of one card apart
    /// from two cards). Card answers leave the fingerprint empty for callers without it:
    /// with `tokenize` and `read`, comparing fingerprints would tell which of the ~1000
    /// candidates sharing a stored card's BIN and last 4 is that card.
    Fingerprint,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 8] = [
        Permission::Tokenize,
        Permission::Read,
        Permission::Reveal,
        Permission::Charge,
        Permission::Delete,
        Permission::KeysAdmin,
        Permission::AuditRead,
        Permission::Fingerprint,
    ];

    /// The name used in configuration, the CLI, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Tokenize => "tokenize",
            Permission::Read => "read",
            Permission::Reveal => "reveal",
            Permission::Charge => "charge",
            Permission::Delete => "delete",
            Permission::KeysAdmin => "keys:admin",
            Permission::AuditRead => "audit:read",
            Permission::Fingerprint => "fingerprint",
        }
    }

    /// Parses a permission name.
    pub fn parse(name: &str) -> Result<Permission, UnknownPermission> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| UnknownPermission(name.chars().take(40).collect()))
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// The permission an action needs.
    pub fn for_action(action: Action) -> Permission {
        match action {
            // Importing stores cards, and a CVC hold serves a card just stored.
            Action::Tokenize | Action::ImportCards | Action::HoldCvc => Permission::Tokenize,
            Action::GetCard => Permission::Read,
            Action::Reveal => Permission::Reveal,
            Action::Charge
            | Action::ReconcileCharges
            | Action::CaptureCharge
            | Action::RefundCharge
            | Action::CancelCharge => Permission::Charge,
            Action::DeleteCard => Permission::Delete,
            Action::ReadAudit => Permission::AuditRead,
            Action::Authenticate
            | Action::CreateTenant
            | Action::CreatePrincipal
            | Action::ListPrincipals
            | Action::RevokePrincipal
            | Action::CreateApiKey
            | Action::RevokeApiKey
            | Action::MintHoneytoken
            | Action::RotateKek
            | Action::RotateDeks
            | Action::KeyStatus
            | Action::RequestKeyOperation
            | Action::ApproveKeyOperation
            | Action::KeyJob => Permission::KeysAdmin,
        }
    }
}

/// A permission name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown permission {0:?} (known: tokenize, read, reveal, charge, delete, keys:admin, audit:read, fingerprint)"
)]
pub struct UnknownPermission(String);

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions(u16);

impl Permissions {
    /// Every permission, `fingerprint` included (the `--dev` caller: a developer's own
    /// loopback vault, where the permission protects nothing).
    pub fn all() -> Permissions {
        Permission::ALL.into_iter().collect()
    }

    /// Parses names; an unknown name is an error, not silently dropped.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, UnknownPermission> {
        names
            .into_iter()
            .map(Permission::parse)
            .collect::<Result<_, _>>()
    }

    /// Whether the set holds `permission`.
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The names, in the order of [`Permission::ALL`].
    pub fn names(self) -> Vec<&'static str> {
        Permission::ALL
            .into_iter()
            .filter(|p| self.contains(*p))
            .map(Permission::as_str)
            .collect()
    }

    /// [`Permissions::names`] as owned strings, as rows and messages keep them.
    pub fn owned_names(self) -> Vec<String> {
        self.names().into_iter().map(str::to_owned).collect()
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        Permissions(iter.into_iter().fold(0, |bits, p| bits | p.bit()))
    }
}

/// Whether giving a principal `permissions` is an act of two operators: the principal would
/// administer the vault (`keys:admin`) or read or move card data (`reveal`, `charge`). Creating
/// such a principal, and revoking an operator, are dual-controlled requests; a new
/// card-data permission belongs here too.
pub fn needs_dual_control(permissions: &Permissions) -> bool {
    [
        Permission::KeysAdmin,
        Permission::Reveal,
        Permission::Charge,
        // With `tokenize`, fingerprints confirm a guessed card number without any budget.
        Permission::Fingerprint,
    ]
    .into_iter()
    .any(|p| permissions.contains(p))
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

/// An authenticated identity of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable id: `p_…` for principals created by an admin, `config:<name>` for principals
    /// declared in configuration, `dev` for the unauthenticated `--dev` caller.
    pub id: String,
    /// The tenant whose cards it may touch.
    pub tenant: TenantId,
    /// Human name.
    pub name: String,
    /// What it may do.
    pub permissions: Permissions,
    /// With `keys:admin`: manages every tenant, not only its own.
    pub global_operator: bool,
}

/// A principal declared in configuration (GitOps): authenticates by mTLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPrincipal {
    /// The principal.
    pub principal: Principal,
    /// SPIFFE ID or certificate CN.
    pub mtls_identity: String,
}

/// Who a request acts for, and from where.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The authenticated principal.
    pub principal: Principal,
    /// Network address of the caller, for the audit log.
    pub peer: Option<String>,
    /// Request id, for the audit log.
    pub request_id: Option<String>,
}

impl Caller {
    /// The caller's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.principal.tenant
    }
}

/// What a request presented to prove who it is. Debug never prints the bearer token.
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The bearer token of an `authorization: Bearer …` header. Secret: never logged.
    pub bearer: Option<&'a str>,
    /// The identity of a verified client certificate (a SPIFFE ID from a URI SAN, else CN).
    pub mtls_identity: Option<&'a str>,
    /// The TCP peer: the caller, or a proxy in front of it.
    pub peer: Option<std::net::SocketAddr>,
    /// The `x-forwarded-for` header as sent, believed only when `peer` is a trusted proxy.
    pub forwarded_for: Option<&'a str>,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer.map(|_| "<redacted>"))
            .field("mtls_identity", &self.mtls_identity)
            .field("peer", &self.peer)
            .field("forwarded_for", &self.forwarded_for)
            .finish()
    }
}

/// Proof that a caller holds the permission for one action and is within its limits. Only
/// [`Vault::authorize`](super::Vault::authorize) makes one.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub(super) caller: Caller,
    pub(super) action: Action,
}

impl Authorized {
    /// The caller.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The action it was authorized for.
    pub fn action(&self) -> Action {
        self.action
    }

    /// Whether the caller may see card fingerprints.
    pub fn sees_fingerprints(&self) -> bool {
        self.caller
            .principal
            .permissions
            .contains(Permission::Fingerprint)
    }

    /// Whether the caller is a global operator (holds `keys:admin` and manages every
    /// tenant): it reads every tenant's audit records. A tenant's operator reads its own.
    pub fn is_global_operator(&self) -> bool {
        let principal = &self.caller.principal;
        principal.global_operator && principal.permissions.contains(Permission::KeysAdmin)
    }
}

/// The tenants an operator manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorScope {
    /// Every tenant, and what belongs to no tenant: tenants themselves, KEK versions, global
    /// operators.
    Global,
    /// One tenant: its principals, API keys, honeytokens, data keys, shredding and audit
    /// records.
    Tenant(TenantId),
}

impl OperatorScope {
    /// Whether this scope covers `tenant` (`None`: something vault-wide).
    pub fn covers(&self, tenant: Option<&TenantId>) -> bool {
        match (self, tenant) {
            (OperatorScope::Global, _) => true,
            (OperatorScope::Tenant(own), Some(tenant)) => own == tenant,
            (OperatorScope::Tenant(_), None) => false,
        }
    }
}

/// Who performs an administrative action: an authorized `keys:admin` caller over the API, or
/// an operator on the vault's host through the `cardvault admin` CLI.
///
/// The CLI needs the database and the KEK, so it can do everything anyway: it is the
/// bootstrap and break-glass path, acts without dual control, and its name — the OS user — is
/// not authenticated by the vault, so it is recorded as `local:unverified:<user>`.
#[derive(Debug, Clone)]
pub struct Operator {
    pub(super) principal: String,
    pub(super) peer: Option<String>,
    pub(super) request_id: Option<String>,
    pub(super) scope: OperatorScope,
    pub(super) local: bool,
}

impl Operator {
    /// The local operator of the CLI, named (unverified) by the OS user for the audit log.
    pub fn local(user: &str) -> Operator {
        Operator {
            principal: format!("local:unverified:{user}"),
            peer: Some("cli".to_owned()),
            request_id: None,
            scope: OperatorScope::Global,
            local: true,
        }
    }

    /// The operator behind an authorized administrative request: global, or its tenant's.
    pub fn from_authorized(auth: &Authorized) -> Operator {
        let principal = &auth.caller.principal;
        Operator {
            principal: principal.id.clone(),
            peer: auth.caller.peer.clone(),
            request_id: auth.caller.request_id.clone(),
            scope: if principal.global_operator {
                OperatorScope::Global
            } else {
                OperatorScope::Tenant(principal.tenant.clone())
            },
            local: false,
        }
    }

    /// The principal id it acts as (`local:unverified:<user>` for the CLI).
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The tenants it manages.
    pub fn scope(&self) -> &OperatorScope {
        &self.scope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_names_round_trip_and_unknown_names_are_errors() {
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.as_str()), Ok(p));
        }
        let err = Permission::parse("root").unwrap_err();
        assert!(err.to_string().contains("root"));
        assert!(Permissions::parse(["read", "rule"]).is_err());
    }

    #[test]
    fn a_permission_set_holds_exactly_what_was_parsed() {
        let set = Permissions::parse(["reveal", "read"]).unwrap();
        assert!(set.contains(Permission::Read));
        assert!(set.contains(Permission::Reveal));
        assert!(!set.contains(Permission::Tokenize));
        assert_eq!(set.names(), vec!["read", "reveal"]);
        assert_eq!(Permissions::all().names().len(), 8);
        assert!(Permissions::all().contains(Permission::Fingerprint));
        assert!(
            !Permissions::parse(["tokenize", "read"])
                .unwrap()
                .contains(Permission::Fingerprint)
        );
        assert!(Permissions::default().is_empty());
    }

    #[test]
    fn credentials_debug_does_not_print_the_bearer_token() {
        let credentials = Credentials {
            bearer: Some("cv_k0123456789abcdef_s3cretS3cretS3cret"),
            mtls_identity: Some("spiffe://shop.test/checkout"),
            peer: Some(([127, 0, 0, 1], 4000).into()),
            forwarded_for: None,
        };
        let printed = format!("{credentials:?} {credentials:#?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(!printed.contains("cv_k0123"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
        assert!(printed.contains("spiffe://shop.test/checkout"), "{printed}");
    }

    #[test]
    fn operators_and_card_data_permissions_need_dual_control() {
        for name in ["keys:admin", "reveal", "charge", "fingerprint"] {
            assert!(
                needs_dual_control(&Permissions::parse([name, "read"]).unwrap()),
                "{name}"
            );
        }
        for name in ["tokenize", "read", "delete", "audit:read"] {
            assert!(
                !needs_dual_control(&Permissions::parse([name]).unwrap()),
                "{name}"
            );
        }
    }

    #[test]
    fn a_tenant_scope_covers_its_tenant_only() {
        let acme = TenantId::parse("acme").unwrap();
        let globex = TenantId::parse("globex").unwrap();
        let scope = OperatorScope::Tenant(acme.clone());
        assert!(scope.covers(Some(&acme)));
        assert!(!scope.covers(Some(&globex)));
        assert!(!scope.covers(None));
        assert!(OperatorScope::Global.covers(None));
        assert!(OperatorScope::Global.covers(Some(&globex)));
    }

    #[test]
    fn every_card_action_needs_its_own_permission() {
        assert_eq!(Permission::for_action(Action::Reveal), Permission::Reveal);
        assert_eq!(
            Permission::for_action(Action::ImportCards),
            Permission::Tokenize
        );
        assert_eq!(Permission::for_action(Action::GetCard), Permission::Read);
        assert_eq!(
            Permission::for_action(Action::DeleteCard),
            Permission::Delete
        );
        assert_eq!(
            Permission::for_action(Action::ReadAudit),
            Permission::AuditRead
        );
        assert_eq!(
            Permission::for_action(Action::CreateApiKey),
            Permission::KeysAdmin
        );
    }
}
