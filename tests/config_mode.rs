//! Config mode end to end: the real daemon supervising a real PgBouncer in front of the RDS
//! stand-in, with 20-second tokens over more than three lifetimes.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::client::{KillGate, Tally, connect, scalar};
use support::daemon::Daemon;
use support::{Standin, free_port, test_dir};

/// Over three lifetimes of the 20-second tokens in SETTINGS.
const RUN_FOR: Duration = Duration::from_secs(3 * 20 + 8);

/// Two databases and users from one TOML file, one pooling transactions, one sessions.
const SETTINGS: &str = r#"
token_lifetime = 20

[pgbouncer]
pool_mode = "transaction"
server_check_delay = 0
max_client_conn = 200

[[databases]]
name = "appdb"
host = "localhost"
port = {standin_port}
dbname = "appdb"
user = "app_user"

[[databases]]
name = "reports"
host = "localhost"
port = {standin_port}
dbname = "appdb"
user = "reporter"
options = { pool_mode = "session" }
"#;

/// Every file in the directory is 0600 and databases.ini is always whole: both entries, each
/// with a token for its own user.
fn check_files(dir: &Path) -> Result<(), String> {
    for name in [
        "pgbouncer.ini",
        "databases.ini",
        "userlist.txt",
        "pg_hba.conf",
    ] {
        let path = dir.join(name);
        let mode = fs::metadata(&path)
            .map_err(|error| format!("{name}: {error}"))?
            .permissions()
            .mode();
        if mode & 0o777 != 0o600 {
            return Err(format!("{name} has mode {:o}", mode & 0o777));
        }
    }
    let text = fs::read_to_string(dir.join("databases.ini")).map_err(|error| error.to_string())?;
    let whole = text.contains("[databases]\n")
        && text.ends_with('\n')
        && text
            .lines()
            .filter(|line| line.starts_with("appdb = ") || line.starts_with("reports = "))
            .filter(|line| line.contains("password='localhost:") && line.ends_with("'"))
            .count()
            == 2;
    if whole {
        Ok(())
    } else {
        Err("databases.ini is not whole".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_rotate_under_traffic_without_a_single_failure() {
    let standin = Standin::start();
    let work = test_dir("config-mode");
    let listen_port = free_port();
    let mut daemon = Daemon::start_supervised(work.path(), &standin, listen_port, SETTINGS);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let gate = Arc::new(KillGate::default());
    let mut tasks = Vec::new();

    // New client connections all the time.
    {
        let (stop, tally, gate) = (stop.clone(), tally.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let pass = gate.pass().await;
                let outcome = async {
                    let client = connect(listen_port, "app_user", "appdb").await?;
                    let user = scalar(&client, "SELECT current_user").await?;
                    (user == "app_user")
                        .then_some(())
                        .ok_or(format!("current_user {user}"))
                }
                .await;
                tally.record(outcome);
                drop(pass);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    // One long-lived client querying every few seconds.
    let long_lived = connect(listen_port, "app_user", "appdb").await.unwrap();
    {
        let (stop, tally, gate) = (stop.clone(), tally.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let pass = gate.pass().await;
                tally.record(scalar(&long_lived, "SELECT 1").await.map(drop));
                drop(pass);
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }));
    }
    // A session-mode client whose server connection must survive every reload.
    let session = connect(listen_port, "reporter", "reports").await.unwrap();
    let first_backend = scalar(&session, "SELECT pg_backend_pid()").await.unwrap();

    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < RUN_FOR {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(error) = check_files(&daemon.pgbouncer_dir) {
            panic!("{error}");
        }
        // Every ~5 s, kill app_user's idle server connections so PgBouncer must log in again.
        if started.elapsed().as_secs() / 5 > kills {
            kills += 1;
            gate.kill_idle_backends(&standin, &["app_user"]).await;
        }
    }
    let same_backend = scalar(&session, "SELECT pg_backend_pid()").await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let failures = tally.failures();
    assert!(
        failures.is_empty(),
        "failed queries: {failures:#?}\n{}",
        daemon.log()
    );
    assert!(tally.ok() > 150, "too little traffic to mean anything");
    assert_eq!(
        first_backend, same_backend,
        "a reload dropped a server connection"
    );

    let reloads = daemon.count_in_log("PgBouncer reloaded");
    assert!(
        reloads >= 3,
        "only {reloads} reloads in {RUN_FOR:?}:\n{}",
        daemon.log()
    );
    // Fresh server logins happened all along, each with a token the verifier accepted.
    let logins: Vec<_> = standin
        .verifier_log()
        .into_iter()
        .filter(|entry| entry["user"] == "app_user")
        .collect();
    assert!(logins.len() >= 6, "only {} app_user logins", logins.len());
    assert!(
        logins.iter().all(|entry| entry["accepted"] == true),
        "{logins:#?}"
    );

    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(40))
        .expect("daemon stops");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", daemon.log());
}

/// An application configured like the old shell sidecar's example (localhost, the database
/// name, the user name, no password) works with the old sidecar's variables.
#[test]
fn the_old_sidecars_variables_still_work() {
    let standin = Standin::start();
    let work = test_dir("legacy-env");
    let listen_port = free_port();
    let standin_port = standin.port().to_string();
    let mut daemon = Daemon::start_with_env(
        work.path(),
        Some(&standin.static_creds()),
        &[
            ("RDS_HOST", standin.host()),
            ("DB_PORT", &standin_port),
            ("DB_NAME", "appdb"),
            ("DB_USERNAME", "app_user"),
            ("AWS_REGION", standin.region()),
        ],
        &[
            "--supervise",
            "--listen",
            &format!("127.0.0.1:{listen_port}"),
            "--server-ca-file",
            standin.ca_path().to_str().unwrap(),
        ],
    );
    daemon.wait_until_started();
    let answer = support::psql(
        &format!("host=localhost port={listen_port} dbname=appdb user=app_user"),
        None,
        "SELECT current_user",
    );
    assert_eq!(answer.as_deref(), Ok("app_user"), "{}", daemon.log());
}

/// Twelve entries, each for its own IAM user, so that twelve keys refresh within about two
/// seconds of each other every lifetime (the refresh point is jittered over a tenth of it).
/// Nobody logs in: only the RELOADs that carry their tokens to PgBouncer are counted.
fn twelve_users_settings() -> String {
    let mut settings = String::from("token_lifetime = 20\n");
    for n in 0..12 {
        settings.push_str(&format!(
            "\n[[databases]]\nname = \"db{n}\"\nhost = \"localhost\"\nport = {{standin_port}}\n\
             dbname = \"appdb\"\nuser = \"user{n}\"\n"
        ));
    }
    settings
}

#[test]
fn refreshes_of_many_entries_share_their_reloads() {
    let standin = Standin::start();
    let work = test_dir("config-mode-reloads");
    let settings = twelve_users_settings();
    let daemon = Daemon::start_supervised(work.path(), &standin, free_port(), &settings);
    let refreshes = || daemon.metric_total("aws_pgbouncer_token_refreshes_total{");
    let reloads = || daemon.metric_total("aws_pgbouncer_pgbouncer_reloads_total");
    let (refreshes_at_start, reloads_at_start) = (refreshes(), reloads());
    let started = Instant::now();
    // Two rounds of refreshes: every key's token replaced twice.
    while refreshes() < refreshes_at_start + 24.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the tokens were not refreshed twice in 60 s: {} refreshes; log:\n{}",
            refreshes() - refreshes_at_start,
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The last refresh's RELOAD may wait out the spacing.
    std::thread::sleep(Duration::from_secs(3));
    let elapsed = started.elapsed().as_secs_f64();
    let reloaded = reloads() - reloads_at_start;
    assert!(
        reloaded <= (elapsed / 2.0).ceil() + 1.0,
        "{reloaded} RELOADs in {elapsed:.1} s for {} refreshes: more than one per 2 s",
        refreshes() - refreshes_at_start
    );
    // Each round of refreshes still reaches PgBouncer.
    assert!(
        reloaded >= 2.0,
        "{reloaded} RELOADs for two rounds of refreshes"
    );
}

/// The test bed's PgBouncer (trixie's 1.24.1 where no newer source can be had) has known
/// problems: the daemon names each once, with its reason, after `SHOW VERSION`.
#[test]
fn pgbouncers_known_problems_are_warned_about_once_each() {
    let version = support::Testbed::locate().pgbouncer_version.clone();
    let release: Vec<u32> = version
        .split('.')
        .map(|part| part.parse().expect("a numeric PgBouncer version"))
        .collect();
    let standin = Standin::start();
    let work = test_dir("config-mode-version");
    let daemon = Daemon::start_supervised(work.path(), &standin, free_port(), SETTINGS);
    let log = daemon.log();
    let expected: &[(&str, bool)] = &[
        ("PgBouncer 1.24.x crashes", release[..2] == [1, 24]),
        ("has CVE-2025-12819", release < vec![1, 25, 1]),
        ("has CVE-2026-6664 to 6667", release < vec![1, 25, 2]),
        ("has CVE-2026-107348 to 107350", release < vec![1, 26, 1]),
    ];
    for (warning, applies) in expected {
        let times = log.matches(warning).count();
        assert_eq!(
            times,
            usize::from(*applies),
            "PgBouncer {version}: \"{warning}\" logged {times} times; log:\n{log}"
        );
    }
}

/// A setting config mode never reads (here a relay limit and an endpoint address, from a flag
/// and from the environment) would look configured and do nothing: the daemon says so once,
/// naming each, and runs.
#[test]
fn settings_the_mode_does_not_read_are_named_in_a_warning() {
    let standin = Standin::start();
    let work = test_dir("config-mode-unread-settings");
    let mut args = support::daemon::database_flags(&standin, free_port(), 20);
    args.extend(["--relay-login-rate", "50", "--supervise"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_with_env(
        work.path(),
        Some(&standin.static_creds()),
        &[("AWS_PGBOUNCER_AUTH_LISTEN", "unix")],
        &args,
    );
    daemon.wait_until_started();
    let log = daemon.log();
    let warning = "settings given that this mode does not read";
    assert_eq!(log.matches(warning).count(), 1, "log:\n{log}");
    let line = log.lines().find(|line| line.contains(warning)).unwrap();
    assert!(
        line.contains("auth_listen (read in auth-query mode)")
            && line.contains("relay_login_rate (read in passthrough mode)")
            && line.contains("mode=\"config\""),
        "{line}"
    );
}
