//! Key management end to end: KEK rotation under load and retirement,
//! jobs that survive SIGKILL, one job runner among replicas, dual control, crypto-shredding and
//! DEK rollover — each with the local keyring and with a PKCS#11 HSM (SoftHSM2), on both
//! backends.
//!
//! The vault runs as its own process here: it must be killable, and SoftHSM reads its
//! configuration from the environment of the process that loads it. Operators are two
//! `keys:admin` principals (`alice`, `bob`) with API keys made by `cardvault admin`; card
//! traffic comes from the `--dev` tenant `dev`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cardvault::{
    crypto::{DataKey, DekId, KekVersion, KeyProvider, LocalKeyring, WrappedKey, dek_wrap_aad},
    pb::v1::{self as pb, card_vault_client::CardVaultClient, key_admin_client::KeyAdminClient},
};
use tonic::{Code, transport::Channel};

use crate::{
    audit::cli_env,
    errors::http_status,
    helpers::{AppState, Backend, tokenize_request, unique_pan, with_key},
    serve,
    softhsm::SoftHsm,
};

/// Where the KEKs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Local,
    SoftHsm,
}

/// Runs each named `async fn(Backend, Provider)` on both backends with both key providers.
macro_rules! on_every_setup {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use $crate::{helpers::Backend, keys::Provider};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_local() {
                super::$name(Backend::Sqlite, Provider::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_local() {
                super::$name(Backend::Postgres, Provider::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_softhsm() {
                super::$name(Backend::Sqlite, Provider::SoftHsm).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_softhsm() {
                super::$name(Backend::Postgres, Provider::SoftHsm).await
            }
        }
    )*};
}

on_every_setup!(
    kek_rotation_under_load_fails_nothing_and_the_old_kek_then_retires,
    jobs_killed_mid_way_finish_after_a_restart,
    dual_control_guards_retiring_and_shredding,
    data_keys_roll_over_at_their_encryption_limit,
);

mod one_runner {
    use crate::{helpers::Backend, keys::Provider};
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_local() {
        super::only_one_of_two_replicas_runs_a_job(Backend::Postgres, Provider::Local).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_softhsm() {
        super::only_one_of_two_replicas_runs_a_job(Backend::Postgres, Provider::SoftHsm).await
    }
}

/// A database, a key provider, and the environment every `cardvault` process gets.
struct Rig {
    state: AppState,
    env: Vec<(String, String)>,
    _hsm: Option<SoftHsm>,
}

impl Rig {
    async fn new(backend: Backend, provider: Provider) -> Rig {
        let state = AppState::new(backend).await;
        let mut env = cli_env(&state);
        let hsm = match provider {
            Provider::Local => None,
            Provider::SoftHsm => {
                let dir = state.dir.path().join("hsm");
                std::fs::create_dir(&dir).expect("hsm dir");
                let hsm = SoftHsm::create(&dir);
                env.retain(|(k, _)| k != "CARDVAULT_KEYS_KEYRING");
                env.extend([
                    ("SOFTHSM2_CONF".to_owned(), hsm.conf.display().to_string()),
                    ("CARDVAULT_KEYS_PROVIDER".to_owned(), "pkcs11".to_owned()),
                    (
                        "CARDVAULT_KEYS_PKCS11_MODULE".to_owned(),
                        hsm.module.display().to_string(),
                    ),
                    (
                        "CARDVAULT_KEYS_PKCS11_TOKEN_LABEL".to_owned(),
                        hsm.token_label.clone(),
                    ),
                    (
                        "CARDVAULT_KEYS_PKCS11_PIN_FILE".to_owned(),
                        hsm.pin_file.display().to_string(),
                    ),
                ]);
                Some(hsm)
            }
        };
        let rig = Rig {
            state,
            env,
            _hsm: hsm,
        };
        if provider == Provider::SoftHsm {
            rig.cli(&["keys", "init"]);
        }
        rig
    }

    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cardvault"));
        command.env_clear().envs(self.env.iter().cloned());
        command
    }

    /// Runs a `cardvault` command to success; returns its stdout, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("run cardvault");
        assert!(
            out.status.success(),
            "cardvault {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// A global operator (a `keys:admin` principal of tenant `ops`) and its API key.
    fn operator(&self, name: &str) -> String {
        let _ = self
            .command()
            .args(["admin", "create-tenant", "ops"])
            .output();
        let id = self.cli(&[
            "admin",
            "create-principal",
            "--tenant",
            "ops",
            "--name",
            name,
            "--permissions",
            "keys:admin",
            "--global-operator",
        ]);
        self.cli(&["admin", "create-api-key", &id])
    }

    /// Starts `cardvault serve --dev` with `settings` (`CARDVAULT_` variables) on top.
    fn start(&self, settings: &[(&str, &str)]) -> Server {
        let log = self
            .state
            .dir
            .path()
            .join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let mut child = self
            .command()
            .args(["serve", "--dev", "--data-dir"])
            .arg(self.state.dir.path())
            .envs(serve::ANY_PORT)
            .env("CARDVAULT_LIMITS_REVEAL_PER_MINUTE", "1000000")
            .env("CARDVAULT_LIMITS_REVEAL_BURST", "100000")
            .env("CARDVAULT_LOG_LEVEL", "info")
            .env("CARDVAULT_LOG_FORMAT", "json")
            .envs(
                settings
                    .iter()
                    .map(|(k, v)| (format!("CARDVAULT_{k}"), v.to_string())),
            )
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start cardvault serve");
        let (addr, admin) = serve::listening(&mut child, &log);
        Server {
            child,
            addr,
            admin,
            log,
        }
    }

    /// Every wrapped DEK in the database: (id, tenant, KEK version, wrapped bytes).
    async fn dek_rows(&self) -> Vec<(uuid::Uuid, String, u32, Vec<u8>)> {
        let sql = "SELECT id, tenant_id, kek_version, wrapped_key FROM data_keys";
        match self.state.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.state.database_url)
                    .await
                    .expect("open sqlite");
                let rows: Vec<(Vec<u8>, String, i64, Vec<u8>)> =
                    sqlx::query_as(sql).fetch_all(&pool).await.expect("deks");
                pool.close().await;
                rows.into_iter()
                    .map(|(id, t, v, w)| {
                        (uuid::Uuid::from_slice(&id).expect("uuid"), t, v as u32, w)
                    })
                    .collect()
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.state.database_url)
                    .await
                    .expect("open postgres");
                let rows: Vec<(uuid::Uuid, String, i64, Vec<u8>)> =
                    sqlx::query_as(sql).fetch_all(&pool).await.expect("deks");
                pool.close().await;
                rows.into_iter()
                    .map(|(id, t, v, w)| (id, t, v as u32, w))
                    .collect()
            }
        }
    }

    /// The sealed record of every card: token → ciphertext.
    async fn ciphertexts(&self, tenant: &str) -> HashMap<String, Vec<u8>> {
        let rows: Vec<(String, Vec<u8>)> = match self.state.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.state.database_url)
                    .await
                    .expect("open sqlite");
                let rows =
                    sqlx::query_as("SELECT token, ciphertext FROM cards WHERE tenant_id = $1")
                        .bind(tenant)
                        .fetch_all(&pool)
                        .await
                        .expect("cards");
                pool.close().await;
                rows
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.state.database_url)
                    .await
                    .expect("open postgres");
                let rows =
                    sqlx::query_as("SELECT token, ciphertext FROM cards WHERE tenant_id = $1")
                        .bind(tenant)
                        .fetch_all(&pool)
                        .await
                        .expect("cards");
                pool.close().await;
                rows
            }
        };
        rows.into_iter().collect()
    }
}

impl Rig {
    /// No server log of this rig holds any of the card numbers (nor their first 12 digits):
    /// rewrapping, re-encrypting and shredding handle plaintext keys and records, and none of
    /// it may leak into logs.
    fn assert_no_pan_in_logs(&self, cards: &HashMap<String, String>) {
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.state.dir.path()).expect("read state dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "log") {
                logs.push_str(&std::fs::read_to_string(&path).expect("read log"));
            }
        }
        assert!(
            logs.contains("key job"),
            "the logs hold no key-job lines: wrong files?"
        );
        for pan in cards.values() {
            assert!(
                !logs.contains(&pan[..12]),
                "a card number is in the server logs"
            );
        }
    }
}

/// One `cardvault serve` process. Killed (SIGKILL) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// A channel once the vault is ready (database answers, keys loaded).
    async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.admin).await.is_ok()
                && http_status(self.admin, "/readyz").await == 200
                && let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
                    .expect("uri")
                    .connect()
                    .await
            {
                return channel;
            }
            assert!(
                Instant::now() < deadline,
                "the vault did not become ready in 30 s; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cards(&self) -> CardVaultClient<Channel> {
        CardVaultClient::new(self.channel().await)
    }

    async fn keys(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel().await)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Prometheus text of the admin listener.
    async fn metrics(&self) -> String {
        crate::errors::http_get(self.admin, "/metrics").await
    }

    /// SIGKILL: no drain, no lease release.
    fn kill(mut self) {
        self.child.kill().expect("kill the vault");
        self.child.wait().expect("reap the vault");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin<T>(message: T, key: &str) -> tonic::Request<T> {
    with_key(message, key)
}

/// Stores `n` fresh cards; returns token → PAN.
async fn tokenize_many(client: &mut CardVaultClient<Channel>, n: usize) -> HashMap<String, String> {
    let mut cards = HashMap::new();
    for _ in 0..n {
        let pan = unique_pan();
        let token = client
            .tokenize(tokenize_request(&pan))
            .await
            .expect("tokenize")
            .into_inner()
            .token;
        cards.insert(token, pan);
    }
    cards
}

/// Every card reveals to its PAN.
async fn assert_all_reveal(client: &mut CardVaultClient<Channel>, cards: &HashMap<String, String>) {
    for (token, pan) in cards {
        let revealed = client
            .reveal(pb::RevealRequest {
                token: token.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("reveal {token}: {e}"))
            .into_inner();
        assert_eq!(&revealed.number, pan);
    }
}

async fn status(keys: &mut KeyAdminClient<Channel>, key: &str) -> pb::GetKeyStatusResponse {
    keys.get_key_status(admin(pb::GetKeyStatusRequest::default(), key))
        .await
        .expect("key status")
        .into_inner()
}

/// Waits until job `id` is done; returns its last state. Fails on a failed job.
async fn wait_for_job(keys: &mut KeyAdminClient<Channel>, key: &str, id: &str) -> pb::KeyJob {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = job(keys, key, id).await;
        match pb::key_job::State::try_from(job.state) {
            Ok(pb::key_job::State::Done) => return job,
            Ok(pb::key_job::State::Failed) => panic!("job {id} failed: {}", job.error),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not done in 60 s: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn job(keys: &mut KeyAdminClient<Channel>, key: &str, id: &str) -> pb::KeyJob {
    status(keys, key)
        .await
        .jobs
        .into_iter()
        .find(|j| j.id == id)
        .unwrap_or_else(|| panic!("job {id} not in the status"))
}

/// What KEK `version` still wraps, from GetKeyStatus.
fn usage(status: &pb::GetKeyStatusResponse, version: u32) -> Option<pb::KekVersionInfo> {
    status
        .kek_versions
        .iter()
        .find(|v| v.version == version)
        .cloned()
}

async fn kek_rotation_under_load_fails_nothing_and_the_old_kek_then_retires(
    backend: Backend,
    provider: Provider,
) {
    let rig = Rig::new(backend, provider).await;
    let (alice, bob) = (rig.operator("alice"), rig.operator("bob"));
    // A slow rewrap (many DEKs at 200 a second), so traffic overlaps it.
    let server = rig.start(&[("KEYS_JOB_RATE", "200"), ("KEYS_JOB_BATCH", "10")]);
    let mut cards = server.cards().await;
    let mut keys = server.keys().await;
    let mut stored = tokenize_many(&mut cards, 20).await;
    for _ in 0..60 {
        keys.rotate_deks(admin(pb::RotateDeksRequest::default(), &alice))
            .await
            .expect("rotate DEKs");
        stored.extend(tokenize_many(&mut cards, 1).await);
    }

    // Continuous traffic: tokenize a card, reveal it, again and again, counting failures.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (mut client, stop, ok, failed) = (
            server.cards().await,
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut mine = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let pan = unique_pan();
                let result = async {
                    let token = client
                        .tokenize(tokenize_request(&pan))
                        .await?
                        .into_inner()
                        .token;
                    let revealed = client
                        .reveal(pb::RevealRequest {
                            token: token.clone(),
                        })
                        .await?
                        .into_inner();
                    Ok::<_, tonic::Status>((token, Some(revealed.number)))
                }
                .await;
                match result {
                    Ok((token, Some(number))) if number == pan => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        mine.insert(token, pan);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request failed during rotation: {other:?}");
                    }
                }
            }
            mine
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ok.load(Ordering::Relaxed);
    let rotated = keys
        .rotate_kek(admin(pb::RotateKekRequest::default(), &alice))
        .await
        .expect("rotate KEK")
        .into_inner();
    assert_eq!(rotated.kek_version, 2);
    let job = rotated.job.expect("rewrap job");
    let done = wait_for_job(&mut keys, &alice, &job.id).await;
    let during = ok.load(Ordering::Relaxed) - before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        stored.extend(task.await.expect("load task"));
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the rotation"
    );
    assert!(during > 0, "no traffic overlapped the rotation");
    assert!(done.done >= 62, "the job rewrapped only {} keys", done.done);

    // Nothing is wrapped under version 1 any more; every card still opens.
    let after = status(&mut keys, &alice).await;
    assert_eq!(after.primary_kek_version, 2);
    let v1 = usage(&after, 1).expect("version 1 still held");
    assert_eq!(
        (v1.data_keys, v1.tenant_secrets, v1.audit_keys),
        (0, 0, 0),
        "{v1:?}"
    );
    assert_all_reveal(&mut cards, &stored).await;

    // Dual control retires it: alice asks, bob approves.
    let request = keys
        .request_retire_kek(admin(
            pb::RequestRetireKekRequest { kek_version: 1 },
            &alice,
        ))
        .await
        .expect("request retire")
        .into_inner()
        .request
        .expect("request");
    keys.approve_key_request(admin(
        pb::ApproveKeyRequestRequest {
            request_id: request.id.clone(),
        },
        &bob,
    ))
    .await
    .expect("approve retire");
    let retired = status(&mut keys, &alice).await;
    assert!(usage(&retired, 1).is_none(), "{:?}", retired.kek_versions);
    assert_all_reveal(&mut cards, &stored).await;

    // After a restart the provider holds version 2 only, and every card still opens.
    drop(server);
    let server = rig.start(&[]);
    assert_all_reveal(&mut server.cards().await, &stored).await;
    if provider == Provider::Local {
        let ring = LocalKeyring::load(&rig.state.dir.path().join("keyring.toml")).expect("keyring");
        assert_eq!(ring.versions(), vec![KekVersion(2)]);
    }
    let verified = rig.cli(&["audit", "verify"]);
    assert!(verified.starts_with("audit log intact"), "{verified}");
}

async fn jobs_killed_mid_way_finish_after_a_restart(backend: Backend, provider: Provider) {
    let rig = Rig::new(backend, provider).await;
    let alice = rig.operator("alice");
    // Small, throttled batches and a short lease, so a kill lands mid-job and the restarted
    // server takes the job over quickly.
    let settings = [
        ("KEYS_JOB_RATE", "40"),
        ("KEYS_JOB_BATCH", "4"),
        ("KEYS_JOB_LEASE_SECS", "2"),
        ("KEYS_JOB_POLL_MS", "200"),
        ("KEYS_DEK_RESERVATION_SECS", "1"),
    ];
    let server = rig.start(&settings);
    let mut cards = server.cards().await;
    let mut keys = server.keys().await;
    let mut stored = tokenize_many(&mut cards, 120).await;
    for _ in 0..40 {
        keys.rotate_deks(admin(pb::RotateDeksRequest::default(), &alice))
            .await
            .expect("rotate DEKs");
        stored.extend(tokenize_many(&mut cards, 1).await);
    }

    // A KEK rewrap, killed once it has made progress.
    let job = keys
        .rotate_kek(admin(pb::RotateKekRequest::default(), &alice))
        .await
        .expect("rotate KEK")
        .into_inner()
        .job
        .expect("job");
    wait_for_progress(&mut keys, &alice, &job.id).await;
    server.kill();
    let server = rig.start(&settings);
    let mut keys = server.keys().await;
    let done = wait_for_job(&mut keys, &alice, &job.id).await;
    // 41 DEKs, 2 tenant secrets, the audit key; the batch committed just before the kill
    // may be missing from the count (its progress update died with the server).
    assert!(done.done + 4 >= 44, "{done:?}");
    let v1 = usage(&status(&mut keys, &alice).await, 1).expect("version 1");
    assert_eq!((v1.data_keys, v1.tenant_secrets, v1.audit_keys), (0, 0, 0));
    assert_all_reveal(&mut server.cards().await, &stored).await;

    // A re-encryption of 160 records, killed once it has made progress.
    let job = keys
        .rotate_deks(admin(
            pb::RotateDeksRequest {
                tenant: String::new(),
                reencrypt: true,
            },
            &alice,
        ))
        .await
        .expect("rotate and re-encrypt")
        .into_inner()
        .job
        .expect("job");
    wait_for_progress(&mut keys, &alice, &job.id).await;
    server.kill();
    let server = rig.start(&settings);
    let mut keys = server.keys().await;
    let done = wait_for_job(&mut keys, &alice, &job.id).await;
    assert!(done.done + 4 >= stored.len() as u64, "{done:?}");
    assert_all_reveal(&mut server.cards().await, &stored).await;
    // Every retired DEK of `dev` was destroyed: one DEK left, and it seals every card.
    let deks: Vec<pb::DataKeyInfo> = status(&mut keys, &alice)
        .await
        .deks
        .into_iter()
        .filter(|d| d.tenant == "dev")
        .collect();
    assert_eq!(deks.len(), 1, "{deks:?}");
    assert!(deks[0].active);
    assert_eq!(deks[0].records, stored.len() as u64);
    rig.assert_no_pan_in_logs(&stored);
}

/// Waits until a job has processed something (and is not done yet).
async fn wait_for_progress(keys: &mut KeyAdminClient<Channel>, key: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = job(keys, key, id).await;
        assert_eq!(
            pb::key_job::State::try_from(job.state),
            Ok(pb::key_job::State::Running),
            "the job finished before it could be interrupted: {job:?}"
        );
        if job.done > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn only_one_of_two_replicas_runs_a_job(backend: Backend, provider: Provider) {
    let rig = Rig::new(backend, provider).await;
    let alice = rig.operator("alice");
    let settings = [
        ("KEYS_JOB_RATE", "100"),
        ("KEYS_JOB_BATCH", "5"),
        ("KEYS_JOB_POLL_MS", "100"),
    ];
    // One after the other: SoftHSM2's file-backed token store is not safe for two processes
    // opening it at the same instant (CI once saw C_GetTokenInfo fail with GeneralError); a
    // network HSM is, and the replicas' lease logic is what this test is about.
    let one = rig.start(&settings);
    let mut keys = one.keys().await;
    let two = rig.start(&settings);
    let _ = two.channel().await;
    let mut cards = one.cards().await;
    let stored = tokenize_many(&mut cards, 10).await;
    for _ in 0..60 {
        keys.rotate_deks(admin(pb::RotateDeksRequest::default(), &alice))
            .await
            .expect("rotate DEKs");
    }
    let job = keys
        .rotate_kek(admin(pb::RotateKekRequest::default(), &alice))
        .await
        .expect("rotate KEK")
        .into_inner()
        .job
        .expect("job");
    wait_for_job(&mut keys, &alice, &job.id).await;
    let batches = |metrics: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("cardvault_key_job_batches_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let (a, b) = (batches(&one.metrics().await), batches(&two.metrics().await));
    assert!(
        (a > 0) != (b > 0),
        "batches run by each replica: {a} and {b}; exactly one should have run the job"
    );
    // The replica that did not run it still serves the cards, rewrapped by the other.
    assert_all_reveal(&mut two.cards().await, &stored).await;
}

async fn dual_control_guards_retiring_and_shredding(backend: Backend, provider: Provider) {
    let rig = Rig::new(backend, provider).await;
    let (alice, bob) = (rig.operator("alice"), rig.operator("bob"));
    let server = rig.start(&[("KEYS_APPROVAL_TTL_SECS", "3")]);
    let mut cards = server.cards().await;
    let mut keys = server.keys().await;
    let stored = tokenize_many(&mut cards, 5).await;

    // The primary version cannot be retired at all.
    let err = keys
        .request_retire_kek(admin(
            pb::RequestRetireKekRequest { kek_version: 1 },
            &alice,
        ))
        .await
        .expect_err("retire the primary");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let shred = |key: &str| {
        admin(
            pb::RequestShredTenantRequest {
                tenant: "dev".to_owned(),
            },
            key,
        )
    };
    let approve = |id: &str, key: &str| {
        admin(
            pb::ApproveKeyRequestRequest {
                request_id: id.to_owned(),
            },
            key,
        )
    };
    // The requester cannot approve its own request.
    let own = keys
        .request_shred_tenant(shred(&alice))
        .await
        .expect("request shred")
        .into_inner()
        .request
        .expect("request");
    let err = keys
        .approve_key_request(approve(&own.id, &alice))
        .await
        .expect_err("self-approval");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // An expired request cannot be approved by anyone.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let err = keys
        .approve_key_request(approve(&own.id, &bob))
        .await
        .expect_err("expired approval");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
    assert_all_reveal(&mut cards, &stored).await;

    // A fresh request, approved by the other operator, shreds the tenant.
    let sealed = rig.ciphertexts("dev").await;
    assert_eq!(sealed.len(), stored.len());
    let request = keys
        .request_shred_tenant(shred(&alice))
        .await
        .expect("request shred")
        .into_inner()
        .request
        .expect("request");
    let approved = keys
        .approve_key_request(approve(&request.id, &bob))
        .await
        .expect("approve shred")
        .into_inner();
    let shredded = approved.shredded.expect("shred result");
    assert_eq!(shredded.cards, stored.len() as u64);
    assert!(shredded.data_keys >= 1);
    // A second approval of the same request is refused.
    let err = keys
        .approve_key_request(approve(&request.id, &bob))
        .await
        .expect_err("approve twice");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    for token in stored.keys() {
        let err = cards
            .reveal(pb::RevealRequest {
                token: token.clone(),
            })
            .await
            .expect_err("reveal after shred");
        assert_eq!(err.code(), Code::NotFound);
        let err = cards
            .get_card(pb::GetCardRequest {
                token: token.clone(),
            })
            .await
            .expect_err("get after shred");
        assert_eq!(err.code(), Code::NotFound);
    }
    // The tenant takes no new cards: its keys are gone for good.
    let err = cards
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect_err("tokenize after shred");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // No key left in the system opens what the tenant's cards were sealed with.
    let deks = rig.dek_rows().await;
    assert!(deks.iter().all(|(_, tenant, _, _)| tenant != "dev"));
    for blob in sealed.values() {
        let id = cardvault::crypto::record_dek_id(blob).expect("record header");
        assert!(
            deks.iter().all(|(dek, ..)| *dek != id.0),
            "the sealing DEK survived"
        );
    }
    if provider == Provider::Local {
        let ring = LocalKeyring::load(&rig.state.dir.path().join("keyring.toml")).expect("keyring");
        for (id, tenant, version, wrapped) in &deks {
            let key = ring
                .unwrap(
                    &WrappedKey {
                        kek_version: KekVersion(*version),
                        bytes: wrapped.clone(),
                    },
                    &dek_wrap_aad(DekId(*id), tenant),
                )
                .await
                .expect("unwrap a remaining DEK");
            let key = DataKey::from_bytes(&key).expect("DEK");
            for (token, blob) in &sealed {
                assert!(cardvault::crypto::open_record(&key, "dev", token, blob).is_err());
                assert!(cardvault::crypto::open_record(&key, tenant, token, blob).is_err());
            }
        }
    }
    let verified = rig.cli(&["audit", "verify"]);
    assert!(verified.starts_with("audit log intact"), "{verified}");
}

async fn data_keys_roll_over_at_their_encryption_limit(backend: Backend, provider: Provider) {
    let rig = Rig::new(backend, provider).await;
    let alice = rig.operator("alice");
    let server = rig.start(&[("KEYS_DEK_MAX_ENCRYPTIONS", "10")]);
    let mut cards = server.cards().await;
    let stored = tokenize_many(&mut cards, 35).await;
    assert_all_reveal(&mut cards, &stored).await;
    let deks: Vec<pb::DataKeyInfo> = status(&mut server.keys().await, &alice)
        .await
        .deks
        .into_iter()
        .filter(|d| d.tenant == "dev")
        .collect();
    assert!(
        deks.len() >= 4,
        "35 encryptions at 10 per DEK need 4 DEKs: {deks:?}"
    );
    assert_eq!(deks.iter().filter(|d| d.active).count(), 1);
    for dek in &deks {
        assert!(dek.encryptions_reserved <= 10, "{dek:?}");
        assert!(dek.records <= dek.encryptions_reserved, "{dek:?}");
    }
    assert_eq!(deks.iter().map(|d| d.records).sum::<u64>(), 35);
}
