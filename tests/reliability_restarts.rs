//! PgBouncer or the database going away under the daemon, in config mode on the stand-in with
//! short tokens: PgBouncer killed and restarted beside the daemon, a supervised PgBouncer
//! dying, the database restarting. Tokens go on expiring meanwhile, so once either is back,
//! logins must go through on current tokens; a supervised PgBouncer's death ends the daemon
//! instead, for whatever supervises the daemon to restart both.

mod support;

use std::time::{Duration, Instant};
use support::client::{connect, fresh_login_query, scalar};
use support::daemon::Daemon;
use support::faults::{args, as_strs, start_supervised};
use support::{PgBouncer, Standin, free_port, test_dir, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_killed_and_restarted_beside_the_daemon() {
    let standin = Standin::start();
    let work = test_dir("pgbouncer-restart");
    let listen_port = free_port();
    let mut daemon = Daemon::start(
        work.path(),
        &standin.static_creds(),
        &as_strs(&args(&standin, work.path(), listen_port, 10, &[])),
    );
    daemon.wait_for_log("wrote PgBouncer's files", Duration::from_secs(30));
    let ini = daemon.pgbouncer_dir.join("pgbouncer.ini");
    let mut pgbouncer = PgBouncer::start(&ini);
    daemon.wait_until_started();
    fresh_login_query(&standin, listen_port).await.unwrap();

    pgbouncer.signal(libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(5), || !pgbouncer.is_running()));
    // The daemon notices, says so, and keeps refreshing the files meanwhile.
    assert!(
        wait_until(Duration::from_secs(25), || {
            daemon
                .http_get("/readyz")
                .is_some_and(|(status, _)| status == 503)
        }),
        "readiness did not notice PgBouncer was gone"
    );
    let before = daemon.token_in_use();
    assert!(wait_until(Duration::from_secs(15), || daemon
        .token_in_use()
        != before));

    pgbouncer.restart();
    let reloads = daemon.count_in_log("PgBouncer reloaded");
    assert!(
        wait_until(Duration::from_secs(20), || {
            daemon.count_in_log("PgBouncer reloaded") > reloads
                && daemon
                    .http_get("/readyz")
                    .is_some_and(|(status, _)| status == 200)
        }),
        "the daemon did not reconnect to the restarted PgBouncer:\n{}",
        daemon.log()
    );
    // Over more than a token lifetime after the restart, logins use current tokens.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        fresh_login_query(&standin, listen_port)
            .await
            .expect("login after the restart");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        standin
            .verifier_log()
            .iter()
            .all(|entry| entry["accepted"] == true)
    );
}

#[test]
fn a_supervised_pgbouncer_that_dies_ends_the_daemon_with_exit_code_3() {
    let standin = Standin::start();
    let work = test_dir("supervised-death");
    let mut daemon = Daemon::start(
        work.path(),
        &standin.static_creds(),
        &as_strs(&args(
            &standin,
            work.path(),
            free_port(),
            60,
            &["--supervise"],
        )),
    );
    daemon.wait_for_log("started PgBouncer", Duration::from_secs(30));
    let log = daemon.log();
    let pid: i32 = log
        .split("started PgBouncer pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("the daemon logs PgBouncer's pid");
    // SAFETY: kill(2) on a pid we just read; at worst ESRCH.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits");
    assert_eq!(status.code(), Some(3), "{}", daemon.log());
    assert!(daemon.log().contains("PgBouncer exited"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarts_and_fresh_logins_succeed() {
    let mut standin = Standin::start();
    let work = test_dir("failover");
    let listen_port = free_port();
    let daemon = start_supervised(
        &standin,
        work.path(),
        listen_port,
        20,
        Some(&standin.static_creds()),
        &[],
        &[],
    );
    fresh_login_query(&standin, listen_port).await.unwrap();
    standin.restart();
    // PgBouncer's old server connections died with the server; new logins use a current token.
    let started = Instant::now();
    let mut failures = Vec::new();
    while started.elapsed() < Duration::from_secs(25) {
        let client = connect(listen_port, "app_user", "appdb").await;
        let outcome = match client {
            Ok(client) => scalar(&client, "SELECT 1").await.map(drop),
            Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            failures.push(format!("{:?}: {error}", started.elapsed()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A connection that was pooled before the restart may fail once; logins never.
    assert!(failures.len() <= 1, "{failures:#?}\n{}", daemon.log());
    assert!(
        failures
            .iter()
            .all(|failure| !failure.contains("authentication")),
        "{failures:#?}"
    );
    assert!(
        standin
            .verifier_log()
            .iter()
            .all(|entry| entry["accepted"] == true)
    );
}
