//! Token host ≠ dialed host: each mode reaches the RDS stand-in through a port-forward
//! (127.0.0.1 on another port: what an SSH tunnel, `kubectl port-forward` or an NLB is) with
//! tokens signed for the stand-in's own name and port, `token_host`/`token_port`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::client::{connect, scalar};
use support::daemon::{Daemon, command, database_flags};
use support::{STANDIN_HOST, Standin, free_port, test_dir};
use tokio::net::{TcpListener, TcpStream};

/// RDS's (and the stand-in's) refusal of a token it does not take.
const PAM_FAILED: &str = "PAM authentication failed for user \"app_user\"";

/// A TCP port-forward to the stand-in, counting the connections it carries.
struct PortForward {
    port: u16,
    carried: Arc<AtomicUsize>,
}

impl PortForward {
    async fn start(to: u16) -> PortForward {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let carried = Arc::new(AtomicUsize::new(0));
        let count = carried.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        PortForward { port, carried }
    }

    fn carried(&self) -> usize {
        self.carried.load(Ordering::Relaxed)
    }
}

/// One database for `app_user`, dialed at the port-forward, its tokens signed for
/// `token` (host and port) if given.
fn settings(mode: &str, forward: &PortForward, token: Option<(&str, u16)>) -> String {
    let users = if mode == "config" {
        "user = \"app_user\""
    } else {
        "users = [\"app_user\"]"
    };
    let token = token.map_or(String::new(), |(host, port)| {
        format!("token_host = \"{host}\"\ntoken_port = {port}\n")
    });
    format!(
        r#"
mode = "{mode}"

[pgbouncer]
server_check_delay = 0

[[databases]]
name = "appdb"
host = "127.0.0.1"
port = {}
{token}dbname = "appdb"
{users}
"#,
        forward.port
    )
}

/// What `app_user` gets from `SELECT current_user` through a daemon with `settings`.
async fn login(standin: &Standin, settings: &str) -> Result<String, String> {
    let work = test_dir("token-host");
    let listen_port = free_port();
    let _daemon = Daemon::start_supervised(work.path(), standin, listen_port, settings);
    let client = connect(listen_port, "app_user", "appdb").await?;
    scalar(&client, "SELECT current_user").await
}

/// The stand-in's IAM decisions since `before`, as (accepted, reason, endpoint).
fn decisions_since(standin: &Standin, before: usize) -> Vec<(bool, String, String)> {
    standin.verifier_log()[before..]
        .iter()
        .map(|entry| {
            (
                entry["accepted"] == true,
                entry["reason"].as_str().unwrap_or_default().to_owned(),
                entry["endpoint"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Through the port-forward, a login succeeds because its token is signed for the stand-in's
/// name and port; the same settings without `token_host`/`token_port` sign for the dialed
/// address, and the stand-in's IAM check refuses that token.
async fn logs_in_only_with_a_token_for_the_token_host(mode: &str) {
    let standin = Standin::start();
    let forward = PortForward::start(standin.port()).await;
    let signed_for = (STANDIN_HOST, standin.port());

    let before = standin.verifier_log().len();
    let user = login(&standin, &settings(mode, &forward, Some(signed_for))).await;
    assert_eq!(user.as_deref(), Ok("app_user"), "{mode}");
    assert!(
        forward.carried() > 0,
        "{mode}: nothing went through the port-forward"
    );
    let endpoint = format!("{STANDIN_HOST}:{}", standin.port());
    let decisions = decisions_since(&standin, before);
    assert!(
        !decisions.is_empty()
            && decisions
                .iter()
                .all(|(accepted, _, signed)| *accepted && *signed == endpoint),
        "{mode}: {decisions:?}"
    );
    // The stand-in recomputed each accepted token with botocore for the token host: the same.
    let log = standin.verifier_log();
    assert!(
        log[before..]
            .iter()
            .all(|entry| entry["botocore_identical"] == true),
        "{mode}: {log:?}"
    );

    let before = standin.verifier_log().len();
    let refused = login(&standin, &settings(mode, &forward, None))
        .await
        .expect_err("a token for the dialed address must be refused");
    assert!(refused.contains(PAM_FAILED), "{mode}: {refused}");
    let dialed = format!("127.0.0.1:{}", forward.port);
    let decisions = decisions_since(&standin, before);
    assert!(
        !decisions.is_empty()
            && decisions.iter().all(|(accepted, reason, signed)| !accepted
                && reason == "wrong_endpoint"
                && *signed == dialed),
        "{mode}: {decisions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_mode_signs_for_the_token_host_and_dials_the_host() {
    logs_in_only_with_a_token_for_the_token_host("config").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_mode_signs_for_the_token_host_and_dials_the_host() {
    logs_in_only_with_a_token_for_the_token_host("auth-query").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_mode_signs_for_the_token_host_and_dials_the_host() {
    logs_in_only_with_a_token_for_the_token_host("passthrough").await;
}

/// The relay dials 127.0.0.1, which the stand-in's certificate names, yet refuses the server
/// because the certificate does not name the token host: it checks whom the token is for,
/// not the route. (Were it to check the dialed name, TLS would pass and the stand-in's IAM
/// check would refuse the token instead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_verifies_the_certificate_against_the_token_host() {
    let standin = Standin::start();
    let forward = PortForward::start(standin.port()).await;
    let elsewhere = "not-on-the-certificate.example";
    let before = standin.verifier_log().len();
    let refused = login(
        &standin,
        &settings("passthrough", &forward, Some((elsewhere, standin.port()))),
    )
    .await
    .expect_err("a certificate without the token host must be refused");
    assert!(
        refused.contains("not valid for name") && refused.contains(elsewhere),
        "{refused}"
    );
    assert!(forward.carried() > 0, "the relay did not dial the host");
    assert_eq!(
        decisions_since(&standin, before),
        Vec::new(),
        "IAM was reached"
    );
}

/// `check` with the single-database flags: `--token-host` (and `AWS_PGBOUNCER_TOKEN_PORT`) sign
/// for the stand-in while `--host`/`--port` dial the port-forward; without them the token is
/// signed for the dialed address and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_signs_for_the_token_host_flags_and_dials_the_host_flags() {
    let standin = Standin::start();
    let forward = PortForward::start(standin.port()).await;
    let run = |token_host: Option<&str>, token_port: Option<u16>| {
        let mut check = command(Some(&standin.static_creds()));
        // The stand-in's database, dialed at the port-forward.
        let mut flags = database_flags(&standin, free_port(), 20);
        for (flag, value) in [
            ("--host", "127.0.0.1".to_owned()),
            ("--port", forward.port.to_string()),
        ] {
            let at = flags.iter().position(|given| given == flag).unwrap();
            flags[at + 1] = value;
        }
        check.arg("check").args(flags);
        if let Some(host) = token_host {
            check.args(["--token-host", host]);
        }
        if let Some(port) = token_port {
            check.env("AWS_PGBOUNCER_TOKEN_PORT", port.to_string());
        }
        async move {
            let output = tokio::process::Command::from(check).output().await.unwrap();
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            (output.status.success(), text)
        }
    };
    let (ok, text) = run(Some(STANDIN_HOST), Some(standin.port())).await;
    assert!(ok && text.contains("OK    appdb"), "{text}");
    assert!(forward.carried() > 0, "check did not dial the host");
    let (ok, text) = run(None, None).await;
    assert!(!ok && text.contains("PAM authentication failed"), "{text}");
}
