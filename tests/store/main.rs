//! The store's own contract, on both backends (a SQLite file and a PostgreSQL database),
//! through the store's traits alone: no server, no gRPC.

// The api suite's app set-up (a keyring and an empty database per backend); this target uses
// only that part of it, hence the allowance. The shared support crate provides the test PKI
// and the PostgreSQL server it builds on.
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
use cardvault_test_support::{pki, postgres};

mod charge_store;
mod key_store;
mod store;
