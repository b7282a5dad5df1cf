//! Helpers shared by the integration tests of every workspace member, as a library so each
//! test target takes the parts it uses:
//!
//! - [`database`] — a fresh, empty database per test on SQLite or PostgreSQL, and
//!   [`on_both_backends!`] to run a test once per backend.
//! - [`pki`] — a throwaway CA with server and client certificates, as PEM files.
//! - [`postgres`] — the PostgreSQL server to test against: found, or started for the run.
//! - [`serve`] — `cardvault serve` as a child process on ports it picks itself.
//! - [`softhsm`] — SoftHSM2 tokens for the `pkcs11` key provider.

#![forbid(unsafe_code)]

pub mod database;
pub mod pki;
pub mod postgres;
pub mod serve;
pub mod softhsm;
