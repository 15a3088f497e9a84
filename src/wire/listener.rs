//! Binding a listening socket (TCP or unix) and accepting from it.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::{TcpListener, UnixListener};

/// Owner read and write only. Whatever the mode, a peer whose uid is not the daemon's own is
/// closed at accept ([`super::accept::serve`]): PgBouncer must run as the daemon's uid (it must anyway,
/// to read the 0600 files the daemon writes for it).
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Where the endpoint or the relay listens.
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

/// An accepted connection.
pub(crate) enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl BoundListener {
    pub(crate) async fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.inner {
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
}
