//! The relay's refusals: each says why (wrong secret, non-IAM user, unknown database, bad
//! upstream certificate, foreign unix peer), and the relay secret buys only what PgBouncer
//! needs, each refusal counted and kept from the stand-in.

mod support;

use aws_pgbouncer::endpoint::{self, Listen};
use aws_pgbouncer::metrics::Metrics;
use aws_pgbouncer::relay::RelayConfig;
use aws_pgbouncer::token::TokenSource;
use std::sync::Arc;
use std::time::Duration;
use support::relay::{
    Relay, SECRET, TARGET, config, current_user, explain, token_source, upstream,
};
use support::{Standin, psql, test_dir};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

/// Why app_user's login through a relay started with `config` fails (it must fail).
async fn refusal(config: RelayConfig, source: &Arc<TokenSource>) -> String {
    let relay = Relay::tcp(config, Arc::clone(source)).await;
    let error = relay
        .connect("app_user", Some(SECRET), TARGET)
        .await
        .unwrap_err();
    relay.stop().await;
    explain(&error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why() {
    let standin = Standin::start();
    let source = token_source(&standin, Duration::from_secs(900));
    let good = upstream(&standin, standin.host(), standin.port());
    let mut wrong_region = good.clone();
    wrong_region.region = "eu-west-1".into();
    let relay = Relay::tcp(
        config(
            &standin.ca_path(),
            vec![(TARGET, good.clone()), ("wrong_region", wrong_region)],
        ),
        Arc::clone(&source),
    )
    .await;

    // The relay secret admits any user name; RDS decides who exists.
    let client = relay
        .connect("app_user", Some(SECRET), TARGET)
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "app_user");

    let error = relay
        .connect("app_user", Some("not-the-secret"), TARGET)
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_PASSWORD),
        "{}",
        explain(&error)
    );
    assert!(relay.connect("app_user", None, TARGET).await.is_err());

    let error = relay
        .connect("password_user", Some(SECRET), TARGET)
        .await
        .unwrap_err();
    assert!(
        explain(&error).contains(
            "user \"password_user\" is not an IAM user: the server asked for a password \
             (GRANT rds_iam TO password_user)"
        ),
        "{}",
        explain(&error)
    );

    let error = relay
        .connect("app_user", Some(SECRET), "nowhere")
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_CATALOG_NAME),
        "{}",
        explain(&error)
    );

    // The stand-in's own refusal reaches the client unchanged.
    let error = relay
        .connect("app_user", Some(SECRET), "wrong_region")
        .await
        .unwrap_err();
    assert!(
        explain(&error).ends_with(" PAM authentication failed for user \"app_user\""),
        "{}",
        explain(&error)
    );
    relay.stop().await;

    // An upstream whose certificate another CA signed.
    let other = test_dir("relay-other-ca");
    let (_, other_ca) = endpoint::self_signed_tls(other.path()).unwrap();
    let text = refusal(config(&other_ca, vec![(TARGET, good.clone())]), &source).await;
    assert!(
        text.starts_with("08001 TLS with localhost:") && text.contains("invalid peer certificate"),
        "{text}"
    );

    // An upstream reached under a name its certificate does not carry (127.0.0.2, forwarded
    // to the stand-in on 127.0.0.1).
    let forwarder = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let forwarded_port = forwarder.local_addr().unwrap().port();
    let standin_port = standin.port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = forwarder.accept().await {
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(("127.0.0.1", standin_port))
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let wrong_name = upstream(&standin, "127.0.0.2", forwarded_port);
    let text = refusal(
        config(&standin.ca_path(), vec![(TARGET, wrong_name)]),
        &source,
    )
    .await;
    assert!(
        text.contains("invalid peer certificate") && text.contains("127.0.0.2"),
        "{text}"
    );

    // On a unix socket, PgBouncer's uid logs in without a password; any other uid must
    // know the secret.
    let dir = test_dir("relay-unix");
    let socket_port = 6543;
    let path = dir.path().join(format!(".s.PGSQL.{socket_port}"));
    let uid = unsafe { libc::geteuid() };
    for (peer_uid, admitted) in [(uid, true), (uid.wrapping_add(1), false)] {
        let mut config = config(&standin.ca_path(), vec![(TARGET, good.clone())]);
        config.peer_uid = Some(peer_uid);
        let relay = Relay::start(
            Listen::Unix {
                path: path.clone(),
                mode: 0o600,
            },
            config,
            Arc::clone(&source),
        )
        .await;
        let connected = tokio_postgres::Config::new()
            .host_path(dir.path())
            .port(socket_port)
            .user("reporter")
            .dbname(TARGET)
            .connect(NoTls)
            .await;
        match connected {
            Ok((client, connection)) => {
                assert!(admitted, "uid {uid} admitted without a password");
                tokio::spawn(connection);
                assert_eq!(current_user(&client).await, "reporter");
            }
            Err(error) => assert!(!admitted, "{}", explain(&error)),
        }
        relay.stop().await;
    }
    // The psql in the test bed agrees with tokio-postgres on the wire, TLS aside.
    let relay = Relay::tcp(
        config(&standin.ca_path(), vec![(TARGET, good)]),
        Arc::clone(&source),
    )
    .await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=reporter dbname={TARGET} sslmode=disable",
        relay.port
    );
    let out = tokio::task::spawn_blocking(move || psql(&conninfo, Some(SECRET), "SELECT 1"))
        .await
        .unwrap();
    assert_eq!(out.as_deref(), Ok("1"));
    relay.stop().await;
}

/// Whoever holds the relay secret gets no more than PgBouncer needs: the allowed users, the
/// target's database, PgBouncer's own startup parameters. Each refusal carries a SQLSTATE, is
/// counted, and reaches the stand-in not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_secret_buys_only_what_pgbouncer_needs() {
    let standin = Standin::start();
    let mut target = upstream(&standin, standin.host(), standin.port());
    target.users = vec!["app_user".into()];
    let metrics = Arc::new(Metrics::new(&[], Vec::new));
    let mut config = config(&standin.ca_path(), vec![(TARGET, target)]);
    config.metrics = Some(Arc::clone(&metrics));
    let relay = Relay::tcp(config, token_source(&standin, Duration::from_secs(900))).await;
    let refusals = |reason: &str| {
        let line = format!("aws_pgbouncer_relay_refusals_total{{reason=\"{reason}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {line} in {}", metrics.encode()))
    };

    // `reporter` is an IAM user the stand-in would admit, but not on this target's list.
    let error = relay
        .connect("reporter", Some(SECRET), TARGET)
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{}",
        explain(&error)
    );
    assert_eq!(refusals("user_not_allowed"), "1");

    let error = relay
        .connect("app_user", Some(SECRET), "appdb")
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_CATALOG_NAME),
        "{}",
        explain(&error)
    );
    assert_eq!(refusals("unknown_database"), "1");

    let (error, secret_refused) = {
        let mut with_options = tokio_postgres::Config::new();
        with_options
            .host("127.0.0.1")
            .port(relay.port)
            .user("app_user")
            .password(SECRET)
            .dbname(TARGET)
            .options("-c search_path=attacker");
        (
            with_options.connect(NoTls).await.err().unwrap(),
            refusals("authentication"),
        )
    };
    assert_eq!(
        error.code(),
        Some(&SqlState::PROTOCOL_VIOLATION),
        "{}",
        explain(&error)
    );
    assert!(
        explain(&error).contains("\"options\""),
        "{}",
        explain(&error)
    );
    assert_eq!(refusals("startup_parameter"), "1");
    assert_eq!(secret_refused, "0");
    assert!(
        standin.verifier_log().is_empty(),
        "the stand-in saw a login: {:?}",
        standin.verifier_log()
    );

    // What PgBouncer sends still goes through, with a wrong secret counted apart.
    let client = relay
        .connect("app_user", Some(SECRET), TARGET)
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "app_user");
    assert!(
        relay
            .connect("app_user", Some("guess"), TARGET)
            .await
            .is_err()
    );
    assert_eq!(refusals("authentication"), "1");
    relay.stop().await;
}
