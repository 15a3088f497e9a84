//! The daemon's settings: flags and environment, the TOML file and the old sidecar's
//! variables, merged and checked once at start, before anything is written.
//!
//! `file` reads the TOML file, `resolve` merges it with the flags, `validate` holds the checks
//! on names and values that go into PgBouncer's files, `role` those on cross-account roles,
//! `kind` what Aurora DSQL entries change.

mod file;
mod kind;
mod mode;
mod mode_only;
mod resolve;
mod role;
mod validate;

pub use file::{ClientEntry, ConfigFile, DatabaseEntry};
pub use mode::{Mode, TlsMode};

use crate::token::TokenKey;
use secrecy::SecretString;
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

/// Everything `run` and `check` act on, checked.
#[derive(Debug)]
pub struct Settings {
    pub mode: ModeSettings,
    pub pgbouncer_dir: PathBuf,
    pub listen: SocketAddr,
    pub token_lifetime: Duration,
    pub server_tls_mode: TlsMode,
    pub server_ca_file: Option<PathBuf>,
    pub databases: Vec<Database>,
    pub clients: Vec<Client>,
    /// `[pgbouncer]` settings passed through, already rendered as PgBouncer values.
    pub pgbouncer_settings: Vec<(String, String)>,
    pub lifecycle: Lifecycle,
}

/// The mode, with the settings only that mode has, so that no mode can read another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeSettings {
    Config,
    AuthQuery {
        /// Where the endpoint PgBouncer runs its auth_query against listens.
        auth_listen: LocalListen,
    },
    Passthrough(PassthroughSettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughSettings {
    /// Where the relay PgBouncer's server connections go through listens.
    pub relay_listen: LocalListen,
    /// The RDS CA bundle: the relay logs in to RDS itself, always with verify-full.
    pub rds_ca_file: PathBuf,
    /// The relay's connection limit when the user sets it; else it is derived from the pool
    /// sizes PgBouncer is configured with
    /// ([`crate::pgbouncer::server_connections::relay_connection_limit`]).
    pub relay_max_connections: Option<usize>,
    /// New upstream logins per second per RDS host when the user sets it
    /// ([`crate::relay::LoginRate`]).
    pub relay_login_rate: Option<u32>,
    /// Keep the relay's thread on PgBouncer's CPU ([`crate::cpu_follow`]).
    pub relay_follow_pgbouncer_cpu: bool,
}

impl ModeSettings {
    pub fn mode(&self) -> Mode {
        match self {
            ModeSettings::Config => Mode::Config,
            ModeSettings::AuthQuery { .. } => Mode::AuthQuery,
            ModeSettings::Passthrough(_) => Mode::Passthrough,
        }
    }
}

/// How the daemon is probed, supervises PgBouncer and stops.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// Where /healthz, /readyz, /startupz and /metrics are served.
    pub http_listen: String,
    /// The PgBouncer executable to start as a child process, with `--supervise`.
    pub supervise: Option<PathBuf>,
    pub min_shutdown_delay: Duration,
    pub max_shutdown_delay: Duration,
    pub exit_zero_on_sigterm: bool,
    pub quitquitquit: bool,
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
    /// The server and, in config mode, the forced user; in auth-query and passthrough modes
    /// the first allowed user.
    pub target: TokenKey,
    /// Where PgBouncer or the relay connects when that is not the token's host and port
    /// (`host`/`port` with a `token_host`/`token_port`).
    pub dial: Option<(String, u16)>,
    /// Every IAM user that may log in through this entry: the forced user in config mode.
    pub allowed_users: Vec<String>,
    pub options: Vec<(String, String)>,
}

/// Where connections go: `dial` when set (`host`/`port` beside a `token_host`/`token_port`),
/// else the host and port the token is minted for. One rule for PgBouncer's entries and the
/// relay's upstreams, so that the two never connect to different places.
pub fn dial_address<'a>(
    dial: &'a Option<(String, u16)>,
    host: &'a str,
    port: u16,
) -> (&'a str, u16) {
    match dial {
        Some((host, port)) => (host, *port),
        None => (host, port),
    }
}

impl Database {
    /// The host and port connections to this entry's server go to.
    pub fn dial_address(&self) -> (&str, u16) {
        dial_address(&self.dial, &self.target.host, self.target.port)
    }

    /// The token key for `user` at this entry's server.
    pub fn key_for(&self, user: &str) -> TokenKey {
        TokenKey {
            user: user.to_owned(),
            ..self.target.clone()
        }
    }

    /// The token key of every allowed user.
    pub fn allowed_keys(&self) -> impl Iterator<Item = TokenKey> + '_ {
        self.allowed_users.iter().map(|user| self.key_for(user))
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub user: String,
    pub password: Option<SecretString>,
}
