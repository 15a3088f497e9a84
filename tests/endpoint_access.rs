//! The auth-query endpoint lets in only the auth user with its password, cuts off hostile
//! clients and goes on, holds its connection limit and shuts down cleanly, over TCP, TLS and a
//! unix socket, and never shows its secret. A stub lookup stands in for the token source.

mod support;

use aws_pgbouncer::endpoint::{self, BoundListener, EndpointConfig, Limits, Listen, Lookup};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use std::sync::Arc;
use std::time::Duration;
use support::auth_endpoint::{
    AUTH_SECRET, AUTH_USER, DATABASE, Endpoint, PGBOUNCER_QUERY, RawClient, Stub, quick_limits,
};
use tokio::sync::oneshot;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn only_the_auth_user_with_its_password_gets_in() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let err = ep.connect(AUTH_USER, Some("wrong")).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    let err = ep.connect("alice", Some(AUTH_SECRET)).await.err().unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    // Without a password the client cannot answer SCRAM and gives up.
    let err = ep.connect(AUTH_USER, None).await.err().unwrap();
    assert!(err.to_string().contains("invalid configuration"), "{err}");
    // A cleartext password where SCRAM is expected is refused by the server.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.startup(AUTH_USER).await;
    assert!(matches!(raw.next().await, Message::AuthenticationSasl(_)));
    frontend::password_message(AUTH_SECRET.as_bytes(), &mut raw.out).unwrap();
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    ep.login().await;
    ep.stop().await;
}

#[tokio::test]
async fn hostile_clients_are_cut_off_and_the_endpoint_goes_on() {
    let ep = Endpoint::start(quick_limits(), None).await;
    // Garbage: an HTTP request read as a startup packet announces a huge length.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.out
        .extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    raw.expect_eof().await;
    // An oversized message after login.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.login().await;
    frontend::query(&"x".repeat(20_000), &mut raw.out).unwrap();
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    raw.expect_eof().await;
    // An unknown message type (FunctionCall).
    let mut raw = RawClient::connect(ep.addr).await;
    raw.login().await;
    raw.out.extend_from_slice(&[b'F', 0, 0, 0, 4]);
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    raw.expect_eof().await;
    // Silence: the handshake timeout closes the connection.
    let mut raw = RawClient::connect(ep.addr).await;
    let started = std::time::Instant::now();
    raw.expect_eof().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // A stalled SCRAM exchange is cut off too.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.startup(AUTH_USER).await;
    assert!(matches!(raw.next().await, Message::AuthenticationSasl(_)));
    assert_eq!(raw.error_code().await, "57014");
    // Protocol 2.0.
    let mut raw = RawClient::connect(ep.addr).await;
    raw.out.extend_from_slice(&[0, 0, 0, 8, 0, 2, 0, 0]);
    raw.send().await;
    assert_eq!(raw.error_code().await, "0A000");
    ep.login().await.simple_query("SELECT 1").await.unwrap();
    ep.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused() {
    let ep = Endpoint::start(
        Limits {
            max_connections: 2,
            ..quick_limits()
        },
        None,
    )
    .await;
    let first = ep.login().await;
    let _second = ep.login().await;
    let err = ep
        .connect(AUTH_USER, Some(AUTH_SECRET))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    drop(first);
    // The slot frees once the session has seen the client go.
    let mut admitted = false;
    for _ in 0..50 {
        if ep.connect(AUTH_USER, Some(AUTH_SECRET)).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted);
    ep.stop().await;
}

#[tokio::test]
async fn shutdown_ends_idle_sessions() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let client = ep.login().await;
    ep.stop().await;
    assert!(client.simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn tls_with_the_generated_ca() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let dir = tempfile::tempdir().unwrap();
    let (server_tls, ca_path) = endpoint::self_signed_tls(dir.path()).unwrap();
    let ep = Endpoint::start(quick_limits(), Some(server_tls)).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = ep.config(AUTH_USER, Some(AUTH_SECRET), DATABASE);
    config
        .host("localhost")
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(client_tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = client.query(PGBOUNCER_QUERY, &[&"alice"]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(1), "alice-token");

    // Bytes pipelined behind the SSLRequest would bypass TLS: refused.
    let mut raw = RawClient::connect(ep.addr).await;
    frontend::ssl_request(&mut raw.out);
    frontend::startup_message([("user", AUTH_USER)], &mut raw.out).unwrap();
    raw.send().await;
    assert_eq!(raw.error_code().await, "08P01");
    ep.stop().await;
}

#[tokio::test]
async fn unix_socket_with_its_mode() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".s.PGSQL.6000");
    let listener = BoundListener::bind(&Listen::Unix {
        path: path.clone(),
        mode: 0o660,
    })
    .await
    .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A live socket is not taken over.
    let again = BoundListener::bind(&Listen::Unix {
        path: path.clone(),
        mode: 0o600,
    })
    .await;
    assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);

    let config = Arc::new(EndpointConfig {
        auth_user: AUTH_USER.into(),
        auth_secret: AUTH_SECRET.to_owned().into(),
        limits: quick_limits(),
        tls: None,
        metrics: None,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(endpoint::serve(listener, config, Arc::new(Stub), async {
        let _ = stopped.await;
    }));
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(dir.path())
        .port(6000)
        .user(AUTH_USER)
        .password(AUTH_SECRET)
        .dbname(DATABASE)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(
        client
            .query(PGBOUNCER_QUERY, &[&"alice"])
            .await
            .unwrap()
            .len(),
        1
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[test]
fn debug_output_hides_the_secret() {
    let config = EndpointConfig {
        auth_user: AUTH_USER.into(),
        auth_secret: AUTH_SECRET.to_owned().into(),
        limits: Limits::default(),
        tls: None,
        metrics: None,
    };
    assert!(!format!("{config:?}").contains(AUTH_SECRET));
    let lookup = Lookup::Token("tok-secret".to_owned().into());
    assert!(!format!("{lookup:?}").contains("tok-secret"));
}
