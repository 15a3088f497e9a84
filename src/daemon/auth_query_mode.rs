//! Auth-query mode: PgBouncer asks the daemon's endpoint for each user's password, and the
//! endpoint answers with that user's current token.
//!
//! PgBouncer runs its auth_query only when a client logs in, and keeps the answer for the
//! pool: an application that stays connected never asks again, and PgBouncer's next server
//! login for it (idle timeout, a killed connection, failover, pool growth) would use a dead
//! token. So whenever a token is refreshed, the daemon logs in to PgBouncer once as each
//! user that has a pool (`SHOW POOLS`), sending no query: PgBouncer re-runs the auth_query
//! for that login and updates the pool's password in place.

use crate::backoff;
use crate::config::{AuthListen, Database, Settings};
use crate::endpoint::{
    BoundListener, DEFAULT_SOCKET_MODE, EndpointConfig, Limits, Listen, Lookup, TokenLookup,
    self_signed_tls,
};
use crate::metrics::{AuthQueryResult, Metrics};
use crate::pgbouncer::admin::AdminConsole;
use crate::pgbouncer::files::{load_or_create_secret, write_atomically};
use crate::pgbouncer::render::{self, DATABASES_INI, HBA, PGBOUNCER_INI, USERLIST};
use crate::token::{TokenKey, TokenSource};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const AUTH_SECRET_FILE: &str = "auth-secret";
const COMBINED_CA_FILE: &str = "server-ca-bundle.pem";
const TOUCH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AuthQueryMode {
    dir: PathBuf,
    keys: Vec<TokenKey>,
    refresher: Arc<PoolRefresher>,
    lookup: Arc<SourceLookup>,
}

impl AuthQueryMode {
    /// Starts the endpoint, mints the allowed users' first tokens (so a bad credential
    /// source shows at once, and the first logins do not wait for a mint), and writes
    /// PgBouncer's files.
    pub async fn start(
        settings: &Settings,
        dir: &Path,
        admin_secret: &SecretString,
        source: &Arc<TokenSource>,
        metrics: &Arc<Metrics>,
        endpoint_stopped: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Self, String> {
        let auth_secret =
            load_or_create_secret(dir, AUTH_SECRET_FILE).map_err(|error| error.to_string())?;
        let (listen, tls, endpoint_host, port) = match settings.auth_listen {
            AuthListen::Tcp(addr) => {
                let (tls, _) = self_signed_tls(dir)?;
                let host = reachable_ip(addr).to_string();
                (Listen::Tcp(addr), Some(tls), host, addr.port())
            }
            AuthListen::Unix { port } => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let listen = Listen::Unix {
                    path,
                    mode: DEFAULT_SOCKET_MODE,
                };
                (listen, None, dir.display().to_string(), port)
            }
        };
        let listener = BoundListener::bind(&listen)
            .await
            .map_err(|error| format!("auth endpoint cannot listen on {listen:?}: {error}"))?;
        let server_ca_file = match (&tls, &settings.server_ca_file) {
            // PgBouncer's server_tls_sslmode is global: with verification on, the same CA
            // file must trust RDS and the endpoint.
            (Some(_), Some(rds_bundle)) if settings.server_tls_mode.verifies_certificate() => {
                Some(combine_ca_files(dir, rds_bundle)?)
            }
            _ => settings.server_ca_file.clone(),
        };
        let lookup = Arc::new(SourceLookup::new(
            &settings.databases,
            source.clone(),
            metrics.clone(),
        ));
        let config = Arc::new(EndpointConfig {
            auth_user: render::AUTH_USER.to_owned(),
            auth_secret: auth_secret.clone(),
            limits: Limits::default(),
            tls,
            metrics: Some(metrics.clone()),
        });
        tokio::spawn(crate::endpoint::serve(
            listener,
            config,
            lookup.clone(),
            endpoint_stopped,
        ));
        tracing::info!(listen = ?listen, "auth endpoint listening");

        let keys: Vec<TokenKey> = settings
            .databases
            .iter()
            .flat_map(|db| db.allowed_users.iter().map(|user| db.key_for(user)))
            .collect();
        let mut failures = 0;
        loop {
            let mut all = true;
            for key in &keys {
                all &= source.token(key).await.is_ok();
            }
            if all {
                break;
            }
            failures += 1;
            tokio::time::sleep(backoff::delay(failures, Duration::from_secs(30))).await;
        }

        let write = |name: &str, text: &str| {
            write_atomically(dir, name, text.as_bytes()).map_err(|error| error.to_string())
        };
        write(
            DATABASES_INI,
            &render::auth_query_databases_ini(&settings.databases, &endpoint_host, port),
        )?;
        let userlist = render::userlist(admin_secret, Some(&auth_secret), &settings.clients);
        write(USERLIST, userlist.expose_secret())?;
        write(
            HBA,
            &render::hba(settings.mode, &settings.databases, &settings.clients),
        )?;
        write(
            PGBOUNCER_INI,
            &render::pgbouncer_ini(settings, dir, server_ca_file.as_deref()),
        )?;
        tracing::info!(dir = %dir.display(), databases = settings.databases.len(), "wrote PgBouncer's files");

        let refresher = Arc::new(PoolRefresher {
            console: tokio::sync::Mutex::new(AdminConsole::new(settings.listen, admin_secret)),
            pgbouncer: reachable_ip(settings.listen),
            pgbouncer_port: settings.listen.port(),
            databases: settings.databases.clone(),
        });
        Ok(Self {
            dir: dir.to_owned(),
            keys,
            refresher,
            lookup,
        })
    }

    pub fn ini_path(&self) -> PathBuf {
        self.dir.join(PGBOUNCER_INI)
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
        for key in &self.keys {
            let _ = source.refresh_now(key).await;
        }
    }

    pub fn credentials_expiry(&self) -> Option<SystemTime> {
        *self.lookup.credentials_expiry.lock().expect("lookup lock")
    }
}

/// A wildcard listen address is reached over loopback.
fn reachable_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
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

/// Answers the endpoint's lookups from the token source, within each entry's allow-list.
struct SourceLookup {
    /// By the name PgBouncer connects to the endpoint with: the application entry's name.
    databases: HashMap<String, Database>,
    source: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    credentials_expiry: Mutex<Option<SystemTime>>,
}

impl SourceLookup {
    fn new(databases: &[Database], source: Arc<TokenSource>, metrics: Arc<Metrics>) -> Self {
        Self {
            databases: databases
                .iter()
                .map(|db| (db.name.clone(), db.clone()))
                .collect(),
            source,
            metrics,
            credentials_expiry: Mutex::new(None),
        }
    }
}

impl TokenLookup for SourceLookup {
    async fn lookup(&self, database: &str, user: &str) -> Lookup {
        let started = Instant::now();
        let Some(entry) = self.databases.get(database) else {
            self.metrics
                .auth_query_answered(AuthQueryResult::Failed, started.elapsed());
            return Lookup::UnknownDatabase;
        };
        if !entry.allowed_users.iter().any(|allowed| allowed == user) {
            self.metrics
                .auth_query_answered(AuthQueryResult::UnknownUser, started.elapsed());
            return Lookup::NoSuchUser;
        }
        match self.source.token(&entry.key_for(user)).await {
            Ok(fresh) => {
                *self.credentials_expiry.lock().expect("lookup lock") = fresh.credentials_expiry;
                self.metrics
                    .auth_query_answered(AuthQueryResult::Token, started.elapsed());
                Lookup::Token(SecretString::from(fresh.token.expose().to_owned()))
            }
            Err(error) => {
                self.metrics
                    .auth_query_answered(AuthQueryResult::Failed, started.elapsed());
                Lookup::Unavailable(error.to_string())
            }
        }
    }
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
