//! cardvault: a payment-card tokenization vault.
//!
//! Checkout services send card data over gRPC; the vault validates it, encrypts it under
//! envelope keys with AES-256-GCM, stores only ciphertext and returns an opaque token.
//!
//! # Layout
//!
//! Dependencies point one way, top to bottom:
//!
//! - [`api`] — tonic services: proto ⇄ domain conversion, caller identity, errors → `Status`.
//! - [`vault`] — authentication, permissions, limits, and tokenize / get / reveal / delete
//!   orchestration with an audit record per action; no gRPC, no SQL.
//! - [`card`] — the domain: [`card::Pan`], Luhn, brands, expiry, token formats. No I/O.
//!   Beside it, [`id`] (the vault's ids; a [`id::ChargeId`] is the gateway's idempotency key
//!   and cannot be confused with the caller's) and [`money`] ([`money::Currency`]), each
//!   value checked once where it enters.
//! - [`crypto`] — key providers, data-key cache, AEAD records, fingerprints. Knows no cards.
//! - [`store`] — per-aggregate repositories (cards, access, audit, data keys, key jobs,
//!   charges), each statement written once for the PostgreSQL and SQLite backends.
//! - [`audit`] — the HMAC-chained audit log and its verifier.
//! - [`gateway`] — charge forwarding: connectors (`stripe`, `generic`) that send a charge to a
//!   configured payment gateway over HTTPS, with per-gateway TLS, timeouts, no redirects and
//!   a response cap. Never logs or returns a PAN.
//! - [`config`], [`telemetry`], [`tls`], [`server`] — wiring: configuration, logs, reloading
//!   TLS listeners, start-up and drain. [`secret_file`] reads key, PIN and secret files and
//!   refuses those group or others may read.
//! - [`client`] — `cardvault keys …` and `cardvault charges …`, the operators' clients of a
//!   running vault, the connection flags (target, TLS, API key) they share with the load
//!   generator, and `cardvault probe`.
//!
//! [`pb`] holds the generated protobuf code; only `api` (and clients) use it.
//!
//! # The binary and the workspace
//!
//! The `cardvault` binary (`src/main.rs`) is a few lines: its `cli` module holds one file per
//! command group (`serve`, `migrate`, `keys`, `admin`, `audit`, `charges`, `probe`), one
//! dispatch, and one set-up helper that loads the configuration and starts the runtime and
//! telemetry. It carries only what production runs. The tools built for tests, benchmarks
//! and demos are workspace members of their own, beside the layers rather than in them, and
//! depend on this library for what they need:
//!
//! - `tools/bench` (`cardvault-bench`) — the load generator, a gRPC client of the vault (it
//!   uses only [`pb`], [`client`], [`card::luhn`] and [`telemetry`]).
//! - `tools/test-gateway` (`cardvault-test-gateway`) — a Stripe-compatible test payment
//!   gateway (test cards, idempotency keys), a library the charge tests start in-process and
//!   a binary for demos.
//! - `tests/support` (`cardvault-test-support`) — helpers every integration test target
//!   shares.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod card;
pub mod client;
pub mod config;
pub mod crypto;
pub mod gateway;
pub mod id;
pub mod money;
pub mod pb;
pub mod secret_file;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod vault;
