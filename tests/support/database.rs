//! A fresh, empty database per test on either backend, and the macro that runs a test once
//! per backend.

use std::path::PathBuf;

use sqlx::Connection as _;

use crate::postgres::PgServer;

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's own directory.
    Sqlite,
    /// A database of its own on the PostgreSQL server the run uses.
    Postgres,
}

/// Runs each named `async fn(Backend)` once per backend, as `<name>::sqlite` and
/// `<name>::postgres`. The calling crate needs `tokio` (with `macros`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::database::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::database::Backend::Postgres).await
            }
        }
    )*};
}

/// A test's directory and an empty database: a SQLite file in the directory, or a
/// PostgreSQL database dropped again when this is dropped.
pub struct TestDatabase {
    /// The backend.
    pub backend: Backend,
    /// The test's own directory (the SQLite file lives here, and anything else the test
    /// keeps).
    pub dir: tempfile::TempDir,
    /// The database's URL, as `database.url` takes it.
    pub database_url: String,
    /// The PostgreSQL database name, for dumps.
    pub pg_database: Option<String>,
}

impl TestDatabase {
    /// A fresh directory and a fresh, empty database. Fails, saying what to install, when
    /// no PostgreSQL server can be reached or started.
    pub async fn new(backend: Backend) -> TestDatabase {
        let dir = tempfile::tempdir().expect("temp dir");
        let (database_url, pg_database) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("cardvault.db").display()),
                None,
            ),
            Backend::Postgres => {
                let name = format!("cardvault_test_{}", uuid::Uuid::new_v4().simple());
                create_pg_database(&name).await;
                (PgServer::get().url_for(&name), Some(name))
            }
        };
        TestDatabase {
            backend,
            dir,
            database_url,
            pg_database,
        }
    }

    /// Files of the SQLite database (main file, WAL, shared memory).
    pub fn sqlite_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path())
            .expect("read dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("cardvault.db"))
            })
            .collect()
    }
}

impl Drop for TestDatabase {
    /// Drops the test's PostgreSQL database, so runs do not pile databases up on a shared
    /// server. `Drop` cannot await, so a short-lived thread with its own runtime does it.
    fn drop(&mut self) {
        let Some(name) = self.pg_database.take() else {
            return;
        };
        let admin = PgServer::get().admin_url.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await?;
                // FORCE: a stopped vault's pool may still hold connections.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .map(|_| ())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop a test database; it is left on the server");
        }
    }
}

async fn create_pg_database(name: &str) {
    let admin = &PgServer::get().admin_url;
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {admin}: {e}. Start PostgreSQL on 127.0.0.1:5432, \
             or set DATABASE_URL, or install it (apt-get install postgresql) so the tests can \
             start their own"
            )
        });
    // The name is ours (a fixed prefix and a UUID), never input.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .expect("create test database");
}
