//! Auth-query mode: PgBouncer asks the daemon's endpoint for each user's password, the
//! endpoint answers with that user's current token, and PgBouncer logs in to RDS with it.
//!
//! PgBouncer runs its auth_query only when a client logs in, and keeps the answer for the
//! pool: an application that stays connected never asks again, and PgBouncer's next server
//! login for it (idle timeout, a killed connection, failover, pool growth) would use a dead
//! token. So whenever a token is refreshed, the daemon logs in to PgBouncer once as each
//! user that has a pool (`SHOW POOLS`), sending no query: PgBouncer re-runs the auth_query
//! for that login and updates the pool's password in place.

use super::auth_endpoint::{Answer, AuthEndpoint, EndpointPlan, is_tcp};
use super::running_mode::Start;
use crate::config::{Database, LocalListen};
use crate::endpoint::self_signed_tls;
use crate::pgbouncer::admin::{AdminConsole, reachable_ip};
use crate::pgbouncer::files::write_atomically;
use crate::pgbouncer::render::{self, ServerRoute, ServerTls};
use crate::token::TokenSource;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const COMBINED_CA_FILE: &str = "server-ca-bundle.pem";
const TOUCH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AuthQueryMode {
    endpoint: AuthEndpoint,
    refresher: Arc<PoolRefresher>,
}

impl AuthQueryMode {
    /// Starts the endpoint on `auth_listen` and writes PgBouncer's files. `stopped` resolves
    /// when the endpoint must stop.
    pub async fn start(
        start: &Start<'_>,
        auth_listen: &LocalListen,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, String> {
        let Start {
            settings,
            dir,
            admin_secret,
            ..
        } = *start;
        // A CA of the daemon's own, so that PgBouncer can verify (verify-full) that it talks
        // to the daemon on TCP, not to whatever bound the port while the daemon was down.
        let own_tls = match is_tcp(auth_listen) {
            true => Some(self_signed_tls(dir)?.0),
            false => None,
        };
        let (limits, _) = crate::fd_limit::fitted_limits(false);
        let plan = EndpointPlan {
            listen: auth_listen,
            tls: own_tls.clone(),
            answer: Answer::Tokens,
            limits,
        };
        let endpoint = AuthEndpoint::start(start, plan, stopped).await?;
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
            ServerRoute::Direct,
            ServerTls {
                mode: settings.server_tls_mode.as_pgbouncer(),
                ca_file: ca_file.as_deref(),
            },
        )?;
        let refresher = Arc::new(PoolRefresher {
            console: tokio::sync::Mutex::new(AdminConsole::new(
                settings.listen,
                render::pgbouncer_socket_dir(settings, dir).as_deref(),
                admin_secret,
            )),
            pgbouncer: reachable_ip(settings.listen),
            pgbouncer_port: settings.listen.port(),
            databases: settings.databases.clone(),
        });
        Ok(Self {
            endpoint,
            refresher,
        })
    }

    /// Pushes the new tokens into PgBouncer's pools in the background; the files do not
    /// change, so PgBouncer need not reload.
    pub fn on_new_tokens(&self) -> bool {
        let refresher = self.refresher.clone();
        tokio::spawn(async move { refresher.refresh_pools().await });
        false
    }

    /// Mints every allowed user's token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        self.endpoint.refresh_now(source).await;
    }

    pub fn credentials_expiry(&self) -> Option<SystemTime> {
        self.endpoint.credentials_expiry()
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

/// Makes PgBouncer re-run its auth_query for every pool of an allowed user.
struct PoolRefresher {
    console: tokio::sync::Mutex<AdminConsole>,
    pgbouncer: IpAddr,
    pgbouncer_port: u16,
    databases: Vec<Database>,
}

impl PoolRefresher {
    async fn refresh_pools(&self) {
        // One pass at a time: a pass started later reads newer tokens anyway.
        let mut console = self.console.lock().await;
        let pools = match console.pools().await {
            Ok(pools) => pools,
            Err(error) => {
                tracing::warn!(%error, "cannot list PgBouncer's pools to refresh their tokens");
                return;
            }
        };
        for (database, user) in pools {
            let allowed = self
                .databases
                .iter()
                .any(|db| db.name == database && db.allowed_users.contains(&user));
            if allowed {
                self.touch(&database, &user).await;
            }
        }
    }

    /// A login that sends no query: enough for PgBouncer to run auth_query and update the
    /// pool's password.
    async fn touch(&self, database: &str, user: &str) {
        let connected = tokio_postgres::Config::new()
            .host(self.pgbouncer.to_string())
            .port(self.pgbouncer_port)
            .user(user)
            .dbname(database)
            .application_name("aws-pgbouncer-refresh")
            .connect_timeout(TOUCH_TIMEOUT)
            .connect(tokio_postgres::NoTls)
            .await;
        match connected {
            Ok(_) => tracing::debug!(database, user, "refreshed the pool's token"),
            Err(error) => {
                tracing::warn!(database, user, %error, "could not refresh the pool's token")
            }
        }
    }
}
