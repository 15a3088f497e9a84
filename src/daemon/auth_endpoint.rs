//! The auth endpoint that auth-query and passthrough modes both run: a small local Postgres
//! server that PgBouncer's auth_query asks for a user's password, answered within each
//! database entry's allow-list.

use super::running_mode::Start;
use crate::backoff;
use crate::code_pages::CodePages;
use crate::config::{Database, LocalListen};
use crate::endpoint::{
    BoundListener, DEFAULT_SOCKET_MODE, EndpointConfig, Limits, Listen, Lookup, TokenLookup,
};
use crate::metrics::{AuthQueryResult, Metrics};
use crate::pgbouncer::admin::reachable_ip;
use crate::pgbouncer::databases_ini::{ServerRoute, auth_query_databases_ini};
use crate::pgbouncer::files::load_or_create_secret;
use crate::pgbouncer::login_rules::userlist;
use crate::pgbouncer::render::{self, ServerTls};
use crate::token::{TokenKey, TokenSource};
use secrecy::SecretString;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const AUTH_SECRET_FILE: &str = "auth-secret";

/// What the endpoint answers an allowed user's auth_query with.
pub(super) enum Answer {
    /// The user's current token: PgBouncer logs in to RDS with it (auth-query mode).
    Tokens,
    /// The relay's secret: PgBouncer logs in to the relay with it (passthrough mode).
    RelaySecret(SecretString),
}

/// How the endpoint is set up; the rest comes from the settings.
pub(super) struct EndpointPlan<'a> {
    pub listen: &'a LocalListen,
    /// Offered to PgBouncer when the endpoint is on TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub answer: Answer,
    pub limits: Limits,
}

/// A running endpoint, and the allowed users whose tokens it hands out.
pub(super) struct AuthEndpoint {
    secret: SecretString,
    address: LocalAddress,
    keys: Vec<TokenKey>,
}

impl AuthEndpoint {
    /// Binds and serves the endpoint until `stopped` resolves, then mints the allowed users'
    /// first tokens (so a bad credential source shows at once, and the first logins do not
    /// wait for a mint).
    pub async fn start(
        start: &Start<'_>,
        plan: EndpointPlan<'_>,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, String> {
        let secret = load_or_create_secret(start.dir, AUTH_SECRET_FILE)
            .map_err(|error| error.to_string())?;
        let address = LocalAddress::of(plan.listen, start.dir);
        let listener = address.bind("auth endpoint").await?;
        let tls = plan.tls.filter(|_| is_tcp(plan.listen));
        let lookup = Arc::new(SourceLookup::new(
            &start.settings.databases,
            plan.answer,
            start.source.clone(),
            start.metrics.clone(),
            start.code_pages.clone(),
        ));
        let config = Arc::new(EndpointConfig {
            auth_user: render::AUTH_USER.to_owned(),
            auth_secret: secret.clone(),
            limits: plan.limits,
            tls,
            metrics: Some(start.metrics.clone()),
        });
        tokio::spawn(crate::endpoint::serve(listener, config, lookup, stopped));
        tracing::info!(listen = ?address.listen, "auth endpoint listening");

        let keys: Vec<TokenKey> = start
            .settings
            .databases
            .iter()
            .flat_map(Database::allowed_keys)
            .collect();
        // A token too long only for the limit assumed until PgBouncer's is measured does not
        // hold the start up: the measurement needs PgBouncer running on the files first.
        backoff::retry_until(async || {
            let mut all = true;
            for key in &keys {
                all &= (start.source.token(key).await)
                    .map_or_else(|error| error.awaits_measured_limit(), |_| true);
            }
            all
        })
        .await;
        Ok(Self {
            secret,
            address,
            keys,
        })
    }

    /// Writes PgBouncer's files: its `[databases]` entries reach the servers by `route` and
    /// run their auth_query against this endpoint.
    pub fn write_pgbouncer_files(
        &self,
        start: &Start<'_>,
        route: ServerRoute<'_>,
        server_tls: ServerTls<'_>,
    ) -> Result<(), String> {
        let settings = start.settings;
        super::write_pgbouncer_files(
            settings,
            start.dir,
            &auth_query_databases_ini(
                &settings.databases,
                route,
                &self.address.host,
                self.address.port,
            ),
            &userlist(start.admin_secret, Some(&self.secret), &settings.clients),
            server_tls,
        )
    }

    /// Mints every allowed user's token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        for key in &self.keys {
            let _ = source.refresh_now(key).await;
        }
    }
}

pub(super) fn is_tcp(listen: &LocalListen) -> bool {
    matches!(listen, LocalListen::Tcp(_))
}

/// Where the daemon's local Postgres server for one purpose listens, and how PgBouncer
/// reaches it.
pub(super) struct LocalAddress {
    pub listen: Listen,
    /// PgBouncer's `host=`: the address, or the socket's directory.
    pub host: String,
    pub port: u16,
}

impl LocalAddress {
    pub fn of(listen: &LocalListen, dir: &Path) -> Self {
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

    pub async fn bind(&self, what: &str) -> Result<BoundListener, String> {
        BoundListener::bind(&self.listen)
            .await
            .map_err(|error| format!("{what} cannot listen on {:?}: {error}", self.listen))
    }
}

/// Answers the endpoint's lookups, within each entry's allow-list.
struct SourceLookup {
    /// By the name PgBouncer connects to the endpoint with: the application entry's name.
    databases: HashMap<String, Database>,
    answer: Answer,
    source: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    /// Each lookup is a login by PgBouncer (TLS, SCRAM): code the idle endpoint does not need
    /// resident afterwards.
    code_pages: CodePages,
}

impl SourceLookup {
    fn new(
        databases: &[Database],
        answer: Answer,
        source: Arc<TokenSource>,
        metrics: Arc<Metrics>,
        code_pages: CodePages,
    ) -> Self {
        Self {
            databases: databases
                .iter()
                .map(|db| (db.name.clone(), db.clone()))
                .collect(),
            answer,
            source,
            metrics,
            code_pages,
        }
    }
}

impl TokenLookup for SourceLookup {
    async fn lookup(&self, database: &str, user: &str) -> Lookup {
        let started = Instant::now();
        self.code_pages.work_ran();
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

    fn password_limit(&self) -> crate::token::PasswordLimit {
        self.source.pgbouncer_limit().get()
    }
}
