//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf compiler, so a
//! machine with only Rust installed builds the project (no system `protoc`). Also names the
//! git commit being built, for the `cardvault_build_info` metric.

use std::{env, fs, io, path::PathBuf, process::Command};

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
    println!("cargo:rustc-env=BUILD_GIT_SHA={}", git_sha());

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

/// The short commit hash of the checkout, as the compile-time variable `BUILD_GIT_SHA` (not
/// `CARDVAULT_…`: cargo also sets it when it runs tests, and the settings loader reads every
/// `CARDVAULT_` variable as a setting). `BUILD_GIT_SHA` when set (an image build from
/// a tarball passes it in), else `git rev-parse`, else `unknown` (no git, or no `.git`: a
/// source tarball still builds). Asks cargo to rerun when HEAD moves.
fn git_sha() -> String {
    println!("cargo:rerun-if-env-changed=BUILD_GIT_SHA");
    if let Ok(sha) = env::var("BUILD_GIT_SHA")
        && is_short_sha(&sha)
    {
        return sha;
    }
    // Only existing files: cargo treats a missing rerun-if-changed path as always changed.
    // `--git-path` resolves them in linked worktrees too, where `.git` is a file.
    let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(head_ref);
    for name in &watched {
        if let Some(path) = git(&["rev-parse", "--git-path", name])
            && fs::metadata(&path).is_ok()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|sha| is_short_sha(sha))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn is_short_sha(sha: &str) -> bool {
    (7..=40).contains(&sha.len()) && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `git ARGS` run in the package directory, its trimmed output if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let dir = env::var("CARGO_MANIFEST_DIR").ok()?;
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}
