//! Another local user against the daemon's directory: what it plants there is never trusted
//! or followed, and a directory the daemon cannot make its own stops it at start. PgBouncer
//! reads its secrets from that directory, so whoever can write it could otherwise log in as
//! the daemon or redirect its writes.
//!
//! The directory is made as a Kubernetes `emptyDir` is: owned by root, mode 0777. The
//! intruder is the test bed's second uid; the daemon and PgBouncer run as the usual runner.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::daemon::{Daemon, database_flags};
use support::{Standin, Testbed, free_port, test_dir, write_file};

const PLANTED_SECRET: &str = "planted-by-the-intruder";

/// `work/pgbouncer` as an `emptyDir`: root's, writable by everyone.
fn world_writable_dir(work: &Path) -> PathBuf {
    let dir = work.join("pgbouncer");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Logs in to PgBouncer's admin console as the daemon's admin user with `password`.
async fn admin_login(port: u16, password: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("aws_pgbouncer_admin")
        .password(password)
        .dbname("pgbouncer")
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    client.simple_query("SHOW VERSION").await.map(drop)
}

#[tokio::test]
async fn a_planted_admin_secret_is_not_adopted() {
    let intruder = Testbed::locate().intruder();
    let standin = Standin::start();
    let work = test_dir("planted-secret");
    let dir = world_writable_dir(work.path());
    intruder.sh(&format!(
        "umask 022; printf {PLANTED_SECRET} > {}/admin-secret",
        dir.display()
    ));
    let listen_port = free_port();
    let settings = "[[databases]]\nhost = \"localhost\"\nport = {standin_port}\n\
                    dbname = \"appdb\"\nuser = \"app_user\"\n";
    let _daemon = Daemon::start_supervised(work.path(), &standin, listen_port, settings);

    let refused = admin_login(listen_port, PLANTED_SECRET)
        .await
        .expect_err("the planted secret opened PgBouncer's admin console");
    let message = refused.as_db_error().map(|db| db.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("SASL authentication failed")),
        "{refused:?}"
    );
    // The daemon's own secret does open it: the refusal above is about the secret.
    let private = dir.join("private");
    let metadata = fs::metadata(&private).expect("the daemon's private subdirectory");
    assert_eq!(metadata.mode() & 0o777, 0o700);
    let own = fs::read_to_string(private.join("admin-secret")).unwrap();
    admin_login(listen_port, own.trim()).await.unwrap();
}

#[test]
fn a_planted_symlink_is_not_followed() {
    let intruder = Testbed::locate().intruder();
    let standin = Standin::start();
    let work = test_dir("planted-link");
    let dir = world_writable_dir(work.path());
    // A file of the daemon's user that the intruder wants overwritten and opened up.
    let victim = work.path().join("victim");
    write_file(&victim, "the runner's own", 0o600);
    for name in ["endpoint-ca.pem.tmp", "endpoint-ca.pem", "admin-secret"] {
        intruder.sh(&format!(
            "ln -s {} {}/{name}",
            victim.display(),
            dir.display()
        ));
    }
    let mut args = database_flags(&standin, free_port(), 900);
    args.extend(
        [
            "--mode",
            "auth-query",
            "--auth-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--supervise",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(work.path(), &standin.static_creds(), &args);
    daemon.wait_until_started();

    assert_eq!(fs::read_to_string(&victim).unwrap(), "the runner's own");
    assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
    assert!(dir.join("private/endpoint-ca.pem").is_file());
}

#[test]
fn a_private_subdirectory_planted_by_another_user_stops_the_daemon() {
    let intruder = Testbed::locate().intruder();
    let standin = Standin::start();
    let work = test_dir("planted-dir");
    let dir = world_writable_dir(work.path());
    intruder.sh(&format!(
        "mkdir -m 0777 {0}/private && printf {PLANTED_SECRET} > {0}/private/admin-secret",
        dir.display()
    ));
    let args = database_flags(&standin, free_port(), 900);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(work.path(), &standin.static_creds(), &args);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("the daemon kept running on a directory another user controls");
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("subdirectory private, which is not the daemon's")
            && log.contains("owned by uid"),
        "{log}"
    );
    assert!(!log.contains(PLANTED_SECRET), "{log}");
}

/// Without the sticky bit (as an `emptyDir` is made), another user who can write the
/// directory can rename the daemon's `private` subdirectory away and put its own in its place,
/// which PgBouncer would then read: the daemon cannot prevent it, so it says so. With the
/// sticky bit (as /tmp has) the swap is impossible and nothing is said.
#[test]
fn a_shared_directory_without_the_sticky_bit_is_warned_about() {
    const WARNING: &str = "the directory has no sticky bit";
    let intruder = Testbed::locate().intruder();
    let standin = Standin::start();
    let args = database_flags(&standin, free_port(), 900);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let work = test_dir("no-sticky-bit");
    let dir = world_writable_dir(work.path());
    let mut daemon = Daemon::start(work.path(), &standin.static_creds(), &args);
    daemon.wait_for_log(WARNING, Duration::from_secs(30));
    // What the warning is about: the intruder swaps the daemon's subdirectory for its own.
    intruder.sh(&format!(
        "mv {0}/private {0}/moved && mkdir {0}/private",
        dir.display()
    ));
    assert_ne!(
        fs::metadata(dir.join("private")).unwrap().uid(),
        fs::metadata(dir.join("moved")).unwrap().uid(),
    );
    drop(daemon);

    let work = test_dir("sticky-bit");
    let dir = world_writable_dir(work.path());
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let mut daemon = Daemon::start(work.path(), &standin.static_creds(), &args);
    daemon.wait_for_log("wrote PgBouncer's files", Duration::from_secs(30));
    assert_eq!(daemon.count_in_log(WARNING), 0, "{}", daemon.log());
    let swap = std::process::Command::new("mv")
        .arg(dir.join("private"))
        .arg(dir.join("moved"))
        .uid(intruder.uid)
        .gid(intruder.gid)
        .output()
        .unwrap();
    assert!(
        !swap.status.success() && String::from_utf8_lossy(&swap.stderr).contains("not permitted"),
        "the sticky bit did not stop the swap: {swap:?}"
    );
}
