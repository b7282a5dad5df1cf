//! The outbound HTTPS client: one `reqwest::Client` per gateway.
//!
//! - TLS is our own rustls `ClientConfig` (ring provider, TLS 1.3 and 1.2, ALPN h2 and
//!   http/1.1), trusting the gateway's `ca_file` if set, else the Mozilla roots compiled in
//!   from `webpki-roots` (no system store: the same roots in every container image), and
//!   presenting `client_cert_file` / `client_key_file` when set.
//! - No redirects: a 3xx answer is a [`Failure::Redirect`]. No proxies (neither configured
//!   nor from the environment): card data goes straight to the gateway. HTTPS only, unless the
//!   gateway is a loopback test gateway.
//! - `connect_timeout` bounds TCP connect plus TLS handshake. `timeout` bounds a whole call of
//!   a connector (every exchange of one charge, lookup or operation together): each exchange
//!   gets what is left of its [`Deadline`], reading the body included, so a two-step charge
//!   cannot take twice the time the caller's own deadline was set against.
//! - The body is read chunk by chunk and refused past `max_response_bytes`
//!   ([`Failure::TooLarge`]), so a hostile gateway cannot make us buffer gigabytes.
//!
//! What a failure means for a charge is the connector's call (see the [module
//! docs](super)): only [`Failure::not_sent`] failures prove the request was not sent.

use std::{
    fs,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::{
    Method, Url,
    header::{self, HeaderMap, HeaderValue},
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tracing::Instrument;
use zeroize::Zeroizing;

use super::{GatewayError, GatewaySettings};

/// Initial buffer for a response without `Content-Length`.
const INITIAL_BODY_CAPACITY: usize = 8 * 1024;

/// A gateway's answer.
pub(crate) struct Answer {
    /// The HTTP status (never 3xx: those are [`Failure::Redirect`]).
    pub(crate) status: u16,
    /// The whole body, at most `max_response_bytes`.
    pub(crate) body: Zeroizing<Vec<u8>>,
}

/// Why there is no [`Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection (TCP, TLS) could not be opened: the request was not sent.
    Unreachable,
    /// The total timeout passed; the request may have been sent and acted on.
    TimedOut,
    /// The connection broke; the request may have been sent and acted on.
    Lost,
    /// The gateway answered with a redirect (this HTTP status), which we never follow.
    Redirect(u16),
    /// The body was larger than `max_response_bytes` (HTTP status of the answer).
    TooLarge(u16),
    /// The call's [`Deadline`] had passed before this request was sent: it was not sent.
    OutOfTime,
}

/// When one connector call (all its HTTP exchanges together) must be over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Instant);

impl Deadline {
    /// `budget` from now.
    pub(crate) fn after(budget: Duration) -> Deadline {
        Deadline(Instant::now() + budget)
    }

    /// The time left, `None` once it has passed.
    fn remaining(self) -> Option<Duration> {
        self.0
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }
}

impl Failure {
    /// Whether the request certainly never reached the gateway.
    pub(crate) fn not_sent(self) -> bool {
        matches!(self, Failure::Unreachable | Failure::OutOfTime)
    }

    /// Our message for an outcome, naming no URL and no data.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Failure::Unreachable => "gateway unreachable",
            Failure::TimedOut => "gateway timed out",
            Failure::Lost => "connection to the gateway lost",
            Failure::Redirect(_) => "gateway answered with a redirect (refused)",
            Failure::TooLarge(_) => "gateway response too large (refused)",
            Failure::OutOfTime => "gateway timeout used up before the request was sent",
        }
    }

    /// The HTTP status, when the gateway answered at all.
    pub(crate) fn http_status(self) -> Option<u16> {
        match self {
            Failure::Redirect(s) | Failure::TooLarge(s) => Some(s),
            Failure::Unreachable | Failure::TimedOut | Failure::Lost | Failure::OutOfTime => None,
        }
    }
}

/// One gateway's HTTP client.
#[derive(Debug)]
pub(crate) struct HttpClient {
    gateway: String,
    client: reqwest::Client,
    base: Url,
    max_response_bytes: usize,
    timeout: Duration,
}

impl HttpClient {
    /// Builds the client from checked settings, reading the TLS files.
    pub(crate) fn new(settings: &GatewaySettings) -> Result<HttpClient, GatewayError> {
        let gateway = settings.name.clone();
        let base = settings.base_url()?;
        let max_response_bytes =
            usize::try_from(settings.max_response_bytes).map_err(|_| GatewayError::Config {
                gateway: gateway.clone(),
                reason: "max_response_bytes is too large for this platform".to_owned(),
            })?;
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(settings.connect_timeout())
            .timeout(settings.timeout())
            .https_only(base.scheme() == "https")
            .user_agent(concat!("cardvault/", env!("CARGO_PKG_VERSION")))
            // Also for a plain-HTTP loopback test gateway, which never uses it: without a
            // preconfigured config reqwest builds one from the process-default provider and
            // panics when none is installed.
            .tls_backend_preconfigured(tls_config(settings)?);
        let client = builder.build().map_err(|source| GatewayError::Client {
            gateway: gateway.clone(),
            source,
        })?;
        Ok(HttpClient {
            gateway,
            client,
            base,
            max_response_bytes,
            timeout: settings.timeout(),
        })
    }

    /// `base_url` followed by `path` (which starts with `/` or is empty).
    pub(crate) fn url(&self, path: &str) -> Result<Url, GatewayError> {
        let joined = format!("{}{path}", self.base.as_str().trim_end_matches('/'));
        Url::parse(&joined).map_err(|_| GatewayError::Config {
            gateway: self.gateway.clone(),
            reason: "base_url and path do not make a valid URL".to_owned(),
        })
    }

    /// The deadline of a connector call starting now: `timeout_ms` away.
    pub(crate) fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }

    /// Sends one request and reads the answer within the limits and before `deadline`.
    /// `step` names the request in logs (`payment_method`, `payment_intent`, `charge`,
    /// `lookup`, …). The body buffer goes to the HTTP client as is and is zeroized when the
    /// client drops it.
    pub(crate) async fn send(
        &self,
        step: &'static str,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Zeroizing<Vec<u8>>,
        deadline: Deadline,
    ) -> Result<Answer, Failure> {
        let started = Instant::now();
        let result = match deadline.remaining() {
            Some(left) => {
                // The client span of this request: method, gateway and status only (the URL
                // and body may carry card data or secrets). The log lines below stay in the
                // caller's span, which holds its request id.
                let span = tracing::info_span!(
                    "gateway.request",
                    otel.kind = "client",
                    otel.status_code = tracing::field::Empty,
                    http.request.method = method.as_str(),
                    cardvault.gateway = %self.gateway,
                    http.response.status_code = tracing::field::Empty,
                );
                let mut headers = headers;
                crate::telemetry::propagation::inject(&span, &mut headers);
                let result = self
                    .exchange(method, url, headers, body, left)
                    .instrument(span.clone())
                    .await;
                let status = match &result {
                    Ok(answer) => Some(answer.status),
                    Err(failure) => failure.http_status(),
                };
                if let Some(status) = status {
                    span.record("http.response.status_code", i64::from(status));
                }
                if result.is_err() || status.is_some_and(|s| s >= 500) {
                    span.record("otel.status_code", "error");
                }
                result
            }
            None => Err(Failure::OutOfTime),
        };
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(answer) => tracing::debug!(
                gateway = %self.gateway,
                step,
                http_status = answer.status,
                latency_ms,
                "gateway answered"
            ),
            Err(failure) => tracing::debug!(
                gateway = %self.gateway,
                step,
                http_status = failure.http_status(),
                latency_ms,
                failure = failure.message(),
                "gateway exchange failed"
            ),
        }
        result
    }

    async fn exchange(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Zeroizing<Vec<u8>>,
        time_left: Duration,
    ) -> Result<Answer, Failure> {
        let mut response = self
            .client
            .request(method, url.clone())
            .timeout(time_left)
            .headers(headers)
            .body(bytes::Bytes::from_owner(body))
            .send()
            .await
            .map_err(|err| self.classify(&err))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(Failure::Redirect(status.as_u16()));
        }
        let too_large = Failure::TooLarge(status.as_u16());
        let expected = response.content_length().unwrap_or(0);
        if expected > self.max_response_bytes as u64 {
            return Err(too_large);
        }
        let capacity = usize::try_from(expected)
            .unwrap_or(0)
            .max(INITIAL_BODY_CAPACITY)
            .min(self.max_response_bytes);
        let mut body = Zeroizing::new(Vec::with_capacity(capacity));
        while let Some(chunk) = response.chunk().await.map_err(|err| self.classify(&err))? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status: status.as_u16(),
            body,
        })
    }

    /// Maps a reqwest error; logs its cause chain (no URL: reqwest's errors carry one, and
    /// ours never have data in it, but logs name gateways, not URLs).
    fn classify(&self, err: &reqwest::Error) -> Failure {
        let failure = if err.is_connect() {
            Failure::Unreachable
        } else if err.is_timeout() {
            Failure::TimedOut
        } else {
            Failure::Lost
        };
        let mut cause = String::new();
        let mut source = std::error::Error::source(err);
        while let Some(inner) = source {
            if !cause.is_empty() {
                cause.push_str(": ");
            }
            cause.push_str(&inner.to_string());
            source = inner.source();
        }
        tracing::warn!(
            gateway = %self.gateway,
            failure = failure.message(),
            cause,
            "gateway request failed"
        );
        failure
    }
}

/// The rustls configuration of one gateway.
fn tls_config(settings: &GatewaySettings) -> Result<ClientConfig, GatewayError> {
    let tls_error = |reason: String| GatewayError::Tls {
        gateway: settings.name.clone(),
        reason,
    };
    let roots = match &settings.ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path).map_err(tls_error)? {
                roots.add(cert).map_err(|e| {
                    tls_error(format!("invalid CA certificate in {}: {e}", path.display()))
                })?;
            }
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    // Explicit rather than the process default: nothing has to install a provider first,
    // and aws-lc can never sneak in through one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error(format!("TLS configuration rejected: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&settings.client_cert_file, &settings.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certs(cert_path).map_err(tls_error)?;
            let key = read_key(key_path).map_err(tls_error)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                tls_error(format!(
                    "client certificate {} and key {} are unusable: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("{} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// Largest client key file read: an RSA-8192 PEM is under 7 KB.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = crate::secret_file::read(path, MAX_KEY_FILE_BYTES)
        .map_err(|e| format!("client key: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!(
            "no private key (PKCS#8, SEC1 or PKCS#1 PEM) in {}",
            path.display()
        )
    })
}

/// A header value that is left out of `Debug` output (and so of any log of the request).
pub(crate) fn sensitive(value: HeaderValue) -> HeaderValue {
    let mut value = value;
    value.set_sensitive(true);
    value
}

/// `Content-Type` for a body format.
pub(crate) fn content_type(form: bool) -> (header::HeaderName, HeaderValue) {
    let value = if form {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    (header::CONTENT_TYPE, HeaderValue::from_static(value))
}
