//! The CA bundle (the RDS global bundle) that server certificates are verified against, for
//! everything that speaks TLS to the database itself: `check` and the relay.

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::Path;

/// The PEM certificates at `path` as trust roots. A file with none usable is an error rather
/// than an empty store, which would refuse every server with a misleading message.
pub fn load(path: &Path) -> Result<RootCertStore, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("server CA file {}: {error}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(format!(
            "server CA file {} holds no usable CA certificate",
            path.display()
        ));
    }
    Ok(roots)
}
