//! Integration tests: the real server on a loopback port, called through the generated
//! client, once per backend (SQLite file and PostgreSQL).

mod helpers;
#[path = "../support/pki.rs"]
mod pki;
#[path = "../support/postgres.rs"]
mod postgres;

mod access;
mod audit;
mod canary;
mod dedup;
mod errors;
mod expiry;
mod group_commit;
mod honeytoken;
mod import;
mod lifecycle;
mod loadgen;
mod reflection;
mod store;
