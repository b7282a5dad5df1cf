//! Generated protobuf and gRPC types. Only `api/` (and clients such as tests and the example)
//! use them; the layers below work on domain types.

#![allow(missing_docs)] // generated code; the documentation lives in the .proto files
#![allow(clippy::all, clippy::pedantic)] // generated code is not ours to restyle

/// `cardvault.v1`: the public API.
pub mod v1 {
    tonic::include_proto!("cardvault.v1");
}

/// Encoded `FileDescriptorSet` of `proto/`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cardvault_descriptor");
