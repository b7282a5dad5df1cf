//! Wiring: builds the vault from settings, binds the listeners, serves, drains.

mod admin;
mod anchors;
mod metric_docs;
mod readiness;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use self::{
    admin::admin_server,
    anchors::audit_anchors,
    readiness::{Readiness, readiness},
};

use crate::{
    api::{
        AccessAdminService, AuditService, CardVaultService, KeyAdminService,
        admission::{AdmissionLayer, Limits},
        observe,
    },
    audit::AnchorSink,
    config::{DatabaseTlsMode, KeyProviderKind, Settings},
    crypto::{KeyProvider, LocalKeyring, ObservedProvider, Pkcs11Provider},
    gateway::Gateways,
    pb::{
        self,
        v1::{
            access_admin_server::AccessAdminServer, audit_server::AuditServer,
            card_vault_server::CardVaultServer, key_admin_server::KeyAdminServer,
        },
    },
    store::{self, Store, StoreOptions, StoreTls},
    tls::{self, ClientAuth, ReloadingAcceptor, TlsFiles},
    vault::{
        BatchOptions, Cidr, ConfigPrincipal, DekPolicy, GuessBudgets, KeyJobOptions, Permissions,
        Principal, Rate, TenantId, Vault, VaultOptions, key_jobs, reconciler,
        reconciler::ReconcileOptions, refusals, sweeper,
    },
};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often readiness re-checks the database, the key provider and the schema: with each
/// check bounded by a second, readiness follows a failure within about two.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the database pool's gauges are sampled: a few atomic reads, well inside any
/// scrape interval.
const POOL_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The service name health reports for, besides the overall `""`.
const SERVICE_NAME: &str = "cardvault.v1.CardVault";

/// Start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The key provider could not be opened.
    #[error("cannot open the key provider: {0}")]
    Keys(#[from] crate::crypto::CryptoError),
    /// The database could not be opened or migrated.
    #[error("cannot prepare the database: {0}")]
    Store(#[from] store::StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A configured value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The TLS certificate, key or client CA could not be loaded.
    #[error("cannot load TLS files: {0}")]
    Tls(#[from] tls::TlsError),
}

/// A built, bound, not yet serving vault.
pub struct Application {
    grpc: TcpListener,
    admin: TcpListener,
    vault: Arc<Vault>,
    settings: Settings,
    /// TLS of the gRPC and the admin listener; none only in `--dev`.
    tls: Option<(ReloadingAcceptor, ReloadingAcceptor)>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("grpc", &self.grpc_addr())
            .field("admin", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

/// Opens the key provider named in the settings. In dev mode a missing local keyring is
/// created (and announced); KEKs in an HSM must exist already.
pub fn key_provider(settings: &Settings) -> Result<Arc<dyn KeyProvider>, StartupError> {
    raw_key_provider(settings).map(|p| Arc::new(ObservedProvider::new(p)) as Arc<dyn KeyProvider>)
}

/// The configured provider itself, before [`ObservedProvider`] wraps it.
fn raw_key_provider(settings: &Settings) -> Result<Arc<dyn KeyProvider>, StartupError> {
    match settings.keys.provider {
        KeyProviderKind::Local => {
            let path = settings.keyring_path();
            if settings.dev && !path.exists() {
                // A new KEK cannot open cards sealed under a lost one: only generate it for
                // a data directory that has no cards yet.
                let database = settings.data.dir.join("cardvault.db");
                if settings.database.url.is_none() && database.exists() {
                    return Err(StartupError::Invalid(format!(
                        "{} exists but its keyring {} is missing; restore the keyring, or \
                         move the database away to start afresh",
                        database.display(),
                        path.display()
                    )));
                }
                let keyring = LocalKeyring::init(&path)?;
                tracing::warn!(
                    path = %path.display(),
                    "DEVELOPMENT MODE: generated a new local keyring; cards stored under it are \
                     unreadable without this file"
                );
                return Ok(Arc::new(keyring));
            }
            Ok(Arc::new(LocalKeyring::load(&path)?))
        }
        // Never created on the fly, not even in dev mode: a KEK in an HSM is made on purpose,
        // by `cardvault keys init`. Opening blocks briefly on the HSM (start-up only).
        KeyProviderKind::Pkcs11 => Ok(Arc::new(Pkcs11Provider::open(
            settings.keys.pkcs11_config()?,
        )?)),
    }
}

/// Opens the store named by the settings (without touching the database yet).
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartupError> {
    let options = StoreOptions {
        max_connections: settings.database.max_connections,
        acquire_timeout: Duration::from_millis(settings.database.acquire_timeout_ms),
        tls: match settings.database.tls_mode {
            DatabaseTlsMode::Disable => StoreTls::Disable,
            DatabaseTlsMode::Require => StoreTls::Require,
            DatabaseTlsMode::VerifyCa => StoreTls::VerifyCa(settings.database.ca_file.clone()),
            DatabaseTlsMode::VerifyFull => StoreTls::VerifyFull(settings.database.ca_file.clone()),
        },
    };
    Ok(store::connect(settings.database_url().expose_secret(), &options).await?)
}

/// Opens the vault without listeners, for the `admin` and `audit` commands: the key
/// provider, the store (migrated when `database.migrate_on_start`), and the policy.
pub async fn open_vault(settings: &Settings) -> Result<Arc<Vault>, StartupError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = key_provider(settings)?;
    let store = open_store(settings).await?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
    }
    Ok(Arc::new(Vault::new(
        store,
        provider,
        vault_options(settings)?,
    )))
}

/// Builds the vault and binds its listeners (port 0 allowed; see [`Application::grpc_addr`]).
pub async fn build(settings: Settings) -> Result<Application, StartupError> {
    // One TLS crypto provider for the whole process (sqlx's PostgreSQL TLS, tonic).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Before anything records a metric: samples sent to no recorder are lost.
    admin::install_recorder();

    // Settings built by hand skip loading's checks; this one must hold whatever built them.
    settings.check_unauthenticated_tenant()?;
    if settings.dev {
        tracing::warn!(
            "DEVELOPMENT MODE: no TLS, no authentication (every loopback caller without \
             credentials is tenant `dev` with every permission but keys:admin), loopback only. \
             Never use --dev for real card data."
        );
    }
    if settings.database.url.is_none() {
        create_private_dir(&settings.data.dir)?;
    }
    let tls = match (&settings.tls.cert_file, &settings.tls.key_file) {
        (Some(cert_file), Some(key_file)) => Some(acceptors(&settings, cert_file, key_file)?),
        _ if settings.dev => None,
        _ => {
            return Err(StartupError::Invalid(
                "TLS is required outside --dev: set tls.cert_file and tls.key_file".to_owned(),
            ));
        }
    };
    let options = vault_options(&settings)?;
    let warm_tenant = options.unauthenticated_tenant.clone();

    let provider = key_provider(&settings)?;
    let store = open_store(&settings).await?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
        tracing::info!(backend = store.backend(), "database migrations applied");
    }
    let vault = Arc::new(Vault::new(store, provider, options));
    // Best effort: with the database down the vault still starts (not ready) and the first
    // request retries.
    if let Err(err) = vault.warm_up(warm_tenant.as_ref()).await {
        tracing::warn!(error = %err, "could not load keys at start-up");
    }

    let grpc = bind(settings.grpc.addr).await?;
    let admin = bind(settings.admin.addr).await?;
    Ok(Application {
        grpc,
        admin,
        vault,
        settings,
        tls,
    })
}

/// The gRPC listener's TLS (with client certificates when a client CA is configured) and
/// the admin listener's (server certificate only: probes and Prometheus carry none).
fn acceptors(
    settings: &Settings,
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<(ReloadingAcceptor, ReloadingAcceptor), StartupError> {
    let files = TlsFiles {
        cert_file: cert_file.to_owned(),
        key_file: key_file.to_owned(),
        client_ca_file: settings.tls.client_ca_file.clone(),
    };
    let client_auth = match (&files.client_ca_file, settings.tls.require_client_cert) {
        (None, _) => ClientAuth::None,
        (Some(_), false) => ClientAuth::Optional,
        (Some(_), true) => ClientAuth::Required,
    };
    let grpc = ReloadingAcceptor::new(files.clone(), client_auth, &[tls::ALPN_H2])?;
    let admin = ReloadingAcceptor::new(
        TlsFiles {
            client_ca_file: None,
            ..files
        },
        ClientAuth::None,
        &[tls::ALPN_HTTP1],
    )?;
    grpc.report_expiry_as("grpc");
    admin.report_expiry_as("admin");
    Ok((grpc, admin))
}

/// Authentication and limits, from configuration.
fn vault_options(settings: &Settings) -> Result<VaultOptions, StartupError> {
    let unauthenticated_tenant = settings
        .auth
        .unauthenticated_tenant
        .as_deref()
        .map(TenantId::parse)
        .transpose()
        .map_err(|e| StartupError::Invalid(format!("auth.unauthenticated_tenant: {e}")))?;
    let mut config_principals = Vec::new();
    for p in &settings.auth.principals {
        let invalid = |what: String| {
            StartupError::Invalid(format!("auth.principals entry {:?}: {what}", p.name))
        };
        let tenant = TenantId::parse(&p.tenant).map_err(|e| invalid(e.to_string()))?;
        let permissions = Permissions::parse(p.permissions.iter().map(String::as_str))
            .map_err(|e| invalid(e.to_string()))?;
        crate::vault::PrincipalName::parse(&p.name).map_err(|e| invalid(e.to_string()))?;
        if p.global_operator && !permissions.contains(crate::vault::Permission::KeysAdmin) {
            return Err(invalid("global_operator needs keys:admin".to_owned()));
        }
        config_principals.push(ConfigPrincipal {
            principal: Principal {
                id: format!("config:{}", p.name),
                tenant,
                name: p.name.clone(),
                permissions,
                global_operator: p.global_operator,
            },
            mtls_identity: p.mtls_identity.clone(),
        });
    }
    let trusted_proxies = settings
        .auth
        .trusted_proxies
        .iter()
        .map(|proxy| Cidr::parse(proxy))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartupError::Invalid(format!("auth.trusted_proxies: {e}")))?;
    let limits = &settings.limits;
    let keys = &settings.keys;
    Ok(VaultOptions {
        dek_cache_size: settings.keys.dek_cache_size,
        unauthenticated_tenant,
        trusted_proxies,
        refusal_window: Duration::from_secs(limits.refusal_window_secs),
        config_principals,
        reveal_rate: Rate {
            per_minute: limits.reveal_per_minute,
            burst: limits.reveal_burst,
        },
        failed_auth_rate: Rate {
            per_minute: limits.failed_auth_per_minute,
            burst: limits.failed_auth_burst,
        },
        guess_budgets: GuessBudgets {
            import_conflicts_per_hour: limits.import_conflicts_per_hour,
            reuse_hits_per_hour: limits.reuse_hits_per_hour,
            reuse_misses_per_hour: limits.reuse_misses_per_hour,
        },
        credential_cache_ttl: Duration::from_millis(settings.auth.credential_cache_ms),
        batch: BatchOptions {
            max_size: settings.database.batch_max_size,
            max_wait: Duration::from_micros(settings.database.batch_max_wait_us),
            writers: settings.database.batch_writers,
        },
        dek_policy: DekPolicy {
            max_encryptions: keys.dek_max_encryptions,
            max_age: Duration::from_secs(u64::from(keys.dek_max_age_days) * 24 * 3600),
            reservation: Duration::from_secs(keys.dek_reservation_secs),
            ..DekPolicy::default()
        },
        key_jobs: KeyJobOptions {
            lease: Duration::from_secs(keys.job_lease_secs),
            poll: Duration::from_millis(keys.job_poll_ms),
            batch: keys.job_batch,
            rate: keys.job_rate,
        },
        approval_ttl: Duration::from_secs(keys.approval_ttl_secs),
        gateways: Arc::new(
            Gateways::from_settings(&settings.gateways)
                .map_err(|e| StartupError::Invalid(format!("gateways: {e}")))?,
        ),
        cvc_hold_ttl: Duration::from_secs(settings.charges.cvc_hold_secs),
        charge_send_lease: Duration::from_secs(settings.charges.send_lease_secs),
        reconcile: ReconcileOptions {
            interval: Duration::from_secs(settings.charges.reconcile_interval_secs),
            unknown_alarm: Duration::from_secs(settings.charges.unknown_alarm_secs),
            ..ReconcileOptions::default()
        },
        request_timeout: settings.request_timeout(),
    })
}

/// This replica's name on the key jobs it works on: the pod name (`HOSTNAME` on
/// Kubernetes) and a random suffix, so two processes on one host never share a lease.
fn job_owner() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "cardvault".to_owned());
    let suffix = crate::crypto::random_base62(8).unwrap_or_default();
    format!("{}-{suffix}", host.chars().take(64).collect::<String>())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

fn create_private_dir(path: &std::path::Path) -> Result<(), StartupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| StartupError::DataDir {
            path: path.to_owned(),
            source,
        })
}

impl Application {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.settings.grpc.addr)
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.settings.admin.addr)
    }

    /// Serves until `shutdown` completes, then drains: readiness and health go NOT_SERVING at
    /// once, calls are still served for `grpc.drain_period_ms`, then the listener stops
    /// accepting, in-flight calls finish, background tasks stop. When this returns nothing is
    /// left running: the caller flushes telemetry exporters then, and exits.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let Application {
            grpc,
            admin,
            vault,
            settings,
            tls,
        } = self;
        let grpc_addr = grpc.local_addr().ok();
        let admin_addr = admin.local_addr().ok();
        let (stop_tx, stop_rx) = watch::channel(false);
        let ready = Readiness::new();

        let (health, health_service) = tonic_health::server::health_reporter();
        // Both reflection versions: grpcurl 1.8 and grpcio-reflection speak only v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so clients can decode BadRequest and RequestInfo.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let (reflection_v1, reflection_v1alpha) = if settings.reflection() {
            (
                reflection().build_v1().ok(),
                reflection().build_v1alpha().ok(),
            )
        } else {
            (None, None)
        };

        let mut tasks: Vec<JoinHandle<()>> = vec![
            tokio::spawn(sweeper::run(
                vault.store().clone(),
                Duration::from_secs(settings.tokens.sweep_interval_secs),
                settings.tokens.sweep_batch,
                stop_rx.clone(),
            )),
            tokio::spawn(key_jobs::run(vault.clone(), job_owner(), stop_rx.clone())),
            tokio::spawn(refusals::run(vault.clone(), stop_rx.clone())),
            tokio::spawn(reconciler::run(vault.clone(), job_owner(), stop_rx.clone())),
            tokio::spawn(store::sample_pool(
                vault.store().clone(),
                POOL_SAMPLE_INTERVAL,
                stop_rx.clone(),
            )),
            tokio::spawn(readiness(
                vault.store().clone(),
                vault.key_provider().clone(),
                health.clone(),
                ready.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(admin_server(
                admin,
                tls.as_ref().map(|(_, admin)| admin.clone()),
                ready.clone(),
                stop_rx.clone(),
            )),
        ];
        if let Some(path) = &settings.audit.anchor_file {
            tasks.push(tokio::spawn(audit_anchors(
                vault.clone(),
                AnchorSink::from_path(path),
                Duration::from_secs(settings.audit.anchor_interval_secs),
                stop_rx.clone(),
            )));
        }
        if let Some((grpc_tls, admin_tls)) = &tls {
            let interval = Duration::from_secs(settings.tls.reload_interval_secs);
            tasks.push(tokio::spawn(
                grpc_tls.clone().watch(interval, stop_rx.clone()),
            ));
            tasks.push(tokio::spawn(
                admin_tls.clone().watch(interval, stop_rx.clone()),
            ));
        }

        let max_message = settings.grpc.max_message_bytes;
        let card_vault = CardVaultServer::new(CardVaultService::new(vault.clone()))
            .max_decoding_message_size(max_message);
        let access_admin = AccessAdminServer::new(AccessAdminService::new(vault.clone()))
            .max_decoding_message_size(max_message);
        let key_admin = KeyAdminServer::new(KeyAdminService::new(vault.clone()))
            .max_decoding_message_size(max_message);
        let audit =
            AuditServer::new(AuditService::new(vault)).max_decoding_message_size(max_message);
        let grpc_settings = &settings.grpc;
        let admission = AdmissionLayer::new(
            Limits {
                max_in_flight: grpc_settings.max_in_flight,
                max_in_flight_reveal: grpc_settings.max_in_flight_reveal,
                max_in_flight_admin: grpc_settings.max_in_flight_admin,
                max_import_streams: grpc_settings.max_import_streams,
                request_timeout: settings.request_timeout(),
            },
            ready.database_down(),
        );
        let drain_period = Duration::from_millis(grpc_settings.drain_period_ms);
        // Unary calls cannot outlast the request timeout; a stream still open that long after
        // the listener closed is cut, so shutdown always ends.
        let grace = settings.request_timeout();
        let (closing_tx, closing) = tokio::sync::oneshot::channel::<()>();
        let drain_health = health.clone();
        let drain_ready = ready.clone();
        let drain = async move {
            shutdown.await;
            // Not ready at once, while still serving: load balancers and Kubernetes
            // endpoints stop sending calls before the listener closes.
            drain_ready.drain();
            drain_health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            drain_health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            tracing::info!(
                drain_period_ms = drain_period.as_millis() as u64,
                "shutting down: not ready; serving on through the drain period"
            );
            tokio::time::sleep(drain_period).await;
            tracing::info!("shutting down: listener closed; finishing in-flight calls");
            let _ = closing_tx.send(());
        };
        let cut = async move {
            if closing.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tracing::info!(grpc = ?grpc_addr, admin = ?admin_addr, "cardvault serving");
        let keepalive_interval = Some(Duration::from_secs(
            grpc_settings.http2_keepalive_interval_secs,
        ))
        .filter(|d| !d.is_zero());
        let router = tonic::transport::Server::builder()
            .timeout(settings.request_timeout())
            .concurrency_limit_per_connection(grpc_settings.concurrency_per_connection)
            .max_concurrent_streams(grpc_settings.max_concurrent_streams)
            .http2_keepalive_interval(keepalive_interval)
            .http2_keepalive_timeout(Some(Duration::from_secs(
                grpc_settings.http2_keepalive_timeout_secs,
            )))
            // Outermost first: a call the admission layer sheds still gets its server span
            // and is counted under RESOURCE_EXHAUSTED.
            .layer(observe::layer())
            .layer(admission)
            .add_service(health_service)
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(card_vault)
            .add_service(access_admin)
            .add_service(key_admin)
            .add_service(audit);
        let serve = async move {
            match tls {
                Some((grpc_tls, _)) => {
                    router
                        .serve_with_incoming_shutdown(
                            tls::incoming(grpc, grpc_tls, HANDSHAKE_TIMEOUT),
                            drain,
                        )
                        .await
                }
                None => {
                    router
                        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), drain)
                        .await
                }
            }
        };
        let result = tokio::select! {
            result = serve => result,
            () = cut => {
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "shutting down: calls still open after the grace period were cut"
                );
                Ok(())
            }
        };

        // Background jobs stop at their next checkpoint (each finishes the batch it holds).
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        tracing::info!("cardvault stopped");
        result
    }
}

/// Completes on SIGTERM (Kubernetes) or Ctrl-C: the shutdown signal of `cardvault serve`,
/// and of the test gateway's binary.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
