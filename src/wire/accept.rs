//! The accept loop the endpoint and the relay share, with its defences.

use super::Protocol;
use super::backend;
use super::listener::{BoundListener, Stream};
use super::pre_auth::PreAuthSet;
use super::startup::{self, Handshake};
use crate::log_throttle::LogThrottle;
use bytes::BytesMut;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// What a listener offers and what bounds it.
pub(crate) struct Serving {
    /// Connections at once (see [`serve`] for what happens beyond).
    pub max_connections: usize,
    /// How long connections may go on after shutdown before they are cut off.
    pub shutdown_grace: Duration,
    /// Largest frame accepted during the handshake, header included.
    pub max_message_bytes: usize,
    /// From accept to the end of the login.
    pub handshake_timeout: Duration,
    /// Offered to an SSLRequest on TCP when set; never on a unix socket, where PgBouncer
    /// never starts TLS.
    pub tls: Option<TlsAcceptor>,
}

impl Serving {
    /// No TLS, and handshakes bounded by the defaults of [`Serving::handshake`] until set.
    pub(crate) fn new(max_connections: usize, shutdown_grace: Duration) -> Self {
        Self {
            max_connections,
            shutdown_grace,
            max_message_bytes: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    pub(crate) fn handshake(self, max_message_bytes: usize, timeout: Duration) -> Self {
        Self {
            max_message_bytes,
            handshake_timeout: timeout,
            ..self
        }
    }

    /// Offers `tls` to an SSLRequest on TCP.
    pub(crate) fn offering(self, tls: Option<&Arc<rustls::ServerConfig>>) -> Self {
        Self {
            tls: tls.cloned().map(TlsAcceptor::from),
            ..self
        }
    }
}

/// Serves `protocol` on `listener` until `shutdown` resolves (`name` says which in the log),
/// then cancels the connections' shutdown token and returns when they have ended, or after
/// `serving.shutdown_grace`. Errors are those of the listening socket itself; a failing
/// connection only ends itself.
///
/// Beyond `max_connections`, a new connection closes the oldest one that has not logged in
/// ([`PreAuthSet`]); only when every connection has logged in is it refused "too many
/// clients". So a flood of connections that say nothing slows PgBouncer's logins down but
/// cannot stop them.
///
/// On a unix socket, a peer whose uid (`SO_PEERCRED`) is not the daemon's own (or root's) is
/// closed at once, before it takes a slot: another local user cannot starve PgBouncer's logins
/// however the socket's mode was set. Refusals are logged through [`LogThrottle`]s, so that a
/// flood costs a line per interval, not one per connection.
pub(crate) async fn serve<P: Protocol>(
    listener: BoundListener,
    name: &'static str,
    protocol: Arc<P>,
    serving: Serving,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let max_connections = serving.max_connections;
    let serving = Arc::new(serving);
    let sessions_allowed = Arc::new(Semaphore::new(max_connections));
    // Refusing takes a moment too (the client must get to read why); bound those as well.
    let refusals_allowed = Arc::new(Semaphore::new(max_connections.max(1)));
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let too_many = LogThrottle::new(format!("{name}: too many connections"));
    let cannot_accept = LogThrottle::new(format!("{name}: cannot accept a connection now"));
    let foreign = LogThrottle::new(format!("{name}: connection from another uid closed"));
    let evicted = LogThrottle::new(format!(
        "{name}: oldest connection not logged in closed for a new one"
    ));
    let waiting = PreAuthSet::default();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    tokio::pin!(shutdown);

    let result = loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break Ok(()),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) if is_resource_exhaustion(&e) => {
                if cannot_accept.first() {
                    tracing::warn!(listener = name, error = %e, "cannot accept a connection now");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        let (peer_uid, peer_pid) = peer_cred(&stream);
        if let Some(uid) = peer_uid.filter(|&uid| uid != own_uid && uid != 0) {
            if foreign.first() {
                tracing::warn!(
                    listener = name,
                    uid,
                    own_uid,
                    "connection from another uid closed: only the daemon's own uid (PgBouncer's) \
                     may connect"
                );
            }
            continue;
        }
        let permit = match Arc::clone(&sessions_allowed).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if waiting.evict_oldest() => {
                if evicted.first() {
                    tracing::warn!(
                        listener = name,
                        max = max_connections,
                        "all connections taken; closing the oldest that has not logged in \
                         for each new one"
                    );
                }
                // The closed session's permit comes back once its task is dropped, at the
                // runtime's next turn.
                let freed = Arc::clone(&sessions_allowed).acquire_owned();
                tokio::time::timeout(Duration::from_secs(1), freed)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        if let Some(permit) = permit {
            let place = waiting.enter();
            let id = place.id();
            let protocol = Arc::clone(&protocol);
            let serving = Arc::clone(&serving);
            let handshake = Handshake {
                deadline: Instant::now() + serving.handshake_timeout,
                peer,
                peer_uid: peer_uid.filter(|&uid| uid != u32::MAX),
                peer_pid,
                shutdown: stop.clone(),
                pre_auth: place,
                counted: protocol.opened(),
            };
            // Boxed, so that the task holds the handshake's state (about 15 KiB for the
            // relay) only until the handshake is over; a relayed session then lives on, for
            // as long as PgBouncer pools it, with what it goes on with alone.
            let handshaking = Box::pin(async move {
                let max_message = serving.max_message_bytes;
                match stream {
                    Stream::Tcp(s) => {
                        let tls = serving.tls.as_ref();
                        startup::run(&*protocol, s, tls, max_message, handshake).await
                    }
                    Stream::Unix(s) => {
                        startup::run(&*protocol, s, None, max_message, handshake).await
                    }
                }
            });
            let task = tasks.spawn(async move {
                let afterwards = handshaking.await;
                if let Some(afterwards) = afterwards {
                    afterwards.await;
                }
                drop(permit);
            });
            waiting.attach(id, task);
        } else if let Ok(permit) = Arc::clone(&refusals_allowed).try_acquire_owned() {
            if too_many.first() {
                tracing::warn!(
                    listener = name,
                    peer,
                    max = max_connections,
                    "too many connections"
                );
            }
            tasks.spawn(async move {
                match stream {
                    Stream::Tcp(s) => refuse(s).await,
                    Stream::Unix(s) => refuse(s).await,
                }
                drop(permit);
            });
        }
    };

    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(serving.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "sessions did not end in time; cutting them off"
        );
        tasks.shutdown().await;
    }
    result
}

/// On a unix socket, the peer's uid and pid; the uid is `u32::MAX` when it cannot be read, so
/// that such a peer counts as foreign. Root passes the uid check because it can read the
/// daemon's memory and files anyway: refusing it would protect nothing.
fn peer_cred(stream: &Stream) -> (Option<u32>, Option<u32>) {
    let Stream::Unix(unix) = stream else {
        return (None, None);
    };
    match unix.peer_cred() {
        Ok(cred) => (Some(cred.uid()), cred.pid().map(|pid| pid as u32)),
        Err(_) => (Some(u32::MAX), None),
    }
}

/// Errors that concern only the connection being accepted.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Out of file descriptors or memory: retrying at once would spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Sends "too many clients" at once, as PostgreSQL does, without reading the startup packet.
/// Closing while the client's packet sits unread would reset the connection and could lose
/// the error, so the input is drained (briefly) after our side is shut down.
async fn refuse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S) {
    let mut out = BytesMut::new();
    too_many_clients(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut total = 0;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        io::Result::Ok(())
    })
    .await;
}

fn too_many_clients(out: &mut BytesMut) {
    backend::error_response(
        out,
        "FATAL",
        &SqlState::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn too_many_clients_carries_53300() {
        let mut out = bytes::BytesMut::new();
        super::too_many_clients(&mut out);
        assert_eq!(crate::wire::conn::tests::sqlstate(&out), "53300");
    }
}
