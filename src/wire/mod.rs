//! The server side of the PostgreSQL wire protocol that the auth-query endpoint
//! ([`crate::endpoint`]) and the passthrough relay ([`crate::relay`]) both speak to PgBouncer.
//!
//! Each is a [`Protocol`]: it says what TLS it offers and how big and how slow a handshake may
//! be, and takes over once the client's startup packet (or CancelRequest) is in. Everything
//! before that is here, once:
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
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

/// A server that runs over the wire layer: the auth-query endpoint or the relay.
pub(crate) trait Protocol: Send + Sync + 'static {
    /// Offered to an SSLRequest on TCP when set.
    fn tls(&self) -> Option<&TlsAcceptor>;
    /// Largest frame accepted during the handshake, header included.
    fn max_message_bytes(&self) -> usize;
    /// From accept to the end of the login.
    fn handshake_timeout(&self) -> Duration;
    /// Counts the connection as open from accept until it ends, if the protocol counts them.
    fn opened(&self) -> Option<OpenConnection> {
        None
    }
    /// Goes on from what the client asked for first; owns the connection to its end.
    fn started<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        conn: Conn<S>,
        first: First,
        handshake: Handshake,
    ) -> impl Future<Output = ()> + Send;
}
