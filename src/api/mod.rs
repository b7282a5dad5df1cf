//! The gRPC edge: proto ⇄ domain conversion, who the caller is, and vault errors →
//! `tonic::Status`. No business rules and no SQL live here.

mod auth;
mod card_vault;
mod convert;
mod error;

pub use self::{auth::Authenticator, card_vault::CardVaultService, error::RequestId};
