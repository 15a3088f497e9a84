//! The relay against the RDS stand-in: a real PgBouncer logs in through it with no token in
//! any file, cancels reach the stand-in, and every refusal says why. The token source signs
//! with the stand-in's static test key, a real credential provider.

mod support;

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_pgbouncer::endpoint::{self, BoundListener, Listen};
use aws_pgbouncer::metrics::Metrics;
use aws_pgbouncer::relay::{self, Limits, RelayConfig, Upstream};
use aws_pgbouncer::token::{CredentialCache, Presenter, TokenKind, TokenSource};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::client::kill_idle_backends;
use support::{PgBouncer, Standin, free_port, psql, test_dir, wait_until, write_file};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const SECRET: &str = "relay-secret-7d1c0a";
/// PgBouncer's name for the stand-in's `appdb`, different on purpose: the relay maps it.
const TARGET: &str = "standin_appdb";

fn token_source(standin: &Standin, lifetime: Duration) -> Arc<TokenSource> {
    let creds = standin.static_creds();
    let credentials = Credentials::new(&creds.akid, &creds.secret, None, None, "test");
    TokenSource::new(
        CredentialCache::new(SharedCredentialsProvider::new(credentials), lifetime),
        lifetime,
        Presenter::Relay,
    )
}

fn upstream(standin: &Standin, host: &str, port: u16) -> Upstream {
    Upstream {
        kind: TokenKind::Rds,
        host: host.into(),
        port,
        dial: None,
        region: standin.region().into(),
        database: "appdb".into(),
        users: vec!["app_user".into(), "reporter".into(), "password_user".into()],
        role: None,
    }
}

fn config(ca: &Path, targets: Vec<(&str, Upstream)>) -> RelayConfig {
    RelayConfig {
        secret: SECRET.to_owned().into(),
        peer_uid: None,
        upstream_tls: relay::upstream_tls(ca).unwrap(),
        server_tls: None,
        targets: targets
            .into_iter()
            .map(|(name, upstream)| (name.to_owned(), Arc::new(upstream)))
            .collect::<HashMap<_, _>>(),
        limits: Limits {
            handshake_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(2),
            ..Limits::default()
        },
        metrics: None,
        follow_peer_cpu: false,
    }
}

struct Relay {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Relay {
    async fn start(listen: Listen, config: RelayConfig, source: Arc<TokenSource>) -> Relay {
        let listener = BoundListener::bind(&listen).await.unwrap();
        let port = listener.local_addr().map_or(0, |a| a.port());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(relay::serve(listener, Arc::new(config), source, async {
            let _ = stopped.await;
        }));
        Relay {
            port,
            stop: Some(stop),
            task,
        }
    }

    async fn tcp(config: RelayConfig, source: Arc<TokenSource>) -> Relay {
        Relay::start(Listen::Tcp("127.0.0.1:0".parse().unwrap()), config, source).await
    }

    async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = password {
            config.password(password);
        }
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

async fn current_user(client: &Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// What a failed connect says, database error fields included.
fn explain(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}

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
    let relay = Relay::tcp(
        config(&other_ca, vec![(TARGET, good.clone())]),
        Arc::clone(&source),
    )
    .await;
    let error = relay
        .connect("app_user", Some(SECRET), TARGET)
        .await
        .unwrap_err();
    let text = explain(&error);
    assert!(
        text.starts_with("08001 TLS with localhost:") && text.contains("invalid peer certificate"),
        "{text}"
    );
    relay.stop().await;

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
    let relay = Relay::tcp(
        config(
            &standin.ca_path(),
            vec![(TARGET, upstream(&standin, "127.0.0.2", forwarded_port))],
        ),
        Arc::clone(&source),
    )
    .await;
    let error = relay
        .connect("app_user", Some(SECRET), TARGET)
        .await
        .unwrap_err();
    let text = explain(&error);
    assert!(
        text.contains("invalid peer certificate") && text.contains("127.0.0.2"),
        "{text}"
    );
    relay.stop().await;

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
