//! Cross-account roles through the daemon and a real PgBouncer. STS is moto behind
//! `StsRecorder`, which registers each role credential with the stand-in together with its
//! expiry: the stand-in then refuses tokens signed with expired credentials, as RDS does.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::client::{Tally, connect, kill_idle_backends, scalar};
use support::daemon::Daemon;
use support::sts_recorder::StsRecorder;
use support::{Moto, STATIC_AKID, Standin, free_port, test_dir, token_akid};

const ROLE: &str = "arn:aws:iam::210987654321:role/billing-db";

/// The stand-in, and the STS the daemon assumes `ROLE` from with the stand-in's static key.
struct CrossAccount {
    // Dropped first: the recorder's thread holds a handle on the stand-in.
    sts: StsRecorder,
    _moto: Moto,
    standin: Arc<Standin>,
}

impl CrossAccount {
    fn start() -> Self {
        let standin = Arc::new(Standin::start());
        let moto = Moto::start();
        CrossAccount {
            sts: StsRecorder::start(&moto, standin.clone()),
            _moto: moto,
            standin,
        }
    }

    /// A supervising daemon with `settings`, once PgBouncer has its first tokens.
    fn daemon(&self, work: &std::path::Path, listen_port: u16, settings: &str) -> Daemon {
        let mut daemon = Daemon::spawn_supervised_in_env(
            work,
            &self.standin,
            &self.standin.static_creds(),
            &[("AWS_ENDPOINT_URL_STS", &self.sts.url())],
            listen_port,
            settings,
        );
        daemon.wait_until_started();
        daemon
    }

    /// The access key ids of the stand-in's server logins; panics unless all were accepted.
    fn accepted_login_keys(&self) -> BTreeSet<String> {
        let logins = self.standin.verifier_log();
        let refused: Vec<_> = logins.iter().filter(|l| l["accepted"] != true).collect();
        assert!(refused.is_empty(), "refused server logins: {refused:#?}");
        logins
            .iter()
            .map(|login| login["akid"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `top`-level settings, then one database on the stand-in whose tokens are signed as `ROLE`,
/// with `entry`'s settings too.
fn settings(top: &str, entry: &str) -> String {
    format!(
        r#"{top}
[pgbouncer]
pool_mode = "transaction"
server_check_delay = 0

[[databases]]
name = "appdb"
host = "localhost"
port = {{standin_port}}
dbname = "appdb"
role_arn = "{ROLE}"
{entry}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_credentials_shorter_than_a_token_are_renewed_before_they_expire() {
    let bed = CrossAccount::start();
    let work = test_dir("role-sessions");
    let listen_port = free_port();
    // Tokens for 60 s, role credentials for 20 s: each token outlives its credentials on paper.
    let daemon = bed.daemon(
        work.path(),
        listen_port,
        &settings(
            "token_lifetime = 60",
            "user = \"app_user\"\nrole_duration_seconds = 20",
        ),
    );
    assert!(daemon.token_in_use().contains("X-Amz-Expires=60&"));

    // Three and a half credential lifetimes of logins, each a new server login with the
    // token PgBouncer holds at that moment.
    let tally = Tally::default();
    let mut held = Vec::new();
    let started = Instant::now();
    let started_epoch = epoch_now();
    while started.elapsed() < Duration::from_secs(70) {
        held.push((epoch_now(), token_akid(&daemon.token_in_use())));
        kill_idle_backends(&bed.standin, "app_user");
        let login = async {
            let client = connect(listen_port, "app_user", "appdb").await?;
            let user = scalar(&client, "SELECT current_user").await?;
            (user == "app_user").then_some(()).ok_or(user)
        };
        tally.record(login.await);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let issued = bed.sts.issued();
    for credentials in &issued {
        assert_eq!(credentials.field("RoleArn"), Some(ROLE));
        assert_eq!(credentials.field("DurationSeconds"), Some("20"));
    }
    // (key, issued, expires) in seconds since the traffic started, for the messages.
    let timeline: Vec<_> = issued
        .iter()
        .map(|c| {
            (
                &c.akid,
                c.issued_at - started_epoch,
                c.expires_at - started_epoch,
            )
        })
        .collect();
    // PgBouncer never held a token whose credentials had expired.
    for (at, akid) in &held {
        let credentials = issued
            .iter()
            .find(|credentials| &credentials.akid == akid)
            .unwrap_or_else(|| panic!("{akid} is not a role credential"));
        assert!(
            *at < credentials.expires_at,
            "PgBouncer held a token of {akid} {:.1} s after its credentials expired: {timeline:?}",
            at - credentials.expires_at
        );
    }
    // Each set was replaced while it was still valid, and the sets covered the run.
    assert!(issued.len() >= 4, "{timeline:?}");
    for pair in issued.windows(2) {
        assert!(
            pair[1].issued_at < pair[0].expires_at,
            "no new credentials before {} expired: {timeline:?}",
            pair[0].akid
        );
    }
    // Every server login was accepted, signed as the role with several of its credentials.
    let keys = bed.accepted_login_keys();
    tally.assert_no_failures(&daemon.log());
    assert!(tally.ok() >= 40, "{} logins", tally.ok());
    assert!(keys.len() >= 3, "{keys:?}");
    assert!(
        keys.iter()
            .all(|akid| issued.iter().any(|c| &c.akid == akid)),
        "{keys:?} not all issued for the role"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_logs_in_with_the_assumed_roles_credentials() {
    let bed = CrossAccount::start();
    let work = test_dir("role-passthrough");
    let listen_port = free_port();
    let top = "mode = \"passthrough\"\ntoken_lifetime = 20\n\
               relay_listen = \"unix\"";
    let entry = "users = [\"app_user\"]\nexternal_id = \"aws-pgbouncer-e2e\"\n\
                 role_session_name = \"aws-pgbouncer-relay\"";
    let daemon = bed.daemon(work.path(), listen_port, &settings(top, entry));
    for round in 0..3 {
        kill_idle_backends(&bed.standin, "app_user");
        let client = connect(listen_port, "app_user", "appdb").await.unwrap();
        let user = scalar(&client, "SELECT current_user").await;
        assert_eq!(
            user.as_deref(),
            Ok("app_user"),
            "round {round}: {}",
            daemon.log()
        );
    }

    // The relay signed with the role's key, which STS issued to the daemon, never the pod's.
    let keys = bed.accepted_login_keys();
    assert!(!keys.is_empty());
    assert!(!keys.contains(STATIC_AKID), "{keys:?}");
    let issued = bed.sts.issued();
    assert!(
        keys.iter()
            .all(|akid| issued.iter().any(|c| &c.akid == akid)),
        "{keys:?} not issued for the role: {issued:#?}"
    );
    for credentials in &issued {
        assert_eq!(credentials.field("RoleArn"), Some(ROLE));
        assert_eq!(credentials.field("ExternalId"), Some("aws-pgbouncer-e2e"));
        assert_eq!(
            credentials.field("RoleSessionName"),
            Some("aws-pgbouncer-relay")
        );
    }
    assert!(
        bed.standin
            .verifier_log()
            .iter()
            .all(|login| login["user"] == "app_user"),
    );
}
