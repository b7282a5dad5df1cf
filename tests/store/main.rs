//! The store's own contract, on both backends (a SQLite file and a PostgreSQL database),
//! through the store's traits alone: no server, no gRPC.

// The app helpers and the test PKI and PostgreSQL cluster they build on; this target uses
// only the database set-up of `helpers`, so the rest of it is dead code here (the support
// files allow that themselves).
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../support/pki.rs"]
mod pki;
#[path = "../support/postgres.rs"]
mod postgres;

mod charge_store;
mod key_store;
mod store;
