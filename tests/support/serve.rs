//! `cardvault serve` as a child process on loopback ports it picks itself.
//!
//! Picking a free port in the test and handing it to the child leaves a window in which
//! another test's server can take it: the child then fails to bind, or — worse — the test
//! talks to the other test's vault. So the child binds port 0 and the test reads the
//! addresses from the line it prints once it listens.

use std::{
    net::SocketAddr,
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

/// Environment for a child to bind its gRPC and admin listeners on ports of its own choice.
pub const ANY_PORT: [(&str, &str); 2] = [
    ("CARDVAULT_GRPC_ADDR", "127.0.0.1:0"),
    ("CARDVAULT_ADMIN_ADDR", "127.0.0.1:0"),
];

/// The gRPC and admin addresses `child` listens on, from the line
/// `cardvault listening: gRPC A · admin http://B` it prints to `stdout_log` (a file its
/// standard output goes to). Panics with the log when the child exits first or 30 s pass.
pub fn listening(child: &mut Child, stdout_log: &Path) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(stdout_log).unwrap_or_default();
        if let Some(addrs) = log.lines().find_map(parse) {
            return addrs;
        }
        if let Some(status) = child.try_wait().expect("poll cardvault serve") {
            panic!("cardvault serve exited ({status}) before it listened:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "cardvault serve did not listen within 30 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parse(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("cardvault listening: gRPC ")?;
    let (grpc, admin) = rest.split_once(" · admin ")?;
    let admin = admin
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    Some((grpc.trim().parse().ok()?, admin.parse().ok()?))
}
