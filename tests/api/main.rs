//! Integration tests: the real server on a loopback port, called through the generated
//! client, once per backend (SQLite file and PostgreSQL).

mod helpers;
#[path = "../support/postgres.rs"]
mod postgres;

mod canary;
mod dedup;
mod errors;
mod expiry;
mod lifecycle;
mod reflection;
mod store;
