//! Auth-query mode: PgBouncer asks the daemon's endpoint for each user's password, the
//! endpoint answers with that user's current token, and PgBouncer logs in to RDS with it.
//! `pool_refresher` keeps PgBouncer's pools on the current tokens.

use super::allowed_keys::AllowedKeys;
use super::auth_endpoint::{AuthEndpoint, EndpointPlan};
use super::local_address::is_tcp;
use super::pool_refresher::PoolRefresher;
use super::running_mode::Start;
use crate::config::LocalListen;
use crate::endpoint::self_signed_tls;
use crate::pgbouncer::admin::{AdminConsole, reachable_ip};
use crate::pgbouncer::files::write_atomically;
use crate::pgbouncer::render::{self, ServerTls};
use crate::token::TokenSource;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const COMBINED_CA_FILE: &str = "server-ca-bundle.pem";

pub struct AuthQueryMode {
    keys: AllowedKeys,
}

impl AuthQueryMode {
    /// Starts the endpoint on `auth_listen`, mints the allowed users' first tokens and writes
    /// PgBouncer's files. `stopped` resolves when the endpoint must stop.
    pub async fn start(
        start: &Start<'_>,
        auth_listen: &LocalListen,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, String> {
        let Start {
            settings,
            dir,
            admin_secret,
            source,
            ..
        } = *start;
        // A CA of the daemon's own, so that PgBouncer can verify (verify-full) that it talks
        // to the daemon on TCP, not to whatever bound the port while the daemon was down.
        let own_tls = match is_tcp(auth_listen) {
            true => Some(self_signed_tls(dir)?.0),
            false => None,
        };
        let plan = EndpointPlan {
            listen: auth_listen,
            tls: own_tls.clone(),
            limits: crate::fd_limit::fitted_endpoint_limits(),
        };
        let endpoint = AuthEndpoint::start(start, plan, stopped).await?;
        let keys = AllowedKeys::mint_first(settings, source).await;
        let ca_file = match (&own_tls, &settings.server_ca_file) {
            // PgBouncer's server_tls_sslmode is global: with verification on, the same CA
            // file must trust RDS and the endpoint.
            (Some(_), Some(rds_bundle)) if settings.server_tls_mode.verifies_certificate() => {
                Some(combine_ca_files(dir, rds_bundle)?)
            }
            _ => settings.server_ca_file.clone(),
        };
        endpoint.write_pgbouncer_files(
            start,
            ServerTls {
                mode: settings.server_tls_mode.as_pgbouncer(),
                ca_file: ca_file.as_deref(),
            },
        )?;
        PoolRefresher {
            console: AdminConsole::new(
                settings.listen,
                render::pgbouncer_socket_dir(settings, dir).as_deref(),
                admin_secret,
            ),
            pgbouncer: reachable_ip(settings.listen),
            pgbouncer_port: settings.listen.port(),
            databases: settings.databases.clone(),
        }
        .spawn(source.subscribe());
        Ok(Self { keys })
    }

    /// Mints every allowed user's token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        self.keys.refresh_now(source).await;
    }
}

/// The RDS bundle followed by the endpoint's CA, for PgBouncer's `server_tls_ca_file`.
fn combine_ca_files(dir: &Path, rds_bundle: &Path) -> Result<PathBuf, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))
    };
    let mut combined = read(rds_bundle)?;
    if !combined.ends_with('\n') {
        combined.push('\n');
    }
    combined.push_str(&read(&dir.join(crate::endpoint::CA_FILE_NAME))?);
    write_atomically(dir, COMBINED_CA_FILE, combined.as_bytes())
        .map_err(|error| error.to_string())?;
    Ok(dir.join(COMBINED_CA_FILE))
}
