//! `aws-pgbouncer check`: logs in to every configured database once as each of its users, as
//! PgBouncer would, and says in plain words what is wrong when that fails.
//!
//! A failed IAM login reaches PgBouncer's log as one opaque line, long after the deployment
//! that caused it. This command takes the same settings as `run` and goes the same way
//! (credentials, token, TLS with the same mode and CA bundle, login), so a deployment can run
//! it first and an operator can run it beside a broken daemon.

use crate::config::{Database, Settings, TlsMode};
use crate::error_text::one_line;
use crate::token::{self, DsqlAction, TokenKey, TokenKind};
use aws_credential_types::Credentials;
use aws_credential_types::provider::ProvideCredentials;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::collections::HashMap;
use std::error::Error as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// TCP connect; a database that does not answer in this time is unreachable for PgBouncer too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole check of one database: credentials, login and query.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Prints one line per login: every allowed user of every database (in config mode, its one
/// forced user). `Err` (the caller exits non-zero) when any login failed or the settings are
/// unusable.
pub async fn run(settings: &Settings) -> Result<(), String> {
    let tls = tls_connector(settings.server_tls_mode, settings.server_ca_file.as_deref())?;
    let mut credentials = HashMap::new();
    let mut failed = Vec::new();
    let mut logins = 0;
    for database in &settings.databases {
        for target in database.allowed_keys() {
            logins += 1;
            let outcome = tokio::time::timeout(
                CHECK_TIMEOUT,
                check_login(database, &target, settings, &tls, &mut credentials),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "gave up after {} s without an answer",
                    CHECK_TIMEOUT.as_secs()
                ))
            });
            match outcome {
                Ok(timing) => println!(
                    "OK    {} ({target}): logged in in {:.1} ms, SELECT 1 took {:.1} ms",
                    database.name,
                    timing.login.as_secs_f64() * 1000.0,
                    timing.query.as_secs_f64() * 1000.0
                ),
                Err(diagnosis) => {
                    println!("FAIL  {} ({target}): {diagnosis}", database.name);
                    failed.push(format!("{} as {}", database.name, target.user));
                }
            }
        }
    }
    match failed.len() {
        0 => Ok(()),
        count => Err(format!(
            "{count} of {logins} logins failed the check: {}",
            failed.join(", ")
        )),
    }
}

struct Timing {
    login: Duration,
    query: Duration,
}

async fn check_login(
    database: &Database,
    target: &TokenKey,
    settings: &Settings,
    tls: &MakeRustlsConnect,
    credentials: &mut HashMap<String, Result<Credentials, String>>,
) -> Result<Timing, String> {
    let credentials = match credentials.get(&target.region) {
        Some(held) => held.clone(),
        None => {
            let fetched = fetch_credentials(&target.region).await;
            credentials.insert(target.region.clone(), fetched.clone());
            fetched
        }
    }?;
    let token = token::mint(
        &credentials,
        target,
        SystemTime::now(),
        settings.token_lifetime,
    )
    .map_err(|error| format!("could not mint a token: {error}"))?;

    // Where PgBouncer connects, which is not the token's host behind a tunnel or an NLB.
    let (host, port) = database.dial_address();
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(&target.user)
        .password(token.expose())
        .dbname(&database.dbname)
        .application_name("aws-pgbouncer check")
        .ssl_mode(ssl_mode(settings.server_tls_mode))
        .connect_timeout(CONNECT_TIMEOUT);
    let started = Instant::now();
    let (client, connection) = config
        .connect(tls.clone())
        .await
        .map_err(|error| diagnose(&error, target, settings))?;
    let login = started.elapsed();
    let driver = tokio::spawn(connection);
    let started = Instant::now();
    let answer = client.simple_query("SELECT 1").await;
    let query = started.elapsed();
    drop(client);
    // The connection ends once the client is gone; its own error, if any, adds nothing.
    let _ = driver.await;
    answer.map_err(|error| format!("logged in, but SELECT 1 failed: {}", one_line(&error)))?;
    Ok(Timing { login, query })
}

async fn fetch_credentials(region: &str) -> Result<Credentials, String> {
    token::default_chain(region)
        .await
        .provide_credentials()
        .await
        .map_err(|error| {
            format!(
                "no AWS credentials: none of the environment, the AWS profile, web identity \
                 (IRSA), the container endpoint or the instance role provided any ({})",
                one_line(&error)
            )
        })
}

/// PgBouncer's `allow` and `prefer` both end up encrypted against RDS, which always offers TLS.
fn ssl_mode(mode: TlsMode) -> SslMode {
    match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Allow | TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    }
}

/// Verifies the server's certificate exactly as far as PgBouncer does in `mode`: the whole
/// chain and the host name for verify-full, the chain only for verify-ca, nothing otherwise.
fn tls_connector(mode: TlsMode, ca_file: Option<&Path>) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = match (mode.verifies_certificate(), ca_file) {
        (true, Some(path)) => {
            let roots = crate::ca_bundle::load(path)?;
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|error| format!("server CA file {}: {error}", path.display()))?,
            )
        }
        // Settings::resolve refuses a verifying mode without a CA file.
        _ => None,
    };
    let verifier = ModeVerifier {
        chain,
        check_name: mode == TlsMode::VerifyFull,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS set-up: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// See [`tls_connector`]. The handshake signature is always checked, so even an unverified
/// certificate proves that the peer holds its key.
#[derive(Debug)]
struct ModeVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ModeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Turns a failed login into what to do about it. The server's own words are kept at the end:
/// they never hold the token (PostgreSQL does not echo passwords).
fn diagnose(error: &tokio_postgres::Error, target: &TokenKey, settings: &Settings) -> String {
    let user = &target.user;
    let endpoint = format!("{}:{}", target.host, target.port);
    if let Some(db) = error.as_db_error() {
        let message = db.message();
        if message.contains("PAM authentication failed") {
            let permission = match target.kind {
                TokenKind::Rds => format!("rds-db:connect on this database's dbuser:.../{user}"),
                TokenKind::Dsql => format!(
                    "dsql:{:?} on this cluster (the action for role {user})",
                    DsqlAction::for_user(user)
                ),
            };
            return format!(
                "the token was refused ({message}). Possible causes: the token is signed for \
                 region {region}, which is not the database's region (set --region); the clock \
                 here is off by minutes (tokens count from their signing time); the IAM identity \
                 lacks {permission}; the host name {host} is not the one the database answers \
                 to (use the endpoint name, not an IP or alias)",
                region = target.region,
                host = target.host,
            );
        }
        if message.contains("password authentication failed") {
            return format!(
                "the server asked for a password instead of a token ({message}): {user} is not \
                 an IAM user; run GRANT rds_iam TO \"{user}\" on the database"
            );
        }
        if message.contains("no pg_hba.conf entry") {
            return format!(
                "the server does not let {user} in from here ({message}): RDS accepts IAM \
                 logins only over TLS, so check the TLS mode"
            );
        }
        return format!("the server refused the login: {message}");
    }
    if let Some(tls) = rustls_error(error) {
        let ca_file = settings
            .server_ca_file
            .as_deref()
            .map_or_else(|| "(none)".to_owned(), |path| path.display().to_string());
        return match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "TLS: certificate verify failed: the server's certificate is not signed by a CA \
                 in the server CA file {ca_file} (wrong CA bundle? RDS needs its global bundle, \
                 global-bundle.pem)"
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "TLS: host name mismatch: the server's certificate does not name {} (connect \
                 to the endpoint name the certificate carries, not an IP or alias)",
                target.host
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => format!(
                "TLS: certificate verify failed: the server's certificate is outside its \
                 validity period, or the clock here is wrong ({tls})"
            ),
            other => format!("TLS: the handshake with {endpoint} failed: {other}"),
        };
    }
    if let Some(io) = io_error(error) {
        use std::io::ErrorKind;
        let text = io.to_string();
        return match io.kind() {
            ErrorKind::ConnectionRefused => format!(
                "network: connection to {endpoint} refused: nothing listens there (wrong host \
                 or port, or the database is down)"
            ),
            ErrorKind::TimedOut => format!(
                "network: connection to {endpoint} timed out: a security group, network ACL or \
                 route drops the packets, or the database is not reachable from this network"
            ),
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                format!("network: no route to {endpoint} ({text})")
            }
            _ if text.contains("lookup address") => format!(
                "network: DNS cannot resolve {} ({text}): check the host name and this \
                 machine's resolver",
                target.host
            ),
            _ => format!("network: talking to {endpoint} failed: {text}"),
        };
    }
    format!("could not log in to {endpoint}: {}", one_line(error))
}

type Cause = dyn std::error::Error + 'static;

fn causes(error: &tokio_postgres::Error) -> impl Iterator<Item = &Cause> {
    std::iter::successors(error.source(), |&cause| next_cause(cause))
}

/// `io::Error::source` skips the error it wraps, so each `io::Error` is opened by hand.
fn next_cause(cause: &Cause) -> Option<&Cause> {
    match cause.downcast_ref::<std::io::Error>() {
        Some(io) => io.get_ref().map(|inner| inner as &Cause),
        None => cause.source(),
    }
}

fn rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
    causes(error).find_map(|cause| cause.downcast_ref::<rustls::Error>())
}

fn io_error(error: &tokio_postgres::Error) -> Option<&std::io::Error> {
    causes(error).find_map(|cause| cause.downcast_ref::<std::io::Error>())
}
