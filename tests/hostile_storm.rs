//! A noisy neighbour on the auth endpoint: connection floods, slow handshakes, oversized and
//! malformed messages and wrong passwords in a loop, all at once, while applications keep
//! logging in through PgBouncer, whose auth_query goes to that endpoint. The endpoint must
//! answer each abuse by closing or refusing, not with memory, log lines or a stall that
//! would keep PgBouncer's own logins out.

mod support;

use rand::RngExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::client::{connect, log_in_in_turns, scalar};
use support::daemon::Daemon;
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
