//! What a request presents to prove who it is: its bearer token, its verified client
//! certificate, its peer address. Deciding what they are worth is the vault's job.

use std::net::SocketAddr;

use tonic::Request;
use zeroize::Zeroizing;

use crate::vault::Credentials;

/// The credentials of one request, taken from it before its message is consumed.
#[derive(Default)]
pub struct RequestCredentials {
    bearer: Option<Zeroizing<String>>,
    malformed_header: bool,
    mtls_identity: Option<String>,
    peer: Option<SocketAddr>,
    forwarded_for: Option<String>,
}

impl std::fmt::Debug for RequestCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCredentials")
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("mtls_identity", &self.mtls_identity)
            .field("peer", &self.peer)
            .field("forwarded_for", &self.forwarded_for)
            .finish()
    }
}

impl RequestCredentials {
    /// Reads `authorization: Bearer …`, the identity of a client certificate the TLS layer
    /// verified against the client CA (SPIFFE URI SAN, else CN), the peer address, and
    /// `x-forwarded-for` (every such header, in order; the vault decides whether to believe
    /// it).
    pub fn of<T>(request: &Request<T>) -> RequestCredentials {
        let mut credentials = RequestCredentials {
            peer: request.remote_addr(),
            ..RequestCredentials::default()
        };
        if let Some(value) = request.metadata().get("authorization") {
            match value.to_str().ok().and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            }) {
                Some(token) => credentials.bearer = Some(Zeroizing::new(token.trim().to_owned())),
                None => credentials.malformed_header = true,
            }
        }
        let forwarded: Vec<&str> = request
            .metadata()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        if !forwarded.is_empty() {
            credentials.forwarded_for = Some(forwarded.join(","));
        }
        credentials.mtls_identity = request.peer_certs().and_then(|certs| {
            certs
                .first()
                .and_then(|c| crate::tls::peer_identity(c.as_ref()))
        });
        credentials
    }

    /// The credentials as the vault takes them. A malformed `authorization` header counts as
    /// a bad bearer token, never as no credentials at all.
    pub fn as_credentials(&self) -> Credentials<'_> {
        Credentials {
            bearer: if self.malformed_header {
                Some("")
            } else {
                self.bearer.as_deref().map(String::as_str)
            },
            mtls_identity: self.mtls_identity.as_deref(),
            peer: self.peer,
            forwarded_for: self.forwarded_for.as_deref(),
        }
    }
}
