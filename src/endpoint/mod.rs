//! The auth-query endpoint: a small fake PostgreSQL server that PgBouncer's `auth_user`
//! logs in to and asks for passwords with its `auth_query`.
//!
//! The endpoint answers that query with the current RDS IAM token of the user named in its
//! one parameter, so PgBouncer logs in to RDS with a fresh token on every client login. It
//! admits only `auth_user`, authenticated with SCRAM-SHA-256 against `auth_secret`, and
//! implements just the protocol PgBouncer (and a health probe) needs:
//!
//! - the auth query, sent with the extended protocol. **Its SQL text is not interpreted**:
//!   any statement whose only placeholder is `$1` is taken to be the auth query, so a
//!   customised `auth_query` works as long as it takes the user name as `$1`. The answer is
//!   one row `(usename, passwd)` for a user the target allows, none for anyone else;
//! - simple queries: `SELECT 1` (and an empty query) for health probes, and the session
//!   statements PgBouncer sends on its own (`SET`, `DISCARD ALL`, `RESET ALL`,
//!   `DEALLOCATE ALL`) as no-ops; anything else is refused and the session goes on.
//!
//! The target is the database PgBouncer connected to, i.e. its `auth_dbname`.

//!
//! The connection handling up to the startup packet (listener, TLS, limits) is the wire
//! layer's ([`crate::wire`]), which the relay shares.

mod extended;
mod frontend;
#[cfg(any(fuzzing, test))]
mod fuzz;
mod queries;
mod session;
mod sql;
mod tls;

pub use crate::wire::{BoundListener, DEFAULT_SOCKET_MODE, Listen};
pub use tls::{CA_FILE_NAME, self_signed_tls};

use crate::wire::accept::{self, Serving};
use secrecy::SecretString;
use session::Shared;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Where the tokens come from. The daemon implements it on top of its token source.
pub trait TokenLookup: Send + Sync + 'static {
    /// The current token for `user` at the target named `database`, or why not.
    fn lookup(&self, database: &str, user: &str) -> impl Future<Output = Lookup> + Send;

    /// The longest token PgBouncer passes on whole; a longer one is refused, not truncated.
    fn password_limit(&self) -> crate::token::PasswordLimit {
        crate::token::PasswordLimit::CONSERVATIVE
    }
}

/// The answer to one lookup.
#[derive(Debug)]
pub enum Lookup {
    /// The user is allowed: PgBouncer gets one row with this token as the password.
    Token(SecretString),
    /// Not on the target's allow-list: zero rows, which PgBouncer reports as "no such user".
    NoSuchUser,
    /// No target has this name: an error (SQLSTATE 3D000) to PgBouncer.
    UnknownDatabase,
    /// The user is allowed but no usable token can be had now; the text goes into the error
    /// PgBouncer logs, so it must hold no secret.
    Unavailable(String),
}

/// What bounds each session and the endpoint as a whole.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions at once. A new one beyond closes the oldest that has not logged in; when all
    /// have, it is refused with SQLSTATE 53300. PgBouncer opens at most `pool_size` (default
    /// 20) server connections for the auth user per auth database.
    pub max_connections: usize,
    /// Largest frame accepted, header included. PgBouncer's messages to the endpoint are a
    /// few hundred bytes; bigger ones end the session.
    pub max_message_bytes: usize,
    /// From accept to the first ReadyForQuery: TLS, startup and SCRAM.
    pub handshake_timeout: Duration,
    /// Longest wait for the client's next message (or for it to read our answer). Keep it
    /// above PgBouncer's `server_idle_timeout` (600 s by default), so that PgBouncer closes
    /// idle connections first and never picks one the endpoint is closing.
    pub idle_timeout: Duration,
    /// Longest wait for one [`TokenLookup::lookup`]; past it PgBouncer gets an error.
    pub lookup_timeout: Duration,
    /// How long `serve` waits for sessions to end after shutdown before cutting them off.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_message_bytes: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(900),
            lookup_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Limits {
    fn serving(&self) -> Serving {
        Serving::new(self.max_connections, self.shutdown_grace)
            .handshake(self.max_message_bytes, self.handshake_timeout)
    }
}

/// The endpoint's settings.
pub struct EndpointConfig {
    /// The only user admitted (PgBouncer's `auth_user`).
    pub auth_user: String,
    /// Its password. PgBouncer must hold it in plain text (auth_file or the `[databases]`
    /// entry): it cannot log in to a server with only a SCRAM verifier.
    pub auth_secret: SecretString,
    pub limits: Limits,
    /// Offered on TCP when a client sends SSLRequest. Never used on a unix socket, where
    /// PgBouncer never starts TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where open and ended connections are counted, if anywhere.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("auth_user", &self.auth_user)
            .field("auth_secret", &"[redacted]")
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .finish()
    }
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
    let serving = config.limits.serving().offering(config.tls.as_ref());
    let shared = Arc::new(Shared::new(config, lookup));
    accept::serve(listener, "auth endpoint", shared, serving, shutdown).await
}

/// Entry points for the fuzz targets in `fuzz/`; compiled only with `--cfg fuzzing`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub use super::fuzz::{fuzz_session, parse_frontend};
}
