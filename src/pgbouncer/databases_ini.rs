//! `databases.ini`, the file PgBouncer `%include`s from `pgbouncer.ini` and the only one that
//! changes at each token refresh: kept apart from the settings file because it is the one users
//! with their own pgbouncer.ini share with the daemon, and the one that holds tokens.

use super::password_probe::PROBE_INI;
use super::render::HEADER;
use crate::config::{AUTH_DATABASE_PREFIX, Database};
use crate::token::AuthToken;
use secrecy::SecretString;
use std::fmt::Write;
use std::path::Path;

/// One entry per database, with the IAM user forced and the current token as its password,
/// and the password-limit probe's entry from `dir`.
pub fn databases_ini<'a>(
    entries: impl IntoIterator<Item = (&'a Database, &'a AuthToken)>,
    dir: &Path,
) -> SecretString {
    let mut ini = String::from(HEADER);
    ini.push_str("[databases]\n");
    for (database, token) in entries {
        let target = &database.target;
        let (host, port) = database.dial_address();
        let _ = write!(
            ini,
            "{} = host={} port={} dbname={} user={} password={}",
            database.name,
            quote_value(host),
            port,
            quote_value(&database.dbname),
            quote_value(&target.user),
            quote_value(token.expose()),
        );
        for (key, value) in &database.options {
            let _ = write!(ini, " {key}={}", quote_value(value));
        }
        ini.push('\n');
    }
    include_password_probe(&mut ini, dir);
    SecretString::from(ini)
}

/// In the modes where PgBouncer hands the tokens to RDS, `databases.ini` ends with the
/// password-limit probe's file, which holds the probe's entry while it measures PgBouncer
/// ([`super::password_probe`]). Users' own pgbouncer.ini get it with `databases.ini`.
fn include_password_probe(ini: &mut String, dir: &Path) {
    let _ = writeln!(ini, "%include {}", dir.join(PROBE_INI).display());
}

/// Where PgBouncer's server connections for the application entries go.
pub enum ServerRoute<'a> {
    /// Straight to each entry's database server (auth-query mode), with the tokens as
    /// passwords: the file includes the password-limit probe's from the daemon's `dir`.
    Direct { dir: &'a Path },
    /// Through the daemon's relay, which picks the server by the database name PgBouncer
    /// sends: the entry's name (passthrough mode).
    Relay { host: &'a str, port: u16 },
}

/// Auth-query and passthrough modes' `[databases]`: each application entry has no forced
/// user, so PgBouncer logs in as the client's user with the password its auth_query returns,
/// and names an auth entry that points at the endpoint. The auth entry's dbname is the
/// application entry's name: that is how the endpoint knows which server to answer for.
pub fn auth_query_databases_ini(
    databases: &[Database],
    route: ServerRoute<'_>,
    endpoint_host: &str,
    port: u16,
) -> String {
    let mut ini = String::from(HEADER);
    ini.push_str("[databases]\n");
    for database in databases {
        let auth_entry = auth_database_name(&database.name);
        let (host, server_port, dbname) = match route {
            ServerRoute::Direct { .. } => {
                let (host, port) = database.dial_address();
                (host, port, &database.dbname)
            }
            ServerRoute::Relay { host, port } => (host, port, &database.name),
        };
        let _ = write!(
            ini,
            "{} = host={} port={server_port} dbname={} auth_dbname={auth_entry}",
            database.name,
            quote_value(host),
            quote_value(dbname),
        );
        for (key, value) in &database.options {
            let _ = write!(ini, " {key}={}", quote_value(value));
        }
        let _ = writeln!(
            ini,
            "\n{auth_entry} = host={} port={port} dbname={} pool_size=4",
            quote_value(endpoint_host),
            quote_value(&database.name),
        );
    }
    if let ServerRoute::Direct { dir } = route {
        include_password_probe(&mut ini, dir);
    }
    ini
}

pub fn auth_database_name(database: &str) -> String {
    format!("{AUTH_DATABASE_PREFIX}_{database}")
}

/// PgBouncer's connection-string quoting: single quotes, doubled inside.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgbouncer::render::tests::database;
    use secrecy::ExposeSecret;
    use std::time::SystemTime;

    #[test]
    fn database_entries_force_the_iam_user_with_the_token() {
        let db = database("app", "o'neil");
        let token = AuthToken::new(
            "h:5432/?a=b&c=d".into(),
            SystemTime::now(),
            SystemTime::now(),
        );
        let ini = databases_ini([(&db, &token)], Path::new("/run/aws-pgbouncer"));
        assert!(ini.expose_secret().ends_with(
            "app = host='db.example.internal' port=5432 dbname='app_db' user='o''neil' \
             password='h:5432/?a=b&c=d' pool_mode='transaction'\n\
             %include /run/aws-pgbouncer/password-probe.ini\n"
        ));
    }
}
