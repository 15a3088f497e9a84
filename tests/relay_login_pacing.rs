//! Passthrough mode paces new upstream logins per RDS host (`relay_login_rate`): a burst of
//! PgBouncer's server logins all succeed, spread out at the rate, and a login whose turn is
//! further off than it may wait is refused with 57P03.

mod support;

use std::time::{Duration, Instant};
use support::client::{connect, scalar};
use support::daemon::{Daemon, PASSTHROUGH_SETTINGS};
use support::{Standin, free_port, test_dir};
use tokio_postgres::error::SqlState;

/// One login per second per host, so a burst of one: slow enough that PgBouncer's own pace
/// (it opens one server connection of a pool at a time, about 0.4 s apart here) is well within.
fn settings() -> String {
    format!("relay_login_rate = 1\n{PASSTHROUGH_SETTINGS}")
}

const DELAYED: &str = "aws_pgbouncer_relay_logins_delayed_total";
const REFUSED: &str = "aws_pgbouncer_relay_refusals_total{reason=\"login_rate\"}";

/// Five clients in open transactions need five server connections: at one login a second
/// with a burst of one, the last can log in no sooner than four seconds after the first, and
/// every login after the burst was delayed. (Unpaced, the five take about 1.8 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_server_logins_all_succeed_at_the_configured_rate() {
    const LOGINS: u32 = 5;
    let standin = Standin::start();
    let work = test_dir("relay-pacing-burst");
    let listen_port = free_port();
    let daemon = Daemon::start_supervised(work.path(), &standin, listen_port, &settings());
    let delayed_before = daemon
        .metric(DELAYED)
        .expect("the delayed counter is exposed");

    let started = Instant::now();
    let clients = (0..LOGINS).map(|_| async move {
        let client = connect(listen_port, "app_user", "appdb").await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| e.to_string())?;
        // Inside the transaction, so each client holds a server connection of its own.
        scalar(&client, "SELECT current_user").await?;
        Ok::<_, String>(client)
    });
    let sessions = all_at_once(clients).await;
    let took = started.elapsed();
    for session in &sessions {
        assert!(session.is_ok(), "{session:?}\n{}", daemon.log());
    }
    assert!(
        took >= Duration::from_secs(u64::from(LOGINS - 1)),
        "{LOGINS} server logins took only {took:?}"
    );
    let delayed = daemon.metric(DELAYED).unwrap() - delayed_before;
    assert!(delayed >= f64::from(LOGINS - 1), "{delayed} logins delayed");
    assert_eq!(daemon.metric(REFUSED), Some(0.0));
}

/// Eight logins at once at one login a second: turns at 0, 1, ..., 7 s, and a login waits at
/// most half the relay's 10 s handshake timeout, so those whose turn is beyond 5 s are refused
/// at once, with 57P03 and the reason, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_whose_turn_is_too_far_off_are_refused_with_57p03() {
    let standin = Standin::start();
    let work = test_dir("relay-pacing-refused");
    let daemon = Daemon::start_supervised(work.path(), &standin, free_port(), &settings());
    let secret = std::fs::read_to_string(daemon.pgbouncer_dir.join("relay-secret")).unwrap();
    let logins = (0..8).map(|_| {
        // As PgBouncer logs in to the relay.
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&daemon.pgbouncer_dir)
            .port(6434)
            .user("app_user")
            .password(secret.trim())
            .dbname("appdb")
            .connect_timeout(Duration::from_secs(15));
        async move { config.connect(tokio_postgres::NoTls).await }
    });
    let mut admitted = 0;
    let mut refused = 0;
    let mut sessions = Vec::new();
    for login in all_at_once(logins).await {
        match login {
            Ok(session) => {
                admitted += 1;
                sessions.push(session);
            }
            Err(error) => {
                let db = error.as_db_error().unwrap_or_else(|| panic!("{error}"));
                assert_eq!(db.code(), &SqlState::CANNOT_CONNECT_NOW, "{}", db.message());
                assert!(
                    db.message().contains("relay_login_rate"),
                    "{}",
                    db.message()
                );
                refused += 1;
            }
        }
    }
    // Six turns within 5 s (five if a login just before took the first; more only if the
    // logins reached the relay spread over seconds): some waited their turn, some were refused.
    assert!(
        admitted >= 5 && refused >= 1 && admitted + refused == 8,
        "{admitted} in, {refused} refused"
    );
    assert_eq!(daemon.metric(REFUSED), Some(f64::from(refused)));
}

/// Runs the futures at once and collects their outputs in order.
async fn all_at_once<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}
