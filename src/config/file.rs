//! The TOML configuration file, for set-ups with several databases or PgBouncer tuning.
//! Unknown keys are errors: a misspelt setting that is silently ignored is how an outage starts.

use super::{Mode, TlsMode};
use crate::token::TokenKind;
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub mode: Option<Mode>,
    pub pgbouncer_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub region: Option<String>,
    pub token_lifetime: Option<u64>,
    pub server_tls_mode: Option<TlsMode>,
    pub server_ca_file: Option<PathBuf>,
    pub auth_listen: Option<String>,
    pub relay_listen: Option<String>,
    pub relay_max_connections: Option<usize>,
    pub relay_login_rate: Option<u32>,
    pub relay_follow_pgbouncer_cpu: Option<bool>,
    #[serde(default)]
    pub databases: Vec<DatabaseEntry>,
    /// Users that applications log in to PgBouncer as, with optional passwords.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
    /// PgBouncer settings passed through to the `[pgbouncer]` section as they are.
    #[serde(default)]
    pub pgbouncer: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseEntry {
    /// The name applications connect to; defaults to `dbname`.
    pub name: Option<String>,
    /// RDS (the default) or Aurora DSQL: which tokens log in, and DSQL's limits.
    #[serde(default)]
    pub kind: TokenKind,
    pub host: String,
    pub port: Option<u16>,
    /// The RDS endpoint name the token is signed for, when `host` is another way to reach it
    /// (an NLB, a tunnel, a port-forward, a custom DNS name); defaults to `host`.
    pub token_host: Option<String>,
    /// The port the token is signed for; defaults to `port`.
    pub token_port: Option<u16>,
    /// Required for RDS; DSQL's is `postgres`.
    pub dbname: Option<String>,
    /// Config mode: the IAM database user PgBouncer logs in as.
    pub user: Option<String>,
    /// Auth-query mode: the IAM users that may log in through this entry.
    #[serde(default)]
    pub users: Vec<String>,
    pub region: Option<String>,
    /// Cross-account: the IAM role assumed to sign this entry's tokens.
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    pub role_session_name: Option<String>,
    /// How long the role's credentials live (STS's DurationSeconds).
    pub role_duration_seconds: Option<u64>,
    /// Per-database PgBouncer options (`pool_size`, `pool_mode`, ...), appended to the entry.
    #[serde(default)]
    pub options: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub user: String,
    /// A plaintext password or a `SCRAM-SHA-256$...` verifier. Without one, the user may log
    /// in from loopback only, without a password, as with the old sidecar.
    pub password: Option<SecretString>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read config file {}: {error}", path.display()))?;
        toml::from_str(&text).map_err(|error| describe(path, &text, &error))
    }
}

/// The error without toml's source excerpt: the excerpt could show a password.
fn describe(path: &Path, text: &str, error: &toml::de::Error) -> String {
    let location = error.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
        format!(" at line {line}, column {column}")
    });
    format!(
        "config file {}{}: {}",
        path.display(),
        location.unwrap_or_default(),
        error.message()
    )
}
