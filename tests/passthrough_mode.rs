//! Passthrough mode end to end: PgBouncer's server connections go through the daemon's relay,
//! which logs each in to the RDS stand-in with a token minted for it. PgBouncer holds no token.

mod support;

use aws_pgbouncer::token::MAX_TOKEN_BYTES;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::client::{KillGate, Tally, connect, describe, scalar};
use support::daemon::{Daemon, PASSTHROUGH_SETTINGS, database_flags};
use support::{Creds, Standin, free_port, test_dir};

fn start(standin: &Standin, work: &std::path::Path, listen_port: u16) -> Daemon {
    Daemon::start_supervised(work, standin, listen_port, PASSTHROUGH_SETTINGS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_token_lifetimes_of_new_and_long_lived_clients_for_two_users() {
    let standin = Arc::new(Standin::start());
    let work = test_dir("passthrough");
    let listen_port = free_port();
    let daemon = start(&standin, work.path(), listen_port);
    for file in [
        "databases.ini",
        "userlist.txt",
        "pg_hba.conf",
        "pgbouncer.ini",
    ] {
        let text = std::fs::read_to_string(daemon.pgbouncer_dir.join(file)).unwrap();
        assert!(!text.contains("X-Amz-Signature"), "a token is in {file}");
    }
    // PgBouncer logs in to the relay as each allowed user with the relay's secret.
    let secret = std::fs::read_to_string(daemon.pgbouncer_dir.join("relay-secret")).unwrap();
    let userlist = std::fs::read_to_string(daemon.pgbouncer_dir.join("userlist.txt")).unwrap();
    for user in ["app_user", "reporter"] {
        let line = format!("\"{user}\" \"{}\"\n", secret.trim());
        assert!(userlist.contains(&line), "{user} is not in userlist.txt");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let gate = Arc::new(KillGate::default());
    let mut tasks = Vec::new();
    for user in ["app_user", "reporter"] {
        let (stop, tally, gate) = (stop.clone(), tally.clone(), gate.clone());
        let long_lived = connect(listen_port, user, "appdb").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let pass = gate.pass().await;
                let fresh = async {
                    let client = connect(listen_port, user, "appdb").await?;
                    let current = scalar(&client, "SELECT current_user").await?;
                    (current == user).then_some(()).ok_or(current)
                };
                tally.record(fresh.await);
                if round % 5 == 0 {
                    tally.record(scalar(&long_lived, "SELECT 1").await.map(drop));
                }
                drop(pass);
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        }));
    }
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(64) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        kills += gate
            .kill_idle_backends(&standin, &["app_user", "reporter"])
            .await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    tally.assert_no_failures(&daemon.log());
    assert!(
        tally.ok() > 150 && kills >= 10,
        "{} queries, {kills} kills",
        tally.ok()
    );
    let logins = standin.verifier_log();
    for user in ["app_user", "reporter"] {
        let accepted = logins
            .iter()
            .filter(|entry| entry["user"] == user && entry["accepted"] == true)
            .count();
        assert!(accepted >= 5, "{user}: {accepted} server logins");
    }
    assert!(logins.iter().all(|entry| entry["accepted"] == true));
}

/// PgBouncer finds the allowed users in its own files: a client logs in while the daemon is
/// stopped (SIGSTOP), to a pool that has a server connection already. Only new server
/// connections need the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_while_the_daemon_is_stopped() {
    let standin = Standin::start();
    let work = test_dir("passthrough-stopped");
    let listen_port = free_port();
    let daemon = start(&standin, work.path(), listen_port);
    let first = connect(listen_port, "app_user", "appdb").await.unwrap();
    assert_eq!(
        scalar(&first, "SELECT current_user").await.unwrap(),
        "app_user"
    );
    drop(first);
    assert!(
        !daemon.pgbouncer_dir.join(".s.PGSQL.6433").exists(),
        "an auth endpoint listens in passthrough mode"
    );

    daemon.signal(libc::SIGSTOP);
    let login = tokio::time::timeout(
        Duration::from_secs(10),
        connect(listen_port, "app_user", "appdb"),
    )
    .await;
    daemon.signal(libc::SIGCONT);
    let client = login
        .expect("the login waited for the stopped daemon")
        .unwrap();
    assert_eq!(
        scalar(&client, "SELECT current_user").await.unwrap(),
        "app_user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_query_is_cancelled_on_the_server() {
    let standin = Standin::start();
    let work = test_dir("passthrough-cancel");
    let listen_port = free_port();
    let _daemon = start(&standin, work.path(), listen_port);
    let client = connect(listen_port, "app_user", "appdb").await.unwrap();
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let started = Instant::now();
        let outcome = client.simple_query("SELECT pg_sleep(30)").await;
        (
            outcome.map(drop).map_err(|error| describe(&error)),
            started.elapsed(),
        )
    });
    assert!(
        standin.wait_for_active_query("app_user", "SELECT pg_sleep(30)", Duration::from_secs(10)),
        "the query never ran on the stand-in"
    );
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel through PgBouncer");
    let (outcome, took) = sleeping.await.unwrap();
    let error = outcome.expect_err("the query was cancelled");
    assert!(
        error.contains("canceling statement due to user request"),
        "{error}"
    );
    assert!(
        took < Duration::from_secs(10),
        "cancelled only after {took:?}"
    );
}

/// PgBouncer finds every allowed user in its own files at scale: with 1,002 users on one
/// entry, the first and the last on the list both log in (the entry's `pg_hba.conf` rule is
/// one line of about 17 KB, which PgBouncer must read whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_and_the_last_of_a_thousand_allowed_users_log_in() {
    let standin = Standin::start();
    let work = test_dir("passthrough-many-users");
    let listen_port = free_port();
    let bulk = (0..1000).map(|i| format!("\"bulk_user_{i:04}\""));
    let users: Vec<String> = std::iter::once("\"reporter\"".to_owned())
        .chain(bulk)
        .chain(std::iter::once("\"app_user\"".to_owned()))
        .collect();
    let settings = format!(
        "mode = \"passthrough\"\n\n[[databases]]\nname = \"appdb\"\nhost = \"localhost\"\n\
         port = {{standin_port}}\ndbname = \"appdb\"\nusers = [{}]\n",
        users.join(", ")
    );
    let _daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    for user in ["reporter", "app_user"] {
        let client = connect(listen_port, user, "appdb").await.unwrap();
        assert_eq!(scalar(&client, "SELECT current_user").await.unwrap(), user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_off_the_allow_list_are_refused() {
    let standin = Standin::start();
    let work = test_dir("passthrough-refusals");
    let listen_port = free_port();
    let _daemon = start(&standin, work.path(), listen_port);
    for user in ["second_user", "password_user"] {
        let refused = match connect(listen_port, user, "appdb").await {
            Ok(client) => scalar(&client, "SELECT 1").await.unwrap_err(),
            Err(error) => error,
        };
        // PgBouncer's own refusal: no pg_hba.conf rule admits a user off the list.
        assert!(
            refused.contains("no authentication method is found"),
            "{user}: {refused}"
        );
    }
}

/// A long session token (role chaining, a large session policy, many session tags) makes
/// tokens longer than PgBouncer's 2047-byte password limit. Config and auth-query modes must
/// refuse them (and say so); the relay hands tokens to RDS itself, so passthrough mode serves
/// those users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_over_pgbouncers_limit_log_in_through_the_relay_and_nowhere_else() {
    let standin = Standin::start();
    let creds = Creds::new(
        "ASIALONGSESSION00001",
        "long-session-secret",
        Some(&format!("long-session-token-{}", "L".repeat(1800))),
    );
    standin.set_key_entry(
        &creds.akid,
        serde_json::json!({"secret": creds.secret, "session_token": creds.session_token}),
    );

    let work = test_dir("passthrough-long-token");
    let listen_port = free_port();
    let daemon = Daemon::start_supervised_with(
        work.path(),
        &standin,
        &creds,
        listen_port,
        PASSTHROUGH_SETTINGS,
    );
    let client = connect(listen_port, "app_user", "appdb").await.unwrap();
    assert_eq!(
        scalar(&client, "SELECT current_user").await,
        Ok("app_user".to_owned()),
        "{}",
        daemon.log()
    );
    let login = standin
        .verifier_log()
        .into_iter()
        .find(|entry| entry["akid"] == creds.akid.as_str())
        .expect("the relay's login reached the verifier");
    assert_eq!(login["accepted"], true, "{login}");
    let length = login["length"].as_u64().unwrap();
    assert!(
        length > MAX_TOKEN_BYTES as u64,
        "the token was {length} bytes"
    );

    // Auth-query mode with the same credentials: the endpoint has no token to hand
    // PgBouncer, the daemon never gets ready, and the log says why and where to go.
    let work = test_dir("auth-query-long-token");
    let mut auth_query = Daemon::spawn_supervised_with(
        work.path(),
        &standin,
        &creds,
        free_port(),
        &PASSTHROUGH_SETTINGS.replace(r#"mode = "passthrough""#, r#"mode = "auth-query""#),
    );
    refuses_over_the_limit(&mut auth_query);
    drop(auth_query);

    // Config mode with the same credentials: no token for PgBouncer, and a log line that
    // says why and where to go.
    let work = test_dir("config-long-token");
    let mut config_mode = Daemon::start(
        work.path(),
        &creds,
        &database_flags(&standin, free_port(), 20)
            .iter()
            .map(String::as_str)
            .chain(["--supervise"])
            .collect::<Vec<_>>(),
    );
    refuses_over_the_limit(&mut config_mode);
    let presented = standin
        .verifier_log()
        .iter()
        .filter(|entry| entry["akid"] == creds.akid.as_str())
        .count();
    assert_eq!(
        presented, 1,
        "only the relay's login may reach the stand-in"
    );
}

/// A daemon that must give PgBouncer a token over its limit: it says so, points to
/// passthrough mode, leaks no part of the credentials and does not get ready.
fn refuses_over_the_limit(daemon: &mut Daemon) {
    daemon.wait_for_log(
        "over PgBouncer's 2047-byte password limit",
        Duration::from_secs(20),
    );
    let log = daemon.log();
    assert!(log.contains("passthrough mode"), "{log}");
    assert!(
        !log.contains("LLLLLLLL") && !log.contains("long-session-secret"),
        "{log}"
    );
    assert_ne!(
        daemon.http_get("/readyz").map(|(status, _)| status),
        Some(200)
    );
}

/// `PASSTHROUGH_SETTINGS` with pools of one server connection: two users, so the relay's
/// limit derived from PgBouncer's pool sizes is 2, a quarter more (0) and 8 for cancels and
/// closing connections.
fn pools_of_one() -> String {
    format!("{PASSTHROUGH_SETTINGS}options = {{ pool_size = 1 }}\n")
}

/// The relay admits as many logged-in connections as the daemon derived from the pools it
/// configured PgBouncer with (10 here, where a fixed limit was 512), and refuses the next one
/// with PostgreSQL's "too many clients".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_admits_what_pgbouncers_pools_can_open_and_refuses_more() {
    let standin = Standin::start();
    let work = test_dir("passthrough-relay-derived");
    let daemon = Daemon::start_supervised(work.path(), &standin, free_port(), &pools_of_one());
    assert_eq!(relay_sessions_until_refused(&daemon, 600).await, 10);
}

/// `relay_max_connections` overrides the derived limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_max_connections_overrides_the_derived_limit() {
    let standin = Standin::start();
    let work = test_dir("passthrough-relay-override");
    let settings = format!("relay_max_connections = 12\n{}", pools_of_one());
    let daemon = Daemon::start_supervised(work.path(), &standin, free_port(), &settings);
    assert_eq!(relay_sessions_until_refused(&daemon, 600).await, 12);
}

/// Logs in to the relay directly, as PgBouncer does, keeping every session open, until a
/// login is refused "too many clients"; returns how many got in. Any other error fails.
async fn relay_sessions_until_refused(daemon: &Daemon, at_most: usize) -> usize {
    let secret = std::fs::read_to_string(daemon.pgbouncer_dir.join("relay-secret")).unwrap();
    let mut sessions = Vec::new();
    while sessions.len() < at_most {
        let login = tokio_postgres::Config::new()
            .host_path(&daemon.pgbouncer_dir)
            .port(6434)
            .user("app_user")
            .password(secret.trim())
            .dbname("appdb")
            .connect_timeout(Duration::from_secs(10))
            .connect(tokio_postgres::NoTls)
            .await;
        match login {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                assert_eq!(
                    scalar(&client, "SELECT current_user").await.unwrap(),
                    "app_user"
                );
                sessions.push(client);
            }
            Err(error) => {
                let error = describe(&error);
                assert!(error.contains("too many clients"), "{error}");
                return sessions.len();
            }
        }
    }
    panic!("the relay admitted {at_most} sessions");
}
