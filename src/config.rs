//! Typed configuration: one TOML file, every key overridable by an environment variable
//! `CARDVAULT_<SECTION>_<KEY>` (e.g. `CARDVAULT_DATABASE_URL`, `CARDVAULT_GRPC_ADDR`).
//! Unknown keys — in the file or in `CARDVAULT_*` variables — are an error, so a typo never
//! silently leaves a default in place.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, DEFAULT_KEY_LABEL, PinSource, Pkcs11Config};
use crate::gateway::GatewaySettings;

/// The longest lease or time limit a setting in seconds may name: a year is beyond any
/// sensible value, and keeps `now + setting` far from overflowing.
const MAX_PERIOD_SECS: u64 = 366 * 24 * 3600;
/// Time the vault allows itself around a gateway call within one request (decrypting the
/// card, writing the charge before and after), in ms.
const VAULT_WORK_MS: u64 = 1_000;

/// Everything `serve`, `migrate` and `keys` read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The gRPC listener.
    pub grpc: GrpcSettings,
    /// The HTTP admin listener (health probes).
    pub admin: AdminSettings,
    /// The database.
    pub database: DatabaseSettings,
    /// Local state (embedded SQLite file, local keyring).
    pub data: DataSettings,
    /// Key provider and caches.
    pub keys: KeySettings,
    /// Token lifetime housekeeping.
    pub tokens: TokenSettings,
    /// Charge forwarding: CVC holds and sends.
    pub charges: ChargeSettings,
    /// `[[gateways]]`: the payment gateways charges may go to (TOML only: a list has no
    /// `CARDVAULT_*` form; secrets come from files or variables they name).
    #[serde(default)]
    pub gateways: Vec<GatewaySettings>,
    /// TLS of both listeners.
    pub tls: TlsSettings,
    /// Who callers are.
    pub auth: AuthSettings,
    /// Abuse limits.
    pub limits: LimitSettings,
    /// Logging.
    pub log: LogSettings,
    /// Audit log anchors.
    pub audit: AuditSettings,
    /// OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Set by `serve --dev` only (never from the file): development mode.
    #[serde(skip)]
    pub dev: bool,
}

/// `[grpc]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSettings {
    /// Listen address; port 0 picks a free port.
    pub addr: SocketAddr,
    /// Largest accepted request message, in bytes.
    pub max_message_bytes: usize,
    /// Per-request deadline, in milliseconds.
    pub request_timeout_ms: u64,
    /// Concurrent requests per connection before callers queue.
    pub concurrency_per_connection: usize,
    /// Serve gRPC server reflection (the schema, for grpcurl and similar tools). Unset means
    /// on with `serve --dev` only: in production it maps the attack surface for anyone who
    /// can connect.
    pub reflection: Option<bool>,
    /// Calls in flight at once on this replica, all classes together; past it a call is
    /// refused at once with `RESOURCE_EXHAUSTED` (health checks are never refused).
    pub max_in_flight: usize,
    /// `Reveal` calls in flight at once (part of `max_in_flight`).
    pub max_in_flight_reveal: usize,
    /// Administrative calls (`AccessAdmin`, `KeyAdmin`, `Audit`) in flight at once.
    pub max_in_flight_admin: usize,
    /// `ImportCards` streams open at once.
    pub max_import_streams: usize,
    /// Seconds between HTTP/2 pings on an idle connection (0: none).
    pub http2_keepalive_interval_secs: u64,
    /// Seconds a ping may go unanswered before the connection is closed.
    pub http2_keepalive_timeout_secs: u64,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Milliseconds after SIGTERM during which the vault reports not ready but still accepts
    /// calls, so load balancers take it out of rotation before the listener closes.
    pub drain_period_ms: u64,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Listen address of `/healthz` and `/readyz`; port 0 picks a free port.
    pub addr: SocketAddr,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://…` or `sqlite://…`. Unset means `sqlite://<data.dir>/cardvault.db`.
    /// Secret: may carry a password.
    pub url: Option<SecretString>,
    /// Pool size.
    pub max_connections: u32,
    /// How long a request waits for a connection before failing with `UNAVAILABLE`.
    pub acquire_timeout_ms: u64,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// TLS to PostgreSQL: `verify-full` (the default: encrypted, CA-verified, host name
    /// checked), `verify-ca`, `require` (encrypted, unverified) or `disable`. Put it here, not
    /// as `sslmode` in the URL.
    pub tls_mode: DatabaseTlsMode,
    /// CA bundle (PEM) that signs the PostgreSQL server certificate; unset means the
    /// system's trust roots.
    pub ca_file: Option<PathBuf>,
    /// Group commit: most new cards and audit records committed in one transaction.
    pub batch_max_size: usize,
    /// Group commit: how long a writer that already holds several writes waits for more,
    /// in microseconds (a lone write never waits).
    pub batch_max_wait_us: u64,
    /// Group commit: transactions in flight at once; 0 means the backend's default
    /// (PostgreSQL 2, SQLite 1).
    pub batch_writers: usize,
}

/// TLS to PostgreSQL, as in libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseTlsMode {
    /// Plain TCP. Only for a database on the same host or a trusted private link.
    Disable,
    /// Encrypted, but the server is not verified.
    Require,
    /// Encrypted; the server certificate must chain to `ca_file`.
    VerifyCa,
    /// Encrypted; verified as `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

/// `[data]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSettings {
    /// Directory for the embedded SQLite database and the dev keyring.
    pub dir: PathBuf,
}

/// `[keys]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Key provider: `local` (a keyring file) or `pkcs11` (an HSM).
    pub provider: KeyProviderKind,
    /// Keyring file of the `local` provider; unset means `<data.dir>/keyring.toml`.
    pub keyring: Option<PathBuf>,
    /// `pkcs11`: the PKCS#11 module (shared library) to load.
    pub pkcs11_module: Option<PathBuf>,
    /// `pkcs11`: the label of the token holding the KEKs.
    pub pkcs11_token_label: Option<String>,
    /// `pkcs11`: a file holding the token's user PIN (set this or `pkcs11_pin_env`).
    pub pkcs11_pin_file: Option<PathBuf>,
    /// `pkcs11`: the name of an environment variable holding the PIN (set this or
    /// `pkcs11_pin_file`).
    pub pkcs11_pin_env: Option<String>,
    /// `pkcs11`: prefix of the KEK objects' labels (version N is `<prefix>-vN`).
    pub pkcs11_key_label: String,
    /// How many unwrapped data keys to keep in memory.
    pub dek_cache_size: usize,
    /// Encryptions under one data key before a new one takes over (AES-GCM's random-nonce
    /// limit is 2^32; the default, 100 million, stays far below it).
    pub dek_max_encryptions: u64,
    /// Days after which a new data key takes over.
    pub dek_max_age_days: u32,
    /// Seconds a replica may seal under a data key before checking it is still active: how
    /// long replicas may keep using a DEK that another replica rotated away.
    pub dek_reservation_secs: u64,
    /// Seconds a dual-control request (retire a KEK, shred a tenant) waits for approval.
    pub approval_ttl_secs: u64,
    /// Seconds a replica's claim on a key job lasts unless renewed (after a crash, another
    /// replica takes the job over after this).
    pub job_lease_secs: u64,
    /// Milliseconds between looks for key jobs to work on.
    pub job_poll_ms: u64,
    /// Keys or records per key-job batch.
    pub job_batch: u32,
    /// Keys rewrapped or records re-encrypted per second at most (0: no limit), so key jobs
    /// leave the database and the key provider room for traffic.
    pub job_rate: u32,
}

/// Which [`crate::crypto::KeyProvider`] holds the KEKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyProviderKind {
    /// A keyring file (mode 0600) of versioned 256-bit KEKs.
    Local,
    /// AES-256 KEKs generated and used inside an HSM, through a PKCS#11 module.
    Pkcs11,
}

/// `[charges]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeSettings {
    /// Seconds a CVC hold waits for the card's next charge (PCI DSS 3.3: no longer than
    /// needed).
    pub cvc_hold_secs: u64,
    /// Seconds one request may be sending a charge before another may send it again; must
    /// exceed every gateway's `timeout_ms`.
    pub send_lease_secs: u64,
    /// Seconds between runs of the background reconciliation of unknown charges (1 to 3600).
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// Seconds a charge may stay unknown before the reconciler raises the alarm.
    #[serde(default = "default_unknown_alarm_secs")]
    pub unknown_alarm_secs: u64,
}

fn default_reconcile_interval_secs() -> u64 {
    30
}

fn default_unknown_alarm_secs() -> u64 {
    3600
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// Seconds between sweeps of expired tokens.
    pub sweep_interval_secs: u64,
    /// Largest number of expired cards deleted per statement, so a sweep never holds long
    /// locks or bloats one transaction.
    pub sweep_batch: u32,
}

/// `[tls]`: one certificate for the gRPC and the admin HTTP listener, reloaded from its files
/// when they change (so cert-manager can rotate it without a restart).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Certificate chain (PEM). Required outside `--dev`.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM). Required outside `--dev`.
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) that signs client certificates. Set it to authenticate callers by
    /// mTLS; a client certificate from any other CA fails the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse gRPC callers without a client certificate (no API keys then).
    pub require_client_cert: bool,
    /// Seconds between checks of the files for a new certificate.
    pub reload_interval_secs: u64,
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Tenant of callers that present no credentials from a loopback address, holding every
    /// permission but `keys:admin`. Set by `serve --dev` only (to `dev`): configuring it
    /// anywhere else is an error.
    pub unauthenticated_tenant: Option<String>,
    /// Milliseconds a verified API key is trusted before its row is read again; bounds how
    /// long a revocation made through another replica (or the CLI) takes to apply here.
    pub credential_cache_ms: u64,
    /// Principals declared in configuration (GitOps), authenticating by mTLS identity.
    #[serde(default)]
    pub principals: Vec<PrincipalSettings>,
    /// Networks of proxies in front of the vault (CIDRs, e.g. `["10.0.0.0/8"]`). A request
    /// from one of them is counted against the client its `x-forwarded-for` names (the
    /// rightmost hop outside these networks); from anyone else the header is ignored. Empty:
    /// the TCP peer is always the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `[[auth.principals]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSettings {
    /// Name; its principal id is `config:<name>`.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// SPIFFE ID or certificate CN.
    pub mtls_identity: String,
    /// Permission names.
    pub permissions: Vec<String>,
    /// With `keys:admin`: an operator of every tenant, not only of `tenant`.
    #[serde(default)]
    pub global_operator: bool,
}

/// `[limits]`: abuse limits, per replica.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Reveals per principal per minute, sustained.
    pub reveal_per_minute: u32,
    /// Reveals per principal back to back.
    pub reveal_burst: u32,
    /// Failed authentications per peer address (and per API key) per minute, sustained.
    pub failed_auth_per_minute: u32,
    /// Failed authentications allowed back to back before refusals start.
    pub failed_auth_burst: u32,
    /// Seconds over which refusals of one source (an address, an API key, a principal) are
    /// recorded as one audit record at once plus one with the count of the rest.
    pub refusal_window_secs: u64,
    /// `ImportCards` resends of an existing import id with another card number
    /// (`CONFLICT`) per principal per hour; past it, chunks resending an existing id are
    /// refused with `RESOURCE_EXHAUSTED` and an alarm.
    pub import_conflicts_per_hour: u32,
    /// `reuse_existing` answers with an existing token per principal per hour; past it,
    /// `reuse_existing` requests are refused with `RESOURCE_EXHAUSTED` and an alarm.
    pub reuse_hits_per_hour: u32,
    /// `reuse_existing` requests that store a new card per principal, BIN and last 4 per
    /// hour (what guessing a stored card's middle digits costs); past it, `reuse_existing`
    /// requests for that BIN and last 4 are refused the same way.
    pub reuse_misses_per_hour: u32,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `json` (structured, the default) or `pretty` (for a terminal).
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `cardvault=debug,info`. `RUST_LOG` wins.
    pub level: String,
}

/// `[audit]`: anchors, MAC'd statements of every audit chain's head, appended out of the
/// database so that restoring an older copy of the audit log shows (`audit verify --anchor`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Where the vault appends an anchor every `anchor_interval_secs` (and at start and
    /// stop): a file of JSON lines (created mode 0600, each line fsynced), or `-` for standard
    /// output among the log lines, for a log shipper into WORM storage. Unset: no anchors.
    pub anchor_file: Option<PathBuf>,
    /// Seconds between anchors; a rollback is seen if an anchor was made after the records
    /// it removes.
    pub anchor_interval_secs: u64,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable, for terminals.
    Pretty,
}

/// Defaults, as a serializable tree figment merges the file and environment onto.
#[derive(Serialize)]
struct Defaults {
    grpc: GrpcSettings,
    admin: AdminSettings,
    database: DatabaseDefaults,
    data: DataSettings,
    keys: KeySettings,
    tokens: TokenSettings,
    charges: ChargeSettings,
    tls: TlsSettings,
    auth: AuthSettings,
    limits: LimitSettings,
    log: LogSettings,
    audit: AuditSettings,
}

#[derive(Serialize)]
struct DatabaseDefaults {
    max_connections: u32,
    acquire_timeout_ms: u64,
    migrate_on_start: bool,
    tls_mode: DatabaseTlsMode,
    batch_max_size: usize,
    batch_max_wait_us: u64,
    batch_writers: usize,
}

fn defaults() -> Defaults {
    Defaults {
        grpc: GrpcSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            // Room for a full ImportCards chunk (1000 cards: ~70 KB bare, more with
            // metadata); unary requests are a few hundred bytes, so the limit only bounds
            // what one message can make the vault buffer.
            max_message_bytes: 1024 * 1024,
            request_timeout_ms: 10_000,
            concurrency_per_connection: 256,
            reflection: None,
            // Sized for 2 to 4 cores: a tokenize is ~1 ms of CPU and a group-commit wait, so
            // more calls in flight only queue on the database pool.
            max_in_flight: 512,
            max_in_flight_reveal: 64,
            max_in_flight_admin: 16,
            max_import_streams: 4,
            http2_keepalive_interval_secs: 30,
            http2_keepalive_timeout_secs: 10,
            max_concurrent_streams: 256,
            drain_period_ms: 5_000,
        },
        admin: AdminSettings {
            addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
        },
        database: DatabaseDefaults {
            max_connections: 16,
            acquire_timeout_ms: 5_000,
            migrate_on_start: true,
            tls_mode: DatabaseTlsMode::VerifyFull,
            batch_max_size: 256,
            batch_max_wait_us: 0,
            batch_writers: 0,
        },
        data: DataSettings {
            dir: PathBuf::from("./cardvault-data"),
        },
        keys: KeySettings {
            provider: KeyProviderKind::Local,
            keyring: None,
            pkcs11_module: None,
            pkcs11_token_label: None,
            pkcs11_pin_file: None,
            pkcs11_pin_env: None,
            pkcs11_key_label: DEFAULT_KEY_LABEL.to_owned(),
            dek_cache_size: 1024,
            dek_max_encryptions: 100_000_000,
            dek_max_age_days: 90,
            dek_reservation_secs: 30,
            approval_ttl_secs: 900,
            job_lease_secs: 15,
            job_poll_ms: 1_000,
            job_batch: 500,
            job_rate: 5_000,
        },
        tokens: TokenSettings {
            sweep_interval_secs: 60,
            sweep_batch: 500,
        },
        charges: ChargeSettings {
            cvc_hold_secs: 600,
            send_lease_secs: 60,
            reconcile_interval_secs: default_reconcile_interval_secs(),
            unknown_alarm_secs: default_unknown_alarm_secs(),
        },
        tls: TlsSettings {
            reload_interval_secs: 10,
            ..TlsSettings::default()
        },
        auth: AuthSettings {
            credential_cache_ms: 5_000,
            ..AuthSettings::default()
        },
        limits: LimitSettings {
            reveal_per_minute: 600,
            reveal_burst: 60,
            failed_auth_per_minute: 10,
            failed_auth_burst: 10,
            refusal_window_secs: 60,
            import_conflicts_per_hour: 20,
            reuse_hits_per_hour: 100,
            reuse_misses_per_hour: 10,
        },
        log: LogSettings {
            format: LogFormat::Json,
            level: "info".to_owned(),
        },
        audit: AuditSettings {
            anchor_file: None,
            anchor_interval_secs: 300,
        },
    }
}

/// Configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable is malformed or has an unknown key.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// The configuration file does not exist.
    #[error("configuration file {0} not found")]
    Missing(PathBuf),
    /// The values are well-formed but not allowed together.
    #[error("invalid configuration: {0}")]
    Rejected(String),
}

impl Settings {
    /// Loads defaults, then the TOML file (if given), then `CARDVAULT_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        // CARDVAULT_API_KEY is a client's credential (`cardvault-bench` reads it), not a
        // setting: a shell that exports it must still be able to run the server commands.
        Self::load_from(file, Env::prefixed("CARDVAULT_").ignore(&["API_KEY"]))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(defaults()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // `CARDVAULT_DATABASE_MAX_CONNECTIONS` → `database.max_connections`: the first
        // segment is the section and the rest the key, so keys keep their underscores.
        let env = env.map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            match key.split_once('_') {
                Some((section, rest)) => format!("{section}.{rest}").into(),
                None => key.into(),
            }
        });
        let settings: Settings = figment.merge(env).extract().map_err(Box::new)?;
        settings.check()?;
        Ok(settings)
    }

    /// Turns these settings into `serve --dev` settings: SQLite and keyring in `data.dir`,
    /// every caller is tenant `dev`, plain-text logs. Refuses a non-loopback listener.
    pub fn into_dev(mut self) -> Result<Settings, ConfigError> {
        self.dev = true;
        self.auth.unauthenticated_tenant = Some("dev".to_owned());
        if !self.grpc.addr.ip().is_loopback() || !self.admin.addr.ip().is_loopback() {
            return Err(ConfigError::Rejected(
                "--dev serves without TLS or authentication and binds loopback addresses only"
                    .to_owned(),
            ));
        }
        self.database.migrate_on_start = true;
        if self.tls.cert_file.is_some() {
            return Err(ConfigError::Rejected(
                "--dev serves plain text; drop --dev to serve the configured TLS certificate"
                    .to_owned(),
            ));
        }
        Ok(self)
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.check_unauthenticated_tenant()?;
        if self.tokens.sweep_batch == 0 || self.tokens.sweep_interval_secs == 0 {
            return Err(ConfigError::Rejected(
                "tokens.sweep_batch and tokens.sweep_interval_secs must be positive".to_owned(),
            ));
        }
        let l = &self.limits;
        if [
            l.reveal_per_minute,
            l.reveal_burst,
            l.failed_auth_per_minute,
            l.failed_auth_burst,
            l.import_conflicts_per_hour,
            l.reuse_hits_per_hour,
            l.reuse_misses_per_hour,
        ]
        .contains(&0)
            || l.refusal_window_secs == 0
        {
            return Err(ConfigError::Rejected(
                "every [limits] value must be positive".to_owned(),
            ));
        }
        let g = &self.grpc;
        if [
            g.max_in_flight,
            g.max_in_flight_reveal,
            g.max_in_flight_admin,
            g.max_import_streams,
        ]
        .contains(&0)
            || g.max_concurrent_streams == 0
        {
            return Err(ConfigError::Rejected(
                "grpc.max_in_flight, max_in_flight_reveal, max_in_flight_admin, grpc.max_import_streams and grpc.max_concurrent_streams \
                 must be positive"
                    .to_owned(),
            ));
        }
        // Tokenize and the other calls share what the classes leave over: the classes alone
        // must never be able to fill the vault.
        if g.max_in_flight_reveal + g.max_in_flight_admin + g.max_import_streams >= g.max_in_flight
        {
            return Err(ConfigError::Rejected(
                "grpc.max_in_flight must exceed max_in_flight_reveal + max_in_flight_admin + \
                 max_import_streams, so reveals, imports and admin calls cannot starve tokenize"
                    .to_owned(),
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::Rejected(
                "tls.cert_file and tls.key_file go together".to_owned(),
            ));
        }
        if self.tls.reload_interval_secs == 0 {
            return Err(ConfigError::Rejected(
                "tls.reload_interval_secs must be positive".to_owned(),
            ));
        }
        if (self.tls.client_ca_file.is_some() || self.tls.require_client_cert)
            && self.tls.cert_file.is_none()
        {
            return Err(ConfigError::Rejected(
                "mTLS (tls.client_ca_file, tls.require_client_cert) needs tls.cert_file and tls.key_file"
                    .to_owned(),
            ));
        }
        if self.tls.require_client_cert && self.tls.client_ca_file.is_none() {
            return Err(ConfigError::Rejected(
                "tls.require_client_cert needs tls.client_ca_file".to_owned(),
            ));
        }
        if self.charges.cvc_hold_secs == 0 || self.charges.cvc_hold_secs > 3600 {
            return Err(ConfigError::Rejected(
                "charges.cvc_hold_secs must be 1 to 3600: a CVC is kept no longer than a \
                 checkout needs"
                    .to_owned(),
            ));
        }
        // Each of these is added to the current time; bounded, no setting can overflow it.
        if [
            self.charges.send_lease_secs,
            self.keys.dek_reservation_secs,
            self.keys.approval_ttl_secs,
            self.keys.job_lease_secs,
        ]
        .iter()
        .any(|&secs| secs > MAX_PERIOD_SECS)
        {
            return Err(ConfigError::Rejected(format!(
                "charges.send_lease_secs, keys.dek_reservation_secs, keys.approval_ttl_secs and \
                 keys.job_lease_secs must be at most {MAX_PERIOD_SECS} (a year)"
            )));
        }
        let longest = self
            .gateways
            .iter()
            .map(|g| g.timeout_ms)
            .max()
            .unwrap_or(0);
        if self.charges.send_lease_secs.saturating_mul(1000) <= longest {
            return Err(ConfigError::Rejected(format!(
                "charges.send_lease_secs must exceed the longest gateway timeout_ms ({longest})"
            )));
        }
        // A gateway call and the vault's own work around it (decrypting the card, two database
        // writes) must end before the caller's deadline, or the caller is cut off with no
        // answer while the charge goes on.
        if let Some(slow) = self
            .gateways
            .iter()
            .find(|g| g.timeout_ms.saturating_add(VAULT_WORK_MS) >= self.grpc.request_timeout_ms)
        {
            return Err(ConfigError::Rejected(format!(
                "gateway {:?}: timeout_ms ({}) + {VAULT_WORK_MS} ms for the vault's own work must \
                 be less than grpc.request_timeout_ms ({}): lower timeout_ms or raise \
                 grpc.request_timeout_ms",
                slow.name, slow.timeout_ms, self.grpc.request_timeout_ms
            )));
        }
        if !(1..=3600).contains(&self.charges.reconcile_interval_secs) {
            return Err(ConfigError::Rejected(
                "charges.reconcile_interval_secs must be 1 to 3600".to_owned(),
            ));
        }
        if !(1..=MAX_PERIOD_SECS).contains(&self.charges.unknown_alarm_secs) {
            return Err(ConfigError::Rejected(format!(
                "charges.unknown_alarm_secs must be 1 to {MAX_PERIOD_SECS}"
            )));
        }
        for proxy in &self.auth.trusted_proxies {
            crate::vault::Cidr::parse(proxy)
                .map_err(|e| ConfigError::Rejected(format!("auth.trusted_proxies: {e}")))?;
        }
        if !self.auth.principals.is_empty() && self.tls.client_ca_file.is_none() {
            return Err(ConfigError::Rejected(
                "[[auth.principals]] authenticate by mTLS and need tls.client_ca_file".to_owned(),
            ));
        }
        if let Some(url) = &self.database.url {
            let url = url.expose_secret();
            if url.contains("sslmode=") || url.contains("sslrootcert=") {
                return Err(ConfigError::Rejected(
                    "set database.tls_mode and database.ca_file instead of sslmode/sslrootcert \
                     in database.url"
                        .to_owned(),
                ));
            }
        }
        if self.database.batch_max_size == 0 || self.database.batch_max_wait_us > 100_000 {
            return Err(ConfigError::Rejected(
                "database.batch_max_size must be positive and database.batch_max_wait_us at \
                 most 100000 (0.1 s)"
                    .to_owned(),
            ));
        }
        if self.keys.dek_cache_size == 0 {
            return Err(ConfigError::Rejected(
                "keys.dek_cache_size must be positive".to_owned(),
            ));
        }
        let keys = &self.keys;
        if keys.dek_max_encryptions == 0 || keys.dek_max_encryptions > 1 << 32 {
            return Err(ConfigError::Rejected(
                "keys.dek_max_encryptions must be between 1 and 2^32 (AES-GCM's random-nonce                  limit)"
                    .to_owned(),
            ));
        }
        if keys.dek_max_age_days == 0
            || keys.dek_reservation_secs == 0
            || keys.approval_ttl_secs == 0
            || keys.job_lease_secs == 0
            || keys.job_poll_ms == 0
            || keys.job_batch == 0
        {
            return Err(ConfigError::Rejected(
                "keys.dek_max_age_days, dek_reservation_secs, approval_ttl_secs,                  job_lease_secs, job_poll_ms and job_batch must be positive"
                    .to_owned(),
            ));
        }
        self.audit.check()?;
        self.telemetry.check()?;
        self.keys.check()
    }

    /// `auth.unauthenticated_tenant` lets callers in without credentials: only `serve --dev`
    /// may set it, and only on a loopback listener. A file or variable setting it is refused
    /// (loading never sets `dev`), so no production configuration can carry it by mistake.
    pub fn check_unauthenticated_tenant(&self) -> Result<(), ConfigError> {
        if self.auth.unauthenticated_tenant.is_none() {
            return Ok(());
        }
        if !self.dev {
            return Err(ConfigError::Rejected(
                "auth.unauthenticated_tenant lets callers in without credentials and is set by \
                 `serve --dev` only; remove it from the configuration"
                    .to_owned(),
            ));
        }
        if !self.grpc.addr.ip().is_loopback() {
            return Err(ConfigError::Rejected(format!(
                "auth.unauthenticated_tenant lets callers in without credentials and is only \
                 allowed on a loopback grpc.addr, not {}",
                self.grpc.addr
            )));
        }
        Ok(())
    }

    /// The database URL, defaulting to the embedded SQLite file in `data.dir`.
    pub fn database_url(&self) -> SecretString {
        match &self.database.url {
            Some(url) => url.clone(),
            None => SecretString::from(format!(
                "sqlite://{}",
                self.data.dir.join("cardvault.db").display()
            )),
        }
    }

    /// The local keyring path, defaulting to `data.dir/keyring.toml`.
    pub fn keyring_path(&self) -> PathBuf {
        self.keys
            .keyring
            .clone()
            .unwrap_or_else(|| self.data.dir.join("keyring.toml"))
    }

    /// Per-request deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.grpc.request_timeout_ms)
    }

    /// Whether the gRPC listener serves reflection: as set, else only in `--dev`.
    pub fn reflection(&self) -> bool {
        self.grpc.reflection.unwrap_or(self.dev)
    }
}

impl AuditSettings {
    fn check(&self) -> Result<(), ConfigError> {
        if self.anchor_interval_secs == 0 {
            return Err(ConfigError::Rejected(
                "audit.anchor_interval_secs must be positive".to_owned(),
            ));
        }
        if self
            .anchor_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(ConfigError::Rejected(
                "audit.anchor_file must be a path, or - for standard output".to_owned(),
            ));
        }
        Ok(())
    }
}

impl KeySettings {
    /// The `pkcs11` provider's settings are complete when it is chosen, and absent otherwise
    /// (so a forgotten `provider = "pkcs11"` cannot silently fall back to a local keyring).
    fn check(&self) -> Result<(), ConfigError> {
        let rejected = |message: &str| Err(ConfigError::Rejected(message.to_owned()));
        match self.provider {
            KeyProviderKind::Local => {
                if self.pkcs11_module.is_some()
                    || self.pkcs11_token_label.is_some()
                    || self.pkcs11_pin_file.is_some()
                    || self.pkcs11_pin_env.is_some()
                {
                    return rejected(
                        "keys.pkcs11_* settings apply only with keys.provider = \"pkcs11\"",
                    );
                }
            }
            KeyProviderKind::Pkcs11 => {
                if self.pkcs11_module.is_none() {
                    return rejected(
                        "keys.pkcs11_module (the PKCS#11 module, e.g. \
                         /usr/lib/softhsm/libsofthsm2.so) must be set when keys.provider = \
                         \"pkcs11\"",
                    );
                }
                if self.pkcs11_token_label.as_deref().is_none_or(str::is_empty) {
                    return rejected(
                        "keys.pkcs11_token_label must be set when keys.provider = \"pkcs11\"",
                    );
                }
                match (&self.pkcs11_pin_file, &self.pkcs11_pin_env) {
                    (None, None) => {
                        return rejected(
                            "keys.pkcs11_pin_file or keys.pkcs11_pin_env must be set when \
                             keys.provider = \"pkcs11\"",
                        );
                    }
                    (Some(_), Some(_)) => {
                        return rejected(
                            "set only one of keys.pkcs11_pin_file and keys.pkcs11_pin_env",
                        );
                    }
                    _ => {}
                }
                if self.pkcs11_key_label.is_empty() {
                    return rejected("keys.pkcs11_key_label must not be empty");
                }
                if self.keyring.is_some() {
                    return rejected("keys.keyring applies only with keys.provider = \"local\"");
                }
            }
        }
        Ok(())
    }

    /// The `pkcs11` provider's configuration, with the PIN read from `pkcs11_pin_file` or
    /// the variable named by `pkcs11_pin_env`. Loading the settings checked that they are
    /// complete; the errors for missing keys only guard settings built by hand.
    pub fn pkcs11_config(&self) -> Result<Pkcs11Config, CryptoError> {
        let missing = |key: &str| CryptoError::Hsm(format!("keys.{key} is not set"));
        let pin = match (&self.pkcs11_pin_file, &self.pkcs11_pin_env) {
            (Some(path), None) => PinSource::File(path.clone()),
            (None, Some(name)) => PinSource::Env(name.clone()),
            _ => {
                return Err(missing(
                    "pkcs11_pin_file or keys.pkcs11_pin_env (exactly one)",
                ));
            }
        };
        Ok(Pkcs11Config {
            module: self
                .pkcs11_module
                .clone()
                .ok_or_else(|| missing("pkcs11_module"))?,
            token_label: self
                .pkcs11_token_label
                .clone()
                .ok_or_else(|| missing("pkcs11_token_label"))?,
            pin: pin.read()?,
            key_label: self.pkcs11_key_label.clone(),
        })
    }
}

/// `[telemetry]`: traces over OTLP/gRPC. Off unless `otlp_endpoint` or the standard
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The collector, e.g. `http://otel-collector:4317` (`https://` for TLS). Unset: the
    /// standard variables decide.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded, 0 to 1; a caller's sampled flag in `traceparent`
    /// wins (parent-based), so one trace is never half-recorded across services.
    pub sampling_ratio: f64,
    /// PEM CA certificates of an `https://` collector; unset: the Mozilla roots built in.
    pub ca_file: Option<PathBuf>,
    /// Finished spans held waiting for export; past it spans are dropped and counted.
    pub max_queue_size: usize,
    /// Spans per export call.
    pub max_export_batch_size: usize,
    /// How long a partial batch waits before it is sent, in ms.
    pub scheduled_delay_ms: u64,
    /// How long one export call may take before its spans are dropped, in ms.
    pub export_timeout_ms: u64,
    /// How long stopping waits for the last spans to be exported, in ms.
    pub shutdown_timeout_ms: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            ca_file: None,
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay_ms: 1_000,
            export_timeout_ms: 10_000,
            shutdown_timeout_ms: 5_000,
        }
    }
}

impl TelemetrySettings {
    fn check(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(ConfigError::Rejected(
                "telemetry.sampling_ratio must be between 0 and 1".to_owned(),
            ));
        }
        if self.max_queue_size == 0
            || self.max_export_batch_size == 0
            || self.scheduled_delay_ms == 0
            || self.export_timeout_ms == 0
        {
            return Err(ConfigError::Rejected(
                "telemetry queue, batch, delay and export timeout must be positive".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
// `Jail::expect_with` fixes its closure's error type to `figment::Error`, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use figment::Jail;
    use secrecy::ExposeSecret;

    use super::*;

    // `Jail` gives each test its own working directory and environment and runs them one at a
    // time, so environment overrides can be tested without racing other tests.
    fn load_in(jail: &mut Jail, toml: &str) -> Result<Settings, ConfigError> {
        jail.create_file("cardvault.toml", toml)
            .expect("write config file");
        Settings::load(Some(Path::new("cardvault.toml")))
    }

    #[test]
    fn defaults_load_without_a_file() {
        Jail::expect_with(|_| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.grpc.addr.port(), 50051);
            assert!(s.database_url().expose_secret().starts_with("sqlite://"));
            assert_eq!(
                s.keyring_path(),
                PathBuf::from("./cardvault-data/keyring.toml")
            );
            Ok(())
        });
    }

    #[test]
    fn admission_class_limits_must_leave_room_for_tokenize() {
        Jail::expect_with(|jail| {
            let s = load_in(jail, "[grpc]\nmax_in_flight = 100\n").map_err(|e| e.to_string())?;
            assert_eq!(s.grpc.max_in_flight_reveal, 64);
            let err = load_in(
                jail,
                "[grpc]\nmax_in_flight = 20\nmax_in_flight_reveal = 10\n\
                 max_in_flight_admin = 6\nmax_import_streams = 4\n",
            )
            .expect_err("the classes fill the vault");
            assert!(err.to_string().contains("cannot starve tokenize"), "{err}");
            let err = load_in(jail, "[grpc]\nmax_import_streams = 0\n").expect_err("zero");
            assert!(err.to_string().contains("must be positive"), "{err}");
            jail.set_env("CARDVAULT_GRPC_DRAIN_PERIOD_MS", "250");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.grpc.drain_period_ms, 250);
            Ok(())
        });
    }

    #[test]
    fn a_gateway_timeout_must_leave_the_vault_time_inside_the_grpc_deadline() {
        let config = |gateway_ms: u64, grpc_ms: u64| {
            format!(
                "[grpc]\nrequest_timeout_ms = {grpc_ms}\n\n[[gateways]]\nname = \"stripe\"\n\
                 kind = \"stripe\"\nbase_url = \"https://api.stripe.com\"\n\
                 secret_env = \"STRIPE_KEY\"\ntimeout_ms = {gateway_ms}\n"
            )
        };
        Jail::expect_with(|jail| {
            load_in(jail, &config(8_999, 10_000)).map_err(|e| e.to_string())?;
            let err = load_in(jail, &config(9_000, 10_000)).expect_err("no time left");
            let text = err.to_string();
            assert!(
                text.contains("timeout_ms (9000)")
                    && text.contains("grpc.request_timeout_ms (10000)")
                    && text.contains("\"stripe\""),
                "{text}"
            );
            load_in(jail, &config(15_000, 20_000)).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn the_default_gateway_timeout_fits_the_default_grpc_deadline() {
        Jail::expect_with(|jail| {
            let s = load_in(
                jail,
                "[[gateways]]\nname = \"stripe\"\nkind = \"stripe\"\n\
                 base_url = \"https://api.stripe.com\"\nsecret_env = \"STRIPE_KEY\"\n",
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(s.gateways[0].timeout_ms, 8_000);
            assert_eq!(s.grpc.request_timeout_ms, 10_000);
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_in_the_file_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            let err = load_in(jail, "[database]\nulr = \"postgres://x\"\n").expect_err("typo");
            assert!(err.to_string().contains("ulr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_section_is_rejected() {
        Jail::expect_with(|jail| {
            let err = load_in(jail, "[databse]\nurl = \"x\"\n").expect_err("typo");
            assert!(err.to_string().contains("databse"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_environment_variable_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.set_env("CARDVAULT_DATABASE_MAX_CONECTIONS", "3");
            let err = Settings::load(None).expect_err("typo");
            assert!(err.to_string().contains("max_conections"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_client_api_key_variable_is_not_a_setting() {
        Jail::expect_with(|jail| {
            jail.set_env("CARDVAULT_API_KEY", "cv_x_y");
            Settings::load(None).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_the_file_and_keeps_underscores_in_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("CARDVAULT_DATABASE_MAX_CONNECTIONS", "7");
            jail.set_env("CARDVAULT_GRPC_ADDR", "127.0.0.1:7001");
            jail.set_env("CARDVAULT_DATABASE_URL", "postgres://u@127.0.0.1/db");
            jail.set_env("CARDVAULT_DATA_DIR", "/var/lib/cv");
            let s =
                load_in(jail, "[database]\nmax_connections = 3\n").map_err(|e| e.to_string())?;
            assert_eq!(s.database.max_connections, 7);
            assert_eq!(s.grpc.addr.port(), 7001);
            assert_eq!(
                s.database_url().expose_secret(),
                "postgres://u@127.0.0.1/db"
            );
            assert_eq!(s.data.dir, PathBuf::from("/var/lib/cv"));
            Ok(())
        });
    }

    #[test]
    fn file_values_override_defaults() {
        Jail::expect_with(|jail| {
            let s =
                load_in(jail, "[grpc]\naddr = \"127.0.0.1:7000\"\n").map_err(|e| e.to_string())?;
            assert_eq!(s.grpc.addr.port(), 7000);
            assert_eq!(s.grpc.max_message_bytes, 1024 * 1024);
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_named() {
        Jail::expect_with(|_| {
            let err = Settings::load(Some(Path::new("nope.toml"))).expect_err("missing");
            assert!(err.to_string().contains("nope.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unauthenticated_tenant_outside_dev_is_refused_by_name() {
        Jail::expect_with(|jail| {
            // The attack: a production config (loopback listener behind a sidecar) that
            // lets every caller in.
            let toml = "[auth]\nunauthenticated_tenant = \"shop\"\n";
            let err = load_in(jail, toml).expect_err("refused");
            assert!(
                err.to_string().contains("auth.unauthenticated_tenant"),
                "{err}"
            );
            assert!(err.to_string().contains("--dev"), "{err}");
            jail.set_env("CARDVAULT_AUTH_UNAUTHENTICATED_TENANT", "shop");
            let err = Settings::load(None).expect_err("refused from the environment too");
            assert!(
                err.to_string().contains("auth.unauthenticated_tenant"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn dev_mode_sets_the_unauthenticated_tenant_and_reflection() {
        Jail::expect_with(|_| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert!(!s.reflection(), "reflection is off by default");
            let dev = s.into_dev().map_err(|e| e.to_string())?;
            assert_eq!(dev.auth.unauthenticated_tenant.as_deref(), Some("dev"));
            assert!(dev.reflection());
            dev.check_unauthenticated_tenant()
                .map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn trusted_proxies_are_networks() {
        Jail::expect_with(|jail| {
            let s = load_in(
                jail,
                "[auth]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"]\n",
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(s.auth.trusted_proxies.len(), 3);
            let err = load_in(jail, "[auth]\ntrusted_proxies = [\"10.0.0.0/33\"]\n")
                .expect_err("bad prefix");
            assert!(err.to_string().contains("auth.trusted_proxies"), "{err}");
            jail.set_env("CARDVAULT_AUTH_TRUSTED_PROXIES", "[\"172.16.0.0/12\"]");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.auth.trusted_proxies, ["172.16.0.0/12"]);
            Ok(())
        });
    }

    #[test]
    fn reflection_is_a_setting() {
        Jail::expect_with(|jail| {
            jail.set_env("CARDVAULT_GRPC_REFLECTION", "true");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert!(s.reflection());
            let s = load_in(jail, "[grpc]\nreflection = false\n").map_err(|e| e.to_string())?;
            assert!(s.reflection(), "the environment wins over the file");
            jail.clear_env();
            let s = load_in(jail, "[grpc]\nreflection = false\n").map_err(|e| e.to_string())?;
            let dev = s.into_dev().map_err(|e| e.to_string())?;
            assert!(!dev.reflection(), "an explicit false holds under --dev too");
            Ok(())
        });
    }

    #[test]
    fn dev_mode_refuses_a_non_loopback_address() {
        Jail::expect_with(|jail| {
            let s =
                load_in(jail, "[grpc]\naddr = \"0.0.0.0:50051\"\n").map_err(|e| e.to_string())?;
            assert!(s.into_dev().is_err());
            Ok(())
        });
    }

    #[test]
    fn pkcs11_settings_come_from_the_environment_and_read_the_pin() {
        Jail::expect_with(|jail| {
            jail.create_file("pin", "1234\n")?;
            std::fs::set_permissions("pin", std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| e.to_string())?;
            jail.set_env("CARDVAULT_KEYS_PROVIDER", "pkcs11");
            jail.set_env(
                "CARDVAULT_KEYS_PKCS11_MODULE",
                "/usr/lib/softhsm/libsofthsm2.so",
            );
            jail.set_env("CARDVAULT_KEYS_PKCS11_TOKEN_LABEL", "vault");
            jail.set_env("CARDVAULT_KEYS_PKCS11_PIN_FILE", "pin");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.keys.provider, KeyProviderKind::Pkcs11);
            assert_eq!(s.keys.pkcs11_key_label, "cardvault-kek");
            let config = s.keys.pkcs11_config().map_err(|e| e.to_string())?;
            assert_eq!(
                config.module,
                PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
            );
            assert_eq!(config.token_label, "vault");
            assert_eq!(config.pin.as_str(), "1234");
            assert!(!format!("{config:?} {s:?}").contains("1234"));

            // The file overrides the label; a second PIN source is refused.
            jail.set_env("CARDVAULT_KEYS_PKCS11_KEY_LABEL", "kek");
            let err = load_in(jail, "[keys]\npkcs11_pin_env = \"VAULT_PIN\"\n")
                .expect_err("two PIN sources");
            assert!(err.to_string().contains("only one"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn pkcs11_settings_name_what_is_missing() {
        Jail::expect_with(|jail| {
            jail.set_env("CARDVAULT_KEYS_PROVIDER", "pkcs11");
            let err = Settings::load(None).expect_err("no module");
            assert!(err.to_string().contains("keys.pkcs11_module"), "{err}");
            jail.set_env("CARDVAULT_KEYS_PKCS11_MODULE", "/x.so");
            let err = Settings::load(None).expect_err("no token");
            assert!(err.to_string().contains("keys.pkcs11_token_label"), "{err}");
            jail.set_env("CARDVAULT_KEYS_PKCS11_TOKEN_LABEL", "vault");
            let err = Settings::load(None).expect_err("no pin");
            assert!(err.to_string().contains("keys.pkcs11_pin_file"), "{err}");
            jail.set_env("CARDVAULT_KEYS_PKCS11_PIN_ENV", "CARDVAULT_TEST_UNSET_PIN");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            let label = s.keys.pkcs11_key_label.clone();
            assert_eq!(label, "cardvault-kek");
            // The variable it names is unset: reading the PIN names the variable.
            let err = s.keys.pkcs11_config().expect_err("unset variable");
            assert!(
                err.to_string().contains("CARDVAULT_TEST_UNSET_PIN"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn pkcs11_settings_without_the_pkcs11_provider_are_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("CARDVAULT_KEYS_PKCS11_MODULE", "/x.so");
            let err = Settings::load(None).expect_err("provider is local");
            assert!(err.to_string().contains("keys.provider"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn audit_anchors_are_off_by_default_and_set_from_the_environment() {
        Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.audit.anchor_file, None);
            assert_eq!(s.audit.anchor_interval_secs, 300);
            jail.set_env(
                "CARDVAULT_AUDIT_ANCHOR_FILE",
                "/var/log/cardvault/anchors.jsonl",
            );
            jail.set_env("CARDVAULT_AUDIT_ANCHOR_INTERVAL_SECS", "60");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                s.audit.anchor_file,
                Some(PathBuf::from("/var/log/cardvault/anchors.jsonl"))
            );
            assert_eq!(s.audit.anchor_interval_secs, 60);
            jail.set_env("CARDVAULT_AUDIT_ANCHOR_INTERVAL_SECS", "0");
            let err = Settings::load(None).expect_err("zero interval");
            assert!(
                err.to_string().contains("audit.anchor_interval_secs"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_database_url_is_not_printed_by_debug() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "CARDVAULT_DATABASE_URL",
                "postgres://u:hunter2@127.0.0.1/db",
            );
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert!(!format!("{s:?}").contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn telemetry_is_off_by_default_and_its_ratio_is_checked() {
        Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.telemetry.otlp_endpoint, None);
            assert!((s.telemetry.sampling_ratio - 1.0).abs() < f64::EPSILON);
            jail.set_env("CARDVAULT_TELEMETRY_OTLP_ENDPOINT", "http://collector:4317");
            jail.set_env("CARDVAULT_TELEMETRY_SAMPLING_RATIO", "0.25");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                s.telemetry.otlp_endpoint.as_deref(),
                Some("http://collector:4317")
            );
            assert!((s.telemetry.sampling_ratio - 0.25).abs() < f64::EPSILON);
            jail.set_env("CARDVAULT_TELEMETRY_SAMPLING_RATIO", "1.5");
            let err = Settings::load(None).expect_err("ratio above 1");
            assert!(err.to_string().contains("sampling_ratio"), "{err}");
            Ok(())
        });
    }
}
