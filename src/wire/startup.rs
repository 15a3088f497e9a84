//! From accept to the startup packet: encryption requests, TLS, then handing the connection
//! to its [`Protocol`].

use super::backend;
use super::conn::{Conn, End};
use super::framing::{ProtocolError, StartupPacket};
use super::pre_auth::PreAuth;
use super::{Afterwards, Protocol};
use crate::metrics::{ConnectionOutcome, OpenConnection};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_postgres::error::SqlState;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// What bounds one connection's handshake, and whom it is with.
pub(crate) struct Handshake {
    /// From accept: TLS, startup and the login must be done by then.
    pub deadline: Instant,
    /// For the log: the address, or "unix".
    pub peer: String,
    /// On a unix socket, the peer's uid (`SO_PEERCRED`), when it could be read.
    pub peer_uid: Option<u32>,
    /// On a unix socket, the peer's pid (`SO_PEERCRED`; 0 for a process in another pid
    /// namespace), when it could be read.
    pub peer_pid: Option<u32>,
    /// Cancelled when the listener shuts down.
    pub shutdown: CancellationToken,
    /// Dropped (or [`PreAuth::authenticated`]) once the peer has logged in.
    pub pre_auth: PreAuth,
    /// The connection's place in the metrics, for a protocol that counts its connections
    /// ([`super::Protocol::opened`]): it ends as `Failed` unless the protocol says how it went.
    pub counted: Option<OpenConnection>,
}

impl Handshake {
    /// Counts the connection as ended with `outcome`, when it is counted at all.
    pub(crate) fn ended(&mut self, outcome: ConnectionOutcome) {
        if let Some(counted) = &mut self.counted {
            counted.set_outcome(outcome);
        }
    }
}

impl Handshake {
    /// Runs `work` until the handshake deadline or shutdown, whichever comes first.
    pub(crate) async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, End>>,
    ) -> Result<T, End> {
        bounded(self.deadline, &self.shutdown, work).await
    }
}

/// Runs `work` until `deadline` or shutdown, whichever comes first.
pub(crate) async fn bounded<T>(
    deadline: Instant,
    shutdown: &CancellationToken,
    work: impl Future<Output = Result<T, End>>,
) -> Result<T, End> {
    tokio::select! {
        result = timeout_at(deadline, work) => result.unwrap_or(Err(End::HandshakeTimeout)),
        () = shutdown.cancelled() => Err(End::Shutdown),
    }
}

/// What the client asked for once encryption was settled.
pub(crate) enum First {
    Startup(StartupParams),
    /// A CancelRequest with the key it names.
    Cancel(Bytes),
}

/// The parameters of a StartupMessage, in the client's order.
pub(crate) struct StartupParams(pub Vec<(String, String)>);

impl StartupParams {
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The user to log in as; a startup packet without one is refused as PostgreSQL does.
    pub(crate) fn user(&self) -> Result<&str, End> {
        match self.get("user") {
            Some(user) if !user.is_empty() => Ok(user),
            _ => Err(End::Fatal(
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet".into(),
            )),
        }
    }

    /// The database asked for; the user's name when none is given, as in PostgreSQL.
    pub(crate) fn database<'a>(&'a self, user: &'a str) -> &'a str {
        self.get("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(user)
    }
}

enum Negotiated {
    First(First),
    StartTls,
}

/// Runs one accepted connection: encryption requests (TLS when `tls` is set), the startup
/// packet, then the protocol, up to what it goes on with once logged in (see [`Afterwards`]).
/// A connection that ends before its startup packet is told why.
pub(crate) async fn run<P, S>(
    protocol: &P,
    stream: S,
    tls: Option<&TlsAcceptor>,
    max_message: usize,
    handshake: Handshake,
) -> Option<Afterwards>
where
    P: Protocol,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn::new(stream, max_message);
    match handshake.bounded(negotiate(&mut conn, tls.is_some())).await {
        Ok(Negotiated::First(first)) => protocol.started(conn, first, handshake).await,
        Ok(Negotiated::StartTls) => {
            let acceptor = tls?;
            let peer = &handshake.peer;
            match timeout_at(handshake.deadline, acceptor.accept(conn.into_stream())).await {
                Ok(Ok(stream)) => {
                    let mut conn = Conn::new(stream, max_message);
                    match handshake.bounded(negotiate(&mut conn, false)).await {
                        Ok(Negotiated::First(first)) => {
                            return protocol.started(conn, first, handshake).await;
                        }
                        // A second SSLRequest inside TLS is answered "N": none gets here.
                        Ok(Negotiated::StartTls) => {}
                        Err(end) => conn.finish(end, &handshake.peer).await,
                    }
                }
                Ok(Err(e)) => tracing::info!(peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(peer, "TLS handshake timed out"),
            }
            None
        }
        Err(end) => {
            conn.finish(end, &handshake.peer).await;
            None
        }
    }
}

/// Answers encryption requests until the startup packet (or a CancelRequest) comes.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    offer_tls: bool,
) -> Result<Negotiated, End> {
    loop {
        match conn.read_startup().await? {
            StartupPacket::Ssl if offer_tls => {
                // Bytes sent after the SSLRequest but before the handshake would be taken as
                // if they came over TLS (CVE-2021-23214): refuse them.
                if !conn.rbuf.is_empty() {
                    return Err(ProtocolError::Malformed("data after SSLRequest").into());
                }
                conn.stream.write_all(b"S").await?;
                conn.stream.flush().await?;
                return Ok(Negotiated::StartTls);
            }
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                conn.stream.write_all(b"N").await?;
                conn.stream.flush().await?;
            }
            StartupPacket::Cancel(key) => return Ok(Negotiated::First(First::Cancel(key))),
            StartupPacket::Unsupported(code) => {
                return Err(End::Fatal(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {}.{}: server supports 3.0",
                        code >> 16,
                        code & 0xffff
                    ),
                ));
            }
            StartupPacket::Startup { minor, params } => {
                // Newer minor versions and `_pq_.` options are declined the way PostgreSQL
                // declines them, and the session goes on in 3.0.
                let options: Vec<&str> = params
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| k.starts_with("_pq_."))
                    .collect();
                if minor > 0 || !options.is_empty() {
                    backend::negotiate_protocol_version(&mut conn.wbuf, 0, &options);
                }
                return Ok(Negotiated::First(First::Startup(StartupParams(params))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_startup_packet_without_a_user_is_refused_with_28000() {
        let params = StartupParams(vec![("database".into(), "db".into())]);
        let Err(End::Fatal(code, _)) = params.user() else {
            panic!("refused expected")
        };
        assert_eq!(code, SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
        let params = StartupParams(vec![("user".into(), "u".into())]);
        assert_eq!(params.user().ok(), Some("u"));
        assert_eq!(params.database("u"), "u", "the user's name by default");
    }
}
