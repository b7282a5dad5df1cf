//! Reading files that hold secrets: the TLS private key, the PKCS#11 PIN file, gateway API
//! secrets and client keys (the local keyring checks its mode with [`exposed_mode`] too).
//!
//! A secret file that group or others may read is refused, naming the file and the fix
//! (`chmod 600`): a key any local user can copy is not a secret, and refusing at start-up is
//! the one moment an operator is watching. The check is made on the opened file, not on the
//! path again, so a swap in between is harmless.

use std::{
    fs::{File, Metadata},
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

/// Why a secret file was refused. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be opened, inspected or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file, or larger than any secret of its kind.
    #[error("{} is not a regular file of at most {max_bytes} bytes", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// The largest size accepted.
        max_bytes: u64,
    },
    /// Group or others may access the file.
    #[error(
        "{} has mode {mode:04o}, which lets group or others read it; refusing to use it. \
         Fix: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// The permission bits of a file that group or others may access, if they may.
pub fn exposed_mode(meta: &Metadata) -> Option<u32> {
    let mode = meta.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Reads a secret file of at most `max_bytes`, refusing one that group or others may access.
/// The bytes are zeroized when dropped.
pub fn read(path: &Path, max_bytes: u64) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() || meta.len() > max_bytes {
        return Err(SecretFileError::NotRegular {
            path: path.to_owned(),
            max_bytes,
        });
    }
    if let Some(mode) = exposed_mode(&meta) {
        return Err(SecretFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    // Sized up front so reading never reallocates and leaves copies of the secret behind.
    let capacity = usize::try_from(max_bytes)
        .unwrap_or(usize::MAX)
        .min(1 << 20)
        + 1;
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::{fs::Permissions, io::Write as _, os::unix::fs::OpenOptionsExt as _};

    use super::*;

    fn secret(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join("secret");
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(b"s3cret\n").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            let path = secret(dir.path(), mode);
            assert_eq!(read(&path, 64).unwrap().as_slice(), b"s3cret\n");
        }
    }

    #[test]
    fn a_file_group_or_others_may_access_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o601, 0o610] {
            let path = secret(dir.path(), mode);
            let err = read(&path, 64).unwrap_err();
            assert!(
                matches!(err, SecretFileError::Exposed { mode: m, .. } if m == mode),
                "{mode:o}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
            assert!(!message.contains("s3cret"), "{message}");
        }
    }

    #[test]
    fn a_directory_a_large_file_and_a_missing_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read(dir.path(), 64),
            Err(SecretFileError::NotRegular { .. })
        ));
        let path = secret(dir.path(), 0o600);
        assert!(matches!(
            read(&path, 3),
            Err(SecretFileError::NotRegular { .. })
        ));
        let missing = dir.path().join("missing");
        let err = read(&missing, 64).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
