//! The connection to an upstream server: TCP, SSLRequest, then TLS with verify-full against
//! the RDS endpoint name, wherever the connection goes.

use super::Upstream;
use super::upstream_tls::TlsStream;
use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(super) type UpstreamStream = TlsStream;

/// Connects and starts TLS. The error says which step failed, in words fit for PgBouncer's
/// log; it holds no secret.
pub(super) async fn connect(
    upstream: &Upstream,
    tls: &Arc<ClientConfig>,
) -> Result<UpstreamStream, String> {
    let (host, port) = upstream.dial_address();
    let addr = format!("{host}:{port}");
    let mut tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("could not connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // PgBouncer turns keepalive on for its server connections (tcp_keepalive = 1, the OS's
    // timings); in this mode its server connections end at the relay, so the relay does the
    // same for the real ones, or an RDS that vanished (a failover) would leave idle pooled
    // connections half-open until their next use.
    let _ = socket2::SockRef::from(&tcp).set_keepalive(true);
    let mut ssl_request = BytesMut::new();
    frontend::ssl_request(&mut ssl_request);
    tcp.write_all(&ssl_request)
        .await
        .map_err(|e| format!("could not send the SSL request to {addr}: {e}"))?;
    // Exactly one byte: anything the server sent after it would be outside TLS
    // (CVE-2021-23222), and the handshake below would take it for TLS records and fail.
    let answer = tcp
        .read_u8()
        .await
        .map_err(|e| format!("no answer to the SSL request from {addr}: {e}"))?;
    match answer {
        b'S' => {}
        b'N' => return Err(format!("{addr} does not offer TLS")),
        _ => {
            return Err(format!(
                "{addr} answered the SSL request with neither S nor N: not a PostgreSQL server?"
            ));
        }
    }
    let name = ServerName::try_from(upstream.host.clone())
        .map_err(|_| format!("{} is not a valid TLS server name", upstream.host))?;
    TlsStream::connect(Arc::clone(tls), name, tcp)
        .await
        .map_err(|e| format!("TLS with {addr} failed: {e}"))
}
