//! A private CA and server certificate for the TCP endpoint.
//!
//! PgBouncer's `server_tls_sslmode` is global: with verify-full towards RDS it also verifies
//! the endpoint, against the same `server_tls_ca_file`. The daemon appends the CA written here
//! to that bundle. The CA's private key is dropped as soon as the server certificate is
//! signed and never touches the disk, so that CA can vouch for nothing else; the server key
//! lives only in the returned `ServerConfig`. A new CA is made on each call (each daemon
//! start), which is why a long validity is harmless.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the CA certificate inside the directory given to [`self_signed_tls`].
pub const CA_FILE_NAME: &str = "endpoint-ca.pem";

/// Generates a private CA and a server certificate for `localhost`, `127.0.0.1` and `::1`,
/// writes the CA certificate (PEM, mode 0644) to `dir/endpoint-ca.pem` and returns the TLS
/// configuration with that path.
pub fn self_signed_tls(dir: &Path) -> Result<(Arc<ServerConfig>, PathBuf), String> {
    let ca_key = KeyPair::generate().map_err(|e| format!("generating the CA key: {e}"))?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| format!("CA parameters: {e}"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "aws-pgbouncer auth endpoint CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| format!("self-signing the CA: {e}"))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(|e| format!("generating the server key: {e}"))?;
    let mut server_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(|e| format!("server certificate parameters: {e}"))?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.use_authority_key_identifier_extension = true;
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .map_err(|e| format!("signing the server certificate: {e}"))?;

    // Through a temporary file and a rename, so that a reader (PgBouncer's RELOAD, the
    // daemon's bundle assembly) never sees half a certificate.
    crate::pgbouncer::files::write_public_atomically(dir, CA_FILE_NAME, ca_cert.pem().as_bytes())
        .map_err(|e| e.to_string())?;
    let ca_path = dir.join(CA_FILE_NAME);

    // An explicit provider: the dependency tree may enable more than one rustls backend, and
    // then the process-wide default is ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(server_cert.der().to_vec())], key)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    Ok((Arc::new(config), ca_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_public_ca_pem() {
        let dir = tempfile::tempdir().unwrap();
        let (_config, ca_path) = self_signed_tls(dir.path()).unwrap();
        let pem = fs::read_to_string(&ca_path).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            fs::metadata(&ca_path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            [CA_FILE_NAME],
            "nothing but the CA certificate is written"
        );
    }
}
