//! Integration tests: the real server on a loopback port, called through the generated
//! client, once per backend (SQLite file and PostgreSQL).

mod helpers;
#[path = "../support/pki.rs"]
mod pki;
#[path = "../support/postgres.rs"]
mod postgres;
#[path = "../support/serve.rs"]
mod serve;
// Shared with tests/pkcs11.rs, which uses the rest of it.
#[allow(dead_code)]
#[path = "../support/softhsm.rs"]
mod softhsm;

mod access;
mod audit;
mod authn;
mod canary;
mod charge;
mod charge_ops;
mod dedup;
mod errors;
mod expiry;
mod group_commit;
mod honeytoken;
mod import;
mod input;
mod key_admin_api;
mod keys;
mod lifecycle;
mod loadgen;
mod metrics;
mod observe;
mod operators;
mod ops;
mod oracles;
mod otel;
mod reconcile;
mod reflection;
