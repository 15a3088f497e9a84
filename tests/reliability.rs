//! Faults, in config mode on the stand-in with a real PgBouncer and short tokens: the
//! credential source going away and coming back, rotating credentials, PgBouncer killed, the
//! directory turning unwritable or full, and the database restarting.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::client::{Tally, connect, kill_idle_backends, scalar};
use support::credentials_server::CredentialServer;
use support::daemon::{Daemon, database_flags};
use support::{Creds, PgBouncer, Standin, free_port, test_dir, wait_until, write_file};

/// A config-mode daemon for `app_user` with `lifetime`-second tokens, pooling transactions
/// (so that killing idle server connections never hits a client's session).
fn args(
    standin: &Standin,
    work: &Path,
    listen_port: u16,
    lifetime: u64,
    extra: &[&str],
) -> Vec<String> {
    let config = work.join("pooling.toml");
    write_file(
        &config,
        "[pgbouncer]\npool_mode = \"transaction\"\nserver_check_delay = 0\n",
        0o644,
    );
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(database_flags(standin, listen_port, lifetime));
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

/// Starts a daemon that supervises its own PgBouncer (`args` plus `--supervise` and
/// `extra`), and waits until PgBouncer has its first tokens.
fn start_supervised(
    standin: &Standin,
    work: &Path,
    listen_port: u16,
    lifetime: u64,
    creds: Option<&Creds>,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Daemon {
    let extra = [&["--supervise"], extra].concat();
    let args = args(standin, work, listen_port, lifetime, &extra);
    let mut daemon = Daemon::start_with_env(work, creds, env, &as_strs(&args));
    daemon.wait_until_started();
    daemon
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// One query as a new client, after killing the idle server connections so that PgBouncer
/// must log in to the stand-in with whatever token it holds now.
async fn fresh_login_query(standin: &Standin, listen_port: u16) -> Result<(), String> {
    kill_idle_backends(standin, "app_user");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = connect(listen_port, "app_user", "appdb").await?;
    scalar(&client, "SELECT 1").await.map(drop)
}

/// Traffic until `stop`: a new client every 300 ms and a long-lived one every 2 s, with the
/// idle server connections killed every 4 s.
fn traffic(
    standin: Arc<Standin>,
    listen_port: u16,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let long_lived = connect(listen_port, "app_user", "appdb").await;
        let mut round = 0u32;
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            let fresh = async {
                let client = connect(listen_port, "app_user", "appdb").await?;
                scalar(&client, "SELECT 1").await.map(drop)
            };
            tally.record(fresh.await);
            if round.is_multiple_of(7) {
                let outcome = match &long_lived {
                    Ok(client) => scalar(client, "SELECT 1").await.map(drop),
                    Err(error) => Err(error.clone()),
                };
                tally.record(outcome);
            }
            if round.is_multiple_of(13) {
                kill_idle_backends(&standin, "app_user");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_rotating_every_few_seconds_under_traffic() {
    let standin = Arc::new(Standin::start());
    let server =
        CredentialServer::start(&standin, Duration::from_secs(4), Duration::from_secs(8), 30);
    let work = test_dir("rotation");
    let listen_port = free_port();
    let daemon = start_supervised(
        &standin,
        work.path(),
        listen_port,
        20,
        None,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &server.uri())],
        &["--server-tls-mode", "verify-full"],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let task = traffic(standin.clone(), listen_port, stop.clone(), tally.clone());
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();

    tally.assert_no_failures(&daemon.log());
    assert!(tally.ok() > 50);
    let accepted_keys: std::collections::BTreeSet<String> = standin
        .verifier_log()
        .iter()
        .filter(|entry| entry["accepted"] == true)
        .map(|entry| entry["akid"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        accepted_keys.len() >= 3,
        "logins used only {accepted_keys:?}"
    );
    assert!(
        standin
            .verifier_log()
            .iter()
            .all(|entry| entry["accepted"] == true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_outage_longer_than_a_refresh_then_recovery() {
    let standin = Arc::new(Standin::start());
    // Credentials live 30 s, a new set every 20 s; the outage starts once the daemon is up
    // (about 2 s) and ends after readiness has failed (past 30 s); tokens live 10 s. The
    // daemon refetches credentials once they have less than a token's life left (from 20 s
    // on, at the first refresh after that: by about 27 s), fails, and signs with the ones it
    // holds until they are spent (30 s).
    let server = CredentialServer::start(
        &standin,
        Duration::from_secs(20),
        Duration::from_secs(30),
        4,
    );
    let work = test_dir("outage");
    let listen_port = free_port();
    let daemon = start_supervised(
        &standin,
        work.path(),
        listen_port,
        10,
        None,
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &server.uri())],
        &[],
    );

    server.set_failing(true);
    let outage = Instant::now();
    // Refreshes keep succeeding on the credentials already held, and logins with them work,
    // also after the first failed refetch: one more round runs once it is in the log.
    loop {
        let refetch_failed = daemon
            .log()
            .contains("credential refresh failed; signing with the credentials still held");
        fresh_login_query(&standin, listen_port)
            .await
            .expect("login during the outage");
        assert_eq!(
            daemon.http_get("/readyz").map(|(status, _)| status),
            Some(200),
            "{:?}",
            daemon.http_get("/readyz")
        );
        if refetch_failed {
            break;
        }
        assert!(
            outage.elapsed() < Duration::from_secs(30),
            "no failed credential refetch logged during the outage: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Past the held credentials' expiry, readiness says so.
    assert!(
        wait_until(Duration::from_secs(20), || {
            daemon.http_get("/readyz").is_some_and(|(status, body)| {
                status == 503 && body.contains("credentials_provider_error")
            })
        }),
        "{:?}",
        daemon.http_get("/readyz")
    );
    server.set_failing(false);
    assert!(
        wait_until(Duration::from_secs(20), || {
            daemon
                .http_get("/readyz")
                .is_some_and(|(status, _)| status == 200)
        }),
        "no recovery: {}",
        daemon.log()
    );
    fresh_login_query(&standin, listen_port)
        .await
        .expect("login after recovery");
}

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

/// Writing fails (read-only directory, or a full disk): the old files stay whole and in use,
/// the failure is logged, and the next refresh after writing works again succeeds.
/// `prepare` gets the daemon's directory before the daemon starts.
async fn survives_a_write_failure(
    prepare: impl FnOnce(&Path),
    break_writes: impl Fn(&Path),
    mend_writes: impl Fn(&Path),
) {
    let standin = Standin::start();
    let work = test_dir("write-failure");
    prepare(&work.path().join("pgbouncer"));
    let listen_port = free_port();
    let daemon = start_supervised(
        &standin,
        work.path(),
        listen_port,
        10,
        Some(&standin.static_creds()),
        &[],
        &[],
    );
    let dir = daemon.pgbouncer_dir.clone();
    let before = std::fs::read_to_string(dir.join("databases.ini")).unwrap();

    break_writes(&dir);
    assert!(
        wait_until(Duration::from_secs(15), || daemon
            .log()
            .contains("could not write the new tokens")),
        "{}",
        daemon.log()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("databases.ini")).unwrap(),
        before
    );
    // PgBouncer still logs in with the old token while it lives.
    fresh_login_query(&standin, listen_port)
        .await
        .expect("login on the old token");
    // Once it is about to die, readiness says PgBouncer has no valid token, though the
    // daemon has minted newer ones.
    assert!(
        wait_until(Duration::from_secs(15), || {
            daemon.http_get("/readyz").is_some_and(|(status, body)| {
                status == 503 && body.contains("PgBouncer has not yet loaded a valid token")
            })
        }),
        "{:?}\n{}",
        daemon.http_get("/readyz"),
        daemon.log()
    );

    mend_writes(&dir);
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(dir.join("databases.ini")).unwrap() != before
        }),
        "the daemon did not write again"
    );
    // Ready again once PgBouncer has reloaded the new token.
    assert!(
        wait_until(Duration::from_secs(15), || {
            daemon
                .http_get("/readyz")
                .is_some_and(|(status, _)| status == 200)
        }),
        "{:?}",
        daemon.http_get("/readyz")
    );
    fresh_login_query(&standin, listen_port)
        .await
        .expect("login on the new token");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            // PgBouncer's own socket (unix_socket_dir is the directory) is no leftover.
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with('.') && !name.starts_with(".s.PGSQL.")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_directory_keeps_the_old_files_and_recovers() {
    use std::os::unix::fs::PermissionsExt;
    let set_mode = |dir: &Path, mode: u32| {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // The daemon runs unprivileged, so directory permissions bind it.
    survives_a_write_failure(
        |_| {},
        |dir| set_mode(dir, 0o500),
        |dir| set_mode(dir, 0o700),
    )
    .await;
}

/// Unmounts a tmpfs when dropped, also when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(at)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs at {}", at.display());
        support::chown_to_runner(at);
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_old_files_and_recovers() {
    assert!(
        support::is_root(),
        "this test mounts a small tmpfs and needs root (CI runs as root)"
    );
    let mut mounted = None;
    let filler = |dir: &Path| dir.join("filler");
    survives_a_write_failure(
        |dir| mounted = Some(Tmpfs::mount(dir, "256k")),
        |dir| {
            // Fill the disk to the last byte.
            let _ = std::process::Command::new("dd")
                .args(["if=/dev/zero", "bs=4k"])
                .arg(format!("of={}", filler(dir).display()))
                .stderr(std::process::Stdio::null())
                .status();
        },
        |dir| std::fs::remove_file(filler(dir)).unwrap(),
    )
    .await;
    drop(mounted);
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
