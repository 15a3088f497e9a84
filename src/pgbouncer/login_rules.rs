//! `userlist.txt` and `pg_hba.conf`: who may log in to PgBouncer, and how. Apart from the
//! settings because they hold the secrets (as SCRAM verifiers) and decide what is refused.

use super::render::{ADMIN_USER, AUTH_USER};
use crate::config::{Client, Database, Mode};
use secrecy::{ExposeSecret, SecretString};
use std::fmt::Write;

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

/// The userlist's and hba file's quoting: double quotes, doubled inside. PgBouncer's hba
/// parser takes a quoted word as a plain name, never as a keyword.
fn quote_userlist(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgbouncer::render::tests::database;

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
