//! Checks on the names and values that go into PgBouncer's files, so that nothing a user
//! writes can be read by PgBouncer as something else.

use super::{AUTH_DATABASE_PREFIX, TlsMode};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

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

/// Options of a `[databases]` entry that the daemon sets itself.
const OWNED_DATABASE_OPTIONS: &[&str] = &["host", "port", "dbname", "user", "password"];

pub(super) fn check_database_name(name: &str) -> Result<(), String> {
    check_word(name, "database name")?;
    let keyword = RESERVED_DATABASE_NAMES
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(name));
    if keyword || name.starts_with(AUTH_DATABASE_PREFIX) {
        return Err(format!(
            "database name {name:?} is reserved: PgBouncer reads all, sameuser, samerole, \
             samegroup, replication and pgbouncer as keywords, and {AUTH_DATABASE_PREFIX}* \
             names are the daemon's own; set name = \"...\" on the entry to something else"
        ));
    }
    Ok(())
}

/// The `[pgbouncer]` table, rendered as PgBouncer values.
pub(super) fn pgbouncer_settings(
    table: BTreeMap<String, toml::Value>,
) -> Result<Vec<(String, String)>, String> {
    table
        .into_iter()
        .map(|(key, value)| {
            if OWNED_PGBOUNCER_SETTINGS.contains(&key.as_str()) {
                return Err(format!(
                    "config file: [pgbouncer] {key} is set by aws-pgbouncer itself; remove it"
                ));
            }
            check_word(&key, "[pgbouncer] setting name")?;
            let value = setting_value(&key, &value)?;
            Ok((key, value))
        })
        .collect()
}

/// A database entry's `options`, rendered as PgBouncer values.
pub(super) fn database_options(
    database: &str,
    options: &BTreeMap<String, toml::Value>,
) -> Result<Vec<(String, String)>, String> {
    options
        .iter()
        .map(|(key, value)| {
            check_word(key, "database option name")?;
            if OWNED_DATABASE_OPTIONS.contains(&key.as_str()) {
                return Err(format!(
                    "database {database}: option {key} is set by aws-pgbouncer"
                ));
            }
            Ok((key.clone(), setting_value(key, value)?))
        })
        .collect()
}

pub(super) fn check_ca_file(mode: TlsMode, ca_file: Option<&PathBuf>) -> Result<(), String> {
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

pub(super) fn check_unique<'a>(
    names: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<(), String> {
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
pub(super) fn check_user_name(user: &str) -> Result<(), String> {
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
