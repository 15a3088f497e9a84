//! The relay's sessions against the RDS stand-in: a real PgBouncer logs in through it with no
//! token in any file, across token lifetimes and killed backends, and cancels reach the
//! stand-in; shutdown waits for a relayed session, then cuts it off.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::client::kill_idle_backends;
use support::relay::{
    Relay, SECRET, TARGET, config, current_user, explain, token_source, upstream,
};
use support::{PgBouncer, Standin, free_port, test_dir, wait_until, write_file};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// A PgBouncer whose two IAM users log in to the relay with the relay secret, and whose
/// clients log in from loopback without a password.
fn pgbouncer_through(relay_port: u16, dir: &Path) -> (PgBouncer, u16) {
    let port = free_port();
    write_file(
        &dir.join("userlist.txt"),
        &format!("\"app_user\" \"{SECRET}\"\n\"reporter\" \"{SECRET}\"\n"),
        0o600,
    );
    write_file(
        &dir.join("hba.conf"),
        "host all all 127.0.0.1/32 trust\n",
        0o600,
    );
    let ini = dir.join("pgbouncer.ini");
    write_file(
        &ini,
        &format!(
            "[databases]\n\
             appdb = host=127.0.0.1 port={relay_port} dbname={TARGET}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = hba\n\
             auth_hba_file = {dir}/hba.conf\n\
             auth_file = {dir}/userlist.txt\n\
             server_tls_sslmode = disable\n\
             pool_mode = transaction\n\
             ignore_startup_parameters = extra_float_digits\n\
             server_login_retry = 1\n\
             pidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display(),
        ),
        0o600,
    );
    (PgBouncer::start(&ini), port)
}

async fn through_pgbouncer(port: u16, user: &str) -> Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname("appdb")
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("{user} through PgBouncer: {}", explain(&e)));
    tokio::spawn(connection);
    client
}

/// This process's established TCP connections: (local port, remote port, timer kind).
fn our_connections() -> Vec<(u16, u16, String)> {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let port =
        |address: &str| u16::from_str_radix(address.rsplit(':').next().unwrap(), 16).unwrap();
    let mut connections = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields[3] == "01" && ours.contains(fields[9]) {
                let timer = fields[5].split(':').next().unwrap().to_owned();
                connections.push((port(fields[1]), port(fields[2]), timer));
            }
        }
    }
    connections
}

/// The timer kind (`tr` in /proc/net/tcp) of each of this process's established TCP
/// connections to `port`, i.e. the relay's upstream connections. 2 means keepalive: an idle
/// connection has that timer armed only when SO_KEEPALIVE is on.
fn timers_of_connections_to(port: u16) -> Vec<String> {
    our_connections()
        .into_iter()
        .filter(|(_, remote, _)| *remote == port)
        .map(|(_, _, timer)| timer)
        .collect()
}

/// Whether the relay holds exactly one PgBouncer connection per upstream connection: after
/// the stand-in ends a backend, the relay has closed PgBouncer's side too.
fn relay_sides_match(relay_port: u16, upstream_port: u16) -> bool {
    let connections = our_connections();
    let count =
        |f: &dyn Fn(&(u16, u16, String)) -> bool| connections.iter().filter(|c| f(c)).count();
    count(&|c| c.0 == relay_port) == count(&|c| c.1 == upstream_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_logs_in_through_the_relay_across_token_lifetimes_and_cancels() {
    let standin = Standin::start();
    let lifetime = Duration::from_secs(20);
    let target = upstream(&standin, standin.host(), standin.port());
    let relay = Relay::tcp(
        config(&standin.ca_path(), vec![(TARGET, target)]),
        token_source(&standin, lifetime),
    )
    .await;
    let dir = test_dir("relay-pgbouncer");
    let (pgbouncer, port) = pgbouncer_through(relay.port, dir.path());

    let started = Instant::now();
    for user in ["app_user", "reporter"] {
        let client = through_pgbouncer(port, user).await;
        assert_eq!(current_user(&client).await, user, "{}", pgbouncer.log());
        let db: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(db, "appdb");
    }
    let logins = |standin: &Standin, user: &str| {
        standin
            .verifier_log()
            .iter()
            .filter(|d| d["user"] == user && d["accepted"] == true)
            .count()
    };
    assert_eq!(logins(&standin, "app_user"), 1);
    assert_eq!(logins(&standin, "reporter"), 1);
    // Both upstream connections idle in PgBouncer's pool with keepalive on, as PgBouncer's
    // own server connections would (tcp_keepalive = 1): a vanished RDS shows up even there.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let timers = timers_of_connections_to(standin.port());
            timers.len() == 2 && timers.iter().all(|kind| kind == "02")
        }),
        "timer kinds of the upstream connections: {:?}",
        timers_of_connections_to(standin.port())
    );

    // A client that stays connected across more than one token lifetime, whose server
    // connection is killed now and then: PgBouncer logs in again each time, through the
    // relay, which must hand the stand-in a live token.
    // Each killed backend's end reaches PgBouncer through the relay, which closes
    // PgBouncer's side: PgBouncer drops that idle server connection, so no query fails.
    let long_lived = through_pgbouncer(port, "app_user").await;
    let mut kills = 0;
    while started.elapsed() < lifetime + Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        kills += kill_idle_backends(&standin, "app_user");
        assert!(
            wait_until(Duration::from_secs(5), || relay_sides_match(
                relay.port,
                standin.port()
            )),
            "the relay kept PgBouncer's side of a dead upstream connection"
        );
        assert_eq!(
            current_user(&long_lived).await,
            "app_user",
            "{}",
            pgbouncer.log()
        );
        let fresh = through_pgbouncer(port, "reporter").await;
        assert_eq!(current_user(&fresh).await, "reporter");
    }
    assert!(kills >= 4, "{kills} kills");
    assert!(
        logins(&standin, "app_user") >= 3,
        "{:?}",
        standin.verifier_log()
    );
    let refused: Vec<_> = standin
        .verifier_log()
        .into_iter()
        .filter(|d| d["accepted"] != true)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");

    // A cancel from the client reaches the stand-in through PgBouncer and the relay.
    let client = through_pgbouncer(port, "app_user").await;
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    assert!(
        standin.wait_for_active_query("app_user", "SELECT pg_sleep(30)", Duration::from_secs(10)),
        "the query never ran on the stand-in"
    );
    let asked = Instant::now();
    cancel.cancel_query(NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query ends soon after the cancel")
        .unwrap();
    let error = result.expect_err("the query was cancelled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error}");
    assert!(asked.elapsed() < Duration::from_secs(5));

    drop(pgbouncer);
    relay.stop().await;
}

/// A relayed session stays the relay's until it ends, however long after its login: shutdown
/// waits for it up to the grace (2 s here), then cuts it off, rather than returning at once
/// and leaving it to run on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_relayed_session_then_cuts_it_off() {
    let standin = Standin::start();
    let source = token_source(&standin, Duration::from_secs(900));
    let good = upstream(&standin, standin.host(), standin.port());
    let relay = Relay::tcp(config(&standin.ca_path(), vec![(TARGET, good)]), source).await;
    let client = relay
        .connect("app_user", Some(SECRET), TARGET)
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "app_user");

    let stopping = Instant::now();
    relay.stop().await;
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "serve returned after {took:?}, without waiting for the relayed session"
    );
    let after = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1"))
        .await
        .expect("the cut-off session answers at once");
    assert!(after.is_err(), "the relayed session outlived the relay");
}
