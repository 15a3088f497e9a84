//! Another local uid floods the daemon's listeners (the auth endpoint on a unix socket or on
//! loopback TCP, the relay) with connections that say nothing, from before PgBouncer's first
//! login. Slots are few and a flood can outnumber them, so what must hold is that PgBouncer's
//! own connection still gets in, every application login succeeds, and the flood costs a few
//! log lines and no descriptors once it is gone.

mod support;

use std::time::Duration;
use support::client::{Tally, log_in_in_turns};
use support::daemon::Daemon;
use support::flood::{self, Flood};
use support::{Standin, anonymous_memory_kib, free_port, test_dir};

/// Settings for auth-query or passthrough mode with two users, PgBouncer retrying failed
/// server logins after a second; `listeners` sets the mode and where the daemon listens.
fn two_users(listeners: &str) -> String {
    format!(
        r#"{listeners}

[pgbouncer]
pool_mode = "transaction"
server_login_retry = 1

[[databases]]
name = "appdb"
host = "localhost"
port = {{standin_port}}
dbname = "appdb"
users = ["app_user", "reporter"]
"#
    )
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Another local uid floods the auth endpoint's unix socket (its mode loosened, as an
/// operator sharing it with another container might) with connections that say nothing, from
/// before PgBouncer's first login: PgBouncer's auth connection must still get in, every
/// application login succeeds, and the flood costs a few log lines, not one per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_flooding_the_unix_endpoint_does_not_stop_pgbouncer() {
    use std::os::unix::fs::PermissionsExt;

    let standin = Standin::start();
    let work = test_dir("hostile-unix");
    let listen_port = free_port();
    let settings = two_users("mode = \"auth-query\"\nauth_listen = \"unix:6439\"");
    let mut daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    let socket = daemon.pgbouncer_dir.join(".s.PGSQL.6439");
    for (path, mode) in [(&*daemon.pgbouncer_dir, 0o711), (&*socket, 0o666)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let (rss_before, fds_before) = (anonymous_memory_kib(daemon.pid()), open_fds(daemon.pid()));

    let socket_target = format!("unix:{}", socket.display());
    let mut flood = Flood::start(&socket_target, 300, 12.0, flood::Kind::Idle);
    // Logins start once the flood has opened more connections than the endpoint has slots.
    flood.wait_opened(200);
    let tally = log_in_in_turns(listen_port, Duration::from_secs(8), |_| {}).await;
    let (rss_during, fds_during) = (anonymous_memory_kib(daemon.pid()), open_fds(daemon.pid()));
    let total = flood.finish();

    let refusal_lines = daemon.count_in_log("connection from another uid closed");
    eprintln!(
        "unix flood from another uid: {total} connections; {} of {} logins succeeded; daemon RssAnon \
         {rss_before} KiB before, {rss_during} KiB during; fds {fds_before} before, \
         {fds_during} during, {} after; {refusal_lines} log lines on refusals by uid, {} on \
         too many connections",
        tally.ok(),
        tally.ok() + tally.failures().len(),
        open_fds(daemon.pid()),
        daemon.count_in_log("too many connections"),
    );
    tally.assert_no_failures(&daemon.log());
    assert!(tally.ok() >= 10, "only {} logins", tally.ok());
    assert!(
        total > 1000,
        "the flood opened only {total} connections: it was not refused at accept"
    );
    // Its connections are closed at accept: nothing piles up in the daemon.
    assert!(
        support::wait_until(Duration::from_secs(5), || open_fds(daemon.pid())
            <= fds_before + 4),
        "fds: {fds_before} before, {} after",
        open_fds(daemon.pid())
    );
    assert!(
        (1..=6).contains(&refusal_lines),
        "{refusal_lines} log lines for {total} refused connections"
    );
    // The flood outlasted one interval: its count was summarised.
    daemon.wait_for_log("not logged one by one", Duration::from_secs(15));
}

/// What one run of [`logins_under_a_tcp_flood`] saw.
struct FloodRun {
    opened: usize,
    logins: Tally,
    rss_kib: (u64, u64),
    fds: (usize, usize, usize),
    log: String,
}

/// Starts a supervised daemon with `settings`, then floods `127.0.0.1:flood_port` from
/// another uid with `held` connections that say nothing (from before PgBouncer's first
/// login), and logs in through PgBouncer every 200 ms for 8 s. With `relogin`, each login
/// first kills the user's idle server connections, so that PgBouncer must open a new one
/// (through the flooded listener) for it.
async fn logins_under_a_tcp_flood(
    settings: &str,
    flood_port: u16,
    held: usize,
    relogin: bool,
) -> FloodRun {
    let standin = Standin::start();
    let work = test_dir("hostile-tcp");
    let listen_port = free_port();
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, settings);
    let rss_before = anonymous_memory_kib(daemon.pid());
    let fds_before = open_fds(daemon.pid());
    let mut flood = Flood::start(
        &format!("tcp:127.0.0.1:{flood_port}"),
        held,
        12.0,
        flood::Kind::Idle,
    );
    flood.wait_opened(held);

    let logins = log_in_in_turns(listen_port, Duration::from_secs(8), |user| {
        if relogin {
            support::client::kill_idle_backends(&standin, user);
        }
    })
    .await;
    let rss_during = anonymous_memory_kib(daemon.pid());
    let fds_during = open_fds(daemon.pid());
    let opened = flood.finish();
    // Once the flood has gone, its connections go too.
    support::wait_until(Duration::from_secs(15), || {
        open_fds(daemon.pid()) <= fds_before + 8
    });
    FloodRun {
        opened,
        logins,
        rss_kib: (rss_before, rss_during),
        fds: (fds_before, fds_during, open_fds(daemon.pid())),
        log: daemon.log(),
    }
}

/// Reports `run`'s figures, then checks that every login went through (at least
/// `min_logins`), that the flood's connections went with it, and that it cost the log a few
/// lines, not one per connection.
fn check(what: &str, run: &FloodRun, min_logins: usize) {
    let total = run.logins.ok() + run.logins.failures().len();
    let log_lines = run.log.lines().count();
    let line = format!(
        "{what}: {} connections; {} of {total} logins succeeded; daemon RssAnon {} KiB before, {} \
         KiB during; fds {} before, {} during, {} after; {log_lines} daemon log lines",
        run.opened,
        run.logins.ok(),
        run.rss_kib.0,
        run.rss_kib.1,
        run.fds.0,
        run.fds.1,
        run.fds.2
    );
    eprintln!("{line}");
    run.logins.assert_no_failures(&run.log);
    assert!(run.logins.ok() >= min_logins, "{line}\n{}", run.log);
    assert!(run.fds.2 <= run.fds.0 + 8, "{line}");
    // Thousands of connections closed; the whole log (PgBouncer's lines included) is tens.
    assert!(log_lines < 300, "{line}");
}

/// The auth endpoint on loopback TCP (where no uid can be checked): another uid holds 300
/// connections that say nothing, more than the endpoint's 64 slots, from before PgBouncer's
/// first login. Each new connection beyond the slots closes the oldest one that has not
/// logged in, so PgBouncer's auth connection gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_flood_on_the_auth_endpoint_slows_pgbouncer_down_but_does_not_stop_it() {
    let auth_port = free_port();
    let settings = two_users(&format!(
        "mode = \"auth-query\"\nauth_listen = \"127.0.0.1:{auth_port}\""
    ));
    let run = logins_under_a_tcp_flood(&settings, auth_port, 300, false).await;
    check("TCP flood on the auth endpoint", &run, 10);
}

/// The relay on loopback TCP: another uid holds 1,100 connections that say nothing, more than
/// the relay's 512 slots, while every application login needs a new server connection
/// through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_flood_on_the_relay_slows_pgbouncer_down_but_does_not_stop_it() {
    let relay_port = free_port();
    let settings = two_users(&format!(
        "mode = \"passthrough\"\nrelay_listen = \"127.0.0.1:{relay_port}\""
    ));
    let run = logins_under_a_tcp_flood(&settings, relay_port, 1100, true).await;
    // Each round waits for the stand-in to end the idle server connections: fewer rounds.
    check("TCP flood on the relay", &run, 5);
}
