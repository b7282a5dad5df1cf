//! Finds or starts the PostgreSQL server the integration tests use.
//!
//! In order: `DATABASE_URL` when set; else the server on `127.0.0.1:5432` (user `postgres`,
//! trust auth) when it answers; else a throwaway cluster started with the machine's
//! `initdb`/`pg_ctl` (on `PATH` or under `/usr/lib/postgresql/*/bin`). If none works the
//! tests fail with what to install — they never skip. `CV_TEST_PG_FORCE_INITDB=1` skips the
//! first two options, to exercise the throwaway cluster.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

/// A server the tests can create databases on.
pub struct PgServer {
    /// URL of a database that exists, for `CREATE DATABASE`.
    pub admin_url: String,
    /// `postgres://user@host:port` without a database or query.
    base: String,
    /// Query string of `DATABASE_URL`, kept for every database (e.g. `sslmode`).
    query: String,
}

impl PgServer {
    /// The process-wide server, resolved once.
    pub fn get() -> &'static PgServer {
        static SERVER: OnceLock<PgServer> = OnceLock::new();
        SERVER.get_or_init(resolve)
    }

    /// URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("{}/{db}{}", self.base, self.query)
    }

    /// `pg_dump` of database `db` (schema and data), as bytes.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let pg_dump = find_binary("pg_dump").unwrap_or_else(|| {
            panic!("pg_dump not found on PATH or in /usr/lib/postgresql/*/bin: apt-get install postgresql-client")
        });
        let output = Command::new(&pg_dump)
            .arg("--no-owner")
            .arg(format!("--dbname={}", self.url_for(db)))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", pg_dump.display()));
        assert!(
            output.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }
}

fn resolve() -> PgServer {
    let forced = std::env::var_os("CV_TEST_PG_FORCE_INITDB").is_some();
    if !forced {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            eprintln!("integration tests: PostgreSQL from DATABASE_URL");
            return from_url(&url);
        }
        let local = SocketAddr::from(([127, 0, 0, 1], 5432));
        if TcpStream::connect_timeout(&local, Duration::from_secs(1)).is_ok() {
            eprintln!("integration tests: PostgreSQL at 127.0.0.1:5432");
            return from_url("postgres://postgres@127.0.0.1:5432/postgres");
        }
    }
    let server = start_throwaway_cluster();
    eprintln!(
        "integration tests: throwaway PostgreSQL cluster at {}",
        server.admin_url
    );
    server
}

/// Splits `scheme://userinfo@host:port/db?query` into base, database and query.
fn from_url(url: &str) -> PgServer {
    let (before_query, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = before_query.find("://").map_or(0, |i| i + 3);
    let (base, db) = match before_query[scheme_end..].find('/') {
        Some(slash) => {
            let at = scheme_end + slash;
            (&before_query[..at], &before_query[at + 1..])
        }
        None => (before_query, ""),
    };
    let db = if db.is_empty() { "postgres" } else { db };
    PgServer {
        admin_url: format!("{base}/{db}{query}"),
        base: base.to_owned(),
        query,
    }
}

/// `name` on PATH, else the newest `/usr/lib/postgresql/<version>/bin/name`.
fn find_binary(name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let candidate = e.path().join("bin").join(name);
            candidate.is_file().then_some((version, candidate))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// Runs `program args…`, as user `postgres` when we are root (initdb refuses root).
fn run(program: &Path, args: &[String], as_postgres: bool) {
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let output = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn start_throwaway_cluster() -> PgServer {
    let missing = "no PostgreSQL for the tests: set DATABASE_URL, start a server on \
                   127.0.0.1:5432 (user postgres, trust auth), or install PostgreSQL \
                   (apt-get install postgresql) so the tests can start their own with initdb";
    let cluster = PrivateCluster::init(
        std::env::temp_dir().join(format!("cardvault-pg-{}", std::process::id())),
        missing,
    );
    cluster.resume();
    let url = cluster.url();
    cluster.stop_when_this_process_exits();
    from_url(&url)
}

/// A PostgreSQL cluster of one test's own, which the test may stop and start again (the
/// shared server must never go down under other tests). Removed when dropped.
pub struct PrivateCluster {
    pg_ctl: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PrivateCluster {
    /// initdb and start a cluster on a free loopback port (needs `initdb` and `pg_ctl`).
    pub fn start() -> PrivateCluster {
        let cluster = PrivateCluster::init(
            std::env::temp_dir().join(format!(
                "cardvault-pg-private-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            )),
            "no initdb/pg_ctl: install PostgreSQL (apt-get install postgresql)",
        );
        cluster.resume();
        cluster
    }

    /// initdb in `dir` (not started); panics with `missing` without `initdb` and `pg_ctl`.
    fn init(dir: PathBuf, missing: &str) -> PrivateCluster {
        let initdb = find_binary("initdb").unwrap_or_else(|| panic!("{missing}"));
        let pg_ctl = find_binary("pg_ctl").unwrap_or_else(|| panic!("{missing}"));
        let as_postgres = is_root();
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).expect("create cluster directory");
        if as_postgres {
            run(
                Path::new("chown"),
                &[
                    "-R".to_owned(),
                    "postgres".to_owned(),
                    dir.display().to_string(),
                ],
                false,
            );
        }
        run(
            &initdb,
            &[
                "-D".to_owned(),
                data.display().to_string(),
                "-A".to_owned(),
                "trust".to_owned(),
                "-U".to_owned(),
                "postgres".to_owned(),
                "--no-sync".to_owned(),
            ],
            as_postgres,
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        PrivateCluster {
            pg_ctl,
            data,
            dir,
            port,
            as_postgres,
        }
    }

    /// Hands the cluster to a detached watchdog that stops it and removes its files once
    /// this test process has exited: the shared throwaway cluster lives in a static, and
    /// statics are never dropped. The watchdog outlives us by design, so it is never waited
    /// for.
    #[allow(clippy::zombie_processes)]
    fn stop_when_this_process_exits(self) {
        let this = std::mem::ManuallyDrop::new(self);
        let stop = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {runas}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            runas = if this.as_postgres {
                "runuser -u postgres -- "
            } else {
                ""
            },
            pg_ctl = this.pg_ctl.display(),
            data = this.data.display(),
            dir = this.dir.display(),
        );
        let _watchdog = Command::new("setsid")
            .args(["sh", "-c", &stop])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the cluster watchdog");
    }

    /// URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections (same port as before).
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        run(
            &self.pg_ctl,
            &[
                "-D".to_owned(),
                self.data.display().to_string(),
                "-o".to_owned(),
                options,
                "-l".to_owned(),
                self.dir.join("log").display().to_string(),
                "-w".to_owned(),
                "start".to_owned(),
            ],
            self.as_postgres,
        );
    }

    /// `pg_ctl stop -m fast`: sessions are disconnected, the server exits.
    pub fn stop(&self) {
        run(
            &self.pg_ctl,
            &[
                "-D".to_owned(),
                self.data.display().to_string(),
                "-m".to_owned(),
                "fast".to_owned(),
                "-w".to_owned(),
                "stop".to_owned(),
            ],
            self.as_postgres,
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            c
        } else {
            Command::new(&self.pg_ctl)
        };
        let _ = command
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
