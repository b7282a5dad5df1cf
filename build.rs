//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf compiler, so a
//! machine with only Rust installed builds the project (no system `protoc`).

use std::{env, fs, io, path::PathBuf};

use prost::Message;

fn main() -> io::Result<()> {
    let protos = [
        "proto/cardvault/v1/card.proto",
        "proto/cardvault/v1/card_vault.proto",
        "proto/cardvault/v1/access_admin.proto",
        "proto/cardvault/v1/key_admin.proto",
        "proto/cardvault/v1/audit.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(protos, ["proto"]).map_err(io::Error::other)?;

    // Server reflection serves this descriptor set, so grpcurl works without the .proto files.
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(io::Error::other)?);
    fs::write(
        out_dir.join("cardvault_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
}
