//! A real Postgres client (tokio-postgres) for traffic through PgBouncer, and a tally of what
//! that traffic saw.

use super::Standin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// A client of PgBouncer on 127.0.0.1:`port`, without a password (loopback trust).
pub async fn connect(
    port: u16,
    user: &str,
    dbname: &str,
) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await
        .map_err(|error| format!("connect {user}@{dbname}: {}", describe(&error)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// tokio-postgres shows a server's error only as "db error" unless asked for it.
pub fn describe(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map_or_else(|| error.to_string(), |db| db.message().to_owned())
}

/// The first column of the first row of `sql`.
pub async fn scalar(client: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let rows = client
        .simple_query(sql)
        .await
        .map_err(|error| format!("{sql}: {}", describe(&error)))?;
    rows.iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| format!("{sql}: no row"))
}

/// Kills `user`'s idle server connections on the stand-in, so PgBouncer must log in again;
/// returns how many. Busy ones are spared: killing a query in flight is not a login test.
/// Returns once the backends have exited, so their sockets are closed by then.
pub fn kill_idle_backends(standin: &Standin, user: &str) -> usize {
    standin
        .psql_admin(&format!(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) \
             FROM pg_stat_activity WHERE usename = '{user}' AND state = 'idle'"
        ))
        .parse()
        .expect("a count")
}

/// One query as a new client, after killing the idle server connections so that PgBouncer
/// must log in to the stand-in with whatever token it holds now.
pub async fn fresh_login_query(standin: &Standin, listen_port: u16) -> Result<(), String> {
    kill_idle_backends(standin, "app_user");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = connect(listen_port, "app_user", "appdb").await?;
    scalar(&client, "SELECT 1").await.map(drop)
}

/// Applications log in through PgBouncer at `listen_port` every 200 ms for `duration`,
/// `app_user` and `reporter` in turns, each checking who it is; `before` runs before each
/// login with its user. Each login runs PgBouncer's auth_query.
pub async fn log_in_in_turns(listen_port: u16, duration: Duration, before: impl Fn(&str)) -> Tally {
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

/// Makes a test's traffic and its server-connection kills take turns.
///
/// "Idle" in pg_stat_activity is a snapshot: PgBouncer can hand that server connection to a
/// client between the snapshot and the kill, and the client's query then dies with
/// "terminating connection due to administrator command". That says nothing about logins,
/// which is what the kills are for, so traffic pauses while a kill is under way.
#[derive(Default)]
pub struct KillGate(tokio::sync::RwLock<()>);

impl KillGate {
    /// Held by one round of traffic; kills wait for it.
    pub async fn pass(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// `kill_idle_backends` for each of `users` with the traffic paused, and a moment
    /// afterwards for PgBouncer to read the closed sockets before it hands one out.
    pub async fn kill_idle_backends(&self, standin: &Standin, users: &[&str]) -> usize {
        let _paused = self.0.write().await;
        let killed = users
            .iter()
            .map(|user| kill_idle_backends(standin, user))
            .sum();
        tokio::time::sleep(Duration::from_millis(100)).await;
        killed
    }
}

/// Successes and failures seen by traffic generators, with what failed.
#[derive(Default)]
pub struct Tally {
    ok: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    pub fn record(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => self.failures.lock().unwrap().push(error),
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Panics with every failure and `log` (the daemon's, for context) if any query failed.
    pub fn assert_no_failures(&self, log: &str) {
        let failures = self.failures();
        assert!(failures.is_empty(), "{failures:#?}\n{log}");
    }
}
