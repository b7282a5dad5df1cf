//! The crypto layer's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the crypto layer.
///
/// No variant ever carries key bytes, plaintexts or the contents of a keyring file, so
/// errors can be logged and returned freely.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The keyring file is readable or writable by group or others.
    #[error(
        "keyring {} has mode {mode:04o}, which lets group or others access it; \
         refusing to load it. Fix: chmod 600 {}",
        path.display(),
        path.display()
    )]
    KeyringPermissions {
        /// The keyring file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The keyring file is missing, malformed or inconsistent (the message never contains key
    /// bytes).
    #[error("keyring: {0}")]
    Keyring(String),
    /// A wrapped key names a KEK version the provider does not hold.
    #[error("unknown KEK version {0}")]
    UnknownKekVersion(u32),
    /// Unwrapping a key failed authentication: wrong KEK, wrong AAD or tampered bytes.
    #[error("failed to unwrap key: authentication failed (wrong KEK, wrong context or tampered)")]
    Unwrap,
    /// Opening a record failed authentication: wrong DEK, moved to another token or tenant, or
    /// tampered.
    #[error("failed to open record: authentication failed (wrong key, moved or tampered)")]
    Open,
    /// Encryption failed (only possible for absurdly large inputs).
    #[error("failed to seal: input too large")]
    Seal,
    /// A stored blob or key has the wrong shape.
    #[error("malformed input: {0}")]
    Malformed(&'static str),
    /// A stored blob starts with a format version this build does not know.
    #[error("unknown {what} format version {version}")]
    UnknownFormat {
        /// Which kind of blob.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// The provider does not support this operation.
    #[error("key provider {provider} does not support {operation}")]
    Unsupported {
        /// The provider's name.
        provider: &'static str,
        /// The operation asked for.
        operation: &'static str,
    },
    /// The HSM (PKCS#11 module or token) failed or refused, or holds KEKs this build will not
    /// use. The message names the call and return code, never a PIN or key bytes.
    #[error("HSM: {0}")]
    Hsm(String),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl CryptoError {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CryptoError::Io {
            context: context.into(),
            source,
        }
    }
}
