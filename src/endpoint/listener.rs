//! Binding the endpoint's socket and running its sessions.

use super::pre_auth::{PreAuth, PreAuthSet};
use super::session::{self, Shared};
use super::{EndpointConfig, TokenLookup, backend};
use crate::log_throttle::LogThrottle;
use crate::metrics::ConnectionOutcome;
use bytes::BytesMut;
use std::fs;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Owner read and write only. Whatever the mode, a peer whose uid is not the daemon's own is
/// closed at accept ([`serve_with`]): PgBouncer must run as the daemon's uid (it must anyway,
/// to read the 0600 files the daemon writes for it).
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Where the endpoint listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A unix socket at `path`, with permission bits `mode` (e.g. [`DEFAULT_SOCKET_MODE`]).
    /// PgBouncer connects to `{unix_socket_dir or host}/.s.PGSQL.{port}`.
    Unix {
        path: PathBuf,
        mode: u32,
    },
}

/// A listening socket, bound before `serve` so that the caller knows the address (and any
/// bind error) before it renders PgBouncer's configuration.
#[derive(Debug)]
pub struct BoundListener {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Tcp(TcpListener),
    /// The socket file and its identity, to remove it on drop only if it is still ours.
    Unix(UnixListener, PathBuf, (u64, u64)),
}

impl BoundListener {
    /// Binds the socket. A unix socket gets its mode before it appears at `path`: it is
    /// bound under a temporary name in the same directory, chmod-ed, then renamed into place.
    /// A stale socket file at `path` is replaced; a live one, or any other file, is an error.
    pub async fn bind(listen: &Listen) -> io::Result<Self> {
        let inner = match listen {
            Listen::Tcp(addr) => Inner::Tcp(TcpListener::bind(addr).await?),
            Listen::Unix { path, mode } => {
                let (listener, id) = bind_unix(path, *mode)?;
                Inner::Unix(listener, path.clone(), id)
            }
        };
        Ok(Self { inner })
    }

    /// The bound TCP address (with the port the system picked for port 0); `None` for a
    /// unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            Inner::Tcp(listener) => listener.local_addr().ok(),
            Inner::Unix(..) => None,
        }
    }
}

impl Drop for BoundListener {
    fn drop(&mut self) {
        if let Inner::Unix(_, path, id) = &self.inner
            && fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id)
        {
            let _ = fs::remove_file(path);
        }
    }
}

fn bind_unix(path: &Path, mode: u32) -> io::Result<(UnixListener, (u64, u64))> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a live server", path.display()),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".aep-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(mode & 0o777))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = fs::symlink_metadata(path)?;
    listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(listener)?, (meta.dev(), meta.ino())))
}

/// Serves until `shutdown` resolves, then tells the sessions to end and returns when they
/// have, or after `limits.shutdown_grace`. Errors are those of the listening socket itself;
/// a failing session only ends itself.
pub async fn serve<L: TokenLookup>(
    listener: BoundListener,
    config: Arc<EndpointConfig>,
    lookup: Arc<L>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = config.limits.clone();
    let tls = match (&listener.inner, &config.tls) {
        (Inner::Tcp(_), Some(tls)) => Some(TlsAcceptor::from(Arc::clone(tls))),
        _ => None,
    };
    let shared = Arc::new(Shared::new(config, lookup));
    let session = move |stream, peer, stopped, pre_auth| {
        let shared = Arc::clone(&shared);
        let tls = tls.clone();
        async move {
            let open = shared
                .config
                .metrics
                .as_ref()
                .map(|metrics| metrics.endpoint_connection_opened());
            match stream {
                Stream::Tcp(s) => {
                    session::run(s, Arc::clone(&shared), tls, stopped, peer, pre_auth).await;
                }
                Stream::Unix(s) => {
                    session::run(s, Arc::clone(&shared), None, stopped, peer, pre_auth).await;
                }
            }
            if let Some(mut open) = open {
                open.set_outcome(ConnectionOutcome::Completed);
            }
        }
    };
    serve_with(
        listener,
        "auth endpoint",
        limits.max_connections,
        limits.shutdown_grace,
        shutdown,
        session,
    )
    .await
}

/// The accept loop of [`serve`], shared with the relay (`name` says which in the log): runs
/// `session` on each accepted connection (with its peer's address, a flag that turns true at
/// shutdown, and its [`PreAuth`] place, to drop once it has logged in), and on shutdown waits
/// up to `shutdown_grace` for the sessions before cutting them off.
///
/// Beyond `max_connections`, a new connection closes the oldest one that has not logged in
/// ([`PreAuthSet`]); only when every session has logged in is it refused "too many clients".
/// So a flood of connections that say nothing slows PgBouncer's logins down but cannot stop
/// them.
///
/// On a unix socket, a peer whose uid (`SO_PEERCRED`) is not the daemon's own (or root's) is
/// closed at once, before it takes a slot: another local user cannot starve PgBouncer's logins however
/// the socket's mode was set. Refusals are logged through [`LogThrottle`]s, so that a flood
/// costs a line per interval, not one per connection.
pub(crate) async fn serve_with<F, Fut>(
    listener: BoundListener,
    name: &'static str,
    max_connections: usize,
    shutdown_grace: Duration,
    shutdown: impl Future<Output = ()>,
    session: F,
) -> io::Result<()>
where
    F: Fn(Stream, String, watch::Receiver<bool>, PreAuth) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sessions_allowed = Arc::new(Semaphore::new(max_connections));
    // Refusing takes a moment too (the client must get to read why); bound those as well.
    let refusals_allowed = Arc::new(Semaphore::new(max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
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
            accepted = accept(&listener) => accepted,
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
        if let Some(uid) = foreign_uid(&stream, own_uid) {
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
            let running = session(stream, peer, stopped.clone(), place);
            let task = tasks.spawn(async move {
                running.await;
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
    let _ = stop.send(true);
    let drained = tokio::time::timeout(shutdown_grace, async {
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

/// An accepted connection.
pub(crate) enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &BoundListener) -> io::Result<(Stream, String)> {
    match &listener.inner {
        Inner::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Stream::Tcp(stream), peer.to_string()))
        }
        Inner::Unix(l, ..) => {
            let (stream, _) = l.accept().await?;
            Ok((Stream::Unix(stream), "unix".to_owned()))
        }
    }
}

/// The peer's uid when the connection is a unix socket whose peer is neither `own_uid` nor
/// root. Root is let through because it can read the daemon's memory and files anyway:
/// refusing it would protect nothing. A peer whose credentials cannot be read counts as
/// foreign (`u32::MAX`).
fn foreign_uid(stream: &Stream, own_uid: u32) -> Option<u32> {
    let Stream::Unix(unix) = stream else {
        return None;
    };
    let uid = unix.peer_cred().map_or(u32::MAX, |cred| cred.uid());
    (uid != own_uid && uid != 0).then_some(uid)
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
    backend::error_response(
        &mut out,
        "FATAL",
        "53300",
        "sorry, too many clients already",
    );
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
