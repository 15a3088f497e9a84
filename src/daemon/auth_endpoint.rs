//! Auth-query mode's endpoint: a small local Postgres server that PgBouncer's auth_query asks
//! for a user's password, answered with the user's current token within each database
//! entry's allow-list.

use super::local_address::LocalAddress;
use super::running_mode::Start;
use crate::code_pages::CodePages;
use crate::config::{Database, LocalListen};
use crate::endpoint::{EndpointConfig, Limits, Lookup, TokenLookup};
use crate::metrics::{AuthQueryResult, Metrics};
use crate::pgbouncer::databases_ini::auth_query_databases_ini;
use crate::pgbouncer::files::load_or_create_secret;
use crate::pgbouncer::login_rules::{PlainLogin, userlist};
use crate::pgbouncer::render::{self, ServerTls};
use crate::token::TokenSource;
use secrecy::SecretString;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

const AUTH_SECRET_FILE: &str = "auth-secret";

/// How the endpoint is set up; the rest comes from the settings.
pub(super) struct EndpointPlan<'a> {
    pub listen: &'a LocalListen,
    /// Offered to PgBouncer when the endpoint is on TCP (`None` on a unix socket).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: Limits,
}

/// A running endpoint: PgBouncer's address for it, and the secret PgBouncer logs in with.
pub(super) struct AuthEndpoint {
    secret: SecretString,
    address: LocalAddress,
}

impl AuthEndpoint {
    /// Binds and serves the endpoint until `stopped` resolves.
    pub async fn start(
        start: &Start<'_>,
        plan: EndpointPlan<'_>,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, String> {
        let secret = load_or_create_secret(start.dir, AUTH_SECRET_FILE)
            .map_err(|error| error.to_string())?;
        let address = LocalAddress::of(plan.listen, start.dir);
        let listener = address.bind("auth endpoint").await?;
        let lookup = Arc::new(SourceLookup::new(
            &start.settings.databases,
            start.source.clone(),
            start.metrics.clone(),
            start.code_pages.clone(),
        ));
        let config = Arc::new(EndpointConfig {
            auth_user: render::AUTH_USER.to_owned(),
            auth_secret: secret.clone(),
            limits: plan.limits,
            tls: plan.tls,
            metrics: Some(start.metrics.clone()),
        });
        tokio::spawn(crate::endpoint::serve(listener, config, lookup, stopped));
        tracing::info!(listen = ?address.listen, "auth endpoint listening");

        Ok(Self { secret, address })
    }

    /// Writes PgBouncer's files: its `[databases]` entries run their auth_query against this
    /// endpoint, as the auth user with the endpoint's secret.
    pub fn write_pgbouncer_files(
        &self,
        start: &Start<'_>,
        server_tls: ServerTls<'_>,
    ) -> Result<(), String> {
        let settings = start.settings;
        let auth_login = PlainLogin {
            user: render::AUTH_USER,
            secret: &self.secret,
        };
        super::write_pgbouncer_files(
            settings,
            start.dir,
            &auth_query_databases_ini(
                &settings.databases,
                start.dir,
                &self.address.host,
                self.address.port,
            ),
            &userlist(start.admin_secret, &[auth_login], &settings.clients),
            server_tls,
        )
    }
}

/// Answers the endpoint's lookups, within each entry's allow-list.
struct SourceLookup {
    /// By the name PgBouncer connects to the endpoint with: the application entry's name.
    databases: HashMap<String, Database>,
    source: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    /// Each lookup is a login by PgBouncer (TLS, SCRAM): code the idle endpoint does not need
    /// resident afterwards.
    code_pages: CodePages,
}

impl SourceLookup {
    fn new(
        databases: &[Database],
        source: Arc<TokenSource>,
        metrics: Arc<Metrics>,
        code_pages: CodePages,
    ) -> Self {
        Self {
            databases: databases
                .iter()
                .map(|db| (db.name.clone(), db.clone()))
                .collect(),
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
