//! A heap-allocated 256-bit secret that zeroizes on drop.
//!
//! Boxed so that moving the owning type (into an `Arc`, a map, a return value) moves a pointer
//! rather than leaving copies of the key bytes behind on the stack.

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{CryptoError, fill_random};

/// Length in bytes of every symmetric key in this layer.
pub(crate) const KEY_LEN: usize = 32;

/// 32 secret bytes; no `Debug`, no `Clone`, zeroized on drop.
pub(crate) struct Key32(Box<[u8; KEY_LEN]>);

impl Key32 {
    /// A fresh key from the OS CSPRNG.
    pub(crate) fn random() -> Result<Self, CryptoError> {
        let mut key = Key32::zeroed();
        fill_random(&mut key.0[..])?;
        Ok(key)
    }

    /// An all-zero key, to be filled in place.
    pub(crate) fn zeroed() -> Self {
        Key32(Box::new([0u8; KEY_LEN]))
    }

    /// Copies exactly 32 bytes; anything else is `Malformed(what)`.
    pub(crate) fn from_slice(bytes: &[u8], what: &'static str) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::Malformed(what));
        }
        let mut key = Key32::zeroed();
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub(crate) fn expose_mut(&mut self) -> &mut [u8; KEY_LEN] {
        &mut self.0
    }
}

impl Drop for Key32 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Key32 {}
