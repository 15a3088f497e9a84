//! What each path of the probe and metrics server answers, spoken to over real sockets: the
//! kubelet and Prometheus read these answers, and `/quitquitquit` stops the daemon, so it is
//! there only when enabled and only for a POST from loopback.

mod support;

use aws_pgbouncer::http::Readiness;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::http_server::{request, start, start_on, status};
use tokio::net::UdpSocket;
use tokio::sync::Notify;

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
