//! The credential source failing, in config mode on the stand-in with a real PgBouncer and
//! short tokens: credentials rotating every few seconds under traffic, and an outage longer
//! than a refresh. Tokens outlive neither, so logins must go on with whatever the daemon
//! still holds, readiness must say when that runs out, and recovery must need nobody.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::client::{Tally, connect, fresh_login_query, kill_idle_backends, scalar};
use support::credentials_server::CredentialServer;
use support::faults::start_supervised;
use support::{Standin, free_port, test_dir, wait_until};

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
