//! Group commit: concurrent writes share transactions, a write that fails inside a batch fails
//! alone, and every acknowledged card is durable — even when the server is killed right after
//! answering.

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use cardvault::pb::v1::{self as pb, card_vault_client::CardVaultClient};
use sqlx::Connection;
use tokio::task::JoinSet;
use tonic::{Code, transport::Channel};

use crate::{
    audit::{cli_env, verify},
    helpers::{
        AppState, Backend, captured_logs, spawn_app, spawn_with, tokenize_request, unique_pan,
    },
    on_both_backends, serve,
};

on_both_backends!(
    writes_queued_behind_a_busy_database_are_committed_together,
    a_write_that_fails_inside_a_batch_fails_alone,
    every_acknowledged_card_survives_a_crash_right_after_its_answer,
    two_replicas_appending_to_the_same_chains_keep_them_intact,
);

/// Holds the database so the vault's writers block: SQLite's write lock, or every PostgreSQL
/// audit chain head (each batch locks one before it can commit).
enum DatabaseLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl DatabaseLock {
    async fn take(state: &AppState) -> DatabaseLock {
        match state.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&state.database_url)
                    .await
                    .expect("open sqlite");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("take the write lock");
                DatabaseLock::Sqlite(conn)
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&state.database_url)
                    .await
                    .expect("open postgres");
                sqlx::query("BEGIN")
                    .execute(&mut conn)
                    .await
                    .expect("begin");
                sqlx::query("SELECT shard FROM audit_heads FOR UPDATE")
                    .fetch_all(&mut conn)
                    .await
                    .expect("lock the chain heads");
                DatabaseLock::Postgres(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            DatabaseLock::Sqlite(mut conn) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut conn)
                    .await
                    .expect("release");
            }
            DatabaseLock::Postgres(mut conn) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut conn)
                    .await
                    .expect("release");
            }
        }
    }
}

/// Starts one tokenization per request, each on its own task.
fn tokenize_all(
    set: &mut JoinSet<(String, Result<String, tonic::Status>)>,
    client: &CardVaultClient<Channel>,
    requests: Vec<(String, pb::TokenizeRequest)>,
) {
    for (pan, request) in requests {
        let mut client = client.clone();
        set.spawn(async move {
            let answer = client.tokenize(request).await.map(|r| r.into_inner().token);
            (pan, answer)
        });
    }
}

fn plain(n: usize) -> Vec<(String, pb::TokenizeRequest)> {
    (0..n)
        .map(|_| {
            let pan = unique_pan();
            let request = tokenize_request(&pan);
            (pan, request)
        })
        .collect()
}

async fn reveal(client: &mut CardVaultClient<Channel>, token: &str) -> String {
    client
        .reveal(pb::RevealRequest {
            token: token.to_owned(),
        })
        .await
        .expect("reveal an acknowledged card")
        .into_inner()
        .number
}

/// Writes that pile up while the database is busy go out in a few transactions, not one
/// each: each transaction appends to one audit chain, so 48 queued cards land in a handful of
/// chains, where 48 separate transactions would touch all 16 round-robin chains.
async fn writes_queued_behind_a_busy_database_are_committed_together(backend: Backend) {
    let mut app = spawn_app(backend).await;
    app.tokenize(&unique_pan()).await; // creates the tenant's keys and the audit chains

    let lock = DatabaseLock::take(&app.state).await;
    let mut calls = JoinSet::new();
    tokenize_all(&mut calls, &app.client, plain(48));
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.release().await;

    let mut client = app.client.clone();
    for (pan, answer) in calls.join_all().await {
        let token = answer.expect("tokenize");
        assert_eq!(reveal(&mut client, &token).await, pan);
    }
    let report = verify(&app.state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
    // The first tokenization took one chain; the queued ones share a few more.
    let chains = chains_holding_tokenizations(&app.state).await;
    assert!(
        chains <= 6,
        "49 tokenizations were spread over {chains} chains: they were not batched"
    );
}

/// How many distinct chains hold `tokenize` records.
async fn chains_holding_tokenizations(state: &AppState) -> usize {
    let sql = "SELECT DISTINCT shard FROM audit_records WHERE action = 'tokenize'";
    let shards: HashSet<i64> = match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("shards")
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&state.database_url)
                .await
                .expect("open");
            sqlx::query_scalar::<_, i32>(sql)
                .fetch_all(&pool)
                .await
                .expect("shards")
                .into_iter()
                .map(i64::from)
                .collect()
        }
    }
    .into_iter()
    .collect();
    shards.len()
}

/// A card the database refuses (here through a trigger) shares a batch with others; it fails
/// with INTERNAL and a request id, the others are stored and answered, and the audit log
/// holds exactly the writes that happened.
async fn a_write_that_fails_inside_a_batch_fails_alone(backend: Backend) {
    let mut app = spawn_app(backend).await;
    app.tokenize(&unique_pan()).await;
    match backend {
        Backend::Sqlite => {
            app.state
                .execute(
                    "CREATE TRIGGER poison BEFORE INSERT ON cards \
                     WHEN json_extract(NEW.metadata, '$.poison') = 'yes' \
                     BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
                    &[],
                )
                .await;
        }
        Backend::Postgres => {
            app.state
                .execute(
                    "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.metadata->>'poison' = 'yes' THEN RAISE EXCEPTION 'poisoned row'; \
                     END IF; RETURN NEW; END $$",
                    &[],
                )
                .await;
            app.state
                .execute(
                    "CREATE TRIGGER poison BEFORE INSERT ON cards \
                     FOR EACH ROW EXECUTE FUNCTION poison()",
                    &[],
                )
                .await;
        }
    }

    // Every writer takes a batch and blocks on the lock; then the poisoned card and ten
    // others queue up behind them and are bound to be committed together.
    let lock = DatabaseLock::take(&app.state).await;
    let mut calls = JoinSet::new();
    tokenize_all(&mut calls, &app.client, plain(10));
    tokio::time::sleep(Duration::from_millis(150)).await;
    tokenize_all(&mut calls, &app.client, plain(1));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let poisoned_pan = unique_pan();
    let mut poisoned = tokenize_request(&poisoned_pan);
    poisoned.metadata.insert("poison".into(), "yes".into());
    let mut queued = plain(10);
    queued.insert(5, (poisoned_pan.clone(), poisoned));
    tokenize_all(&mut calls, &app.client, queued);
    tokio::time::sleep(Duration::from_millis(150)).await;
    lock.release().await;

    let mut client = app.client.clone();
    let mut stored = 0;
    for (pan, answer) in calls.join_all().await {
        if pan == poisoned_pan {
            let status = answer.expect_err("the poisoned card is refused");
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            assert!(status.message().contains("request id"), "{status:?}");
            assert!(!status.message().contains(&pan));
        } else {
            let token = answer.expect("its neighbours are stored");
            assert_eq!(reveal(&mut client, &token).await, pan);
            stored += 1;
        }
    }
    assert_eq!(stored, 21);
    assert_eq!(app.state.count("SELECT COUNT(*) FROM cards").await, 22);
    assert_eq!(
        app.state
            .count(
                "SELECT COUNT(*) FROM audit_records WHERE action = 'tokenize' AND outcome = 'ok'"
            )
            .await,
        22,
        "no record for the card that was not stored"
    );
    let report = verify(&app.state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(
        logs.contains("a write batch failed; committing its writes one by one"),
        "the poisoned card was committed in a batch with others"
    );
}

/// The vault as its own process, so it can be killed without warning.
struct VaultProcess {
    child: Child,
    addr: SocketAddr,
}

impl VaultProcess {
    fn start(state: &AppState) -> VaultProcess {
        let log = state
            .dir
            .path()
            .join(format!("serve-{}.out", uuid::Uuid::new_v4().simple()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_cardvault"))
            .args(["serve", "--dev", "--data-dir"])
            .arg(state.dir.path())
            .env_clear()
            .envs(cli_env(state))
            .envs(serve::ANY_PORT)
            // Every acknowledged card is revealed afterwards, far beyond the default limit.
            .env("CARDVAULT_LIMITS_REVEAL_PER_MINUTE", "1000000")
            .env("CARDVAULT_LIMITS_REVEAL_BURST", "100000")
            .stdout(std::fs::File::create(&log).expect("stdout file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start cardvault serve");
        let (addr, _) = serve::listening(&mut child, &log);
        VaultProcess { child, addr }
    }

    /// A client once the vault answers (it answers a tokenize, which needs its database).
    async fn client(&self) -> CardVaultClient<Channel> {
        for _ in 0..200 {
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
                .expect("uri")
                .connect()
                .await
            {
                let mut client = CardVaultClient::new(channel);
                if client
                    .tokenize(tokenize_request(&unique_pan()))
                    .await
                    .is_ok()
                {
                    return client;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the vault process did not start answering within 20 s");
    }

    /// SIGKILL: no drain, no flush, no goodbye.
    fn kill(mut self) {
        self.child.kill().expect("kill the vault");
        self.child.wait().expect("reap the vault");
    }
}

impl Drop for VaultProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 16 callers tokenize as fast as they can; the server is SIGKILLed mid-stream. After a
/// restart every card whose tokenize was answered reveals to its PAN, and the audit chains
/// verify.
async fn every_acknowledged_card_survives_a_crash_right_after_its_answer(backend: Backend) {
    let state = AppState::new(backend).await;
    let vault = VaultProcess::start(&state);
    let client = vault.client().await;

    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let mut callers = JoinSet::new();
    for _ in 0..16 {
        let mut client = client.clone();
        let acknowledged = acknowledged.clone();
        callers.spawn(async move {
            loop {
                let pan = unique_pan();
                match client.tokenize(tokenize_request(&pan)).await {
                    Ok(answer) => acknowledged
                        .lock()
                        .expect("lock")
                        .push((answer.into_inner().token, pan)),
                    Err(_) => return,
                }
            }
        });
    }
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if acknowledged.lock().expect("lock").len() >= 300 {
            break;
        }
    }
    vault.kill();
    callers.join_all().await;
    let acknowledged = acknowledged.lock().expect("lock").clone();

    let vault = VaultProcess::start(&state);
    let mut client = vault.client().await;
    for (token, pan) in &acknowledged {
        assert_eq!(&reveal(&mut client, token).await, pan);
    }
    vault.kill();
    let report = verify(&state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
    assert!(report.records as usize >= 2 * acknowledged.len());
}

/// Two replicas on one database: each writer's cached chain heads go stale whenever the
/// other replica appends to the same chain. The fast lane must notice (nothing written) and
/// fall back to the locked path; every card is stored once and the chains verify.
async fn two_replicas_appending_to_the_same_chains_keep_them_intact(backend: Backend) {
    let state = Arc::new(AppState::new(backend).await);
    // Every card is revealed afterwards, beyond the default reveal limit.
    let mut settings = state.settings("dev");
    settings.limits.reveal_per_minute = 1_000_000;
    settings.limits.reveal_burst = 100_000;
    let first = spawn_with(state.clone(), "dev", settings.clone()).await;
    let second = spawn_with(state, "dev", settings).await;
    let mut calls = JoinSet::new();
    for _ in 0..4 {
        tokenize_all(&mut calls, &first.client, plain(24));
        tokenize_all(&mut calls, &second.client, plain(24));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = first.client.clone();
    let mut tokens = HashSet::new();
    for (pan, answer) in calls.join_all().await {
        let token = answer.expect("tokenize");
        assert_eq!(reveal(&mut client, &token).await, pan);
        assert!(tokens.insert(token));
    }
    assert_eq!(first.state.count("SELECT COUNT(*) FROM cards").await, 192);
    let report = verify(&first.state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
    assert_eq!(
        report.records,
        2 * 192,
        "one record per tokenize and per reveal"
    );
}
