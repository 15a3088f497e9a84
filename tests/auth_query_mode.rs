//! Auth-query mode end to end: the real daemon's endpoint answering a real PgBouncer's
//! auth_query, in front of the RDS stand-in.

mod support;

use std::time::{Duration, Instant};
use support::client::{connect, describe, kill_idle_backends, scalar};
use support::daemon::Daemon;
use support::{Standin, free_port, test_dir};
use tokio_postgres::NoTls;

async fn current_user(client: &tokio_postgres::Client) -> Result<String, String> {
    scalar(client, "SELECT current_user").await
}

fn start(standin: &Standin, work: &std::path::Path, listen_port: u16, auth_listen: &str) -> Daemon {
    let settings = format!(
        r#"
mode = "auth-query"
token_lifetime = 20
auth_listen = "{auth_listen}"

[pgbouncer]
pool_mode = "transaction"
server_check_delay = 0

[[databases]]
name = "appdb"
host = "localhost"
port = {{standin_port}}
dbname = "appdb"
users = ["app_user", "reporter"]
"#
    );
    Daemon::start_supervised(work, standin, listen_port, &settings)
}

/// Two IAM users that are in no file reach the stand-in; a user off the allow-list does not,
/// and nobody but PgBouncer's auth user gets into the endpoint. Over a unix socket, where
/// PgBouncer never uses TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_users_through_a_unix_socket_endpoint() {
    let standin = Standin::start();
    let work = test_dir("auth-query-unix");
    let listen_port = free_port();
    let auth_port = free_port();
    let daemon = start(
        &standin,
        work.path(),
        listen_port,
        &format!("unix:{auth_port}"),
    );

    for user in ["app_user", "reporter"] {
        let client = connect(listen_port, user, "appdb").await.unwrap();
        assert_eq!(current_user(&client).await.unwrap(), user);
        let files = [
            "databases.ini",
            "userlist.txt",
            "pg_hba.conf",
            "pgbouncer.ini",
        ];
        for file in files {
            let text = std::fs::read_to_string(daemon.pgbouncer_dir.join(file)).unwrap();
            assert!(!text.contains(user), "{user} appears in {file}");
        }
    }
    let refused = match connect(listen_port, "second_user", "appdb").await {
        Ok(client) => current_user(&client).await.unwrap_err(),
        Err(error) => error,
    };
    assert!(
        refused.contains("password authentication failed") || refused.contains("no such user"),
        "{refused}"
    );
    // What happened shows in the metrics.
    let value = |series: &str| {
        daemon
            .metric(series)
            .unwrap_or_else(|| panic!("no {series} in {:?}", daemon.http_get("/metrics")))
    };
    assert!(value("aws_pgbouncer_auth_query_requests_total{result=\"token\"}") >= 2.0);
    assert!(value("aws_pgbouncer_auth_query_requests_total{result=\"unknown_user\"}") >= 1.0);

    // PgBouncer's auth_query went over the unix socket: its auth entry names the directory.
    let socket_dir = daemon.pgbouncer_dir.to_str().unwrap().to_owned();
    let databases = std::fs::read_to_string(daemon.pgbouncer_dir.join("databases.ini")).unwrap();
    assert!(
        databases.contains(&format!("host={socket_dir} port={auth_port}"))
            || databases.contains(&format!("host='{socket_dir}' port={auth_port}")),
        "{databases}"
    );
    let outcome = |name: &str| {
        value(&format!(
            "aws_pgbouncer_endpoint_connections_total{{outcome=\"{name}\"}}"
        ))
    };
    // PgBouncer closes its own auth connection after the refused login: once it has, every
    // connection the endpoint counts from here on is this test's.
    let open_now = || value("aws_pgbouncer_endpoint_connections ");
    assert!(
        support::wait_until(Duration::from_secs(5), || open_now() == 0.0),
        "PgBouncer's auth connection still open: {}",
        open_now()
    );
    let outcomes = || ["completed", "refused", "failed"].map(outcome);
    let before = outcomes();

    // The endpoint itself admits PgBouncer's auth user only, with its password.
    let auth_secret = std::fs::read_to_string(daemon.pgbouncer_dir.join("auth-secret")).unwrap();
    let endpoint_login = |user: &str, password: Option<&str>| {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&socket_dir)
            .port(auth_port)
            .user(user)
            .dbname("appdb");
        if let Some(password) = password {
            config.password(password);
        }
        async move {
            config
                .connect(NoTls)
                .await
                .map(|(client, connection)| {
                    tokio::spawn(connection);
                    client
                })
                .map_err(|e| describe(&e))
        }
    };
    let session = endpoint_login("aws_pgbouncer_auth", Some(auth_secret.trim()))
        .await
        .expect("PgBouncer's auth user gets in");
    // While it is open, it counts as open; once closed, as completed.
    assert_eq!(open_now(), 1.0);
    drop(session);
    assert!(
        support::wait_until(Duration::from_secs(5), || open_now() == 0.0),
        "still counted as open: {}",
        open_now()
    );
    // Without a password the server's SCRAM request cannot even be answered.
    assert!(endpoint_login("aws_pgbouncer_auth", None).await.is_err());
    for (user, password) in [
        ("aws_pgbouncer_auth", "wrong"),
        ("app_user", auth_secret.trim()),
    ] {
        let error = endpoint_login(user, Some(password))
            .await
            .expect_err("refused");
        assert!(
            error.contains("authentication failed") || error.contains("not permitted"),
            "{user}: {error}"
        );
    }
    // Each of those four connections shows in the metrics, once, by how it ended: the two
    // wrong logins refused, the one without a password (which the client broke off) failed.
    let want = [before[0] + 1.0, before[1] + 2.0, before[2] + 1.0];
    let counted = |outcomes: [f64; 3]| outcomes.iter().sum::<f64>();
    assert!(
        support::wait_until(Duration::from_secs(5), || counted(outcomes())
            >= counted(want)),
        "endpoint connections counted: {before:?} -> {:?}",
        outcomes()
    );
    assert_eq!(outcomes(), want);
}

/// The hard part: a client that logged in once and stays connected for more than three token
/// lifetimes, while its server connections are killed again and again, so PgBouncer must log
/// in with a token that is current then, not the one from the client's login. Over TCP with
/// TLS verify-full for both RDS and the endpoint, the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_client_outlives_its_login_token() {
    let standin = Standin::start();
    let work = test_dir("auth-query-tcp");
    let listen_port = free_port();
    let mut daemon = start(
        &standin,
        work.path(),
        listen_port,
        &format!("127.0.0.1:{}", free_port()),
    );
    let ini = std::fs::read_to_string(daemon.pgbouncer_dir.join("pgbouncer.ini")).unwrap();
    assert!(ini.contains("server_tls_sslmode = verify-full"), "{ini}");

    let client = connect(listen_port, "app_user", "appdb").await.unwrap();
    let started = Instant::now();
    let lifetime = Duration::from_secs(20);
    // How many server logins the stand-in had judged when the client's login token expired.
    let mut judged_at_expiry = None;
    let mut queries = 0;
    let mut kills = 0;
    // Until the session has lasted more than three token lifetimes and PgBouncer had to log
    // in again at least ten times: conditions, not a count of rounds that depends on speed.
    // Every kill is followed by a query, which needs a new server login.
    loop {
        match current_user(&client).await {
            Ok(user) if user == "app_user" => queries += 1,
            outcome => panic!("{:?}: {outcome:?}\n{}", started.elapsed(), daemon.log()),
        }
        if started.elapsed() >= 3 * lifetime + Duration::from_secs(8) && kills >= 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "only {kills} kills in 180 s"
        );
        if judged_at_expiry.is_none() && started.elapsed() > lifetime {
            judged_at_expiry = Some(standin.verifier_log().len());
        }
        // The server connection is idle between transactions: kill it.
        kills += kill_idle_backends(&standin, "app_user");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let logins: Vec<_> = standin
        .verifier_log()
        .into_iter()
        .skip(judged_at_expiry.expect("the session outlived a token lifetime"))
        .filter(|entry| entry["user"] == "app_user")
        .collect();
    // After the login token's expiry PgBouncer logged in again and again, each time with a
    // token that the stand-in accepted.
    assert!(
        logins.len() >= 5 && logins.iter().all(|entry| entry["accepted"] == true),
        "{queries} queries, {kills} kills; logins after the login token expired: {logins:#?}"
    );
    assert!(daemon.is_running());
}
