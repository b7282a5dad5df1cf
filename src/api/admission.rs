//! Admission: whether a call may start at all. A replica takes a bounded amount of work —
//! in all, and per class of call, so floods of reveals, imports or admin calls cannot take
//! the room tokenize needs — and refuses the rest at once with `RESOURCE_EXHAUSTED` rather
//! than queueing it without bound. While the database is known to be down, calls that would
//! need it are refused at once with `UNAVAILABLE`. Each admitted call runs under its
//! deadline (see [`crate::vault::deadline`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    Status,
    body::Body,
    codegen::{Bytes, Service, http},
};

use crate::vault::deadline;

/// What kind of work a call is, by its gRPC path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Health checks and reflection: never refused, so probes see the truth under load.
    Exempt,
    /// `Reveal`: decrypts and returns card numbers.
    Reveal,
    /// `ImportCards` streams.
    Import,
    /// `AccessAdmin`, `KeyAdmin` and `Audit` calls.
    Admin,
    /// Everything else: tokenize, get, delete, charges.
    Default,
}

impl Class {
    /// The class of the call to `path` (`/package.Service/Method`).
    pub fn of(path: &str) -> Class {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        match (service, method) {
            ("grpc.health.v1.Health", _) => Class::Exempt,
            (s, _) if s.starts_with("grpc.reflection.") => Class::Exempt,
            ("cardvault.v1.CardVault", "Reveal") => Class::Reveal,
            ("cardvault.v1.CardVault", "ImportCards") => Class::Import,
            ("cardvault.v1.AccessAdmin" | "cardvault.v1.KeyAdmin" | "cardvault.v1.Audit", _) => {
                Class::Admin
            }
            _ => Class::Default,
        }
    }

    /// The `class` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Exempt => "exempt",
            Class::Reveal => "reveal",
            Class::Import => "import",
            Class::Admin => "admin",
            Class::Default => "default",
        }
    }
}

/// The limits, from `[grpc]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls in flight at once, all classes together.
    pub max_in_flight: usize,
    /// `Reveal` calls in flight at once.
    pub max_in_flight_reveal: usize,
    /// Admin calls in flight at once.
    pub max_in_flight_admin: usize,
    /// `ImportCards` streams open at once.
    pub max_import_streams: usize,
    /// The server's longest call: the deadline of a call that names none shorter.
    pub request_timeout: Duration,
}

/// The shared state of every connection's admission service.
#[derive(Debug)]
struct Gate {
    all: Arc<Semaphore>,
    reveal: Arc<Semaphore>,
    import: Arc<Semaphore>,
    admin: Arc<Semaphore>,
    limits: Limits,
    database_down: Arc<AtomicBool>,
}

/// The tower layer for `tonic::transport::Server::layer`.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    gate: Arc<Gate>,
}

impl AdmissionLayer {
    /// A layer enforcing `limits`, refusing calls while `database_down` is set (the readiness
    /// check sets it when the database does not answer, and clears it when it does).
    pub fn new(limits: Limits, database_down: Arc<AtomicBool>) -> AdmissionLayer {
        AdmissionLayer {
            gate: Arc::new(Gate {
                all: Arc::new(Semaphore::new(limits.max_in_flight)),
                reveal: Arc::new(Semaphore::new(limits.max_in_flight_reveal)),
                import: Arc::new(Semaphore::new(limits.max_import_streams)),
                admin: Arc::new(Semaphore::new(limits.max_in_flight_admin)),
                limits,
                database_down,
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// The admission service around tonic's router.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    gate: Arc<Gate>,
}

/// A call's place: its slots, given back when the call (for a stream: its response body)
/// ends.
#[derive(Debug)]
struct Slot {
    class: Class,
    _all: OwnedSemaphorePermit,
    _class: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn new(class: Class, all: OwnedSemaphorePermit, own: Option<OwnedSemaphorePermit>) -> Slot {
        metrics::gauge!("cardvault_grpc_server_requests_in_flight", "class" => class.as_str())
            .increment(1.0);
        Slot {
            class,
            _all: all,
            _class: own,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("cardvault_grpc_server_requests_in_flight", "class" => self.class.as_str())
            .decrement(1.0);
    }
}

impl Gate {
    /// Takes a slot for a call of `class`, or says why not.
    fn admit(&self, class: Class) -> Result<Option<Slot>, Status> {
        if class == Class::Exempt {
            return Ok(None);
        }
        if self.database_down.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "the vault's database is unavailable; retry later",
            ));
        }
        let (own, name, limit) = match class {
            Class::Reveal => (
                Some(&self.reveal),
                "grpc.max_in_flight_reveal",
                self.limits.max_in_flight_reveal,
            ),
            Class::Import => (
                Some(&self.import),
                "grpc.max_import_streams",
                self.limits.max_import_streams,
            ),
            Class::Admin => (
                Some(&self.admin),
                "grpc.max_in_flight_admin",
                self.limits.max_in_flight_admin,
            ),
            Class::Default | Class::Exempt => (None, "", 0),
        };
        let shed = |name: &str, limit: usize| {
            metrics::counter!("cardvault_grpc_server_shed_total", "class" => class.as_str())
                .increment(1);
            Status::resource_exhausted(format!(
                "too many calls in flight ({name} = {limit}); retry with backoff"
            ))
        };
        // The class first: a full class must not hold a global slot while it is refused.
        let own = match own {
            Some(semaphore) => Some(
                semaphore
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| shed(name, limit))?,
            ),
            None => None,
        };
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| shed("grpc.max_in_flight", self.limits.max_in_flight))?;
        Ok(Some(Slot::new(class, all, own)))
    }

    /// When the caller stops waiting: now plus its `grpc-timeout`, at most the server's
    /// request timeout.
    fn deadline(&self, headers: &http::HeaderMap) -> tokio::time::Instant {
        let timeout = headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(super::deadline::parse_grpc_timeout)
            .map_or(self.limits.request_timeout, |caller| {
                caller.min(self.limits.request_timeout)
            });
        tokio::time::Instant::now() + timeout
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let class = Class::of(request.uri().path());
        let slot = match self.gate.admit(class) {
            Ok(slot) => slot,
            // Trailers-only: the refusal is the whole response, sent before any work.
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        let deadline = self.gate.deadline(request.headers());
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = deadline::within(deadline, call).await?;
            Ok(match slot {
                // A stream's slot is held until its last message is sent.
                Some(slot) => response.map(|body| Body::new(Held { body, _slot: slot })),
                None => response,
            })
        })
    }
}

/// A response body holding its call's slot until it is dropped.
struct Held {
    body: Body,
    _slot: Slot,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(all: usize, reveal: usize) -> Gate {
        Gate {
            all: Arc::new(Semaphore::new(all)),
            reveal: Arc::new(Semaphore::new(reveal)),
            import: Arc::new(Semaphore::new(1)),
            admin: Arc::new(Semaphore::new(1)),
            limits: Limits {
                max_in_flight: all,
                max_in_flight_reveal: reveal,
                max_in_flight_admin: 1,
                max_import_streams: 1,
                request_timeout: Duration::from_secs(10),
            },
            database_down: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn calls_are_classed_by_path() {
        assert_eq!(Class::of("/grpc.health.v1.Health/Check"), Class::Exempt);
        assert_eq!(
            Class::of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Class::Exempt
        );
        assert_eq!(Class::of("/cardvault.v1.CardVault/Reveal"), Class::Reveal);
        assert_eq!(
            Class::of("/cardvault.v1.CardVault/ImportCards"),
            Class::Import
        );
        assert_eq!(Class::of("/cardvault.v1.KeyAdmin/RotateKek"), Class::Admin);
        assert_eq!(
            Class::of("/cardvault.v1.Audit/ListAuditRecords"),
            Class::Admin
        );
        assert_eq!(
            Class::of("/cardvault.v1.CardVault/Tokenize"),
            Class::Default
        );
        assert_eq!(Class::of("garbage"), Class::Default);
    }

    #[test]
    fn a_full_class_refuses_its_calls_but_not_the_others() {
        let gate = gate(3, 1);
        let reveal = gate.admit(Class::Reveal).expect("first reveal");
        let refused = gate.admit(Class::Reveal).expect_err("second reveal");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("grpc.max_in_flight_reveal"));
        // The refused reveal did not keep a global slot: two tokenizes still fit.
        let a = gate.admit(Class::Default).expect("tokenize");
        let b = gate.admit(Class::Default).expect("tokenize");
        let full = gate
            .admit(Class::Default)
            .expect_err("over the global limit");
        assert!(full.message().contains("grpc.max_in_flight "));
        // Health is never refused.
        assert!(gate.admit(Class::Exempt).expect("health").is_none());
        drop((reveal, a, b));
        assert!(gate.admit(Class::Reveal).is_ok());
    }

    #[test]
    fn a_database_known_down_refuses_all_but_health() {
        let gate = gate(3, 1);
        gate.database_down.store(true, Ordering::Relaxed);
        let refused = gate.admit(Class::Default).expect_err("database down");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(gate.admit(Class::Exempt).is_ok());
    }
}
