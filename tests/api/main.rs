//! Integration tests: the real server on a loopback port, called through the generated
//! client, once per backend (SQLite file and PostgreSQL).

mod helpers;
use cardvault_test_support::{on_both_backends, pki, postgres, serve, softhsm};

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
