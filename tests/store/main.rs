//! The store's own contract, on both backends (a SQLite file and a PostgreSQL database),
//! through the store's traits alone: no server, no gRPC.

use cardvault_test_support::on_both_backends;

mod charge_store;
mod key_store;
mod store;
