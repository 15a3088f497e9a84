//! The text of the files PgBouncer reads. Pure functions of the settings and tokens, so that
//! what PgBouncer sees can be tested without running it.
//!
//! `pgbouncer.ini` holds the settings and `%include`s `databases.ini`, the only file that
//! changes at each token refresh. Users who keep their own pgbouncer.ini `%include` the same
//! `databases.ini`.

use super::password_probe::PROBE_INI;
use crate::config::Mode;
use crate::config::{AUTH_DATABASE_PREFIX, Client, Database, Settings};
use crate::token::AuthToken;
use secrecy::{ExposeSecret, SecretString};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The daemon's own admin-console user. Only it may RELOAD, PAUSE or SHUTDOWN PgBouncer.
pub const ADMIN_USER: &str = "aws_pgbouncer_admin";
/// PgBouncer's `auth_user` in auth-query mode: the only user the auth endpoint admits.
pub const AUTH_USER: &str = "aws_pgbouncer_auth";
/// The query PgBouncer sends the endpoint; the endpoint reads only its parameter.
/// Schema-qualified although only the daemon's endpoint answers it: CVE-2025-12819 lets a
/// client run SQL through an auth_query with unqualified names on PgBouncer before 1.25.1.
const AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1";

/// PgBouncer's wait after a failed server login in auth-query and passthrough modes: long
/// enough not to hammer a server that refuses, short enough that a daemon restart costs
/// logins about a second.
const SERVER_LOGIN_RETRY_SECONDS: &str = "1";

pub const PGBOUNCER_INI: &str = "pgbouncer.ini";
pub const DATABASES_INI: &str = "databases.ini";
pub const USERLIST: &str = "userlist.txt";
pub const HBA: &str = "pg_hba.conf";

const HEADER: &str =
    ";; Written by aws-pgbouncer, which owns this directory and rewrites its files.\n";

/// How PgBouncer speaks TLS to its servers: in config and auth-query modes the configured
/// mode, and the configured CA bundle (plus the endpoint's CA for a TCP endpoint); in
/// passthrough mode PgBouncer talks only to the daemon, `verify-full` against the daemon's
/// own CA, and the relay does the TLS towards RDS.
pub struct ServerTls<'a> {
    pub mode: &'a str,
    pub ca_file: Option<&'a Path>,
}

/// Where PgBouncer's unix socket is: the daemon's own directory, where no other user can
/// listen first, unless `[pgbouncer] unix_socket_dir` says otherwise (then the daemon uses
/// TCP for the admin console).
pub fn pgbouncer_socket_dir(settings: &Settings, dir: &Path) -> Option<PathBuf> {
    (!user_sets(settings, "unix_socket_dir")).then(|| dir.to_owned())
}

/// Whether the user's `[pgbouncer]` table sets `key`: then a default of the daemon's yields.
fn user_sets(settings: &Settings, key: &str) -> bool {
    settings
        .pgbouncer_settings
        .iter()
        .any(|(user_key, _)| user_key == key)
}

pub fn pgbouncer_ini(settings: &Settings, dir: &Path, server_tls: ServerTls<'_>) -> String {
    let mut ini = String::from(HEADER);
    ini.push_str("[pgbouncer]\n");
    let mut set = |key: &str, value: &str| {
        let _ = writeln!(ini, "{key} = {value}");
    };
    set("listen_addr", &settings.listen.ip().to_string());
    set("listen_port", &settings.listen.port().to_string());
    set("auth_type", "hba");
    set("auth_hba_file", &dir.join(HBA).display().to_string());
    set("auth_file", &dir.join(USERLIST).display().to_string());
    set("admin_users", ADMIN_USER);
    if let Some(socket_dir) = pgbouncer_socket_dir(settings, dir) {
        set("unix_socket_dir", &socket_dir.display().to_string());
    }
    set("server_tls_sslmode", server_tls.mode);
    if let Some(ca_file) = server_tls.ca_file {
        set("server_tls_ca_file", &ca_file.display().to_string());
    }
    if settings.mode.mode().uses_auth_query() {
        set("auth_user", AUTH_USER);
        set("auth_query", AUTH_QUERY);
        // Here the daemon is on PgBouncer's login path. PgBouncer remembers a failed server
        // login for server_login_retry (15 s by default) and turns the pool's new clients away
        // meanwhile, so a daemon restart of about a second would stall logins for 15 s.
        if !user_sets(settings, "server_login_retry") {
            set("server_login_retry", SERVER_LOGIN_RETRY_SECONDS);
        }
    }
    // JDBC and many drivers send extra_float_digits; without this PgBouncer refuses them.
    if !user_sets(settings, "ignore_startup_parameters") {
        set("ignore_startup_parameters", "extra_float_digits");
    }
    for (key, value) in &settings.pgbouncer_settings {
        set(key, value);
    }
    // %include paths resolve against PgBouncer's working directory, so it must be absolute.
    let _ = writeln!(ini, "%include {}", dir.join(DATABASES_INI).display());
    ini
}

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

/// The admin user with a SCRAM verifier of its secret, in auth-query mode the auth user with
/// its secret in plain text (PgBouncer needs it to log in to the endpoint), and the
/// applications' users. Plaintext client passwords are stored as SCRAM verifiers.
pub fn userlist(
    admin_secret: &SecretString,
    auth_secret: Option<&SecretString>,
    clients: &[Client],
) -> SecretString {
    let mut list = String::new();
    let mut add = |user: &str, secret: &str| {
        let _ = writeln!(list, "{} {}", quote_userlist(user), quote_userlist(secret));
    };
    add(ADMIN_USER, &scram_verifier(admin_secret));
    if let Some(auth_secret) = auth_secret {
        add(AUTH_USER, auth_secret.expose_secret());
    }
    for client in clients {
        match &client.password {
            Some(password) => add(&client.user, &scram_verifier(password)),
            None => add(&client.user, ""),
        }
    }
    SecretString::from(list)
}

/// Who may log in, and how. Clients without a password may come from loopback only; the
/// admin console admits the daemon's user only; everything else is rejected. In auth-query
/// mode any user may try from loopback: the endpoint's allow-list decides who exists.
pub fn hba(mode: Mode, databases: &[Database], clients: &[Client]) -> String {
    let mut rules =
        String::from("# Written by aws-pgbouncer. Anything not allowed here is refused.\n");
    let mut allow = |database: &str, user: &str, method: &str, remote: bool| {
        let user = quote_userlist(user);
        let _ = writeln!(rules, "local {database} {user} {method}");
        let (v4, v6) = if remote {
            ("0.0.0.0/0", "::/0")
        } else {
            ("127.0.0.1/32", "::1/128")
        };
        let _ = writeln!(rules, "host {database} {user} {v4} {method}");
        let _ = writeln!(rules, "host {database} {user} {v6} {method}");
    };
    allow(
        &quote_userlist("pgbouncer"),
        ADMIN_USER,
        "scram-sha-256",
        false,
    );
    // Quoted, a name is only ever a name: unquoted, `all` or `sameuser` would be a keyword.
    let names: Vec<String> = databases
        .iter()
        .map(|db| quote_userlist(&db.name))
        .collect();
    let names = names.join(",");
    for client in clients {
        match client.password {
            Some(_) => allow(&names, &client.user, "scram-sha-256", true),
            None => allow(&names, &client.user, "trust", false),
        }
    }
    if mode.uses_auth_query() {
        let _ = writeln!(rules, "local {names} all trust");
        let _ = writeln!(rules, "host {names} all 127.0.0.1/32 trust");
        let _ = writeln!(rules, "host {names} all ::1/128 trust");
    }
    rules
}

fn scram_verifier(secret: &SecretString) -> String {
    let given = secret.expose_secret();
    if given.starts_with("SCRAM-SHA-256$") {
        given.to_owned()
    } else {
        postgres_protocol::password::scram_sha_256(given.as_bytes())
    }
}

/// PgBouncer's connection-string quoting: single quotes, doubled inside.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The userlist's and hba file's quoting: double quotes, doubled inside. PgBouncer's hba
/// parser takes a quoted word as a plain name, never as a keyword.
fn quote_userlist(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::ModeSettings;
    use crate::token::{TokenKey, TokenKind};
    use std::time::SystemTime;

    pub(crate) fn database(name: &str, user: &str) -> Database {
        Database {
            name: name.into(),
            dbname: format!("{name}_db"),
            target: TokenKey {
                kind: TokenKind::Rds,
                host: "db.example.internal".into(),
                port: 5432,
                user: user.into(),
                region: "eu-west-1".into(),
                role: None,
            },
            dial: None,
            allowed_users: vec![user.into()],
            options: vec![("pool_mode".into(), "transaction".into())],
        }
    }

    fn settings(mode: Mode, pgbouncer_settings: &[(&str, &str)]) -> Settings {
        let (auth_listen, relay_listen) = (
            crate::config::LocalListen::Unix { port: 6433 },
            crate::config::LocalListen::Unix { port: 6434 },
        );
        Settings {
            mode: match mode {
                Mode::Config => ModeSettings::Config,
                Mode::AuthQuery => ModeSettings::AuthQuery { auth_listen },
                Mode::Passthrough => {
                    ModeSettings::Passthrough(crate::config::PassthroughSettings {
                        auth_listen,
                        relay_listen,
                        rds_ca_file: "/etc/rds-ca.pem".into(),
                        relay_max_connections: None,
                        relay_login_rate: None,
                        relay_follow_pgbouncer_cpu: false,
                    })
                }
            },
            pgbouncer_dir: "/run/aws-pgbouncer".into(),
            listen: "127.0.0.1:6432".parse().unwrap(),
            token_lifetime: std::time::Duration::from_secs(900),
            server_tls_mode: crate::config::TlsMode::VerifyFull,
            server_ca_file: None,
            databases: vec![database("app", "app_user")],
            clients: Vec::new(),
            pgbouncer_settings: pgbouncer_settings
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            lifecycle: crate::config::Lifecycle {
                http_listen: "127.0.0.1:9090".into(),
                supervise: None,
                min_shutdown_delay: std::time::Duration::ZERO,
                max_shutdown_delay: std::time::Duration::from_secs(30),
                exit_zero_on_sigterm: false,
                quitquitquit: false,
            },
        }
    }

    /// Passthrough mode with these entries and `[pgbouncer]` settings.
    pub(crate) fn settings_with(databases: Vec<Database>, pgbouncer: &[(&str, &str)]) -> Settings {
        Settings {
            databases,
            ..settings(Mode::Passthrough, pgbouncer)
        }
    }

    fn rendered_ini(settings: &Settings) -> String {
        let tls = ServerTls {
            mode: "verify-full",
            ca_file: None,
        };
        pgbouncer_ini(settings, Path::new("/run/aws-pgbouncer"), tls)
    }

    #[test]
    fn a_failed_login_through_the_daemon_is_retried_after_one_second_unless_the_user_says() {
        for mode in [Mode::AuthQuery, Mode::Passthrough] {
            let ini = rendered_ini(&settings(mode, &[]));
            assert_eq!(ini.matches("server_login_retry").count(), 1, "{ini}");
            assert!(ini.contains("\nserver_login_retry = 1\n"), "{ini}");
            let ini = rendered_ini(&settings(mode, &[("server_login_retry", "5")]));
            assert_eq!(ini.matches("server_login_retry").count(), 1, "{ini}");
            assert!(ini.contains("\nserver_login_retry = 5\n"), "{ini}");
        }
        // In config mode the daemon is not on the login path: PgBouncer's default stands.
        let ini = rendered_ini(&settings(Mode::Config, &[]));
        assert!(!ini.contains("server_login_retry"), "{ini}");
    }

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
    fn hba_admits_passwordless_clients_from_loopback_only() {
        let clients = [
            Client {
                user: "app".into(),
                password: None,
            },
            Client {
                user: "remote".into(),
                password: Some(SecretString::from("pw")),
            },
        ];
        let rules = hba(
            Mode::Config,
            &[database("a", "app"), database("b", "app")],
            &clients,
        );
        assert!(rules.contains("host \"a\",\"b\" \"app\" 127.0.0.1/32 trust\n"));
        assert!(!rules.contains("\"app\" 0.0.0.0/0"));
        assert!(rules.contains("host \"a\",\"b\" \"remote\" 0.0.0.0/0 scram-sha-256\n"));
        assert!(
            rules.contains(
                "host \"pgbouncer\" \"aws_pgbouncer_admin\" 127.0.0.1/32 scram-sha-256\n"
            )
        );
        assert!(!rules.contains("any"));
    }

    #[test]
    fn hba_quotes_every_database_name_so_none_is_a_keyword() {
        for mode in [Mode::Config, Mode::AuthQuery] {
            let rules = hba(mode, &[database("all", "app")], &[]);
            for line in rules.lines().filter(|line| !line.starts_with('#')) {
                let database = line.split_whitespace().nth(1).unwrap();
                assert!(database.starts_with('"'), "unquoted in {line:?}");
            }
        }
    }

    #[test]
    fn userlist_holds_no_plaintext_password() {
        let clients = [Client {
            user: "app".into(),
            password: Some(SecretString::from("hunter2")),
        }];
        let list = userlist(&SecretString::from("admin-secret"), None, &clients);
        let text = list.expose_secret();
        assert!(!text.contains("hunter2") && !text.contains("admin-secret"));
        assert_eq!(text.matches("SCRAM-SHA-256$4096:").count(), 2);
    }
}
