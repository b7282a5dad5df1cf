//! The deployment: the Kubernetes manifests and the Dockerfile validate offline, and the
//! binary runs the way the image and the Deployment run it — stripped, as a numeric non-root
//! user, with only its data directory (and a temporary directory) writable.

use cardvault_test_support::{pki, serve};

use std::{
    fs,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use cardvault::pb::v1::{self as pb, card_vault_client::CardVaultClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The image's `USER 65532:65532` and the pods' `runAsUser`/`runAsGroup`.
const IMAGE_UID: u32 = 65532;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn texts(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_manifests_and_the_dockerfile_pass_offline_validation() {
    // deploy/validate names every missing tool and how to install it, then exits 1: the
    // assertion shows that message, so a machine without the tools fails here, never skips.
    let output = Command::new("bash")
        .arg(repo().join("deploy/validate"))
        .current_dir(repo())
        .output()
        .expect("run deploy/validate (needs bash)");
    let text = texts(&output);
    assert!(output.status.success(), "deploy/validate failed:\n{text}");
    for step in [
        "dev: custom resources against their JSON schemas",
        "production: core objects (kubernetes-validate --strict",
        "production: promtool check rules, promtool test rules",
        "checkov (Dockerfile)",
        "hadolint (Dockerfile)",
        "ok   postgresql.cnpg.io/v1 Cluster/cardvault-db",
        "ok   monitoring.coreos.com/v1 PrometheusRule/cardvault",
        "ok   cert-manager.io/v1 Certificate/cardvault",
        "all checks passed",
    ] {
        assert!(
            text.contains(step),
            "deploy/validate did not run {step:?}:\n{text}"
        );
    }
}

/// The configuration files the ConfigMaps ship are ones the vault accepts, with the values
/// the manifests rely on: a setting renamed in the code would otherwise show up only as
/// pods crash-looping after a rollout.
#[test]
fn the_shipped_configuration_files_load() {
    use cardvault::config::Settings;

    for (file, sampling_ratio) in [
        ("deploy/kubernetes/base/cardvault.toml", 0.1),
        ("deploy/kubernetes/overlays/dev/cardvault.toml", 1.0),
    ] {
        let path = repo().join(file);
        let settings = Settings::load(Some(&path)).unwrap_or_else(|err| panic!("{file}: {err}"));
        // The Service and the probes name these ports.
        assert_eq!(settings.grpc.addr.port(), 50051, "{file}: gRPC port");
        assert_eq!(settings.admin.addr.port(), 9090, "{file}: admin port");
        // Migrations are the Job's; three replicas must not race to run them.
        assert!(
            !settings.database.migrate_on_start,
            "{file}: migrate_on_start"
        );
        assert_eq!(
            settings.telemetry.otlp_endpoint.as_deref(),
            Some("http://otel-collector.observability.svc:4317"),
            "{file}: the collector the NetworkPolicy lets the pods reach"
        );
        assert_eq!(
            settings.telemetry.sampling_ratio, sampling_ratio,
            "{file}: sampling ratio"
        );
    }
}
/// The uid the test runs as: `/proc/self` belongs to the process's effective user.
fn euid() -> u32 {
    fs::metadata("/proc/self").expect("stat /proc/self").uid()
}

/// The file system a pod of the Deployment sees, in a temporary directory. Read-only (owned
/// by root, or mode 0400/0555 for the vault's user) wherever the Deployment mounts
/// read-only: the root file system with the binary, the ConfigMap, the TLS and keyring
/// Secrets. Writable only where it has an emptyDir: `data.dir` (/var/lib/cardvault) and
/// /tmp. Here `data.dir` holds the SQLite database; in the Deployment the database is
/// PostgreSQL and `data.dir` holds nothing durable.
struct Pod {
    root: tempfile::TempDir,
    binary: PathBuf,
    config: PathBuf,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    other_cert_file: PathBuf,
    as_root: bool,
}

impl Pod {
    fn new() -> Pod {
        let root = tempfile::tempdir().expect("temporary directory");
        let at = |path: &str| root.path().join(path);
        let as_root = euid() == 0;
        let chown_to_vault = |path: &Path| {
            if as_root {
                std::os::unix::fs::chown(path, Some(IMAGE_UID), Some(IMAGE_UID))
                    .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
            }
        };
        let chmod = |path: &Path, mode: u32| {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        };
        for dir in [
            "bin",
            "etc/cardvault/config",
            "etc/cardvault/tls",
            "etc/cardvault/keyring",
            "var/lib/cardvault",
            "tmp",
            "pki",
        ] {
            fs::create_dir_all(at(dir)).expect("create directory");
        }

        // The image's binary: the release build stripped of symbols. Here the test build,
        // stripped the same way.
        let binary = at("bin/cardvault");
        fs::copy(env!("CARGO_BIN_EXE_cardvault"), &binary).expect("copy the binary");
        let stripped = Command::new("strip")
            .arg(&binary)
            .output()
            .expect("run strip (binutils: apt-get install binutils)");
        assert!(stripped.status.success(), "strip: {}", texts(&stripped));
        assert!(
            fs::metadata(&binary).expect("stat").len()
                < fs::metadata(env!("CARGO_BIN_EXE_cardvault"))
                    .expect("stat")
                    .len(),
            "strip removed nothing"
        );

        // Certificates as the TLS Secret holds them (tls.crt, tls.key, ca.crt).
        let pki = pki::Pki::new(&at("pki"));
        for (from, to) in [
            (&pki.server_cert, "etc/cardvault/tls/tls.crt"),
            (&pki.server_key, "etc/cardvault/tls/tls.key"),
            (&pki.ca_file, "etc/cardvault/tls/ca.crt"),
        ] {
            fs::copy(from, at(to)).expect("copy certificate");
        }

        // The first KEK, made by an operator before the first start (deploy/README.md) and
        // stored in the keyring Secret.
        let keyring = at("etc/cardvault/keyring/keyring.toml");
        let init = Command::new(&binary)
            .args(["keys", "init", "--keyring"])
            .arg(&keyring)
            .output()
            .expect("run keys init");
        assert!(init.status.success(), "keys init: {}", texts(&init));

        let config = at("etc/cardvault/config/cardvault.toml");
        fs::write(
            &config,
            format!(
                r#"[grpc]
addr = "0.0.0.0:50051"

[admin]
addr = "0.0.0.0:9090"

[database]
migrate_on_start = false

[data]
dir = "{data}"

[keys]
provider = "local"
keyring = "{keyring}"

[tls]
cert_file = "{tls}/tls.crt"
key_file = "{tls}/tls.key"
client_ca_file = "{tls}/ca.crt"

[log]
format = "json"

[audit]
anchor_file = "-"
"#,
                data = at("var/lib/cardvault").display(),
                keyring = keyring.display(),
                tls = at("etc/cardvault/tls").display(),
            ),
        )
        .expect("write configuration");

        // Projected Secret volumes: files owned by runAsUser, mode 0400, in a directory
        // nobody may write. The ConfigMap and the root file system: root's, read-only.
        for secret in [
            "etc/cardvault/tls/tls.crt",
            "etc/cardvault/tls/tls.key",
            "etc/cardvault/tls/ca.crt",
            "etc/cardvault/keyring/keyring.toml",
        ] {
            chown_to_vault(&at(secret));
            chmod(&at(secret), 0o400);
        }
        chmod(&config, 0o444);
        for dir in [
            "etc/cardvault/config",
            "etc/cardvault/tls",
            "etc/cardvault/keyring",
            "etc/cardvault",
            "etc",
            "bin",
        ] {
            chmod(&at(dir), 0o555);
        }
        chmod(&binary, 0o555);
        // The emptyDirs: the data directory private to the vault's user, /tmp sticky.
        chown_to_vault(&at("var/lib/cardvault"));
        chmod(&at("var/lib/cardvault"), 0o700);
        chmod(&at("tmp"), 0o1777);
        for dir in ["var/lib", "var"] {
            chmod(&at(dir), 0o555);
        }
        chmod(root.path(), 0o755);

        // The CA a caller trusts, and an unrelated CA and certificate, readable by the
        // probe's user.
        chmod(&pki.other_ca_file, 0o644);
        chmod(&pki.other_client_cert, 0o644);
        chmod(&at("pki"), 0o755);
        Pod {
            binary,
            config,
            ca_file: at("etc/cardvault/tls/ca.crt"),
            other_ca_file: pki.other_ca_file.clone(),
            other_cert_file: pki.other_client_cert.clone(),
            as_root,
            root,
        }
    }

    fn path(&self, path: &str) -> PathBuf {
        self.root.path().join(path)
    }

    /// `cardvault ARGS --config …` as the container runs it: the image's user, a clean
    /// environment, the read-only root as working directory.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("TMPDIR", self.path("tmp"))
            .env("HOME", "/nonexistent")
            .current_dir(self.root.path());
        if self.as_root {
            // std drops supplementary groups too when root sets the uid.
            command.uid(IMAGE_UID).gid(IMAGE_UID);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run cardvault")
    }
}

fn probe(pod: &Pod, extra: &[&str]) -> Output {
    let mut args = vec!["probe"];
    args.extend_from_slice(extra);
    pod.run(&args)
}

/// Sends SIGTERM (as the kubelet does) and waits up to 30 s for the exit status.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -TERM failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait for cardvault") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "cardvault did not exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stripped_binary_serves_as_a_non_root_user_with_only_its_data_dir_writable() {
    let pod = Pod::new();

    // The migration Job, then the bootstrap an operator runs once (deploy/README.md).
    let migrated = pod.run(&["migrate"]);
    assert!(migrated.status.success(), "migrate: {}", texts(&migrated));
    let tenant = pod.run(&["admin", "create-tenant", "acme"]);
    assert!(tenant.status.success(), "create-tenant: {}", texts(&tenant));
    let principal = pod.run(&[
        "admin",
        "create-principal",
        "--tenant",
        "acme",
        "--name",
        "checkout",
        "--permissions",
        "tokenize",
    ]);
    assert!(principal.status.success(), "{}", texts(&principal));
    let principal_id = String::from_utf8(principal.stdout).expect("utf-8");
    let key = pod.run(&["admin", "create-api-key", principal_id.trim()]);
    assert!(key.status.success(), "create-api-key: {}", texts(&key));
    let api_key = String::from_utf8(key.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();

    let log = tempfile::NamedTempFile::new().expect("log file");
    let child = pod
        .command(&["serve"])
        // The ConfigMap's addresses, moved to loopback ports of its own choice for the test.
        .envs(serve::ANY_PORT)
        .stdout(log.reopen().expect("log"))
        .stderr(log.reopen().expect("log"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start cardvault serve");
    let mut running = Running(child);
    let (grpc, admin) = serve::listening(&mut running.0, log.path());
    let log_text = || fs::read_to_string(log.path()).unwrap_or_default();

    // The image's HEALTHCHECK: the probe pins the certificate in tls.cert_file.
    let url = format!("https://{admin}");
    let healthy = probe(&pod, &["--url", &url]);
    assert!(
        healthy.status.success(),
        "probe /healthz: {}\n{}",
        texts(&healthy),
        log_text()
    );
    let ca = pod.ca_file.to_str().expect("utf-8 path");
    let ready = probe(&pod, &["--url", &url, "--path", "/readyz", "--ca-file", ca]);
    assert!(ready.status.success(), "probe /readyz: {}", texts(&ready));
    // A CA that did not sign the vault's certificate: the probe refuses the server.
    let other_ca = pod.other_ca_file.to_str().expect("utf-8 path");
    let untrusted = probe(&pod, &["--url", &url, "--ca-file", other_ca]);
    assert_eq!(untrusted.status.code(), Some(1), "{}", texts(&untrusted));
    // Pinned to another certificate than the one served: refused too.
    let mispinned = pod
        .command(&["probe", "--url", &url])
        .env("CARDVAULT_TLS_CERT_FILE", &pod.other_cert_file)
        .output()
        .expect("run cardvault probe");
    assert_eq!(mispinned.status.code(), Some(1), "{}", texts(&mispinned));
    assert!(
        texts(&mispinned).contains("not the one in tls.cert_file"),
        "{}",
        texts(&mispinned)
    );

    // A Tokenize over TLS with the API key made above.
    let ca_pem = fs::read_to_string(&pod.ca_file).expect("read CA");
    let channel = Endpoint::from_shared(format!("https://{grpc}"))
        .expect("endpoint")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name("localhost"),
        )
        .expect("TLS")
        .connect()
        .await
        .expect("connect to the vault");
    let mut client = CardVaultClient::new(channel);
    let mut request = tonic::Request::new(pb::TokenizeRequest {
        card: Some(pb::CardInput {
            number: "4111111111111111".to_owned(),
            exp_month: 12,
            exp_year: 2030,
            cardholder_name: "Ada Lovelace".to_owned(),
        }),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {api_key}").parse().expect("header"),
    );
    let token = client
        .tokenize(request)
        .await
        .unwrap_or_else(|status| panic!("Tokenize: {status:?}\n{}", log_text()))
        .into_inner()
        .token;
    assert!(!token.is_empty());

    // What it wrote went to the data directory, which its user owns.
    let database = pod.path("var/lib/cardvault/cardvault.db");
    let owner = fs::metadata(&database).expect("the SQLite database").uid();
    if pod.as_root {
        assert_eq!(owner, IMAGE_UID, "the database belongs to the image's user");
    }

    let status = terminate(&mut running.0);
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}\n{}",
        log_text()
    );
    let log = log_text();
    assert!(!log.contains("4111111111111111"), "the PAN was logged");
    assert!(!log.contains(&api_key), "the API key was logged");

    // Nothing listens any more: the probe fails (exit 1, the HEALTHCHECK's unhealthy).
    let gone = probe(&pod, &["--url", &url, "--timeout-ms", "500"]);
    assert_eq!(gone.status.code(), Some(1), "{}", texts(&gone));
}
