//! A noisy neighbour on the auth endpoint: connection floods, slow handshakes, oversized and
//! malformed messages and wrong passwords in a loop, all at once, while applications keep
//! logging in through PgBouncer, whose auth_query goes to that endpoint.

mod support;

use rand::RngExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::client::{Tally, connect, scalar};
use support::daemon::Daemon;
use support::flood::{self, Flood};
use support::{Standin, anonymous_memory_kib, free_port, test_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

const STORM: Duration = Duration::from_secs(20);
const WRONG_PASSWORD_REFUSAL: &str =
    "password authentication failed for user \"aws_pgbouncer_auth\"";

/// Sends `bytes`, then reads until the endpoint closes (or 15 s pass); true if it closed.
async fn send_and_expect_close(port: u16, bytes: &[u8]) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return true;
    };
    let _ = stream.write_all(bytes).await;
    let mut sink = vec![0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .is_ok()
}

/// The server ended the connection without a word: a clean close, or a reset when it closed
/// with our bytes unread. That is how an eviction before login looks from the client.
fn closed_by_the_server(error: &tokio_postgres::Error) -> bool {
    let io_kind = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    error.as_db_error().is_none()
        && (error.to_string() == "connection closed"
            || matches!(
                io_kind,
                Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
            ))
}

fn startup_packet() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for part in ["user", "aws_pgbouncer_auth", "database", "appdb", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_on_the_auth_endpoint_do_not_stop_pgbouncer() {
    let standin = Standin::start();
    let work = test_dir("hostile");
    let listen_port = free_port();
    let auth_port = free_port();
    let settings = format!(
        r#"
mode = "auth-query"
auth_listen = "127.0.0.1:{auth_port}"

[pgbouncer]
pool_mode = "transaction"

[[databases]]
name = "appdb"
host = "localhost"
port = {{standin_port}}
dbname = "appdb"
users = ["app_user", "reporter"]
"#
    );
    let mut daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings);
    let warm = connect(listen_port, "app_user", "appdb").await.unwrap();
    scalar(&warm, "SELECT 1").await.unwrap();
    drop(warm);
    let rss_before = anonymous_memory_kib(daemon.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let refused_passwords = Arc::new(AtomicUsize::new(0));
    let unclosed = Arc::new(AtomicUsize::new(0));
    let mut attackers = tokio::task::JoinSet::new();
    // Floods: a hundred connections at a time that say nothing.
    for _ in 0..2 {
        let stop = stop.clone();
        attackers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut held = Vec::new();
                for _ in 0..50 {
                    if let Ok(stream) = TcpStream::connect(("127.0.0.1", auth_port)).await {
                        held.push(stream);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    // Slow handshakes: a startup packet dribbled out a byte a second.
    for _ in 0..10 {
        let stop = stop.clone();
        attackers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", auth_port)).await else {
                    continue;
                };
                for byte in startup_packet() {
                    if stop.load(Ordering::Relaxed) || stream.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }
    // Oversized and malformed messages: each must be answered by closing.
    {
        let (stop, unclosed) = (stop.clone(), unclosed.clone());
        attackers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut oversized = 0x7fff_ff00u32.to_be_bytes().to_vec();
                oversized.extend_from_slice(&[0x42; 4096]);
                let garbage: Vec<u8> = {
                    let mut rng = rand::rng();
                    (0..rng.random_range(1..2048))
                        .map(|_| rng.random())
                        .collect()
                };
                let mut after_startup = startup_packet();
                after_startup.extend_from_slice(b"Q\xff\xff\xff\xffSELECT 1");
                for bytes in [oversized, garbage, after_startup] {
                    if !send_and_expect_close(auth_port, &bytes).await {
                        unclosed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    // Wrong passwords in a loop: each must be refused as a wrong password (28P01), or, since
    // the floods fill the endpoint, closed before login to make room (the documented
    // eviction of the oldest session that has not logged in). Nothing else.
    let unexpected = Arc::new(std::sync::Mutex::new(Vec::new()));
    let evicted = Arc::new(AtomicUsize::new(0));
    {
        let (stop, refused) = (stop.clone(), refused_passwords.clone());
        let (unexpected, evicted) = (unexpected.clone(), evicted.clone());
        attackers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let attempt = tokio_postgres::Config::new()
                    .host("127.0.0.1")
                    .port(auth_port)
                    .user("aws_pgbouncer_auth")
                    .password("guessed")
                    .dbname("appdb")
                    .connect_timeout(Duration::from_secs(5))
                    .connect(NoTls)
                    .await;
                let Err(error) = attempt else {
                    unexpected.lock().unwrap().push("admitted".to_owned());
                    continue;
                };
                if error.as_db_error().is_some_and(|db| {
                    db.code() == &SqlState::INVALID_PASSWORD
                        && db.message() == WRONG_PASSWORD_REFUSAL
                }) {
                    refused.fetch_add(1, Ordering::Relaxed);
                } else if closed_by_the_server(&error) {
                    evicted.fetch_add(1, Ordering::Relaxed);
                } else {
                    unexpected.lock().unwrap().push(format!("{error:?}"));
                }
            }
        });
    }

    // Meanwhile, applications keep logging in; each login runs PgBouncer's auth_query.
    let tally = log_in_in_turns(listen_port, STORM, |_| {}).await;
    let rss_during = anonymous_memory_kib(daemon.pid());
    stop.store(true, Ordering::Relaxed);
    while attackers.join_next().await.is_some() {}

    tally.assert_no_failures(&daemon.log());
    assert!(tally.ok() >= 50, "only {} logins", tally.ok());
    let unexpected = unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "wrong passwords not refused as such: {unexpected:#?}"
    );
    assert!(refused_passwords.load(Ordering::Relaxed) >= 10);
    assert_eq!(
        unclosed.load(Ordering::Relaxed),
        0,
        "a bad message did not end its session"
    );
    assert!(
        rss_during < rss_before + 32 * 1024,
        "memory grew from {rss_before} KiB to {rss_during} KiB"
    );
    let ended = daemon.count_in_log("session ended");
    eprintln!(
        "hostile: daemon RssAnon {rss_before} KiB before, {rss_during} KiB during the storm; {} \
         refused passwords, {} evicted before login, {ended} \"session ended\" log lines",
        refused_passwords.load(Ordering::Relaxed),
        evicted.load(Ordering::Relaxed)
    );
    // One line per 10 s and a summary, not one per refused session.
    assert!(ended <= 8, "{ended} \"session ended\" lines");
    // Afterwards the endpoint still admits PgBouncer's auth user.
    let secret = std::fs::read_to_string(daemon.pgbouncer_dir.join("auth-secret")).unwrap();
    tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(auth_port)
        .user("aws_pgbouncer_auth")
        .password(secret.trim())
        .dbname("appdb")
        .connect(NoTls)
        .await
        .map(drop)
        .expect("the endpoint still serves after the storm");
    assert!(daemon.is_running());
}

/// Applications log in through PgBouncer at `listen_port` every 200 ms for `duration`,
/// `app_user` and `reporter` in turns, each checking who it is; `before` runs before each
/// login with its user. Each login runs PgBouncer's auth_query.
async fn log_in_in_turns(listen_port: u16, duration: Duration, before: impl Fn(&str)) -> Tally {
    let tally = Tally::default();
    let started = Instant::now();
    for user in ["reporter", "app_user"].into_iter().cycle() {
        if started.elapsed() >= duration {
            break;
        }
        before(user);
        let outcome = async {
            let client = connect(listen_port, user, "appdb").await?;
            let current = scalar(&client, "SELECT current_user").await?;
            (current == user).then_some(()).ok_or(current)
        };
        tally.record(outcome.await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tally
}

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
        "mode = \"passthrough\"\nrelay_listen = \"127.0.0.1:{relay_port}\"\nauth_listen = \"unix\""
    ));
    let run = logins_under_a_tcp_flood(&settings, relay_port, 1100, true).await;
    // Each round waits for the stand-in to end the idle server connections: fewer rounds.
    check("TCP flood on the relay", &run, 5);
}
