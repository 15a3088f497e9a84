//! The probe and metrics server, spoken to over real sockets, and `aws-pgbouncer wait`
//! against it.

mod support;

use aws_pgbouncer::config::Database;
use aws_pgbouncer::http::{Probes, Readiness, serve};
use aws_pgbouncer::metrics::Metrics;
use aws_pgbouncer::token::{KeyHealth, TokenKey, TokenKind};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use support::flood::{self, Flood};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

struct TestProbes {
    started: AtomicBool,
    readiness: Mutex<Readiness>,
}

impl Probes for TestProbes {
    fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    fn readiness(&self) -> Readiness {
        self.readiness.lock().unwrap().clone()
    }
}

struct Server {
    addr: SocketAddr,
    probes: Arc<TestProbes>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn target() -> TokenKey {
    TokenKey {
        kind: TokenKind::Rds,
        host: "localhost".to_owned(),
        port: 5432,
        user: "app_user".to_owned(),
        region: "us-east-1".to_owned(),
        role: None,
    }
}

async fn start() -> Server {
    start_on("127.0.0.1:0", None).await
}

async fn start_on(address: &str, quit: Option<Arc<Notify>>) -> Server {
    let listener = TcpListener::bind(address).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let probes = Arc::new(TestProbes {
        started: AtomicBool::new(false),
        readiness: Mutex::new(Readiness {
            ready: false,
            reasons: vec!["no token yet for app_user@localhost:5432".to_owned()],
        }),
    });
    let database = Database {
        name: "appdb".to_owned(),
        dbname: "appdb".to_owned(),
        target: target(),
        dial: None,
        allowed_users: vec![target().user],
        options: Vec::new(),
    };
    let metrics = Arc::new(Metrics::new(&[database], || {
        let now = SystemTime::now();
        vec![(
            target(),
            KeyHealth {
                usable_until: Some(now + Duration::from_secs(800)),
                signed_at: Some(now - Duration::from_secs(100)),
                successes: 3,
                ..KeyHealth::default()
            },
        )]
    }));
    metrics.reload_finished(Duration::from_millis(5), true);
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(
        listener,
        Arc::clone(&probes) as Arc<dyn Probes>,
        metrics,
        quit,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        probes,
        stop: Some(stop),
        task,
    }
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .expect("a status code");
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn status(addr: SocketAddr, path: &str) -> u16 {
    request(addr, "GET", path).await.status
}

#[tokio::test]
async fn probes_follow_the_daemon_state() {
    let server = start().await;
    let addr = server.addr;

    assert_eq!(status(addr, "/healthz").await, 200);
    assert_eq!(status(addr, "/startupz").await, 503);
    let answer = request(addr, "GET", "/readyz").await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.body,
        "not ready:\n- no token yet for app_user@localhost:5432\n"
    );
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(answer.header("cache-control"), Some("no-store"));

    server.probes.started.store(true, Ordering::SeqCst);
    assert_eq!(status(addr, "/startupz").await, 200);
    assert_eq!(status(addr, "/readyz").await, 503, "started is not ready");

    *server.probes.readiness.lock().unwrap() = Readiness {
        ready: true,
        reasons: Vec::new(),
    };
    assert_eq!(status(addr, "/healthz").await, 200);
    assert_eq!(status(addr, "/startupz").await, 200);
    assert_eq!(request(addr, "GET", "/readyz").await.body, "ready\n");

    // Readiness can be lost again (say the credential source has been down too long).
    *server.probes.readiness.lock().unwrap() = Readiness {
        ready: false,
        reasons: vec!["a".to_owned(), "b".to_owned()],
    };
    let answer = request(addr, "GET", "/readyz").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body, "not ready:\n- a\n- b\n");
    assert_eq!(status(addr, "/healthz").await, 200);
}

#[tokio::test]
async fn unknown_paths_and_methods_are_refused() {
    let server = start().await;
    let addr = server.addr;
    for path in ["/", "/healthz/", "/metricsx", "/nope"] {
        assert_eq!(status(addr, path).await, 404, "{path}");
    }
    for method in ["POST", "PUT", "DELETE"] {
        let answer = request(addr, method, "/healthz").await;
        assert_eq!(answer.status, 405, "{method}");
        assert_eq!(answer.header("allow"), Some("GET, HEAD"));
    }
    // A query string does not change the route.
    assert_eq!(status(addr, "/healthz?verbose=1").await, 200);
    let head = request(addr, "HEAD", "/healthz").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "", "HEAD has no body");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let server = start().await;
    let answer = request(server.addr, "GET", "/metrics").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );

    // Every line is a HELP or TYPE comment or a sample `name{labels} value`.
    let mut typed = Vec::new();
    let mut sampled = Vec::new();
    for line in answer.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.push(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value of {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
        sampled.push(name.to_owned());
    }
    for name in [
        "aws_pgbouncer_build_info",
        "aws_pgbouncer_token_expiry_timestamp_seconds",
        "aws_pgbouncer_token_age_seconds",
        "aws_pgbouncer_token_refreshes_total",
        "aws_pgbouncer_token_refresh_failures_total",
        "aws_pgbouncer_credentials_expiry_timestamp_seconds",
        "aws_pgbouncer_pgbouncer_reloads_total",
        "aws_pgbouncer_pgbouncer_reload_failures_total",
        "aws_pgbouncer_pgbouncer_reload_duration_seconds",
        "aws_pgbouncer_auth_query_requests_total",
        "aws_pgbouncer_auth_query_duration_seconds",
        "aws_pgbouncer_endpoint_connections",
        "aws_pgbouncer_endpoint_connections_total",
        "aws_pgbouncer_relay_refusals_total",
    ] {
        assert!(
            typed.iter().any(|t| t == name),
            "no TYPE for {name}:\n{}",
            answer.body
        );
    }
    for name in [
        "aws_pgbouncer_build_info",
        "aws_pgbouncer_token_expiry_timestamp_seconds",
        "aws_pgbouncer_token_age_seconds",
        "aws_pgbouncer_token_refreshes_total",
        "aws_pgbouncer_pgbouncer_reloads_total",
        "aws_pgbouncer_pgbouncer_reload_duration_seconds_bucket",
        "aws_pgbouncer_endpoint_connections",
    ] {
        assert!(
            sampled.iter().any(|s| s == name),
            "no sample of {name}:\n{}",
            answer.body
        );
    }
    assert!(
        answer.body.contains(
            "aws_pgbouncer_token_refreshes_total{database=\"appdb\",user=\"app_user\",host=\"localhost\"} 3\n"
        ),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let mut server = start().await;
    let idle = TcpStream::connect(server.addr).await.unwrap();
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("serve returns after shutdown, even with a connection open")
        .unwrap();
    drop(idle);
    assert!(TcpStream::connect(server.addr).await.is_err());
}

/// Whether `/quitquitquit` has notified the daemon (without waiting: a stored permit or none).
async fn quit_requested(quit: &Notify) -> bool {
    tokio::time::timeout(Duration::ZERO, quit.notified())
        .await
        .is_ok()
}

/// This machine's address on its default route: not loopback, yet it reaches local listeners.
async fn non_loopback_address() -> std::net::IpAddr {
    let socket = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    // Connecting a UDP socket sends nothing; it only picks the route and the source address.
    socket
        .connect("203.0.113.1:9")
        .await
        .expect("a route off loopback (the test needs a non-loopback address)");
    let ip = socket.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
    ip
}

#[tokio::test]
async fn quitquitquit_is_absent_unless_enabled() {
    let server = start().await;
    assert_eq!(
        request(server.addr, "POST", "/quitquitquit").await.status,
        404
    );
}

#[tokio::test]
async fn quitquitquit_stops_on_a_post_from_loopback_only() {
    let quit = Arc::new(Notify::new());
    // Dual-stack, as `[::]:9090` would be: IPv4 loopback then arrives as ::ffff:127.0.0.1.
    let server = start_on("[::]:0", Some(Arc::clone(&quit))).await;
    let port = server.addr.port();

    for method in ["GET", "HEAD", "PUT"] {
        let answer = request(
            SocketAddr::from(([127, 0, 0, 1], port)),
            method,
            "/quitquitquit",
        )
        .await;
        assert_eq!(answer.status, 405, "{method}");
        assert_eq!(answer.header("allow"), Some("POST"));
    }
    let remote = request(
        SocketAddr::new(non_loopback_address().await, port),
        "POST",
        "/quitquitquit",
    )
    .await;
    assert_eq!(remote.status, 403, "{}", remote.body);
    assert!(remote.body.contains("loopback only"), "{}", remote.body);
    assert!(
        !quit_requested(&quit).await,
        "refused requests must not stop the daemon"
    );

    let local = request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "POST",
        "/quitquitquit",
    )
    .await;
    assert_eq!((local.status, local.body.as_str()), (200, "stopping\n"));
    assert!(quit_requested(&quit).await);
    // The other routes are unchanged.
    assert_eq!(
        status(SocketAddr::from(([127, 0, 0, 1], port)), "/healthz").await,
        200
    );
}

async fn wait_command(addr: SocketAddr, timeout_secs: u64) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_aws-pgbouncer"))
        .args(["wait", "--http", &addr.to_string(), "--timeout"])
        .arg(timeout_secs.to_string())
        .env_remove("AWS_PGBOUNCER_HTTP_LISTEN")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn wait_returns_once_started() {
    let server = start().await;
    let probes = Arc::clone(&server.probes);
    let flip = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        probes.started.store(true, Ordering::SeqCst);
    });
    let output = wait_command(server.addr, 20).await;
    flip.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn wait_gives_up_with_the_reason() {
    let server = start().await;
    let output = wait_command(server.addr, 1).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("did not report started within 1 s") && stderr.contains("HTTP 503"),
        "{stderr}"
    );

    // Nothing listening is reported as such.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let output = wait_command(closed, 1).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[tokio::test]
async fn a_silent_client_is_cut_off() {
    let server = start().await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), silent.read_to_end(&mut buffer))
        .await
        .expect("the server closes a connection that sends no request");
    assert!(read.is_ok());
    // The server still serves others.
    assert_eq!(status(server.addr, "/healthz").await, 200);
}

/// One probe as the kubelet sends it (default `timeoutSeconds: 1`): true if `/healthz`
/// answered 200 within a second.
async fn probe(addr: SocketAddr) -> bool {
    let answered = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response.starts_with("HTTP/1.1 200"))
    };
    let answer = tokio::time::timeout(Duration::from_secs(1), answered).await;
    answer.ok().flatten().unwrap_or(false)
}

/// Another local uid holds 600 connections to the HTTP server, half idle and half sending a
/// request one byte a second, replacing each one closed. The server runs on one thread, as in
/// the daemon. At least 19 of 20 probes must be answered (the kubelet restarts the daemon
/// after `failureThreshold` failures, dropping every relayed session).
#[tokio::test]
async fn healthz_answers_while_600_idle_and_slowloris_connections_are_held() {
    let server = start().await;
    let target = format!("tcp:{}", server.addr);
    let floods = tokio::task::spawn_blocking(move || {
        let mut floods = [
            Flood::start(&target, 300, 10.0, flood::Kind::Idle),
            Flood::start(&target, 300, 10.0, flood::Kind::Slowloris),
        ];
        for flood in &mut floods {
            flood.wait_opened(300);
        }
        floods
    })
    .await
    .unwrap();

    let mut answered = 0;
    for _ in 0..20 {
        if probe(server.addr).await {
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let opened = tokio::task::spawn_blocking(move || {
        let mut floods = floods;
        floods.iter_mut().map(Flood::finish).sum::<usize>()
    })
    .await
    .unwrap();
    eprintln!(
        "/healthz under a flood of 600 held connections ({opened} opened): {answered} of 20 probes answered"
    );
    assert!(answered >= 19, "{answered} of 20 probes answered");
    assert!(opened >= 600, "the flood opened only {opened} connections");
}
