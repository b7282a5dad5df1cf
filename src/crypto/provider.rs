//! The key-provider interface: whatever holds the KEKs.

use zeroize::Zeroizing;

use super::CryptoError;

/// The version of a key-encryption key. Versions start at 1 and only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekVersion(pub u32);

impl std::fmt::Display for KekVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A key wrapped by a KEK; `bytes` is provider-specific and self-describing.
///
/// Not secret: only a provider holding `kek_version` can unwrap it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The KEK version that wrapped (and can unwrap) this key.
    pub kek_version: KekVersion,
    /// The provider's wrapped encoding.
    pub bytes: Vec<u8>,
}

/// Holds KEKs; wraps and unwraps data keys and secrets.
///
/// Async and object-safe (use it as `Arc<dyn KeyProvider>`) because HSMs and cloud KMSs are
/// remote or blocking. The provider binds the KEK version into every wrapping, so a wrapped
/// key cannot be presented as wrapped by another version; callers bind what the key is for
/// through `aad` (see [`dek_wrap_aad`](super::dek_wrap_aad) and
/// [`tenant_secret_wrap_aad`](super::tenant_secret_wrap_aad)).
#[async_trait::async_trait]
pub trait KeyProvider: Send + Sync + std::fmt::Debug + 'static {
    /// The provider's short name, as used in configuration (e.g. `"local"`).
    fn name(&self) -> &'static str;

    /// The KEK version new wrappings use.
    fn primary_version(&self) -> KekVersion;

    /// Every KEK version the provider can unwrap with, ascending.
    ///
    /// The default reports only the primary version; providers holding several override it.
    fn versions(&self) -> Vec<KekVersion> {
        vec![self.primary_version()]
    }

    /// Wraps `plaintext` under the primary KEK version, authenticating `aad`.
    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey, CryptoError>;

    /// Unwraps a key with the KEK version it names; fails with [`CryptoError::Unwrap`] on a
    /// wrong KEK, wrong `aad` or tampered bytes, and [`CryptoError::UnknownKekVersion`] when
    /// the provider does not hold that version.
    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError>;

    /// Creates a new KEK version and makes it primary; returns the new version.
    ///
    /// Existing wrappings stay readable with their old version until rewrapped. The default
    /// returns [`CryptoError::Unsupported`].
    async fn rotate(&self) -> Result<KekVersion, CryptoError> {
        Err(CryptoError::Unsupported {
            provider: self.name(),
            operation: "rotate",
        })
    }

    /// Destroys KEK version `version`, so nothing wrapped under it can be unwrapped again.
    ///
    /// The caller (the vault's dual-controlled retire) has checked that nothing stored is
    /// still wrapped under it. Refuses the primary version with [`CryptoError::Keyring`] and an
    /// unknown one with [`CryptoError::UnknownKekVersion`]. The default returns
    /// [`CryptoError::Unsupported`].
    async fn retire(&self, version: KekVersion) -> Result<(), CryptoError> {
        let _ = version;
        Err(CryptoError::Unsupported {
            provider: self.name(),
            operation: "retire",
        })
    }

    /// Picks up KEK versions created or destroyed by another process (another replica's
    /// rotation), so the primary version is the newest one. The default does nothing, for
    /// providers whose view is always current.
    async fn refresh(&self) -> Result<(), CryptoError> {
        Ok(())
    }

    /// Proves the provider can still serve: wraps a random probe under the primary KEK and
    /// unwraps it again (an HSM that logged out or lost its session fails here). Changes
    /// nothing; readiness calls it every second.
    async fn check(&self) -> Result<(), CryptoError> {
        let mut probe = Zeroizing::new([0u8; 32]);
        super::fill_random(probe.as_mut())?;
        let wrapped = self.wrap(probe.as_ref(), PROBE_AAD).await?;
        let unwrapped = self.unwrap(&wrapped, PROBE_AAD).await?;
        if unwrapped.as_slice() == probe.as_ref() {
            Ok(())
        } else {
            Err(CryptoError::Unwrap)
        }
    }
}

/// What the readiness probe's wrapping is bound to, so it can never pass for a real key's.
const PROBE_AAD: &[u8] = b"cardvault readiness probe";
