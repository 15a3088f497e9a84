//! The server side of the PostgreSQL wire protocol that the auth-query endpoint
//! ([`crate::endpoint`]) and the passthrough relay ([`crate::relay`]) both speak to PgBouncer.
//!
//! Each is a [`Protocol`] that takes over once the client's startup packet (or CancelRequest)
//! is in, with the TLS it offers and the bounds of a handshake given as an
//! [`accept::Serving`]. Everything before that is here, once:
//!
//! - [`listener`] binds the socket (a unix socket gets its mode before it appears);
//! - [`accept`] runs the accept loop and its defences: the peer-uid check on unix sockets,
//!   the connection limit with eviction of the oldest connection not yet logged in
//!   ([`pre_auth`]), throttled logging of refusals, and the shutdown of every connection
//!   through one [`tokio_util::sync::CancellationToken`];
//! - [`startup`] answers encryption requests, runs TLS and reads the startup packet, all
//!   within the handshake deadline;
//! - [`conn`] frames a connection ([`framing`]) and ends it with a reason the client reads;
//! - [`backend`] writes server messages, every ErrorResponse with a SQLSTATE;
//! - [`scram`] and [`sasl`] authenticate the client with SCRAM-SHA-256.

pub(crate) mod accept;
pub(crate) mod backend;
pub(crate) mod conn;
pub(crate) mod framing;
#[cfg(any(fuzzing, test))]
pub(crate) mod fuzz;
pub(crate) mod listener;
pub(crate) mod pre_auth;
pub(crate) mod sasl;
pub(crate) mod scram;
pub(crate) mod startup;

pub use listener::{BoundListener, DEFAULT_SOCKET_MODE, Listen};

use crate::metrics::OpenConnection;
use conn::Conn;
use startup::{First, Handshake};
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// What a connection goes on with once its handshake is over: a relayed session's copy. The
/// handshake's state (TLS and SCRAM handshakes, the startup packet, the framing buffers) is
/// freed before it runs, so only this lives for as long as PgBouncer keeps the connection.
pub(crate) type Afterwards = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server that runs over the wire layer: the auth-query endpoint or the relay. What bounds
/// it is given to [`accept::serve`] apart ([`accept::Serving`]).
pub(crate) trait Protocol: Send + Sync + 'static {
    /// Counts the connection as open from accept until it ends, if the protocol counts them.
    fn opened(&self) -> Option<OpenConnection> {
        None
    }
    /// Goes on from what the client asked for first; owns the connection to its end, or hands
    /// what is left of it on as [`Afterwards`].
    fn started<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        conn: Conn<S>,
        first: First,
        handshake: Handshake,
    ) -> impl Future<Output = Option<Afterwards>> + Send;
}
