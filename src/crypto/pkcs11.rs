//! The `pkcs11` key provider: KEKs inside an HSM, reached through a PKCS#11 module.
//!
//! Each KEK version is an AES-256 secret-key object generated inside the token
//! (`CKM_AES_KEY_GEN`) and never extractable: `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`
//! true, `CKA_EXTRACTABLE` false, usable to `CKA_ENCRYPT`/`CKA_DECRYPT` and nothing else, and
//! neither modifiable nor copyable.
//! Version N is labelled `<key_label>-vN` (`CKA_LABEL`) with `CKA_ID` = N as 4 bytes big-endian;
//! the token is the only record of which versions exist, so replicas sharing it agree after a
//! [`refresh`](KeyProvider::refresh).
//!
//! Wrapping is AES-256-GCM computed by the HSM (`C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM`,
//! 128-bit tag) with a 96-bit IV from the OS CSPRNG. Wrapped keys are
//! `[0x02][kek version u32 BE][iv 12][ciphertext ‖ tag 16]`, with AAD = `"cardvault.p11.v1"` ‖
//! version (u32 BE) ‖ the caller's AAD.
//!
//! PKCS#11 calls block (a network HSM answers in milliseconds), so the async trait methods run
//! them on tokio's blocking pool; [`Pkcs11Provider::init`] and [`Pkcs11Provider::open`] block
//! the caller and are meant for start-up and the CLI.

use std::collections::{BTreeMap, HashMap};
use std::os::raw::c_ulong;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use zeroize::Zeroizing;

use super::aead::{NONCE_LEN, TAG_LEN};
use super::secret::KEY_LEN;
use super::wrap_format::WrapFormat;
use super::{CryptoError, KekVersion, KeyProvider, WrappedKey, fill_random};

/// Format byte of keys wrapped by the `pkcs11` provider.
pub const PKCS11_WRAP_FORMAT_V1: u8 = 2;

/// Default prefix of KEK object labels: version N is labelled `cardvault-kek-vN`.
pub const DEFAULT_KEY_LABEL: &str = "cardvault-kek";

/// How the pkcs11 provider lays out its wrapped keys.
const WRAP: WrapFormat = WrapFormat {
    format: PKCS11_WRAP_FORMAT_V1,
    what: "pkcs11 wrapped key",
    aad_label: b"cardvault.p11.v1",
};
/// A PIN is a few dozen bytes; a bigger "PIN file" is the wrong file.
const MAX_PIN_FILE_BYTES: u64 = 4096;
/// Idle sessions kept for reuse. Enough for the few concurrent unwraps a cold DEK cache sees;
/// keeping at least one open also keeps the login (PKCS#11 logs out when the last one closes).
const MAX_IDLE_SESSIONS: usize = 4;
/// `CKR_AEAD_DECRYPT_FAILED` (PKCS#11 3.0), which cryptoki 0.12 does not name.
const CKR_AEAD_DECRYPT_FAILED: c_ulong = 0x35;
/// `CKA_VALUE_LEN` of a KEK and `ulTagBits` of the GCM parameters, as PKCS#11 `CK_ULONG`s.
const KEK_BYTES: c_ulong = 32;
const TAG_BITS: c_ulong = 128;
const _: () = assert!(KEK_BYTES as usize == KEY_LEN && TAG_BITS as usize == 8 * TAG_LEN);

/// Where the token's user PIN comes from.
///
/// Debug shows the file or the variable name, never the PIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN; one trailing newline (`\n` or `\r\n`) is ignored.
    File(PathBuf),
    /// The name of an environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN. Errors name the file or variable but never quote its contents.
    pub fn read(&self) -> Result<Zeroizing<String>, CryptoError> {
        match self {
            PinSource::File(path) => read_pin_file(path),
            PinSource::Env(name) => read_pin_env(name),
        }
    }
}

/// How to reach the KEKs of the `pkcs11` provider.
///
/// Debug prints everything but the PIN.
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library) to load, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token holding the KEKs; exactly one token of the module must have it.
    pub token_label: String,
    /// The token's user PIN (see [`PinSource::read`]).
    pub pin: Zeroizing<String>,
    /// Prefix of the KEK objects' labels: version N is `<key_label>-vN`
    /// (default [`DEFAULT_KEY_LABEL`]).
    pub key_label: String,
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

/// The `pkcs11` provider: versioned AES-256 KEKs that never leave the HSM.
///
/// Debug prints the module, token, label prefix and versions only.
pub struct Pkcs11Provider {
    // Shared with the blocking tasks that make the PKCS#11 calls.
    inner: Arc<Inner>,
}

struct Inner {
    module: Arc<Module>,
    module_path: PathBuf,
    slot: Slot,
    token_label: String,
    key_label: String,
    /// Kept to log in again when the token drops our sessions (an HSM restart).
    pin: AuthPin,
    /// Logged-in sessions ready for reuse. A `Session` may move between threads but not be
    /// shared, so each call takes one out and puts it back.
    idle: Mutex<Vec<Session>>,
    /// The KEK objects found in the token, by version. Object handles are valid for the whole
    /// process (every session), until the object is destroyed or the login ends.
    keks: RwLock<BTreeMap<KekVersion, ObjectHandle>>,
}

impl Pkcs11Provider {
    /// Creates KEK version 1 inside the token and returns a provider using it.
    ///
    /// Fails if the token already holds a KEK under `config.key_label` (any version): a second
    /// "version 1" would make wrapped keys ambiguous. Blocks on the HSM.
    pub fn init(config: Pkcs11Config) -> Result<Pkcs11Provider, CryptoError> {
        let inner = Inner::connect(config)?;
        let version = inner.with_session(|inner, session| {
            let held = inner.versions();
            if !held.is_empty() {
                return Err(Failure::Crypto(CryptoError::Hsm(format!(
                    "token '{}' already holds KEK versions {} under label {}; refusing to \
                     create another version 1",
                    inner.token_label,
                    list(&held),
                    inner.key_label
                ))));
            }
            inner.generate(session, KekVersion(1))
        })?;
        debug_assert_eq!(version, KekVersion(1));
        Ok(Pkcs11Provider {
            inner: Arc::new(inner),
        })
    }

    /// Opens the KEKs already in the token; fails if there are none (run `cardvault keys init`
    /// first). Blocks on the HSM.
    pub fn open(config: Pkcs11Config) -> Result<Pkcs11Provider, CryptoError> {
        let inner = Inner::connect(config)?;
        if inner.versions().is_empty() {
            return Err(CryptoError::Hsm(format!(
                "no KEK in token '{}' (no secret key labelled {}-v<N>); run `cardvault keys \
                 init`",
                inner.token_label, inner.key_label
            )));
        }
        Ok(Pkcs11Provider {
            inner: Arc::new(inner),
        })
    }

    /// The KEK versions in the token as of the last refresh, ascending.
    pub fn versions(&self) -> Vec<KekVersion> {
        self.inner.versions()
    }

    /// The label of the token holding the KEKs.
    pub fn token_label(&self) -> &str {
        &self.inner.token_label
    }
}

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("module", &self.inner.module_path)
            .field("token_label", &self.inner.token_label)
            .field("key_label", &self.inner.key_label)
            .field("versions", &self.inner.versions())
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl KeyProvider for Pkcs11Provider {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    /// The highest version in the token as of the last refresh.
    fn primary_version(&self) -> KekVersion {
        // `open` and `init` guarantee one version, and a reload never empties the map (it
        // fails instead), so 0 is never seen.
        self.inner.primary().unwrap_or(KekVersion(0))
    }

    fn versions(&self) -> Vec<KekVersion> {
        self.inner.versions()
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey, CryptoError> {
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let aad = aad.to_vec();
        self.blocking(move |inner| inner.wrap(&plaintext, &aad))
            .await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        // Malformed input is refused before it costs an HSM call.
        WRAP.parse(&wrapped.bytes, wrapped.kek_version)?;
        let wrapped = wrapped.clone();
        let aad = aad.to_vec();
        self.blocking(move |inner| inner.unwrap(&wrapped, &aad))
            .await
    }

    /// Generates the next version inside the HSM (after looking at the token, so a version
    /// another replica created is not made twice) and makes it primary.
    async fn rotate(&self) -> Result<KekVersion, CryptoError> {
        self.blocking(|inner| {
            inner.with_session(|inner, session| {
                inner.reload(session)?;
                let last = inner.primary().map_or(0, |v| v.0);
                let next = last.checked_add(1).ok_or_else(|| {
                    Failure::Crypto(CryptoError::Hsm(
                        "no KEK version left after u32::MAX".to_owned(),
                    ))
                })?;
                inner.generate(session, KekVersion(next))
            })
        })
        .await
    }

    /// Destroys the version's object in the token (`C_DestroyObject`). Refuses the primary
    /// version as the token shows it now, and versions the token does not hold.
    async fn retire(&self, version: KekVersion) -> Result<(), CryptoError> {
        self.blocking(move |inner| {
            inner.with_session(|inner, session| {
                inner.reload(session)?;
                if inner.primary() == Some(version) {
                    return Err(Failure::Crypto(CryptoError::Keyring(format!(
                        "KEK version {} is primary in token '{}'; rotate before retiring it",
                        version.0, inner.token_label
                    ))));
                }
                let handle = inner.handle(version)?;
                session
                    .destroy_object(handle)
                    .map_err(|e| Failure::Call("C_DestroyObject", e))?;
                inner.write_keks().remove(&version);
                Ok(())
            })
        })
        .await
    }

    /// Finds the KEK objects in the token again (another replica rotated or retired).
    async fn refresh(&self) -> Result<(), CryptoError> {
        self.blocking(|inner| inner.with_session(|inner, session| inner.reload(session)))
            .await
    }
}

impl Pkcs11Provider {
    /// Runs `call` on tokio's blocking pool: PKCS#11 calls block the thread.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Inner) -> Result<T, CryptoError> + Send + 'static,
    ) -> Result<T, CryptoError> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || call(&inner)).await {
            Ok(result) => result,
            // A panic in the call is re-raised here, as if the call had run inline.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(CryptoError::Hsm(
                "the PKCS#11 call was cancelled (runtime shutting down)".to_owned(),
            )),
        }
    }
}

/// Why an operation on a session failed.
enum Failure {
    /// A PKCS#11 call failed (named by the `&str`).
    Call(&'static str, P11Error),
    /// A handle we hold no longer names the object we think it does.
    Stale,
    /// A definite answer (wrong tag, unknown version, refusal): returned as is, never retried.
    Crypto(CryptoError),
}

impl From<CryptoError> for Failure {
    fn from(e: CryptoError) -> Self {
        Failure::Crypto(e)
    }
}

impl Failure {
    /// Whether our sessions, login or handles may be out of date, so that starting over with
    /// a fresh session and a fresh look at the token can succeed: the token dropped our
    /// sessions (restart, removal), logged the process out, or another replica destroyed a
    /// KEK we still had a handle for.
    fn is_stale(&self) -> bool {
        match self {
            Failure::Stale => true,
            Failure::Call(_, P11Error::Pkcs11(rv, _)) => matches!(
                rv,
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent
                    | RvError::UserNotLoggedIn
                    | RvError::KeyHandleInvalid
                    | RvError::ObjectHandleInvalid
            ),
            _ => false,
        }
    }
}

impl Inner {
    /// Loads the module, finds the token, logs in and finds the KEK objects.
    fn connect(config: Pkcs11Config) -> Result<Inner, CryptoError> {
        let Pkcs11Config {
            module: module_path,
            token_label,
            pin,
            key_label,
        } = config;
        if token_label.is_empty() {
            return Err(CryptoError::Hsm("the token label is empty".to_owned()));
        }
        if !valid_key_label(&key_label) {
            return Err(CryptoError::Hsm(
                "the KEK label prefix must be 1 to 64 printable ASCII characters".to_owned(),
            ));
        }
        if pin.is_empty() {
            return Err(CryptoError::Hsm(format!(
                "the PIN of token '{token_label}' is empty"
            )));
        }
        let module = Module::load(&module_path)?;
        let slot = module.find_slot(&module_path, &token_label)?;
        let inner = Inner {
            module,
            module_path,
            slot,
            token_label,
            key_label,
            pin: AuthPin::from(pin.as_str()),
            idle: Mutex::new(Vec::new()),
            keks: RwLock::new(BTreeMap::new()),
        };
        inner.with_session(|inner, session| inner.reload(session))?;
        Ok(inner)
    }

    fn versions(&self) -> Vec<KekVersion> {
        self.read_keks().keys().copied().collect()
    }

    fn primary(&self) -> Option<KekVersion> {
        self.read_keks().keys().next_back().copied()
    }

    fn handle(&self, version: KekVersion) -> Result<ObjectHandle, Failure> {
        self.read_keks()
            .get(&version)
            .copied()
            .ok_or(Failure::Crypto(CryptoError::UnknownKekVersion(version.0)))
    }

    fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey, CryptoError> {
        self.with_session(|inner, session| {
            let version = inner.primary().ok_or_else(|| {
                Failure::Crypto(CryptoError::Hsm(format!(
                    "no KEK left in token '{}'",
                    inner.token_label
                )))
            })?;
            let handle = inner.handle(version)?;
            // Some HSMs reuse the handle of a destroyed object. A wrapping sealed by another
            // key than the version it names could never be opened, so check before sealing.
            inner.check_handle(session, handle, version)?;
            let mut iv = [0u8; NONCE_LEN];
            fill_random(&mut iv)?;
            let full_aad = WRAP.aad(version, aad);
            let sealed = {
                let params = GcmParams::new(&mut iv, &full_aad, Ulong::new(TAG_BITS))
                    .map_err(|e| Failure::Call("CK_GCM_PARAMS", e))?;
                session
                    .encrypt(&Mechanism::AesGcm(params), handle, plaintext)
                    .map_err(|e| Failure::Call("C_Encrypt", e))?
            };
            // `iv` is read after the call: an HSM that insists on choosing the IV itself (FIPS
            // mode) writes it back into the parameters.
            if sealed.len() != plaintext.len() + TAG_LEN {
                return Err(Failure::Crypto(CryptoError::Hsm(format!(
                    "C_Encrypt with CKM_AES_GCM returned {} bytes for {} bytes of plaintext",
                    sealed.len(),
                    plaintext.len()
                ))));
            }
            let mut bytes = WRAP.header(version, &iv, sealed.len());
            bytes.extend_from_slice(&sealed);
            Ok(WrappedKey {
                kek_version: version,
                bytes,
            })
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let parsed = WRAP.parse(&wrapped.bytes, wrapped.kek_version)?;
        let full_aad = WRAP.aad(parsed.version, aad);
        self.with_session(|inner, session| {
            let handle = inner.handle(parsed.version)?;
            // C_Decrypt takes a mutable IV (for HSMs that write theirs back); ours is a copy.
            let mut iv = *parsed.nonce;
            let params = GcmParams::new(&mut iv, &full_aad, Ulong::new(TAG_BITS))
                .map_err(|e| Failure::Call("CK_GCM_PARAMS", e))?;
            match session.decrypt(&Mechanism::AesGcm(params), handle, parsed.sealed) {
                Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                Err(e) if is_auth_failure(&e) => {
                    // A stale handle (reused for another object) fails like a wrong tag; only a
                    // handle that still names this version makes it a real authentication
                    // failure. The call also proves the session and token still answer.
                    inner.check_handle(session, handle, parsed.version)?;
                    Err(Failure::Crypto(CryptoError::Unwrap))
                }
                Err(e) => Err(Failure::Call("C_Decrypt", e)),
            }
        })
    }

    /// Runs `op` on a logged-in session. If our view of the token went stale (see
    /// [`Failure::is_stale`]), drops every idle session and tries once more with a new session
    /// and a fresh look at the KEK objects.
    fn with_session<T>(
        &self,
        mut op: impl FnMut(&Inner, &Session) -> Result<T, Failure>,
    ) -> Result<T, CryptoError> {
        let session = match self.idle().pop() {
            Some(session) => session,
            None => self.open_session().map_err(|f| self.error(f))?,
        };
        match op(self, &session) {
            Ok(value) => {
                self.put_back(session);
                Ok(value)
            }
            Err(failure) if failure.is_stale() => {
                drop(session);
                self.idle().clear();
                let session = self.open_session().map_err(|f| self.error(f))?;
                let retried = self.reload(&session).and_then(|()| op(self, &session));
                if !matches!(&retried, Err(f) if f.is_stale()) {
                    self.put_back(session);
                }
                retried.map_err(|f| self.error(f))
            }
            Err(failure) => {
                self.put_back(session);
                Err(self.error(failure))
            }
        }
    }

    fn open_session(&self) -> Result<Session, Failure> {
        let session = self
            .module
            .context
            .open_rw_session(self.slot)
            .map_err(|e| Failure::Call("C_OpenSession", e))?;
        self.module.login(&session, self.slot, &self.pin)?;
        Ok(session)
    }

    fn put_back(&self, session: Session) {
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
    }

    /// Finds every KEK object in the token and replaces the map with them (unless there are
    /// none left, which is an error once any were known).
    ///
    /// Looks at all secret keys of the token (PKCS#11 cannot search by label prefix), which
    /// is cheap for a partition dedicated to the vault. Objects whose label is not
    /// `<key_label>-v<N>` are someone else's and ignored; ours must be sensitive,
    /// non-extractable AES-256 keys with the matching `CKA_ID`, one per version.
    fn reload(&self, session: &Session) -> Result<(), Failure> {
        let objects = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
            ])
            .map_err(|e| Failure::Call("C_FindObjects", e))?;
        let mut keks = BTreeMap::new();
        for handle in objects {
            let attributes = session
                .get_attributes(
                    handle,
                    &[
                        AttributeType::Label,
                        AttributeType::Id,
                        AttributeType::KeyType,
                        AttributeType::ValueLen,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                    ],
                )
                .map_err(|e| Failure::Call("C_GetAttributeValue", e))?;
            let found = Found::from(attributes);
            let Some(version) = found
                .label
                .as_deref()
                .and_then(|label| parse_label(&self.key_label, label))
            else {
                continue;
            };
            let label = kek_label(&self.key_label, version);
            if found.id.as_deref() != Some(&version.0.to_be_bytes()[..]) {
                return Err(Failure::Crypto(CryptoError::Hsm(format!(
                    "object {label} in token '{}' has a CKA_ID other than {} (4 bytes big-endian); \
                     refusing a KEK whose label and id disagree",
                    self.token_label, version.0
                ))));
            }
            let is_aes256 = found.key_type == Some(KeyType::AES)
                && found.value_len == Some(Ulong::new(KEK_BYTES));
            if !is_aes256 || found.sensitive != Some(true) || found.extractable != Some(false) {
                return Err(Failure::Crypto(CryptoError::Hsm(format!(
                    "object {label} in token '{}' is not a sensitive, non-extractable AES-256 \
                     key; refusing to use it as a KEK",
                    self.token_label
                ))));
            }
            if keks.insert(version, handle).is_some() {
                return Err(Failure::Crypto(CryptoError::Hsm(format!(
                    "token '{}' holds two objects labelled {label}; destroy the one not used",
                    self.token_label
                ))));
            }
        }
        let mut known = self.write_keks();
        if keks.is_empty() && !known.is_empty() {
            // Every KEK destroyed behind our back: keep failing loudly rather than forget the
            // versions (and report a primary version 0).
            return Err(Failure::Crypto(CryptoError::Hsm(format!(
                "token '{}' no longer holds any KEK labelled {}-v<N>",
                self.token_label, self.key_label
            ))));
        }
        *known = keks;
        Ok(())
    }

    /// Generates KEK `version` inside the token and adds it to the map.
    fn generate(&self, session: &Session, version: KekVersion) -> Result<KekVersion, Failure> {
        let label = kek_label(&self.key_label, version);
        let handle = session
            .generate_key(&Mechanism::AesKeyGen, &kek_template(&label, version))
            .map_err(|e| Failure::Call("C_GenerateKey", e))?;
        // Another replica rotating at the same moment may have made the same version; two
        // objects with one label would stop every replica at its next refresh, so undo ours.
        let same = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .map_err(|e| Failure::Call("C_FindObjects", e))?;
        if same.len() != 1 {
            session
                .destroy_object(handle)
                .map_err(|e| Failure::Call("C_DestroyObject", e))?;
            return Err(Failure::Crypto(CryptoError::Hsm(format!(
                "another process created {label} in token '{}' at the same time; refresh and \
                 retry",
                self.token_label
            ))));
        }
        self.write_keks().insert(version, handle);
        Ok(version)
    }

    /// Fails with [`Failure::Stale`] unless `handle` still names KEK `version`.
    fn check_handle(
        &self,
        session: &Session,
        handle: ObjectHandle,
        version: KekVersion,
    ) -> Result<(), Failure> {
        let attributes = session
            .get_attributes(handle, &[AttributeType::Label, AttributeType::Id])
            .map_err(|e| Failure::Call("C_GetAttributeValue", e))?;
        let found = Found::from(attributes);
        let label = kek_label(&self.key_label, version);
        if found.label.as_deref() == Some(label.as_str())
            && found.id.as_deref() == Some(&version.0.to_be_bytes()[..])
        {
            Ok(())
        } else {
            Err(Failure::Stale)
        }
    }

    fn error(&self, failure: Failure) -> CryptoError {
        match failure {
            Failure::Crypto(e) => e,
            Failure::Call(what, e) => CryptoError::Hsm(format!(
                "{what} on token '{}' failed: {}",
                self.token_label,
                describe(&e)
            )),
            Failure::Stale => CryptoError::Hsm(format!(
                "the KEK objects in token '{}' changed during the call; retry",
                self.token_label
            )),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Session>> {
        // Nothing panics while holding these locks, so a poisoned one is still consistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_keks(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<KekVersion, ObjectHandle>> {
        self.keks.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_keks(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<KekVersion, ObjectHandle>> {
        self.keks.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The attributes [`Inner::reload`] and [`Inner::check_handle`] read.
#[derive(Default)]
struct Found {
    label: Option<String>,
    id: Option<Vec<u8>>,
    key_type: Option<KeyType>,
    value_len: Option<Ulong>,
    sensitive: Option<bool>,
    extractable: Option<bool>,
}

impl From<Vec<Attribute>> for Found {
    fn from(attributes: Vec<Attribute>) -> Self {
        let mut found = Found::default();
        for attribute in attributes {
            match attribute {
                Attribute::Label(bytes) => found.label = String::from_utf8(bytes).ok(),
                Attribute::Id(bytes) => found.id = Some(bytes),
                Attribute::KeyType(t) => found.key_type = Some(t),
                Attribute::ValueLen(n) => found.value_len = Some(n),
                Attribute::Sensitive(b) => found.sensitive = Some(b),
                Attribute::Extractable(b) => found.extractable = Some(b),
                _ => {}
            }
        }
        found
    }
}

/// A loaded, initialized PKCS#11 module, shared by every provider of the process.
struct Module {
    context: Pkcs11,
    /// For each slot this process logged in to: a SHA-256 of the PIN it used.
    ///
    /// PKCS#11 logs in the whole process, not a session, so a second provider's `C_Login`
    /// answers "already logged in" whatever PIN it passes. The digest lets that provider
    /// prove it knows the same PIN instead of riding on the first one's login.
    logins: Mutex<HashMap<u64, [u8; 32]>>,
}

impl Module {
    /// The process-wide instance for `path`, loaded and initialized on first use.
    ///
    /// `C_Initialize` may be called once per module per process, and unloading a module
    /// another provider still uses would pull its code away, so modules stay loaded (and
    /// initialized) until the process exits.
    fn load(path: &Path) -> Result<Arc<Module>, CryptoError> {
        static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
        // One entry per file, however it is named (symlinks, relative paths).
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            CryptoError::io(format!("cannot find PKCS#11 module {}", path.display()), e)
        })?;
        let mut modules = MODULES
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(module) = modules.get(&canonical) {
            return Ok(module.clone());
        }
        let context = Pkcs11::new(&canonical).map_err(|e| {
            CryptoError::Hsm(format!(
                "cannot load PKCS#11 module {}: {}",
                path.display(),
                describe(&e)
            ))
        })?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Already initialized: other code of this process uses the module too.
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(CryptoError::Hsm(format!(
                    "cannot initialize PKCS#11 module {}: {}",
                    path.display(),
                    describe(&e)
                )));
            }
        }
        let module = Arc::new(Module {
            context,
            logins: Mutex::default(),
        });
        modules.insert(canonical, module.clone());
        Ok(module)
    }

    /// The one slot whose token carries `label`.
    fn find_slot(&self, path: &Path, label: &str) -> Result<Slot, CryptoError> {
        let failed = |what: &str, e: P11Error| {
            CryptoError::Hsm(format!(
                "{what} of PKCS#11 module {} failed: {}",
                path.display(),
                describe(&e)
            ))
        };
        let slots = self
            .context
            .get_slots_with_token()
            .map_err(|e| failed("C_GetSlotList", e))?;
        let mut labels = Vec::new();
        let mut matching = Vec::new();
        for slot in slots {
            let info = self
                .context
                .get_token_info(slot)
                .map_err(|e| failed("C_GetTokenInfo", e))?;
            if info.label() == label {
                matching.push(slot);
            }
            labels.push(format!("'{}'", info.label()));
        }
        match matching.as_slice() {
            [slot] => Ok(*slot),
            [] => Err(CryptoError::Hsm(format!(
                "no token labelled '{label}' in PKCS#11 module {} (tokens: {})",
                path.display(),
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            ))),
            _ => Err(CryptoError::Hsm(format!(
                "{} tokens are labelled '{label}' in PKCS#11 module {}; labels must be unique",
                matching.len(),
                path.display()
            ))),
        }
    }

    /// Logs the process in to `slot` as the user, through `session`.
    fn login(&self, session: &Session, slot: Slot, pin: &AuthPin) -> Result<(), Failure> {
        use secrecy::ExposeSecret;
        let digest = ring::digest::digest(&ring::digest::SHA256, pin.expose_secret().as_bytes());
        let mut digest_bytes = [0u8; 32];
        digest_bytes.copy_from_slice(digest.as_ref());
        // Held across C_Login so the login and its record cannot interleave with another's.
        let mut logins = self.logins.lock().unwrap_or_else(PoisonError::into_inner);
        match session.login(UserType::User, Some(pin)) {
            Ok(()) => {
                logins.insert(slot.id(), digest_bytes);
                Ok(())
            }
            Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                // Comparing digests of PINs, not PINs: timing reveals nothing useful.
                if logins.get(&slot.id()) == Some(&digest_bytes) {
                    Ok(())
                } else {
                    Err(Failure::Crypto(CryptoError::Hsm(
                        "the token is already logged in by this process with another PIN \
                         (or by other code); refusing to use a PIN it cannot check"
                            .to_owned(),
                    )))
                }
            }
            Err(e) => Err(Failure::Call("C_Login", e)),
        }
    }
}

/// Whether a failed `C_Decrypt` means "this ciphertext does not authenticate".
///
/// PKCS#11 has no one code for it: `CKR_ENCRYPTED_DATA_INVALID` (2.40), `CKR_AEAD_DECRYPT_FAILED`
/// (3.0), and SoftHSM2 (2.6) answers `CKR_GENERAL_ERROR`. The caller confirms with a second
/// call that the key and session are fine, so a sick device still surfaces as an HSM error.
fn is_auth_failure(e: &P11Error) -> bool {
    match e {
        P11Error::Pkcs11(rv, Function::Decrypt) => match rv {
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError => true,
            RvError::UnknownErrorCode(code) => *code == CKR_AEAD_DECRYPT_FAILED,
            _ => false,
        },
        _ => false,
    }
}

fn kek_label(prefix: &str, version: KekVersion) -> String {
    format!("{prefix}-v{}", version.0)
}

/// The version of a label `<prefix>-v<N>` (N ≥ 1, decimal, no leading zeros), if it is one.
fn parse_label(prefix: &str, label: &str) -> Option<KekVersion> {
    let digits = label.strip_prefix(prefix)?.strip_prefix("-v")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(KekVersion)
}

fn valid_key_label(prefix: &str) -> bool {
    (1..=64).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_graphic())
}

/// The attributes of a new KEK: generated in the token, usable only to encrypt and decrypt,
/// never readable or exportable, and not changeable or copyable afterwards.
fn kek_template(label: &str, version: KekVersion) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::new(KEK_BYTES)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(version.0.to_be_bytes().to_vec()),
    ]
}

/// A short description of a cryptoki error: the function and return code (cryptoki's own
/// `Display` quotes paragraphs of the specification).
fn describe(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

fn list(versions: &[KekVersion]) -> String {
    versions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_pin_file(path: &Path) -> Result<Zeroizing<String>, CryptoError> {
    let bytes = crate::secret_file::read(path, MAX_PIN_FILE_BYTES)
        .map_err(|e| CryptoError::Hsm(format!("PIN file: {e}")))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| CryptoError::Hsm(format!("PIN file {} is not valid UTF-8", path.display())))?;
    let line = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text);
    checked_pin(line, &format!("PIN file {}", path.display()))
}

fn read_pin_env(name: &str) -> Result<Zeroizing<String>, CryptoError> {
    let value = std::env::var_os(name)
        .ok_or_else(|| CryptoError::Hsm(format!("environment variable {name} is not set")))?;
    let value = Zeroizing::new(value.into_string().map_err(|_| {
        CryptoError::Hsm(format!("environment variable {name} is not valid UTF-8"))
    })?);
    checked_pin(&value, &format!("environment variable {name}"))
}

/// Refuses an empty PIN or one spanning lines (the wrong file, most likely), naming `source`
/// but never the contents.
fn checked_pin(pin: &str, source: &str) -> Result<Zeroizing<String>, CryptoError> {
    if pin.is_empty() {
        return Err(CryptoError::Hsm(format!("{source} holds an empty PIN")));
    }
    if pin.contains(['\n', '\r']) {
        return Err(CryptoError::Hsm(format!(
            "{source} holds more than one line; it must hold only the PIN"
        )));
    }
    let mut out = Zeroizing::new(String::with_capacity(pin.len()));
    out.push_str(pin);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn wrapped(version: u32, sealed_len: usize) -> Vec<u8> {
        let mut bytes = vec![PKCS11_WRAP_FORMAT_V1];
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&[7u8; NONCE_LEN]);
        bytes.extend(std::iter::repeat_n(9u8, sealed_len));
        bytes
    }

    #[test]
    fn parsing_splits_header_iv_and_sealed_bytes() {
        let bytes = wrapped(3, 32 + TAG_LEN);
        let parsed = WRAP.parse(&bytes, KekVersion(3)).unwrap();
        assert_eq!(parsed.version, KekVersion(3));
        assert_eq!(parsed.nonce, &[7u8; NONCE_LEN]);
        assert_eq!(parsed.sealed.len(), 32 + TAG_LEN);
        // An empty plaintext still has a tag.
        assert!(WRAP.parse(&wrapped(3, TAG_LEN), KekVersion(3)).is_ok());
    }

    #[test]
    fn parsing_refuses_every_truncation_without_panicking() {
        let bytes = wrapped(1, TAG_LEN);
        for len in 0..bytes.len() {
            let err = WRAP.parse(&bytes[..len], KekVersion(1)).unwrap_err();
            assert!(
                matches!(err, CryptoError::Malformed(_)),
                "length {len}: {err:?}"
            );
        }
    }

    #[test]
    fn parsing_refuses_another_format() {
        let mut bytes = wrapped(1, TAG_LEN);
        bytes[0] = 1; // the local keyring's format
        assert!(matches!(
            WRAP.parse(&bytes, KekVersion(1)).unwrap_err(),
            CryptoError::UnknownFormat { version: 1, .. }
        ));
    }

    #[test]
    fn a_header_version_other_than_the_claimed_one_is_an_unwrap_failure() {
        let bytes = wrapped(2, TAG_LEN);
        assert!(matches!(
            WRAP.parse(&bytes, KekVersion(1)).unwrap_err(),
            CryptoError::Unwrap
        ));
    }

    #[test]
    fn the_aad_binds_label_version_and_caller_context() {
        let aad = WRAP.aad(KekVersion(0x0102_0304), b"ctx");
        assert_eq!(&aad[..16], b"cardvault.p11.v1");
        assert_eq!(&aad[16..20], &[1, 2, 3, 4]);
        assert_eq!(&aad[20..], b"ctx");
    }

    #[test]
    fn labels_parse_only_in_their_canonical_form() {
        assert_eq!(
            kek_label("cardvault-kek", KekVersion(12)),
            "cardvault-kek-v12"
        );
        assert_eq!(
            parse_label("cardvault-kek", "cardvault-kek-v12"),
            Some(KekVersion(12))
        );
        for other in [
            "cardvault-kek-v0",
            "cardvault-kek-v01",
            "cardvault-kek-v",
            "cardvault-kek-v1x",
            "cardvault-kek-v+1",
            "cardvault-kek-v99999999999",
            "cardvault-kek2-v1",
            "cardvault-kek",
            "other-v1",
        ] {
            assert_eq!(parse_label("cardvault-kek", other), None, "{other}");
        }
    }

    #[test]
    fn key_label_prefixes_must_be_printable_ascii() {
        assert!(valid_key_label(DEFAULT_KEY_LABEL));
        assert!(!valid_key_label(""));
        assert!(!valid_key_label("with space"));
        assert!(!valid_key_label("café"));
        assert!(!valid_key_label(&"x".repeat(65)));
    }

    #[test]
    fn the_template_makes_a_sensitive_non_extractable_aes_256_key() {
        let template = kek_template("p-v7", KekVersion(7));
        for expected in [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::ValueLen(Ulong::new(32)),
            Attribute::Label(b"p-v7".to_vec()),
            Attribute::Id(vec![0, 0, 0, 7]),
        ] {
            assert!(template.contains(&expected), "{expected:?}");
        }
    }

    fn pin_file(contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir, path)
    }

    #[test]
    fn a_pin_file_loses_one_trailing_newline_only() {
        for (contents, pin) in [
            (&b"1234"[..], "1234"),
            (b"1234\n", "1234"),
            (b"1234\r\n", "1234"),
            (b" 12 34 ", " 12 34 "),
        ] {
            let (_dir, path) = pin_file(contents);
            let read = PinSource::File(path).read().unwrap();
            assert_eq!(read.as_str(), pin);
        }
    }

    #[test]
    fn a_bad_pin_file_is_refused_without_quoting_it() {
        for contents in [
            &b""[..],
            b"\n",
            b"s3cret-pin\n\n",
            b"s3cret-pin\nsecond",
            b"\xff\xfe",
        ] {
            let (_dir, path) = pin_file(contents);
            let err = PinSource::File(path.clone())
                .read()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        let (_dir, path) = pin_file(&[b'1'; MAX_PIN_FILE_BYTES as usize + 1]);
        assert!(PinSource::File(path).read().is_err());
        let missing = PinSource::File(PathBuf::from("/nonexistent/pin"));
        assert!(
            missing
                .read()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/pin")
        );
    }

    #[test]
    fn a_pin_from_the_environment_is_read_by_name() {
        // PATH is always set; reading it proves the lookup without setting variables (which
        // is unsafe in edition 2024).
        let path = std::env::var("PATH").unwrap();
        assert_eq!(PinSource::Env("PATH".into()).read().unwrap().as_str(), path);
        let err = PinSource::Env("CARDVAULT_TEST_SURELY_UNSET_PIN".into())
            .read()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("CARDVAULT_TEST_SURELY_UNSET_PIN is not set"),
            "{err}"
        );
    }

    #[test]
    fn config_debug_leaves_the_pin_out() {
        let config = Pkcs11Config {
            module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
            token_label: "vault".into(),
            pin: Zeroizing::new("hunter2-pin".into()),
            key_label: DEFAULT_KEY_LABEL.into(),
        };
        let debug = format!("{config:?}");
        assert!(debug.contains("libsofthsm2.so"), "{debug}");
        assert!(debug.contains("vault"), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.ends_with(".. }"), "{debug}");
    }

    #[test]
    fn a_missing_module_is_named() {
        let config = Pkcs11Config {
            module: PathBuf::from("/nonexistent/libpkcs11.so"),
            token_label: "vault".into(),
            pin: Zeroizing::new("hunter2-pin".into()),
            key_label: DEFAULT_KEY_LABEL.into(),
        };
        let err = Pkcs11Provider::open(config).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/libpkcs11.so"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn errors_name_the_call_and_code_briefly() {
        let e = P11Error::Pkcs11(RvError::PinIncorrect, Function::Login);
        assert_eq!(describe(&e), "Login returned PinIncorrect");
        assert!(is_auth_failure(&P11Error::Pkcs11(
            RvError::EncryptedDataInvalid,
            Function::Decrypt
        )));
        assert!(is_auth_failure(&P11Error::Pkcs11(
            RvError::UnknownErrorCode(CKR_AEAD_DECRYPT_FAILED),
            Function::Decrypt
        )));
        // SoftHSM2's answer to a wrong tag.
        assert!(is_auth_failure(&P11Error::Pkcs11(
            RvError::GeneralError,
            Function::Decrypt
        )));
        assert!(!is_auth_failure(&P11Error::Pkcs11(
            RvError::GeneralError,
            Function::DecryptInit
        )));
        assert!(!is_auth_failure(&P11Error::Pkcs11(
            RvError::DeviceError,
            Function::Decrypt
        )));
    }
}
