//! The one source of randomness: the operating system's CSPRNG through `ring`.

use std::sync::LazyLock;

use ring::rand::{SecureRandom, SystemRandom};

use super::CryptoError;

static SYSTEM_RANDOM: LazyLock<SystemRandom> = LazyLock::new(SystemRandom::new);

/// Fills `buf` with cryptographically secure random bytes from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    system_random().fill(buf).map_err(|_| CryptoError::Random)
}

/// The process-wide `SystemRandom`, for other layers that need randomness (tokens, ids).
pub fn system_random() -> &'static SystemRandom {
    &SYSTEM_RANDOM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_random_produces_different_bytes_each_call() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn fill_random_accepts_an_empty_buffer() {
        fill_random(&mut []).unwrap();
    }
}
