//! `spawn_app()`: a real vault on a random loopback port, over a fresh database of the chosen
//! backend, with a generated gRPC client. Logs of every app in this binary are captured (at
//! debug level) for the canary test; set `TEST_LOG=1` to also see them.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

use cardvault::{
    config::{DatabaseTlsMode, LogFormat, Settings},
    crypto::LocalKeyring,
    pb::v1::{self as pb, card_vault_client::CardVaultClient},
    server, telemetry,
    vault::{DualControlled, NewPrincipal, Operator, Permissions, PrincipalName, TenantId},
};
use secrecy::SecretString;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

use cardvault_test_support::database::TestDatabase;

use crate::pki::Pki;

pub use cardvault_test_support::database::Backend;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        telemetry::init(telemetry::subscriber(LogFormat::Json, "debug", move || {
            writer.clone()
        }));
        capture
    })
}

/// Everything every app in this test binary has logged so far.
pub fn captured_logs() -> Vec<u8> {
    capture()
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Where a test app keeps its state, so it can be restarted on the same data: the test's
/// database and directory (fields read through `Deref`), and a keyring in that directory.
pub struct AppState {
    db: TestDatabase,
}

impl std::ops::Deref for AppState {
    type Target = TestDatabase;

    fn deref(&self) -> &TestDatabase {
        &self.db
    }
}

impl AppState {
    /// A fresh keyring and a fresh, empty database.
    pub async fn new(backend: Backend) -> AppState {
        let db = TestDatabase::new(backend).await;
        LocalKeyring::init(&db.dir.path().join("keyring.toml")).expect("keyring");
        AppState { db }
    }

    /// Settings of an app on this state acting for `tenant`.
    pub fn settings(&self, tenant: &str) -> Settings {
        let mut s = Settings::load(None).expect("default settings");
        s.grpc.addr = "127.0.0.1:0".parse().expect("addr");
        s.admin.addr = "127.0.0.1:0".parse().expect("addr");
        s.data.dir = self.dir.path().to_owned();
        s.database.url = Some(SecretString::from(self.database_url.clone()));
        s.database.max_connections = 4;
        s.keys.keyring = Some(self.dir.path().join("keyring.toml"));
        s.database.tls_mode = DatabaseTlsMode::Disable;
        // Tests stop and restart vaults often; none waits for a load balancer to notice.
        s.grpc.drain_period_ms = 0;
        // The core suite runs as `--dev` does: plain text, every caller is `tenant`.
        s.dev = true;
        s.auth.unauthenticated_tenant = Some(tenant.to_owned());
        s
    }

    /// Settings of a production-shaped app: TLS with the PKI's server certificate and client
    /// CA, no unauthenticated tenant, plain text refused.
    pub fn secure_settings(&self, pki: &Pki) -> Settings {
        let mut s = self.settings("unused");
        s.dev = false;
        s.auth.unauthenticated_tenant = None;
        s.tls.cert_file = Some(pki.server_cert.clone());
        s.tls.key_file = Some(pki.server_key.clone());
        s.tls.client_ca_file = Some(pki.ca_file.clone());
        s
    }

    /// Runs one statement with text parameters straight against the database, as someone
    /// with database access (and no keys) could; returns the rows affected.
    pub async fn execute(&self, sql: &'static str, params: &[&str]) -> u64 {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.database_url)
                    .await
                    .expect("open sqlite");
                let mut query = sqlx::query(sql);
                for p in params {
                    query = query.bind(*p);
                }
                query.execute(&pool).await.expect("execute").rows_affected()
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.database_url)
                    .await
                    .expect("open postgres");
                let mut query = sqlx::query(sql);
                for p in params {
                    query = query.bind(*p);
                }
                query.execute(&pool).await.expect("execute").rows_affected()
            }
        }
    }

    /// Runs a `SELECT COUNT(*) …` straight against the database.
    pub async fn count(&self, sql: &'static str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.database_url)
                    .await
                    .expect("open sqlite");
                sqlx::query_scalar(sql)
                    .fetch_one(&pool)
                    .await
                    .expect("count")
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.database_url)
                    .await
                    .expect("open postgres");
                sqlx::query_scalar(sql)
                    .fetch_one(&pool)
                    .await
                    .expect("count")
            }
        }
    }
}

/// A running vault and a client connected to it.
pub struct TestApp {
    /// A client without credentials (over TLS for a secure app).
    pub client: CardVaultClient<Channel>,
    /// The CA that signed the server certificate, for a secure app.
    pub ca_pem: Option<String>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<AppState>,
    pub tenant: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A vault on a fresh database of `backend`, tenant `dev`.
pub async fn spawn_app(backend: Backend) -> TestApp {
    let state = Arc::new(AppState::new(backend).await);
    spawn_on(state, "dev").await
}

/// A vault on existing state, acting for `tenant`.
pub async fn spawn_on(state: Arc<AppState>, tenant: &str) -> TestApp {
    spawn_with(state.clone(), tenant, state.settings(tenant)).await
}

/// A vault with explicit settings.
pub async fn spawn_with(state: Arc<AppState>, tenant: &str, settings: Settings) -> TestApp {
    capture();
    let ca_pem = settings
        .tls
        .client_ca_file
        .as_ref()
        .map(|path| std::fs::read_to_string(path).expect("read CA"));
    let app = server::build(settings).await.expect("vault builds");
    let grpc_addr = app.grpc_addr();
    let admin_addr = app.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .expect("vault serves");
    });
    let client = CardVaultClient::new(connect(grpc_addr, ca_pem.as_deref(), None).await);
    TestApp {
        client,
        ca_pem,
        grpc_addr,
        admin_addr,
        state,
        tenant: tenant.to_owned(),
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    /// Stops the server and waits until it has drained.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    /// Stops this server and starts a new one on the same database and keyring.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        spawn_on(self.state.clone(), &self.tenant).await
    }

    /// A fresh channel to the gRPC listener, for clients other than `CardVault`.
    pub async fn channel(&self) -> Channel {
        connect(self.grpc_addr, self.ca_pem.as_deref(), None).await
    }

    /// A fresh TLS channel presenting a client certificate (PEM certificate and key).
    pub async fn channel_as(&self, cert_pem: &str, key_pem: &str) -> Channel {
        connect(
            self.grpc_addr,
            self.ca_pem.as_deref(),
            Some((cert_pem, key_pem)),
        )
        .await
    }

    /// The API key of a new `keys:admin` principal of this app's tenant, made as
    /// `cardvault admin` makes one: the unauthenticated `--dev` caller may not administer
    /// keys, so key-admin calls of a dev app need a real operator too.
    pub async fn operator_key(&self) -> String {
        let ops = server::open_vault(&self.state.settings(&self.tenant))
            .await
            .expect("operator vault");
        let op = Operator::local("test");
        let tenant = TenantId::parse(&self.tenant).expect("tenant");
        // The dev tenant exists once the app has warmed up; another may not yet.
        let _ = ops.create_tenant(&op, &tenant).await;
        let principal = ops
            .create_principal(
                &op,
                NewPrincipal {
                    tenant,
                    name: PrincipalName::parse(&format!("ops-{}", uuid::Uuid::new_v4().simple()))
                        .expect("name"),
                    permissions: Permissions::parse(["keys:admin"]).expect("permission"),
                    mtls_identity: None,
                    global_operator: true,
                },
            )
            .await
            .expect("operator principal");
        // The CLI's local operator acts at once: there is no one to approve.
        let DualControlled::Done(principal) = principal else {
            panic!("the local operator's principal was made a request");
        };
        let DualControlled::Done(key) = ops
            .create_api_key(&op, &principal.id, None)
            .await
            .expect("operator API key")
        else {
            panic!("the local operator's API key was made a request");
        };
        key.key.expose().to_owned()
    }

    /// Tokenizes a card with default options.
    pub async fn tokenize(&mut self, number: &str) -> pb::TokenizeResponse {
        self.client
            .tokenize(tokenize_request(number))
            .await
            .expect("tokenize")
            .into_inner()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A channel to `addr`: plain text without a CA, else TLS to `localhost` trusting `ca_pem`,
/// with a client certificate when given.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: Option<&str>,
    client: Option<(&str, &str)>,
) -> Channel {
    try_connect(addr, ca_pem, client).await.expect("connect")
}

/// As [`connect`], returning the error (a refused handshake shows here).
pub async fn try_connect(
    addr: SocketAddr,
    ca_pem: Option<&str>,
    client: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let Some(ca) = ca_pem else {
        return Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await;
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
}

/// A request carrying `authorization: Bearer <key>`.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header value"),
    );
    request
}

/// A tokenize request for a card expiring in December 2030.
pub fn tokenize_request(number: &str) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        card: Some(pb::CardInput {
            number: number.to_owned(),
            exp_month: 12,
            exp_year: 2030,
            cardholder_name: "Ada Lovelace".to_owned(),
        }),
        ..Default::default()
    }
}

/// A random, valid, 16-digit Visa-range PAN no other test uses.
pub fn unique_pan() -> String {
    let id = uuid::Uuid::new_v4();
    let mut digits: Vec<u8> = vec![b'4'];
    digits.extend(id.as_bytes().iter().take(14).map(|b| b'0' + b % 10));
    digits.push(cardvault::card::luhn::check_digit(&digits));
    String::from_utf8(digits).expect("ASCII digits")
}

/// A PAN written the way people type it: groups of 4 digits separated by spaces.
pub fn spaced(pan: &str) -> String {
    pan.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii digits"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The field names of a status's `google.rpc.BadRequest` violations.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|br| br.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
