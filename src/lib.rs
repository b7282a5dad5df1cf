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
//! - [`client`] — `cardvault keys …`, the operators' client of the `KeyAdmin` service, and
//!   the connection flags (target, TLS, API key) it shares with `bench`.
//! - [`loadgen`] — `cardvault bench`, a load generator: a gRPC client of the vault, beside
//!   the layers rather than in them (it uses only [`pb`], [`client`] and [`card::luhn`]).
//! - [`testgw`] — `cardvault test-gateway`, a Stripe-compatible test payment gateway (test
//!   cards, idempotency keys) for the charge tests and demos; beside the layers too.
//!
//! [`pb`] holds the generated protobuf code; only `api` (and clients) use it.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod card;
pub mod client;
pub mod config;
pub mod crypto;
pub mod gateway;
pub mod loadgen;
pub mod pb;
pub mod secret_file;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod testgw;
pub mod tls;
pub mod vault;
