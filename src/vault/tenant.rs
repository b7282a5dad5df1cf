//! Tenant identifiers.

use std::fmt;

/// A tenant id: 1 to 64 characters of `[a-z0-9_-]`, starting with a letter or digit. Tenants
/// are isolation boundaries: every card query is scoped by one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// A tenant id that breaks the rules of [`TenantId`].
#[derive(Debug, thiserror::Error)]
#[error(
    "tenant id must be 1 to 64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
)]
pub struct InvalidTenantId;

impl TenantId {
    /// Validates a tenant id.
    pub fn parse(id: &str) -> Result<TenantId, InvalidTenantId> {
        let ok_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        let first_ok = id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if first_ok && id.len() <= 64 && id.chars().all(ok_char) {
            Ok(TenantId(id.to_owned()))
        } else {
            Err(InvalidTenantId)
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_follow_the_documented_alphabet() {
        for ok in ["dev", "acme-eu_1", "0shop", &"a".repeat(64)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-dev", "Dev", "a b", "é", &"a".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }
}
