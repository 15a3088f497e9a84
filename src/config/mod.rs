//! The daemon's settings: flags and environment, the TOML file and the old sidecar's
//! variables, merged and checked once at start, before anything is written.

mod file;

pub use file::{ClientEntry, ConfigFile, DatabaseEntry};

use crate::cli::{Mode, RunArgs, TlsMode};
use crate::token::{TokenKey, resolve_region};
use secrecy::SecretString;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_PGBOUNCER_DIR: &str = "/run/aws-pgbouncer";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
pub const DEFAULT_TOKEN_LIFETIME: u64 = 900;
pub const DEFAULT_AUTH_LISTEN: &str = "unix:6433";
pub const DEFAULT_RELAY_LISTEN: &str = "unix:6434";

/// `[databases]` entries the daemon adds for auth-query mode start with this.
pub const AUTH_DATABASE_PREFIX: &str = "aws_pgbouncer_auth";

/// Database names PgBouncer's `pg_hba.conf` parser reads as keywords when unquoted (`all`
/// matches every database, `sameuser` the user's own name; the others make it drop the
/// line), plus its admin console's `pgbouncer`. The daemon quotes every name it writes there,
/// and refuses these too, so that no reader of the file can mistake one for a rule.
const RESERVED_DATABASE_NAMES: &[&str] = &[
    "all",
    "sameuser",
    "samerole",
    "samegroup",
    "replication",
    "pgbouncer",
];

/// Settings the daemon owns in `[pgbouncer]`; passing them through would break it or open it.
const OWNED_PGBOUNCER_SETTINGS: &[&str] = &[
    "listen_addr",
    "listen_port",
    "auth_type",
    "auth_file",
    "auth_hba_file",
    "auth_user",
    "auth_query",
    "auth_dbname",
    "admin_users",
    "stats_users",
    "server_tls_sslmode",
    "server_tls_ca_file",
];

#[derive(Debug)]
pub struct Settings {
    pub mode: Mode,
    pub pgbouncer_dir: PathBuf,
    pub listen: SocketAddr,
    pub token_lifetime: Duration,
    pub server_tls_mode: TlsMode,
    pub server_ca_file: Option<PathBuf>,
    pub databases: Vec<Database>,
    pub clients: Vec<Client>,
    /// `[pgbouncer]` settings passed through, already rendered as PgBouncer values.
    pub pgbouncer_settings: Vec<(String, String)>,
    /// Auth-query and passthrough modes: where the endpoint PgBouncer runs its auth_query
    /// against listens.
    pub auth_listen: LocalListen,
    /// Passthrough mode: where the relay PgBouncer's server connections go through listens.
    pub relay_listen: LocalListen,
}

/// Where one of the daemon's local Postgres servers (the auth endpoint, the relay) listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalListen {
    Tcp(SocketAddr),
    /// A socket `.s.PGSQL.{port}` in the PgBouncer directory, which PgBouncer reaches as
    /// `host={dir} port={port}` without TLS.
    Unix {
        port: u16,
    },
}

/// One `[databases]` entry: the name applications use and the IAM login behind it.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    pub dbname: String,
    /// The server and, in config mode, the forced user; in auth-query mode the first allowed
    /// user, which `check` logs in as.
    pub target: TokenKey,
    /// Auth-query mode: every IAM user that may log in through this entry.
    pub allowed_users: Vec<String>,
    pub options: Vec<(String, String)>,
}

impl Database {
    /// The token key for `user` at this entry's server.
    pub fn key_for(&self, user: &str) -> TokenKey {
        TokenKey {
            user: user.to_owned(),
            ..self.target.clone()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub user: String,
    pub password: Option<SecretString>,
}

impl Settings {
    /// Merges and checks everything. Errors name the setting and what to do about it.
    pub async fn resolve(args: &RunArgs) -> Result<Self, String> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let mode = match (args.mode, &file.mode) {
            (Some(mode), _) => mode,
            (None, Some(text)) => {
                <Mode as clap::ValueEnum>::from_str(text, false).map_err(|_| {
                    format!("config file: mode {text:?} is not one of: config, auth-query")
                })?
            }
            (None, None) => Mode::Config,
        };
        let token_lifetime = args
            .token_lifetime
            .or(file.token_lifetime)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        if !(1..=900).contains(&token_lifetime) {
            return Err(format!(
                "token lifetime {token_lifetime} s is out of range: RDS accepts 1 to 900 seconds"
            ));
        }
        let listen_text = args
            .listen
            .clone()
            .or(file.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            format!("listen address {listen_text:?} is not ADDR:PORT, e.g. 127.0.0.1:6432")
        })?;
        let server_tls_mode = match (args.server_tls_mode, &file.server_tls_mode) {
            (Some(mode), _) => mode,
            (None, Some(text)) => <TlsMode as clap::ValueEnum>::from_str(text, false)
                .map_err(|_| format!("config file: server_tls_mode {text:?} is not valid"))?,
            (None, None) => TlsMode::VerifyFull,
        };
        let server_ca_file = args.server_ca_file.clone().or(file.server_ca_file.clone());
        check_ca_file(server_tls_mode, server_ca_file.as_ref())?;

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
            databases.push(resolve_database(entry, mode, default_region.as_deref()).await?);
        }
        check_unique(databases.iter().map(|db| db.name.as_str()), "database name")?;

        let clients = resolve_clients(file.clients, mode, &databases)?;
        let auth_listen = resolve_local_listen(
            "auth listen",
            args.auth_listen.as_deref().or(file.auth_listen.as_deref()),
            DEFAULT_AUTH_LISTEN,
            args.auth_listen_non_loopback,
        )?;
        let relay_listen = resolve_local_listen(
            "relay listen",
            args.relay_listen
                .as_deref()
                .or(file.relay_listen.as_deref()),
            DEFAULT_RELAY_LISTEN,
            false,
        )?;
        for local in [&auth_listen, &relay_listen] {
            if *local
                == (LocalListen::Unix {
                    port: listen.port(),
                })
            {
                return Err(format!(
                    "unix:{} is PgBouncer's own socket in the directory (its listen port); \
                     pick another port for the auth endpoint or the relay",
                    listen.port()
                ));
            }
        }
        let pgbouncer_settings = file
            .pgbouncer
            .into_iter()
            .map(|(key, value)| {
                if OWNED_PGBOUNCER_SETTINGS.contains(&key.as_str()) {
                    return Err(format!(
                        "config file: [pgbouncer] {key} is set by aws-pgbouncer itself; remove it"
                    ));
                }
                check_word(&key, "[pgbouncer] setting name")?;
                Ok((key.clone(), setting_value(&key, &value)?))
            })
            .collect::<Result<Vec<_>, String>>()?;

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
            pgbouncer_settings,
            auth_listen,
            relay_listen,
        })
    }
}

/// `ADDR:PORT`, `unix` or `unix:PORT` (a socket in the PgBouncer directory; the port of the
/// default address when none is given).
fn resolve_local_listen(
    what: &str,
    given: Option<&str>,
    default: &str,
    non_loopback: bool,
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
    let dbname = args
        .dbname
        .clone()
        .or_else(|| legacy("DB_NAME"))
        .ok_or("--host is set but --dbname (DB_NAME) is not")?;
    let user = args.user.clone().or_else(|| legacy("DB_USERNAME"));
    if user.is_none() && args.allow_users.is_empty() {
        return Err("--host is set but neither --user (DB_USERNAME) nor --allow-users is".into());
    }
    Ok(Some(DatabaseEntry {
        name: None,
        host,
        port,
        dbname,
        user,
        users: args.allow_users.clone(),
        region: None,
        options: Default::default(),
    }))
}

async fn resolve_database(
    entry: DatabaseEntry,
    mode: Mode,
    default_region: Option<&str>,
) -> Result<Database, String> {
    let name = entry.name.unwrap_or_else(|| entry.dbname.clone());
    check_word(&name, "database name")?;
    let keyword = RESERVED_DATABASE_NAMES
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(&name));
    if keyword || name.starts_with(AUTH_DATABASE_PREFIX) {
        return Err(format!(
            "database name {name:?} is reserved: PgBouncer reads all, sameuser, samerole, \
             samegroup, replication and pgbouncer as keywords, and {AUTH_DATABASE_PREFIX}* \
             names are the daemon's own; set name = \"...\" on the entry to something else"
        ));
    }
    if entry.host.is_empty() || entry.dbname.is_empty() {
        return Err(format!(
            "database {name}: host and dbname must not be empty"
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
        Mode::AuthQuery | Mode::Passthrough => entry.user.into_iter().chain(entry.users).collect(),
    };
    let Some(first_user) = allowed_users.first().cloned() else {
        return Err(format!(
            "database {name}: no IAM user (user, or users in auth-query mode)"
        ));
    };
    for user in &allowed_users {
        check_user_name(user)?;
    }
    let region = resolve_region(entry.region.as_deref().or(default_region), &entry.host)
        .await
        .map_err(|error| format!("database {name}: {error}"))?;
    let options = entry
        .options
        .iter()
        .map(|(key, value)| {
            check_word(key, "database option name")?;
            if ["host", "port", "dbname", "user", "password"].contains(&key.as_str()) {
                return Err(format!(
                    "database {name}: option {key} is set by aws-pgbouncer"
                ));
            }
            Ok((key.clone(), setting_value(key, value)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Database {
        name,
        dbname: entry.dbname,
        target: TokenKey {
            host: entry.host,
            port: entry.port.unwrap_or(5432),
            user: first_user,
            region,
        },
        allowed_users,
        options,
    })
}

/// Without `[[clients]]`, applications log in as the IAM user names, without a password, from
/// loopback: what the old sidecar's users have configured today. In auth-query mode the users
/// come from the endpoint, so only clients with passwords need listing.
fn resolve_clients(
    entries: Vec<ClientEntry>,
    mode: Mode,
    databases: &[Database],
) -> Result<Vec<Client>, String> {
    let clients: Vec<Client> = if entries.is_empty() && mode == Mode::Config {
        let users: BTreeSet<&str> = databases.iter().map(|db| db.target.user.as_str()).collect();
        users
            .into_iter()
            .map(|user| Client {
                user: user.to_owned(),
                password: None,
            })
            .collect()
    } else {
        entries
            .into_iter()
            .map(|entry| Client {
                user: entry.user,
                password: entry.password,
            })
            .collect()
    };
    for client in &clients {
        check_user_name(&client.user)?;
    }
    check_unique(clients.iter().map(|c| c.user.as_str()), "client user")?;
    Ok(clients)
}

fn check_ca_file(mode: TlsMode, ca_file: Option<&PathBuf>) -> Result<(), String> {
    match ca_file {
        None if mode.verifies_certificate() => Err(format!(
            "server TLS mode {} needs --server-ca-file: the RDS CA bundle (global-bundle.pem)",
            mode.as_pgbouncer()
        )),
        Some(path) => std::fs::File::open(path)
            .map(drop)
            .map_err(|error| format!("server CA file {}: {error}", path.display())),
        None => Ok(()),
    }
}

fn check_unique<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(format!("{what} {name:?} appears twice"));
        }
    }
    Ok(())
}

/// Names that go unquoted into PgBouncer's ini files.
fn check_word(word: &str, what: &str) -> Result<(), String> {
    let fine = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if fine {
        Ok(())
    } else {
        Err(format!(
            "{what} {word:?} may contain only letters, digits, '_', '-' and '.'"
        ))
    }
}

/// User names are quoted in the userlist and hba file; only characters that would end the
/// quoting or the line are refused.
fn check_user_name(user: &str) -> Result<(), String> {
    if user.is_empty() || user.chars().any(|c| c == '"' || c.is_control()) {
        return Err(format!(
            "user name {user:?} must be non-empty, without double quotes or control characters"
        ));
    }
    Ok(())
}

fn setting_value(key: &str, value: &toml::Value) -> Result<String, String> {
    let text = match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Integer(number) => number.to_string(),
        toml::Value::Float(number) => number.to_string(),
        toml::Value::Boolean(flag) => u8::from(*flag).to_string(),
        _ => return Err(format!("setting {key}: use a string, number or boolean")),
    };
    if text.chars().any(char::is_control) {
        return Err(format!("setting {key}: the value must be a single line"));
    }
    Ok(text)
}
