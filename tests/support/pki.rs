//! A throwaway PKI for TLS tests: a CA, a server certificate for `localhost`/`127.0.0.1`,
//! client certificates on demand, and an unrelated second CA with a client of its own.
//!
//! Everything is written as PEM files into one directory (a `tempfile::TempDir` in practice),
//! because the server under test reads its certificates from files, as it does in production.
//! Keys are ECDSA P-256, generated with `ring` through `rcgen`.
//!
//! ```ignore
//! use cardvault_test_support::pki;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let pki = pki::Pki::new(dir.path());
//! // Server side: pki.server_cert, pki.server_key, client CA pki.ca_file.
//! let (cert, key) = pki.client_cert("checkout", Some("spiffe://shop.test/checkout"), "checkout");
//! // Client side: trust pki.ca_pem, present cert/key.
//! pki.reissue_server_cert(); // new serial and key, same paths: exercises reload
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The files of a test PKI and the CA keys that sign more certificates into them.
pub struct Pki {
    /// The directory holding every file below.
    pub dir: PathBuf,
    /// The CA certificate, PEM: what clients trust and the server's client-CA bundle.
    pub ca_pem: String,
    /// `ca.pem`: [`Pki::ca_pem`] on disk.
    pub ca_file: PathBuf,
    /// `server.pem`: the server certificate (for `localhost` and `127.0.0.1`) signed by the CA.
    pub server_cert: PathBuf,
    /// `server.key`: the server's PKCS#8 private key.
    pub server_key: PathBuf,
    /// A second, unrelated CA certificate, PEM.
    pub other_ca_pem: String,
    /// `other_ca.pem`: [`Pki::other_ca_pem`] on disk.
    pub other_ca_file: PathBuf,
    /// `other_client.pem`: a client certificate (CN `intruder`) signed by the other CA.
    pub other_client_cert: PathBuf,
    /// `other_client.key`: its private key.
    pub other_client_key: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// Creates the CA, the server certificate, the other CA and its client in `dir`.
    pub fn new(dir: &Path) -> Pki {
        let ca = new_ca("cardvault test CA");
        let other_ca = new_ca("unrelated test CA");
        let ca_pem = ca.pem();
        let other_ca_pem = other_ca.pem();

        let ca_file = dir.join("ca.pem");
        write_atomically(&ca_file, &ca_pem);
        let other_ca_file = dir.join("other_ca.pem");
        write_atomically(&other_ca_file, &other_ca_pem);
        let (other_client_cert, other_client_key) =
            issue_client(&other_ca, dir, "other_client", None, "intruder");

        let pki = Pki {
            dir: dir.to_owned(),
            ca_pem,
            ca_file,
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            other_ca_pem,
            other_ca_file,
            other_client_cert,
            other_client_key,
            ca,
        };
        pki.reissue_server_cert();
        pki
    }

    /// Mints a client certificate signed by the CA into `<name>.pem` / `<name>.key`, with
    /// subject CN `common_name` (none when empty) and, when given, `spiffe_id` as its URI SAN
    /// (any URI, so tests can also try a non-SPIFFE one). Returns the certificate and key paths.
    pub fn client_cert(
        &self,
        name: &str,
        spiffe_id: Option<&str>,
        common_name: &str,
    ) -> (PathBuf, PathBuf) {
        issue_client(&self.ca, &self.dir, name, spiffe_id, common_name)
    }

    /// Issues a fresh server certificate (new key, hence new serial) into the same paths and
    /// returns its DER. Each file is replaced by a rename, as kubelet does with secrets, so a
    /// reader never sees half a file (it may briefly see a new certificate with the old key).
    pub fn reissue_server_cert(&self) -> Vec<u8> {
        let key = KeyPair::generate().expect("generate server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.ca)
            .expect("sign server certificate");
        write_atomically(&self.server_cert, &cert.pem());
        write_atomically(&self.server_key, &key.serialize_pem());
        cert.der().to_vec()
    }

    /// The DER of the server certificate currently on disk.
    pub fn server_cert_der(&self) -> Vec<u8> {
        pem_to_der(&fs::read_to_string(&self.server_cert).expect("read server.pem"))
    }

    /// The DER of the first certificate in a PEM file, e.g. one from [`Pki::client_cert`].
    pub fn cert_der(path: &Path) -> Vec<u8> {
        pem_to_der(&fs::read_to_string(path).expect("read certificate"))
    }
}

/// A self-signed CA that may sign leaf certificates.
fn new_ca(common_name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("generate CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign CA")
}

/// A client certificate signed by `ca`, written to `dir/<name>.pem` and `dir/<name>.key`.
fn issue_client(
    ca: &CertifiedIssuer<'static, KeyPair>,
    dir: &Path,
    name: &str,
    spiffe_id: Option<&str>,
    common_name: &str,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("generate client key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if !common_name.is_empty() {
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
    }
    if let Some(id) = spiffe_id {
        let uri = id.to_owned().try_into().expect("SPIFFE ID is ASCII");
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, ca).expect("sign client certificate");

    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    write_atomically(&cert_path, &cert.pem());
    write_atomically(&key_path, &key.serialize_pem());
    (cert_path, key_path)
}

/// Writes through a temporary file and a rename, so readers see the old or the new file.
/// Mode 0600, as the vault demands of key files (certificates do not need it, but one mode for
/// every file keeps this simple).
fn write_atomically(path: &Path, contents: &str) {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// The DER of the first `CERTIFICATE` block of `pem`.
fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}
