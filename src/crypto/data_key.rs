//! Data-encryption keys, their ids, wrapping contexts and the in-memory cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use zeroize::ZeroizeOnDrop;

use super::aad::AadBuilder;
use super::secret::{KEY_LEN, Key32};
use super::{CryptoError, fill_random};

/// A 256-bit data-encryption key. Zeroized on drop; Debug prints nothing secret.
pub struct DataKey(Key32);

impl DataKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<DataKey, CryptoError> {
        Key32::random().map(DataKey)
    }

    /// A key from exactly 32 bytes (e.g. just unwrapped by a KEK).
    pub fn from_bytes(bytes: &[u8]) -> Result<DataKey, CryptoError> {
        Key32::from_slice(bytes, "data key must be 32 bytes").map(DataKey)
    }

    /// The raw key bytes, for wrapping by a KEK. Handle with care: never log or store them.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.expose()
    }
}

impl ZeroizeOnDrop for DataKey {}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey").finish_non_exhaustive()
    }
}

/// The id of a data key: a random (v4) UUID, stored in clear in every record it seals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DekId(pub uuid::Uuid);

impl DekId {
    /// A fresh id from the OS CSPRNG.
    pub fn generate() -> Result<DekId, CryptoError> {
        let mut bytes = [0u8; 16];
        fill_random(&mut bytes)?;
        Ok(DekId(uuid::Builder::from_random_bytes(bytes).into_uuid()))
    }

    /// The 16 bytes of the UUID, as written into record headers.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl std::fmt::Display for DekId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// AAD used when a KEK wraps a DEK: binds the DEK id and tenant (the provider binds its KEK
/// version).
pub fn dek_wrap_aad(dek_id: DekId, tenant: &str) -> Vec<u8> {
    AadBuilder::new("cardvault.dek")
        .field(dek_id.as_bytes())
        .field(tenant.as_bytes())
        .finish()
}

/// AAD used when a KEK wraps a tenant secret.
pub fn tenant_secret_wrap_aad(tenant: &str) -> Vec<u8> {
    AadBuilder::new("cardvault.tenant-secret")
        .field(tenant.as_bytes())
        .finish()
}

/// Counter of DEK cache lookups that found their key.
pub const DEK_CACHE_HITS: &str = "cardvault_dek_cache_hits_total";
/// Counter of DEK cache lookups that did not (the DEK is then unwrapped by the key provider).
pub const DEK_CACHE_MISSES: &str = "cardvault_dek_cache_misses_total";
/// Counter of keys pushed out of the DEK cache by its capacity (not removals of destroyed
/// DEKs): a steady rate means the cache is too small for the working set.
pub const DEK_CACHE_EVICTIONS: &str = "cardvault_dek_cache_evictions_total";

/// Bounded LRU cache of unwrapped DEKs, each cached under its id and the tenant it belongs
/// to: a lookup names both, so a DEK id of one tenant never yields a key to another, cached
/// or not (the miss path reads the DEK row by tenant and id).
///
/// Evicted keys are zeroized when the last `Arc` to them drops. Thread-safe: one short
/// `std::sync::Mutex` section per call, never held across an `.await`. A capacity of 0
/// disables caching (`insert` still hands back the key).
pub struct DekCache {
    capacity: usize,
    inner: Mutex<LruState>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct LruState {
    /// Monotonic use counter; the entry with the smallest stamp is the least recently used.
    clock: u64,
    entries: HashMap<DekId, Entry>,
    by_recency: BTreeMap<u64, DekId>,
}

/// A cached key, the tenant it belongs to, and its last use.
struct Entry {
    key: Arc<DataKey>,
    tenant: Box<str>,
    stamp: u64,
}

impl LruState {
    fn touch(&mut self, tenant: &str, id: &DekId) -> Option<Arc<DataKey>> {
        self.clock += 1;
        let clock = self.clock;
        let Entry {
            key,
            tenant: owner,
            stamp,
        } = self.entries.get_mut(id)?;
        if **owner != *tenant {
            return None;
        }
        self.by_recency.remove(stamp);
        *stamp = clock;
        self.by_recency.insert(clock, *id);
        Some(Arc::clone(key))
    }
}

impl DekCache {
    /// A cache holding at most `capacity` keys. Its counters are exported from 0, so a
    /// hit ratio is defined before the first miss.
    pub fn new(capacity: usize) -> DekCache {
        for counter in [DEK_CACHE_HITS, DEK_CACHE_MISSES, DEK_CACHE_EVICTIONS] {
            metrics::counter!(counter).increment(0);
        }
        DekCache {
            capacity,
            inner: Mutex::new(LruState::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LruState> {
        // No code path panics while holding the lock, so a poisoned state is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key for `id` if it is cached for `tenant` (marking it most recently used); counts
    /// a hit or a miss. A key cached for another tenant is a miss.
    pub fn get(&self, tenant: &str, id: &DekId) -> Option<Arc<DataKey>> {
        let found = self.state().touch(tenant, id);
        let (counter, metric) = if found.is_some() {
            (&self.hits, DEK_CACHE_HITS)
        } else {
            (&self.misses, DEK_CACHE_MISSES)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric).increment(1);
        found
    }

    /// Caches `key` under `id` for `tenant` (replacing any previous key for `id`), evicting
    /// the least recently used keys beyond capacity, and returns the shared key.
    pub fn insert(&self, tenant: &str, id: DekId, key: DataKey) -> Arc<DataKey> {
        let key = Arc::new(key);
        if self.capacity == 0 {
            return key;
        }
        let evicted = {
            let mut state = self.state();
            state.clock += 1;
            let clock = state.clock;
            let entry = Entry {
                key: Arc::clone(&key),
                tenant: tenant.into(),
                stamp: clock,
            };
            if let Some(old) = state.entries.insert(id, entry) {
                state.by_recency.remove(&old.stamp);
            }
            state.by_recency.insert(clock, id);
            let mut evicted = Vec::new();
            while state.entries.len() > self.capacity {
                let Some((_, oldest)) = state.by_recency.pop_first() else {
                    break;
                };
                if let Some(old) = state.entries.remove(&oldest) {
                    evicted.push(old.key);
                }
            }
            evicted
        };
        if !evicted.is_empty() {
            metrics::counter!(DEK_CACHE_EVICTIONS).increment(evicted.len() as u64);
        }
        // Evicted keys drop (and zeroize, if no one else holds them) outside the lock.
        drop(evicted);
        key
    }

    /// Forgets the key for `id` (e.g. when the DEK is destroyed); returns whether it was cached.
    pub fn remove(&self, id: &DekId) -> bool {
        let removed = {
            let mut state = self.state();
            let removed = state.entries.remove(id);
            if let Some(entry) = &removed {
                state.by_recency.remove(&entry.stamp);
            }
            removed
        };
        removed.is_some()
    }

    /// Forgets every key.
    pub fn clear(&self) {
        let old = std::mem::take(&mut *self.state());
        drop(old);
    }

    /// How many keys are cached.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many `get` calls found their key.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// How many `get` calls did not find their key.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for DekCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<DekId> {
        (0..n).map(|_| DekId::generate().unwrap()).collect()
    }

    fn key() -> DataKey {
        DataKey::generate().unwrap()
    }

    #[test]
    fn data_key_from_bytes_requires_exactly_32_bytes() {
        assert!(DataKey::from_bytes(&[1u8; 31]).is_err());
        assert!(DataKey::from_bytes(&[1u8; 33]).is_err());
        assert!(DataKey::from_bytes(&[]).is_err());
        let key = DataKey::from_bytes(&[9u8; 32]).unwrap();
        assert_eq!(key.expose_bytes(), &[9u8; 32]);
    }

    #[test]
    fn generated_data_keys_differ() {
        assert_ne!(key().expose_bytes(), key().expose_bytes());
    }

    #[test]
    fn dek_ids_are_random_v4_uuids() {
        let id = DekId::generate().unwrap();
        assert_eq!(id.0.get_version_num(), 4);
        assert_ne!(id, DekId::generate().unwrap());
        assert_eq!(id.as_bytes(), id.0.as_bytes());
    }

    #[test]
    fn data_key_debug_prints_no_key_bytes() {
        let key = DataKey::from_bytes(&[0xab; 32]).unwrap();
        let debug = format!("{key:?}");
        assert_eq!(debug, "DataKey { .. }");
        assert!(!debug.contains("ab"));
        assert!(!debug.contains("171"));
    }

    #[test]
    fn wrap_aads_bind_dek_id_and_tenant_and_differ_by_purpose() {
        let [a, b] = [DekId::generate().unwrap(), DekId::generate().unwrap()];
        assert_ne!(dek_wrap_aad(a, "t"), dek_wrap_aad(b, "t"));
        assert_ne!(dek_wrap_aad(a, "t"), dek_wrap_aad(a, "u"));
        assert_eq!(dek_wrap_aad(a, "t"), dek_wrap_aad(a, "t"));
        assert_ne!(tenant_secret_wrap_aad("t"), tenant_secret_wrap_aad("u"));
        assert_ne!(dek_wrap_aad(a, "t"), tenant_secret_wrap_aad("t"));
    }

    #[test]
    fn cache_never_holds_more_than_its_capacity() {
        let cache = DekCache::new(3);
        for id in ids(10) {
            cache.insert("t", id, key());
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn cache_evicts_the_least_recently_used_key() {
        let cache = DekCache::new(2);
        let [a, b, c] = ids(3).try_into().unwrap();
        cache.insert("t", a, key());
        cache.insert("t", b, key());
        assert!(cache.get("t", &a).is_some()); // a is now more recent than b
        cache.insert("t", c, key());
        assert!(cache.get("t", &b).is_none());
        assert!(cache.get("t", &a).is_some());
        assert!(cache.get("t", &c).is_some());
    }

    #[test]
    fn cache_counts_hits_and_misses() {
        let cache = DekCache::new(4);
        let [a, b] = ids(2).try_into().unwrap();
        assert!(cache.get("t", &a).is_none());
        cache.insert("t", a, key());
        assert!(cache.get("t", &a).is_some());
        assert!(cache.get("t", &a).is_some());
        assert!(cache.get("t", &b).is_none());
        assert_eq!((cache.hits(), cache.misses()), (2, 2));
    }

    #[test]
    fn cache_returns_the_inserted_key() {
        let cache = DekCache::new(1);
        let id = DekId::generate().unwrap();
        let inserted = cache.insert("t", id, DataKey::from_bytes(&[5; 32]).unwrap());
        let got = cache.get("t", &id).unwrap();
        assert!(Arc::ptr_eq(&inserted, &got));
        assert_eq!(got.expose_bytes(), &[5; 32]);
    }

    #[test]
    fn reinserting_an_id_replaces_the_key_without_growing() {
        let cache = DekCache::new(2);
        let id = DekId::generate().unwrap();
        cache.insert("t", id, DataKey::from_bytes(&[1; 32]).unwrap());
        cache.insert("t", id, DataKey::from_bytes(&[2; 32]).unwrap());
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("t", &id).unwrap().expose_bytes(), &[2; 32]);
    }

    #[test]
    fn a_key_cached_for_one_tenant_is_a_miss_for_another() {
        let cache = DekCache::new(4);
        let id = DekId::generate().unwrap();
        cache.insert("a", id, key());
        assert!(cache.get("b", &id).is_none());
        assert!(cache.get("a", &id).is_some());
        assert_eq!((cache.hits(), cache.misses()), (1, 1));
    }

    #[test]
    fn evicted_keys_stay_usable_by_holders_until_dropped() {
        let cache = DekCache::new(1);
        let [a, b] = ids(2).try_into().unwrap();
        let held = cache.insert("t", a, DataKey::from_bytes(&[3; 32]).unwrap());
        cache.insert("t", b, key());
        assert!(cache.get("t", &a).is_none());
        assert_eq!(Arc::strong_count(&held), 1);
        assert_eq!(held.expose_bytes(), &[3; 32]);
    }

    #[test]
    fn zero_capacity_cache_stores_nothing() {
        let cache = DekCache::new(0);
        let id = DekId::generate().unwrap();
        let _key = cache.insert("t", id, key());
        assert!(cache.is_empty());
        assert!(cache.get("t", &id).is_none());
    }

    #[test]
    fn removed_and_cleared_keys_are_gone() {
        let cache = DekCache::new(4);
        let [a, b] = ids(2).try_into().unwrap();
        cache.insert("t", a, key());
        cache.insert("t", b, key());
        assert!(cache.remove(&a));
        assert!(!cache.remove(&a));
        assert_eq!(cache.len(), 1);
        cache.clear();
        assert!(cache.is_empty());
        assert!(cache.get("t", &b).is_none());
    }

    #[test]
    fn cache_is_shared_safely_across_threads() {
        let cache = Arc::new(DekCache::new(8));
        let all = ids(32);
        std::thread::scope(|scope| {
            for chunk in all.chunks(8) {
                let cache = Arc::clone(&cache);
                scope.spawn(move || {
                    for id in chunk {
                        cache.insert("t", *id, key());
                        let _ = cache.get("t", id);
                    }
                });
            }
        });
        assert_eq!(cache.len(), 8);
        assert_eq!(cache.hits() + cache.misses(), 32);
    }
}
