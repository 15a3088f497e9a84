//! Auth-query and passthrough modes: PgBouncer asks the daemon's endpoint for each user's
//! password. In auth-query mode the endpoint answers with that user's current token and
//! PgBouncer logs in to RDS with it. In passthrough mode it answers with the relay's secret,
//! PgBouncer's server connections go to the daemon's relay, and the relay logs each in to RDS
//! with a token minted for it; nothing in PgBouncer can go stale then.
//!
//! The rest of this comment concerns auth-query mode.
//!
//! PgBouncer runs its auth_query only when a client logs in, and keeps the answer for the
//! pool: an application that stays connected never asks again, and PgBouncer's next server
//! login for it (idle timeout, a killed connection, failover, pool growth) would use a dead
//! token. So whenever a token is refreshed, the daemon logs in to PgBouncer once as each
//! user that has a pool (`SHOW POOLS`), sending no query: PgBouncer re-runs the auth_query
//! for that login and updates the pool's password in place.

use crate::backoff;
use crate::cli::Mode;
use crate::config::{Database, LocalListen, Settings};
use crate::endpoint::{
    BoundListener, DEFAULT_SOCKET_MODE, EndpointConfig, Listen, Lookup, TokenLookup,
    self_signed_tls,
};
use crate::metrics::{AuthQueryResult, Metrics};
use crate::pgbouncer::admin::{AdminConsole, reachable_ip};
use crate::pgbouncer::files::{load_or_create_secret, write_atomically};
use crate::pgbouncer::render::{self, PGBOUNCER_INI};
use crate::relay::{Limits as RelayLimits, RelayConfig, Upstream, upstream_tls};
use crate::token::{TokenKey, TokenSource};
use secrecy::SecretString;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const AUTH_SECRET_FILE: &str = "auth-secret";
const RELAY_SECRET_FILE: &str = "relay-secret";
const COMBINED_CA_FILE: &str = "server-ca-bundle.pem";
const TOUCH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AuthQueryMode {
    dir: PathBuf,
    keys: Vec<TokenKey>,
    /// Auth-query mode only: passthrough's answers (the relay secret) never go stale.
    refresher: Option<Arc<PoolRefresher>>,
    lookup: Arc<SourceLookup>,
}

impl AuthQueryMode {
    /// Starts the endpoint (and in passthrough mode the relay), mints the allowed users'
    /// first tokens (so a bad credential source shows at once, and the first logins do not
    /// wait for a mint), and writes PgBouncer's files. `stopped` makes a future that
    /// resolves when the servers must stop.
    pub async fn start<F>(
        settings: &Settings,
        dir: &Path,
        admin_secret: &SecretString,
        source: &Arc<TokenSource>,
        metrics: &Arc<Metrics>,
        stopped: impl Fn() -> F,
    ) -> Result<Self, String>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let auth_secret =
            load_or_create_secret(dir, AUTH_SECRET_FILE).map_err(|error| error.to_string())?;
        let passthrough = settings.mode == Mode::Passthrough;
        let endpoint = LocalAddress::of(&settings.auth_listen, dir);
        let endpoint_on_tcp = matches!(endpoint.listen, Listen::Tcp(_));
        // A CA of the daemon's own, so that PgBouncer can verify (verify-full) that it talks
        // to the daemon on TCP, not to whatever bound the port while the daemon was down. In
        // passthrough mode every server connection of PgBouncer's goes to the daemon.
        let (own_tls, own_ca) = match passthrough || endpoint_on_tcp {
            true => {
                let (config, ca_file) = self_signed_tls(dir)?;
                (Some(config), Some(ca_file))
            }
            false => (None, None),
        };
        let tls = own_tls.clone().filter(|_| endpoint_on_tcp);
        let listener = endpoint.bind("auth endpoint").await?;
        let (endpoint_limits, relay_limits) =
            crate::fd_limit::fitted_limits(settings.mode == Mode::Passthrough);
        let (answer, route, server_tls_mode, server_ca_file) = match settings.mode {
            Mode::Passthrough => {
                let relay = LocalAddress::of(&settings.relay_listen, dir);
                let secret = load_or_create_secret(dir, RELAY_SECRET_FILE)
                    .map_err(|error| error.to_string())?;
                let config = RelayConfig {
                    server_tls: own_tls,
                    limits: relay_limits,
                    metrics: Some(metrics.clone()),
                    ..relay_config(settings, secret.clone())?
                };
                start_relay(&relay, config, source, stopped()).await?;
                // PgBouncer talks only to the daemon, on loopback or a unix socket (where it
                // never starts TLS); the relay does the TLS towards RDS.
                let route = Some((relay.host, relay.port));
                (Answer::RelaySecret(secret), route, "verify-full", own_ca)
            }
            _ => {
                let ca_file = match (&tls, &settings.server_ca_file) {
                    // PgBouncer's server_tls_sslmode is global: with verification on, the
                    // same CA file must trust RDS and the endpoint.
                    (Some(_), Some(rds_bundle))
                        if settings.server_tls_mode.verifies_certificate() =>
                    {
                        Some(combine_ca_files(dir, rds_bundle)?)
                    }
                    _ => settings.server_ca_file.clone(),
                };
                (
                    Answer::Tokens,
                    None,
                    settings.server_tls_mode.as_pgbouncer(),
                    ca_file,
                )
            }
        };
        let lookup = Arc::new(SourceLookup::new(
            &settings.databases,
            answer,
            source.clone(),
            metrics.clone(),
        ));
        let config = Arc::new(EndpointConfig {
            auth_user: render::AUTH_USER.to_owned(),
            auth_secret: auth_secret.clone(),
            limits: endpoint_limits,
            tls,
            metrics: Some(metrics.clone()),
        });
        tokio::spawn(crate::endpoint::serve(
            listener,
            config,
            lookup.clone(),
            stopped(),
        ));
        tracing::info!(listen = ?endpoint.listen, "auth endpoint listening");

        let keys: Vec<TokenKey> = settings
            .databases
            .iter()
            .flat_map(|db| db.allowed_users.iter().map(|user| db.key_for(user)))
            .collect();
        backoff::retry_until(async || {
            let mut all = true;
            for key in &keys {
                all &= source.token(key).await.is_ok();
            }
            all
        })
        .await;

        let route = match &route {
            Some((host, port)) => render::ServerRoute::Relay { host, port: *port },
            None => render::ServerRoute::Direct,
        };
        super::write_pgbouncer_files(
            settings,
            dir,
            &render::auth_query_databases_ini(
                &settings.databases,
                route,
                &endpoint.host,
                endpoint.port,
            ),
            &render::userlist(admin_secret, Some(&auth_secret), &settings.clients),
            render::ServerTls {
                mode: server_tls_mode,
                ca_file: server_ca_file.as_deref(),
            },
        )?;

        let refresher = (settings.mode == Mode::AuthQuery).then(|| {
            Arc::new(PoolRefresher {
                console: tokio::sync::Mutex::new(AdminConsole::new(
                    settings.listen,
                    render::pgbouncer_socket_dir(settings, dir).as_deref(),
                    admin_secret,
                )),
                pgbouncer: reachable_ip(settings.listen),
                pgbouncer_port: settings.listen.port(),
                databases: settings.databases.clone(),
            })
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
        if let Some(refresher) = self.refresher.clone() {
            tokio::spawn(async move { refresher.refresh_pools().await });
        }
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

/// Where the daemon's local Postgres server for one purpose listens, and how PgBouncer
/// reaches it.
struct LocalAddress {
    listen: Listen,
    /// PgBouncer's `host=`: the address, or the socket's directory.
    host: String,
    port: u16,
}

impl LocalAddress {
    fn of(listen: &LocalListen, dir: &Path) -> Self {
        match *listen {
            LocalListen::Tcp(addr) => Self {
                listen: Listen::Tcp(addr),
                host: reachable_ip(addr).to_string(),
                port: addr.port(),
            },
            LocalListen::Unix { port } => Self {
                listen: Listen::Unix {
                    path: dir.join(format!(".s.PGSQL.{port}")),
                    mode: DEFAULT_SOCKET_MODE,
                },
                host: dir.display().to_string(),
                port,
            },
        }
    }

    async fn bind(&self, what: &str) -> Result<BoundListener, String> {
        BoundListener::bind(&self.listen)
            .await
            .map_err(|error| format!("{what} cannot listen on {:?}: {error}", self.listen))
    }
}

/// The relay of passthrough mode: one target per database entry, keyed by its name.
fn relay_config(settings: &Settings, secret: SecretString) -> Result<RelayConfig, String> {
    let ca_file = settings.server_ca_file.as_deref().ok_or(
        "passthrough mode verifies RDS itself and needs --server-ca-file (the RDS CA bundle)",
    )?;
    let targets = settings
        .databases
        .iter()
        .map(|db| {
            let upstream = Upstream {
                host: db.target.host.clone(),
                port: db.target.port,
                region: db.target.region.clone(),
                database: db.dbname.clone(),
                users: db.allowed_users.clone(),
            };
            (db.name.clone(), upstream)
        })
        .collect();
    Ok(RelayConfig {
        secret,
        peer_uid: None,
        upstream_tls: upstream_tls(ca_file)?,
        server_tls: None,
        targets,
        limits: RelayLimits::default(),
        metrics: None,
    })
}

async fn start_relay(
    address: &LocalAddress,
    config: RelayConfig,
    source: &Arc<TokenSource>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let config = Arc::new(config);
    let listener = address.bind("relay").await?;
    tokio::spawn(crate::relay::serve(
        listener,
        config,
        source.clone(),
        stopped,
    ));
    tracing::info!(listen = ?address.listen, "relay listening");
    Ok(())
}

/// What the endpoint answers an allowed user's auth_query with.
enum Answer {
    /// The user's current token: PgBouncer logs in to RDS with it (auth-query mode).
    Tokens,
    /// The relay's secret: PgBouncer logs in to the relay with it (passthrough mode).
    RelaySecret(SecretString),
}

/// Answers the endpoint's lookups, within each entry's allow-list.
struct SourceLookup {
    /// By the name PgBouncer connects to the endpoint with: the application entry's name.
    databases: HashMap<String, Database>,
    answer: Answer,
    source: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    credentials_expiry: Mutex<Option<SystemTime>>,
}

impl SourceLookup {
    fn new(
        databases: &[Database],
        answer: Answer,
        source: Arc<TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            databases: databases
                .iter()
                .map(|db| (db.name.clone(), db.clone()))
                .collect(),
            answer,
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
        if let Answer::RelaySecret(secret) = &self.answer {
            self.metrics
                .auth_query_answered(AuthQueryResult::RelaySecret, started.elapsed());
            return Lookup::Token(secret.clone());
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
