//! The gRPC edge: proto ⇄ domain conversion, who the caller is, and vault errors →
//! `tonic::Status`. No business rules and no SQL live here.

mod access_admin;
pub mod admission;
mod audit;
mod auth;
mod card_vault;
mod convert;
mod deadline;
mod error;
mod key_admin;
pub mod observe;
mod rpc;

pub use self::{
    access_admin::AccessAdminService, audit::AuditService, card_vault::CardVaultService,
    error::RequestId, key_admin::KeyAdminService,
};
