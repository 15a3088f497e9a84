//! What the daemon does with each key's token events and health, seen from outside: the
//! logins auth-query mode makes to push refreshed tokens into PgBouncer's pools, and the token
//! and credential series of `/metrics`, on the stand-in with a real PgBouncer.

mod support;

use std::time::Duration;
use support::credentials_server::CredentialServer;
use support::daemon::Daemon;
use support::{Standin, free_port, test_dir, wait_until, write_file};
use tempfile::TempDir;

const USERS: [&str; 3] = ["app_user", "reporter", "second_user"];

/// A daemon in `mode` serving `USERS` on one database entry, signing with keys that expire
/// (from a container-credentials endpoint), on the stand-in. Fields drop in order: the daemon
/// stops before what it uses.
struct Bed {
    daemon: Daemon,
    /// Where its PgBouncer listens.
    listen_port: u16,
    _work: TempDir,
    _server: CredentialServer,
    _standin: Standin,
}

impl Bed {
    fn start(mode: &str) -> Bed {
        let standin = Standin::start();
        let server = CredentialServer::start(
            &standin,
            Duration::from_secs(30),
            Duration::from_secs(120),
            10,
        );
        let work = test_dir(mode);
        let listen_port = free_port();
        let users = USERS.map(|user| format!("\"{user}\"")).join(", ");
        let config = work.path().join("aws-pgbouncer.toml");
        let text = format!(
            r#"listen = "127.0.0.1:{listen_port}"
server_ca_file = "{ca}"
region = "{region}"
mode = "{mode}"
token_lifetime = 10

[[databases]]
name = "appdb"
host = "localhost"
port = {port}
dbname = "appdb"
users = [{users}]
"#,
            ca = standin.ca_path().display(),
            region = standin.region(),
            port = standin.port(),
        );
        write_file(&config, &text, 0o644);
        let mut daemon = Daemon::start_with_env(
            work.path(),
            None,
            &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &server.uri())],
            &["--supervise", "--config", config.to_str().unwrap()],
        );
        daemon.wait_until_started();
        Bed {
            daemon,
            listen_port,
            _work: work,
            _server: server,
            _standin: standin,
        }
    }
}

fn token_series(user: &str) -> String {
    format!("database=\"appdb\",user=\"{user}\",host=\"localhost\"")
}

/// Tokens minted so far for all of `USERS`, from `/metrics`.
fn refreshes(daemon: &Daemon) -> f64 {
    USERS
        .iter()
        .map(|user| {
            let series = format!(
                "aws_pgbouncer_token_refreshes_total{{{}}}",
                token_series(user)
            );
            daemon.metric(&series).unwrap_or(0.0)
        })
        .sum()
}

/// auth_query answers with a token: one per login to PgBouncer as an IAM user, whether an
/// application's or the pool refresher's.
fn token_answers(daemon: &Daemon) -> f64 {
    daemon
        .metric("aws_pgbouncer_auth_query_requests_total{result=\"token\"}")
        .expect("the auth_query counter")
}

/// Each user's refreshed token is pushed into that user's pool alone: a refresh of one key
/// costs one login to PgBouncer, not one per pool (which made U users cost U² logins per
/// token lifetime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_is_pushed_into_its_own_users_pool_only() {
    let bed = Bed::start("auth-query");
    let (daemon, listen_port) = (&bed.daemon, bed.listen_port);
    // One pool per user: the refresher only touches pools PgBouncer has.
    for user in USERS {
        let client = support::client::connect(listen_port, user, "appdb")
            .await
            .unwrap_or_else(|error| panic!("{user} logs in: {error}\n{}", daemon.log()));
        drop(client);
    }

    let (refreshes_before, answers_before) = (refreshes(daemon), token_answers(daemon));
    let wanted = refreshes_before + 2.0 * USERS.len() as f64;
    assert!(
        wait_until(Duration::from_secs(40), || refreshes(daemon) >= wanted),
        "the tokens were not refreshed twice each:\n{}",
        daemon.log()
    );
    // Let the pass for the last refresh finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refreshed = refreshes(daemon) - refreshes_before;
    let logins = token_answers(daemon) - answers_before;
    assert!(logins >= 1.0, "no refresh reached PgBouncer's pools");
    // At most one login per refreshed key, plus one pass that a refresh from before the
    // window may have started late.
    assert!(
        logins <= refreshed + USERS.len() as f64,
        "{logins} logins to PgBouncer for {refreshed} refreshed tokens of {} users",
        USERS.len()
    );
}

/// Passthrough mode, credentials that expire: the credential expiry gauge shows when they
/// do, and every allowed user's token series carries the entry's name.
#[test]
fn passthrough_metrics_carry_the_credential_expiry_and_each_users_database() {
    let daemon = &Bed::start("passthrough").daemon;
    let now = support::now_epoch() as f64;
    let expiry = daemon
        .metric("aws_pgbouncer_credentials_expiry_timestamp_seconds")
        .expect("the credential expiry gauge");
    assert!(
        (now..now + 130.0).contains(&expiry),
        "credentials expire at {expiry}, now is {now}"
    );
    let (_, text) = daemon.http_get("/metrics").expect("/metrics answers");
    for user in USERS {
        let series = format!(
            "aws_pgbouncer_token_refreshes_total{{{}}}",
            token_series(user)
        );
        assert!(text.contains(&series), "no {series} in:\n{text}");
    }
    assert!(
        !text.contains("database=\"\""),
        "a series without its database:\n{text}"
    );
}
