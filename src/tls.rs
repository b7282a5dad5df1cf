//! TLS for the gRPC and admin listeners: certificates from PEM files, optional client
//! certificates (mTLS), reload without restart, and handshakes off the accept loop.
//!
//! - [`server_config`] turns [`TlsFiles`] into a rustls [`ServerConfig`] (ring, TLS 1.3 and 1.2).
//! - [`ReloadingAcceptor`] holds the current config and swaps in a new one when the files
//!   change on disk ([`ReloadingAcceptor::watch`] polls), which is how cert-manager rotations
//!   take effect.
//! - [`incoming`] feeds `tonic`'s `serve_with_incoming_shutdown`; [`TlsListener`] feeds
//!   `axum::serve`. Both run every handshake in its own task with a timeout, so a slow or
//!   hostile client cannot hold up accepting others, and both use the config current at
//!   accept time.
//! - [`peer_identity`] names the caller of a verified client certificate (SPIFFE ID or CN).

use std::{
    fmt, fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ResolvesServerCert, WebPkiClientVerifier},
    sign::{CertifiedKey, SingleCertAndKey},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};

/// ALPN name of HTTP/2, which gRPC requires.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN name of HTTP/1.1, for the admin listener (axum here serves HTTP/1 only).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Handshakes in progress (or finished but not yet taken by the server) per listener. Past
/// this the accept loop waits, leaving further connections in the kernel's backlog, so a
/// flood of clients that never finish a handshake costs bounded memory.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Finished connections queued for the server; it takes them as fast as it can spawn tasks.
const ACCEPTED_QUEUE: usize = 64;

/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), so the loop does not spin; the same pause as axum and hyper.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Largest private key file read: an RSA-8192 PEM is under 7 KB.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Where the PEM files of a TLS listener are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key of the leaf: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
    pub key_file: PathBuf,
    /// CA certificates that client certificates must chain to. Read only when client
    /// authentication is on ([`ClientAuth::Optional`] or [`ClientAuth::Required`]).
    pub client_ca_file: Option<PathBuf>,
}

/// Whether a listener asks clients for certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates; [`TlsFiles::client_ca_file`] is ignored. For listeners whose
    /// clients never have one, like health probes on the admin port.
    None,
    /// A client certificate is verified against the client CA when presented (one that does
    /// not chain to it fails the handshake); clients without one get through and must
    /// authenticate otherwise, with API keys.
    Optional,
    /// Every client must present a certificate that chains to the client CA.
    Required,
}

/// Why TLS could not be set up from the files. Names the file and the problem, never the
/// contents: key files are read but their bytes never reach a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file is missing or unreadable.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is malformed (fixed text, no file contents).
        reason: &'static str,
    },
    /// No `CERTIFICATE` block in a file that should hold certificates.
    #[error("no certificate in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// No private key block (PKCS#8, SEC1 or PKCS#1) in the key file.
    #[error("no private key (PKCS#8, SEC1 or PKCS#1 PEM) in {}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key parsed as PEM but ring cannot use it (corrupt or unsupported algorithm).
    #[error("unusable private key in {}", path.display())]
    InvalidKey {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The leaf certificate does not parse.
    #[error("invalid certificate in {}", path.display())]
    InvalidCertificate {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The private key belongs to another certificate, e.g. only one of the two files was
    /// replaced.
    #[error("private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A certificate in the client CA bundle cannot serve as a trust anchor.
    #[error("invalid CA certificate in {}", path.display())]
    InvalidClientCa {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// Client authentication was asked for without a client CA to verify against.
    #[error("client certificate authentication ({mode:?}) needs a client CA file")]
    MissingClientCa {
        /// The mode asked for.
        mode: ClientAuth,
    },
    /// rustls refused the client verifier built from the CA bundle.
    #[error("cannot verify client certificates against {}", path.display())]
    ClientVerifier {
        /// The client CA file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The private key file is unreadable, or group or others may read it.
    #[error("TLS private key: {0}")]
    KeyFile(#[source] crate::secret_file::SecretFileError),
    /// rustls refused the protocol versions (only with a broken crypto provider).
    #[error("TLS configuration rejected")]
    Config(#[source] rustls::Error),
}

/// Builds a server config from `files`: ring provider, TLS 1.3 and 1.2 only (rustls offers
/// no weak suites), ALPN `alpn` in server preference order (`[ALPN_H2]` for gRPC,
/// `[ALPN_HTTP1]` for the admin port), and client certificates per `client_auth`.
pub fn server_config(
    files: &TlsFiles,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let alpn = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(load(files, client_auth, alpn)?.config)
}

/// What one load of the files produced.
struct Loaded {
    config: Arc<ServerConfig>,
    /// Serial and expiry of the leaf, for the reload log line.
    leaf: LeafSummary,
}

fn load(files: &TlsFiles, client_auth: ClientAuth, alpn: Vec<Vec<u8>>) -> Result<Loaded, TlsError> {
    // Explicit rather than the process default: nothing else has to install a provider, and
    // aws-lc can never sneak in through a default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = certified_key(files, &provider)?;
    let leaf = LeafSummary::of(&certified.cert[0]);

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match (client_auth, &files.client_ca_file) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (mode, None) => return Err(TlsError::MissingClientCa { mode }),
        (mode, Some(ca_file)) => {
            let roots = read_roots(ca_file)?;
            let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            if mode == ClientAuth::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca_file.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let resolver: Arc<dyn ResolvesServerCert> = Arc::new(SingleCertAndKey::from(certified));
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    Ok(Loaded {
        config: Arc::new(config),
        leaf,
    })
}

/// The chain and key of `files`, checked to belong together.
fn certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(&files.cert_file)?;
    let key_pem =
        crate::secret_file::read(&files.key_file, MAX_KEY_FILE_BYTES).map_err(TlsError::KeyFile)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: files.key_file.clone(),
        },
        other => pem_error(&files.key_file, &other),
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::InvalidKey {
            path: files.key_file.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        // `Unknown`: the key cannot tell its public half. ring's keys always can; rustls'
        // own `with_single_cert` accepts this case too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: files.cert_file.clone(),
                key: files.key_file.clone(),
            })
        }
        Err(source) => Err(TlsError::InvalidCertificate {
            path: files.cert_file.clone(),
            source,
        }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(path, &err))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::InvalidClientCa {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(Arc::new(roots))
}

/// A PEM error without its details: some carry a line or base64 text of the file, which for
/// the key file would be key material.
fn pem_error(path: &Path, err: &rustls::pki_types::pem::Error) -> TlsError {
    use rustls::pki_types::pem::Error;
    let reason = match err {
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "malformed BEGIN line",
        Error::Base64Decode(_) => "invalid base64",
        Error::SectionTooLarge => "section too large",
        _ => "malformed",
    };
    TlsError::Pem {
        path: path.to_owned(),
        reason,
    }
}

/// Serial and expiry of a leaf certificate, as logged on reload.
#[derive(Debug, Clone, Default)]
struct LeafSummary {
    serial: String,
    not_after: String,
    /// `not_after` in seconds since the Unix epoch, for the expiry gauge.
    not_after_unix: Option<i64>,
}

impl LeafSummary {
    fn of(cert: &CertificateDer<'_>) -> Self {
        match x509_parser::parse_x509_certificate(cert) {
            Ok((_, cert)) => LeafSummary {
                serial: cert.raw_serial_as_string(),
                not_after: cert.validity().not_after.to_string(),
                not_after_unix: Some(cert.validity().not_after.timestamp()),
            },
            // rustls has parsed it already; an empty summary only makes the log line poorer.
            Err(_) => LeafSummary::default(),
        }
    }
}

/// What identifies a version of a file without reading it. The inode catches a replaced
/// file even when size and modification time happen to match (kubelet and cert-manager
/// replace, not rewrite).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64),
}

/// Stamps of the files a load with `client_auth` reads. `fs::metadata` follows symlinks, so
/// kubelet's swap of the `..data` symlink shows as a change of the files behind it.
fn stamps(files: &TlsFiles, client_auth: ClientAuth) -> Result<Vec<FileStamp>, TlsError> {
    let ca = match client_auth {
        ClientAuth::None => None,
        ClientAuth::Optional | ClientAuth::Required => files.client_ca_file.as_deref(),
    };
    [
        Some(files.cert_file.as_path()),
        Some(files.key_file.as_path()),
        ca,
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let meta = fs::metadata(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: {
                use std::os::unix::fs::MetadataExt as _;
                (meta.dev(), meta.ino())
            },
        })
    })
    .collect()
}

/// A TLS config that follows its files: [`ReloadingAcceptor::reload`] swaps in a new
/// [`ServerConfig`] when they change, and new connections use it. Cloning is cheap and
/// clones share the config.
#[derive(Clone)]
pub struct ReloadingAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
    /// Read on every accepted connection; written only by a successful reload.
    current: RwLock<Arc<ServerConfig>>,
    /// The stamps of the last successful load. The mutex also serialises reloads.
    last: Mutex<(Vec<FileStamp>, LeafSummary)>,
    /// The `listener` label of the expiry gauge, once [`ReloadingAcceptor::report_expiry_as`]
    /// named it.
    listener: OnceLock<&'static str>,
}

impl fmt::Debug for ReloadingAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingAcceptor")
            .field("files", &self.inner.files)
            .field("client_auth", &self.inner.client_auth)
            .finish_non_exhaustive()
    }
}

impl ReloadingAcceptor {
    /// Loads `files` once (see [`server_config`]); fails as it does.
    pub fn new(files: TlsFiles, client_auth: ClientAuth, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        // Stamps before contents: a change racing the read shows as a change next time,
        // never as a missed one.
        let stamps = stamps(&files, client_auth)?;
        let loaded = load(&files, client_auth, alpn.clone())?;
        Ok(ReloadingAcceptor {
            inner: Arc::new(Inner {
                files,
                client_auth,
                alpn,
                current: RwLock::new(loaded.config),
                last: Mutex::new((stamps, loaded.leaf)),
                listener: OnceLock::new(),
            }),
        })
    }

    /// The config new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
        // The lock only guards an `Arc` swap, so a poisoned lock still holds a whole value.
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the files if their size, modification time or inode changed since the last
    /// successful load; returns whether a new config was swapped in. On error the previous
    /// config stays in use, and the next call tries again (a half-rotated pair, new
    /// certificate with old key, fails until the key arrives).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let inner = &self.inner;
        let mut last = inner.last.lock().unwrap_or_else(PoisonError::into_inner);
        let stamps = stamps(&inner.files, inner.client_auth)?;
        if stamps == last.0 {
            return Ok(false);
        }
        let loaded = load(&inner.files, inner.client_auth, inner.alpn.clone())?;
        *inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = loaded.config;
        *last = (stamps, loaded.leaf);
        if let Some(listener) = inner.listener.get() {
            publish_expiry(listener, &last.1);
        }
        Ok(true)
    }

    /// Publishes the served leaf's expiry as
    /// [`CERTIFICATE_EXPIRY`]`{listener="…"}` now and after every reload that swaps it, so
    /// an alert sees a renewal as soon as it is served. The first name given sticks.
    pub fn report_expiry_as(&self, listener: &'static str) {
        let listener = *self.inner.listener.get_or_init(|| listener);
        publish_expiry(listener, &self.leaf());
    }

    /// Calls [`reload`](Self::reload) every `interval` until `stop` changes (or its sender
    /// is dropped), logging each swap at info and each failure at warn. Spawn it next to
    /// the listener.
    pub async fn watch(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        // `tokio::time::interval` panics on zero.
        let interval = interval.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = ticks.tick() => {}
            }
            let acceptor = self.clone();
            // File reads and key parsing block; keep them off the async workers.
            match tokio::task::spawn_blocking(move || acceptor.reload()).await {
                Ok(Ok(true)) => {
                    let leaf = self.leaf();
                    tracing::info!(
                        cert_file = %self.inner.files.cert_file.display(),
                        serial = %leaf.serial,
                        not_after = %leaf.not_after,
                        "TLS certificate reloaded"
                    );
                }
                Ok(Ok(false)) => {}
                Ok(Err(err)) => tracing::warn!(
                    error = %ErrorChain(&err),
                    "TLS certificate reload failed; still serving the previous certificate"
                ),
                Err(err) => tracing::warn!(error = %err, "TLS certificate reload task failed"),
            }
        }
    }

    fn leaf(&self) -> LeafSummary {
        let last = self
            .inner
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        last.1.clone()
    }
}

/// Gauge of the served leaf certificate's notAfter, in seconds since the Unix epoch, by
/// `listener` (`grpc` or `admin`).
pub const CERTIFICATE_EXPIRY: &str = "cardvault_tls_certificate_expiry_timestamp_seconds";

fn publish_expiry(listener: &'static str, leaf: &LeafSummary) {
    // rustls accepted a certificate x509-parser could not read: better no sample than a
    // made-up one (an absent series is what `absent()` alerts catch).
    if let Some(not_after) = leaf.not_after_unix {
        metrics::gauge!(CERTIFICATE_EXPIRY, "listener" => listener).set(not_after as f64);
    }
}

/// An error and its sources on one line, `outer: inner: …`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// A finished handshake and the peer's address as seen at accept.
type Accepted = (TlsStream<TcpStream>, SocketAddr);

/// TLS connections accepted on `listener`, for tonic's
/// `Server::serve_with_incoming_shutdown`.
///
/// Each handshake runs in its own task under `handshake_timeout`, with the config that is
/// [current](ReloadingAcceptor::current) when the TCP connection arrives. Failed and timed-out
/// handshakes are logged at debug with the peer address and dropped: the stream only ever
/// yields finished connections, never an `Err`, so no client can disturb the server's accept
/// loop. Dropping the stream stops accepting and closes the listening socket.
///
/// Handlers see the client's verified chain through `Request::peer_certs()` and the address
/// through `TlsConnectInfo<TcpConnectInfo>` in the request extensions.
///
/// Must be called inside a Tokio runtime (it spawns the accept loop).
pub fn incoming(
    listener: TcpListener,
    acceptor: ReloadingAcceptor,
    handshake_timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    ReceiverStream::new(spawn_accept_loop(listener, acceptor, handshake_timeout))
        .map(|(stream, _peer)| Ok(stream))
}

/// An [`axum::serve::Listener`] serving TLS, for `axum::serve(listener, router)`; the same
/// machinery as [`incoming`]. Give its acceptor ALPN `[ALPN_HTTP1]`: axum is built here
/// without HTTP/2.
#[derive(Debug)]
pub struct TlsListener {
    accepted: mpsc::Receiver<Accepted>,
    /// Taken before the listener moves into the accept loop. Only the kind of an error is
    /// kept (`io::Error` is not `Clone`); a bound socket without an address does not happen.
    local_addr: Result<SocketAddr, io::ErrorKind>,
}

impl TlsListener {
    /// Starts accepting on `listener`; must be called inside a Tokio runtime.
    pub fn new(
        listener: TcpListener,
        acceptor: ReloadingAcceptor,
        handshake_timeout: Duration,
    ) -> Self {
        let local_addr = listener.local_addr().map_err(|err| err.kind());
        TlsListener {
            accepted: spawn_accept_loop(listener, acceptor, handshake_timeout),
            local_addr,
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this receiver is gone, or with the runtime;
            // the trait has no way to say "no more connections", so wait forever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.local_addr.map_err(io::Error::from)
    }
}

fn spawn_accept_loop(
    listener: TcpListener,
    acceptor: ReloadingAcceptor,
    handshake_timeout: Duration,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(accept_loop(listener, acceptor, handshake_timeout, tx));
    rx
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: ReloadingAcceptor,
    handshake_timeout: Duration,
    tx: mpsc::Sender<Accepted>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        // Every wait also watches `tx.closed()`: when the server drops the stream, the loop
        // ends and drops the listener, so the port stops accepting at once.
        let permit = tokio::select! {
            _ = tx.closed() => return,
            permit = pending.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return, // never closed; nothing sensible to do if it were
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a TCP connection failed");
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    }
                }
            },
        };
        // gRPC sends many small frames; Nagle would delay them. tonic's own listener sets
        // this too, but `serve_with_incoming` leaves sockets to us.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
        }
        let tls = TlsAcceptor::from(acceptor.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            // Held until the connection is handed over, so queued connections count too.
            let _permit = permit;
            match tokio::time::timeout(handshake_timeout, tls.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // Fails only when the server is gone; the connection just closes.
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                Err(_elapsed) => {
                    tracing::debug!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out");
                }
            }
        });
    }
}

/// Errors about one connection that went away before it was accepted; the next is fine.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The principal a verified client certificate names: its first URI SAN starting with
/// `spiffe://` (a SPIFFE ID), else its subject Common Name. `None` when it has neither, the
/// DER does not parse, or its SAN extension is malformed (better no identity than one read
/// past a confusing extension).
///
/// A SPIFFE ID comes only from a URI SAN, which is what SPIFFE's X.509-SVID defines and what
/// a SPIFFE-aware CA controls. A Common Name that looks like one (`spiffe://…`) is no
/// identity at all: a CA that lets requesters pick their subject (cert-manager's default
/// issuers do) would otherwise hand out every workload's SPIFFE principal.
///
/// Call it only on certificates the TLS layer verified (`Request::peer_certs()[0]`); it
/// checks no signature.
pub fn peer_identity(cert_der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;

    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    if let Some(san) = cert.subject_alternative_name().ok()? {
        let spiffe = san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri)
                if uri.len() > "spiffe://".len() && uri.starts_with("spiffe://") =>
            {
                Some(*uri)
            }
            _ => None,
        });
        if let Some(id) = spiffe {
            return Some(id.to_owned());
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let looks_spiffe = cn
        .get(..SPIFFE_SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SPIFFE_SCHEME));
    (!cn.is_empty() && !looks_spiffe).then(|| cn.to_owned())
}

/// The scheme of a SPIFFE ID.
const SPIFFE_SCHEME: &str = "spiffe://";

#[cfg(test)]
mod tests {
    use super::*;
    use cardvault_test_support::pki::Pki;
    use rustls::{ClientConfig, ProtocolVersion, SupportedProtocolVersion, pki_types::ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsConnector, client};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn files(pki: &Pki, client_ca: Option<&Path>) -> TlsFiles {
        TlsFiles {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: client_ca.map(Path::to_owned),
        }
    }

    fn acceptor(pki: &Pki, client_auth: ClientAuth) -> ReloadingAcceptor {
        ReloadingAcceptor::new(files(pki, Some(&pki.ca_file)), client_auth, &[ALPN_H2])
            .expect("load server TLS files")
    }

    /// A listener on loopback and the stream of its TLS connections.
    async fn serve(
        acceptor: ReloadingAcceptor,
    ) -> (
        SocketAddr,
        impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Unpin,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stream = Box::pin(incoming(listener, acceptor, Duration::from_secs(5)));
        (addr, stream)
    }

    fn client_config(
        pki: &Pki,
        identity: Option<(&Path, &Path)>,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA PEM"))
            .expect("CA is a trust anchor");
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(cert)
                        .expect("client cert file")
                        .collect::<Result<_, _>>()
                        .expect("client cert PEM"),
                    PrivateKeyDer::from_pem_file(key).expect("client key"),
                )
                .expect("client identity"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    async fn connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(config).connect(name, tcp).await
    }

    /// The next connection the server yields.
    async fn next(
        stream: &mut (impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Unpin),
    ) -> TlsStream<TcpStream> {
        tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .expect("a connection within the timeout")
            .expect("stream still open")
            .expect("never an error")
    }

    /// Waits until the server side closes or fails the client's connection. In TLS 1.3 the
    /// client finishes its handshake before the server has checked its certificate, so a
    /// refusal shows on the first read.
    async fn assert_refused(client: io::Result<client::TlsStream<TcpStream>>) {
        let Ok(mut client) = client else { return };
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(TIMEOUT, client.read(&mut buf))
            .await
            .expect("the server answers within the timeout");
        assert!(
            matches!(read, Err(_) | Ok(0)),
            "expected the server to refuse, read {read:?}"
        );
    }

    fn server_leaf(client: &client::TlsStream<TcpStream>) -> Vec<u8> {
        client
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .to_vec()
    }

    #[tokio::test]
    async fn a_client_trusting_the_ca_completes_a_handshake_and_negotiates_h2() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (addr, mut server) = serve(acceptor(&pki, ClientAuth::Optional)).await;

        let client = connect(addr, client_config(&pki, None, &[&rustls::version::TLS13]))
            .await
            .expect("handshake");
        let accepted = next(&mut server).await;

        assert_eq!(server_leaf(&client), pki.server_cert_der());
        assert_eq!(accepted.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            accepted.get_ref().0.peer_addr().unwrap(),
            client.get_ref().0.local_addr().unwrap()
        );
    }

    #[tokio::test]
    async fn a_verified_client_certificate_reaches_tonic_connect_info() {
        use tonic::transport::server::Connected as _;

        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (cert, key) = pki.client_cert("checkout", Some("spiffe://shop.test/checkout"), "co");
        let (addr, mut server) = serve(acceptor(&pki, ClientAuth::Optional)).await;

        let client = connect(
            addr,
            client_config(&pki, Some((&cert, &key)), &[&rustls::version::TLS13]),
        )
        .await
        .expect("handshake");
        let accepted = next(&mut server).await;

        let expected = Pki::cert_der(&cert);
        let seen = accepted
            .get_ref()
            .1
            .peer_certificates()
            .expect("client chain");
        assert_eq!(seen[0].as_ref(), expected.as_slice());
        // What a tonic handler gets from `request.peer_certs()` and `remote_addr()`.
        let info = accepted.connect_info();
        let certs = info.peer_certs().expect("peer certs in connect info");
        assert_eq!(certs[0].as_ref(), expected.as_slice());
        assert_eq!(
            info.get_ref().remote_addr(),
            Some(client.get_ref().0.local_addr().unwrap())
        );
        assert_eq!(
            peer_identity(&certs[0]).as_deref(),
            Some("spiffe://shop.test/checkout")
        );
    }

    #[tokio::test]
    async fn optional_client_auth_refuses_a_certificate_from_another_ca_but_admits_none() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (addr, mut server) = serve(acceptor(&pki, ClientAuth::Optional)).await;
        let versions = [&rustls::version::TLS13];

        let intruder = (
            pki.other_client_cert.as_path(),
            pki.other_client_key.as_path(),
        );
        assert_refused(connect(addr, client_config(&pki, Some(intruder), &versions)).await).await;

        // Nothing was yielded for the intruder: the next connection is the anonymous one.
        let anonymous = connect(addr, client_config(&pki, None, &versions))
            .await
            .expect("a client without a certificate gets through");
        let accepted = next(&mut server).await;
        assert_eq!(
            accepted.get_ref().0.peer_addr().unwrap(),
            anonymous.get_ref().0.local_addr().unwrap()
        );
        assert!(accepted.get_ref().1.peer_certificates().is_none());
    }

    #[tokio::test]
    async fn required_client_auth_refuses_a_client_without_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (cert, key) = pki.client_cert("batch", None, "batch");
        let (addr, mut server) = serve(acceptor(&pki, ClientAuth::Required)).await;
        let versions = [&rustls::version::TLS13];

        assert_refused(connect(addr, client_config(&pki, None, &versions)).await).await;

        let with_cert = connect(addr, client_config(&pki, Some((&cert, &key)), &versions))
            .await
            .expect("handshake with a certificate");
        let accepted = next(&mut server).await;
        assert_eq!(
            accepted.get_ref().0.peer_addr().unwrap(),
            with_cert.get_ref().0.local_addr().unwrap()
        );
    }

    #[tokio::test]
    async fn tls13_is_negotiated_by_default_and_tls12_still_works() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (addr, mut server) = serve(acceptor(&pki, ClientAuth::Optional)).await;

        let both = [&rustls::version::TLS13, &rustls::version::TLS12];
        let client = connect(addr, client_config(&pki, None, &both))
            .await
            .unwrap();
        next(&mut server).await;
        assert_eq!(
            client.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );

        let (cert, key) = pki.client_cert("legacy", None, "legacy");
        let tls12 = [&rustls::version::TLS12];
        let client = connect(addr, client_config(&pki, Some((&cert, &key)), &tls12))
            .await
            .unwrap();
        let accepted = next(&mut server).await;
        assert_eq!(
            client.get_ref().1.protocol_version(),
            Some(ProtocolVersion::TLSv1_2)
        );
        assert!(accepted.get_ref().1.peer_certificates().is_some());
    }

    #[tokio::test]
    async fn a_plaintext_connection_is_dropped_not_yielded() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (addr, mut server) = serve(acceptor(&pki, ClientAuth::Optional)).await;

        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        // The server answers with an alert (or nothing) and closes.
        tokio::time::timeout(TIMEOUT, plain.read_to_end(&mut buf))
            .await
            .expect("server closes the connection")
            .ok();

        let client = connect(addr, client_config(&pki, None, &[&rustls::version::TLS13]))
            .await
            .unwrap();
        let accepted = next(&mut server).await;
        assert_eq!(
            accepted.get_ref().0.peer_addr().unwrap(),
            client.get_ref().0.local_addr().unwrap()
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = acceptor(&pki, ClientAuth::None);
        let _server = incoming(listener, acceptor, Duration::from_millis(100));

        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(TIMEOUT, silent.read(&mut buf))
            .await
            .expect("server hangs up after its handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn reload_swaps_in_a_rewritten_certificate_and_reports_no_change_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let acceptor = acceptor(&pki, ClientAuth::Optional);
        let (addr, mut server) = serve(acceptor.clone()).await;
        let config = client_config(&pki, None, &[&rustls::version::TLS13]);
        let old = pki.server_cert_der();

        assert!(!acceptor.reload().expect("nothing to reload"));

        let new = pki.reissue_server_cert();
        assert_ne!(old, new);
        assert!(acceptor.reload().expect("reload"));
        assert!(!acceptor.reload().expect("already current"));

        let client = connect(addr, config).await.unwrap();
        next(&mut server).await;
        assert_eq!(server_leaf(&client), new);
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_serving_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let acceptor = acceptor(&pki, ClientAuth::Optional);
        let (addr, mut server) = serve(acceptor.clone()).await;
        let old = pki.server_cert_der();

        fs::write(&pki.server_key, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
        let err = acceptor.reload().expect_err("a broken key must not load");
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
        assert!(err.to_string().contains("server.key"), "{err}");
        assert!(
            !err.to_string().contains("broken"),
            "no file contents: {err}"
        );

        let client = connect(addr, client_config(&pki, None, &[&rustls::version::TLS13]))
            .await
            .unwrap();
        next(&mut server).await;
        assert_eq!(server_leaf(&client), old);
        // Still failing, not silently marked as loaded.
        assert!(acceptor.reload().is_err());
    }

    #[test]
    fn start_up_and_reload_refuse_a_key_group_or_others_may_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let acceptor = acceptor(&pki, ClientAuth::Optional);
        let before = acceptor.current();

        // The attack surface: a rotated key dropped in world-readable.
        pki.reissue_server_cert();
        fs::set_permissions(&pki.server_key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = acceptor
            .reload()
            .expect_err("a world-readable key must not load");
        let message = err.to_string();
        assert!(
            message.contains(&format!("chmod 600 {}", pki.server_key.display())),
            "{message}"
        );
        assert!(
            Arc::ptr_eq(&acceptor.current(), &before),
            "the old key stays"
        );
        let err = server_config(&files(&pki, None), ClientAuth::None, &[ALPN_H2]).unwrap_err();
        assert!(matches!(err, TlsError::KeyFile(_)), "{err:?}");

        fs::set_permissions(&pki.server_key, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(acceptor.reload().expect("a private key loads"));
    }

    #[tokio::test]
    async fn watch_picks_up_a_new_certificate_and_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let acceptor = acceptor(&pki, ClientAuth::Optional);
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = tokio::spawn(acceptor.clone().watch(Duration::from_millis(10), stop_rx));
        let before = acceptor.current();

        pki.reissue_server_cert();
        tokio::time::timeout(TIMEOUT, async {
            while Arc::ptr_eq(&acceptor.current(), &before) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("watch reloads the new certificate");

        stop_tx.send(true).unwrap();
        tokio::time::timeout(TIMEOUT, watcher)
            .await
            .expect("watch stops")
            .unwrap();
    }

    #[tokio::test]
    async fn tls_listener_serves_axum_over_https() {
        use axum::{Router, routing::get};

        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let acceptor =
            ReloadingAcceptor::new(files(&pki, None), ClientAuth::None, &[ALPN_HTTP1]).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listener = TlsListener::new(tcp, acceptor, Duration::from_secs(5));
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();
        let app = Router::new().route("/health", get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut config = (*client_config(&pki, None, &[&rustls::version::TLS13])).clone();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let mut client = connect(addr, Arc::new(config)).await.unwrap();
        client
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(TIMEOUT, client.read_to_end(&mut response))
            .await
            .expect("response within the timeout")
            .ok();
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ok"), "{response}");
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let load = |files: &TlsFiles, auth| server_config(files, auth, &[ALPN_H2]).map(|_| ());

        let missing = TlsFiles {
            cert_file: dir.path().join("absent.pem"),
            ..files(&pki, None)
        };
        let err = load(&missing, ClientAuth::None).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }) && err.to_string().contains("absent.pem"));

        let no_cert = TlsFiles {
            cert_file: pki.server_key.clone(),
            ..files(&pki, None)
        };
        let err = load(&no_cert, ClientAuth::None).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");

        let no_key = TlsFiles {
            key_file: pki.server_cert.clone(),
            ..files(&pki, None)
        };
        let err = load(&no_key, ClientAuth::None).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");

        let (_, other_key) = pki.client_cert("someone", None, "someone");
        let mismatched = TlsFiles {
            key_file: other_key,
            ..files(&pki, None)
        };
        let err = load(&mismatched, ClientAuth::None).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("someone.key") && err.to_string().contains("server.pem"));

        let err = load(&files(&pki, None), ClientAuth::Optional).unwrap_err();
        assert!(matches!(err, TlsError::MissingClientCa { .. }), "{err:?}");

        // Without client authentication the CA file is not even read.
        let absent_ca = files(&pki, Some(&dir.path().join("absent-ca.pem")));
        load(&absent_ca, ClientAuth::None).expect("CA ignored without client auth");
        let err = load(&absent_ca, ClientAuth::Required).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    }

    #[test]
    fn peer_identity_prefers_the_spiffe_id_over_the_common_name() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (cert, _) = pki.client_cert("svc", Some("spiffe://shop.test/ns/pay/sa/checkout"), "cn");
        assert_eq!(
            peer_identity(&Pki::cert_der(&cert)).as_deref(),
            Some("spiffe://shop.test/ns/pay/sa/checkout")
        );
    }

    #[test]
    fn peer_identity_falls_back_to_the_common_name() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (cert, _) = pki.client_cert("svc", None, "checkout-service");
        assert_eq!(
            peer_identity(&Pki::cert_der(&cert)).as_deref(),
            Some("checkout-service")
        );
    }

    #[test]
    fn peer_identity_ignores_a_uri_san_that_is_not_spiffe() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (cert, _) = pki.client_cert("svc", Some("https://shop.test/checkout"), "checkout");
        assert_eq!(
            peer_identity(&Pki::cert_der(&cert)).as_deref(),
            Some("checkout")
        );
        let (bare, _) = pki.client_cert("bare", Some("https://shop.test/x"), "");
        assert_eq!(peer_identity(&Pki::cert_der(&bare)), None);
    }

    #[test]
    fn a_common_name_that_looks_like_a_spiffe_id_is_no_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        // The attack: a certificate without a URI SAN, its CN set to a workload's SPIFFE ID.
        for cn in [
            "spiffe://shop.test/ns/pay/sa/checkout",
            "SPIFFE://shop.test/ns/pay/sa/checkout",
        ] {
            let (cert, _) = pki.client_cert("forged", None, cn);
            assert_eq!(peer_identity(&Pki::cert_der(&cert)), None, "{cn}");
        }
        // With a real URI SAN the SAN is the identity, whatever the CN says.
        let (cert, _) = pki.client_cert(
            "svc",
            Some("spiffe://shop.test/ns/pay/sa/checkout"),
            "spiffe://shop.test/ns/pay/sa/admin",
        );
        assert_eq!(
            peer_identity(&Pki::cert_der(&cert)).as_deref(),
            Some("spiffe://shop.test/ns/pay/sa/checkout")
        );
    }

    #[test]
    fn peer_identity_of_garbage_is_none() {
        assert_eq!(peer_identity(b"not a certificate"), None);
        assert_eq!(peer_identity(&[]), None);
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let mut der = pki.server_cert_der();
        der.push(0);
        assert_eq!(peer_identity(&der), None, "trailing bytes");
        der.truncate(der.len() / 2);
        assert_eq!(peer_identity(&der), None, "truncated");
    }
}
