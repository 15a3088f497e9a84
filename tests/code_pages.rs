//! The daemon hands its binary's code pages back after later work too, not only at start-up:
//! a relay login maps code (rustls, aws-lc, the login) that the idle daemon does not need, and
//! so does the reloader's work on PgBouncer's admin console (RELOADs, the periodic ping). The
//! shared libraries' code (glibc's) is handed back as well.

mod support;

use std::time::Duration;
use support::client::{connect, scalar};
use support::daemon::{Daemon, PASSTHROUGH_SETTINGS};
use support::{Standin, free_port, test_dir, wait_until};

/// Resident KiB of the process's executable mappings of its own binary, from
/// `/proc/PID/smaps`.
fn code_rss_kib(pid: u32) -> u64 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    mapped_code_rss_kib(pid, |path| path == exe.to_str().unwrap())
}

/// Resident KiB of the process's executable mappings of files whose path `is_wanted`.
fn mapped_code_rss_kib(pid: u32, is_wanted: impl Fn(&str) -> bool) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_code = false;
    let mut total = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields[0].ends_with(':') {
            in_code = fields[1] == "r-xp" && fields.get(5).is_some_and(|path| is_wanted(path));
        } else if in_code && fields[0] == "Rss:" {
            total += fields[1].parse::<u64>().unwrap();
        }
    }
    total
}

/// Logs `user` in through PgBouncer: its first client needs a server connection, so the relay
/// logs in to the stand-in with a fresh token.
async fn relay_login(listen_port: u16, user: &str) {
    let client = connect(listen_port, user, "appdb").await.unwrap();
    assert_eq!(scalar(&client, "SELECT current_user").await.unwrap(), user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_pages_are_released_again_after_a_relay_login() {
    let standin = Standin::start();
    let work = test_dir("code-pages");
    let listen_port = free_port();
    // Tokens that outlive the test: no refresh runs, only the logins below.
    let settings = PASSTHROUGH_SETTINGS.replace("token_lifetime = 20", "token_lifetime = 900");
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    let pid = daemon.pid();

    for user in ["app_user", "reporter"] {
        relay_login(listen_port, user).await;
        let after_login = code_rss_kib(pid);
        let released = wait_until(Duration::from_secs(15), || code_rss_kib(pid) < after_login);
        assert!(
            released,
            "{user}: code still {} KiB resident, {after_login} KiB after the login\n{}",
            code_rss_kib(pid),
            daemon.log()
        );
    }
    assert!(
        standin
            .verifier_log()
            .iter()
            .filter(|entry| entry["accepted"] == true)
            .count()
            >= 2,
        "each user's login was a relay login to the stand-in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_pages_are_released_again_after_the_reloaders_admin_console_work() {
    let standin = Standin::start();
    let work = test_dir("code-pages-ping");
    let listen_port = free_port();
    // Tokens that outlive the test and no clients: after start-up only the reloader talks to
    // PgBouncer's admin console: the RELOAD once the password-limit probe has measured, and
    // the check that PgBouncer answers every 10 s of quiet.
    let settings = r#"
mode = "config"
token_lifetime = 900

[[databases]]
name = "appdb"
host = "localhost"
port = {standin_port}
dbname = "appdb"
user = "app_user"
"#;
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, settings);
    let pid = daemon.pid();

    // Either maps the admin console's client back in: wait for the rise over the lowest level
    // seen since start-up's release.
    let mut lowest = code_rss_kib(pid);
    let mut after_console_work = 0;
    let rose = wait_until(Duration::from_secs(30), || {
        let now = code_rss_kib(pid);
        lowest = lowest.min(now);
        after_console_work = now;
        now >= lowest + 256
    });
    assert!(
        rose,
        "no RELOAD or ping mapped code back in: {lowest} KiB\n{}",
        daemon.log()
    );
    let released = wait_until(Duration::from_secs(15), || {
        code_rss_kib(pid) < after_console_work
    });
    assert!(
        released,
        "code still {} KiB resident, {after_console_work} KiB after the RELOAD or ping\n{}",
        code_rss_kib(pid),
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_librarys_code_pages_are_released_too() {
    let standin = Standin::start();
    let work = test_dir("code-pages-libc");
    let listen_port = free_port();
    let settings = PASSTHROUGH_SETTINGS.replace("token_lifetime = 20", "token_lifetime = 900");
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    let pid = daemon.pid();
    let libc_code_kib = || mapped_code_rss_kib(pid, |path| path.contains("/libc.so"));
    // Loading maps ~1.2 MiB of glibc's code; an idle daemon calls a few of its functions
    // (epoll_wait, clock_gettime, malloc), which fault back a few 64-KiB windows.
    let at_start = libc_code_kib();
    let released = wait_until(Duration::from_secs(15), || libc_code_kib() < 512);
    assert!(
        released,
        "glibc's code still {} KiB resident ({at_start} KiB at start)\n{}",
        libc_code_kib(),
        daemon.log()
    );
}
