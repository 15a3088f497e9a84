//! The probe and metrics server's connections: a client that holds one open, says nothing or
//! dribbles a request out must neither keep probes from being answered (the kubelet would
//! restart the daemon, dropping every relayed session) nor keep the server from shutting
//! down; and `aws-pgbouncer wait` connects until the daemon has started, or says why not.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::flood::{self, Flood};
use support::http_server::{start, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
