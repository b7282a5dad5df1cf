//! Command-line clients of a running vault over gRPC: the connection flags and set-up that
//! `cardvault keys …` ([`key_admin`]), `cardvault charges …` ([`charges`]) and the load generator
//! (`cardvault-bench`, a workspace member of its own) share, and
//! `cardvault probe` ([`probe`]), the admin port's health check for images without curl.
//!
//! [`ConnectArgs`] is the command line (target, CA, client certificate, API key file);
//! [`Connection::prepare`] checks it and reads the files it names, so a bad flag is a usage
//! error before anything is sent. The API key comes from `--api-key-file`, else from
//! `$CARDVAULT_API_KEY` — never from a flag, since command lines show in `ps` — and is held
//! as a sensitive header value that no `Debug` or error message prints.

pub mod charge_ops;
pub mod charges;
pub mod key_admin;
pub mod probe;

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri},
};
use zeroize::Zeroizing;

use crate::telemetry::error_chain;

/// Environment variable holding the API key when `--api-key-file` is not given.
pub const API_KEY_ENV: &str = "CARDVAULT_API_KEY";

/// How long to wait for each connection (TCP, TLS and HTTP/2 handshakes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline of each request, so a vault that hangs cannot hang the client: the call fails
/// with DEADLINE_EXCEEDED instead.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the vault is and how to authenticate to it.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The vault's gRPC address: http://HOST:PORT for plain text, https://HOST:PORT for TLS.
    #[arg(long, value_name = "URI", default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// CA certificate(s) to trust for an https target, PEM.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mTLS, PEM (with --key-file).
    #[arg(long, value_name = "PEM", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Private key of --cert-file, PEM.
    #[arg(long, value_name = "PEM", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// File holding the API key, sent as `authorization: Bearer …`; else $CARDVAULT_API_KEY.
    /// (Never a flag: command lines show in `ps`.)
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Name to check the server certificate against [default: the target's host].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The arguments or the files they name are unusable.
    #[error("{0}")]
    Usage(String),
    /// A connection to the target could not be set up.
    #[error("cannot connect to {target}: {cause}")]
    Connect {
        /// The `--target`.
        target: String,
        /// The whole cause chain (TCP, TLS, HTTP/2).
        cause: String,
    },
}

/// A checked way to reach a vault: the endpoint (TLS configured, files read) and the
/// `authorization` header, if any.
#[derive(Clone)]
pub struct Connection {
    target: String,
    endpoint: Endpoint,
    tls: bool,
    /// `Bearer <key>`, marked sensitive so HTTP/2 never indexes it in HPACK tables.
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.target)
            .field("tls", &self.tls)
            .field("authenticated", &self.authorization.is_some())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Checks `args` and reads the CA, client certificate and API key they name (the API
    /// key from `$CARDVAULT_API_KEY` when no file is given). `client` names the tool in the
    /// user agent (`cardvault-<client>/<version>`).
    pub fn prepare(args: &ConnectArgs, client: &str) -> Result<Connection, ClientError> {
        Connection::prepare_with_env_key(args, client, env_api_key())
    }

    /// As [`Connection::prepare`], with the environment's API key given (tests).
    pub fn prepare_with_env_key(
        args: &ConnectArgs,
        client: &str,
        env_key: Option<Zeroizing<String>>,
    ) -> Result<Connection, ClientError> {
        let usage = |message: String| ClientError::Usage(message);
        let uri: Uri = args
            .target
            .parse()
            .map_err(|_| usage(format!("--target {} is not a URI", args.target)))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(usage(format!(
                    "--target must start with http:// (plain text) or https:// (TLS), not {}",
                    args.target
                )));
            }
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(usage(format!("--target {} has no host", args.target)));
        }

        let mut endpoint = Endpoint::from_shared(args.target.clone())
            .map_err(|e| usage(format!("--target {}: {e}", args.target)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(format!("cardvault-{client}/{}", env!("CARGO_PKG_VERSION")))
            .map_err(|e| usage(format!("user agent: {e}")))?;
        if tls {
            endpoint = endpoint
                .tls_config(tls_config(args)?)
                .map_err(|e| usage(format!("TLS configuration: {}", error_chain(&e))))?;
        } else if args.ca_file.is_some()
            || args.cert_file.is_some()
            || args.tls_server_name.is_some()
        {
            return Err(usage(
                "--ca-file, --cert-file and --tls-server-name need an https:// --target".to_owned(),
            ));
        }

        let key = match &args.api_key_file {
            Some(path) => Some(read_api_key(path)?),
            None => env_key,
        };
        let authorization = key.map(|key| bearer(&key)).transpose()?;

        Ok(Connection {
            target: args.target.clone(),
            endpoint,
            tls,
            authorization,
        })
    }

    /// The `--target` as given.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The endpoint to open connections from (each `connect` is a new HTTP/2 connection).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether the target is https.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The `authorization` header every request carries, if an API key was given.
    pub fn authorization(&self) -> Option<&AsciiMetadataValue> {
        self.authorization.as_ref()
    }

    /// Opens one connection.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        self.endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                target: self.target.clone(),
                cause: error_chain(&e),
            })
    }

    /// A request for `message`, carrying the API key when there is one.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

/// `$CARDVAULT_API_KEY`, unless unset or blank.
fn env_api_key() -> Option<Zeroizing<String>> {
    std::env::var(API_KEY_ENV)
        .ok()
        .filter(|k| !k.trim().is_empty())
        .map(Zeroizing::new)
}

fn tls_config(args: &ConnectArgs) -> Result<ClientTlsConfig, ClientError> {
    let Some(ca_file) = &args.ca_file else {
        return Err(ClientError::Usage(
            "an https:// --target needs --ca-file: the CA that signed the vault's certificate"
                .to_owned(),
        ));
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_file)?));
    if let Some(name) = &args.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        let key = Zeroizing::new(read(key)?);
        tls = tls.identity(Identity::from_pem(read(cert)?, key.as_slice()));
    }
    Ok(tls)
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))
}

fn read_api_key(path: &std::path::Path) -> Result<Zeroizing<String>, ClientError> {
    let bytes = Zeroizing::new(read(path)?);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ClientError::Usage(format!("API key file {} is not text", path.display())))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(ClientError::Usage(format!(
            "API key file {} is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(key.to_owned()))
}

/// `Bearer <key>` as a sensitive header value. The error never quotes the key.
fn bearer(key: &str) -> Result<AsciiMetadataValue, ClientError> {
    let header = Zeroizing::new(format!("Bearer {}", key.trim()));
    let mut value = MetadataValue::try_from(header.as_str()).map_err(|_| {
        ClientError::Usage("the API key holds characters not allowed in a header".to_owned())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        connection: ConnectArgs,
    }

    fn args(extra: &[&str]) -> ConnectArgs {
        Cli::try_parse_from(std::iter::once("client").chain(extra.iter().copied()))
            .expect("parses")
            .connection
    }

    #[test]
    fn the_default_target_is_the_default_grpc_port_on_loopback_in_plain_text() {
        let connection =
            Connection::prepare_with_env_key(&args(&[]), "test", None).expect("prepares");
        assert_eq!(connection.target(), "http://127.0.0.1:50051");
        assert!(!connection.is_tls());
        assert!(connection.authorization().is_none());
    }

    #[test]
    fn requests_carry_the_key_as_a_sensitive_header_that_debug_never_shows() {
        let connection = Connection::prepare_with_env_key(
            &args(&[]),
            "test",
            Some(Zeroizing::new("cv_id_secret".to_owned())),
        )
        .expect("prepares");
        let request = connection.request(());
        let header = request.metadata().get("authorization").expect("a header");
        assert_eq!(header.to_str().expect("ascii"), "Bearer cv_id_secret");
        assert!(header.is_sensitive());
        assert!(!format!("{connection:?}").contains("secret"));
    }

    #[test]
    fn an_https_target_needs_a_ca_and_tls_flags_need_https() {
        for extra in [
            &["--target", "https://127.0.0.1:50051"][..],
            &["--ca-file", "ca.pem"],
            &["--target", "127.0.0.1:50051"],
            &["--target", "http://"],
        ] {
            assert!(
                matches!(
                    Connection::prepare_with_env_key(&args(extra), "test", None),
                    Err(ClientError::Usage(_))
                ),
                "{extra:?} accepted"
            );
        }
    }
}
