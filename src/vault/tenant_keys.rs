//! Per-tenant key state: the glue between the key provider (crypto) and the rows that hold
//! wrapped keys (store). Tenants and their first data key are created on first use; when
//! several replicas race, the database's unique indexes pick one winner and the losers read
//! it back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Instant,
};

use time::OffsetDateTime;

use super::{TenantId, VaultError};
use crate::{
    crypto::{
        DataKey, DekCache, DekId, FingerprintKey, KekVersion, KeyProvider, TenantSecret,
        WrappedKey, dek_wrap_aad, tenant_secret_wrap_aad,
    },
    store::{DekRow, Store, TenantRow},
};

/// How data keys are used up and replaced (a new DEK after a number of
/// encryptions or an age, well under AES-GCM's 2^32 random-nonce limit).
#[derive(Debug, Clone)]
pub struct DekPolicy {
    /// Encryptions under one DEK before a new one takes over.
    pub max_encryptions: u64,
    /// Age after which a new DEK takes over.
    pub max_age: std::time::Duration,
    /// How long a replica may seal under a DEK before it checks again that the DEK is still
    /// active. Bounds how long replicas keep using a DEK another replica retired.
    pub reservation: std::time::Duration,
    /// Encryptions reserved from the database at a time.
    pub reserve_block: u64,
}

impl Default for DekPolicy {
    fn default() -> Self {
        DekPolicy {
            // 2^32 random 96-bit nonces give a collision chance of 2^-32 (NIST SP 800-38D
            // §8.3); 100 million keeps it below 2^-40.
            max_encryptions: 100_000_000,
            max_age: std::time::Duration::from_secs(90 * 24 * 3600),
            reservation: std::time::Duration::from_secs(30),
            reserve_block: 1024,
        }
    }
}

/// A tenant's unwrapped key state.
pub(crate) struct TenantKeys {
    /// Keyed fingerprints of PANs.
    pub fingerprint: FingerprintKey,
    /// The DEK new records are sealed with, and how many more encryptions this replica has
    /// reserved under it.
    active: Mutex<Budget>,
    /// One refill (a reservation or a rotation) at a time per tenant.
    refill: tokio::sync::Mutex<()>,
}

/// Encryptions this replica may still perform under a DEK.
#[derive(Debug, Clone, Copy)]
struct Budget {
    dek: DekId,
    /// When the DEK reaches its maximum age.
    retires_at: OffsetDateTime,
    /// Encryptions reserved and not used yet.
    remaining: u64,
    /// When the reservation must be renewed (checking the DEK is still active).
    valid_until: Instant,
}

impl Budget {
    fn take(&mut self, count: u64, now: Instant) -> Option<DekId> {
        if self.remaining >= count && now < self.valid_until {
            self.remaining -= count;
            Some(self.dek)
        } else {
            None
        }
    }
}

impl TenantKeys {
    fn budget(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Loads, creates and caches tenant keys and data keys.
pub(crate) struct KeyManager {
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn Store>,
    deks: DekCache,
    tenants: RwLock<HashMap<TenantId, Arc<TenantKeys>>>,
    policy: DekPolicy,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("provider", &self.provider.name())
            .field("cached_deks", &self.deks.len())
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    pub fn new(
        provider: Arc<dyn KeyProvider>,
        store: Arc<dyn Store>,
        cache_size: usize,
        policy: DekPolicy,
    ) -> Self {
        Self {
            provider,
            store,
            deks: DekCache::new(cache_size),
            tenants: RwLock::new(HashMap::new()),
            policy,
        }
    }

    /// The key provider.
    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    /// The DEK policy.
    pub fn policy(&self) -> &DekPolicy {
        &self.policy
    }

    /// The tenant's keys, loading or creating them on first use.
    pub async fn tenant(&self, tenant: &TenantId) -> Result<Arc<TenantKeys>, VaultError> {
        if let Some(keys) = self.cached_tenant(tenant) {
            return Ok(keys);
        }
        let fingerprint = self.fingerprint_key(tenant).await?;
        let row = self.active_dek_row(tenant).await?;
        let keys = Arc::new(TenantKeys {
            fingerprint,
            // Nothing reserved yet: the first encryption reserves a block.
            active: Mutex::new(self.budget_of(&row, 0)),
            refill: tokio::sync::Mutex::new(()),
        });
        let mut tenants = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(tenants.entry(tenant.clone()).or_insert(keys).clone())
    }

    fn cached_tenant(&self, tenant: &TenantId) -> Option<Arc<TenantKeys>> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    /// Forgets a tenant's cached keys and every cached DEK in `deks` (after a shred).
    pub fn forget_tenant(&self, tenant: &TenantId, deks: &[DekId]) {
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(tenant);
        for id in deks {
            self.deks.remove(id);
        }
    }

    /// Forgets one cached DEK (it was destroyed).
    pub fn forget_dek(&self, id: DekId) {
        self.deks.remove(&id);
    }

    fn budget_of(&self, row: &DekRow, remaining: u64) -> Budget {
        let max_age = time::Duration::try_from(self.policy.max_age).unwrap_or(time::Duration::MAX);
        Budget {
            dek: DekId(row.id),
            retires_at: row.created_at.saturating_add(max_age),
            remaining,
            valid_until: Instant::now() + self.policy.reservation,
        }
    }

    /// The DEK to seal `count` new records with, and the key itself: counts the encryptions
    /// against the DEK's limit, reserving more from the database (or rotating to a new DEK
    /// when this one is used up or too old) when this replica's reservation runs out.
    pub async fn encryptions(
        &self,
        tenant: &TenantId,
        keys: &TenantKeys,
        count: u64,
    ) -> Result<(DekId, Arc<DataKey>), VaultError> {
        let taken = keys.budget().take(count, Instant::now());
        let id = match taken {
            Some(id) => id,
            None => self.refill(tenant, keys, count).await?,
        };
        Ok((id, self.dek(tenant, id).await?))
    }

    async fn refill(
        &self,
        tenant: &TenantId,
        keys: &TenantKeys,
        count: u64,
    ) -> Result<DekId, VaultError> {
        let _one_at_a_time = keys.refill.lock().await;
        // Another caller may have refilled while this one waited.
        if let Some(id) = keys.budget().take(count, Instant::now()) {
            return Ok(id);
        }
        if count > self.policy.max_encryptions {
            return Err(VaultError::Precondition(format!(
                "{count} records at once exceed keys.dek_max_encryptions ({})",
                self.policy.max_encryptions
            )));
        }
        let block = count
            .max(self.policy.reserve_block)
            .min(self.policy.max_encryptions);
        let mut current = *keys.budget();
        // A few rounds at most: each either reserves, or moves to a newer DEK.
        for _ in 0..8 {
            let now = OffsetDateTime::now_utc();
            if now < current.retires_at {
                let reserved = self
                    .store
                    .reserve_encryptions(current.dek.0, block, self.policy.max_encryptions)
                    .await?;
                if reserved.is_some() {
                    let mut budget = keys.budget();
                    *budget = Budget {
                        remaining: block - count,
                        valid_until: Instant::now() + self.policy.reservation,
                        ..current
                    };
                    return Ok(budget.dek);
                }
            }
            // Used up, too old, or retired by another replica: move to the tenant's active
            // DEK, making a new one if the active one is this very DEK.
            let active = self.store.active_dek(tenant.as_str()).await?;
            let next = match active {
                Some(row) if row.id != current.dek.0 => row,
                _ => self.rotate(tenant, Some(current.dek)).await?,
            };
            current = self.budget_of(&next, 0);
            *keys.budget() = current;
        }
        Err(VaultError::internal(
            "could not reserve encryptions under any data key",
            "rotation kept racing",
        ))
    }

    /// Makes a new DEK the tenant's active one, retiring `old` (or expecting none). When
    /// another replica rotated first, returns its active DEK instead.
    pub async fn rotate(
        &self,
        tenant: &TenantId,
        old: Option<DekId>,
    ) -> Result<DekRow, VaultError> {
        let (row, key) = self.new_dek(tenant).await?;
        if self
            .store
            .rotate_dek(
                tenant.as_str(),
                old.map(|id| id.0),
                &row,
                OffsetDateTime::now_utc(),
            )
            .await?
        {
            tracing::info!(tenant = %tenant, dek_id = %row.id, "new active data key");
            metrics::counter!("cardvault_dek_rotations_total").increment(1);
            self.deks.insert(tenant.as_str(), DekId(row.id), key);
            return Ok(row);
        }
        if let Some(active) = self.store.active_dek(tenant.as_str()).await? {
            return Ok(active);
        }
        // No rotation won: the tenant was shredded under this replica's cached keys.
        match self.store.tenant(tenant.as_str()).await? {
            Some(row) if row.shredded_at.is_some() => {
                self.forget_tenant(tenant, &old.into_iter().collect::<Vec<_>>());
                Err(shredded(tenant))
            }
            _ => Err(VaultError::internal(
                "no active DEK after a lost rotation race",
                "race",
            )),
        }
    }

    /// Rotates the tenant's DEK now (an operator asked), and makes this replica use the new
    /// one at once.
    pub async fn rotate_now(&self, tenant: &TenantId) -> Result<DekRow, VaultError> {
        let keys = self.tenant(tenant).await?;
        let _one_at_a_time = keys.refill.lock().await;
        let old = keys.budget().dek;
        let row = self.rotate(tenant, Some(old)).await?;
        *keys.budget() = self.budget_of(&row, 0);
        Ok(row)
    }

    /// A new tenant's row: a fresh tenant secret wrapped by the primary KEK.
    pub async fn new_tenant_row(&self, tenant: &TenantId) -> Result<TenantRow, VaultError> {
        let secret = TenantSecret::generate()
            .map_err(|e| VaultError::internal("failed to generate a tenant secret", e))?;
        let wrapped = self
            .provider
            .wrap(
                secret.expose_bytes(),
                &tenant_secret_wrap_aad(tenant.as_str()),
            )
            .await
            .map_err(|e| VaultError::internal("failed to wrap a tenant secret", e))?;
        Ok(TenantRow {
            id: tenant.as_str().to_owned(),
            wrapped_secret: wrapped.bytes,
            secret_kek_version: wrapped.kek_version.0,
            created_at: OffsetDateTime::now_utc(),
            shredded_at: None,
        })
    }

    async fn fingerprint_key(&self, tenant: &TenantId) -> Result<FingerprintKey, VaultError> {
        let aad = tenant_secret_wrap_aad(tenant.as_str());
        let row = match self.store.tenant(tenant.as_str()).await? {
            Some(row) => row,
            None => {
                let row = self.new_tenant_row(tenant).await?;
                if self.store.insert_tenant(&row).await? {
                    tracing::info!(tenant = %tenant, "created tenant key material");
                    row
                } else {
                    // Another replica created it first: use theirs.
                    self.store.tenant(tenant.as_str()).await?.ok_or_else(|| {
                        VaultError::internal("tenant vanished while being created", "race")
                    })?
                }
            }
        };
        if row.shredded_at.is_some() {
            return Err(shredded(tenant));
        }
        let wrapped = WrappedKey {
            kek_version: KekVersion(row.secret_kek_version),
            bytes: row.wrapped_secret,
        };
        let bytes = self
            .provider
            .unwrap(&wrapped, &aad)
            .await
            .map_err(|e| VaultError::internal("failed to unwrap a tenant secret", e))?;
        let secret = TenantSecret::from_bytes(&bytes)
            .map_err(|e| VaultError::internal("tenant secret has the wrong size", e))?;
        Ok(secret.fingerprint_key(tenant.as_str()))
    }

    /// The tenant's active DEK row, creating the first one.
    async fn active_dek_row(&self, tenant: &TenantId) -> Result<DekRow, VaultError> {
        if let Some(row) = self.store.active_dek(tenant.as_str()).await? {
            return Ok(row);
        }
        self.rotate(tenant, None).await
    }

    /// A fresh DEK wrapped by the primary KEK: its row (active) and the key.
    async fn new_dek(&self, tenant: &TenantId) -> Result<(DekRow, DataKey), VaultError> {
        let id =
            DekId::generate().map_err(|e| VaultError::internal("failed to draw a DEK id", e))?;
        let key =
            DataKey::generate().map_err(|e| VaultError::internal("failed to generate a DEK", e))?;
        let wrapped = self
            .provider
            .wrap(key.expose_bytes(), &dek_wrap_aad(id, tenant.as_str()))
            .await
            .map_err(|e| VaultError::internal("failed to wrap a DEK", e))?;
        let row = DekRow {
            id: id.0,
            tenant_id: tenant.as_str().to_owned(),
            kek_version: wrapped.kek_version.0,
            wrapped_key: wrapped.bytes,
            active: true,
            created_at: OffsetDateTime::now_utc(),
            reserved: 0,
            retired_at: None,
        };
        Ok((row, key))
    }

    /// An unwrapped DEK of this tenant, from the cache or unwrapped by the key provider. Both
    /// paths check the tenant: the cache holds each key for its own tenant only, and the
    /// DEK row is read by tenant and id.
    pub async fn dek(&self, tenant: &TenantId, id: DekId) -> Result<Arc<DataKey>, VaultError> {
        if let Some(key) = self.deks.get(tenant.as_str(), &id) {
            return Ok(key);
        }
        let row = self
            .store
            .dek(tenant.as_str(), id.0)
            .await?
            .ok_or_else(|| VaultError::internal("a card refers to a missing DEK", "no row"))?;
        let wrapped = WrappedKey {
            kek_version: KekVersion(row.kek_version),
            bytes: row.wrapped_key,
        };
        let bytes = self
            .provider
            .unwrap(&wrapped, &dek_wrap_aad(id, tenant.as_str()))
            .await
            .map_err(|e| VaultError::internal("failed to unwrap a DEK", e))?;
        let key = DataKey::from_bytes(&bytes)
            .map_err(|e| VaultError::internal("unwrapped DEK has the wrong size", e))?;
        Ok(self.deks.insert(tenant.as_str(), id, key))
    }
}

/// The refusal for a crypto-shredded tenant.
fn shredded(tenant: &TenantId) -> VaultError {
    VaultError::Precondition(format!(
        "tenant {tenant} was crypto-shredded; its keys are gone and it takes no new cards"
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        crypto::LocalKeyring,
        store::{self, StoreOptions},
    };

    /// A key manager over a fresh SQLite file and an ephemeral keyring.
    async fn manager(policy: DekPolicy) -> (tempfile::TempDir, KeyManager) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("keys.db").display());
        let store = store::connect(&url, &StoreOptions::default())
            .await
            .expect("open store");
        store.migrate().await.expect("migrate");
        let provider = Arc::new(LocalKeyring::ephemeral().expect("keyring"));
        (dir, KeyManager::new(provider, store, 16, policy))
    }

    fn tenant() -> TenantId {
        TenantId::parse("t").expect("tenant")
    }

    async fn seal_one(keys: &KeyManager) -> DekId {
        let tenant = tenant();
        let tenant_keys = keys.tenant(&tenant).await.expect("tenant keys");
        keys.encryptions(&tenant, &tenant_keys, 1)
            .await
            .expect("encryption")
            .0
    }

    #[tokio::test]
    async fn a_dek_is_replaced_after_its_encryption_limit_and_never_over_reserved() {
        let (_dir, keys) = manager(DekPolicy {
            max_encryptions: 4,
            reserve_block: 3,
            ..DekPolicy::default()
        })
        .await;
        let mut used = Vec::new();
        for _ in 0..10 {
            used.push(seal_one(&keys).await);
        }
        let mut per_dek: HashMap<DekId, usize> = HashMap::new();
        for id in &used {
            *per_dek.entry(*id).or_default() += 1;
        }
        assert!(per_dek.values().all(|&n| n <= 4), "{per_dek:?}");
        assert!(
            per_dek.len() >= 3,
            "10 encryptions at 4 per DEK: {per_dek:?}"
        );
        let deks = keys.store.dek_usage(Some("t")).await.expect("usage");
        assert_eq!(deks.iter().filter(|d| d.dek.active).count(), 1);
        assert!(deks.iter().all(|d| d.dek.reserved <= 4), "{deks:?}");
        // A request larger than the limit can never be served by one DEK.
        let tenant_keys = keys.tenant(&tenant()).await.expect("tenant keys");
        assert!(matches!(
            keys.encryptions(&tenant(), &tenant_keys, 5).await,
            Err(VaultError::Precondition(_))
        ));
    }

    #[tokio::test]
    async fn a_cached_dek_of_one_tenant_opens_nothing_for_another() {
        let (_dir, keys) = manager(DekPolicy::default()).await;
        let owner = tenant();
        let other = TenantId::parse("u").expect("tenant");
        keys.tenant(&other).await.expect("the other tenant's keys");
        // Sealing a record caches the owner's DEK.
        let id = seal_one(&keys).await;
        assert!(keys.dek(&owner, id).await.is_ok());
        // The same id asked for under another tenant is refused, though the key is cached.
        let refused = keys.dek(&other, id).await;
        assert!(
            matches!(refused, Err(VaultError::Internal { .. })),
            "another tenant got tenant t's data key: {:?}",
            refused.map(|_| "a key")
        );
        // And the refusal did not evict or replace the owner's cached key.
        assert!(keys.dek(&owner, id).await.is_ok());
    }

    #[tokio::test]
    async fn a_dek_is_replaced_once_it_reaches_its_maximum_age() {
        let (_dir, keys) = manager(DekPolicy {
            max_age: Duration::from_millis(300),
            reservation: Duration::from_millis(100),
            ..DekPolicy::default()
        })
        .await;
        let first = seal_one(&keys).await;
        assert_eq!(seal_one(&keys).await, first);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let second = seal_one(&keys).await;
        assert_ne!(second, first, "a DEK older than max_age kept sealing");
        let retired = keys.store.retired_deks(Some("t")).await.expect("retired");
        assert_eq!(retired.len(), 1);
        assert_eq!(DekId(retired[0].id), first);
    }

    #[tokio::test]
    async fn a_replica_moves_to_a_dek_another_replica_rotated_in_within_its_reservation() {
        let (_dir, keys) = manager(DekPolicy {
            reservation: Duration::from_millis(100),
            ..DekPolicy::default()
        })
        .await;
        let other = KeyManager::new(
            keys.provider.clone(),
            keys.store.clone(),
            16,
            keys.policy.clone(),
        );
        let first = seal_one(&keys).await;
        let rotated = other.rotate_now(&tenant()).await.expect("rotate");
        // Within its reservation this replica still seals under the DEK it reserved…
        assert_eq!(seal_one(&keys).await, first);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // …and once the reservation lapses, under the one the other replica made.
        assert_eq!(seal_one(&keys).await, DekId(rotated.id));
    }
}
