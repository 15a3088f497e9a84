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

/// Auth-query mode's `[databases]`: each application entry has no forced user, so PgBouncer
/// logs in to its server as the client's user with the password its auth_query returns, and
/// names an auth entry that points at the endpoint. The auth entry's dbname is the
/// application entry's name: that is how the endpoint knows which server to answer for. The
/// file includes the password-limit probe's from the daemon's `dir`.
pub fn auth_query_databases_ini(
    databases: &[Database],
    dir: &Path,
    endpoint_host: &str,
    port: u16,
) -> String {
    let mut ini = String::from(HEADER);
    ini.push_str("[databases]\n");
    for database in databases {
        let auth_entry = auth_database_name(&database.name);
        let (host, server_port) = database.dial_address();
        write_entry(&mut ini, database, host, server_port, &database.dbname);
        let _ = writeln!(
            ini,
            " auth_dbname={auth_entry}\n{auth_entry} = host={} port={port} dbname={} pool_size=4",
            quote_value(endpoint_host),
            quote_value(&database.name),
        );
    }
    include_password_probe(&mut ini, dir);
    ini
}

/// Passthrough mode's `[databases]`: every entry goes to the relay, which picks the server by
/// the database name PgBouncer sends (the entry's name). No forced user: PgBouncer logs in as
/// the client's user with the relay's secret, which `userlist.txt` holds for the allowed
/// users.
pub fn relay_databases_ini(databases: &[Database], relay_host: &str, relay_port: u16) -> String {
    let mut ini = String::from(HEADER);
    ini.push_str("[databases]\n");
    for database in databases {
        write_entry(&mut ini, database, relay_host, relay_port, &database.name);
        ini.push('\n');
    }
    ini
}

/// An entry without a forced user, up to the end of its options (no newline).
fn write_entry(ini: &mut String, database: &Database, host: &str, port: u16, dbname: &str) {
    let _ = write!(
        ini,
        "{} = host={} port={port} dbname={}",
        database.name,
        quote_value(host),
        quote_value(dbname),
    );
    for (key, value) in &database.options {
        let _ = write!(ini, " {key}={}", quote_value(value));
    }
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

    #[test]
    fn auth_query_entries_name_their_auth_entry_and_relay_entries_only_the_relay() {
        let db = database("app", "app_user");
        let ini = auth_query_databases_ini(
            std::slice::from_ref(&db),
            Path::new("/run/aws-pgbouncer"),
            "127.0.0.1",
            6433,
        );
        assert!(ini.ends_with(
            "app = host='db.example.internal' port=5432 dbname='app_db' \
             pool_mode='transaction' auth_dbname=aws_pgbouncer_auth_app\n\
             aws_pgbouncer_auth_app = host='127.0.0.1' port=6433 dbname='app' pool_size=4\n\
             %include /run/aws-pgbouncer/password-probe.ini\n"
        ));
        let ini = relay_databases_ini(&[db], "/run/aws-pgbouncer", 6434);
        assert!(ini.ends_with(
            "[databases]\napp = host='/run/aws-pgbouncer' port=6434 dbname='app' \
             pool_mode='transaction'\n"
        ));
    }
}
