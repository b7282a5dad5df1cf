//! SQLite backend: the embedded default (one file in the data directory, WAL mode). Its
//! connection set-up: the file made owner-only, `BEGIN IMMEDIATE` transactions.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    Sqlite, SqlitePool, Transaction,
    pool::PoolConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{
    Store, StoreError, StoreOptions, StoreTx,
    dialect::{Pool, Pooled, WriteTx},
    pool::{Acquires, PoolStats},
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// A pool of connections to one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    acquires: Acquires,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by a `sqlite://PATH` URL.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::UnsupportedUrl)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged token must survive a power cut, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        if !url.contains("mode=memory") {
            owner_only_files(connect.get_filename())?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self {
            pool,
            acquires: Acquires::new("sqlite"),
        })
    }

    /// A pooled connection, its wait counted and timed.
    async fn conn(&self) -> Result<PoolConnection<Sqlite>, sqlx::Error> {
        self.acquires.timed(self.pool.acquire()).await
    }

    /// `BEGIN IMMEDIATE` on a connection from [`SqliteStore::conn`]. `Transaction::begin` is
    /// what `Pool::begin_with` runs once it has a connection; calling it here keeps the pool
    /// wait measured apart from the wait for SQLite's write lock.
    async fn begin_immediate(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        Transaction::begin(
            self.conn().await?,
            Some(sqlx::SqlSafeStr::into_sql_str("BEGIN IMMEDIATE")),
        )
        .await
    }
}

/// Creates the database file owner-only (0600) if it is missing, and makes it and any
/// `-wal` and `-shm` file beside it owner-only if they are not — whatever the process umask
/// or the data directory's mode: they hold cards, wrapped keys and the audit log. SQLite
/// creates a missing `-wal` or `-shm` later with the main file's permissions (and sets them
/// so regardless of the umask), so those are owner-only too. An in-memory database (a
/// `file:` name) has no files.
fn owner_only_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    if path.as_os_str().to_string_lossy().starts_with("file:") {
        return Ok(());
    }
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::FileMode { path, source }
    };
    // Created here, before SQLite opens it, so it never exists with wider permissions.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(DATABASE_FILE_MODE)
        .open(path)
        .map_err(failed(path))?;
    let mut names = vec![path.to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        names.push(PathBuf::from(name));
    }
    for name in &names {
        let mode = match std::fs::metadata(name) {
            Ok(meta) => meta.permissions().mode() & 0o777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(failed(name)(e)),
        };
        if mode != DATABASE_FILE_MODE {
            std::fs::set_permissions(name, std::fs::Permissions::from_mode(DATABASE_FILE_MODE))
                .map_err(failed(name))?;
        }
    }
    Ok(())
}

/// Owner read and write, nobody else anything.
const DATABASE_FILE_MODE: u32 = 0o600;

#[async_trait]
impl Pool for SqliteStore {
    async fn pooled(&self) -> Result<Pooled, sqlx::Error> {
        Ok(Pooled::Sqlite(self.conn().await?))
    }

    async fn write_tx(&self) -> Result<WriteTx, sqlx::Error> {
        Ok(WriteTx::Sqlite(self.begin_immediate().await?))
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        Some(super::pool::stats(&self.pool, &self.acquires))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(super::migrate_error)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        super::ping(&mut self.pooled().await?).await
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        super::pending_migrations(&mut self.pooled().await?, &MIGRATOR).await
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        // IMMEDIATE takes the write lock now: a read-then-write transaction would otherwise
        // fail with SQLITE_BUSY when it tries to upgrade under concurrency.
        Ok(Box::new(WriteTx::Sqlite(self.begin_immediate().await?)))
    }
}
