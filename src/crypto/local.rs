//! The `local` key provider: versioned KEKs in a mode-0600 TOML keyring file.
//!
//! For development and small installs. The file looks like
//!
//! ```toml
//! # cardvault local keyring. Secret: keep mode 0600, back it up, never commit it.
//! primary = 1
//!
//! [[kek]]
//! version = 1
//! created_at = "2026-11-25T08:00:00Z"
//! key = "<64 hex digits>"
//! ```
//!
//! Loading follows symlinks (Kubernetes mounts secrets through them) but checks the file it
//! actually opened: it must be a regular file without any group or other permission bits.
//! Wrapped keys are `[0x01][kek version u32 BE][nonce 12][ciphertext ‖ tag 16]`, sealed with
//! AES-256-GCM under that KEK version, with AAD = `"cardvault.kek.v1"` ‖ version (u32 BE) ‖
//! the caller's AAD.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::aead::{NONCE_LEN, TAG_LEN, gcm_open, gcm_seal_append};
use super::hex;
use super::secret::{KEY_LEN, Key32};
use super::wrap_format::WrapFormat;
use super::{CryptoError, KekVersion, KeyProvider, WrappedKey, fill_random};

/// Format byte of keys wrapped by the local keyring.
pub const LOCAL_WRAP_FORMAT_V1: u8 = 1;

/// How the local keyring lays out its wrapped keys.
const WRAP: WrapFormat = WrapFormat {
    format: LOCAL_WRAP_FORMAT_V1,
    what: "local wrapped key",
    aad_label: b"cardvault.kek.v1",
};
/// Keyrings are a few hundred bytes per version; anything huge is not a keyring.
const MAX_KEYRING_BYTES: u64 = 1 << 20;
const FILE_HEADER: &str =
    "# cardvault local keyring. Secret: keep mode 0600, back it up, never commit it.\n";

/// The `local` keyring provider: versioned 256-bit KEKs read from a TOML file.
///
/// Debug prints the path and versions only.
pub struct LocalKeyring {
    /// Where the keyring persists; `None` for an ephemeral keyring.
    path: Option<PathBuf>,
    state: RwLock<State>,
}

struct State {
    primary: KekVersion,
    keks: BTreeMap<KekVersion, Kek>,
}

struct Kek {
    key: Key32,
    created_at: OffsetDateTime,
}

impl LocalKeyring {
    /// Creates a new keyring file with one random KEK (version 1). Fails if the file exists.
    ///
    /// The file is created with mode 0600 from the start, its parent directory (mode 0700) if
    /// missing, and both are fsync'd.
    pub fn init(path: &Path) -> Result<LocalKeyring, CryptoError> {
        let state = State::first()?;
        if let Some(parent) = parent_dir(path) {
            // A no-op when the directory exists (its mode is then left alone).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| {
                    CryptoError::io(
                        format!("failed to create keyring directory {}", parent.display()),
                        e,
                    )
                })?;
        }
        write_new_file(path, &state.render())?;
        sync_parent(path)?;
        Ok(LocalKeyring {
            path: Some(path.to_path_buf()),
            state: RwLock::new(state),
        })
    }

    /// Loads a keyring file.
    ///
    /// Refuses, with [`CryptoError::KeyringPermissions`] naming the fix (`chmod 600 <path>`),
    /// a file whose mode has any group or other bits, and with [`CryptoError::Keyring`] a path
    /// that is not a regular file, or contents that are not a valid keyring: unknown fields,
    /// duplicate or zero versions, keys that are not 64 hex digits, a primary version that is
    /// not in the file.
    pub fn load(path: &Path) -> Result<LocalKeyring, CryptoError> {
        let file = File::open(path).map_err(|e| {
            CryptoError::io(format!("failed to open keyring {}", path.display()), e)
        })?;
        // Check the file we opened (not the path again), so a swap in between is harmless.
        let meta = file.metadata().map_err(|e| {
            CryptoError::io(format!("failed to inspect keyring {}", path.display()), e)
        })?;
        if !meta.is_file() {
            return Err(CryptoError::Keyring(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if let Some(mode) = crate::secret_file::exposed_mode(&meta) {
            return Err(CryptoError::KeyringPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.len() > MAX_KEYRING_BYTES {
            return Err(CryptoError::Keyring(format!(
                "{} is larger than {MAX_KEYRING_BYTES} bytes; not a keyring",
                path.display()
            )));
        }
        // Sized up front so reading never reallocates and leaves copies of the keys behind.
        let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
        let mut contents = Zeroizing::new(Vec::with_capacity(capacity));
        file.take(MAX_KEYRING_BYTES + 1)
            .read_to_end(&mut contents)
            .map_err(|e| {
                CryptoError::io(format!("failed to read keyring {}", path.display()), e)
            })?;
        let state = State::parse(&contents, path)?;
        Ok(LocalKeyring {
            path: Some(path.to_path_buf()),
            state: RwLock::new(state),
        })
    }

    /// An in-memory keyring with one random KEK, never written anywhere.
    ///
    /// For tests and throwaway demos only: everything wrapped by it is lost with the process.
    pub fn ephemeral() -> Result<LocalKeyring, CryptoError> {
        Ok(LocalKeyring {
            path: None,
            state: RwLock::new(State::first()?),
        })
    }

    /// The KEK versions in the keyring, ascending.
    pub fn versions(&self) -> Vec<KekVersion> {
        self.read().keks.keys().copied().collect()
    }

    /// The file backing the keyring (`None` if ephemeral).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Adds a random KEK with the next version and makes it primary, rewriting the file
    /// atomically (temporary file with mode 0600, fsync, rename, fsync of the directory).
    ///
    /// Processes sharing the file take turns: each holds the keyring's lock file
    /// (`<keyring>.lock`) while it reads the file afresh, picks the version after the highest
    /// one there, and writes it back, so two rotating at once make two versions rather than
    /// two different keys under one version number. Other replicas reload the file to see
    /// the new version.
    pub fn rotate_now(&self) -> Result<KekVersion, CryptoError> {
        let _lock = self.path.as_deref().map(FileLock::acquire).transpose()?;
        let mut state = self.write();
        self.reread(&mut state)?;
        let last = state.keks.keys().next_back().map_or(0, |v| v.0);
        let version = KekVersion(last.checked_add(1).ok_or_else(|| {
            CryptoError::Keyring("no KEK version left after u32::MAX".to_string())
        })?);
        state.keks.insert(
            version,
            Kek {
                key: Key32::random()?,
                created_at: now(),
            },
        );
        let previous = std::mem::replace(&mut state.primary, version);
        if let Some(path) = &self.path
            && let Err(e) = replace_file(path, &state.render())
        {
            state.primary = previous;
            state.keks.remove(&version);
            return Err(e);
        }
        Ok(version)
    }

    /// Destroys KEK version `version`: removes it from memory and rewrites the file
    /// atomically without it (as [`LocalKeyring::rotate_now`] does). The key bytes are
    /// zeroized; a backup of the old file still holds them, so retire old backups too.
    ///
    /// Refuses the primary version and a version the keyring does not hold.
    pub fn retire_now(&self, version: KekVersion) -> Result<(), CryptoError> {
        let _lock = self.path.as_deref().map(FileLock::acquire).transpose()?;
        let mut state = self.write();
        self.reread(&mut state)?;
        if version == state.primary {
            return Err(CryptoError::Keyring(format!(
                "KEK version {} is primary; rotate before retiring it",
                version.0
            )));
        }
        let Some(kek) = state.keks.remove(&version) else {
            return Err(CryptoError::UnknownKekVersion(version.0));
        };
        if let Some(path) = &self.path
            && let Err(e) = replace_file(path, &state.render())
        {
            state.keks.insert(version, kek);
            return Err(e);
        }
        Ok(())
    }

    /// Reads the keyring file again (another process rotated or retired a version); an
    /// ephemeral keyring has nothing to read. On any error the keys in memory stay as they
    /// were.
    pub fn reload(&self) -> Result<(), CryptoError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let fresh = LocalKeyring::load(path)?;
        let state = std::mem::replace(&mut *fresh.write(), State::empty());
        *self.write() = state;
        Ok(())
    }

    /// Replaces `state` with the file's contents, under the lock file, before a change: the
    /// change then applies to what another process may have written meanwhile.
    fn reread(&self, state: &mut State) -> Result<(), CryptoError> {
        if let Some(path) = &self.path {
            let fresh = LocalKeyring::load(path)?;
            *state = std::mem::replace(&mut *fresh.write(), State::empty());
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // No code path panics while holding the lock, so a poisoned state is still consistent.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn wrap_now(&self, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey, CryptoError> {
        let state = self.read();
        let version = state.primary;
        let kek = state
            .keks
            .get(&version)
            .ok_or(CryptoError::UnknownKekVersion(version.0))?;
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut bytes = WRAP.header(version, &nonce, plaintext.len() + TAG_LEN);
        gcm_seal_append(
            kek.key.expose(),
            &nonce,
            &WRAP.aad(version, aad),
            plaintext,
            &mut bytes,
        )?;
        Ok(WrappedKey {
            kek_version: version,
            bytes,
        })
    }

    fn unwrap_now(
        &self,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let parsed = WRAP.parse(&wrapped.bytes, wrapped.kek_version)?;
        let state = self.read();
        let kek = state
            .keks
            .get(&parsed.version)
            .ok_or(CryptoError::UnknownKekVersion(parsed.version.0))?;
        gcm_open(
            kek.key.expose(),
            parsed.nonce,
            &WRAP.aad(parsed.version, aad),
            parsed.sealed,
            CryptoError::Unwrap,
        )
    }
}

impl std::fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        f.debug_struct("LocalKeyring")
            .field("path", &self.path)
            .field("primary", &state.primary)
            .field("versions", &state.keks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl KeyProvider for LocalKeyring {
    fn name(&self) -> &'static str {
        "local"
    }

    fn primary_version(&self) -> KekVersion {
        self.read().primary
    }

    fn versions(&self) -> Vec<KekVersion> {
        LocalKeyring::versions(self)
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey, CryptoError> {
        self.wrap_now(plaintext, aad)
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.unwrap_now(wrapped, aad)
    }

    /// Rotates with [`LocalKeyring::rotate_now`] (a small synchronous file write).
    async fn rotate(&self) -> Result<KekVersion, CryptoError> {
        self.rotate_now()
    }

    /// Retires with [`LocalKeyring::retire_now`].
    async fn retire(&self, version: KekVersion) -> Result<(), CryptoError> {
        self.retire_now(version)
    }

    /// Reloads the file with [`LocalKeyring::reload`].
    async fn refresh(&self) -> Result<(), CryptoError> {
        self.reload()
    }

    /// The file must still load (a keyring deleted, unreadable or loosened to group access
    /// fails: this replica could not follow a rotation, nor restart), and the keys in memory
    /// must wrap and unwrap. The file is only read: the state in memory is left as it is, so
    /// the check never races a rotation.
    async fn check(&self) -> Result<(), CryptoError> {
        if let Some(path) = &self.path {
            LocalKeyring::load(path)?;
        }
        let mut probe = Zeroizing::new([0u8; 32]);
        crate::crypto::fill_random(probe.as_mut())?;
        let wrapped = self.wrap_now(probe.as_ref(), b"cardvault readiness probe")?;
        let unwrapped = self.unwrap_now(&wrapped, b"cardvault readiness probe")?;
        if unwrapped.as_slice() == probe.as_ref() {
            Ok(())
        } else {
            Err(CryptoError::Unwrap)
        }
    }
}

fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

impl State {
    /// A placeholder left behind when a loaded state is moved out; never used for keys.
    fn empty() -> State {
        State {
            primary: KekVersion(0),
            keks: BTreeMap::new(),
        }
    }

    fn first() -> Result<State, CryptoError> {
        let version = KekVersion(1);
        let mut keks = BTreeMap::new();
        keks.insert(
            version,
            Kek {
                key: Key32::random()?,
                created_at: now(),
            },
        );
        Ok(State {
            primary: version,
            keks,
        })
    }

    /// The file contents, in a zeroizing buffer sized so it never reallocates.
    fn render(&self) -> Zeroizing<String> {
        let per_kek = 160 + 2 * KEY_LEN;
        let reserved = FILE_HEADER.len() + 32 + per_kek * self.keks.len();
        let mut out = Zeroizing::new(String::with_capacity(reserved));
        out.push_str(FILE_HEADER);
        out.push_str(&format!("primary = {}\n", self.primary.0));
        for (version, kek) in &self.keks {
            let created_at = kek
                .created_at
                .format(&Rfc3339)
                .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string());
            out.push_str(&format!(
                "\n[[kek]]\nversion = {}\ncreated_at = \"{created_at}\"\nkey = \"",
                version.0
            ));
            hex::encode_into(kek.key.expose(), &mut out);
            out.push_str("\"\n");
        }
        debug_assert!(out.len() <= reserved, "keyring buffer reallocated");
        out
    }

    fn parse(contents: &[u8], path: &Path) -> Result<State, CryptoError> {
        let bad = |what: String| CryptoError::Keyring(format!("{}: {what}", path.display()));
        let text = std::str::from_utf8(contents).map_err(|_| bad("not valid UTF-8".to_string()))?;
        // Known limit: toml may make its own, unzeroized copies of strings while parsing (out
        // of our hands). Everything this code keeps is zeroizing: the file text (the caller's
        // buffer), each key string and the decoded keys.
        let file: FileModel =
            toml::from_str(text).map_err(|e| bad(describe_toml_error(&e, text)))?;
        let mut keks = BTreeMap::new();
        for entry in file.kek {
            let version = KekVersion(entry.version);
            if version.0 == 0 {
                return Err(bad(
                    "KEK version 0 is not allowed; versions start at 1".into()
                ));
            }
            let created_at = OffsetDateTime::parse(&entry.created_at, &Rfc3339).map_err(|_| {
                bad(format!(
                    "KEK version {}: created_at is not an RFC 3339 timestamp",
                    version.0
                ))
            })?;
            let mut key = Key32::zeroed();
            if !hex::decode_into(&entry.key, key.expose_mut()) {
                return Err(bad(format!(
                    "KEK version {}: key must be exactly {} hex digits ({KEY_LEN} bytes)",
                    version.0,
                    2 * KEY_LEN
                )));
            }
            if keks.insert(version, Kek { key, created_at }).is_some() {
                return Err(bad(format!("KEK version {} appears twice", version.0)));
            }
        }
        let primary = KekVersion(file.primary);
        if !keks.contains_key(&primary) {
            return Err(bad(format!(
                "primary version {} is not among the KEK versions",
                primary.0
            )));
        }
        Ok(State { primary, keks })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    primary: u32,
    kek: Vec<FileKek>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKek {
    version: u32,
    created_at: String,
    #[serde(deserialize_with = "zeroizing_string")]
    key: Zeroizing<String>,
}

fn zeroizing_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// Describes a TOML error by position and message, without echoing the file: toml's own
/// `Display` quotes the offending line, which may hold a key, and serde messages may quote
/// values, so quoted strings are redacted.
fn describe_toml_error(err: &toml::de::Error, text: &str) -> String {
    let mut out = String::from("invalid keyring");
    if let Some(span) = err.span() {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        out.push_str(&format!(" at line {line}"));
    }
    out.push_str(": ");
    let mut in_quotes = false;
    let mut escaped = false;
    for c in err.message().trim().chars() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = false;
                out.push_str("…\"");
            }
        } else {
            out.push(c);
            in_quotes = c == '"';
        }
    }
    if in_quotes {
        out.push_str("…\"");
    }
    out
}

/// How long a change waits for another process's lock on the keyring file.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// A lock file older than this was left by a process that died while holding it: a change
/// holds the lock for the time of one small file write.
const LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// The keyring's lock file (`<keyring>.lock`), held while it exists: made with
/// `create_new`, which exactly one process wins, and removed when dropped.
struct FileLock {
    path: PathBuf,
}

impl FileLock {
    fn acquire(keyring: &Path) -> Result<FileLock, CryptoError> {
        let mut name = keyring.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => return Ok(FileLock { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|at| at.elapsed().ok())
                        .is_some_and(|age| age > LOCK_STALE);
                    if stale {
                        tracing::warn!(lock = %path.display(), "removing a stale keyring lock file");
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(CryptoError::Keyring(format!(
                            "{} is locked by another process changing the keyring; try again \
                             (remove {} only if no cardvault process is running)",
                            keyring.display(),
                            path.display()
                        )));
                    }
                    // A change holds the lock for milliseconds; rotations are rare.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(CryptoError::io(
                        format!("failed to create lock file {}", path.display()),
                        e,
                    ));
                }
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn parent_dir(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// Creates `path` (must not exist) with mode 0600, writes `contents`, fsyncs. Removes the
/// file again if anything after creation fails.
fn write_new_file(path: &Path, contents: &str) -> Result<(), CryptoError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CryptoError::Keyring(format!(
                    "{} already exists; refusing to overwrite a keyring",
                    path.display()
                ))
            } else {
                CryptoError::io(format!("failed to create keyring {}", path.display()), e)
            }
        })?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(CryptoError::io(
            format!("failed to write keyring {}", path.display()),
            e,
        ));
    }
    Ok(())
}

/// Atomically replaces `path` with `contents` (mode 0600).
fn replace_file(path: &Path, contents: &str) -> Result<(), CryptoError> {
    let mut suffix = [0u8; 8];
    fill_random(&mut suffix)?;
    let name = path
        .file_name()
        .ok_or_else(|| CryptoError::Keyring(format!("{} has no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", hex::encode(&suffix)));
    let tmp = path.with_file_name(tmp_name);
    write_new_file(&tmp, contents)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CryptoError::io(
            format!("failed to replace keyring {}", path.display()),
            e,
        ));
    }
    sync_parent(path)
}

/// Fsyncs the directory holding `path`, so a created or renamed file survives a crash.
fn sync_parent(path: &Path) -> Result<(), CryptoError> {
    let dir = parent_dir(path).unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CryptoError::io(format!("failed to sync directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::wrap_format::HEADER_LEN as WRAP_HEADER_LEN;
    use std::os::unix::fs::PermissionsExt;

    const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn write_keyring(dir: &Path, body: &str, mode: u32) -> PathBuf {
        let path = dir.join("keyring.toml");
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn valid_body() -> String {
        format!(
            "{FILE_HEADER}primary = 1\n[[kek]]\nversion = 1\ncreated_at = \"2026-11-25T08:00:00Z\"\nkey = \"{KEY_HEX}\"\n"
        )
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn load_error(body: &str) -> String {
        let dir = dir();
        let path = write_keyring(dir.path(), body, 0o600);
        let err = LocalKeyring::load(&path).unwrap_err();
        assert!(matches!(err, CryptoError::Keyring(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn init_creates_a_0600_file_in_a_new_directory() {
        let dir = dir();
        let path = dir.path().join("nested/keys/keyring.toml");
        let ring = LocalKeyring::init(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(path.parent().unwrap()), 0o700);
        assert_eq!(ring.versions(), vec![KekVersion(1)]);
        assert_eq!(ring.primary_version(), KekVersion(1));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# cardvault local keyring."));
    }

    #[test]
    fn init_refuses_an_existing_file() {
        let dir = dir();
        let path = write_keyring(dir.path(), "keep me", 0o600);
        let err = LocalKeyring::init(&path).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn load_round_trips_what_init_wrote() {
        let dir = dir();
        let path = dir.path().join("keyring.toml");
        let created = LocalKeyring::init(&path).unwrap();
        let wrapped = created.wrap(b"data key", b"ctx").await.unwrap();
        let loaded = LocalKeyring::load(&path).unwrap();
        assert_eq!(loaded.versions(), created.versions());
        assert_eq!(
            loaded.unwrap(&wrapped, b"ctx").await.unwrap().as_slice(),
            b"data key"
        );
    }

    #[test]
    fn load_reads_a_hand_written_keyring() {
        let dir = dir();
        let path = write_keyring(dir.path(), &valid_body(), 0o600);
        let ring = LocalKeyring::load(&path).unwrap();
        assert_eq!(ring.versions(), vec![KekVersion(1)]);
        assert_eq!(ring.read().keks[&KekVersion(1)].key.expose()[31], 0x1f);
        // A read-only file is fine too.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(LocalKeyring::load(&path).is_ok());
    }

    #[test]
    fn load_refuses_group_or_world_readable_files_and_names_the_fix() {
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            let dir = dir();
            let path = write_keyring(dir.path(), &valid_body(), mode);
            let err = LocalKeyring::load(&path).unwrap_err();
            assert!(
                matches!(&err, CryptoError::KeyringPermissions { mode: m, .. } if *m == mode),
                "{err:?}"
            );
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
            assert!(!message.contains(KEY_HEX));
        }
    }

    #[test]
    fn load_refuses_a_directory() {
        let dir = dir();
        let sub = dir.path().join("keyring.toml");
        std::fs::DirBuilder::new().mode(0o700).create(&sub).unwrap();
        let err = LocalKeyring::load(&sub).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn load_of_a_missing_file_names_the_path() {
        let dir = dir();
        let path = dir.path().join("nope.toml");
        let err = LocalKeyring::load(&path).unwrap_err();
        assert!(matches!(err, CryptoError::Io { .. }));
        assert!(err.to_string().contains("nope.toml"));
    }

    #[test]
    fn load_refuses_bad_hex_without_echoing_it() {
        let body = valid_body().replace("0001", "zz01");
        let message = load_error(&body);
        assert!(message.contains("64 hex digits"), "{message}");
        assert!(!message.contains("zz01"), "{message}");
    }

    #[test]
    fn load_refuses_a_short_key() {
        let body = valid_body().replace(KEY_HEX, &KEY_HEX[..62]);
        assert!(load_error(&body).contains("64 hex digits"));
    }

    #[test]
    fn load_refuses_a_primary_that_is_not_a_version() {
        let body = valid_body().replace("primary = 1", "primary = 2");
        assert!(load_error(&body).contains("primary version 2"));
    }

    #[test]
    fn load_refuses_a_missing_primary() {
        let body = valid_body().replace("primary = 1\n", "");
        assert!(load_error(&body).contains("primary"));
    }

    #[test]
    fn load_refuses_unknown_fields() {
        let top = valid_body().replace("primary = 1", "primary = 1\ncolor = \"blue\"");
        assert!(load_error(&top).contains("color"));
        let inner = valid_body().replace("version = 1", "version = 1\nalgorithm = \"aes\"");
        assert!(load_error(&inner).contains("algorithm"));
    }

    #[test]
    fn load_refuses_duplicate_and_zero_versions() {
        let body = valid_body();
        let second = body.split_once("[[kek]]").unwrap().1;
        let duplicated = format!("{body}[[kek]]{second}");
        assert!(load_error(&duplicated).contains("twice"));
        let zero = valid_body()
            .replace("primary = 1", "primary = 0")
            .replace("version = 1", "version = 0");
        assert!(load_error(&zero).contains("version 0"));
    }

    #[test]
    fn load_refuses_a_bad_timestamp() {
        let body = valid_body().replace("2026-11-25T08:00:00Z", "yesterday");
        assert!(load_error(&body).contains("created_at"));
    }

    #[test]
    fn toml_errors_never_echo_key_material() {
        // The key lands in an integer field: serde would quote it in its message.
        let body = format!("primary = \"{KEY_HEX}\"\n");
        let message = load_error(&body);
        assert!(!message.contains(KEY_HEX), "{message}");
        assert!(!message.contains("0001020304"), "{message}");
        // A syntax error on the key's line: toml's Display would quote the line.
        let broken =
            valid_body().replace(&format!("key = \"{KEY_HEX}\""), &format!("key = {KEY_HEX}"));
        let message = load_error(&broken);
        assert!(!message.contains("0001020304"), "{message}");
        assert!(message.contains("line 6"), "{message}");
    }

    #[test]
    fn load_refuses_non_utf8() {
        let dir = dir();
        let path = dir.path().join("keyring.toml");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            LocalKeyring::load(&path)
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
    }

    #[tokio::test]
    async fn wrap_then_unwrap_returns_the_plaintext() {
        let ring = LocalKeyring::ephemeral().unwrap();
        let wrapped = ring.wrap(&[7u8; 32], b"aad").await.unwrap();
        assert_eq!(wrapped.kek_version, KekVersion(1));
        assert_eq!(wrapped.bytes[0], LOCAL_WRAP_FORMAT_V1);
        assert_eq!(&wrapped.bytes[1..5], &1u32.to_be_bytes());
        assert_eq!(wrapped.bytes.len(), WRAP_HEADER_LEN + 32 + TAG_LEN);
        let back = ring.unwrap(&wrapped, b"aad").await.unwrap();
        assert_eq!(back.as_slice(), &[7u8; 32]);
    }

    #[tokio::test]
    async fn unwrap_with_the_wrong_aad_fails() {
        let ring = LocalKeyring::ephemeral().unwrap();
        let wrapped = ring.wrap(b"k", b"tenant-a").await.unwrap();
        let err = ring.unwrap(&wrapped, b"tenant-b").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap));
    }

    #[tokio::test]
    async fn unwrap_of_a_flipped_bit_fails() {
        let ring = LocalKeyring::ephemeral().unwrap();
        let wrapped = ring.wrap(b"secret key bytes", b"aad").await.unwrap();
        for position in WRAP_HEADER_LEN * 8..wrapped.bytes.len() * 8 {
            let mut tampered = wrapped.clone();
            tampered.bytes[position / 8] ^= 1 << (position % 8);
            let err = ring.unwrap(&tampered, b"aad").await.unwrap_err();
            assert!(
                matches!(err, CryptoError::Unwrap),
                "bit {position}: {err:?}"
            );
        }
        for position in 0..WRAP_HEADER_LEN * 8 {
            let mut tampered = wrapped.clone();
            tampered.bytes[position / 8] ^= 1 << (position % 8);
            assert!(
                ring.unwrap(&tampered, b"aad").await.is_err(),
                "bit {position}"
            );
        }
    }

    #[tokio::test]
    async fn unwrap_with_the_wrong_kek_version_fails() {
        let ring = LocalKeyring::ephemeral().unwrap();
        ring.rotate_now().unwrap();
        let wrapped = ring.wrap(b"k", b"aad").await.unwrap();
        assert_eq!(wrapped.kek_version, KekVersion(2));
        // The label disagrees with the header.
        let mut relabelled = wrapped.clone();
        relabelled.kek_version = KekVersion(1);
        let err = ring.unwrap(&relabelled, b"aad").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap));
        // Label and header both rewritten: the version is bound in the AAD and key.
        let mut rewritten = relabelled;
        rewritten.bytes[1..5].copy_from_slice(&1u32.to_be_bytes());
        let err = ring.unwrap(&rewritten, b"aad").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap));
    }

    #[tokio::test]
    async fn unwrap_of_a_version_the_keyring_lacks_is_reported() {
        let ring = LocalKeyring::ephemeral().unwrap();
        let mut wrapped = ring.wrap(b"k", b"aad").await.unwrap();
        wrapped.kek_version = KekVersion(9);
        wrapped.bytes[1..5].copy_from_slice(&9u32.to_be_bytes());
        let err = ring.unwrap(&wrapped, b"aad").await.unwrap_err();
        assert!(matches!(err, CryptoError::UnknownKekVersion(9)));
    }

    #[tokio::test]
    async fn unwrap_with_a_different_keyring_fails() {
        let ring = LocalKeyring::ephemeral().unwrap();
        let other = LocalKeyring::ephemeral().unwrap();
        let wrapped = ring.wrap(b"k", b"aad").await.unwrap();
        let err = other.unwrap(&wrapped, b"aad").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap));
    }

    #[tokio::test]
    async fn unwrap_of_short_or_unknown_format_blobs_errors_without_panicking() {
        let ring = LocalKeyring::ephemeral().unwrap();
        let wrapped = ring.wrap(b"", b"aad").await.unwrap();
        assert_eq!(wrapped.bytes.len(), WRAP_HEADER_LEN + TAG_LEN);
        for len in 0..wrapped.bytes.len() {
            let short = WrappedKey {
                kek_version: wrapped.kek_version,
                bytes: wrapped.bytes[..len].to_vec(),
            };
            assert!(ring.unwrap(&short, b"aad").await.is_err(), "length {len}");
        }
        let mut unknown = wrapped.clone();
        unknown.bytes[0] = 2;
        assert!(matches!(
            ring.unwrap(&unknown, b"aad").await.unwrap_err(),
            CryptoError::UnknownFormat { version: 2, .. }
        ));
    }

    #[tokio::test]
    async fn rotation_adds_a_primary_version_persists_it_and_keeps_old_keys() {
        let dir = dir();
        let path = dir.path().join("keyring.toml");
        let ring = LocalKeyring::init(&path).unwrap();
        let old = ring.wrap(b"old", b"aad").await.unwrap();
        assert_eq!(KeyProvider::rotate(&ring).await.unwrap(), KekVersion(2));
        assert_eq!(ring.primary_version(), KekVersion(2));
        assert_eq!(mode_of(&path), 0o600);
        let reloaded = LocalKeyring::load(&path).unwrap();
        assert_eq!(reloaded.versions(), vec![KekVersion(1), KekVersion(2)]);
        assert_eq!(reloaded.primary_version(), KekVersion(2));
        assert_eq!(
            reloaded.unwrap(&old, b"aad").await.unwrap().as_slice(),
            b"old"
        );
        let new = reloaded.wrap(b"new", b"aad").await.unwrap();
        assert_eq!(new.kek_version, KekVersion(2));
        assert_eq!(ring.unwrap(&new, b"aad").await.unwrap().as_slice(), b"new");
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn retiring_a_version_destroys_it_on_disk_and_refuses_the_primary() {
        let dir = dir();
        let path = dir.path().join("keyring.toml");
        let ring = LocalKeyring::init(&path).unwrap();
        let old = ring.wrap(b"old", b"aad").await.unwrap();
        let other_process = LocalKeyring::load(&path).unwrap();
        KeyProvider::rotate(&ring).await.unwrap();
        assert!(matches!(
            KeyProvider::retire(&ring, KekVersion(2)).await.unwrap_err(),
            CryptoError::Keyring(_)
        ));
        KeyProvider::retire(&ring, KekVersion(1)).await.unwrap();
        assert_eq!(ring.versions(), vec![KekVersion(2)]);
        assert!(matches!(
            ring.unwrap(&old, b"aad").await.unwrap_err(),
            CryptoError::UnknownKekVersion(1)
        ));
        assert!(matches!(
            KeyProvider::retire(&ring, KekVersion(1)).await.unwrap_err(),
            CryptoError::UnknownKekVersion(1)
        ));
        assert_eq!(
            LocalKeyring::load(&path).unwrap().versions(),
            vec![KekVersion(2)]
        );
        assert_eq!(mode_of(&path), 0o600);
        // Another process still holding the old view picks the change up on refresh.
        assert_eq!(other_process.primary_version(), KekVersion(1));
        KeyProvider::refresh(&other_process).await.unwrap();
        assert_eq!(other_process.primary_version(), KekVersion(2));
        assert_eq!(other_process.versions(), vec![KekVersion(2)]);
    }

    #[test]
    fn keyring_debug_prints_versions_but_no_key_bytes() {
        let dir = dir();
        let path = write_keyring(dir.path(), &valid_body(), 0o600);
        let ring = LocalKeyring::load(&path).unwrap();
        let debug = format!("{ring:?}");
        assert!(debug.contains("KekVersion(1)"), "{debug}");
        assert!(debug.ends_with(".. }"), "{debug}");
        assert!(!debug.contains("0a0b0c"), "{debug}");
        assert!(!debug.contains("[0, 1, 2"), "{debug}");
        let text = std::fs::read_to_string(&path).unwrap();
        let hex = text.split("key = \"").nth(1).unwrap();
        assert!(!debug.contains(&hex[..64]));
    }

    #[test]
    fn two_processes_rotating_one_keyring_at_once_make_distinct_versions_with_one_key_each() {
        let dir = dir();
        let path = dir.path().join("keyring.toml");
        LocalKeyring::init(&path).unwrap();
        // Two processes' views of one file, each rotating as fast as it can.
        let rings = [
            std::sync::Arc::new(LocalKeyring::load(&path).unwrap()),
            std::sync::Arc::new(LocalKeyring::load(&path).unwrap()),
        ];
        const ROUNDS: usize = 25;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = rings
            .iter()
            .map(|ring| {
                let (ring, barrier) = (ring.clone(), barrier.clone());
                std::thread::spawn(move || {
                    (0..ROUNDS)
                        .map(|_| {
                            barrier.wait();
                            ring.rotate_now().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut made: Vec<KekVersion> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        made.sort();
        let expected: Vec<KekVersion> = (2..=2 + 2 * ROUNDS as u32 - 1).map(KekVersion).collect();
        assert_eq!(made, expected, "every rotation made its own version");
        let file = LocalKeyring::load(&path).unwrap();
        let mut all = vec![KekVersion(1)];
        all.extend(expected);
        assert_eq!(file.versions(), all);
        assert!(!dir.path().join("keyring.toml.lock").exists());
        // Each process's key for a version it made is the one in the file.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for ring in &rings {
                let wrapped = ring.wrap(b"a data key", b"aad").await.unwrap();
                file.unwrap(&wrapped, b"aad")
                    .await
                    .expect("the file opens what the process wrapped");
            }
        });
    }

    #[test]
    fn a_stale_lock_file_left_by_a_dead_process_is_broken() {
        let dir = dir();
        let path = dir.path().join("keyring.toml");
        let ring = LocalKeyring::init(&path).unwrap();
        let lock = dir.path().join("keyring.toml.lock");
        let file = File::create(&lock).unwrap();
        file.set_modified(std::time::SystemTime::now() - 2 * LOCK_STALE)
            .unwrap();
        assert_eq!(ring.rotate_now().unwrap(), KekVersion(2));
        assert!(!lock.exists());
    }

    #[test]
    fn provider_is_usable_as_a_trait_object() {
        let provider: std::sync::Arc<dyn KeyProvider> =
            std::sync::Arc::new(LocalKeyring::ephemeral().unwrap());
        assert_eq!(provider.name(), "local");
        assert_eq!(provider.versions(), vec![KekVersion(1)]);
    }
}
