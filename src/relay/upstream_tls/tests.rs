use super::*;
use rustls::ServerConfig;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream as ServerStream;

/// A server certificate for `localhost`, and the relay's own verify-full configuration
/// trusting its CA; `tls12` limits the client to TLS 1.2, for that protocol's paths.
fn configs(tls12: bool) -> (Arc<ServerConfig>, Arc<ClientConfig>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = crate::endpoint::self_signed_tls(dir.path()).unwrap();
    let client = if tls12 {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(crate::ca_bundle::load(&ca).unwrap())
            .with_no_client_auth();
        Arc::new(config)
    } else {
        crate::relay::upstream_tls(&ca).unwrap()
    };
    (server, client, dir)
}

/// Connects a `TlsStream` to a rustls server on loopback, asking for the name `name`.
async fn connect(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (io::Result<TlsStream>, io::Result<ServerStream<TcpStream>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::join!(
        async { TlsStream::connect(client, name, TcpStream::connect(addr).await?).await },
        async {
            TlsAcceptor::from(server)
                .accept(listener.accept().await?.0)
                .await
        }
    )
}

async fn connected(tls12: bool) -> (TlsStream, ServerStream<TcpStream>) {
    let (server, client, _dir) = configs(tls12);
    let (client, server) = connect(server, client, "localhost").await;
    (client.unwrap(), server.unwrap())
}

/// A server that is not TLS: it answers the ClientHello with `answer`, then closes.
async fn connect_to_raw(answer: &'static [u8]) -> io::Error {
    let (_, client, _dir) = configs(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut hello = [0; 5];
        tcp.read_exact(&mut hello).await.unwrap();
        tcp.write_all(answer).await.unwrap();
        tcp.shutdown().await.unwrap();
        let _ = tcp.read_to_end(&mut Vec::new()).await;
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let error = TlsStream::connect(client, name, tcp).await.err().unwrap();
    server.await.unwrap();
    error
}

/// What the session holds in buffers of its own; the module's point is that this is 0 once
/// everything read has been taken and everything written sent.
fn held(stream: &TlsStream) -> usize {
    stream.incoming.capacity()
        + stream.plaintext.bytes.capacity()
        + stream.outgoing.bytes.capacity()
}

async fn data_both_ways(tls12: bool) {
    let (mut client, mut server) = connected(tls12).await;
    let version = client.conn.protocol_version().unwrap();
    let expected = if tls12 {
        rustls::ProtocolVersion::TLSv1_2
    } else {
        rustls::ProtocolVersion::TLSv1_3
    };
    assert_eq!(version, expected);

    client.write_all(b"SELECT 1").await.unwrap();
    client.flush().await.unwrap();
    let mut query = [0; 8];
    server.read_exact(&mut query).await.unwrap();
    assert_eq!(&query, b"SELECT 1");

    server.write_all(b"one row").await.unwrap();
    server.flush().await.unwrap();
    let mut row = [0; 7];
    client.read_exact(&mut row).await.unwrap();
    assert_eq!(&row, b"one row");
    assert_eq!(held(&client), 0, "idle: no buffer held");
}

#[tokio::test]
async fn data_goes_both_ways_over_tls13() {
    data_both_ways(false).await;
}

#[tokio::test]
async fn data_goes_both_ways_over_tls12() {
    data_both_ways(true).await;
}

/// Several MiB each way at once, read in pieces that are not records (so records are split
/// across socket reads, and plaintext is left over from reads into a small buffer); the
/// close_notify each side sends at the end is the other's EOF.
async fn large_transfer(tls12: bool) {
    const SIZE: usize = 6 * 1024 * 1024 + 123;
    let (client, server) = connected(tls12).await;
    let up: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..SIZE).map(|i| (i % 241) as u8).collect();

    let (mut client_reads, mut client_writes) = tokio::io::split(client);
    let (mut server_reads, mut server_writes) = tokio::io::split(server);
    let (got_down, got_up, (), ()) = tokio::join!(
        async {
            let mut got = Vec::new();
            let mut piece = [0; 7000];
            loop {
                let n = client_reads.read(&mut piece).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&piece[..n]);
            }
        },
        async {
            let mut got = Vec::new();
            server_reads.read_to_end(&mut got).await.unwrap();
            got
        },
        async {
            client_writes.write_all(&up).await.unwrap();
            client_writes.shutdown().await.unwrap();
        },
        async {
            server_writes.write_all(&down).await.unwrap();
            server_writes.shutdown().await.unwrap();
        },
    );
    assert!(got_up == up, "the client's bytes arrive unchanged");
    assert!(got_down == down, "and the server's");
    let client = client_reads.unsplit(client_writes);
    assert_eq!(held(&client), 0);
}

#[tokio::test]
async fn a_large_transfer_over_tls13_is_byte_exact_and_leaves_no_buffer() {
    large_transfer(false).await;
}

#[tokio::test]
async fn a_large_transfer_over_tls12_is_byte_exact_and_leaves_no_buffer() {
    large_transfer(true).await;
}

#[tokio::test]
async fn plaintext_the_reader_has_no_room_for_waits_and_is_then_freed() {
    let (mut client, mut server) = connected(false).await;
    server.write_all(&[9; 5000]).await.unwrap();
    server.flush().await.unwrap();
    let mut first = [0; 100];
    client.read_exact(&mut first).await.unwrap();
    assert!(
        client.plaintext.bytes.capacity() > 0,
        "the rest of the record waits"
    );
    let mut rest = [0; 4900];
    client.read_exact(&mut rest).await.unwrap();
    assert_eq!(rest, [9; 4900]);
    assert_eq!(held(&client), 0);
}

#[tokio::test]
async fn close_notify_is_eof() {
    let (mut client, mut server) = connected(false).await;
    server.write_all(b"bye").await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");

    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.is_empty(),
        "and the client's close_notify is the server's EOF"
    );
}

/// A truncation attack looks like this: without close_notify, the end is not the end.
#[tokio::test]
async fn eof_without_close_notify_is_an_error() {
    let (mut client, mut server) = connected(false).await;
    server.write_all(b"partial").await.unwrap();
    server.flush().await.unwrap();
    drop(server.into_inner().0);
    let mut got = Vec::new();
    let error = client.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(got, b"partial");
}

/// TLS 1.3 lets the server update its keys and ask the client to update its own at any
/// time: that arrives among the data, and the client's answer goes out with its next write.
#[tokio::test]
async fn data_flows_across_key_updates() {
    let (mut client, mut server) = connected(false).await;
    for round in 0..3u8 {
        server.get_mut().1.refresh_traffic_keys().unwrap();
        server.write_all(&[round; 3]).await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0; 3];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round; 3]);

        client.write_all(&[round + 10; 3]).await.unwrap();
        client.flush().await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round + 10; 3]);
    }
    assert_eq!(held(&client), 0);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let (server, client, _dir) = configs(false);
    let (client, _) = connect(server, client, "db.example.net").await;
    let error = client.err().unwrap().to_string();
    assert!(error.contains("invalid peer certificate"), "{error}");
}

/// A long certificate chain makes the server's Certificate message longer than a TLS record
/// (16 KiB) and than one socket read: rustls needs every record of it kept, unchanged, until
/// the message is whole. Here one certificate with a thousand names stands in for the chain.
#[tokio::test]
async fn a_certificate_longer_than_a_record_is_gathered_across_reads() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut names: Vec<String> = (0..1000)
        .map(|i| format!("replica-{i:04}.cluster.example.internal"))
        .collect();
    names.push("localhost".to_owned());
    let certificate = rcgen::CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    // Three records, and more than two reads of READ_BYTES.
    assert!(certificate.der().len() > 2 * READ_BYTES);
    let trusted = dir.path().join("self-signed.pem");
    std::fs::write(&trusted, certificate.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    let client = crate::relay::upstream_tls(&trusted).unwrap();

    let (client, server) = connect(Arc::new(server), client, "localhost").await;
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    client.write_all(b"SELECT 1").await.unwrap();
    client.flush().await.unwrap();
    let mut query = [0; 8];
    server.read_exact(&mut query).await.unwrap();
    assert_eq!(&query, b"SELECT 1");
    assert_eq!(
        held(&client),
        0,
        "the handshake's records are let go once used"
    );
}

#[tokio::test]
async fn an_alert_from_the_server_is_an_error_that_names_it() {
    // A fatal handshake_failure alert, as a server with nothing in common sends.
    let error = connect_to_raw(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).await;
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(
        error
            .to_string()
            .contains("received fatal alert: HandshakeFailure"),
        "{error}"
    );
}

#[tokio::test]
async fn garbage_from_the_server_is_an_error() {
    let error = connect_to_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
}

#[tokio::test]
async fn eof_during_the_handshake_is_an_error() {
    let error = connect_to_raw(b"").await;
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
}
