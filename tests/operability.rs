//! Probes, metrics, logs and shutdown of the real daemon, on the stand-in with a real
//! PgBouncer.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::credentials_server::CredentialServer;
use support::daemon::{BINARY, Daemon, database_flags};
use support::{Standin, free_port, test_dir, wait_until};
use tokio_postgres::NoTls;

fn base_args(standin: &Standin, listen_port: u16, lifetime: u64) -> Vec<String> {
    let mut args = vec!["--supervise".to_owned()];
    args.extend(database_flags(standin, listen_port, lifetime));
    args
}

fn status(daemon: &Daemon, path: &str) -> u16 {
    daemon.http_get(path).map_or(0, |(status, _)| status)
}

fn wait_status(daemon: &Daemon, path: &str, expected: u16, timeout: Duration) {
    assert!(
        wait_until(timeout, || status(daemon, path) == expected),
        "{path} did not turn {expected} within {timeout:?}: {:?}\n{}",
        daemon.http_get(path),
        daemon.log()
    );
}

fn wait_command(http_port: u16, timeout_secs: u64) -> std::process::ExitStatus {
    Command::new(BINARY)
        .args([
            "wait",
            "--http",
            &format!("127.0.0.1:{http_port}"),
            "--timeout",
            &timeout_secs.to_string(),
        ])
        .status()
        .expect("run wait")
}

#[test]
fn probes_and_metrics_follow_a_credential_source_that_fails_and_recovers() {
    let standin = Standin::start();
    let server = CredentialServer::start(
        &standin,
        Duration::from_secs(5),
        Duration::from_secs(10),
        60,
    );
    server.set_failing(true);
    let work = test_dir("probes");
    let listen_port = free_port();
    let args = base_args(&standin, listen_port, 20);
    let daemon = Daemon::start_with_env(
        work.path(),
        None,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &server.uri())],
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // No credentials yet: alive, but neither started nor ready, and saying why.
    wait_status(&daemon, "/healthz", 200, Duration::from_secs(20));
    assert_eq!(status(&daemon, "/startupz"), 503);
    assert!(
        wait_until(Duration::from_secs(20), || {
            daemon.http_get("/readyz").is_some_and(|(code, reasons)| {
                code == 503 && reasons.contains("credentials_provider_error")
            })
        }),
        "/readyz does not say why: {:?}",
        daemon.http_get("/readyz")
    );
    assert_eq!(wait_command(daemon.http_port, 1).code(), Some(1));

    server.set_failing(false);
    assert!(
        wait_command(daemon.http_port, 30).success(),
        "{}",
        daemon.log()
    );
    assert_eq!(status(&daemon, "/startupz"), 200);
    wait_status(&daemon, "/readyz", 200, Duration::from_secs(15));
    assert!(
        daemon
            .metric("aws_pgbouncer_credentials_expiry_timestamp_seconds")
            .unwrap()
            > 1e9
    );

    // The source fails after start: the tokens run out with the credentials (10 s), then
    // readiness drops, while liveness stays.
    server.set_failing(true);
    wait_status(&daemon, "/readyz", 503, Duration::from_secs(20));
    assert_eq!(status(&daemon, "/healthz"), 200);
    assert_eq!(status(&daemon, "/startupz"), 200);
    let failures = daemon.metric("aws_pgbouncer_token_refresh_failures_total{database=\"appdb\",user=\"app_user\",host=\"localhost\",cause=\"credentials_provider_error\"}",
    );
    assert!(
        failures.unwrap_or(0.0) >= 1.0,
        "{:?}",
        daemon.http_get("/metrics")
    );

    server.set_failing(false);
    wait_status(&daemon, "/readyz", 200, Duration::from_secs(20));

    // The counters say exactly what the log says (read around the scrape, in case a refresh
    // lands in between). Reload attempts count failed ones too.
    let minted_before = daemon.count_in_log("minted a new token");
    let reloaded_before = daemon.count_in_log("PgBouncer reloaded");
    let refreshes = daemon.metric("aws_pgbouncer_token_refreshes_total{database=\"appdb\",user=\"app_user\",host=\"localhost\"}",
    )
    .unwrap() as usize;
    let reloads = daemon
        .metric("aws_pgbouncer_pgbouncer_reloads_total")
        .unwrap()
        - daemon
            .metric("aws_pgbouncer_pgbouncer_reload_failures_total")
            .unwrap();
    let minted_after = daemon.count_in_log("minted a new token");
    let reloaded_after = daemon.count_in_log("PgBouncer reloaded");
    assert!(minted_before >= 2);
    assert!(
        (minted_before..=minted_after).contains(&refreshes),
        "{refreshes} refreshes counted, {minted_before} logged"
    );
    assert!(
        (reloaded_before..=reloaded_after).contains(&(reloads as usize)),
        "{reloads} successful reloads counted, {reloaded_before} logged"
    );
    assert!(daemon.metric("aws_pgbouncer_build_info").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readiness_first_and_lets_the_query_in_flight_finish() {
    let standin = Standin::start();
    let work = test_dir("shutdown");
    let listen_port = free_port();
    let mut args = base_args(&standin, listen_port, 60);
    args.extend(["--min-shutdown-delay", "2", "--max-shutdown-delay", "10"].map(str::to_owned));
    let mut daemon = Daemon::start(
        work.path(),
        &standin.static_creds(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_status(&daemon, "/readyz", 200, Duration::from_secs(30));

    let connect = || async {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(listen_port)
            .user("app_user")
            .dbname("appdb")
            .connect(NoTls)
            .await
            .expect("connect through PgBouncer");
        tokio::spawn(connection);
        client
    };
    let in_flight_client = connect().await;
    let in_flight = tokio::spawn(async move {
        let outcome = in_flight_client.simple_query("SELECT pg_sleep(3)").await;
        drop(in_flight_client);
        outcome.map(drop)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    wait_status(&daemon, "/readyz", 503, Duration::from_secs(1));
    assert_eq!(status(&daemon, "/healthz"), 200);
    // Within the minimum delay, PgBouncer still takes new work.
    let late = connect().await;
    late.simple_query("SELECT 1")
        .await
        .expect("served during the minimum delay");
    // PgBouncer's shutdown waits for session-mode clients to let their server go.
    drop(late);

    assert!(
        in_flight.await.unwrap().is_ok(),
        "the query in flight was cut off"
    );
    let exit = daemon
        .wait_exit(Duration::from_secs(15))
        .expect("daemon exits");
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(143), "{}", daemon.log());
    assert!(
        took >= Duration::from_secs(2),
        "left before the minimum delay: {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "PgBouncer did not stop once its work was done: {took:?}"
    );
}

/// A supervised daemon on the stand-in, 60-second tokens, with `extra` flags, once started.
fn start_started(standin: &Standin, work: &std::path::Path, extra: &[&str]) -> Daemon {
    let mut args = base_args(standin, free_port(), 60);
    args.extend(extra.iter().map(|flag| flag.to_string()));
    let mut daemon = Daemon::start(
        work,
        &standin.static_creds(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    daemon.wait_until_started();
    daemon
}

#[test]
fn exit_zero_on_sigterm_for_jobs() {
    let standin = Standin::start();
    let work = test_dir("exit-zero");
    let mut daemon = start_started(&standin, work.path(), &["--exit-zero-on-sigterm"]);
    daemon.signal(libc::SIGTERM);
    let exit = daemon
        .wait_exit(Duration::from_secs(15))
        .expect("daemon exits");
    assert_eq!(exit.code(), Some(0), "{}", daemon.log());
}

fn shutdown_command(http_port: u16) -> std::process::Output {
    Command::new(BINARY)
        .args(["shutdown", "--http", &format!("127.0.0.1:{http_port}")])
        .env_remove("AWS_PGBOUNCER_HTTP_LISTEN")
        .output()
        .expect("run shutdown")
}

#[test]
fn shutdown_command_ends_a_daemon_that_serves_quitquitquit_with_exit_0() {
    let standin = Standin::start();
    let work = test_dir("quitquitquit");
    let mut daemon = start_started(&standin, work.path(), &["--quitquitquit"]);
    let output = shutdown_command(daemon.http_port);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let exit = daemon
        .wait_exit(Duration::from_secs(15))
        .expect("daemon exits after /quitquitquit");
    let log = daemon.log();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains("POST /quitquitquit"), "{log}");
    assert!(
        log.contains("PgBouncer stopped"),
        "the supervised PgBouncer ends too: {log}"
    );
}

#[test]
fn shutdown_command_is_refused_by_a_daemon_without_quitquitquit() {
    let standin = Standin::start();
    let work = test_dir("no-quitquitquit");
    let mut daemon = start_started(&standin, work.path(), &[]);
    let output = shutdown_command(daemon.http_port);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("start it with --quitquitquit"), "{stderr}");
    assert_eq!(status(&daemon, "/healthz"), 200, "{}", daemon.log());
    assert!(daemon.is_running());
}

#[test]
fn no_secret_reaches_any_log_line_at_any_level() {
    let standin = Standin::start();
    let creds = standin.session_creds();
    let work = test_dir("log-scan");
    let listen_port = free_port();
    let mut args = base_args(&standin, listen_port, 6);
    args.extend(["--log-format", "json"].map(str::to_owned));
    let mut daemon = Daemon::start_with_env(
        work.path(),
        Some(&creds),
        &[("RUST_LOG", "trace")],
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_status(&daemon, "/startupz", 200, Duration::from_secs(30));
    // Several refreshes, reloads and server logins with tokens in them.
    let deadline = Instant::now() + Duration::from_secs(14);
    let mut tokens = Vec::new();
    while Instant::now() < deadline {
        let token = daemon.token_in_use();
        if !tokens.contains(&token) {
            tokens.push(token);
        }
        standin.terminate_backends("app_user");
        // Let PgBouncer see the closed server connection before the next client comes.
        std::thread::sleep(Duration::from_millis(300));
        let login = support::psql(
            &format!("host=127.0.0.1 port={listen_port} user=app_user dbname=appdb"),
            None,
            "SELECT 1",
        );
        assert_eq!(
            login.as_deref(),
            Ok("1"),
            "PgBouncer's log:\n{}",
            daemon
                .log()
                .lines()
                .filter(|line| !line.starts_with('{'))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    daemon.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    daemon.signal(libc::SIGTERM);
    daemon.wait_exit(Duration::from_secs(15));

    let log = daemon.log();
    // Proof that the filter let more than the usual through: the scan means nothing otherwise.
    let debug_lines = log.matches("\"level\":\"DEBUG\"").count();
    eprintln!(
        "log scan: {} lines, {debug_lines} at debug",
        log.lines().count()
    );
    assert!(
        debug_lines >= 5 && log.lines().count() > 30,
        "RUST_LOG=trace produced only {debug_lines} debug lines:\n{log}"
    );
    assert!(
        tokens.len() >= 2,
        "expected several tokens over 14 s of 6 s tokens"
    );
    let admin_secret = std::fs::read_to_string(daemon.pgbouncer_dir.join("admin-secret")).unwrap();
    // A token's start is public (host, port, user); what makes it a credential is its
    // signature and the session token in it. The key id names the key: no log needs it.
    let mut secrets = vec![
        creds.akid.clone(),
        creds.secret.clone(),
        creds.session_token.clone().unwrap(),
        admin_secret.trim().to_owned(),
        "X-Amz-Signature".to_owned(),
    ];
    for token in &tokens {
        for parameter in [
            "X-Amz-Signature",
            "X-Amz-Security-Token",
            "X-Amz-Credential",
        ] {
            secrets.push(query_value(token, parameter));
        }
    }
    for secret in &secrets {
        assert!(!secret.is_empty(), "an empty needle finds every line");
        let needle = &secret[..secret.len().min(40)];
        if let Some(line) = log.lines().find(|line| line.contains(needle)) {
            panic!("a secret reached the log: {line}");
        }
    }
}

/// The value of `parameter` in a token's query string, as it stands in the token.
fn query_value(token: &str, parameter: &str) -> String {
    token
        .split(['?', '&'])
        .find_map(|pair| pair.strip_prefix(parameter)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {parameter} in a token"))
        .to_owned()
}
