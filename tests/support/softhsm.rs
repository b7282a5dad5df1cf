//! A SoftHSM2 token in a temporary directory, for the tests of the `pkcs11` key provider.
//!
//! SoftHSM2 must be installed (Debian package `softhsm2`); without it the tests panic rather
//! than skip, so a CI image that lacks it fails loudly.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
};

/// The label every test token gets.
pub const TOKEN_LABEL: &str = "cardvault-test";

const INSTALL: &str = "install softhsm2 (apt-get install softhsm2)";

/// Where Debian and Ubuntu put the module.
const MODULE_CANDIDATES: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

/// A token initialized in its own directory.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    /// The `softhsm2.conf` to export as `SOFTHSM2_CONF` to whatever loads the module.
    pub conf: PathBuf,
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// A file (mode 0600) holding the user PIN and a trailing newline.
    pub pin_file: PathBuf,
}

impl SoftHsm {
    /// Configures SoftHSM2 to keep tokens in `dir/tokens` and initializes a token there with
    /// random user and SO PINs.
    pub fn create(dir: &Path) -> SoftHsm {
        let module = module();
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).expect("create the token directory");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let pin = format!("pin-{}", uuid::Uuid::new_v4().simple());
        let so_pin = format!("so-{}", uuid::Uuid::new_v4().simple());
        let output = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN_LABEL])
            .args(["--pin", &pin, "--so-pin", &so_pin])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap_or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => panic!("softhsm2-util not found: {INSTALL}"),
                _ => panic!("cannot run softhsm2-util: {e}"),
            });
        assert!(
            output.status.success(),
            "softhsm2-util --init-token failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let pin_file = dir.join("user.pin");
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .expect("create the PIN file");
        writeln!(file, "{pin}").expect("write the PIN file");
        SoftHsm {
            conf,
            module,
            token_label: TOKEN_LABEL.to_owned(),
            pin_file,
        }
    }

    /// The token [`SoftHsm::create`] made in `dir` (seen from a child process).
    pub fn existing(dir: &Path) -> SoftHsm {
        SoftHsm {
            conf: dir.join("softhsm2.conf"),
            module: module(),
            token_label: TOKEN_LABEL.to_owned(),
            pin_file: dir.join("user.pin"),
        }
    }

    /// The user PIN, for tests that check it never shows up anywhere.
    pub fn pin(&self) -> String {
        let text = std::fs::read_to_string(&self.pin_file).expect("read the PIN file");
        text.trim_end_matches('\n').to_owned()
    }
}

/// The SoftHSM2 PKCS#11 module; panics, naming the package to install, if there is none.
pub fn module() -> PathBuf {
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no libsofthsm2.so in {MODULE_CANDIDATES:?}: {INSTALL}"))
}
