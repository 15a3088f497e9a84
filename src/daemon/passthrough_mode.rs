//! Passthrough mode: PgBouncer's server connections go to the daemon's relay, which logs each
//! in to RDS with a token minted for it; PgBouncer's auth_query gets the relay's secret from
//! the endpoint. Nothing PgBouncer holds can go stale.

use super::auth_endpoint::{Answer, AuthEndpoint, EndpointPlan, LocalAddress, is_tcp};
use super::relay_tokens::RelayTokens;
use super::running_mode::Start;
use crate::config::{PassthroughSettings, Settings};
use crate::endpoint::self_signed_tls;
use crate::pgbouncer::databases_ini::ServerRoute;
use crate::pgbouncer::files::load_or_create_secret;
use crate::pgbouncer::render::ServerTls;
use crate::pgbouncer::server_connections::relay_connection_limit;
use crate::relay::{LoginRate, RelayConfig, Upstream, upstream_tls};
use crate::token::TokenSource;
use secrecy::SecretString;
use std::path::Path;
use std::sync::Arc;

const RELAY_SECRET_FILE: &str = "relay-secret";

pub struct PassthroughMode {
    endpoint: AuthEndpoint,
}

impl PassthroughMode {
    /// Starts the relay and the endpoint and writes PgBouncer's files. The `stopped`
    /// futures resolve when the relay and the endpoint must stop.
    pub async fn start(
        start: &Start<'_>,
        passthrough: &PassthroughSettings,
        stopped: [impl Future<Output = ()> + Send + 'static; 2],
    ) -> Result<Self, String> {
        let Start {
            settings,
            dir,
            source,
            metrics,
            code_pages,
            ..
        } = *start;
        let [relay_stopped, endpoint_stopped] = stopped;
        // A CA of the daemon's own: every server connection of PgBouncer's goes to the
        // daemon, and on TCP PgBouncer verifies (verify-full) that it is the daemon.
        let (own_tls, own_ca) = self_signed_tls(dir)?;
        let relay_max = passthrough
            .relay_max_connections
            .unwrap_or_else(|| relay_connection_limit(settings));
        let (endpoint_limits, mut relay_limits) = crate::fd_limit::fitted_limits(Some(relay_max));
        if let Some(rate) = passthrough.relay_login_rate {
            relay_limits.login_rate = LoginRate::per_second(rate);
        }
        let secret =
            load_or_create_secret(dir, RELAY_SECRET_FILE).map_err(|error| error.to_string())?;
        let relay = LocalAddress::of(&passthrough.relay_listen, dir);
        let config = RelayConfig {
            server_tls: Some(own_tls.clone()),
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
            relay_stopped,
        ));
        tracing::info!(listen = ?relay.listen, max_connections, "relay listening");

        let plan = EndpointPlan {
            listen: &passthrough.auth_listen,
            tls: Some(own_tls),
            answer: Answer::RelaySecret(secret),
            limits: endpoint_limits,
        };
        let endpoint = AuthEndpoint::start(start, plan, endpoint_stopped).await?;
        // PgBouncer talks only to the daemon, on loopback or a unix socket (where it never
        // starts TLS); the relay does the TLS towards RDS.
        endpoint.write_pgbouncer_files(
            start,
            ServerRoute::Relay {
                host: &relay.host,
                port: relay.port,
            },
            ServerTls {
                mode: "verify-full",
                ca_file: Some(&own_ca),
            },
        )?;
        Ok(Self { endpoint })
    }

    /// Mints every allowed user's token afresh (SIGHUP).
    pub async fn refresh_now(&self, source: &Arc<TokenSource>) {
        self.endpoint.refresh_now(source).await;
    }
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
