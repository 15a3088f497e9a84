//! RLIMIT_NOFILE: the daemon raises its soft limit to the hard one at start, and when the
//! hard limit is too small for the listeners' defaults it shrinks them to fit and says so
//! once, instead of failing accepts with "Too many open files" under load.
//!
//! The test lowers this process's own limits (children inherit them), so it has a binary of
//! its own.

mod support;

use support::client::{connect, scalar};
use support::daemon::Daemon;
use support::{Standin, free_port, test_dir};

const SETTINGS: &str = r#"
mode = "passthrough"
relay_listen = "unix"

[[databases]]
name = "appdb"
host = "localhost"
port = {standin_port}
dbname = "appdb"
users = ["app_user"]
# The relay's limit follows PgBouncer's pools: 400 connections and a quarter more, plus 8.
options = { pool_size = 400 }
"#;

const WARNING: &str = "file descriptors (RLIMIT_NOFILE";

fn set_nofile(soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` is a valid rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// `Max open files` of `pid`: (soft, hard).
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let figures: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (figures[0], figures[1])
}

async fn logs_in(listen_port: u16) {
    let client = connect(listen_port, "app_user", "appdb").await.unwrap();
    assert_eq!(
        scalar(&client, "SELECT current_user").await.unwrap(),
        "app_user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_limit_is_raised_and_the_listeners_fit_the_hard_one() {
    let standin = Standin::start();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let hard = limit.rlim_max;
    assert!(
        hard > 4096,
        "the hard limit here ({hard}) is too low to test raising"
    );

    // A soft limit of 256 under a high hard limit: raised, nothing shrunk.
    set_nofile(256, hard);
    let work = test_dir("fd-raised");
    let listen_port = free_port();
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, SETTINGS);
    assert_eq!(nofile_of(daemon.pid()), (hard, hard));
    logs_in(listen_port).await;
    assert_eq!(daemon.count_in_log(WARNING), 0, "{}", daemon.log());
    drop(daemon);

    // A hard limit of 700: the relay's 508 need about 1,800; it shrinks, the warning says
    // so once, and logins go on. (Lowering the hard limit cannot be
    // undone here: it comes last.)
    set_nofile(700, 700);
    let work = test_dir("fd-fitted");
    let listen_port = free_port();
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, SETTINGS);
    assert_eq!(nofile_of(daemon.pid()), (700, 700));
    logs_in(listen_port).await;
    assert_eq!(daemon.count_in_log(WARNING), 1, "{}", daemon.log());
    assert!(
        daemon.log().contains(
            "only 700 file descriptors (RLIMIT_NOFILE, hard limit included): the relay takes \
             at most 148 connections (instead of 508); raise the hard limit (ulimit -Hn, the \
             container's nofile ulimit) to 1780 or more"
        ),
        "{}",
        daemon.log()
    );
}
