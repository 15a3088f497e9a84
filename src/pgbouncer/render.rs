//! `pgbouncer.ini`, and the names the daemon's files and users share. The text of each file
//! PgBouncer reads is a pure function of the settings and tokens, so that what PgBouncer sees
//! can be tested without running it; `databases.ini` is rendered by
//! [`super::databases_ini`], `userlist.txt` and `pg_hba.conf` by [`super::login_rules`].
//!
//! `pgbouncer.ini` holds the settings and `%include`s `databases.ini`, the only file that
//! changes at each token refresh. Users who keep their own pgbouncer.ini `%include` the same
//! `databases.ini`.

use crate::config::Settings;
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

pub(super) const HEADER: &str =
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
    let mode = settings.mode.mode();
    if mode.uses_auth_query() {
        set("auth_user", AUTH_USER);
        set("auth_query", AUTH_QUERY);
    }
    // PgBouncer remembers a failed server login for server_login_retry (15 s by default) and
    // turns the pool's new clients away meanwhile, so a daemon restart of about a second
    // would stall logins for 15 s.
    if mode.server_logins_need_the_daemon() && !user_sets(settings, "server_login_retry") {
        set("server_login_retry", SERVER_LOGIN_RETRY_SECONDS);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{Database, Mode, ModeSettings};
    use crate::token::{TokenKey, TokenKind};

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
        Settings {
            mode: match mode {
                Mode::Config => ModeSettings::Config,
                Mode::AuthQuery => ModeSettings::AuthQuery {
                    auth_listen: crate::config::LocalListen::Unix { port: 6433 },
                },
                Mode::Passthrough => {
                    ModeSettings::Passthrough(crate::config::PassthroughSettings {
                        relay_listen: crate::config::LocalListen::Unix { port: 6434 },
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
    fn only_auth_query_mode_sends_pgbouncer_to_the_auth_endpoint() {
        let ini = rendered_ini(&settings(Mode::AuthQuery, &[]));
        assert!(
            ini.contains(&format!("\nauth_user = {AUTH_USER}\n")),
            "{ini}"
        );
        assert!(
            ini.contains(&format!("\nauth_query = {AUTH_QUERY}\n")),
            "{ini}"
        );
        for mode in [Mode::Config, Mode::Passthrough] {
            let ini = rendered_ini(&settings(mode, &[]));
            assert!(
                !ini.contains("auth_user") && !ini.contains("auth_query"),
                "{ini}"
            );
        }
    }
}
