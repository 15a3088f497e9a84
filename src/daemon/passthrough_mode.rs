//! Passthrough mode: PgBouncer's server connections go to the daemon's relay, which logs each
//! in to RDS with a token minted for it. PgBouncer logs in to the relay as each allowed user
//! with the relay's secret, which `userlist.txt` holds: it never changes while the daemon's
//! directory lasts, so nothing PgBouncer holds goes stale and no client login waits for the
//! daemon.

use super::allowed_keys::AllowedKeys;
use super::local_address::{LocalAddress, is_tcp};
use super::relay_tokens::RelayTokens;
use super::running_mode::Start;
use crate::config::{PassthroughSettings, Settings};
use crate::endpoint::self_signed_tls;
use crate::pgbouncer::databases_ini::relay_databases_ini;
use crate::pgbouncer::files::load_or_create_secret;
use crate::pgbouncer::login_rules::{PlainLogin, userlist};
use crate::pgbouncer::render::ServerTls;
use crate::pgbouncer::server_connections::relay_connection_limit;
use crate::relay::{LoginRate, RelayConfig, Upstream, upstream_tls};
use crate::token::TokenSource;
use secrecy::SecretString;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

const RELAY_SECRET_FILE: &str = "relay-secret";

pub struct PassthroughMode {
    keys: AllowedKeys,
}

impl PassthroughMode {
    /// Starts the relay, mints the allowed users' first tokens and writes PgBouncer's files.
    /// `stopped` resolves when the relay must stop.
    pub async fn start(
        start: &Start<'_>,
        passthrough: &PassthroughSettings,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, String> {
        let Start {
            settings,
            dir,
            admin_secret,
            source,
            metrics,
            code_pages,
            ..
        } = *start;
        // A CA of the daemon's own: every server connection of PgBouncer's goes to the
        // daemon, and on TCP PgBouncer verifies (verify-full) that it is the daemon.
        let (own_tls, own_ca) = self_signed_tls(dir)?;
        let relay_max = passthrough
            .relay_max_connections
            .unwrap_or_else(|| relay_connection_limit(settings));
        let mut relay_limits = crate::fd_limit::fitted_relay_limits(relay_max);
        if let Some(rate) = passthrough.relay_login_rate {
            relay_limits.login_rate = LoginRate::per_second(rate);
        }
        let secret =
            load_or_create_secret(dir, RELAY_SECRET_FILE).map_err(|error| error.to_string())?;
        let relay = LocalAddress::of(&passthrough.relay_listen, dir);
        let config = RelayConfig {
            server_tls: Some(own_tls),
            limits: relay_limits,
            metrics: Some(metrics.clone()),
            follow_peer_cpu: follows_pgbouncer_cpu(passthrough),
            ..relay_config(settings, &passthrough.rds_ca_file, secret.clone())?
        };
        let max_connections = config.limits.max_connections;
        let listener = relay.bind("relay").await?;
        tokio::spawn(crate::relay::serve(
            listener,
            Arc::new(config),
            RelayTokens {
                source: source.clone(),
                code_pages: code_pages.clone(),
            },
            stopped,
        ));
        tracing::info!(listen = ?relay.listen, max_connections, "relay listening");

        let keys = AllowedKeys::mint_first(settings, source).await;
        // PgBouncer talks only to the daemon, on loopback or a unix socket (where it never
        // starts TLS); the relay does the TLS towards RDS.
        super::write_pgbouncer_files(
            settings,
            dir,
            &relay_databases_ini(&settings.databases, &relay.host, relay.port),
            &userlist(
                admin_secret,
                &relay_logins(settings, &secret),
                &settings.clients,
            ),
            ServerTls {
                mode: "verify-full",
                ca_file: Some(&own_ca),
            },
        )?;
        Ok(Self { keys })
    }

    /// Mints every allowed user's token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        self.keys.refresh_now(source).await;
    }
}

/// Every allowed user, once, with the relay's secret: what PgBouncer logs in to the relay
/// with. The relay checks each login against its entry's own list.
fn relay_logins<'a>(settings: &'a Settings, secret: &'a SecretString) -> Vec<PlainLogin<'a>> {
    let users: BTreeSet<&str> = settings
        .databases
        .iter()
        .flat_map(|db| db.allowed_users.iter().map(String::as_str))
        .collect();
    users
        .into_iter()
        .map(|user| PlainLogin { user, secret })
        .collect()
}

/// Whether the relay follows PgBouncer's CPU: it knows PgBouncer's pid only from a unix
/// socket's `SO_PEERCRED`, so on TCP it cannot, which is said once.
fn follows_pgbouncer_cpu(passthrough: &PassthroughSettings) -> bool {
    let wanted = passthrough.relay_follow_pgbouncer_cpu;
    if wanted && is_tcp(&passthrough.relay_listen) {
        tracing::info!(
            "relay_follow_pgbouncer_cpu needs relay_listen on a unix socket: the relay's thread \
             keeps its own CPUs"
        );
        return false;
    }
    wanted
}

/// The relay: one target per database entry, keyed by its name.
fn relay_config(
    settings: &Settings,
    rds_ca_file: &Path,
    secret: SecretString,
) -> Result<RelayConfig, String> {
    let targets = settings
        .databases
        .iter()
        .map(|db| {
            let upstream = Upstream {
                kind: db.target.kind,
                host: db.target.host.clone(),
                port: db.target.port,
                dial: db.dial.clone(),
                region: db.target.region.clone(),
                database: db.dbname.clone(),
                users: db.allowed_users.clone(),
                role: db.target.role.clone(),
            };
            (db.name.clone(), Arc::new(upstream))
        })
        .collect();
    Ok(RelayConfig {
        secret,
        peer_uid: None,
        upstream_tls: upstream_tls(rds_ca_file)?,
        server_tls: None,
        targets,
        limits: Default::default(),
        metrics: None,
        follow_peer_cpu: false,
    })
}
