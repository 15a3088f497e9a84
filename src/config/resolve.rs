//! Merging: flags win over their environment variables, which win over the config file, which
//! wins over the defaults.

use super::kind;
use super::mode_only;
use super::role::RoleSettings;
use super::validate::{
    check_ca_file, check_database_name, check_unique, check_user_name, database_options,
    pgbouncer_settings,
};
use super::{
    Client, ClientEntry, ConfigFile, DEFAULT_AUTH_LISTEN, DEFAULT_LISTEN, DEFAULT_PGBOUNCER_DIR,
    DEFAULT_RELAY_LISTEN, DEFAULT_TOKEN_LIFETIME, Database, DatabaseEntry, Lifecycle, LocalListen,
    Mode, ModeSettings, PassthroughSettings, Settings, TlsMode,
};
use crate::cli::RunArgs;
use crate::token::{TokenKey, TokenKind, resolve_region};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

impl Settings {
    /// Merges and checks everything. Errors name the setting and what to do about it.
    pub async fn resolve(args: &RunArgs) -> Result<Self, String> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        // Each entry's kind limits it (`kind::check_entries`, once the entries are known).
        let token_lifetime = args
            .token_lifetime
            .or(file.token_lifetime)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        let listen_text = args
            .listen
            .clone()
            .or(file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            format!("listen address {listen_text:?} is not ADDR:PORT, e.g. 127.0.0.1:6432")
        })?;
        let server_tls_mode = args
            .server_tls_mode
            .or(file.server_tls_mode)
            .unwrap_or(TlsMode::VerifyFull);
        let server_ca_file = args.server_ca_file.clone().or(file.server_ca_file.clone());
        check_ca_file(server_tls_mode, server_ca_file.as_ref())?;
        let mode = resolve_mode(args, &file, listen.port(), server_ca_file.as_ref())?;

        let default_region = args.region.clone().or(file.region.clone());
        let mut entries = file.databases;
        if let Some(entry) = database_from_flags(args)? {
            entries.push(entry);
        }
        if entries.is_empty() {
            return Err(
                "no database configured: set --host (or RDS_HOST), --dbname (DB_NAME) \
                        and --user (DB_USERNAME), or list [[databases]] in --config"
                    .to_owned(),
            );
        }
        let mut databases = Vec::with_capacity(entries.len());
        for entry in entries {
            databases.push(
                resolve_database(
                    entry,
                    mode.mode(),
                    default_region.as_deref(),
                    Duration::from_secs(token_lifetime),
                )
                .await?,
            );
        }
        check_unique(databases.iter().map(|db| db.name.as_str()), "database name")?;
        kind::check_entries(token_lifetime, mode.mode(), server_tls_mode, &databases)?;

        let clients = resolve_clients(file.clients, mode.mode(), &databases)?;
        Ok(Self {
            mode,
            pgbouncer_dir: args
                .pgbouncer_dir
                .clone()
                .or(file.pgbouncer_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PGBOUNCER_DIR)),
            listen,
            token_lifetime: Duration::from_secs(token_lifetime),
            server_tls_mode,
            server_ca_file,
            databases,
            clients,
            pgbouncer_settings: pgbouncer_settings(file.pgbouncer)?,
            lifecycle: lifecycle(args),
        })
    }
}

fn lifecycle(args: &RunArgs) -> Lifecycle {
    Lifecycle {
        http_listen: args.http_listen.clone(),
        supervise: args.supervise.then(|| args.pgbouncer_bin.clone()),
        min_shutdown_delay: Duration::from_secs(args.min_shutdown_delay),
        max_shutdown_delay: Duration::from_secs(args.max_shutdown_delay),
        exit_zero_on_sigterm: args.exit_zero_on_sigterm,
        quitquitquit: args.quitquitquit,
    }
}

/// The mode and what it needs: the listen addresses of the local servers it runs, and in
/// passthrough mode the CA bundle the relay verifies RDS with.
fn resolve_mode(
    args: &RunArgs,
    file: &ConfigFile,
    pgbouncer_port: u16,
    server_ca_file: Option<&PathBuf>,
) -> Result<ModeSettings, String> {
    let auth_listen = || {
        resolve_local_listen(
            "auth listen",
            args.auth_listen.as_deref().or(file.auth_listen.as_deref()),
            DEFAULT_AUTH_LISTEN,
            args.auth_listen_non_loopback,
            pgbouncer_port,
        )
    };
    let relay_listen = || {
        resolve_local_listen(
            "relay listen",
            args.relay_listen
                .as_deref()
                .or(file.relay_listen.as_deref()),
            DEFAULT_RELAY_LISTEN,
            false,
            pgbouncer_port,
        )
    };
    let mode = args.mode.or(file.mode).unwrap_or(Mode::Config);
    mode_only::warn_unread(mode, args, file);
    Ok(match mode {
        Mode::Config => ModeSettings::Config,
        Mode::AuthQuery => ModeSettings::AuthQuery {
            auth_listen: auth_listen()?,
        },
        Mode::Passthrough => ModeSettings::Passthrough(PassthroughSettings {
            relay_listen: relay_listen()?,
            rds_ca_file: server_ca_file.cloned().ok_or(
                "passthrough mode verifies RDS itself and needs --server-ca-file \
                 (the RDS CA bundle)",
            )?,
            relay_max_connections: relay_max_connections(args, file)?,
            relay_login_rate: match args.relay_login_rate.or(file.relay_login_rate) {
                Some(0) => return Err("relay login rate must be at least 1".to_owned()),
                given => given,
            },
            relay_follow_pgbouncer_cpu: args
                .relay_follow_pgbouncer_cpu
                .or(file.relay_follow_pgbouncer_cpu)
                .unwrap_or(false),
        }),
    })
}

/// The relay's connection limit if the user sets one: at least 1 (clap checks the flag).
fn relay_max_connections(args: &RunArgs, file: &ConfigFile) -> Result<Option<usize>, String> {
    match args
        .relay_max_connections
        .map(|max| max as usize)
        .or(file.relay_max_connections)
    {
        Some(0) => Err("relay max connections must be at least 1".to_owned()),
        given => Ok(given),
    }
}

/// `ADDR:PORT`, `unix` or `unix:PORT` (a socket in the PgBouncer directory; the port of the
/// default address when none is given).
fn resolve_local_listen(
    what: &str,
    given: Option<&str>,
    default: &str,
    non_loopback: bool,
    pgbouncer_port: u16,
) -> Result<LocalListen, String> {
    let text = given.unwrap_or(default);
    let default_port = default
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("defaults end in a port");
    if let Some(rest) = text.strip_prefix("unix") {
        let port = match rest.strip_prefix(':') {
            Some(port) => port
                .parse()
                .map_err(|_| format!("{what} {text:?}: {port:?} is not a port"))?,
            None if rest.is_empty() => default_port,
            None => return Err(format!("{what} {text:?} is not unix or unix:PORT")),
        };
        if port == pgbouncer_port {
            return Err(format!(
                "{what} unix:{port} is PgBouncer's own socket in the directory (its listen \
                 port); pick another port"
            ));
        }
        return Ok(LocalListen::Unix { port });
    }
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!(
            "{what} {text:?} is not ADDR:PORT (e.g. 127.0.0.1:{default_port}), unix or unix:PORT"
        )
    })?;
    if !addr.ip().is_loopback() && !non_loopback {
        return Err(format!(
            "{what} {addr} is not a loopback address: it hands out database access; \
             only the auth endpoint may leave loopback, with --auth-listen-non-loopback"
        ));
    }
    Ok(LocalListen::Tcp(addr))
}

/// The single database of the old sidecar's shape, from flags, `AWS_PGBOUNCER_*` or the old
/// sidecar's own variables (`RDS_HOST`, `DB_PORT`, `DB_NAME`, `DB_USERNAME`).
fn database_from_flags(args: &RunArgs) -> Result<Option<DatabaseEntry>, String> {
    let legacy = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let Some(host) = args.host.clone().or_else(|| legacy("RDS_HOST")) else {
        return Ok(None);
    };
    let port = match (args.port, legacy("DB_PORT")) {
        (Some(port), _) => Some(port),
        (None, Some(text)) => Some(
            text.parse()
                .map_err(|_| format!("DB_PORT {text:?} is not a port number"))?,
        ),
        (None, None) => None,
    };
    let kind = args.kind.unwrap_or_default();
    let dbname = args.dbname.clone().or_else(|| legacy("DB_NAME"));
    if dbname.is_none() && kind == TokenKind::Rds {
        return Err("--host is set but --dbname (DB_NAME) is not".into());
    }
    let user = args.user.clone().or_else(|| legacy("DB_USERNAME"));
    if user.is_none() && args.allow_users.is_empty() {
        return Err("--host is set but neither --user (DB_USERNAME) nor --allow-users is".into());
    }
    Ok(Some(DatabaseEntry {
        name: None,
        kind,
        host,
        port,
        token_host: args.token_host.clone(),
        token_port: args.token_port,
        dbname,
        user,
        users: args.allow_users.clone(),
        region: None,
        role_arn: args.role_arn.clone(),
        external_id: args.external_id.clone(),
        role_session_name: args.role_session_name.clone(),
        role_duration_seconds: args.role_duration_seconds,
        options: Default::default(),
    }))
}

async fn resolve_database(
    entry: DatabaseEntry,
    mode: Mode,
    default_region: Option<&str>,
    token_lifetime: Duration,
) -> Result<Database, String> {
    let kind = entry.kind;
    let dbname = kind::dbname(kind, &entry.host, entry.dbname)?;
    let name = entry.name.unwrap_or_else(|| dbname.clone());
    check_database_name(&name)?;
    if entry.host.is_empty() || dbname.is_empty() {
        return Err(format!(
            "database {name}: host and dbname must not be empty"
        ));
    }
    if entry.token_host.as_deref() == Some("") {
        return Err(format!(
            "database {name}: token_host is empty: leave it out to sign tokens for host"
        ));
    }
    if kind == TokenKind::Dsql && entry.token_port.is_some() {
        return Err(format!(
            "database {name}: token_port is for RDS: Aurora DSQL tokens do not sign a port"
        ));
    }
    let allowed_users: Vec<String> = match mode {
        Mode::Config => {
            if !entry.users.is_empty() {
                return Err(format!(
                    "database {name}: users (an allow-list) is for auth-query and \
                     passthrough modes; config mode forces one user"
                ));
            }
            entry.user.into_iter().collect()
        }
        Mode::AuthQuery | Mode::Passthrough => {
            let mut users: Vec<String> = Vec::new();
            // `--user` may repeat a name of `--allow-users`; one login each is enough.
            for user in entry.user.into_iter().chain(entry.users) {
                if !users.contains(&user) {
                    users.push(user);
                }
            }
            users
        }
    };
    let Some(first_user) = allowed_users.first().cloned() else {
        return Err(format!(
            "database {name}: no IAM user (user, or users in auth-query mode)"
        ));
    };
    for user in &allowed_users {
        check_user_name(user)?;
    }
    let port = entry.port.unwrap_or(5432);
    let token_host = entry.token_host.unwrap_or_else(|| entry.host.clone());
    let token_port = entry.token_port.unwrap_or(port);
    // The token host is the RDS endpoint name: the one a region can be read from.
    let region = resolve_region(entry.region.as_deref().or(default_region), &token_host)
        .await
        .map_err(|error| format!("database {name}: {error}"))?;
    let dial = (entry.host != token_host || port != token_port).then_some((entry.host, port));
    let options = kind::session_options(&name, kind, database_options(&name, &entry.options)?)?;
    let role = RoleSettings {
        arn: entry.role_arn,
        external_id: entry.external_id,
        session_name: entry.role_session_name,
        duration_seconds: entry.role_duration_seconds,
    }
    .resolve(&name, token_lifetime)?;
    Ok(Database {
        name,
        dbname,
        target: TokenKey {
            kind,
            host: token_host,
            port: token_port,
            user: first_user,
            region,
            role,
        },
        dial,
        allowed_users,
        options,
    })
}

/// Without `[[clients]]`, applications log in as the IAM user names, without a password, from
/// loopback: what the old sidecar's users have configured today. `[[clients]]` is for config
/// mode only: in the other modes PgBouncer logs in to the server as the client's own user,
/// with the password it has for that user, so a listed client would lose the token (auth-query
/// mode) or the relay secret (passthrough mode) to its own password.
fn resolve_clients(
    entries: Vec<ClientEntry>,
    mode: Mode,
    databases: &[Database],
) -> Result<Vec<Client>, String> {
    let clients: Vec<Client> = match mode {
        Mode::Config if entries.is_empty() => {
            let users: BTreeSet<&str> =
                databases.iter().map(|db| db.target.user.as_str()).collect();
            users
                .into_iter()
                .map(|user| Client {
                    user: user.to_owned(),
                    password: None,
                })
                .collect()
        }
        Mode::Config => entries
            .into_iter()
            .map(|entry| Client {
                user: entry.user,
                password: entry.password,
            })
            .collect(),
        Mode::AuthQuery | Mode::Passthrough if entries.is_empty() => Vec::new(),
        Mode::AuthQuery => return Err(clients_refused("RDS with it instead of the user's token")),
        Mode::Passthrough => {
            return Err(clients_refused(
                "the relay with it instead of the relay's secret",
            ));
        }
    };
    for client in &clients {
        check_user_name(&client.user)?;
    }
    check_unique(clients.iter().map(|c| c.user.as_str()), "client user")?;
    Ok(clients)
}

/// Why `[[clients]]` is refused outside config mode: PgBouncer would log in to
/// `server_and_instead` with the client's own password, which fails.
fn clients_refused(server_and_instead: &str) -> String {
    format!(
        "[[clients]] is for config mode: here PgBouncer would take a listed client's own \
         password and log in to {server_and_instead}, which fails; applications log in as the users \
         of each database's allow-list, from loopback, without a password"
    )
}
