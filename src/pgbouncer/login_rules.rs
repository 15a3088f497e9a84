//! `userlist.txt` and `pg_hba.conf`: who may log in to PgBouncer, and how. Apart from the
//! settings because they hold the secrets (as SCRAM verifiers) and decide what is refused.

use super::render::ADMIN_USER;
use crate::config::{Client, Database, Mode};
use secrecy::{ExposeSecret, SecretString};
use std::fmt::Write;

/// A user PgBouncer logs in to the daemon as, with its secret in plain text: PgBouncer starts
/// that SCRAM exchange itself, so a verifier would not do.
pub struct PlainLogin<'a> {
    pub user: &'a str,
    pub secret: &'a SecretString,
}

/// The admin user with a SCRAM verifier of its secret, the users PgBouncer logs in to the
/// daemon as (auth-query mode's auth user, passthrough mode's allowed users) with their
/// secrets, and the applications' users. Client passwords are stored as SCRAM verifiers.
pub fn userlist(
    admin_secret: &SecretString,
    plain_logins: &[PlainLogin<'_>],
    clients: &[Client],
) -> SecretString {
    let mut list = String::new();
    let mut add = |user: &str, secret: &str| {
        let _ = writeln!(list, "{} {}", quote_userlist(user), quote_userlist(secret));
    };
    add(ADMIN_USER, &scram_verifier(admin_secret));
    for login in plain_logins {
        add(login.user, login.secret.expose_secret());
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
/// mode any user may try from loopback: the endpoint's allow-list decides who exists. In
/// passthrough mode each entry admits its allowed users from loopback.
pub fn hba(mode: Mode, databases: &[Database], clients: &[Client]) -> String {
    let mut rules =
        String::from("# Written by aws-pgbouncer. Anything not allowed here is refused.\n");
    // `users` is already quoted: one name, or several joined by commas.
    let mut allow = |database: &str, users: &str, method: &str, remote: bool| {
        let _ = writeln!(rules, "local {database} {users} {method}");
        let (v4, v6) = if remote {
            ("0.0.0.0/0", "::/0")
        } else {
            ("127.0.0.1/32", "::1/128")
        };
        let _ = writeln!(rules, "host {database} {users} {v4} {method}");
        let _ = writeln!(rules, "host {database} {users} {v6} {method}");
    };
    allow(
        &quote_userlist("pgbouncer"),
        &quote_userlist(ADMIN_USER),
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
        let user = quote_userlist(&client.user);
        match client.password {
            Some(_) => allow(&names, &user, "scram-sha-256", true),
            None => allow(&names, &user, "trust", false),
        }
    }
    match mode {
        Mode::Config => {}
        Mode::AuthQuery => allow(&names, "all", "trust", false),
        Mode::Passthrough => {
            for db in databases {
                let users: Vec<String> =
                    db.allowed_users.iter().map(|u| quote_userlist(u)).collect();
                allow(&quote_userlist(&db.name), &users.join(","), "trust", false);
            }
        }
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
        for mode in [Mode::Config, Mode::AuthQuery, Mode::Passthrough] {
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
        let list = userlist(&SecretString::from("admin-secret"), &[], &clients);
        let text = list.expose_secret();
        assert!(!text.contains("hunter2") && !text.contains("admin-secret"));
        assert_eq!(text.matches("SCRAM-SHA-256$4096:").count(), 2);
    }

    #[test]
    fn passthrough_admits_each_entrys_allowed_users_from_loopback_only() {
        let mut reports = database("reports", "reporter");
        reports.allowed_users.push("o\"brien".into());
        let rules = hba(
            Mode::Passthrough,
            &[database("app", "app_user"), reports],
            &[],
        );
        assert!(
            rules.contains("local \"app\" \"app_user\" trust\n"),
            "{rules}"
        );
        assert!(
            rules.contains("host \"reports\" \"reporter\",\"o\"\"brien\" 127.0.0.1/32 trust\n"),
            "{rules}"
        );
        assert!(
            !rules.contains(" all ") && !rules.contains("0.0.0.0/0"),
            "{rules}"
        );
    }

    #[test]
    fn plain_logins_keep_their_secret_as_given() {
        let secret = SecretString::from("relay-secret");
        let login = PlainLogin {
            user: "app_user",
            secret: &secret,
        };
        let list = userlist(&SecretString::from("admin-secret"), &[login], &[]);
        assert!(
            list.expose_secret()
                .contains("\"app_user\" \"relay-secret\"\n")
        );
    }
}
