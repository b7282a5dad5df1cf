//! Per-tenant key state: the glue between the key provider (crypto) and the rows that hold
//! wrapped keys (store). Tenants and their first data key are created on first use; when
//! several replicas race, the database's unique indexes pick one winner and the losers read
//! it back.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
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

/// A tenant's unwrapped key state.
pub(crate) struct TenantKeys {
    /// Keyed fingerprints of PANs.
    pub fingerprint: FingerprintKey,
    /// The DEK new records are sealed with.
    pub active_dek: DekId,
}

/// Loads, creates and caches tenant keys and data keys.
pub(crate) struct KeyManager {
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn Store>,
    deks: DekCache,
    tenants: RwLock<HashMap<TenantId, Arc<TenantKeys>>>,
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
    pub fn new(provider: Arc<dyn KeyProvider>, store: Arc<dyn Store>, cache_size: usize) -> Self {
        Self {
            provider,
            store,
            deks: DekCache::new(cache_size),
            tenants: RwLock::new(HashMap::new()),
        }
    }

    /// The key provider.
    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    /// The tenant's keys, loading or creating them on first use.
    pub async fn tenant(&self, tenant: &TenantId) -> Result<Arc<TenantKeys>, VaultError> {
        if let Some(keys) = self.cached_tenant(tenant) {
            return Ok(keys);
        }
        let fingerprint = self.fingerprint_key(tenant).await?;
        let active_dek = self.active_dek_id(tenant).await?;
        let keys = Arc::new(TenantKeys {
            fingerprint,
            active_dek,
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

    async fn active_dek_id(&self, tenant: &TenantId) -> Result<DekId, VaultError> {
        if let Some(row) = self.store.active_dek(tenant.as_str()).await? {
            return Ok(DekId(row.id));
        }
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
        };
        if self.store.insert_active_dek(&row).await? {
            tracing::info!(tenant = %tenant, dek_id = %id.0, "created data key");
            self.deks.insert(id, key);
            return Ok(id);
        }
        let row = self
            .store
            .active_dek(tenant.as_str())
            .await?
            .ok_or_else(|| {
                VaultError::internal("active DEK vanished while being created", "race")
            })?;
        Ok(DekId(row.id))
    }

    /// An unwrapped DEK of this tenant, from the cache or unwrapped by the key provider.
    pub async fn dek(&self, tenant: &TenantId, id: DekId) -> Result<Arc<DataKey>, VaultError> {
        if let Some(key) = self.deks.get(&id) {
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
        Ok(self.deks.insert(id, key))
    }
}
