//! The `pkcs11` key provider against a real SoftHSM2 token, and the `cardvault` binary serving
//! cards whose KEK lives in that token.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, and a test may not set its own
//! process's environment (`set_var` is unsafe in edition 2024, and the crate forbids unsafe).
//! So every provider test re-runs this test binary, filtered to itself, with `SOFTHSM2_CONF`
//! pointing at a fresh token in a temporary directory; the child (which sees
//! `CV_PKCS11_CHILD`) runs the test body, and the parent fails with the child's output unless
//! exactly that one test passed. Each test thus gets its own token and its own process-wide
//! PKCS#11 state (logins, loaded module).

use cardvault_test_support::{serve, softhsm};

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Output},
    sync::Arc,
    time::{Duration, Instant},
};

use cardvault::crypto::{
    CryptoError, DEFAULT_KEY_LABEL, KekVersion, KeyProvider, PKCS11_WRAP_FORMAT_V1, PinSource,
    Pkcs11Config, Pkcs11Provider, WrappedKey,
};
use cardvault::pb::v1::{self as pb, card_vault_client::CardVaultClient};
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as P11Error, RvError},
    mechanism::Mechanism,
    object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    types::AuthPin,
};
use softhsm::SoftHsm;
use tonic::transport::Channel;

/// Set in the child process to the directory of its token.
const CHILD_MARKER: &str = "CV_PKCS11_CHILD";

/// Runs `body` in a child process against a fresh token (see the module docs).
fn with_token<F: Future<Output = ()>>(test: &str, body: impl FnOnce(SoftHsm) -> F) {
    if let Some(dir) = std::env::var_os(CHILD_MARKER) {
        let hsm = SoftHsm::existing(Path::new(&dir));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(body(hsm));
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let hsm = SoftHsm::create(dir.path());
    let output = Command::new(std::env::current_exe().expect("path of this test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env(CHILD_MARKER, dir.path())
        .output()
        .expect("run the test in a child process");
    let (stdout, stderr) = texts(&output);
    // The child's diagnostics (timings) show with --nocapture, and with any failure.
    eprint!("{stderr}");
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child running `{test}` failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

/// A test whose body runs in a child process with a fresh token bound to `$hsm`.
macro_rules! softhsm_test {
    ($(#[$meta:meta])* async fn $name:ident($hsm:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            with_token(stringify!($name), |$hsm: SoftHsm| async move $body);
        }
    };
}

fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The provider configuration for `hsm`, with the PIN read the way the binary reads it.
fn config(hsm: &SoftHsm) -> Pkcs11Config {
    Pkcs11Config {
        module: hsm.module.clone(),
        token_label: hsm.token_label.clone(),
        pin: PinSource::File(hsm.pin_file.clone())
            .read()
            .expect("read the PIN file"),
        key_label: DEFAULT_KEY_LABEL.to_owned(),
    }
}

fn init(hsm: &SoftHsm) -> Arc<dyn KeyProvider> {
    Arc::new(Pkcs11Provider::init(config(hsm)).expect("init"))
}

fn open(hsm: &SoftHsm) -> Arc<dyn KeyProvider> {
    Arc::new(Pkcs11Provider::open(config(hsm)).expect("open"))
}

/// A session of our own on the token, beside the provider's (same process, so the same
/// login), for looking at the key objects the way an HSM administrator would.
fn admin_session(hsm: &SoftHsm) -> (Pkcs11, Session) {
    let context = Pkcs11::new(&hsm.module).expect("load the module");
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // The provider initialized it already.
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = context
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|slot| context.get_token_info(*slot).expect("token info").label() == hsm.token_label)
        .expect("the test token");
    let session = context.open_rw_session(slot).expect("open a session");
    match session.login(UserType::User, Some(&AuthPin::from(hsm.pin()))) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    (context, session)
}

fn kek_objects(session: &Session, version: u32) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(format!("{DEFAULT_KEY_LABEL}-v{version}").into_bytes()),
        ])
        .expect("find objects")
}

softhsm_test! {
    /// `init` makes version 1 in the token, `open` finds it, and a second `init` refuses to
    /// make another version 1.
    async fn init_creates_version_1_that_open_finds_and_init_refuses_twice(hsm) {
        let provider = init(&hsm);
        assert_eq!(provider.name(), "pkcs11");
        assert_eq!(provider.primary_version(), KekVersion(1));
        assert_eq!(provider.versions(), vec![KekVersion(1)]);

        let opened = open(&hsm);
        assert_eq!(opened.versions(), vec![KekVersion(1)]);

        let err = Pkcs11Provider::init(config(&hsm)).unwrap_err();
        assert!(matches!(err, CryptoError::Hsm(_)), "{err:?}");
        assert!(err.to_string().contains("already holds KEK versions v1"), "{err}");
        let (_context, session) = admin_session(&hsm);
        assert_eq!(kek_objects(&session, 1).len(), 1, "still one version 1");
    }
}

softhsm_test! {
    /// Opening a token without a KEK says how to make one.
    async fn open_of_a_token_without_a_kek_says_to_run_keys_init(hsm) {
        let err = Pkcs11Provider::open(config(&hsm)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("no KEK in token 'cardvault-test'"), "{message}");
        assert!(message.contains("run `cardvault keys init`"), "{message}");
    }
}

softhsm_test! {
    /// A wrapped key opens with the same AAD, is self-describing, and every wrapping draws a
    /// fresh IV. Also prints what a wrap and an unwrap cost against SoftHSM2.
    async fn wrap_then_unwrap_round_trips_inside_the_hsm(hsm) {
        let provider = init(&hsm);
        let key = [0x5au8; 32];
        let wrapped = provider.wrap(&key, b"dek-1|tenant-a").await.unwrap();
        assert_eq!(wrapped.kek_version, KekVersion(1));
        assert_eq!(wrapped.bytes[0], PKCS11_WRAP_FORMAT_V1);
        assert_eq!(&wrapped.bytes[1..5], &1u32.to_be_bytes());
        assert_eq!(wrapped.bytes.len(), 1 + 4 + 12 + 32 + 16);
        assert!(
            !wrapped.bytes.windows(32).any(|w| w == key),
            "the key is not in the wrapping"
        );
        let back = provider.unwrap(&wrapped, b"dek-1|tenant-a").await.unwrap();
        assert_eq!(back.as_slice(), &key);

        let again = provider.wrap(&key, b"dek-1|tenant-a").await.unwrap();
        assert_ne!(again.bytes[5..17], wrapped.bytes[5..17], "fresh IV");
        assert_ne!(again.bytes, wrapped.bytes);
        let empty = provider.wrap(b"", b"").await.unwrap();
        assert!(provider.unwrap(&empty, b"").await.unwrap().is_empty());

        let rounds = 1000u32;
        let start = Instant::now();
        for _ in 0..rounds {
            let wrapped = provider.wrap(&key, b"aad").await.unwrap();
            provider.unwrap(&wrapped, b"aad").await.unwrap();
        }
        let elapsed = start.elapsed();
        eprintln!(
            "pkcs11 (SoftHSM2): {rounds} wrap+unwrap pairs of a 32-byte key in {elapsed:?}, \
             {:?} per pair",
            elapsed / rounds
        );
    }
}

softhsm_test! {
    /// Several callers at once each get their own session and their own answer.
    async fn concurrent_wraps_and_unwraps_all_succeed(hsm) {
        let provider = init(&hsm);
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..8u8 {
            let provider = provider.clone();
            tasks.spawn(async move {
                for round in 0..50u8 {
                    let key = [caller ^ round; 32];
                    let aad = [caller, round];
                    let wrapped = provider.wrap(&key, &aad).await.unwrap();
                    assert_eq!(provider.unwrap(&wrapped, &aad).await.unwrap().as_slice(), &key);
                }
            });
        }
        tasks.join_all().await;
    }
}

softhsm_test! {
    /// Wrong AAD, any flipped bit, a relabelled version or bytes in another format never
    /// unwrap, and each fails the way the trait documents.
    async fn wrong_aad_tampering_and_wrong_versions_fail_to_unwrap(hsm) {
        let provider = init(&hsm);
        let wrapped = provider.wrap(b"a data key", b"tenant-a").await.unwrap();

        let err = provider.unwrap(&wrapped, b"tenant-b").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap), "{err:?}");

        let header = 1 + 4;
        for position in header * 8..wrapped.bytes.len() * 8 {
            let mut tampered = wrapped.clone();
            tampered.bytes[position / 8] ^= 1 << (position % 8);
            let err = provider.unwrap(&tampered, b"tenant-a").await.unwrap_err();
            assert!(matches!(err, CryptoError::Unwrap), "bit {position}: {err:?}");
        }
        for position in 0..header * 8 {
            let mut tampered = wrapped.clone();
            tampered.bytes[position / 8] ^= 1 << (position % 8);
            assert!(provider.unwrap(&tampered, b"tenant-a").await.is_err(), "bit {position}");
        }
        for len in 0..wrapped.bytes.len() {
            let short = WrappedKey {
                kek_version: wrapped.kek_version,
                bytes: wrapped.bytes[..len].to_vec(),
            };
            let err = provider.unwrap(&short, b"tenant-a").await.unwrap_err();
            if len < header + 12 + 16 {
                assert!(matches!(err, CryptoError::Malformed(_)), "length {len}: {err:?}");
            } else {
                // Long enough to parse: a cut tag or ciphertext fails authentication.
                assert!(matches!(err, CryptoError::Unwrap), "length {len}: {err:?}");
            }
        }
        let mut local_format = wrapped.clone();
        local_format.bytes[0] = 1;
        assert!(matches!(
            provider.unwrap(&local_format, b"tenant-a").await.unwrap_err(),
            CryptoError::UnknownFormat { version: 1, .. }
        ));

        // The version the caller names must be the one in the bytes...
        provider.rotate().await.unwrap();
        let mut relabelled = wrapped.clone();
        relabelled.kek_version = KekVersion(2);
        let err = provider.unwrap(&relabelled, b"tenant-a").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap), "{err:?}");
        // ...and rewriting both does not help: the version is in the AAD, and v2 is another key.
        let mut rewritten = relabelled;
        rewritten.bytes[1..5].copy_from_slice(&2u32.to_be_bytes());
        let err = provider.unwrap(&rewritten, b"tenant-a").await.unwrap_err();
        assert!(matches!(err, CryptoError::Unwrap), "{err:?}");
        // A version the token never held.
        let mut unknown = wrapped.clone();
        unknown.kek_version = KekVersion(9);
        unknown.bytes[1..5].copy_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            provider.unwrap(&unknown, b"tenant-a").await.unwrap_err(),
            CryptoError::UnknownKekVersion(9)
        ));
        // None of this disturbed the provider.
        assert_eq!(
            provider.unwrap(&wrapped, b"tenant-a").await.unwrap().as_slice(),
            b"a data key"
        );
    }
}

softhsm_test! {
    /// Rotation makes a new primary inside the HSM; old wrappings still open and new ones use
    /// the new version.
    async fn rotation_makes_a_new_primary_and_old_wrappings_still_open(hsm) {
        let provider = init(&hsm);
        let old = provider.wrap(b"old", b"aad").await.unwrap();
        assert_eq!(provider.rotate().await.unwrap(), KekVersion(2));
        assert_eq!(provider.primary_version(), KekVersion(2));
        assert_eq!(provider.versions(), vec![KekVersion(1), KekVersion(2)]);
        let new = provider.wrap(b"new", b"aad").await.unwrap();
        assert_eq!(new.kek_version, KekVersion(2));
        assert_eq!(&new.bytes[1..5], &2u32.to_be_bytes());
        assert_eq!(provider.unwrap(&old, b"aad").await.unwrap().as_slice(), b"old");
        assert_eq!(provider.unwrap(&new, b"aad").await.unwrap().as_slice(), b"new");

        // The token is the record: a provider opened now sees both versions.
        let reopened = open(&hsm);
        assert_eq!(reopened.primary_version(), KekVersion(2));
        assert_eq!(reopened.unwrap(&old, b"aad").await.unwrap().as_slice(), b"old");
        let (_context, session) = admin_session(&hsm);
        let v2 = kek_objects(&session, 2);
        assert_eq!(v2.len(), 1);
        let id = session.get_attributes(v2[0], &[AttributeType::Id]).unwrap();
        assert_eq!(id, vec![Attribute::Id(vec![0, 0, 0, 2])]);
    }
}

softhsm_test! {
    /// Retiring refuses the primary and unknown versions, and destroys an old version's
    /// object, after which its wrappings fail with `UnknownKekVersion`.
    async fn retire_refuses_the_primary_then_destroys_an_old_version(hsm) {
        let provider = init(&hsm);
        let old = provider.wrap(b"old", b"aad").await.unwrap();
        let err = provider.retire(KekVersion(1)).await.unwrap_err();
        assert!(matches!(err, CryptoError::Keyring(_)), "{err:?}");
        assert!(err.to_string().contains("primary"), "{err}");

        provider.rotate().await.unwrap();
        let err = provider.retire(KekVersion(2)).await.unwrap_err();
        assert!(matches!(err, CryptoError::Keyring(_)), "{err:?}");
        assert!(matches!(
            provider.retire(KekVersion(7)).await.unwrap_err(),
            CryptoError::UnknownKekVersion(7)
        ));

        provider.retire(KekVersion(1)).await.unwrap();
        assert_eq!(provider.versions(), vec![KekVersion(2)]);
        assert!(matches!(
            provider.unwrap(&old, b"aad").await.unwrap_err(),
            CryptoError::UnknownKekVersion(1)
        ));
        assert!(matches!(
            provider.retire(KekVersion(1)).await.unwrap_err(),
            CryptoError::UnknownKekVersion(1)
        ));
        let (_context, session) = admin_session(&hsm);
        assert!(kek_objects(&session, 1).is_empty(), "v1 is gone from the token");
        assert_eq!(kek_objects(&session, 2).len(), 1);
    }
}

softhsm_test! {
    /// Two providers on one token (two replicas): one rotates and retires, the other sees it
    /// after `refresh`, and even before, a destroyed version fails cleanly.
    async fn a_second_instance_sees_rotation_and_retirement_after_refresh(hsm) {
        let first = init(&hsm);
        let second = open(&hsm);
        let old = second.wrap(b"old", b"aad").await.unwrap();

        assert_eq!(first.rotate().await.unwrap(), KekVersion(2));
        assert_eq!(second.primary_version(), KekVersion(1), "not refreshed yet");
        second.refresh().await.unwrap();
        assert_eq!(second.primary_version(), KekVersion(2));
        let new = second.wrap(b"new", b"aad").await.unwrap();
        assert_eq!(new.kek_version, KekVersion(2));
        assert_eq!(first.unwrap(&new, b"aad").await.unwrap().as_slice(), b"new");

        // The second instance rotates next: it looks at the token first, so it makes v3, not
        // another v2.
        assert_eq!(second.rotate().await.unwrap(), KekVersion(3));
        assert_eq!(first.primary_version(), KekVersion(2));
        first.refresh().await.unwrap();
        assert_eq!(first.versions(), vec![KekVersion(1), KekVersion(2), KekVersion(3)]);

        first.retire(KekVersion(1)).await.unwrap();
        // The second instance still lists v1, but its handle now names nothing: the unwrap
        // finds that out and reports the version as unknown, not as an HSM failure.
        assert!(matches!(
            second.unwrap(&old, b"aad").await.unwrap_err(),
            CryptoError::UnknownKekVersion(1)
        ));
        second.refresh().await.unwrap();
        assert_eq!(second.versions(), vec![KekVersion(2), KekVersion(3)]);
    }
}

softhsm_test! {
    /// The KEK objects, read back from the token, are sensitive, never extractable, made in
    /// the token, and usable only to encrypt and decrypt; the HSM refuses to reveal or export
    /// them, or to loosen their attributes.
    async fn kek_objects_are_sensitive_non_extractable_and_unexportable(hsm) {
        let _provider = init(&hsm);
        let (_context, session) = admin_session(&hsm);
        let objects = kek_objects(&session, 1);
        assert_eq!(objects.len(), 1);
        let kek = objects[0];
        let attributes = session
            .get_attributes(
                kek,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::AlwaysSensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Local,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Sign,
                    AttributeType::Derive,
                    AttributeType::Modifiable,
                    AttributeType::Id,
                ],
            )
            .unwrap();
        for expected in [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::AlwaysSensitive(true),
            Attribute::Extractable(false),
            Attribute::NeverExtractable(true),
            Attribute::Local(true),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
            Attribute::Id(vec![0, 0, 0, 1]),
        ] {
            assert!(attributes.contains(&expected), "{expected:?} in {attributes:?}");
        }
        // The value is not readable...
        assert!(matches!(
            session.get_attribute_info(kek, &[AttributeType::Value]).unwrap()[..],
            [AttributeInfo::Sensitive]
        ));
        // ...not exportable under another key...
        let wrapping_key = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Wrap(true),
                ],
            )
            .unwrap();
        let err = session
            .wrap_key(&Mechanism::AesKeyWrapPad, wrapping_key, kek)
            .unwrap_err();
        assert!(
            matches!(err, P11Error::Pkcs11(RvError::KeyUnextractable, _)),
            "{err}"
        );
        // ...and its attributes cannot be loosened.
        assert!(
            session
                .update_attributes(kek, &[Attribute::Extractable(true)])
                .is_err()
        );
        assert!(
            session
                .update_attributes(kek, &[Attribute::Sensitive(false)])
                .is_err()
        );
    }
}

softhsm_test! {
    /// Objects under the KEK label that are not proper KEKs (readable, or whose id disagrees
    /// with the label) stop a refresh instead of being used; lookalike labels are ignored; a
    /// token emptied behind the provider's back is an error, not a provider with no KEK.
    async fn objects_under_the_kek_label_must_be_proper_keks(hsm) {
        let provider = init(&hsm);
        let (_context, session) = admin_session(&hsm);
        let make = |label: &str, id: u32, sensitive: bool| {
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(sensitive),
                        Attribute::Extractable(!sensitive),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Label(label.as_bytes().to_vec()),
                        Attribute::Id(id.to_be_bytes().to_vec()),
                    ],
                )
                .expect("generate a key")
        };

        let readable = make("cardvault-kek-v2", 2, false);
        let err = provider.refresh().await.unwrap_err();
        assert!(err.to_string().contains("not a sensitive, non-extractable"), "{err}");
        assert_eq!(provider.versions(), vec![KekVersion(1)], "the known versions stay");
        let err = Pkcs11Provider::open(config(&hsm)).unwrap_err();
        assert!(err.to_string().contains("cardvault-kek-v2"), "{err}");
        session.destroy_object(readable).unwrap();

        let mislabelled = make("cardvault-kek-v2", 3, true);
        let err = provider.refresh().await.unwrap_err();
        assert!(err.to_string().contains("CKA_ID"), "{err}");
        session.destroy_object(mislabelled).unwrap();

        for lookalike in ["cardvault-kek-v02", "cardvault-kek2-v2", "cardvault-kek-v2b"] {
            make(lookalike, 2, false);
        }
        provider.refresh().await.unwrap();
        assert_eq!(provider.versions(), vec![KekVersion(1)]);

        for kek in kek_objects(&session, 1) {
            session.destroy_object(kek).unwrap();
        }
        let err = provider.refresh().await.unwrap_err();
        assert!(err.to_string().contains("no longer holds any KEK"), "{err}");
        assert_eq!(provider.primary_version(), KekVersion(1));
    }
}

softhsm_test! {
    /// A wrong PIN fails with the token's answer and without the PIN, both when nobody is
    /// logged in and when another provider of the process already is.
    async fn a_wrong_pin_fails_without_showing_any_pin(hsm) {
        let made = init(&hsm);
        drop(made); // closes its sessions, which logs the process out
        let wrong = "wrong-pin-4711";
        let attempt = |pin: &str| {
            Pkcs11Provider::open(Pkcs11Config {
                pin: zeroize::Zeroizing::new(pin.to_owned()),
                ..config(&hsm)
            })
        };
        let err = attempt(wrong).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(shown.contains("PinIncorrect"), "{shown}");
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(&hsm.pin()), "{shown}");

        // PKCS#11 logs in the whole process: once the right PIN is in, C_Login answers
        // "already logged in" to any PIN. The provider still refuses one it cannot check.
        let _right = open(&hsm);
        let err = attempt(wrong).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(shown.contains("already logged in"), "{shown}");
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(&hsm.pin()), "{shown}");
        assert!(attempt(&hsm.pin()).is_ok(), "the right PIN still works");
    }
}

softhsm_test! {
    /// Neither the provider's nor the configuration's `Debug` shows the PIN.
    async fn debug_of_provider_and_config_never_shows_the_pin(hsm) {
        let config = config(&hsm);
        let debug = format!("{config:?}");
        assert!(debug.contains("cardvault-test"), "{debug}");
        assert!(!debug.contains(&hsm.pin()), "{debug}");
        let provider = Pkcs11Provider::init(config).unwrap();
        let debug = format!("{provider:?}");
        assert!(debug.contains("cardvault-test"), "{debug}");
        assert!(debug.contains("KekVersion(1)"), "{debug}");
        assert!(!debug.contains(&hsm.pin()), "{debug}");
        assert!(debug.ends_with(".. }"), "{debug}");
    }
}

softhsm_test! {
    /// When the process is logged out of the token behind the provider's back (as after an
    /// HSM restart, which also drops every session), the next call logs in again and works.
    async fn the_provider_logs_in_again_after_the_token_logs_it_out(hsm) {
        let provider = init(&hsm);
        let wrapped = provider.wrap(b"key", b"aad").await.unwrap();
        let (_context, session) = admin_session(&hsm);
        session.logout().expect("log the process out");
        assert_eq!(provider.unwrap(&wrapped, b"aad").await.unwrap().as_slice(), b"key");
        let rewrapped = provider.wrap(b"key", b"aad").await.unwrap();
        assert_eq!(provider.unwrap(&rewrapped, b"aad").await.unwrap().as_slice(), b"key");
    }
}

/// The `cardvault` binary with the environment that points it at `hsm`'s token.
fn cardvault(hsm: &SoftHsm) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cardvault"));
    command
        .env_clear()
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("CARDVAULT_KEYS_PROVIDER", "pkcs11")
        .env("CARDVAULT_KEYS_PKCS11_MODULE", &hsm.module)
        .env("CARDVAULT_KEYS_PKCS11_TOKEN_LABEL", &hsm.token_label)
        .env("CARDVAULT_KEYS_PKCS11_PIN_FILE", &hsm.pin_file)
        .env("CARDVAULT_LOG_LEVEL", "warn")
        .env("CARDVAULT_LOG_FORMAT", "json");
    command
}

/// `cardvault serve --dev` on loopback ports it picks itself, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Server {
    fn start(hsm: &SoftHsm, data_dir: &Path, log_name: &str) -> Server {
        let log = data_dir.with_file_name(log_name);
        let file = std::fs::File::create(&log).expect("server log file");
        let mut child = cardvault(hsm)
            .args(["serve", "--dev", "--data-dir"])
            .arg(data_dir)
            .envs(serve::ANY_PORT)
            .stdout(file.try_clone().expect("server log file"))
            .stderr(file)
            .spawn()
            .expect("start cardvault serve");
        let (addr, _) = serve::listening(&mut child, &log);
        Server { child, addr, log }
    }

    /// A connected client, once the server accepts connections.
    async fn client(&mut self) -> CardVaultClient<Channel> {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                panic!(
                    "cardvault serve exited ({status}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
                .expect("uri")
                .connect()
                .await
            {
                return CardVaultClient::new(channel);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cardvault serve did not listen within 30 s");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PAN: &str = "4111111111111111";

async fn reveal(client: &mut CardVaultClient<Channel>, token: &str) -> String {
    client
        .reveal(pb::RevealRequest {
            token: token.to_owned(),
        })
        .await
        .expect("reveal")
        .into_inner()
        .number
}

/// `cardvault keys init` makes the KEK in the token; `cardvault serve` seals cards under it,
/// reveals them, and still reveals them after a restart. Before `keys init`, `serve` refuses
/// to start, and a second `keys init` refuses to run.
#[tokio::test]
async fn keys_init_then_serve_keeps_cards_readable_across_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hsm = SoftHsm::create(&dir.path().join("hsm"));
    let data_dir = dir.path().join("data");

    let refused = cardvault(&hsm)
        .args(["serve", "--dev", "--data-dir"])
        .arg(&data_dir)
        .envs(serve::ANY_PORT)
        .output()
        .expect("run cardvault serve");
    let (_, stderr) = texts(&refused);
    assert!(!refused.status.success(), "serve without a KEK must fail");
    assert!(stderr.contains("cardvault keys init"), "{stderr}");

    let created = cardvault(&hsm)
        .args(["keys", "init"])
        .output()
        .expect("run cardvault keys init");
    let (stdout, stderr) = texts(&created);
    assert!(
        created.status.success(),
        "keys init failed: {stdout}{stderr}"
    );
    assert!(
        stdout.contains("created KEK version 1 in token cardvault-test"),
        "{stdout}"
    );
    let again = cardvault(&hsm)
        .args(["keys", "init"])
        .output()
        .expect("run cardvault keys init");
    let (stdout, stderr) = texts(&again);
    assert!(!again.status.success(), "a second keys init must fail");
    assert!(
        stderr.contains("already holds KEK versions v1"),
        "{stdout}{stderr}"
    );
    assert!(!format!("{stdout}{stderr}").contains(&hsm.pin()));

    let mut server = Server::start(&hsm, &data_dir, "serve-1.log");
    let mut client = server.client().await;
    let token = client
        .tokenize(pb::TokenizeRequest {
            card: Some(pb::CardInput {
                number: PAN.to_owned(),
                exp_month: 12,
                exp_year: 2030,
                cardholder_name: "Ada Lovelace".to_owned(),
            }),
            ..Default::default()
        })
        .await
        .expect("tokenize")
        .into_inner()
        .token;
    assert_eq!(reveal(&mut client, &token).await, PAN);
    drop(client);
    drop(server);

    let mut server = Server::start(&hsm, &data_dir, "serve-2.log");
    let mut client = server.client().await;
    assert_eq!(reveal(&mut client, &token).await, PAN);
    // The KEK is in the token: no local keyring was made on the side.
    assert!(!data_dir.join("keyring.toml").exists());
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(!log.contains(&hsm.pin()), "{log}");
}
