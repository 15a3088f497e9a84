//! The passthrough relay: PgBouncer's server connections go through it, and it logs each one
//! in to RDS with a fresh IAM token, then steps aside.
//!
//! PgBouncer holds no token at all in this mode, so no token can go stale inside it: every
//! server login, however long after the client's, gets a token minted (or cached) for that
//! login. For each connection PgBouncer opens, the relay
//!
//! 1. authenticates PgBouncer (below);
//! 2. connects to the upstream server, asks for TLS and verifies its certificate against
//!    the configured CA bundle and the upstream host name (verify-full);
//! 3. sends PgBouncer's startup packet on, with the database name of the target;
//! 4. answers the server's AuthenticationCleartextPassword with the token for
//!    (host, port, user, region). A server that asks for MD5 or SCRAM instead means the
//!    user is not an IAM user, which PgBouncer is told in plain words; the server's own
//!    errors (`PAM authentication failed for user "U"`) reach PgBouncer unchanged;
//! 5. passes on everything up to ReadyForQuery, noting the BackendKeyData, then copies bytes
//!    both ways without looking at them until either side closes.
//!
//! **How PgBouncer logs in to the relay.** PgBouncer logs in to a server as the user of its
//! pool, i.e. as the IAM user, with the password its configuration holds for that user
//! (userlist, or the `[databases]` entry's forced `password=`). The relay admits any user
//! name whose password is the relay secret, with SCRAM-SHA-256, so **every IAM user's password
//! in PgBouncer's configuration is the same relay secret**; the secret proves "this is our
//! PgBouncer". On a unix socket, a peer whose uid is [`RelayConfig::peer_uid`] is admitted
//! without a password. Anyone else gets an ErrorResponse (28P01) before anything reaches the
//! upstream server.
//!
//! **What the secret buys.** The secret can leak (PgBouncer's memory, the relay-secret file,
//! an auth_query answer), so it buys no more than PgBouncer itself needs: a login as a user
//! on the target's allow-list ([`Upstream::users`], else 28000), to that target's database
//! only, with only the startup parameters PgBouncer puts in a server's StartupMessage
//! ([`FORWARDED_PARAMETERS`], else 08P01). PgBouncer builds that message from its
//! `[databases]` entry (`database`, `client_encoding`, `datestyle`, `timezone`,
//! `application_name`) and the pool's `user`; only for replication connections does it add
//! `replication`, the client's tracked parameters and its `options`, and the relay does not
//! carry replication. Each refusal is counted (`aws_pgbouncer_relay_refusals`). On TCP the
//! relay offers TLS with [`RelayConfig::server_tls`] (the daemon's own CA signs it), and
//! PgBouncer verifies it (`verify-full`): whatever else binds the port while the daemon is
//! down cannot pass for the relay. Over a unix socket PgBouncer never starts TLS.
//!
//! **Which upstream.** Targets are keyed by the database name PgBouncer sends, i.e. the
//! `dbname` of its `[databases]` entry. Each target names the upstream host, port, region and
//! the real database name to log in to, so one relay serves several RDS endpoints, even ones
//! whose databases have the same name. An unknown name is refused with 3D000.
//!
//! **Cancel requests.** The upstream's BackendKeyData reaches PgBouncer unchanged, and the
//! relay maps that key to the upstream for as long as the session lives. PgBouncer cancels by
//! opening a new server connection and sending the key, which the relay looks up and forwards
//! (over TLS) to that upstream; unknown keys are dropped silently, as PostgreSQL drops them.

//!
//! **Where tokens come from.** The relay asks a [`LoginTokens`] for each login; the daemon's
//! token source is one, and a test can bring its own.
//!
//! The connection handling up to the startup packet (listener, TLS, limits) is the wire
//! layer's ([`crate::wire`]), which the auth endpoint shares.

mod cancel;
mod copy;
#[cfg(any(fuzzing, test))]
mod fuzz;
mod login;
mod pacing;
mod session;
mod upstream;
mod upstream_tls;

pub use pacing::LoginRate;
pub use session::FORWARDED_PARAMETERS;

use crate::cpu_follow;
use crate::metrics::{Metrics, RelayRefusal};
use crate::wire::BoundListener;
use crate::wire::accept::{self, Serving};
use crate::wire::conn::End;
use crate::wire::scram::ScramSecret;
use cancel::CancelMap;
use pacing::LoginPacer;
use rustls::ClientConfig;
use secrecy::SecretString;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Where the relay gets the token for each upstream login.
pub trait LoginTokens: Send + Sync + 'static {
    /// A token that logs `user` in to `upstream` now, or why there is none. The reason goes
    /// to PgBouncer's log, so it must hold no secret.
    fn token(
        &self,
        upstream: &Upstream,
        user: &str,
    ) -> impl Future<Output = Result<SecretString, String>> + Send;
}

/// Where a target's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// RDS or Aurora DSQL: which kind of token logs in.
    pub kind: crate::token::TokenKind,
    /// The RDS endpoint name: the name its certificate must carry and the host the token is
    /// minted for. Connections go there too unless `dial` says otherwise.
    pub host: String,
    /// The port the token is minted for, and connected to unless `dial` says otherwise.
    pub port: u16,
    /// Where to connect when that is not `host:port`: an NLB, a tunnel, a port-forward. The
    /// certificate is still verified against `host`.
    pub dial: Option<(String, u16)>,
    /// Region the token is signed for.
    pub region: String,
    /// Database name sent upstream in place of the target's name.
    pub database: String,
    /// The IAM users PgBouncer may log in as through this target: the entry's allow-list.
    pub users: Vec<String>,
    /// The role whose credentials sign the tokens; `None` for the daemon's own.
    pub role: Option<crate::token::AssumedRole>,
}

impl Upstream {
    /// The host and port connections to this target go to.
    pub fn dial_address(&self) -> (&str, u16) {
        crate::config::dial_address(&self.dial, &self.host, self.port)
    }
}

/// What bounds each connection and the relay as a whole.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections at once, cancel requests included. A new one beyond closes the oldest that
    /// has not logged in; when all have, it is refused with 53300, which fails PgBouncer's
    /// server login. The daemon derives it from the pool sizes it configures PgBouncer with
    /// ([`crate::pgbouncer::server_connections`]); the default is for a relay run on its own.
    pub max_connections: usize,
    /// Largest message accepted before the relay steps aside, header included: PgBouncer's
    /// startup and SCRAM messages, and the upstream's messages up to ReadyForQuery.
    pub max_message_bytes: usize,
    /// From accept to the upstream's ReadyForQuery: PgBouncer's login, the upstream
    /// connection, TLS, the token and the upstream login. Keep it below PgBouncer's
    /// `server_connect_timeout` (15 s by default) so that PgBouncer hears why.
    pub handshake_timeout: Duration,
    /// How long `serve` lets relayed sessions go on after shutdown before cutting them off.
    pub shutdown_grace: Duration,
    /// New upstream logins per RDS host. A login waits for its slot up to half the
    /// handshake timeout, which leaves the other half for the login itself; beyond, it is
    /// refused with 57P03 so that PgBouncer hears why rather than timing out.
    pub login_rate: LoginRate,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_message_bytes: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            login_rate: LoginRate::default(),
        }
    }
}

/// The relay's settings.
pub struct RelayConfig {
    /// PgBouncer's password for every relayed user.
    pub secret: SecretString,
    /// On a unix socket, the uid admitted without a password (PgBouncer's).
    pub peer_uid: Option<u32>,
    /// TLS towards the upstream servers; [`upstream_tls`] builds the verify-full one.
    pub upstream_tls: Arc<ClientConfig>,
    /// Offered to PgBouncer on TCP when set, so that its `verify-full` towards the relay
    /// holds and nothing else that binds the port can pass for the relay.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// By the database name PgBouncer sends. Shared, not copied, with each session's cancel
    /// registration: an allow-list can name a thousand users, and copied per session it was
    /// most of the relay's memory at 1,000 users.
    pub targets: HashMap<String, Arc<Upstream>>,
    pub limits: Limits,
    /// Where refusals are counted, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// Keep the thread that serves the relay on the CPU of the PgBouncer that logs in
    /// through it ([`crate::cpu_follow`]); PgBouncer is known by `SO_PEERCRED`, so only
    /// on a unix socket. Meant for a one-thread runtime: it pins whichever thread runs it.
    pub follow_peer_cpu: bool,
}

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayConfig")
            .field("secret", &"[redacted]")
            .field("peer_uid", &self.peer_uid)
            .field("targets", &self.targets)
            .field("limits", &self.limits)
            .field("follow_peer_cpu", &self.follow_peer_cpu)
            .finish_non_exhaustive()
    }
}

/// TLS that verifies the upstream's certificate chain against the PEM bundle at `ca_file` (the
/// RDS bundle) and its name against the upstream host, as libpq's `verify-full` does.
pub fn upstream_tls(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let roots = crate::ca_bundle::load(ca_file)?;
    // An explicit provider: the dependency tree may enable more than one rustls backend, and
    // then the process-wide default is ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS versions: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What every connection of one relay shares.
struct Shared<T> {
    config: Arc<RelayConfig>,
    secret: ScramSecret,
    tokens: T,
    tls: Arc<ClientConfig>,
    cancels: CancelMap,
    pacer: LoginPacer,
    /// The pid of the PgBouncer last logged in over a unix socket, for the CPU follower.
    peer_pid: Option<watch::Sender<Option<u32>>>,
}

impl<T> Shared<T> {
    fn new(config: Arc<RelayConfig>, tokens: T) -> Self {
        Self {
            secret: ScramSecret::generate(&config.secret),
            tls: Arc::clone(&config.upstream_tls),
            pacer: LoginPacer::new(
                config.limits.login_rate,
                config.limits.handshake_timeout / 2,
            ),
            config,
            tokens,
            cancels: CancelMap::default(),
            peer_pid: None,
        }
    }

    /// Starts following the CPU of the PgBouncer that logs in, on the calling task's thread.
    fn follow_peer_cpu(&mut self) {
        let (peer_pid, pids) = watch::channel(None);
        tokio::spawn(cpu_follow::follow(
            pids,
            cpu_follow::PROC.into(),
            cpu_follow::SAMPLE_EVERY,
        ));
        self.peer_pid = Some(peer_pid);
    }

    /// Tells the CPU follower, if any, that `pid` has logged in.
    fn logged_in_from(&self, pid: Option<u32>) {
        if let (Some(peer_pid), Some(pid)) = (&self.peer_pid, pid) {
            peer_pid.send_if_modified(|known| known.replace(pid) != Some(pid));
        }
    }

    fn count_refusal(&self, reason: RelayRefusal) {
        if let Some(metrics) = &self.config.metrics {
            metrics.relay_refused(reason);
        }
    }

    /// Counts the refusal and hands back what PgBouncer is told.
    fn refused(&self, reason: RelayRefusal, end: End) -> End {
        self.count_refusal(reason);
        end
    }
}

/// Serves until `shutdown` resolves, then stops accepting and returns once the relayed
/// sessions have ended, or after `limits.shutdown_grace`. Errors are those of the listening
/// socket itself; a failing connection only ends itself.
pub async fn serve<T: LoginTokens>(
    listener: BoundListener,
    config: Arc<RelayConfig>,
    tokens: T,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = &config.limits;
    let serving = Serving::new(limits.max_connections, limits.shutdown_grace)
        .handshake(limits.max_message_bytes, limits.handshake_timeout)
        .offering(config.server_tls.as_ref());
    let mut shared = Shared::new(config, tokens);
    if shared.config.follow_peer_cpu {
        shared.follow_peer_cpu();
    }
    let shared = Arc::new(shared);
    accept::serve(listener, "relay", shared, serving, shutdown).await
}

/// Entry point for the fuzz target in `fuzz/`; compiled only with `--cfg fuzzing`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    pub use super::fuzz::fuzz_relay;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_secret() {
        let tls = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let config = RelayConfig {
            secret: "hunter2-relay".to_owned().into(),
            peer_uid: Some(70),
            upstream_tls: Arc::new(tls),
            server_tls: None,
            targets: HashMap::new(),
            limits: Limits::default(),
            metrics: None,
            follow_peer_cpu: false,
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("[redacted]") && debug.contains("70"),
            "{debug}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = upstream_tls(&empty).unwrap_err();
        assert!(error.contains("holds no usable CA certificate"), "{error}");
        let error = upstream_tls(&dir.path().join("missing.pem")).unwrap_err();
        assert!(error.contains("missing.pem"), "{error}");
    }
}
