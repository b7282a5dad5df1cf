//! Keys, envelope encryption and fingerprints.
//!
//! This layer knows nothing about cards or SQL: plaintexts are bytes, tenants and tokens are
//! `&str`. Everything that touches key material lives here, behind a small interface, so the
//! vault can swap key providers (local keyring, HSM, cloud KMS) without changing.
//!
//! # Key hierarchy
//!
//! ```text
//! KEK (key-encryption key, versioned, held by a KeyProvider; never leaves an HSM)
//!  ├── wraps ─▶ DEK (DataKey, 256-bit, random, one active per tenant, identified by DekId)
//!  │             └── seals ─▶ records (AES-256-GCM, random 96-bit nonce,
//!  │                          AAD = format version, tenant, token, DEK id)
//!  └── wraps ─▶ tenant secret (TenantSecret, 256-bit, random, one per tenant)
//!                └── HKDF-SHA256 ─▶ fingerprint key (FingerprintKey, HMAC-SHA256)
//!                                    └── fingerprints (dedup, stable card id; never
//!                                        comparable across tenants)
//! ```
//!
//! * A **KEK** is held by a [`KeyProvider`]. The [`LocalKeyring`] keeps versioned KEKs in a
//!   mode-0600 TOML file; the [`Pkcs11Provider`] keeps them inside an HSM (tested against
//!   SoftHSM2); cloud KMSs could follow. The provider binds its KEK
//!   version into every wrapping, so a wrapped key names the KEK that opens it.
//! * A **DEK** ([`DataKey`]) exists in clear only in memory: it is stored wrapped by a KEK
//!   with [`dek_wrap_aad`] binding the DEK id and tenant, and unwrapped copies live in the
//!   bounded, zeroizing [`DekCache`].
//! * A **record** is sealed by [`seal_record`] into a self-describing blob
//!   (`[format][dek id][nonce][ciphertext‖tag]`): [`record_dek_id`] tells which DEK opens it
//!   without decrypting, and [`open_record`] fails if the blob is moved to another token or
//!   tenant, or if its header is altered.
//! * A **tenant secret** ([`TenantSecret`]) is stored wrapped by a KEK with
//!   [`tenant_secret_wrap_aad`]; the per-tenant [`FingerprintKey`] is derived from it with
//!   HKDF-SHA256 and never stored.
//!
//! * The **audit key** ([`AuditKey`]) MACs the audit chains; it is stored wrapped by a KEK
//!   with [`audit_key_wrap_aad`] binding the number of chains. The **anchor key**
//!   ([`AnchorKey`], HKDF-SHA256 of the audit key) MACs the chain-head anchors exported out of
//!   the database.
//! * **API keys** ([`ApiKey`]) are bearer credentials stored only as SHA-256 hashes.
//!
//! # Hygiene
//!
//! Randomness comes only from `ring::rand::SystemRandom` ([`fill_random`]); HMAC, HKDF and
//! SHA-256 from `ring`; AES-256-GCM from `aes-gcm`. Key types zeroize on drop, and their
//! `Debug` prints ids and versions only. Errors never carry key bytes or plaintexts. Every
//! stored blob is parsed strictly: lengths are checked before slicing, unknown format
//! versions are errors, and no input makes the parsers panic.

mod aad;
mod aead;
mod api_key;
mod audit_key;
mod data_key;
mod error;
mod fingerprint;
pub(crate) mod hex;
mod local;
mod observed;
mod pkcs11;
mod provider;
mod random;
mod secret;
mod wrap_format;

pub use self::aead::{RECORD_FORMAT_V1, open_record, record_dek_id, seal_record};
pub use self::api_key::{ApiKey, random_base62};
pub use self::audit_key::{AUDIT_MAC_LEN, AnchorKey, AuditKey, audit_key_wrap_aad};
pub use self::data_key::{DataKey, DekCache, DekId, dek_wrap_aad, tenant_secret_wrap_aad};
pub use self::error::CryptoError;
pub use self::fingerprint::{Fingerprint, FingerprintKey, TenantSecret};
pub use self::local::{LOCAL_WRAP_FORMAT_V1, LocalKeyring};
pub use self::observed::ObservedProvider;
pub use self::pkcs11::{
    DEFAULT_KEY_LABEL, PKCS11_WRAP_FORMAT_V1, PinSource, Pkcs11Config, Pkcs11Provider,
};
pub use self::provider::{KekVersion, KeyProvider, WrappedKey};
pub use self::random::{fill_random, system_random};
