//! `cardvault probe`: asks a vault's admin port whether it is alive (`/healthz`) or ready
//! (`/readyz`) and exits 0 on `200 OK`, 1 otherwise.
//!
//! It exists because the container image has no shell and no curl: the image's
//! `HEALTHCHECK` and a Kubernetes `exec` probe run the vault binary itself. It needs no
//! database and no key provider; without `--url` it reads only the `[admin]` and `[tls]`
//! settings to find the port and whether it speaks TLS.
//!
//! Over TLS it trusts `--ca-file` when given. Without it, it trusts exactly the certificate
//! the vault is configured to serve (the first certificate of `tls.cert_file`): the probe
//! runs beside the vault, reads the same files, and the certificate, issued for the
//! Service's DNS names, need not name `127.0.0.1`. The answer carries no secret either way;
//! the pin only makes sure the probe talks to this vault and not to whatever else holds the
//! port.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

use crate::config::Settings;

/// The command line of `cardvault probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Admin base URL, e.g. https://127.0.0.1:9090 [default: from admin.addr and tls.*
    /// settings, an unspecified address probed on loopback].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Path to ask for: /healthz (alive) or /readyz (ready for traffic).
    #[arg(long, value_name = "PATH", default_value = "/healthz")]
    pub path: String,
    /// CA certificate(s) to trust for an https URL, PEM [default: trust exactly the
    /// certificate in tls.cert_file].
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Whole-probe timeout (connect, TLS, answer), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    pub timeout_ms: u64,
}

/// Why a probe could not be made (as opposed to a vault that answered "not ready").
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The arguments, the settings or the files they name are unusable.
    #[error("{0}")]
    Usage(String),
}

/// Runs the probe: exit 0 when the vault answers 200, 1 otherwise — also when the probe
/// itself is misconfigured, since Docker reserves a health check's exit code 2.
pub async fn run_cli(args: &ProbeArgs, config: Option<&Path>) -> ExitCode {
    let target = match Target::resolve(args, config) {
        Ok(target) => target,
        Err(err) => {
            eprintln!("cardvault probe: {err}");
            return ExitCode::FAILURE;
        }
    };
    match probe(&target, Duration::from_millis(args.timeout_ms)).await {
        Ok(200) => {
            println!("{} 200", target.url);
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("cardvault probe: {} answered {status}", target.url);
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("cardvault probe: {}: {err}", target.url);
            ExitCode::FAILURE
        }
    }
}

/// What to ask and whom to trust.
#[derive(Debug)]
pub struct Target {
    /// The whole URL (base and path).
    pub url: String,
    /// Trust for an https URL.
    trust: Trust,
}

#[derive(Debug)]
enum Trust {
    /// Plain HTTP.
    None,
    /// These CA certificates.
    Roots(RootCertStore),
    /// Exactly this server certificate.
    Pinned(CertificateDer<'static>),
}

impl Target {
    /// The URL and trust the arguments give, filling the gaps from the settings in `config`
    /// (and `CARDVAULT_*` variables) only when `--url` is missing, or is https without
    /// `--ca-file`.
    pub fn resolve(args: &ProbeArgs, config: Option<&Path>) -> Result<Target, ProbeError> {
        let usage = ProbeError::Usage;
        if !args.path.starts_with('/') {
            return Err(usage(format!(
                "--path must start with /, not {}",
                args.path
            )));
        }
        let given_https = args
            .url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
        let settings = if args.url.is_none() || (given_https && args.ca_file.is_none()) {
            Some(Settings::load(config).map_err(|e| usage(e.to_string()))?)
        } else {
            None
        };
        let base = match (&args.url, &settings) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(settings)) => default_base(settings),
            (None, None) => unreachable!("settings are loaded when --url is missing"),
        };
        let tls = if base.starts_with("https://") {
            true
        } else if base.starts_with("http://") {
            false
        } else {
            return Err(usage(format!(
                "--url must start with http:// or https://, not {base}"
            )));
        };
        let trust = match (tls, &args.ca_file, &settings) {
            (false, None, _) => Trust::None,
            (false, Some(_), _) => return Err(usage("--ca-file needs an https:// URL".to_owned())),
            (true, Some(ca_file), _) => Trust::Roots(roots(ca_file)?),
            (true, None, Some(settings)) => match &settings.tls.cert_file {
                Some(cert_file) => Trust::Pinned(first_cert(cert_file)?),
                None => {
                    return Err(usage(
                        "an https:// URL needs --ca-file, or tls.cert_file to pin".to_owned(),
                    ));
                }
            },
            (true, None, None) => {
                unreachable!("settings are loaded for https without --ca-file")
            }
        };
        Ok(Target {
            url: format!("{base}{}", args.path),
            trust,
        })
    }
}

/// `http(s)://<admin.addr>`, https when the vault serves TLS; an unspecified address
/// (`0.0.0.0`, `::`) is asked on loopback, where the probe runs.
fn default_base(settings: &Settings) -> String {
    let mut addr: SocketAddr = settings.admin.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let scheme = if settings.tls.cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}")
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProbeError> {
    let pem = std::fs::read(path)
        .map_err(|e| ProbeError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ProbeError::Usage(format!("{} is not valid PEM", path.display())))?;
    if certs.is_empty() {
        return Err(ProbeError::Usage(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<RootCertStore, ProbeError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| {
            ProbeError::Usage(format!("invalid CA certificate in {}: {e}", path.display()))
        })?;
    }
    Ok(roots)
}

fn first_cert(path: &Path) -> Result<CertificateDer<'static>, ProbeError> {
    read_certs(path).map(|mut certs| certs.swap_remove(0))
}

/// One GET; the HTTP status, or why there was none.
async fn probe(target: &Target, timeout: Duration) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("cardvault-probe/", env!("CARGO_PKG_VERSION")))
        // Also for plain HTTP: without a preconfigured config reqwest builds one from the
        // process-default provider.
        .tls_backend_preconfigured(tls_config(&target.trust)?)
        .build()
        .map_err(|e| crate::telemetry::error_chain(&e))?;
    let response = client
        .get(&target.url)
        .send()
        .await
        .map_err(|e| crate::telemetry::error_chain(&e))?;
    Ok(response.status().as_u16())
}

fn tls_config(trust: &Trust) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration rejected: {e}"))?;
    let mut config = match trust {
        Trust::None => builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
        Trust::Roots(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        Trust::Pinned(leaf) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedLeaf {
                leaf: leaf.clone(),
                provider,
            }))
            .with_no_client_auth(),
    };
    // The admin listener speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts exactly one server certificate, and checks the handshake is signed by its key
/// (so a copy of the certificate without the key does not pass).
#[derive(Debug)]
struct PinnedLeaf {
    leaf: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one in tls.cert_file".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        probe: ProbeArgs,
    }

    fn args(extra: &[&str]) -> ProbeArgs {
        Cli::try_parse_from(std::iter::once("probe").chain(extra.iter().copied()))
            .expect("parses")
            .probe
    }

    #[test]
    fn an_unspecified_admin_address_is_probed_on_loopback() {
        let mut settings = Settings::load(None).expect("defaults load");
        settings.admin.addr = "0.0.0.0:9191".parse().expect("addr");
        assert_eq!(default_base(&settings), "http://127.0.0.1:9191");
        settings.admin.addr = "[::]:9191".parse().expect("addr");
        settings.tls.cert_file = Some(PathBuf::from("/etc/cardvault/tls/tls.crt"));
        assert_eq!(default_base(&settings), "https://[::1]:9191");
    }

    #[test]
    fn a_given_url_and_path_make_the_target_without_settings() {
        let target = Target::resolve(
            &args(&["--url", "http://127.0.0.1:1/", "--path", "/readyz"]),
            Some(Path::new("/nonexistent/cardvault.toml")),
        )
        .expect("resolves");
        assert_eq!(target.url, "http://127.0.0.1:1/readyz");
    }

    #[test]
    fn bad_urls_paths_and_tls_flags_are_usage_errors() {
        for extra in [
            &["--url", "127.0.0.1:9090"][..],
            &["--url", "http://127.0.0.1:9090", "--path", "healthz"],
            &["--url", "http://127.0.0.1:9090", "--ca-file", "ca.pem"],
            &[
                "--url",
                "https://127.0.0.1:9090",
                "--ca-file",
                "/nonexistent.pem",
            ],
        ] {
            assert!(
                Target::resolve(&args(extra), None).is_err(),
                "{extra:?} accepted"
            );
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_a_failed_probe_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let target =
            Target::resolve(&args(&["--url", &format!("http://{addr}")]), None).expect("resolves");
        assert!(probe(&target, Duration::from_millis(500)).await.is_err());
    }
}
