//! Wiring: builds the vault from settings, binds the listeners, serves, drains.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{Authenticator, CardVaultService},
    config::{KeyProviderKind, Settings},
    crypto::{KeyProvider, LocalKeyring},
    pb::{self, v1::card_vault_server::CardVaultServer},
    store::{self, Store, StoreOptions},
    vault::{Vault, sweeper},
};

/// How often readiness re-checks the database.
const READINESS_INTERVAL: Duration = Duration::from_secs(5);

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
}

/// A built, bound, not yet serving vault.
pub struct Application {
    grpc: TcpListener,
    admin: TcpListener,
    vault: Arc<Vault>,
    settings: Settings,
    auth: Authenticator,
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
/// created (and announced).
pub fn key_provider(settings: &Settings) -> Result<Arc<dyn KeyProvider>, StartupError> {
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
    }
}

/// Opens the store named by the settings (without touching the database yet).
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartupError> {
    let options = StoreOptions {
        max_connections: settings.database.max_connections,
        acquire_timeout: Duration::from_millis(settings.database.acquire_timeout_ms),
    };
    Ok(store::connect(settings.database_url().expose_secret(), &options).await?)
}

/// Builds the vault and binds its listeners (port 0 allowed; see [`Application::grpc_addr`]).
pub async fn build(settings: Settings) -> Result<Application, StartupError> {
    // One TLS crypto provider for the whole process (sqlx's PostgreSQL TLS, tonic).
    let _ = rustls::crypto::ring::default_provider().install_default();

    if settings.dev {
        tracing::warn!(
            "DEVELOPMENT MODE: no TLS, no authentication (every caller is tenant `dev` with \
             every permission), loopback only. Never use --dev for real card data."
        );
    }
    if settings.database.url.is_none() {
        create_private_dir(&settings.data.dir)?;
    }
    let unauthenticated_tenant = settings
        .auth
        .unauthenticated_tenant
        .as_deref()
        .map(crate::vault::TenantId::parse)
        .transpose()
        .map_err(|e| StartupError::Invalid(format!("auth.unauthenticated_tenant: {e}")))?;
    if unauthenticated_tenant.is_none() {
        return Err(StartupError::Invalid(
            "no way for callers to authenticate is configured: set auth.unauthenticated_tenant \
             (loopback listeners only)"
                .to_owned(),
        ));
    }

    let provider = key_provider(&settings)?;
    let store = open_store(&settings).await?;
    if settings.database.migrate_on_start {
        store.migrate().await?;
        tracing::info!(backend = store.backend(), "database migrations applied");
    }
    let vault = Arc::new(Vault::new(store, provider, settings.keys.dek_cache_size));
    if let Some(tenant) = &unauthenticated_tenant {
        // Best effort: with the database down the vault still starts (not ready) and the
        // first request retries.
        if let Err(err) = vault.warm_up(tenant).await {
            tracing::warn!(error = %err, "could not load tenant keys at start-up");
        }
    }

    let grpc = bind(settings.grpc.addr).await?;
    let admin = bind(settings.admin.addr).await?;
    Ok(Application {
        grpc,
        admin,
        vault,
        auth: Authenticator::new(unauthenticated_tenant),
        settings,
    })
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

    /// Serves until `shutdown` completes, then drains: health goes NOT_SERVING, listeners stop
    /// accepting, in-flight calls finish, background tasks stop.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let Application {
            grpc,
            admin,
            vault,
            settings,
            auth,
        } = self;
        let grpc_addr = grpc.local_addr().ok();
        let admin_addr = admin.local_addr().ok();
        let (stop_tx, stop_rx) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(false));

        let (health, health_service) = tonic_health::server::health_reporter();
        // Both reflection versions: grpcurl 1.8 and grpcio-reflection speak only v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so clients can decode BadRequest and RequestInfo.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().ok();
        let reflection_v1alpha = reflection().build_v1alpha().ok();

        let tasks: Vec<JoinHandle<()>> = vec![
            tokio::spawn(sweeper::run(
                vault.store().clone(),
                Duration::from_secs(settings.tokens.sweep_interval_secs),
                settings.tokens.sweep_batch,
                stop_rx.clone(),
            )),
            tokio::spawn(readiness(
                vault.store().clone(),
                health.clone(),
                ready.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(admin_server(admin, ready, stop_rx.clone())),
        ];

        let card_vault = CardVaultServer::new(CardVaultService::new(vault, auth))
            .max_decoding_message_size(settings.grpc.max_message_bytes);
        let drain_health = health.clone();
        let drain = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            drain_health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            drain_health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
        };
        tracing::info!(grpc = ?grpc_addr, admin = ?admin_addr, "cardvault serving");
        let result = tonic::transport::Server::builder()
            .timeout(settings.request_timeout())
            .concurrency_limit_per_connection(settings.grpc.concurrency_per_connection)
            .add_service(health_service)
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(card_vault)
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), drain)
            .await;

        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        tracing::info!("cardvault stopped");
        result
    }
}

/// Keeps gRPC health and `/readyz` in step with the database: ready only while it answers.
async fn readiness(
    store: Arc<dyn Store>,
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(READINESS_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let ok = store.ping().await.is_ok();
        if ok != ready.swap(ok, Ordering::SeqCst) {
            tracing::info!(ready = ok, "readiness changed");
        }
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(SERVICE_NAME, status).await;
    }
}

/// `/healthz` (the process is up) and `/readyz` (the database answers) for Kubernetes probes.
async fn admin_server(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(ready): State<Arc<AtomicBool>>| async move {
                if ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(ready);
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %err, "admin listener failed");
    }
}
